"""Merge an adapter into an unquantized copy of its base and save it as a plain transformers model.

Merging into 8- or 4-bit weights would round the update back onto the quantization grid (and PEFT
dequantizes and requantizes to do it), so the base is reloaded from its original weights in 16 bits
on the CPU, the adapter's weights are copied in, and `merge_and_unload` folds them into the linear
layers. The result loads with `AutoModelForCausalLM.from_pretrained(path)`: no peft, no bitsandbytes.
The check that follows compares the saved model with the adapter the session trained.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from .adapters import active_adapter, check_adapter, using
from .config import EvalConfig, MergeConfig
from .errors import ConfigError, QloraError
from .formatting import Readout, gb

CHECK_ROWS = 4  # held-out rows the check answers and scores: enough to see drift, quick on a CPU
FALLBACK_PROMPTS = ["The capital of France is"]


def merge_adapter(session, config: MergeConfig) -> "MergeReport":
    """Write the merged model to `config.path` and, with `config.verify`, check it against the adapter."""
    import torch
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from .loading import resolve_model
    from .quiet import no_progress_bars

    model = session.require_model("merging")
    task = getattr(session.load_config, "task", "causal-lm")
    if task != "causal-lm":
        raise ConfigError(f"%qlora_merge writes causal-lm models only; this one is {task}: save the adapter with %qlora_save instead.")
    name = check_adapter(model, config.adapter) if config.adapter else active_adapter(model)
    path = Path(config.path).expanduser()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise QloraError(f"{str(path)!r} already exists and is not empty: choose a new folder for the merged model.")
    started = time.perf_counter()
    dtype = getattr(torch, config.dtype)
    base_path = resolve_model(session.load_config.model if session.load_config else None)
    with no_progress_bars():
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, device_map={"": "cpu"})
    lora = copy.deepcopy(model.peft_config[name])
    lora.inference_mode = True
    merged = get_peft_model(base, lora)
    loaded = set_peft_model_state_dict(merged, get_peft_model_state_dict(model, adapter_name=name))
    missing = [k for k in loaded.missing_keys if "lora_" in k]
    if missing:  # would silently merge an untrained (zero) update
        raise QloraError(f"The adapter's weights do not fit the reloaded base ({missing[0]} missing): was the model loaded from {base_path}?")
    merged = merged.merge_and_unload()
    path.mkdir(parents=True, exist_ok=True)
    with no_progress_bars():
        merged.save_pretrained(str(path))
    session.tokenizer.save_pretrained(str(path))
    del merged, base
    report = MergeReport(path=str(path), adapter=name, dtype=config.dtype, base=str(base_path),
                         size=sum(f.stat().st_size for f in path.glob("*.safetensors")),
                         seconds=time.perf_counter() - started, tolerance=config.tolerance)
    if config.verify:
        _verify(session, model, name, path, dtype, config, report)
    report.seconds = time.perf_counter() - started
    return report


def _check_data(session, config: MergeConfig):
    """Prompts (and, when there is data, the tokenized rows) for the check."""
    from .evaluation import eval_data

    if config.prompts:
        return list(config.prompts), None, False
    try:
        data = eval_data(session, EvalConfig(data=config.data, limit=CHECK_ROWS))
    except ConfigError:  # no training run with held-out rows: answers only
        return FALLBACK_PROMPTS, None, False
    return [data.examples.prompt_text(row) for row in data.rows], data.tokenized, data.examples.chat


def _verify(session, model, name, path, dtype, config, report):
    """Reload what was saved and compare its greedy answers and perplexity with the adapter's."""
    from transformers import AutoModelForCausalLM

    from .evaluation import greedy_answers, response_nll
    from .quiet import no_progress_bars

    prompts, tokenized, chat = _check_data(session, config)
    with no_progress_bars():
        saved = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, device_map={"": "cpu"})
    tok = session.tokenizer
    with using(model, name):
        adapter_answers = greedy_answers(model, tok, prompts, config.max_new_tokens, chat)
        if tokenized is not None:
            nll, n = response_nll(model, tok, tokenized)
            report.adapter_perplexity = math.exp(nll / n)
    report.merged_answers = greedy_answers(saved, tok, prompts, config.max_new_tokens, chat)
    if tokenized is not None:
        nll, n = response_nll(saved, tok, tokenized)
        report.merged_perplexity = math.exp(nll / n)
    report.prompts, report.adapter_answers = prompts, adapter_answers
    del saved


@dataclass(repr=False)
class MergeReport(Readout):
    """Where the merged model went, and how closely it matches the adapter it came from."""

    path: str
    adapter: str
    dtype: str
    base: str
    size: int
    seconds: float
    tolerance: float = 0.05
    prompts: list = field(default_factory=list)
    adapter_answers: list = field(default_factory=list)
    merged_answers: list = field(default_factory=list)
    adapter_perplexity: float | None = None
    merged_perplexity: float | None = None

    title = "Merged model"

    @property
    def verified(self):
        return bool(self.prompts)

    @property
    def answers_matching(self) -> int:
        return sum(a == m for a, m in zip(self.adapter_answers, self.merged_answers))

    @property
    def perplexity_drift(self) -> float | None:
        """Relative change of perplexity, merged vs adapter (0.01 = 1%)."""
        if self.adapter_perplexity is None or self.merged_perplexity is None:
            return None
        return (self.merged_perplexity - self.adapter_perplexity) / self.adapter_perplexity

    @property
    def within_tolerance(self) -> bool | None:
        if not self.verified:
            return None
        drift = self.perplexity_drift
        return self.answers_matching == len(self.prompts) and (drift is None or abs(drift) <= self.tolerance)

    def rows(self):
        rows = [("saved to", f"{self.path}/ ({gb(self.size)} safetensors, {self.dtype})"),
                ("adapter", f"{self.adapter}, merged into the unquantized base {self.base}")]
        if self.verified:
            rows.append(("greedy answers", f"{self.answers_matching}/{len(self.prompts)} identical to the adapter's"))
            if self.perplexity_drift is not None:
                rows.append(("perplexity", f"adapter {self.adapter_perplexity:.4f}, merged {self.merged_perplexity:.4f} "
                                           f"(drift {self.perplexity_drift:+.2%})"))
            verdict = "within" if self.within_tolerance else "OUTSIDE"
            rows.append(("check", f"{verdict} tolerance (identical answers, perplexity drift <= {self.tolerance:.0%}); "
                                  "the adapter ran on the quantized base, the merged model on the original weights"))
            for prompt, a, m in zip(self.prompts, self.adapter_answers, self.merged_answers):
                if a != m:
                    rows.append(("differs", f"{' '.join(prompt.split())[:60]!r}: adapter {a!r} vs merged {m!r}"))
        rows.append(("time", f"{self.seconds:.1f} s"))
        return rows
