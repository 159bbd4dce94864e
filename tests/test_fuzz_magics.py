"""A bounded fuzz of every magic's line and cell body (issue 10): whatever a user types, parsing either
gives a config whose numbers are finite, or fails with the project's one-line error (a QloraError, or
IPython's UsageError for argument syntax). Nothing else: no TypeError, ValueError, OverflowError, yaml or
argparse errors, no NaN or infinity let through.

Parsing only, no model. Two passes per magic:
- a grid: every declared option, and every body key, with every hostile value alone (deterministic, fast);
- hypothesis: lines and bodies mixing the real names with hostile values (derandomize=True, so CI sees the
  same examples every run).
"""

from __future__ import annotations

import dataclasses
import math
import traceback
import typing
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from IPython.core.error import UsageError

from qlora_magic.errors import QloraError
from qlora_magic.front import magics, parsing

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

NAMESPACE = {"rows": [{"question": "q", "answer": "a"}], "five": 5, "text": "hello"}

# --- what a hostile or careless user types ----------------------------------------------------------------

NUMBERS = ["0", "-1", "1", "2", "0.5", "1.5", "-0.5", "nan", "NaN", "inf", "-inf", "+inf", "1e9", "1e309", "-1e309",
           "2**40", str(2**40), str(2**70), str(-(2**70)), "1e-300", "0x10", "1_000", "4.0", "1e", ".5", "5.", "1/2"]
WORDS = ["abc", "auto", "linear", "cosine", "bogus", "default", "base", "task2", "perplexity,bleu", ",", ",,",
         "a=1", "default=0.5,x=y", "=", "--", "-", "---", "$rows", "$nope", "$", "{question}", "{", "}", "{0}",
         "all-linear", "q_proj,v_proj", "cpu", "cuda", "tpu", "float16", "int8", "~", "null", ".nan", "..", "/",
         "/proc/x", "a" * 300, "runs/ad", "x y", "\ud800", "\u00e9t\u00e9", "\u4e2d\u6587", "\U0001F600", "\x00", "\t"]
QUOTED = ['"a b"', "'a b'", '"unclosed', "'unclosed", '"', "'", '""', "''", '"a"b"', "'it''s'", '"\\"', "\\", '"a\\"']
LINE_VALUES = NUMBERS + WORDS + QUOTED

# Scalars YAML reads (hostile ones), and values that break the YAML itself.
YAML_SCALARS = ["1", "0", "-1", "2.5", ".nan", ".NaN", ".inf", "-.inf", "1e-3", "1e999", "-1e999", "null", "~", "true",
                "no", "yes please", "abc", "[1, 2]", "[]", "{}", "{low: 1, high: 0}", "[0]", "[.inf]", "'quoted'",
                "{question}", '"{nope}"', "$rows", "$nope", "$five", "$", "rows.jsonl", "2**70", str(2**70), str(2**40),
                "'\\ud800'", "\u00e9", "0x10", "1_000", "=", "4.0", "0.5", "'nan'", "'inf'", "'1e-3'", "!!float nan",
                "!!int 3", "!!str 5", "[a, b]", "{a: 1}", "2001-01-01", "''", "-0.5", "1.5", "1e9"]
YAML_BREAKING = ['"unclosed', "'", "!!python/object/apply:os.system ['true']", "!!binary aGk=", "*a", "{a: [1", "- a",
                 "a: b: c", "@x", "`x", "%x", "\t1", "\x06", "\ud800"]
YAML_VALUES = YAML_SCALARS + YAML_BREAKING
SEARCH_SPECS = ["[4, 8]", "[0]", "[]", "[-1]", "[.nan]", "[.inf]", "{low: 1e-4, high: 1e-2, log: true}",
                "{low: 0, high: 1, log: true}", "{low: 1, high: 0}", "{low: .nan, high: 1}", "{low: a, high: b}",
                "{low: 1}", "5", "abc", "null", "[bogus]", "{low: -.inf, high: .inf}", "{low: 1, high: 2, step: 0}",
                "{low: 1, high: .inf}", "[1e999]", "[2**70]", "{low: 1, high: 2, log: maybe}"]
SEARCHABLE = ["r", "alpha", "dropout", "targets", "lr", "epochs", "max_steps", "batch_size", "grad_accum", "warmup",
              "weight_decay", "scheduler"]

# A body that parses, so each grid case tests its one key.
TRAIN_BODY = "data: rows.jsonl\nprompt: 'Q: {question}'\nresponse: '{answer}'\nmax_steps: 1\n"
TUNE_BODY = TRAIN_BODY + "eval_split: 0.25\ntrials: 2\nsearch:\n  r: [4, 8]\n"


def _option_names(declaration) -> list[str]:
    return [s for action in declaration.parser._actions for s in action.option_strings if s not in ("-h", "--help")]


# --- each magic: how to parse a line (and body) --------------------------------------------------------------

def _memory(line):
    with mock.patch("qlora_magic.api.memory", return_value=None), mock.patch.object(magics, "display"):
        magics.QloraMagics(shell=None).qlora_memory(line)


def _unload(line):
    with mock.patch("qlora_magic.api.unload", return_value=None), mock.patch.object(magics, "display"):
        magics.QloraMagics(shell=None).qlora_unload(line)


def _panel(line):
    # the magic reads its line, then opens the panel: here a stand-in, so only the reading is fuzzed
    with mock.patch("qlora_magic.front.panel.panel", return_value=None):
        magics.QloraMagics(shell=None).qlora_panel(line)


class Magic(typing.NamedTuple):
    declaration: object  # the @magic_arguments function: its options
    parse: typing.Callable  # (line, body) -> a config, as the magic reads them
    body: str | None = None  # a body that parses: each grid case adds one key to it
    keys: frozenset = frozenset()  # the keys the body may hold


MAGICS = {
    "qlora_load": Magic(parsing.qlora_load, lambda line, body: parsing.parse_load(line)),
    "qlora_train": Magic(parsing.qlora_train, lambda line, body: parsing.parse_train(line, body, NAMESPACE),
                         TRAIN_BODY, frozenset(parsing.TRAIN_BODY.keys)),
    "qlora_generate": Magic(parsing.qlora_generate, lambda line, body: parsing.parse_generate(line + " hello")),
    "qlora_generate_cell": Magic(parsing.qlora_generate, lambda line, body: parsing.parse_generate(line, body or "hello")),
    "qlora_save": Magic(parsing.qlora_save, lambda line, body: parsing.parse_save(line)),
    "qlora_memory": Magic(parsing.qlora_memory, lambda line, body: _memory(line)),
    "qlora_panel": Magic(parsing.qlora_panel, lambda line, body: _panel(line)),
    "qlora_unload": Magic(parsing.qlora_unload, lambda line, body: _unload(line)),
    "qlora_runs": Magic(parsing.qlora_runs, lambda line, body: parsing.parse_runs(line)),
    "qlora_attach": Magic(parsing.qlora_attach, lambda line, body: parsing.parse_run_choice(parsing.qlora_attach, line)),
    "qlora_stop": Magic(parsing.qlora_stop, lambda line, body: parsing.parse_run_choice(parsing.qlora_stop, line)),
    "qlora_eval": Magic(parsing.qlora_eval, lambda line, body: parsing.parse_eval(line, body, NAMESPACE),
                        "data: rows.jsonl\n", frozenset(parsing.EVAL_BODY.keys)),
    "qlora_compare": Magic(parsing.qlora_compare, lambda line, body: parsing.parse_compare(line + " hello")),
    "qlora_compare_cell": Magic(parsing.qlora_compare, lambda line, body: parsing.parse_compare(line, body or "a\n---\nb")),
    "qlora_adapters": Magic(parsing.qlora_adapters, lambda line, body: parsing.parse_adapters(line)),
    "qlora_merge": Magic(parsing.qlora_merge, lambda line, body: parsing.parse_merge(line)),
    "qlora_export": Magic(parsing.qlora_export, lambda line, body: parsing.parse_export(line)),
    "qlora_tune": Magic(parsing.qlora_tune, lambda line, body: parsing.parse_tune(line, body, NAMESPACE),
                        TUNE_BODY, frozenset(parsing.TUNE_BODY.keys - {"search"})),
    "qlora_data": Magic(parsing.qlora_data, lambda line, body: parsing.parse_data(line, body, NAMESPACE),
                        TRAIN_BODY, frozenset(parsing.DATA_BODY.keys)),
    "qlora_doctor": Magic(parsing.qlora_doctor, lambda line, body: parsing.parse_doctor(line)),
}


# --- the property -----------------------------------------------------------------------------------------

def crash_kind(call) -> str | None:
    """None when `call()` gives a config with finite numbers or fails with the project's one-line error;
    otherwise what went wrong: 'ExceptionType at file:line' (the innermost frame in qlora_magic), a
    message of several lines, or the field a NaN/infinity got into."""
    try:
        result = call()
    except QloraError as error:
        return None if _one_line(error) else f"{type(error).__name__} with a message of several lines"
    except UsageError as error:
        if type(error) is not UsageError:  # IPython shortens only UsageError itself, not subclasses
            return f"{type(error).__name__} (a UsageError subclass: shown with a traceback)"
        return None if _one_line(error) else "UsageError with a message of several lines"
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # noqa: BLE001 - argparse's SystemExit is one of the crashes looked for
        return f"{type(error).__name__} at {_where(error)}"
    if not dataclasses.is_dataclass(result):  # %qlora_adapters' keywords: the adapter verbs check them (LoadConfig)
        return None
    field = _non_finite(result)
    if field is None:
        return None
    field = ".".join(field.split(".")[:2 if field.startswith("search.") else 1])  # the option, not the list item
    return f"accepted a non-finite number: {type(result).__name__}.{field}"


def _one_line(error) -> bool:
    text = str(error).strip()
    return bool(text) and "\n" not in text and "\r" not in text


def _where(error) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    frame = ([f for f in frames if "qlora_magic" in f.filename] or frames)[-1]
    return f"{frame.filename.split('site-packages/')[-1].split('qlora_magic/', 1)[-1]}:{frame.lineno}"


def _non_finite(value, path="") -> str | None:
    """The dotted path to a NaN or infinity inside a config (its fields, lists, dicts), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return path or "value"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # data is checked when it is read (a file, a variable, a Hub id), not when it is parsed
        items = ((f.name, getattr(value, f.name)) for f in dataclasses.fields(value) if f.name != "data")
    elif isinstance(value, dict):
        items = ((str(k), v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return None
    for name, item in items:
        found = _non_finite(item, f"{path}.{name}" if path else name)
        if found:
            return found
    return None


def check(parse, line, body=None):
    kind = crash_kind(lambda: parse(line, body))
    assert kind is None, f"{kind} for line {line!r} and body {body!r}"


# --- the grid: every option and body key with every hostile value, alone ------------------------------------

def grid_cases(name):
    """(line, body) pairs: each option with each value (as --opt value and --opt=value), each body key with
    each YAML value (over a body that otherwise parses), and for %%qlora_tune each searchable with each spec."""
    declaration, _, base_body, keys = MAGICS[name]
    prefixes = {"qlora_adapters": ["add t", "load ad", "combine mix", "switch t", "delete t"],
                "qlora_merge": ["merged/out"], "qlora_export": ["gguf exported/out"]}.get(name, [""])
    cases = []
    for prefix in prefixes:
        for option in _option_names(declaration):
            for value in LINE_VALUES:
                cases += [(f"{prefix} {option} {value}".strip(), base_body), (f"{prefix} {option}={value}".strip(), base_body)]
    if name == "qlora_adapters":
        cases += [(f"{action} {value}", None) for action in parsing.ADAPTER_ACTIONS + ("use", "remove") for value in LINE_VALUES]
    if name in ("qlora_load", "qlora_save", "qlora_merge", "qlora_export", "qlora_memory", "qlora_panel", "qlora_unload", "qlora_runs",
                "qlora_attach", "qlora_stop", "qlora_doctor"):
        cases += [(value, None) for value in LINE_VALUES]  # the positional (model, path) or a stray word
    for key in sorted(keys):
        cases += [("", f"{base_body}{key}: {value}\n") for value in YAML_VALUES]
    if keys:
        cases += [("", body) for body in ODD_BODIES]
    if name == "qlora_tune":
        cases += [("", f"{TUNE_BODY.split('search:')[0]}search:\n  {key}: {spec}\n") for key in SEARCHABLE + ["bogus"] for spec in SEARCH_SPECS]
    return cases


def grid_crashes(name) -> dict[str, tuple]:
    """Each distinct crash kind of `name`'s grid, with the first (line, body) that shows it."""
    parse = MAGICS[name].parse
    found = {}
    for line, body in grid_cases(name):
        kind = crash_kind(lambda: parse(line, body))
        if kind:
            found.setdefault(kind, (line, body))
    return found


# Magics whose parsing still crashes somewhere, as "<who fixes it>: <the cause>": strict expected failures, so
# a fix shows up as XPASS (a failure) until its line here is removed.
KNOWN_GRID_CRASHES: dict[str, str] = {}
KNOWN_FUZZ_CRASHES: dict[str, str] = {}


def _params(names, known):
    return [pytest.param(n, marks=[pytest.mark.xfail(strict=True, reason=known[n])] if n in known else []) for n in names]


@pytest.mark.parametrize("name", _params(sorted(MAGICS), KNOWN_GRID_CRASHES))
def test_grid_of_options_and_body_keys(name):
    crashes = grid_crashes(name)
    assert not crashes, f"{len(crashes)} kinds of crash:\n" + "\n".join(f"{k}   e.g. {v!r}" for k, v in crashes.items())


# --- hypothesis: several options and keys at once -------------------------------------------------------------

def _value():
    return st.one_of(st.sampled_from(LINE_VALUES), st.sampled_from(LINE_VALUES),
                     st.integers(min_value=-(2**80), max_value=2**80).map(str),
                     st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=12))


def line_of(declaration):
    """Lines of the magic's own options with hostile values (mostly `--name value`, some `--name=value`),
    and now and then a stray word or separator."""
    names = _option_names(declaration) or ["--bogus"]
    pair = st.tuples(st.sampled_from(names), _value())
    token = st.one_of(pair.map(" ".join), pair.map(" ".join), pair.map("=".join), st.sampled_from(names), _value(),
                      st.sampled_from(["--", "-", "--bogus", "-x", "\t", "  ", "=", "--=1"]))
    return st.lists(token, max_size=5).map(" ".join).map(_one_line_of_text)


def _one_line_of_text(line):
    # IPython hands a magic only the first line of its cell: a line never holds a line break
    return line.replace("\r", " ").replace("\n", " ")


TYPICAL = ["rows.jsonl", "$rows", '"Q: {question}\\nA: "', '"{answer}"', "0.2", "3", "2e-4", "linear", "false", "8"]


def body_of(keys, search=False):
    """YAML bodies of the real keys with hostile or typical values; sometimes an unknown key or junk text."""
    scalars, typical = st.sampled_from(YAML_SCALARS), st.sampled_from(TYPICAL)
    values = st.one_of(scalars, scalars, scalars, scalars, typical, typical, st.sampled_from(YAML_BREAKING), _value())
    mapping = st.dictionaries(st.sampled_from(sorted(keys)), values, max_size=5)
    extra = st.one_of(st.just(""), st.just(""), st.just(""),
                      st.sampled_from(["bogus: 1", "learning_rate: 1", "epoch: 2", "max-steps: 3", "Data: x", "1: 2", "- data"]))
    parts = [mapping, extra]
    if search:
        names = SEARCHABLE + ["bogus", "seed"]
        parts.append(st.lists(st.tuples(st.sampled_from(names), st.sampled_from(SEARCH_SPECS)), max_size=3).map(
            lambda specs: "search:\n" + "".join(f"  {n}: {s}\n" for n, s in specs)))
    yaml_body = st.tuples(*parts).map(lambda p: "\n".join([f"{k}: {v}" for k, v in p[0].items()] + [x for x in p[1:] if x]))
    return st.one_of(yaml_body, yaml_body, yaml_body, yaml_body, yaml_body, yaml_body, st.text(max_size=40),
                     st.sampled_from(ODD_BODIES))


# Whole bodies YAML reads oddly: documents, non-text keys, merge keys, complex keys.
ODD_BODIES = ["", "\n", "---", "- a\n- b", "5", "\t", "a:\tb", "---\nepochs: 1\n---\nepochs: 2", "null: 1", "true: 1",
              "~: 2", "1.5: x", "? [a, b]\n: 1", "<<: {epochs: 2}", "<<: 5", "epochs: 1\nepochs: 2", "data: &d x\nsplit: *d",
              "%YAML 1.1\n---\nepochs: 1", "{epochs: 1", "[epochs, 1]", "'epochs': !!float '1'"]


def prompt_body():
    return st.one_of(st.text(max_size=30), st.sampled_from(["", "\n", "---", "a\n---\nb", "\n---\n", "---\n---", "\ud800"]))


def _fuzz(name, body=st.none(), line=None):
    declaration, parse = MAGICS[name].declaration, MAGICS[name].parse
    line = line if line is not None else st.one_of(st.just(""), line_of(declaration))

    @FUZZ
    @given(line=line, body=body)
    def fuzz(line, body):
        check(parse, line, body)

    return fuzz


FUZZES = {
    "qlora_load": _fuzz("qlora_load", line=line_of(parsing.qlora_load)),
    "qlora_train": _fuzz("qlora_train", body_of(parsing.TRAIN_BODY.keys)),
    "qlora_generate": _fuzz("qlora_generate", line=st.tuples(line_of(parsing.qlora_generate), prompt_body()).map(" ".join).map(_one_line_of_text)),
    "qlora_generate_cell": _fuzz("qlora_generate_cell", prompt_body()),
    "qlora_save": _fuzz("qlora_save", line=line_of(parsing.qlora_save)),
    "qlora_memory": _fuzz("qlora_memory", line=line_of(parsing.qlora_memory)),
    "qlora_panel": _fuzz("qlora_panel", line=line_of(parsing.qlora_panel)),
    "qlora_unload": _fuzz("qlora_unload", line=line_of(parsing.qlora_unload)),
    "qlora_runs": _fuzz("qlora_runs", line=line_of(parsing.qlora_runs)),
    "qlora_attach": _fuzz("qlora_attach", line=line_of(parsing.qlora_attach)),
    "qlora_stop": _fuzz("qlora_stop", line=line_of(parsing.qlora_stop)),
    "qlora_eval": _fuzz("qlora_eval", st.one_of(st.none(), body_of(parsing.EVAL_BODY.keys))),
    "qlora_compare": _fuzz("qlora_compare", line=st.tuples(line_of(parsing.qlora_compare), prompt_body()).map(" ".join).map(_one_line_of_text)),
    "qlora_compare_cell": _fuzz("qlora_compare_cell", prompt_body()),
    "qlora_adapters": _fuzz("qlora_adapters", line=st.tuples(
        st.sampled_from(list(parsing.ADAPTER_ACTIONS) + ["use", "remove", "bogus", ""]),
        st.one_of(st.just(""), _value()), line_of(parsing.qlora_adapters)).map(" ".join)),
    "qlora_merge": _fuzz("qlora_merge", line=st.tuples(st.sampled_from(["merged/out", "'a b'", '"x', "", "/proc/m"]),
                                                       line_of(parsing.qlora_merge)).map(" ".join)),
    "qlora_export": _fuzz("qlora_export", line=st.tuples(st.sampled_from(["gguf exported/out", "gguf 'a b'", 'gguf "x', "", "gguf /proc/m", "onnx x"]),
                                                         line_of(parsing.qlora_export)).map(" ".join)),
    "qlora_tune": _fuzz("qlora_tune", body_of(parsing.TUNE_BODY.keys - {"search"}, search=True)),
    "qlora_data": _fuzz("qlora_data", body_of(parsing.DATA_BODY.keys)),
    "qlora_doctor": _fuzz("qlora_doctor", line=line_of(parsing.qlora_doctor)),
}


@pytest.mark.parametrize("name", _params(sorted(FUZZES), KNOWN_FUZZ_CRASHES))
def test_hypothesis_fuzz_of_line_and_body(name):
    FUZZES[name]()
