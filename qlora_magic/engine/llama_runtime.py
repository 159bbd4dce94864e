"""A GGUF file run by llama.cpp itself (through `llama-cpp-python`, optional): greedy answers and the response
loss, fed the same token ids transformers is fed, so what differs is the runtime's model and nothing else."""

from __future__ import annotations

import functools

from ..config import GenerateConfig
from .data import IGNORE_INDEX


def _runtime(path: str, n_ctx: int):
    return _loaded(path, max(256, -(-n_ctx // 256) * 256))  # one context per size step, reused across rows


@functools.lru_cache(maxsize=1)
def _loaded(path: str, n_ctx: int):
    from llama_cpp import Llama

    return Llama(model_path=path, n_ctx=n_ctx, logits_all=True, verbose=False, seed=0)


def release() -> None:
    """Drop the loaded file (a later export to the same path must not meet the old one)."""
    _loaded.cache_clear()


def llama_answers(path, tokenizer, prompts, max_new_tokens, chat) -> list[str]:
    """llama.cpp's greedy answer to each prompt, prompted as `greedy_answers` prompts transformers."""
    from .generation import build_inputs

    answers = []
    for prompt in prompts:
        ids = build_inputs(tokenizer, GenerateConfig(prompt=prompt, raw=not chat, greedy=True, stream=False))["input_ids"][0].tolist()
        llm = _runtime(str(path), len(ids) + max_new_tokens + 8)
        llm.reset()
        out = []
        for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0, reset=True):
            if token == llm.token_eos() or token == tokenizer.eos_token_id or len(out) >= max_new_tokens:
                break
            out.append(token)
        answers.append(tokenizer.decode(out, skip_special_tokens=True).strip())
    return answers


def llama_nll(path, tokenized) -> tuple[float, int]:
    """(summed negative log-likelihood, response tokens) of tokenized rows under llama.cpp, as `response_nll`."""
    import numpy as np

    total, count = 0.0, 0
    for ids, labels in zip(tokenized["input_ids"], tokenized["labels"]):
        llm = _runtime(str(path), len(ids) + 8)
        llm.reset()
        llm.eval(list(ids))
        logits = np.asarray(llm.scores[:len(ids)], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        for position in range(len(ids) - 1):
            target = labels[position + 1]
            if target != IGNORE_INDEX:
                total -= log_probs[position, target]
                count += 1
    return total, count
