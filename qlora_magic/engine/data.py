"""Training data: where rows come from, the prompt/response templates, tokenization with the loss
masked to the response (or, for the other tasks, source/target pairs and class labels), and batching
with dynamic padding (or packing)."""

from __future__ import annotations

import string
from pathlib import Path

from ..errors import ConfigError, DataError

IGNORE_INDEX = -100  # label value the loss skips (transformers' convention)
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_rows(source, split="train"):
    """Turn a data source into a `datasets.Dataset`.

    source: a list of dicts, a pandas DataFrame, a `datasets.Dataset`/`DatasetDict`, a local
    .jsonl/.json/.csv/.parquet path, or a Hub dataset id.
    """
    import datasets

    if source is None:
        raise DataError("No data given: put data: <file, Hub id or $variable> in the cell body.")
    if isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise DataError(f"The dataset has no split {split!r}; it has {', '.join(source)}: set split: in the cell body.")
        source = source[split]
    if isinstance(source, datasets.Dataset):
        rows = source
    elif isinstance(source, list):
        if source and not all(isinstance(r, dict) for r in source):
            raise DataError("A list of training rows must hold dicts, e.g. [{'question': ..., 'answer': ...}].")
        rows = datasets.Dataset.from_list(source)
    elif type(source).__name__ == "DataFrame":
        rows = datasets.Dataset.from_pandas(source, preserve_index=False)
    elif isinstance(source, (str, Path)):
        rows = _load_named(str(source), split)
    else:
        raise DataError(
            f"Cannot train on a {type(source).__name__}: give a list of dicts, a DataFrame, a datasets.Dataset, a file path or a Hub id."
        )
    if len(rows) == 0:
        raise DataError("The dataset is empty: it has no rows to train on.")
    return rows


def _load_named(name: str, split: str):
    import datasets

    path = Path(name).expanduser()
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt or path.exists():
        if not path.exists():
            raise DataError(f"No file {name!r}: check the path (relative paths start from the notebook's folder).")
        if not fmt:
            raise DataError(f"Cannot read {name!r}: use a .jsonl, .json, .csv or .parquet file.")
        try:
            return datasets.load_dataset(fmt, data_files=str(path), split="train")
        except Exception as error:  # a malformed file: say which and why, in one line
            raise DataError(f"Cannot read {name!r} as {path.suffix}: {str(error).splitlines()[0]}") from None
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as error:
        raise DataError(
            f"Cannot load dataset {name!r}: {str(error).splitlines()[0]} (not a local file; Hub datasets need a connection)."
        ) from None


def template_fields(template: str, what: str) -> list[str]:
    """The {field} names in a template; a malformed template is a one-line error."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        raise ConfigError(f"The {what} template {template!r} is malformed ({error}): write literal braces as {{{{ and }}}}.") from None
    for name in names:
        if name == "" or not name.isidentifier():
            raise ConfigError(f"The {what} template has a placeholder {{{name}}}: use column names like {{question}}; write literal braces as {{{{ }}}}.")
    return names


def check_templates(prompt: str, response: str, columns) -> None:
    """Fail before training if a template names a column the data does not have."""
    columns = list(columns)
    for template, what in ((prompt, "prompt"), (response, "response")):
        if template is None:  # a classifier has no response template
            continue
        for name in template_fields(template, what):
            if name not in columns:
                raise DataError(f"The {what} template uses {{{name}}}, but the data has no such column; its columns are: {', '.join(columns)}.")


def render(template: str, row: dict) -> str:
    return template.format(**{k: "" if v is None else v for k, v in row.items()})


class ExampleTokenizer:
    """Tokenizes one row into input_ids and labels, with the prompt tokens masked out of the loss.

    Prompt and response are tokenized apart and joined, so the mask falls exactly on the boundary.
    With `chat`, they become the user and assistant turns of the tokenizer's chat template.
    """

    def __init__(self, tokenizer, prompt: str, response: str, chat: bool = False, max_length: int = 512):
        if chat and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("chat: true needs a tokenizer with a chat template, and this one has none: set chat: false.")
        self.tokenizer, self.prompt, self.response = tokenizer, prompt, response
        self.chat, self.max_length = chat, max_length

    def prompt_text(self, row) -> str:
        return render(self.prompt, row)

    def __call__(self, row) -> dict:
        tok = self.tokenizer
        prompt, response = render(self.prompt, row), render(self.response, row)
        if self.chat:
            turn = [{"role": "user", "content": prompt}]
            prompt_ids = _ids(tok.apply_chat_template(turn, add_generation_prompt=True, tokenize=True))
            full_ids = _ids(tok.apply_chat_template(turn + [{"role": "assistant", "content": response}], tokenize=True))
            if full_ids[: len(prompt_ids)] != prompt_ids:  # templates that rewrite earlier turns
                full_ids = prompt_ids + tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            response_ids = full_ids[len(prompt_ids):]
        else:
            prompt_ids = tok(prompt, add_special_tokens=True)["input_ids"]
            response_ids = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        input_ids = (prompt_ids + response_ids)[: self.max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[: self.max_length]
        return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


class Seq2SeqExamples(ExampleTokenizer):
    """For an encoder-decoder model: the prompt is the encoder's input, the response the decoder's
    target (labels), ended by the end-of-sequence token. No chat template: these models have none."""

    def __init__(self, tokenizer, prompt: str, response: str, max_length: int = 512):
        super().__init__(tokenizer, prompt, response, chat=False, max_length=max_length)

    def __call__(self, row) -> dict:
        tok = self.tokenizer
        input_ids = tok(render(self.prompt, row), add_special_tokens=True)["input_ids"][: self.max_length]
        target = tok(render(self.response, row), add_special_tokens=True)["input_ids"]
        if not target or target[-1] != tok.eos_token_id:  # T5/BART add it themselves; other tokenizers may not
            target = target + [tok.eos_token_id]
        return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": target[: self.max_length]}


def label_names(rows, column: str) -> list:
    """The classes of a label column: string labels in sorted order (their ids are their positions);
    integer labels are ids already, so names are 0..max."""
    if column not in rows.column_names:
        raise DataError(f"The data has no label column {column!r}; its columns are: {', '.join(rows.column_names)}.")
    values = rows[column]
    if any(v is None for v in values):
        raise DataError(f"The label column {column!r} has empty values: every row needs a label.")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        if min(values) < 0:
            raise DataError(f"Label ids must be >= 0, got {min(values)} in column {column!r}.")
        return list(range(max(values) + 1))
    return sorted({str(v) for v in values})


class ClassificationExamples(ExampleTokenizer):
    """For sequence classification: the prompt template renders the text, `label` names the column of
    its class; `names` are the classes in id order (see `label_names`)."""

    def __init__(self, tokenizer, prompt: str, label: str, names: list, max_length: int = 512):
        super().__init__(tokenizer, prompt, None, chat=False, max_length=max_length)
        self.label, self.names = label, list(names)
        self.ids = {str(name): i for i, name in enumerate(self.names)}

    def __call__(self, row) -> dict:
        input_ids = self.tokenizer(render(self.prompt, row), add_special_tokens=True)["input_ids"][: self.max_length]
        value = row[self.label]
        label = value if isinstance(value, int) and not isinstance(value, bool) else self.ids.get(str(value))
        if label is None or not 0 <= label < len(self.names):
            raise DataError(f"Label {value!r} is not one of the model's {len(self.names)} classes ({', '.join(map(str, self.names))}).")
        return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": label}


def _ids(result):
    # apply_chat_template returns a list, or a BatchEncoding in newer transformers
    return list(result["input_ids"]) if hasattr(result, "keys") else list(result)


def prepare_datasets(rows, example_tokenizer: ExampleTokenizer, eval_split=None, seed=42):
    """Tokenize and split. Returns (train, eval or None, stats dict)."""
    from .quiet import no_progress_bars

    check_templates(example_tokenizer.prompt, example_tokenizer.response, rows.column_names)
    with no_progress_bars():
        tokenized = rows.map(example_tokenizer, remove_columns=rows.column_names)
        before = len(tokenized)
        if not isinstance(example_tokenizer, ClassificationExamples):  # a class label is never cut
            # An example whose response was cut away entirely teaches nothing (and would give a NaN loss).
            tokenized = tokenized.filter(lambda ex: any(label != IGNORE_INDEX for label in ex["labels"]))
    dropped = before - len(tokenized)
    if len(tokenized) == 0:
        raise DataError(f"Every example is longer than max_length={example_tokenizer.max_length} before its response starts: raise max_length.")
    eval_set = None
    if eval_split:
        size = eval_split if eval_split < 1 else int(eval_split)
        n_eval = round(size * len(tokenized)) if size < 1 else size
        if n_eval < 1 or n_eval >= len(tokenized):
            raise DataError(f"eval_split={eval_split} leaves {len(tokenized) - n_eval} training and {n_eval} evaluation rows out of {len(tokenized)}: choose a value that keeps both non-empty.")
        parts = tokenized.train_test_split(test_size=n_eval, seed=seed)
        tokenized, eval_set = parts["train"], parts["test"]
    lengths = [len(ids) for ids in tokenized["input_ids"]]
    stats = {
        "train_rows": len(tokenized),
        "eval_rows": 0 if eval_set is None else len(eval_set),
        "dropped_rows": dropped,
        "mean_tokens": sum(lengths) / len(lengths),
        "max_tokens": max(lengths),
    }
    return tokenized, eval_set, stats


def make_collator(tokenizer, packing: bool = False, task: str = "causal-lm", pad_to_multiple_of: int | None = None):
    """Batches padded to the longest row in each batch, labels padded with -100; or, with packing,
    all rows of a batch in one sequence whose position ids restart per example, so attention stays
    inside each example and no pad token is computed. A classifier's labels are one id per row.
    pad_to_multiple_of (packing only): end the packed sequence with a pad segment of its own so that
    its length is a multiple of this (fewer distinct shapes for the GPU's per-shape caches)."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening, DataCollatorWithPadding

    if task == "seq-cls":
        return DataCollatorWithPadding(tokenizer, padding="longest")
    if packing:
        flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
        if not pad_to_multiple_of or pad_to_multiple_of <= 1:
            return flatten
        return _RoundedPacking(flatten, pad_id(tokenizer), pad_to_multiple_of)
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding="longest")


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


class _RoundedPacking:
    """A packed batch padded at the end by one extra "example" of pad tokens: its position ids restart,
    so nothing attends across into it, and its labels are -100, so the loss is unchanged."""

    def __init__(self, flatten, pad_id: int, multiple: int):
        self.flatten, self.pad_id, self.multiple = flatten, pad_id, multiple

    def __call__(self, features):
        import torch

        batch = self.flatten(features)
        extra = -batch["input_ids"].shape[1] % self.multiple
        if extra:
            fill = {"input_ids": torch.full((1, extra), self.pad_id), "labels": torch.full((1, extra), IGNORE_INDEX),
                    "position_ids": torch.arange(extra).unsqueeze(0)}
            batch = {k: torch.cat([v, fill[k].to(v.dtype)], dim=1) if k in fill else v for k, v in batch.items()}
        return batch


def packed_real_tokens(batch, pad_id: int) -> int:
    """Tokens of a packed batch without the pad segment _RoundedPacking may have ended it with."""
    ids, positions, labels = batch["input_ids"][0], batch["position_ids"][0], batch["labels"][0]
    last = int((positions == 0).nonzero()[-1])
    if last > 0 and bool((ids[last:] == pad_id).all()) and bool((labels[last:] == IGNORE_INDEX).all()):
        return last
    return ids.numel()


def show_masking(tokenizer, example: dict) -> list[tuple[str, bool]]:
    """The tokens of one tokenized example with whether each counts in the loss (for teaching)."""
    return [(tokenizer.decode([t]), label != IGNORE_INDEX) for t, label in zip(example["input_ids"], example["labels"])]
