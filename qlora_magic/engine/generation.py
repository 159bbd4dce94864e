"""Answer a prompt with a model, handing the text to a callback as it is produced. Nothing is printed
here: the caller decides where the text goes (api.generate prints it, the panel fills a widget)."""

from __future__ import annotations

import contextlib
import threading

from ..config import GenerateConfig
from ..errors import ConfigError
from .data import check_text


def build_inputs(tokenizer, config: GenerateConfig):
    """Token ids for the prompt: through the chat template when the tokenizer has one, unless raw."""
    check_text(config.prompt, "prompt")
    templated = not config.raw and getattr(tokenizer, "chat_template", None)
    if config.system:
        check_text(config.system, "--system text")
        if not templated:  # the system text has nowhere to go: say so rather than drop it
            reason = "--raw skips the template" if config.raw else "this tokenizer has none"
            raise ConfigError(
                f"--system {config.system[:40]!r} would be ignored: it goes into the chat template, and {reason}: "
                "put it at the start of the prompt instead" + (", or drop --raw." if config.raw else ".")
            )
    if not templated:
        return tokenizer(config.prompt, return_tensors="pt")
    messages = [{"role": "user", "content": config.prompt}]
    if config.system:
        messages.insert(0, {"role": "system", "content": config.system})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)


def context_length(model) -> int | None:
    """How many positions the model reads (None: no fixed limit, as with T5's relative positions)."""
    config = model.config
    return next((getattr(config, name) for name in ("max_position_embeddings", "n_positions")
                 if isinstance(getattr(config, name, None), int)), None)


def max_new_tokens_for(model, prompt_length: int, asked: int) -> int:
    """`asked`, capped at what the context leaves after the prompt: past it, a model with learned positions
    fails and one with rotary positions rambles, and --max-new-tokens 1000000000 would run for minutes.

    A prompt that fills the context is an error, not cut from the left: that would drop the chat template's
    first turn and the start of the question, and only the user knows what may go.
    """
    context = context_length(model)
    if context is None:
        return asked
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    room = context if encoder_decoder else context - prompt_length  # a decoder's answer follows the prompt
    if prompt_length > context or room < 1:
        raise ConfigError(
            f"The prompt is {prompt_length} tokens, and this model reads at most {context} (its context length), "
            "leaving no room for an answer: shorten the prompt."
        )
    return min(asked, room)


def generate_text(model, tokenizer, config: GenerateConfig, on_text=None) -> str:
    """Generate an answer; `on_text(chunk)` receives the text as it comes (None: nobody does).

    Returns the new text, without the prompt. Ctrl-C stops the generating thread, then raises KeyboardInterrupt
    (the caller has had the text so far through `on_text`).
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    from .quiet import quiet_bnb_warnings

    quiet_bnb_warnings()
    on_text = on_text or (lambda _: None)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in build_inputs(tokenizer, config).items()}
    max_new_tokens = max_new_tokens_for(model, inputs["input_ids"].shape[-1], config.max_new_tokens)
    stop = threading.Event()

    class StopWhenAsked(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return stop.is_set()

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = {"do_sample": False} if config.greedy else {"do_sample": True, "temperature": config.temperature, "top_p": config.top_p}
    if config.seed is not None:
        torch.manual_seed(config.seed)
    kwargs = dict(
        **inputs, **sampling, max_new_tokens=max_new_tokens, streamer=streamer,
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
        stop.set()  # the thread ends at its next token; then the interrupt goes on up
        raise
    finally:
        thread.join()
    if errors:
        raise errors[0]
    return "".join(pieces)
