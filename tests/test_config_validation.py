"""Every bad value is one line and changes nothing: the configs check each field against its type hint and
range, and every magic line is split as a shell would split it.

Three tables: the config dataclasses called directly (the Python API builds them), the magic lines and cell
bodies run in a real IPython shell over a loaded tiny model (the session, the LoRA weights and the files must
be as they were), and a few good values that must still be accepted.
"""

import hashlib
import math
import typing
from pathlib import Path

import pytest
from IPython.core.error import UsageError

import qlora_magic
from qlora_magic import config as cfg
from qlora_magic.config import (CompareConfig, EvalConfig, GenerateConfig, LoadConfig, MergeConfig, TrainConfig,
                                TuneConfig)
from qlora_magic.errors import ConfigError, QloraError
from qlora_magic.front import parsing

ROWS = [{"question": "q", "answer": "a"}] * 8
BODY = 'data: $rows\nprompt: "Q: {question}\\nA: "\nresponse: "{answer}"\n'
TUNE_BODY = BODY + "eval_split: 2\nsearch:\n  r: [2, 4]\n"
TUNE = {"train": TrainConfig(data=ROWS, prompt="{question}", response="{answer}", eval_split=2), "search": {"r": [2]}}
# What each config needs besides the value under test.
REQUIRED = {LoadConfig: {}, TrainConfig: {}, GenerateConfig: {"prompt": "hi"}, EvalConfig: {},
            CompareConfig: {"prompts": ["hi"]}, MergeConfig: {"path": "merged/x"}, TuneConfig: TUNE}


def one_line(error) -> str:
    text = str(error)
    assert text and "\n" not in text, f"not one line: {text!r}"
    return text


# --- the configs, as the Python API builds them ----------------------------------------------------

def numeric_fields():
    for config in REQUIRED:
        for name, hint in typing.get_type_hints(config).items():
            if {int, float} & set(typing.get_args(hint) or (hint,)):
                yield config, name


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("config, name", list(numeric_fields()), ids=lambda x: getattr(x, "__name__", x))
def test_every_number_of_every_config_must_be_finite(config, name, value):
    with pytest.raises(ConfigError) as info:
        config(**{**REQUIRED[config], name: value})
    assert "must be a finite number, got " in one_line(info.value)


def test_the_table_covers_every_number():
    assert len(list(numeric_fields())) >= 30


@pytest.mark.parametrize("config, values, message", [
    (TrainConfig, {"batch_size": 2.5}, "--batch-size must be a whole number, got 2.5."),
    (TrainConfig, {"warmup": "abc"}, "--warmup must be a number, got 'abc'."),
    (TrainConfig, {"output_dir": 5}, '--output-dir must be text, got 5: put it in quotes, e.g. "5".'),
    (TrainConfig, {"chat": "maybe"}, "chat must be true or false, got 'maybe'."),
    (TrainConfig, {"lr": True}, "--lr must be a number, got True."),
    (TrainConfig, {"lr": 1e30}, "--lr must be at most 1.0, got 1e+30; LoRA learning rates are around 1e-4 to 1e-2."),
    (TrainConfig, {"seed": -1}, "--seed must be a whole number from 0 to 4294967295, got -1."),
    (TrainConfig, {"seed": 2**40}, "--seed must be a whole number from 0 to 4294967295"),
    (TrainConfig, {"seed": 2**70}, "--seed must be a whole number from 0 to 4294967295"),
    (TrainConfig, {"scheduler": "bogus"}, "--scheduler must be one of linear, cosine, cosine_with_restarts, polynomial, constant"),
    (TrainConfig, {"epochs": 1e9}, "--epochs must be at most 1000, got 1000000000.0; to stop after a number of steps, use --max-steps."),
    (TrainConfig, {"max_memory": "nan"}, "--max-memory must look like 10GB"),
    (TrainConfig, {"max_memory": -2}, "--max-memory must be more than 0 GB"),
    (TrainConfig, {"max_memory": "0GB"}, "--max-memory must look like 10GB"),
    (TrainConfig, {"eval_split": True}, "eval_split must be a number, got True."),
    (GenerateConfig, {"prompt": "hi", "seed": 2**70}, "--seed must be a whole number from 0 to 4294967295"),
    (GenerateConfig, {"prompt": "hi", "max_new_tokens": 10**9}, "--max-new-tokens must be at most 32768"),
    (GenerateConfig, {"prompt": "hi", "system": 5}, "--system must be text, got 5"),
    (CompareConfig, {"prompts": ["hi"], "seed": -1}, "--seed must be a whole number from 0 to 4294967295, got -1."),
    (CompareConfig, {"prompts": ["hi", 3]}, "prompts must be a list of texts"),
    (EvalConfig, {"metrics": None}, "--metrics must be a list of texts or text, got None."),
    (EvalConfig, {"max_new_tokens": 10**6}, "--max-new-tokens must be at most 32768"),
    (LoadConfig, {"r": 100_000_000}, "--r must be at most 4096, got 100000000 (the adapter would outweigh the model)"),
    (LoadConfig, {"r": 0}, "--r must be > 0, got 0."),
    (LoadConfig, {"alpha": 0}, "--alpha must be > 0, got 0."),
    (LoadConfig, {"targets": ["q_proj", 1]}, "--targets must be a list of texts"),
    (LoadConfig, {"model": 5}, "model must be text, got 5"),
    (LoadConfig, {"num_labels": 10**9}, "--num-labels must be at most 100000"),
    (TuneConfig, {**TUNE, "trials": 0}, "--trials must be > 0, got 0."),
    (TuneConfig, {**TUNE, "trials": 10**6}, "--trials must be at most 1000"),
    (TuneConfig, {**TUNE, "seed": -1}, "--sampler-seed must be a whole number from 0 to 4294967295, got -1."),
    (TuneConfig, {**TUNE, "search": {"r": [0]}}, "search: r: --r must be > 0, got 0."),
    (TuneConfig, {**TUNE, "search": {"r": {"low": 0, "high": 8}}}, "search: r: --r must be > 0, got 0."),
    (TuneConfig, {**TUNE, "search": {"r": {"low": 2, "high": 8.5}}}, "search: r: --r must be a whole number, got 8.5."),
    (TuneConfig, {**TUNE, "search": {"lr": {"low": math.nan, "high": 1e-2}}}, "search: lr needs numbers with low < high"),
    (TuneConfig, {**TUNE, "search": {"lr": [1e-3, math.inf]}}, "search: lr: --lr must be a finite number"),
    (TuneConfig, {**TUNE, "search": {"scheduler": ["linear", "bogus"]}}, "search: scheduler: --scheduler must be one of"),
    (TuneConfig, {**TUNE, "search": {"dropout": {"low": 0.0, "high": 1.0}}}, "search: dropout: --dropout must be in [0, 1)"),
    (TuneConfig, {**TUNE, "search": {"lr": {"low": 1e-4, "high": 1e-2, "log": True, "step": 1e-4}}}, "either log: true or a step"),
    (TuneConfig, {**TUNE, "search": {"epochs": {"low": 1, "high": 3, "step": 0}}}, "needs a step between 0 and high - low"),
])
def test_bad_values_are_one_line(config, values, message):
    with pytest.raises(ConfigError) as info:
        config(**values)
    assert message in one_line(info.value)


@pytest.mark.parametrize("option", [{"r": 16}, {"alpha": 8}, {"dropout": 0.1}, {"targets": "q_proj"}])
def test_lora_options_with_an_adapter_are_refused_from_python_too(option):
    with pytest.raises(ConfigError) as info:
        qlora_magic.load(adapter="runs/ad", **option)
    assert one_line(info.value).startswith(f"--{next(iter(option))} does not apply with --adapter")
    assert qlora_magic.get_session().model is None


def test_an_unknown_keyword_is_one_line_and_still_a_type_error():
    with pytest.raises(ConfigError) as info:
        qlora_magic.generate("hi", temprature=0.5)
    assert isinstance(info.value, TypeError)
    assert one_line(info.value).startswith("Unknown option 'temprature': did you mean temperature? The options are prompt, ")


def test_output_dir_is_checked_before_anything_is_made(tmp_path):
    (tmp_path / "a_file").write_text("keep me")
    cases = {str(tmp_path / "a_file"): "is a file, not a folder",
             str(tmp_path / "a_file" / "run"): "which is a file: choose a path under a folder",
             "/proc/qlora-run": "'/proc' is not a folder you can write to",
             str(tmp_path / ("x" * 300)): "folder names must be at most 255"}
    for path, message in cases.items():
        with pytest.raises(ConfigError) as info:
            TrainConfig(output_dir=path)
        assert message in one_line(info.value)
        with pytest.raises(ConfigError):
            MergeConfig(path=path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"] and (tmp_path / "a_file").read_text() == "keep me"
    assert TrainConfig(output_dir=str(tmp_path / "new" / "run")).output_dir  # a folder yet to be made is fine
    assert not (tmp_path / "new").exists()


def test_a_saved_runs_output_dir_need_not_be_writable_here():
    record = TrainConfig(data="x.jsonl", prompt="{q}", response="{a}").to_dict()
    assert TrainConfig.from_dict({**record, "output_dir": "/proc/elsewhere"}).output_dir == "/proc/elsewhere"


def test_the_schedulers_are_transformers_own():
    from transformers.trainer_utils import SchedulerType

    assert set(cfg.SCHEDULERS) <= {s.value for s in SchedulerType}
    for name in cfg.SCHEDULERS:
        assert TrainConfig(scheduler=name).scheduler == name


# --- magic lines and bodies, in a real shell over a loaded model -----------------------------------

@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    qlora_magic.load(tiny_model_dir, bits=8)
    session = qlora_magic.get_session()
    return session.model, session.tokenizer, session.load_config


@pytest.fixture
def shell(ip, loaded):
    """The shell, with the tiny model in this test's fresh session and $rows defined."""
    session = qlora_magic.get_session()
    session.model, session.tokenizer, session.load_config = loaded
    ip.user_ns["rows"] = ROWS
    return ip


def state(folder: Path):
    """What a bad input must leave as it was: the model, its LoRA weights and adapters, the records, the files."""
    session = qlora_magic.get_session()
    lora = hashlib.sha256()
    for name, param in sorted(session.model.named_parameters()):
        if "lora_" in name:
            lora.update(param.detach().cpu().numpy().tobytes())
    files = sorted((str(p.relative_to(folder)), p.stat().st_size if p.is_file() else -1) for p in folder.rglob("*"))
    return id(session.model), lora.hexdigest(), sorted(session.model.peft_config), len(session.runs), len(session.history), files


def run_bad(shell, capsys, cell, tmp_path) -> str:
    """Run `cell`; it must fail in one line and leave the session and files as they were. Returns the line."""
    capsys.readouterr()
    before = state(tmp_path)
    result = shell.run_cell(cell)
    shown = capsys.readouterr()
    lines = [line for line in (shown.out + shown.err).splitlines() if line.strip()]
    assert not result.success
    assert isinstance(result.error_in_exec, (QloraError, UsageError)), repr(result.error_in_exec)
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert state(tmp_path) == before
    return lines[0]


def magic_cell(declaration, option, value):
    """A cell that gives `option value` to the magic, with what else the magic needs."""
    name = declaration.__name__
    return {"qlora_load": f"%qlora_load {option} {value}",
            "qlora_train": f"%%qlora_train {option} {value}\n{BODY}",
            "qlora_generate": f"%qlora_generate {option} {value} Hello",
            "qlora_eval": f"%qlora_eval {option} {value}",
            "qlora_compare": f"%qlora_compare {option} {value} Hello",
            "qlora_adapters": f"%qlora_adapters add extra {option} {value}",
            "qlora_merge": f"%qlora_merge merged/x {option} {value}",
            "qlora_export": f"%qlora_export gguf exported/x {option} {value}",
            "qlora_tune": f"%%qlora_tune {option} {value}\n{TUNE_BODY}",
            "qlora_data": f"%%qlora_data {option} {value}\n{BODY}",
            "qlora_doctor": f"%qlora_doctor {option} {value}"}[name]


def numeric_options():
    for declaration in parsing.MAGIC_DECLARATIONS:
        for action in declaration.parser._actions:
            if action.option_strings and action.type in (int, float):
                yield declaration, action.option_strings[0], action.type


NUMERIC_OPTIONS = list(numeric_options())


@pytest.mark.parametrize("value", ["nan", "inf"])
@pytest.mark.parametrize("declaration, option, kind", NUMERIC_OPTIONS,
                         ids=[f"{d.__name__}{o}" for d, o, _ in NUMERIC_OPTIONS])
def test_nan_and_inf_in_every_numeric_option_of_every_magic(shell, capsys, tmp_path, declaration, option, kind, value):
    line = run_bad(shell, capsys, magic_cell(declaration, option, value), tmp_path)
    if kind is float:  # argparse reads 'nan' as a float: the config refuses it
        assert line.startswith("ConfigError: ") and "must be a finite number" in line
    else:
        assert line.startswith("UsageError: ") and "invalid int value" in line


def test_every_magic_with_numbers_is_in_the_table():
    assert {d.__name__ for d, _, _ in NUMERIC_OPTIONS} >= {"qlora_load", "qlora_train", "qlora_generate", "qlora_eval",
                                                          "qlora_compare", "qlora_adapters", "qlora_merge", "qlora_tune",
                                                          "qlora_data", "qlora_doctor"}


BODY_NUMBERS = [("qlora_train", name) for name in ("epochs", "max_steps", "batch_size", "grad_accum", "lr", "warmup",
                                                    "weight_decay", "seed", "logging_steps", "eval_steps", "max_length",
                                                    "eval_split", "max_memory")]
BODY_NUMBERS += [("qlora_eval", name) for name in ("max_length", "limit", "batch_size", "max_new_tokens")]
BODY_NUMBERS += [("qlora_tune", "trials")]


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize("magic, key", BODY_NUMBERS)
def test_nan_and_inf_in_every_numeric_key_of_every_body(shell, capsys, tmp_path, magic, key, value):
    body = (TUNE_BODY if magic == "qlora_tune" else BODY) + f"{key}: {value}\n"
    line = run_bad(shell, capsys, f"%%{magic}\n{body}", tmp_path)
    assert line.startswith("ConfigError: ") and "must be a finite number" in line


@pytest.mark.parametrize("cell, message", [
    # wrong types and values in bodies
    ("%%qlora_train\n" + BODY + "warmup: abc\n", "ConfigError: --warmup must be a number, got 'abc'."),
    ("%%qlora_train\n" + BODY + "batch_size: 2.5\n", "ConfigError: --batch-size must be a whole number, got 2.5."),
    ("%%qlora_train\n" + BODY + "output_dir: 5\n", 'ConfigError: --output-dir must be text, got 5: put it in quotes, e.g. "5".'),
    ("%%qlora_train\n" + BODY + "scheduler: bogus\n", "ConfigError: --scheduler must be one of linear, cosine"),
    ("%%qlora_train\n" + BODY + "chat: maybe\n", "ConfigError: chat must be true or false, got 'maybe'."),
    ("%%qlora_eval\nmetrics: null\n", "ConfigError: --metrics must be a list of texts or text, got None."),
    ("%%qlora_tune\n" + TUNE_BODY.replace("r: [2, 4]", "r: [0]"), "ConfigError: search: r: --r must be > 0, got 0."),
    ("%%qlora_tune\n" + TUNE_BODY + "trials: 0\n", "ConfigError: --trials must be > 0, got 0."),
    # options on the line
    ("%%qlora_tune --trials 0\n" + TUNE_BODY, "ConfigError: --trials must be > 0, got 0."),
    ("%%qlora_tune --trials 5000\n" + TUNE_BODY, "ConfigError: --trials must be at most 1000"),
    ("%%qlora_train --seed -1\n" + BODY, "ConfigError: --seed must be a whole number from 0 to 4294967295, got -1."),
    ("%%qlora_train --seed 1099511627776\n" + BODY, "ConfigError: --seed must be a whole number from 0 to 4294967295"),
    ("%%qlora_train --seed 2**40\n" + BODY, "UsageError: %qlora_train: argument --seed: invalid int value: '2**40'"),
    ("%%qlora_train --scheduler bogus\n" + BODY, "ConfigError: --scheduler must be one of linear, cosine"),
    ("%%qlora_train --epochs 1e9\n" + BODY, "ConfigError: --epochs must be at most 1000"),
    ("%%qlora_train --max-memory nan\n" + BODY, "ConfigError: --max-memory must look like 10GB"),
    ("%%qlora_train --output-dir /proc/run\n" + BODY, "ConfigError: --output-dir '/proc/run': '/proc' is not a folder you can write to"),
    ("%%qlora_train --frobnicate 2\n" + BODY, "UsageError: %qlora_train: unrecognized arguments: --frobnicate 2"),
    ("%qlora_generate --seed 1180591620717411303424 Hello", "ConfigError: --seed must be a whole number from 0 to 4294967295"),
    ("%qlora_generate --seed -1 Hello", "ConfigError: --seed must be a whole number from 0 to 4294967295, got -1."),
    ("%qlora_generate --max-new-tokens 1000000000 Hello", "ConfigError: --max-new-tokens must be at most 32768"),
    ("%qlora_generate --top-p 0 Hello", "ConfigError: --top-p must be in (0, 1], got 0.0."),
    ("%qlora_generate --seed", "UsageError: --seed needs a value."),
    ("%qlora_compare --seed -5 Hello", "ConfigError: --seed must be a whole number from 0 to 4294967295, got -5."),
    ("%qlora_compare --max-new-tokens 100000 Hello", "ConfigError: --max-new-tokens must be at most 32768"),
    ("%qlora_load --r 100000000", "ConfigError: --r must be at most 4096"),
    ("%qlora_load --r abc", "UsageError: %qlora_load: argument --r: invalid int value: 'abc'"),
    ("%qlora_load --bits 3", "UsageError: %qlora_load: argument --bits: invalid choice: 3"),
    ("%qlora_load --adapter runs/ad --r 16", "ConfigError: --r does not apply with --adapter: a saved adapter keeps its own LoRA settings"),
    ("%qlora_load --adapter runs/ad --alpha 16", "ConfigError: --alpha does not apply with --adapter"),
    ("%qlora_load --adapter runs/ad --dropout 0.1", "ConfigError: --dropout does not apply with --adapter"),
    ("%qlora_load --adapter runs/ad --targets q_proj", "ConfigError: --targets does not apply with --adapter"),
    ("%%qlora_train --unload\n" + BODY, "ConfigError: --unload frees the session's model for worker processes: add --gpus N"),
    ("%qlora_load --adapter runs/ad --seed 3", "ConfigError: --seed does not apply with --adapter: a saved adapter keeps its own LoRA settings and weights"),
    ("%qlora_load --seed -1", "ConfigError: --seed must be a whole number from 0 to 4294967295, got -1."),
    ("%qlora_load --seed x", "UsageError: %qlora_load: argument --seed: invalid int value: 'x'"),
    ("%qlora_adapters add extra --r 0", "ConfigError: --r must be > 0, got 0."),
    ("%qlora_adapters add extra --alpha 0", "ConfigError: --alpha must be > 0, got 0.0."),
    ("%qlora_adapters add extra --r 100000000", "ConfigError: --r must be at most 4096"),
    ("%qlora_merge merged/x --tolerance -1", "ConfigError: --tolerance must be > 0, got -1.0."),
    ("%qlora_merge merged/x --max-new-tokens 0", "ConfigError: --max-new-tokens must be > 0, got 0."),
    ("%qlora_eval --limit 0", "ConfigError: --limit must be > 0, got 0."),
    ("%qlora_adapters list default", "ConfigError: %qlora_adapters list takes no name: it would be ignored"),
    ("%qlora_adapters switch default --r 4", "ConfigError: %qlora_adapters switch takes no --r: it would be ignored"),
    ("%qlora_adapters combine mix --weights default=nan", "ConfigError: --weights: 'nan' is not a finite number"),
    ("%qlora_adapters combine mix --weights default=inf", "ConfigError: --weights: 'inf' is not a finite number"),
    ("%qlora_adapters combine mix --weights default=1 --combination bogus", "UsageError: %qlora_adapters: argument --combination: invalid choice: 'bogus'"),
    ("%%qlora_train --output-dir $undefined_dir\n" + BODY, "ConfigError: --output-dir $undefined_dir: no notebook variable 'undefined_dir'"),
    ("%%qlora_train\n" + BODY + "split: a\x06b\n", "ConfigError: The cell body is not valid YAML (line 4): unacceptable character #x0006"),
    ("%qlora_memory extra", "UsageError: %qlora_memory: unrecognized arguments: extra"),
    ("%qlora_panel --wide", "UsageError: %qlora_panel: unrecognized arguments: --wide"),
    ("%qlora_save", "UsageError: %qlora_save: the following arguments are required: path"),
])
def test_bad_magic_input_is_one_line_and_changes_nothing(shell, capsys, tmp_path, cell, message):
    assert run_bad(shell, capsys, cell, tmp_path).startswith(message)


UNCLOSED = {
    "load": '%qlora_load "./my models/llama',
    "load adapter": "%qlora_load --adapter 'runs/my adapter",
    "train": '%%qlora_train --output-dir "runs/my run\n' + BODY,
    "generate": '%qlora_generate --system "Be brief Hello',
    "save": '%qlora_save "/tmp/with space/ad',
    "memory": '%qlora_memory "',
    "panel": "%qlora_panel '",
    "eval": '%qlora_eval --data "my data.jsonl',
    "compare": '%qlora_compare --system "Be brief Hello',
    "adapters": '%qlora_adapters load "runs/my adapter',
    "merge": '%qlora_merge "merged/my model',
    "tune": '%%qlora_tune --trials "3\n' + TUNE_BODY,
    "a backslash at the end": "%qlora_save runs/ad\\",
}


@pytest.mark.parametrize("cell", UNCLOSED.values(), ids=UNCLOSED.keys())
def test_an_unclosed_quote_is_one_line_in_every_magic(shell, capsys, tmp_path, cell):
    line = run_bad(shell, capsys, cell, tmp_path)
    assert line.startswith("UsageError: Cannot read the line: No ")
    assert "close the quotes around `" in line or "remove the backslash at the end" in line


# --- good values still accepted ---------------------------------------------------------------------

def test_whole_floats_are_read_as_whole_numbers():
    config = TrainConfig(batch_size=4.0, max_steps=10.0, seed=7.0)
    assert (config.batch_size, config.max_steps, config.seed) == (4, 10, 7)
    assert all(isinstance(v, int) for v in (config.batch_size, config.max_steps, config.seed))
    assert parsing.parse_train("", BODY + "batch_size: 4.0\nlr: 1e-3\n", namespace={"rows": ROWS}).lr == 1e-3


def test_paths_and_numpy_numbers_are_read_as_text_and_numbers(tmp_path):
    import numpy as np

    assert TrainConfig(output_dir=tmp_path / "run").output_dir == str(tmp_path / "run")
    config = LoadConfig(r=np.int64(16), alpha=np.float32(32))
    assert (config.r, config.alpha) == (16, 32) and type(config.r) is int and type(config.alpha) is float


def test_the_edges_of_the_ranges_are_accepted():
    assert TrainConfig(seed=0).seed == 0 and TrainConfig(seed=2**32 - 1).seed == 2**32 - 1
    assert TrainConfig(epochs=1000).epochs == 1000 and LoadConfig(r=4096).r == 4096
    assert GenerateConfig(prompt="hi", max_new_tokens=32768).max_new_tokens == 32768
    assert TuneConfig(**{**TUNE, "trials": 1}).trials == 1
    assert parsing.parse_tune("--trials 1", TUNE_BODY, namespace={"rows": ROWS}).trials == 1


def test_quotes_group_words_and_are_removed_in_every_line():
    assert parsing.parse_save('"/tmp/with space/ad"') == "/tmp/with space/ad"
    assert parsing.parse_load("'./my models/llama' --bits 4").model == "./my models/llama"
    assert parsing.parse_merge('"merged/my model" --dtype bfloat16').path == "merged/my model"
    assert parsing.parse_adapters("load 'runs/my adapter' --name older")["path"] == "runs/my adapter"
    assert parsing.parse_eval('--data "my data.jsonl" --metrics "perplexity,bleu"').metrics == ["perplexity", "bleu"]
    config = parsing.parse_generate("--system 'Say \"hi\"' --greedy What's \"up\"?")
    assert config.system == 'Say "hi"' and config.prompt == "What's \"up\"?"  # the prompt is kept as written
    compare = parsing.parse_compare('--system "Be brief" Name a "colour".')
    assert compare.system == "Be brief" and compare.prompts == ['Name a "colour".']


def test_a_quoted_path_with_a_space_saves_there(shell, capsys, tmp_path):
    folder = tmp_path / "with space" / "ad"
    result = shell.run_cell(f'%qlora_save "{folder}"')
    assert result.success, capsys.readouterr()
    assert (folder / "adapter_config.json").exists()
    assert not any('"' in p.name for p in tmp_path.rglob("*"))  # no folder named after a quote


def test_an_adapter_added_with_its_own_rank(shell):
    shell.run_line_magic("qlora_adapters", "add extra --r 4 --alpha 8")
    model = qlora_magic.get_session().model
    try:
        assert model.peft_config["extra"].r == 4 and model.peft_config["extra"].lora_alpha == 8
    finally:
        model.set_adapter("default")
        model.delete_adapter("extra")
