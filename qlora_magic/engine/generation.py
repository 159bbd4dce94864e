"""Answer a prompt with a model, handing the text to a callback as it is produced. Nothing is printed
here: the caller decides where the text goes (api.generate prints it, the panel fills a widget)."""

from __future__ import annotations

import contextlib
import threading

from ..config import GenerateConfig


def build_inputs(tokenizer, config: GenerateConfig):
    """Token ids for the prompt: through the chat template when the tokenizer has one, unless raw."""
    if config.raw or not getattr(tokenizer, "chat_template", None):
        return tokenizer(config.prompt, return_tensors="pt")
    messages = [{"role": "user", "content": config.prompt}]
    if config.system:
        messages.insert(0, {"role": "system", "content": config.system})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)


def generate_text(model, tokenizer, config: GenerateConfig, on_text=None) -> str:
    """Generate an answer; `on_text(chunk)` receives the text as it comes (None: nobody does).

    Returns the new text, without the prompt. Ctrl-C stops generation and keeps the text so far.
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    from .quiet import quiet_bnb_warnings

    quiet_bnb_warnings()
    on_text = on_text or (lambda _: None)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in build_inputs(tokenizer, config).items()}
    stop = threading.Event()

    class StopWhenAsked(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return stop.is_set()

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = {"do_sample": False} if config.greedy else {"do_sample": True, "temperature": config.temperature, "top_p": config.top_p}
    if config.seed is not None:
        torch.manual_seed(config.seed)
    kwargs = dict(
        **inputs, **sampling, max_new_tokens=config.max_new_tokens, streamer=streamer,
        pad_token_id=tokenizer.pad_token_id, stopping_criteria=StoppingCriteriaList([StopWhenAsked()]),
    )
    if config.greedy:  # the model's generation_config may carry sampling defaults; greedy must not warn about them
        kwargs.update(temperature=None, top_p=None, top_k=None)
    errors = []

    def work():
        try:
            adapters_off = model.disable_adapter() if config.base and hasattr(model, "disable_adapter") else contextlib.nullcontext()
            with adapters_off, torch.inference_mode():
                model.generate(**kwargs)
        except BaseException as exc:  # shown in the caller's thread
            errors.append(exc)
            streamer.end()

    model.eval()
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    pieces = []
    try:
        for chunk in streamer:
            pieces.append(chunk)
            on_text(chunk)
    except KeyboardInterrupt:
        stop.set()
    finally:
        thread.join()
    if errors:
        raise errors[0]
    return "".join(pieces)
