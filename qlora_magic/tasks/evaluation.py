"""Evaluation: perplexity over response tokens, and generation metrics against references, for the
base model and any adapters, in one table.

Perplexity is exp of the mean negative log-likelihood of the response tokens only: the same masked
loss training minimizes, summed over every token of the data set (not averaged per batch), with the
prompt tokens left out. The course's slide 9 takes the argmax of the logits and scores BLEU on that
teacher-forced output, which is neither a perplexity nor what the model would say; here BLEU and ROUGE
score the model's own greedy answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..engine.adapters import BASE, active_adapter, check_adapter, using
from ..config import EvalConfig, GenerateConfig, TrainConfig
from ..engine.data import IGNORE_INDEX, ExampleTokenizer, Seq2SeqExamples, load_rows, prepare_datasets
from ..errors import ConfigError, DataError
from .finetune import ROW_INDEX, conversation_examples, held_out, keeping_row_index
from ..display.formatting import html_grid, text_grid


@dataclass
class EvalData:
    """The rows to evaluate: tokenized (for perplexity) and raw (for prompts and references)."""

    tokenized: object
    rows: object
    examples: ExampleTokenizer
    description: str


def eval_data(session, config: EvalConfig) -> EvalData:
    """The data set of `config`, or by default the held-out split of the session's last training run, the
    same rows training held out (`finetune.held_out`). Templates, chat and max_length not given are the last run's."""
    last = session.runs[-1] if session.runs else None
    if config.data is None and last is None:
        raise ConfigError("Nothing to evaluate on: pass data= (and prompt=/response=), or train with eval_split first.")
    trained = last.config if last else TrainConfig()
    templates_given = config.prompt is not None or config.response is not None
    messages = config.messages or (None if templates_given else trained.messages)
    max_length = config.max_length or trained.max_length
    if messages is not None:
        examples = conversation_examples(session, messages, max_length)
    else:
        examples = _template_examples(session, config, trained, max_length)
    if config.data is not None:
        rows = load_rows(config.data, config.split or _held_out_split(config.data))
        description = _describe(config.data, len(rows))
    else:
        rows = held_out(session, last).rows
        description = f"held-out split of training run {len(session.runs)}"
    rows = rows.add_column(ROW_INDEX, list(range(len(rows))))
    tokenized, _, _ = prepare_datasets(rows, keeping_row_index(examples), None)
    if config.limit:
        tokenized = tokenized.select(range(min(config.limit, len(tokenized))))
    return EvalData(tokenized, rows.select(tokenized[ROW_INDEX]), examples, f"{description}, {len(tokenized)} rows")


def _template_examples(session, config: EvalConfig, trained: TrainConfig, max_length: int) -> ExampleTokenizer:
    """The row tokenizer of the prompt/response templates given, else the last run's."""
    prompt = config.prompt or trained.prompt
    response = config.response or trained.response
    if prompt is None:
        raise ConfigError("Give a prompt template (prompt=, or prompt: in the cell body) for the data to evaluate.")
    if response is None:
        raise ConfigError("Evaluation needs references: give a response template (response=, e.g. \"{answer}\").")
    if session.task == "seq2seq":  # source -> target, no chat turns
        return Seq2SeqExamples(session.tokenizer, prompt, response, max_length=max_length)
    chat = trained.chat if config.chat is None else config.chat
    return ExampleTokenizer(session.tokenizer, prompt, response, chat=chat, max_length=max_length)


def _held_out_split(data) -> str:
    """The split to evaluate a DatasetDict on when none is named: the one made for it (test, else validation),
    never silently the training rows; a Hub dataset's train (the others are not fetched to look)."""
    keys = list(data) if type(data).__name__ == "DatasetDict" else []
    return next((name for name in ("test", "validation") if name in keys), "train")


def _describe(data, n):
    return data if isinstance(data, str) else f"{type(data).__name__} of {n} rows"


def response_nll(model, tokenizer, tokenized, batch_size=8) -> tuple[float, int]:
    """(summed negative log-likelihood, number of response tokens) over a tokenized data set, with
    the model as it is now (call inside `using(...)` to pick an adapter or the base)."""
    import torch
    import torch.nn.functional as F

    from ..engine.data import make_collator

    collate = make_collator(tokenizer)
    device = next(model.parameters()).device
    keep = ("input_ids", "attention_mask", "labels")
    total, tokens = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(tokenized), batch_size):
            part = tokenized[start:start + batch_size]
            batch = collate([{k: part[k][i] for k in keep} for i in range(len(part["input_ids"]))])
            batch = {k: v.to(device) for k, v in batch.items()}
            if getattr(model.config, "is_encoder_decoder", False):
                # The decoder reads the target shifted right (made from the labels): logit i predicts label i.
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).logits
                labels = batch["labels"]
            else:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                labels, logits = batch["labels"][:, 1:], logits[:, :-1]
            total += F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                                     ignore_index=IGNORE_INDEX, reduction="sum").item()
            tokens += int((labels != IGNORE_INDEX).sum())
    return total, tokens


def greedy_answers(model, tokenizer, prompts, max_new_tokens=64, chat=False) -> list[str]:
    """The model's greedy answer to each prompt, prompted exactly as in training."""
    from ..engine.generation import generate_text

    return [generate_text(model, tokenizer, GenerateConfig(prompt=p, raw=not chat, greedy=True, stream=False,
                                                           max_new_tokens=max_new_tokens)).strip()
            for p in prompts]


def text_metrics(predictions, references, metrics) -> dict:
    """BLEU (sacrebleu, corpus level, 0-100), ROUGE-1/2/L F1 (rouge-score, stemmed, 0-1, mean over
    rows) and exact match (0-1) of predictions against references."""
    scores = {}
    if "bleu" in metrics:
        sacrebleu = _optional("sacrebleu", "BLEU")
        scores["bleu"] = sacrebleu.corpus_bleu(predictions, [references]).score
    if "rouge" in metrics:
        rouge_scorer = _optional("rouge_score.rouge_scorer", "ROUGE", package="rouge-score")
        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        results = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
        for key in ("rouge1", "rouge2", "rougeL"):
            scores[key] = sum(r[key].fmeasure for r in results) / len(results)
    if "exact_match" in metrics:
        scores["exact_match"] = sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)
    return scores


def _optional(module, what, package=None):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{what} needs the {package or module} package: pip install {package or module}") from None


def evaluate_model(session, config: EvalConfig) -> "EvalReport":
    """Evaluate the active adapter (or `config.adapters`), and the base model with `config.base`."""
    model = session.require_model("evaluation")
    names = config.adapters or [active_adapter(model)]
    for name in names:
        check_adapter(model, name)
    data = eval_data(session, config)
    if len(data.tokenized) == 0:
        raise DataError("No rows left to evaluate.")
    generative = [m for m in config.metrics if m != "perplexity"]
    prompts = [data.examples.prompt_text(row) for row in data.rows]
    references = [data.examples.response_text(row) for row in data.rows]
    step = max((r.get("step", 0) for r in session.history if r.get("kind") != "eval"), default=0)
    results, answers = [], {}
    for name in ([BASE] if config.base else []) + names:
        result = {"model": name, "rows": len(data.tokenized)}
        with using(model, name):
            if "perplexity" in config.metrics:
                nll, tokens = response_nll(model, session.tokenizer, data.tokenized, config.batch_size)
                result.update(response_tokens=tokens, loss=nll / tokens, perplexity=math.exp(nll / tokens))
            if generative:
                answers[name] = greedy_answers(model, session.tokenizer, prompts, config.max_new_tokens, data.examples.chat)
                result.update(text_metrics(answers[name], references, generative))
        results.append(result)
        # "kind" keeps these rows apart from training's (loss charts read loss/eval_loss only).
        session.history.append({"kind": "eval", "step": step, "data": data.description,
                                **{("response_loss" if k == "loss" else k): v for k, v in result.items()}})
    return EvalReport(results, data.description, prompts, references, answers)


COLUMNS = [  # (key, header, format)
    ("model", "model", "{}"), ("rows", "rows", "{}"), ("response_tokens", "response tokens", "{:,}"),
    ("loss", "loss", "{:.4f}"), ("perplexity", "perplexity", "{:.3f}"), ("bleu", "BLEU", "{:.2f}"),
    ("rouge1", "ROUGE-1", "{:.3f}"), ("rouge2", "ROUGE-2", "{:.3f}"), ("rougeL", "ROUGE-L", "{:.3f}"),
    ("exact_match", "exact match", "{:.1%}"),
]


@dataclass(repr=False)
class EvalReport:
    """One row per model evaluated (base first), with the greedy answers kept for inspection.

    >>> report.results            # list of dicts: model, rows, loss, perplexity, bleu, ...
    >>> report.to_dataframe()
    >>> report.samples(3)         # prompt, reference and each model's answer
    """

    results: list
    data: str
    prompts: list = field(default_factory=list)
    references: list = field(default_factory=list)
    answers: dict = field(default_factory=dict)

    title = "Evaluation"

    def __getitem__(self, model):
        return next(r for r in self.results if r["model"] == model)

    def _table(self):
        columns = [c for c in COLUMNS if any(c[0] in r for r in self.results)]
        cells = [[fmt.format(r[key]) if key in r else "-" for key, _, fmt in columns] for r in self.results]
        return [h for _, h, _ in columns], cells

    def samples(self, n=3):
        """The first n prompts with their reference and each model's answer."""
        return [{"prompt": p, "reference": ref, **{m: a[i] for m, a in self.answers.items()}}
                for i, (p, ref) in enumerate(zip(self.prompts[:n], self.references[:n]))]

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.results).set_index("model")

    def _title(self):
        return f"{self.title} on {self.data}"

    def __repr__(self):
        text = text_grid(self._title(), *self._table())
        for sample in self.samples(2):
            text += "\n\n  prompt:    " + " ".join(sample.pop("prompt").split())
            text += "".join(f"\n  {k + ':':<10} {v}" for k, v in sample.items())
        return text

    def _repr_html_(self):
        html = html_grid(self._title(), *self._table())
        if self.answers:
            models = list(self.answers)
            html += html_grid("Sample answers", ["prompt", "reference", *models],
                              [[s["prompt"], s["reference"], *(s[m] for m in models)] for s in self.samples(3)], pre=True)
        return html
