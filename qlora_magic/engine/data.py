"""Training data: where rows come from, the prompt/response templates, tokenization with the loss
masked to the response (or, for the other tasks, source/target pairs and class labels), and batching
with dynamic padding (or packing)."""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

from ..errors import ConfigError, DataError
from .speed import token_groups

IGNORE_INDEX = -100  # label value the loss skips (transformers' convention)
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
FORMATS_HINT = "a .jsonl, .json, .csv or .parquet file"
ROW_EXAMPLE = '{"question": "...", "answer": "..."}'
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
ROW_INDEX = "qlora_row"  # carried through tokenization, so tokenized rows can be found again among the raw rows


def load_rows(source, split="train"):
    """Turn a data source into a `datasets.Dataset`.

    source: a list of dicts, a pandas DataFrame, a `datasets.Dataset`/`DatasetDict`, a local
    .jsonl/.json/.csv/.parquet path, or a Hub dataset id.
    """
    import datasets

    if source is None:
        raise DataError("No data given: put data: <file, Hub id or $variable> in the cell body (data= in Python: a file, "
                        "Hub id, list of dicts, DataFrame or Dataset).")
    if isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise DataError(f"The dataset has no split {split!r}; it has {', '.join(source)}: set split: in the cell body.")
        source = source[split]
    if isinstance(source, datasets.Dataset):
        rows = source
    elif isinstance(source, list):
        if source and not all(isinstance(r, dict) for r in source):
            raise DataError("A list of training rows must hold dicts, e.g. [{'question': ..., 'answer': ...}].")
        rows = _table(lambda: datasets.Dataset.from_list(source), lambda: source)
    elif type(source).__name__ == "DataFrame":
        rows = _table(lambda: datasets.Dataset.from_pandas(source, preserve_index=False), lambda: source.to_dict("records"))
    elif isinstance(source, (str, Path)):
        rows = _load_named(str(source), split)
    else:
        raise DataError(
            f"data cannot be {str(source)[:40]!r} (of type {type(source).__name__}): give a list of dicts, a DataFrame, a datasets.Dataset, a file path or a Hub id."
        )
    if len(rows) == 0:
        raise DataError("The dataset is empty: it has no rows to train on.")
    return rows


def _table(make, records):
    """make() builds the Dataset; when arrow refuses the rows, records() (read only then) names the row to blame."""
    import pyarrow

    try:
        return make()
    except (pyarrow.ArrowException, UnicodeEncodeError) as error:
        raise DataError(blame_rows(records()) or f"The rows cannot be stored as a table: {_first_line(error)}") from None


def blame_rows(records, unit: str = "row", source: str = "", numbers=None) -> str | None:
    """Why arrow cannot store these rows, as a message naming the row (or the line, with its `numbers`) to blame;
    None if nothing is found. Text that is not valid Unicode, a row that is not a record, text and numbers mixed."""
    found = _first_fault(records, unit, numbers or range(1, len(records) + 1))
    if found is None:
        return None
    return f"{source}: {found}" if source else found[0].upper() + found[1:]


def _first_fault(records, unit: str, numbers) -> str | None:
    first_kind = {}  # column -> (kind, where) of its first value
    for number, record in zip(numbers, records):
        where = f"{unit} {number}"
        if not isinstance(record, dict):
            return f"{where} is {_short(record)}, not a record: every row must be an object like {ROW_EXAMPLE}."
        for column, value in record.items():
            bad = _lone_surrogate_in(value)
            if bad:
                return (f"{where}, column {column!r}, holds {bad!r}, half of a UTF-16 surrogate pair and not valid text: "
                        "remove it (or repair the text, e.g. text.encode('utf-8', 'replace').decode()).")
            if value is None:
                continue
            kind, seen_at = first_kind.setdefault(column, (_kind(value), where))
            if kind != _kind(value):
                fix = "make them all text, e.g. str(value)" if "text" in (kind, _kind(value)) else "give the column one kind of value"
                return f"column {column!r} mixes {kind} ({seen_at}) and {_kind(value)} ({where}): {fix}."
    return None


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value) -> str:
    if isinstance(value, str):
        return "text"
    if isinstance(value, bool):
        return "true/false values"
    if isinstance(value, (int, float)):
        return "numbers"
    return {dict: "records", list: "lists"}.get(type(value), f"{type(value).__name__} values")


def _lone_surrogate_in(value) -> str | None:
    if isinstance(value, str):
        found = LONE_SURROGATE.search(value)
        return found.group() if found else None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((bad for bad in map(_lone_surrogate_in, items) if bad), None)


def check_text(text: str, what: str) -> None:
    """A one-line ConfigError for text the tokenizer cannot encode (a lone surrogate, e.g. from a bad decode)."""
    found = LONE_SURROGATE.search(text or "")
    if found:
        raise ConfigError(
            f"The {what} holds {found.group()!r} at character {found.start()}, half of a UTF-16 surrogate pair and not valid text: "
            "remove it (or repair the text, e.g. text.encode('utf-8', 'replace').decode())."
        )


def _first_line(error) -> str:
    """The most telling line of a library error: datasets wraps the parser's own reason in a generic one."""
    while error.__cause__ is not None and "error occurred while generating" in str(error):
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _load_named(name: str, split: str):
    import datasets

    from .offline import hub_reachable, no_telemetry, why_offline

    no_telemetry()
    path = Path(name).expanduser()
    fmt = FILE_FORMATS.get(path.suffix.lower())
    try:
        exists = path.exists()
    except OSError as error:  # a path no file system takes (a name over 255 bytes...)
        raise DataError(f"data: {name[:60]!r}... cannot be opened ({error.strerror or error}): give an existing file.") from None
    looks_like_file = fmt or exists or re.fullmatch(r"\.[A-Za-z]{1,5}", path.suffix)
    if looks_like_file:
        if path.is_dir():
            inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in FILE_FORMATS)
            hint = f"give one of its data files ({', '.join(inside[:3])})" if inside else f"it holds no data file; give {FORMATS_HINT}"
            raise DataError(f"{name!r} is a folder: {hint}.")
        if not exists:
            raise DataError(f"No file {name!r}: check the path (relative paths start from the notebook's folder).")
        if not fmt:
            raise DataError(f"Cannot read {name!r}: {path.suffix} is not a format this reads; use {FORMATS_HINT}.")
        return _load_file(path, name, fmt)
    online = hub_reachable()
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as error:
        why = _first_line(error) if online else f"it is not in the local cache and {why_offline()}"
        raise DataError(
            f"Cannot load dataset {name!r}: {why} (not a local file; Hub datasets need a connection)."
        ) from None


def _load_file(path: Path, name: str, fmt: str):
    """A local data file, read quietly (a tiny file would print three progress lines around any error)."""
    import datasets

    from .quiet import quiet_datasets

    try:
        blank = _is_blank(path)
    except OSError as error:
        raise DataError(f"Cannot read {name!r}: {error.strerror or error}: check that it is a file you may read.") from None
    if blank:
        raise DataError(f"{name!r} is empty: {_row_format(fmt)}.")
    try:
        with quiet_datasets():
            rows = datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as error:  # a malformed file: say where and why, in one line
        if "corresponds to no data" in str(error):
            raise DataError(f"{name!r} has no rows: {_row_format(fmt)}.") from None
        where = _json_fault(path, name) if fmt == "json" else None
        raise DataError(where or f"Cannot read {name!r} as {path.suffix}: {_first_line(error)}") from None
    if len(rows) == 0:
        raise DataError(f"{name!r} has no rows: {_row_format(fmt)}.")
    # datasets keeps a column of text and numbers as raw JSON values; refuse it as a list of such rows is refused.
    mixed = [column for column, feature in rows.features.items() if isinstance(feature, datasets.Json)]
    fault = mixed and blame_rows(rows.select_columns(mixed).to_list(), "row", repr(name))
    if fault:
        raise DataError(fault)
    return rows


def _is_blank(path: Path) -> bool:
    with path.open("rb") as file:
        while chunk := file.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _row_format(fmt: str) -> str:
    return {
        "json": f"write one JSON object per line, like {ROW_EXAMPLE}",
        "csv": "write a header line of column names, then one row per line",
    }.get(fmt, "write some rows into it")


def _json_fault(path: Path, name: str) -> str | None:
    """Where a JSON (lines) file goes wrong: the line that does not parse, or the row arrow cannot store."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):  # one JSON array of rows
        try:
            return blame_rows(json.loads(text), "row", repr(name))
        except json.JSONDecodeError as error:
            return f"{name!r} is not valid JSON at line {error.lineno} ({error.msg}): a .json file is one array of objects, like [{ROW_EXAMPLE}]."
    records, numbers = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            return f"{name!r} line {number} is not valid JSON ({error.msg}): write one JSON object per line, like {ROW_EXAMPLE}."
        numbers.append(number)
    return blame_rows(records, "line", repr(name), numbers)


def template_fields(template: str, what: str) -> list[str]:
    """The {field} names in a template; a malformed template is a one-line error."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        raise ConfigError(f"The {what} template {template!r} is malformed ({error}): write literal braces as {{{{ and }}}}.") from None
    for name in names:
        # A column's name as it is ({the question}, {score-2}, {0}); attribute and index access would be Python's.
        if name == "" or "." in name or "[" in name:
            raise ConfigError(f"The {what} template has a placeholder {{{name}}}: name a column as it is, like {{question}}; "
                              "write literal braces as {{{{ }}}}.")
    return names


def check_templates(prompt: str, response: str, columns) -> None:
    """Fail before training if a template names a column the data does not have."""
    columns = [column for column in columns if column != ROW_INDEX]  # ours, not the user's
    for template, what in ((prompt, "prompt"), (response, "response")):
        if template is None:  # a classifier has no response template
            continue
        check_text(template, f"{what} template")
        for name in template_fields(template, what):
            if name not in columns:
                raise DataError(f"The {what} template uses {{{name}}}, but the data has no such column; its columns are: {', '.join(columns)}.")


def render(template: str, row: dict) -> str:
    """The template filled from the row (an empty cell reads as ''); a placeholder whose format spec or
    conversion does not suit its value ({n:.1f} on text, {id:s} on a number) is a one-line DataError."""
    values = {k: "" if v is None else v for k, v in row.items()}
    try:
        return _COLUMNS.vformat(template, (), values)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
        raise DataError(_render_failure(template, values, error)) from None


class _ColumnFormatter(string.Formatter):
    """str.format with every placeholder a column's name: {0} is the column named "0" (a DataFrame's numbered
    columns), not the first positional argument."""

    def get_value(self, key, args, kwargs):
        return kwargs[str(key)]


_COLUMNS = _ColumnFormatter()


def _which_row(row) -> str:
    """" (row N)" when the row carries its index (rows tokenized for training or evaluation), else ""."""
    return f" (row {row[ROW_INDEX]})" if ROW_INDEX in row else ""


def _render_failure(template: str, values: dict, error: Exception) -> str:
    """Which placeholder of `template` cannot show its value, and how to fix it."""
    where = _which_row(values)
    for _, name, spec, conversion in _COLUMNS.parse(template):
        if name is None:
            continue
        placeholder = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        try:
            _COLUMNS.format_field(_COLUMNS.convert_field(values[name], conversion), spec)
        except Exception as failure:  # noqa: BLE001 - any failure of this field is what the user must see
            value = values.get(name)
            shown = f"{value!r}"[:60]
            return (f"The template's {placeholder} cannot show {shown} ({type(value).__name__}) of a row{where}: "
                    f"{failure}. Use {{{name}}} without a format spec, or make the column's values all of one type "
                    "(an empty cell reads as '').")
    return f"The template {template!r} cannot be filled from a row{where}: {error}."


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

    def response_text(self, row) -> str:
        """The row's target as text (the reference an evaluation compares answers with)."""
        return render(self.response, row)

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


class ConversationExamples(ExampleTokenizer):
    """A column of chat conversations, as Hugging Face's chat datasets keep them (lists of {"role", "content"}
    turns: system, user, assistant, ...): each conversation through the tokenizer's chat template, the loss on
    every assistant turn (its end-of-turn token included) and on nothing else. Its prompt and response
    "templates" name the column, so the checks that a template's columns exist hold as for templates; an
    evaluation's prompt is the conversation before its last answer, and the reference that answer."""

    def __init__(self, tokenizer, column: str, max_length: int = 512):
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("messages: needs a tokenizer with a chat template, and this one has none: "
                              "give prompt: and response: templates instead.")
        super().__init__(tokenizer, "{" + column + "}", "{" + column + "}", chat=False, max_length=max_length)
        self.column = column

    def turns(self, row) -> list[dict]:
        """The row's conversation, checked: a list of turns with a text role and content (one DataError line)."""
        turns = row.get(self.column)
        where = _which_row(row)
        if not isinstance(turns, list) or not turns:
            raise DataError(f"messages: {self.column!r} holds {str(turns)[:40]!r}{where}, not a conversation: each row needs a "
                            'list of turns like [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}].')
        for turn in turns:
            if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or not isinstance(turn.get("content"), str):
                raise DataError(f"messages: a turn of {self.column!r}{where} is {str(turn)[:60]!r}: each turn needs a text "
                                '"role" (system, user or assistant) and a text "content".')
        return [{"role": turn["role"], "content": turn["content"]} for turn in turns]

    def _template(self, turns, generation_prompt=False, tokenize=True):
        result = self.tokenizer.apply_chat_template(turns, add_generation_prompt=generation_prompt, tokenize=tokenize)
        return _ids(result) if tokenize else result

    @staticmethod
    def _answers(turns) -> list[int]:
        """The assistant turns that are trained: those with something before them."""
        return [i for i, turn in enumerate(turns) if turn["role"] == "assistant" and i > 0]

    def prompt_text(self, row) -> str:
        """The conversation before its last answer, as the chat template writes it for generation: a raw prompt."""
        turns = self.turns(row)
        answers = self._answers(turns)
        text = self._template(turns[:answers[-1]] if answers else turns, generation_prompt=True, tokenize=False)
        bos = self.tokenizer.bos_token
        if bos and text.startswith(bos) and self.tokenizer("", add_special_tokens=True)["input_ids"]:
            text = text[len(bos):]  # the tokenizer adds it again to a raw prompt
        return text

    def response_text(self, row) -> str:
        turns = self.turns(row)
        answers = self._answers(turns)
        return turns[answers[-1]]["content"] if answers else ""

    def __call__(self, row) -> dict:
        turns = self.turns(row)
        input_ids = self._template(turns)
        labels = [IGNORE_INDEX] * len(input_ids)
        for i in self._answers(turns):
            start = len(self._template(turns[:i], generation_prompt=True))
            through = self._template(turns[: i + 1])
            if input_ids[: len(through)] != through or start > len(through):
                raise ConfigError("messages: this chat template writes earlier turns differently as a conversation grows, "
                                  "so its answers cannot be found in it: give prompt: and response: templates instead.")
            labels[start: len(through)] = through[start:]
        input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
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
            raise DataError(f"eval_split={eval_split:g} leaves {len(tokenized) - n_eval} training and {n_eval} evaluation rows out of {len(tokenized)}: choose a value that keeps both non-empty.")
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


def make_collator(tokenizer, packing: bool = False, task: str = "causal-lm", pad_to_multiple_of: int | None = None,
                  max_tokens: int | None = None):
    """Batches padded to the longest row in each batch, labels padded with -100; or, with packing,
    all rows of a batch in one sequence whose position ids restart per example, so attention stays
    inside each example and no pad token is computed. A classifier's labels are one id per row.
    pad_to_multiple_of (packing only): end the packed sequence with a pad segment of its own so that
    its length is a multiple of this (fewer distinct shapes for the GPU's per-shape caches).
    max_tokens (packing only): a batch longer than this also carries its examples regrouped into pieces of
    at most this many tokens (PIECES; speed.token_groups), which the Trainer trains one forward each."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening, DataCollatorWithPadding

    if task == "seq-cls":
        return DataCollatorWithPadding(tokenizer, padding="longest")
    if packing:
        flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
        if (not pad_to_multiple_of or pad_to_multiple_of <= 1) and not max_tokens:
            return flatten
        return _RoundedPacking(flatten, pad_id(tokenizer), pad_to_multiple_of or 1, max_tokens)
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding="longest")


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


PIECES = "pieces"  # the key under which a packed batch over the token cap carries its pieces


class _RoundedPacking:
    """A packed batch padded at the end by one extra "example" of pad tokens: its position ids restart,
    so nothing attends across into it, and its labels are -100, so the loss is unchanged.

    A micro-batch of one example is padded as its continuation instead (position ids go on): being last, the
    pad is attended by nothing before it, and the batch stays one causal sequence, for which attention needs
    no mask (a packed batch's SDPA mask and its per-layer bias grow with the square of the length: 3 GB
    at 32k tokens)."""

    def __init__(self, flatten, pad_id: int, multiple: int, max_tokens: int | None = None):
        self.flatten, self.pad_id, self.multiple, self.max_tokens = flatten, pad_id, multiple, max_tokens

    def __call__(self, features):
        batch = self._pack(features)
        lengths = [len(f["input_ids"]) for f in features]
        if self.max_tokens and sum(lengths) > self.max_tokens:
            groups = token_groups(lengths, self.max_tokens)
            if len(groups) > 1:
                batch[PIECES] = [self._pack([features[i] for i in group]) for group in groups]
        return batch

    def _pack(self, features):
        import torch

        batch = self.flatten(features)
        length = batch["input_ids"].shape[1]
        extra = -length % self.multiple
        if extra:
            start = length if len(features) == 1 else 0
            fill = {"input_ids": torch.full((1, extra), self.pad_id), "labels": torch.full((1, extra), IGNORE_INDEX),
                    "position_ids": torch.arange(start, start + extra).unsqueeze(0)}
            batch = {k: torch.cat([v, fill[k].to(v.dtype)], dim=1) if k in fill else v for k, v in batch.items()}
        return batch


def packed_real_tokens(batch, pad_id: int) -> int:
    """Tokens of a packed batch without the pad segment _RoundedPacking may have ended it with (a segment of
    its own, or a lone example's continuation: trailing pad tokens without labels; an example's own last
    token has one, the end of sequence)."""
    ids, positions, labels = batch["input_ids"][0], batch["position_ids"][0], batch["labels"][0]
    last = int((positions == 0).nonzero()[-1])
    if last > 0 and bool((ids[last:] == pad_id).all()) and bool((labels[last:] == IGNORE_INDEX).all()):
        return last
    if last == 0:
        padding = (ids != pad_id) | (labels != IGNORE_INDEX)
        return int(padding.nonzero()[-1]) + 1 if bool(padding.any()) else 0
    return ids.numel()


def show_masking(tokenizer, example: dict) -> list[tuple[str, bool]]:
    """The tokens of one tokenized example with whether each counts in the loss (for teaching)."""
    return [(tokenizer.decode([t]), label != IGNORE_INDEX) for t, label in zip(example["input_ids"], example["labels"])]
