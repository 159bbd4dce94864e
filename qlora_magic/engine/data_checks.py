"""The data check: the rows tokenized with the loaded tokenizer exactly as training will tokenize them (the same
row tokenizer, `tasks.finetune.task_examples`), before any GPU time is spent. What it counts: prompt and response
lengths, rows `max_length` cuts, rows left with no trained token, whether each target keeps a stop token and
whether that token is one generation stops at (the tokenizer's eos, the chat template's end of turn,
generation_config.eos_token_id), duplicates and empty fields. A problem (nothing to learn, nothing that teaches
the model to stop) stops %%qlora_train in one line; the rest are warnings."""

from __future__ import annotations

import copy
import sys
from collections import Counter
from dataclasses import dataclass

from ..display.data_report import DataReport
from ..display.findings import Finding
from ..errors import DataError
from .data import IGNORE_INDEX, ClassificationExamples, Seq2SeqExamples, check_templates, show_masking, template_fields

SAMPLES = 3  # rows shown as tokens
TURN_SENTINEL = "\x00qlora\x00"  # assistant content whose end shows where the chat template ends a turn


@dataclass(frozen=True)
class StopTokens:
    """The tokens that end an answer: the tokenizer's eos, the chat template's end of turn, and the ids
    generation stops at (generation_config.eos_token_id, else the tokenizer's eos)."""

    eos: int | None
    turn_end: int | None
    generation: frozenset

    def name(self, tokenizer, token_id) -> str:
        return tokenizer.convert_ids_to_tokens(token_id) if token_id is not None else "none"


def stop_tokens(tokenizer, generation_config=None) -> StopTokens:
    eos = tokenizer.eos_token_id
    ids = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return StopTokens(eos, chat_turn_end(tokenizer), frozenset(ids or ([eos] if eos is not None else [])))


def chat_turn_end(tokenizer) -> int | None:
    """The special token the chat template puts after an assistant's message (None without a template)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": TURN_SENTINEL}],
                                             tokenize=False)
    except Exception:  # a template that wants other roles: nothing to compare with
        return None
    after = text.split(TURN_SENTINEL, 1)[1] if TURN_SENTINEL in text else ""
    special = set(tokenizer.all_special_ids)
    return next((i for i in tokenizer(after, add_special_tokens=False)["input_ids"] if i in special), None)


@dataclass
class _Row:
    prompt: int  # tokens before the trained part (a classifier's whole input)
    response: int  # tokens of the target, its stop token included
    trained: int  # tokens that count in the loss once max_length cut the row
    cut: bool
    end: int | None  # the last special token kept in the trained part
    sample: list | None = None


def check_examples(rows, examples, generation_config=None) -> DataReport:
    """Check `rows` (a datasets.Dataset) as the row tokenizer `examples` (an ExampleTokenizer, Seq2SeqExamples or
    ClassificationExamples) turns them into training examples. Returns a DataReport; changes nothing."""
    response_template = None if isinstance(examples, ClassificationExamples) else examples.response
    check_templates(examples.prompt, response_template, rows.column_names)
    tokenizer, limit = examples.tokenizer, examples.max_length
    whole = copy.copy(examples)
    whole.max_length = sys.maxsize  # the row as it is, to see what max_length will cut
    stops = stop_tokens(tokenizer, generation_config)
    special = set(tokenizer.all_special_ids)
    used = template_fields(examples.prompt, "prompt")
    classifier = response_template is None
    used += [c for c in ([examples.label] if classifier else template_fields(response_template, "response")) if c not in used]
    checked, pairs, empty_responses, empty_fields = [], Counter(), 0, Counter()
    for row in rows:
        example = whole(row)
        checked.append(_measure(example, examples, limit, special, tokenizer if len(checked) < SAMPLES else None))
        response_text = str(row[examples.label]) if classifier else examples.response_text(row)
        pairs[(examples.prompt_text(row), response_text)] += 1
        empty_responses += not response_text.strip()
        for column in used:
            value = row.get(column)
            empty_fields[column] += value is None or (isinstance(value, str) and not value.strip())
    findings = _findings(checked, pairs, empty_responses, empty_fields, examples, stops, tokenizer)
    return DataReport(rows=len(checked), columns=used, max_length=limit,
                      prompt_lengths=[r.prompt for r in checked], response_lengths=[r.response for r in checked],
                      findings=findings, samples=[r.sample for r in checked if r.sample is not None])


def _measure(example, examples, limit, special, tokenizer) -> _Row:
    ids, labels = example["input_ids"], example["labels"]
    if isinstance(examples, ClassificationExamples):
        row = _Row(len(ids), 0, 1, len(ids) > limit, None)
        shown = _masked(tokenizer, ids[:limit]) if tokenizer else None
    elif isinstance(examples, Seq2SeqExamples):
        kept = labels[:limit]
        row = _Row(len(ids), len(labels), len(kept), len(ids) > limit or len(labels) > limit, _last_special(kept, special))
        shown = _masked(tokenizer, ids[:limit]) + show_masking(tokenizer, {"input_ids": kept, "labels": kept}) if tokenizer else None
    else:
        prompt = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
        kept = [label for label in labels[:limit] if label != IGNORE_INDEX]
        row = _Row(prompt, len(labels) - prompt, len(kept), len(ids) > limit, _last_special(kept, special))
        shown = show_masking(tokenizer, {"input_ids": ids[:limit], "labels": labels[:limit]}) if tokenizer else None
    row.sample = shown
    return row


def _masked(tokenizer, ids):
    """Tokens that are read, never trained on (an encoder's input, a classifier's text)."""
    return show_masking(tokenizer, {"input_ids": ids, "labels": [IGNORE_INDEX] * len(ids)})


def _last_special(ids, special):
    return next((i for i in reversed(ids) if i in special), None)


def _findings(checked, pairs, empty_responses, empty_fields, examples, stops, tokenizer) -> list[Finding]:
    n, limit = len(checked), examples.max_length
    longest = max(r.prompt + r.response for r in checked)
    classifier = isinstance(examples, ClassificationExamples)
    found = []
    if not classifier and empty_responses == n:
        found.append(Finding("problem", "responses", f"every response is empty (response: {examples.response!r} gives no text), "
                             "so the model would learn only to stop", "make response: name the column that holds the answers"))
    elif not classifier and empty_responses:
        found.append(Finding("warning", "responses", f"{empty_responses} of {n} responses are empty (those rows teach only to stop)",
                             "drop them, e.g. rows = [r for r in rows if r['answer'].strip()]"))
    masked = sum(r.trained == 0 for r in checked)
    if masked == n:
        found.append(Finding("problem", "trained tokens", f"no row has a trained token left: every prompt fills max_length={limit}",
                             f"raise max_length (the longest prompt is {max(r.prompt for r in checked)} tokens)"))
    elif masked:
        found.append(Finding("warning", "trained tokens", f"{masked} of {n} rows have no trained token left (the prompt fills max_length={limit}) and are skipped",
                             f"raise max_length to {max(r.prompt for r in checked if r.trained == 0) + 1} or more"))
    cut = sum(r.cut for r in checked)
    if cut:
        found.append(Finding("warning", "max_length", f"{cut} of {n} rows are longer than max_length={limit} and are cut",
                             f"raise max_length to {longest} to keep every row whole"))
    else:
        found.append(Finding("ok", "max_length", f"every row fits in max_length={limit} (longest {longest} tokens)"))
    if not classifier and masked < n:
        found += _stop_findings(checked, stops, tokenizer, limit, longest)
    repeats = sum(count - 1 for count in pairs.values())
    if repeats:
        found.append(Finding("warning", "duplicates", f"{repeats} {'rows repeat' if repeats > 1 else 'row repeats'} an earlier row's prompt and response",
                             "drop them (Dataset.unique, DataFrame.drop_duplicates) unless the repetition is meant as weight"))
    for column, empty in empty_fields.items():
        if empty and not (not classifier and column in template_fields(examples.response, "response") and empty == empty_responses):
            found.append(Finding("warning", f"column {column!r}", f"{empty} of {n} rows have it empty",
                                 "fill or drop those rows"))
    return found


def _stop_findings(checked, stops, tokenizer, limit, longest) -> list[Finding]:
    """Whether the targets teach the model to stop, at a token generation stops at."""
    name = lambda token_id: stops.name(tokenizer, token_id)  # noqa: E731
    trained = [r for r in checked if r.trained]
    ends = Counter(r.end for r in trained)
    stopping = sum(count for end, count in ends.items() if end in stops.generation)
    other = {end: count for end, count in ends.items() if end is not None and end not in stops.generation}
    generation = ", ".join(sorted(map(name, stops.generation))) or "none"
    if not stopping and not other:
        return [Finding("problem", "stop token", f"no response keeps a stop token (every one is cut by max_length={limit}): "
                        "the tuned model would never learn to stop", f"raise max_length to {longest}")]
    found = []
    if other:
        end = max(other, key=other.get)
        turn = (f" and the chat template ends a turn with {name(stops.turn_end)}" if stops.turn_end is not None
                and stops.turn_end != end else "")
        fix = (f"set chat: true (the template ends each answer with {name(stops.turn_end)})" if stops.turn_end in stops.generation
               else f"set tokenizer.eos_token = {name(next(iter(stops.generation), None))!r} before training")
        found.append(Finding("warning", "stop token", f"{sum(other.values())} of {len(trained)} targets end with {name(end)}, but generation "
                             f"stops at {generation}{turn}: the tuned model may not stop", fix))
    missing = len(trained) - stopping - sum(other.values())
    if missing:
        found.append(Finding("warning", "stop token", f"{missing} of {len(trained)} targets lose their stop token to max_length={limit}",
                             f"raise max_length to {longest}"))
    if stopping:
        found.append(Finding("ok", "stop token", f"{stopping} of {len(trained)} targets end with {generation}, which generation stops at"))
    if stops.turn_end is not None and stops.turn_end not in stops.generation:
        found.append(Finding("warning", "chat template", f"the chat template ends a turn with {name(stops.turn_end)}, which generation "
                             f"does not stop at ({generation})",
                             f"add it: model.generation_config.eos_token_id = [{', '.join(map(str, sorted(stops.generation)))}, {stops.turn_end}]"))
    return found


def raise_if_fatal(report: DataReport) -> None:
    """A DataError (one line: the first problem and its fix) when the report has a problem."""
    if report.problems:
        raise DataError(f"The data check stopped training: {report.problems[0].line()} (%%qlora_data shows the rows).")
