"""Merge an adapter into an unquantized copy of its base and save it as a plain transformers model.

Merging into 8- or 4-bit weights would round the update back onto the quantization grid (and PEFT
dequantizes and requantizes to do it), so the base is reloaded from its original weights in 16 bits
on the CPU, the adapter's weights are copied in, and `merge_and_unload` folds them into the linear
layers. The result loads with the task's plain transformers Auto class (`AutoModelForCausalLM`,
`AutoModelForSequenceClassification` or `AutoModelForSeq2SeqLM`): no peft, no bitsandbytes. A
classifier's head is trained whole (PEFT's modules_to_save), so it is copied in too, and the class
names training learned go into the saved config (id2label / label2id).

The check that follows compares the saved model with the adapter the session trained: greedy answers
and perplexity for causal-lm and seq2seq, predicted labels and logits for seq-cls.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field

from ..engine.adapters import active_adapter, check_adapter, using
from ..config import EvalConfig, MergeConfig
from ..errors import ConfigError, Interrupted, QloraError
from ..display.formatting import Readout, gb

CHECK_ROWS = 4  # held-out rows the check answers and scores: enough to see drift, quick on a CPU
CLASSIFY_ROWS = 64  # a classifier's check is one forward pass per batch: more rows, a real accuracy
FALLBACK_PROMPTS = ["The capital of France is"]


def merge_adapter(session, config: MergeConfig) -> "MergeReport":
    """Write the merged model to `config.path` and, with `config.verify`, check it against the adapter."""
    import torch

    from ..engine.folder_writing import check_folder_path, folder_written
    from ..engine.quiet import no_progress_bars

    model = session.require_model("merging")
    task = session.task
    name = check_adapter(model, config.adapter) if config.adapter else active_adapter(model)
    path = check_folder_path(config.path, "The merge folder")
    if path.exists() and any(path.iterdir()):
        raise ConfigError(f"{str(path)!r} already exists and is not empty: choose a new folder for the merged model.")
    started = time.perf_counter()
    # The check's rows are made first: bad data= fails before anything is written.
    check = None if not config.verify else _classifier_check(session, config) if task == "seq-cls" else _check_data(session, config)
    dtype = getattr(torch, config.dtype)
    merged, base_path, auto_class = merged_model(session, name, dtype)
    with folder_written(path, "the merged model") as staging, no_progress_bars():  # whole, or not at all
        merged.save_pretrained(str(staging))
        session.tokenizer.save_pretrained(str(staging))
    del merged
    report = MergeReport(path=str(path), adapter=name, dtype=config.dtype, base=str(base_path),
                         size=sum(f.stat().st_size for f in path.glob("*.safetensors")),
                         seconds=time.perf_counter() - started, tolerance=config.tolerance, task=task)
    if config.verify:
        with checked_after_writing("merge", path, "%qlora_merge"):
            with no_progress_bars():
                saved = auto_class.from_pretrained(str(path), dtype=dtype, device_map={"": "cpu"})
            (_verify_classifier if task == "seq-cls" else _verify_answers)(session, model, name, saved, config, report, check)
        del saved
    report.seconds = time.perf_counter() - started
    return report


@contextlib.contextmanager
def checked_after_writing(what: str, written, verb: str):
    """The check that follows a complete write: a Ctrl-C in it says what is on disk (whole, not checked), rather
    than the verb's "run it again", which the folder now there would refuse."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(f"The {what}'s check was interrupted: {str(written)!r} is written whole but not checked; the "
                          f"session's model is unchanged. Use it as it is, or run {verb} into a new folder to check "
                          "one.") from None


def merged_model(session, name, dtype):
    """(the merged model, the base's path, its Auto class): the base reloaded from its original weights in
    `dtype` on the CPU, adapter `name`'s weights copied in and folded into the linear layers."""
    import transformers
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from ..engine.loading import TASK_CLASSES, quiet_new_head_warning, resolve_model
    from ..engine.quiet import no_progress_bars

    model, task = session.model, session.task
    base_path = resolve_model(session.load_config.model if session.load_config else None)
    auto_class = getattr(transformers, TASK_CLASSES[task][0])
    with no_progress_bars(), quiet_new_head_warning():
        base = auto_class.from_pretrained(base_path, dtype=dtype, device_map={"": "cpu"}, **_head(model, session.tokenizer, task))
    lora = copy.deepcopy(model.peft_config[name])
    lora.inference_mode = True
    merged = get_peft_model(base, lora)
    loaded = set_peft_model_state_dict(merged, get_peft_model_state_dict(model, adapter_name=name))
    # A missing LoRA weight would merge an untrained (zero) update; a missing head, a random classifier.
    missing = [k for k in loaded.missing_keys if "lora_" in k or "modules_to_save" in k]
    if missing:
        raise QloraError(f"The adapter's weights do not fit the reloaded base ({missing[0]} missing): was the model loaded from {base_path}?")
    return merged.merge_and_unload(), base_path, auto_class


def _head(model, tokenizer, task) -> dict:
    """A classifier's head as the session has it: its size, the class names training learned (so the
    saved config maps ids to names), and the pad token it finds the last real token by."""
    if task != "seq-cls":
        return {}
    config = model.config
    return {"num_labels": config.num_labels, "id2label": dict(config.id2label), "label2id": dict(config.label2id),
            "pad_token_id": tokenizer.pad_token_id}


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


def _verify_answers(session, model, name, saved, config, report, check):
    """Compare the saved model's greedy answers and perplexity with the adapter's."""
    from .evaluation import greedy_answers, response_nll

    prompts, tokenized, chat = check
    tok = session.tokenizer
    adapter_side(model, tok, name, config, check, report)
    report.merged_answers = greedy_answers(saved, tok, prompts, config.max_new_tokens, chat)
    if tokenized is not None:
        nll, n = response_nll(saved, tok, tokenized)
        report.merged_perplexity = math.exp(nll / n)


_adapter_side = {}  # the last check's adapter answers and perplexity: exporting f16, then q8_0, asks twice


def adapter_side(model, tokenizer, name, config, check, report) -> None:
    """The adapter's greedy answers and perplexity on the check's rows, into `report` (with the prompts).

    Kept for the next check of the same adapter weights on the same rows: each weight's `_version` counts the
    in-place changes (an optimizer step, a loaded checkpoint), so a trained or reloaded adapter is asked again."""
    from .evaluation import greedy_answers, response_nll

    prompts, tokenized, chat = check
    weights = [(p.data_ptr(), p._version) for n, p in model.named_parameters() if f".{name}." in n and "lora_" in n]
    rows = None if tokenized is None else str(tokenized["input_ids"]) + str(tokenized["labels"])
    key = (id(model), name, tuple(weights), tuple(prompts), rows, config.max_new_tokens, chat)
    if key not in _adapter_side:
        with using(model, name):
            answers = greedy_answers(model, tokenizer, prompts, config.max_new_tokens, chat)
            perplexity = None
            if tokenized is not None:
                nll, n = response_nll(model, tokenizer, tokenized)
                perplexity = math.exp(nll / n)
        _adapter_side.clear()
        _adapter_side[key] = answers, perplexity
    answers, report.adapter_perplexity = _adapter_side[key]
    report.prompts, report.adapter_answers = list(prompts), list(answers)


def _classifier_rows(session, config: MergeConfig):
    """A classifier's check rows, tokenized with their label ids: `config.data` with the last run's templates,
    else the rows that run held out (`finetune.held_out`); None when there are none."""
    from .finetune import held_out, task_examples, why_no_held_out
    from ..engine.data import load_rows, prepare_datasets

    last = session.runs[-1] if session.runs else None
    if last is None or not last.config.label:
        return None
    if config.data is not None:
        rows = load_rows(config.data, "train")
        tokenized, _, _ = prepare_datasets(rows, task_examples(session, last.config, rows))
    elif why_no_held_out(last):  # nothing held out, or in-memory rows not saved
        return None
    else:
        tokenized = held_out(session, last).tokenized
    tokenized = tokenized.select(range(min(CLASSIFY_ROWS, len(tokenized))))
    texts = [session.tokenizer.decode(ids, skip_special_tokens=True) for ids in tokenized["input_ids"]]
    return texts, tokenized


def _logits(model, tokenizer, features, batch_size=16):
    """The classifier's logits (float32, on the CPU) for tokenized rows."""
    import torch

    from ..engine.data import make_collator

    collate = make_collator(tokenizer, task="seq-cls")
    device = next(model.parameters()).device
    model.eval()
    parts = []
    with torch.inference_mode():
        for start in range(0, len(features), batch_size):
            batch = collate(features[start:start + batch_size])
            batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            parts.append(model(**batch).logits.float().cpu())
    return torch.cat(parts)


def _classifier_check(session, config: MergeConfig):
    """(texts, tokenized rows, label ids or None) for a classifier's check."""
    found = None if config.prompts else _classifier_rows(session, config)
    if found is None:  # no labelled rows: compare on the texts given (or a fallback), labels only
        texts = list(config.prompts or FALLBACK_PROMPTS)
        return texts, [dict(session.tokenizer(t)) for t in texts], None
    texts, tokenized = found
    features = [{"input_ids": ids, "attention_mask": mask} for ids, mask in zip(tokenized["input_ids"], tokenized["attention_mask"])]
    return texts, features, tokenized["labels"]


def _verify_classifier(session, model, name, saved, config, report, check):
    """Compare the saved classifier's labels and logits with the adapter's, and both accuracies."""
    from ..engine.classification import class_names

    tok = session.tokenizer
    texts, features, labels = check
    with using(model, name):
        adapter_logits = _logits(model, tok, features)
    merged_logits = _logits(saved, tok, features)
    names = class_names(model)
    adapter_ids, merged_ids = adapter_logits.argmax(-1).tolist(), merged_logits.argmax(-1).tolist()
    report.prompts = texts
    report.adapter_answers = [names[i] for i in adapter_ids]
    report.merged_answers = [names[i] for i in merged_ids]
    report.max_logit_drift = float((merged_logits - adapter_logits).abs().max())
    probability_change = (merged_logits.softmax(-1) - adapter_logits.softmax(-1)).abs()
    report.max_probability_drift = float(probability_change.max())
    report.mean_probability_drift = float(probability_change.max(-1).values.mean())
    if labels is not None:
        report.adapter_accuracy = sum(p == y for p, y in zip(adapter_ids, labels)) / len(labels)
        report.merged_accuracy = sum(p == y for p, y in zip(merged_ids, labels)) / len(labels)


@dataclass(repr=False)
class MergeReport(Readout):
    """Where the merged model went, and how closely it matches the adapter it came from.

    For a classifier the "answers" are the predicted class names, and the drift is in the logits."""

    path: str
    adapter: str
    dtype: str
    base: str
    size: int
    seconds: float
    tolerance: float = 0.05
    task: str = "causal-lm"
    prompts: list = field(default_factory=list)
    adapter_answers: list = field(default_factory=list)
    merged_answers: list = field(default_factory=list)
    adapter_perplexity: float | None = None
    merged_perplexity: float | None = None
    max_logit_drift: float | None = None  # seq-cls: largest |merged - adapter| logit over rows and classes
    max_probability_drift: float | None = None  # seq-cls: the same for the class probabilities (softmax)
    mean_probability_drift: float | None = None  # seq-cls: per row the largest probability change, averaged
    adapter_accuracy: float | None = None
    merged_accuracy: float | None = None

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
    def loss_drift(self) -> float | None:
        """Change of the mean loss (nats per token), merged minus adapter: log of the perplexity ratio."""
        if self.perplexity_drift is None:
            return None
        return math.log(self.merged_perplexity / self.adapter_perplexity)

    @property
    def within_tolerance(self) -> bool | None:
        if not self.verified:
            return None
        # A classifier's logits may all shift together without changing anything; its probabilities may not.
        # Averaged over rows, like perplexity: one row near the decision boundary moves most under requantization.
        drift = self.mean_probability_drift if self.task == "seq-cls" else self.perplexity_drift
        return self.answers_matching == len(self.prompts) and (drift is None or abs(drift) <= self.tolerance)

    def rows(self):
        rows = [("saved to", f"{self.path}/ ({gb(self.size)} safetensors, {self.dtype})"),
                ("adapter", f"{self.adapter}, merged into the unquantized base {self.base} ({self.task})")]
        if self.verified:
            classifier = self.task == "seq-cls"
            rows.append(("labels" if classifier else "greedy answers",
                         f"{self.answers_matching}/{len(self.prompts)} identical to the adapter's"))
            if classifier:
                if self.adapter_accuracy is not None:
                    rows.append(("accuracy", f"adapter {self.adapter_accuracy:.1%}, merged {self.merged_accuracy:.1%} "
                                             f"on {len(self.prompts)} labelled rows"))
                rows.append(("drift", f"class probabilities: mean change {self.mean_probability_drift:.4f}, largest "
                                      f"{self.max_probability_drift:.4f}; largest logit change {self.max_logit_drift:.4f}"))
                rule = f"identical labels, mean probability change <= {self.tolerance:g}"
            else:
                if self.perplexity_drift is not None:
                    rows.append(("perplexity", f"adapter {self.adapter_perplexity:.4f}, merged {self.merged_perplexity:.4f} "
                                               f"(drift {self.perplexity_drift:+.2%}, loss {self.loss_drift:+.4f} nats)"))
                rule = f"identical answers, perplexity drift <= {self.tolerance:.0%}"
            rows.append(("check", f"{'within' if self.within_tolerance else 'OUTSIDE'} tolerance ({rule}); "
                                  "the adapter ran on the quantized base, the merged model on the original weights"))
            for prompt, a, m in zip(self.prompts, self.adapter_answers, self.merged_answers):
                if a != m:
                    rows.append(("differs", f"{' '.join(prompt.split())[:60]!r}: adapter {a!r} vs merged {m!r}"))
        rows.append(("time", f"{self.seconds:.1f} s"))
        return rows
