"""Wiring: each magic parses its input and makes exactly one API call with the right config."""

import subprocess
import sys
from unittest import mock

import pytest

import qlora_magic
from qlora_magic import api
from qlora_magic.config import GenerateConfig, LoadConfig, TrainConfig


def test_load_ext_does_not_import_torch():
    code = ("import sys\nfrom IPython.core.interactiveshell import InteractiveShell\n"
            "ip = InteractiveShell.instance()\nip.extension_manager.load_extension('qlora_magic')\n"
            "heavy = [m for m in ('torch', 'transformers', 'bitsandbytes', 'peft') if m in sys.modules]\n"
            "print(heavy)\nassert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_magics_are_registered(ip):
    magics = ip.magics_manager.lsmagic()
    for name in ("qlora_load", "qlora_generate", "qlora_save", "qlora_memory", "qlora_unload", "qlora_train",
                 "qlora_runs", "qlora_attach", "qlora_stop", "qlora_doctor", "qlora_merge", "qlora_export"):
        assert name in magics["line"]
    for name in ("qlora_train", "qlora_generate", "qlora_data"):
        assert name in magics["cell"]


def test_help_is_generated_from_the_declared_options(ip):
    doc = ip.find_cell_magic("qlora_train").__doc__
    for option in ("--epochs", "--batch-size", "--grad-accum", "--lr", "--max-steps"):
        assert option in doc
    assert "--bits {4,8,16,auto}" in ip.find_line_magic("qlora_load").__doc__
    assert "--greedy" in ip.find_line_magic("qlora_generate").__doc__


def test_load_magic_passes_its_config(ip):
    with mock.patch.object(api, "load", return_value="report") as load:
        ip.run_line_magic("qlora_load", "--bits 4 --r 16")
    config = load.call_args.kwargs["config"]
    assert config == LoadConfig(bits=4, r=16)


def test_train_magic_passes_data_from_the_namespace(ip):
    ip.user_ns["my_rows"] = [{"q": "a", "a": "b"}]
    with mock.patch.object(api, "train", return_value="summary") as train:
        ip.run_cell_magic("qlora_train", "--epochs 2 --lr 1e-3", "data: $my_rows\nprompt: '{q}'\nresponse: '{a}'\neval_split: 1\n")
    config = train.call_args.kwargs["config"]
    assert isinstance(config, TrainConfig)
    assert config.data is ip.user_ns["my_rows"] and config.epochs == 2 and config.lr == 1e-3 and config.eval_split == 1


def test_generate_magic_does_not_expand_braces_or_dollars(ip):
    ip.user_ns["x"] = "EXPANDED"
    with mock.patch.object(api, "generate", return_value="") as generate:
        ip.run_line_magic("qlora_generate", "--greedy Say {x} and $x")
    assert generate.call_args.kwargs["config"] == GenerateConfig(prompt="Say {x} and $x", greedy=True)


def test_generate_cell_magic(ip):
    with mock.patch.object(api, "generate", return_value="") as generate:
        ip.run_cell_magic("qlora_generate", "--raw", "line one\n{literal}\n")
    assert generate.call_args.kwargs["config"].prompt == "line one\n{literal}"


def test_save_magic(ip, tmp_path):
    with mock.patch.object(api, "save", return_value=tmp_path) as save:
        ip.run_line_magic("qlora_save", "runs/a")
    save.assert_called_once_with("runs/a")


def test_train_magic_passes_the_worker_options(ip):
    with mock.patch.object(api, "train", return_value="summary") as train:
        ip.run_cell_magic("qlora_train", "--gpus all --strategy fsdp", "data: x.jsonl\nprompt: '{q}'\nresponse: '{a}'\n")
    config = train.call_args.kwargs["config"]
    assert config.gpus == "all" and config.strategy == "fsdp" and config.processes is None and config.in_workers
    with mock.patch.object(api, "train", return_value="summary") as train:
        ip.run_cell_magic("qlora_train", "--processes 2", "data: x.jsonl\nprompt: '{q}'\nresponse: '{a}'\ngpus: null\n")
    config = train.call_args.kwargs["config"]
    assert config.processes == 2 and config.gpus is None and config.strategy is None
    with mock.patch.object(api, "train", return_value="summary") as train:
        ip.run_cell_magic("qlora_train", "--gpus 2", "data: x.jsonl\nprompt: '{q}'\nresponse: '{a}'\n")
    assert train.call_args.kwargs["config"].gpus == 2


def test_background_run_magics(ip, capsys):
    with mock.patch.object(api, "train", return_value="handle") as train:
        ip.run_cell_magic("qlora_train", "--background --name wf", "data: x.jsonl\nprompt: '{q}'\nresponse: '{a}'\n")
    config = train.call_args.kwargs["config"]
    assert config.background is True and config.name == "wf"
    with mock.patch.object(api, "runs", return_value="table") as runs:
        ip.run_line_magic("qlora_runs", "--output-dir drive/runs")
        ip.run_line_magic("qlora_runs", "")
    assert runs.call_args_list == [mock.call(output_dir="drive/runs"), mock.call(output_dir=None)]
    with mock.patch.object(api, "attach", return_value="view") as attach:
        ip.run_line_magic("qlora_attach", "")
        ip.run_line_magic("qlora_attach", "word_forms --output-dir 'my runs'")
    assert attach.call_args_list == [mock.call(run=None, output_dir=None), mock.call(run="word_forms", output_dir="my runs")]
    capsys.readouterr()
    with mock.patch.object(api, "stop", return_value="Stopping x after the step in flight.") as stop:
        ip.run_line_magic("qlora_stop", "141500")
    stop.assert_called_once_with(run="141500", output_dir=None)
    assert capsys.readouterr().out == "Stopping x after the step in flight.\n"


def test_unload_magic(ip):
    with mock.patch.object(api, "unload", return_value="report") as unload:
        ip.run_line_magic("qlora_unload", "")
    unload.assert_called_once_with()


@pytest.mark.parametrize("cell, error", [
    ("%qlora_generate hello", "No model is loaded"),
    ("%qlora_save runs/x", "No model is loaded"),
    ("%%qlora_train\ndata: x.jsonl\nprompt: '{a}'\nresponse: '{b}'\n", "No model is loaded"),
    ("%qlora_load --bits 3", "invalid choice"),
])
def test_errors_fail_the_cell_in_one_line_and_leave_the_session(ip, capsys, cell, error):
    result = ip.run_cell(cell)
    assert not result.success
    out = capsys.readouterr()
    shown = out.out + out.err
    assert error in shown
    assert "Traceback" not in shown
    assert qlora_magic.get_session().model is None


def test_domain_errors_render_one_line():
    error = qlora_magic.errors.DataError("The dataset is empty.")
    assert error._render_traceback_() == ["DataError: The dataset is empty."]


def test_a_question_mark_ends_the_prompt_not_a_help_request(ip):
    with mock.patch.object(api, "generate", return_value="") as generate:
        result = ip.run_cell("%qlora_generate --greedy What is the capital of France?")
    assert result.success
    assert generate.call_args.kwargs["config"].prompt == "What is the capital of France?"


def test_help_still_works(ip, capsys):
    ip.run_cell("%qlora_generate?")  # prints the docstring through the pager
    assert "--greedy" in capsys.readouterr().out


def test_compare_keeps_a_question_mark_too(ip):
    with mock.patch.object(api, "compare", return_value="") as compare:
        result = ip.run_cell("%qlora_compare What is the capital of France?")
    assert result.success
    assert "What is the capital of France?" in str(compare.call_args)


@pytest.mark.parametrize("verb, options", [("load", {"r": 4}), ("generate", {"greedy": True}), ("train", {"epochs": 2})])
def test_a_config_and_keyword_options_together_is_one_config_error(verb, options):
    from qlora_magic.errors import ConfigError

    config = {"load": LoadConfig(), "generate": GenerateConfig(prompt="hi"), "train": TrainConfig()}[verb]
    with pytest.raises(ConfigError) as info:
        getattr(qlora_magic, verb)(config=config, **options)
    assert isinstance(info.value, TypeError)  # what it raised before, for code that catches that
    assert str(info.value) == (f"Give either config= or keyword options, not both: change a ready config with "
                               f"config=config.replace({next(iter(options))}=...).")


def test_data_magic_passes_the_config_train_would_get(ip):
    ip.user_ns["my_rows"] = [{"q": "a", "a": "b"}]
    body = "data: $my_rows\nprompt: '{q}'\nresponse: '{a}'\n"
    with mock.patch.object(api, "check_data", return_value="report") as check_data:
        ip.run_cell_magic("qlora_data", "--max-length 64", body)
    config = check_data.call_args.kwargs["config"]
    assert config == parsing_train("--max-length 64", body, ip.user_ns) and config.max_length == 64
    assert "--max-length" in ip.find_cell_magic("qlora_data").__doc__


def test_doctor_magic_passes_its_options(ip):
    with mock.patch.object(api, "doctor", return_value="report") as doctor:
        ip.run_line_magic("qlora_doctor", "")
        ip.run_line_magic("qlora_doctor", "my/model --bits 4")
    assert [c.kwargs for c in doctor.call_args_list] == [{"model": None, "bits": None}, {"model": "my/model", "bits": 4}]


def parsing_train(line, body, namespace):
    from qlora_magic.front.parsing import parse_train

    return parse_train(line, body, namespace)
