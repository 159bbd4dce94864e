"""The widget panel and the widget reporter, without a browser: set traits, click buttons, wait for
the background action, assert on widget values. Real runs use the tiny offline Llama."""

import json
from pathlib import Path

import pytest

import qlora_magic
from qlora_magic import api
from qlora_magic.errors import QloraError
from qlora_magic.display.widget_reporter import WidgetReporter
from qlora_magic.front.panel import Panel
from qlora_magic.display import choose_reporter

pytest.importorskip("ipywidgets")


def click(panel, button):
    button.click()
    return panel.wait(timeout=300)


def test_panel_starts_empty_and_shows_cpu_memory():
    p = qlora_magic.panel()
    assert isinstance(p, Panel)
    assert p.status_text == "Load a model to start."
    assert p.memory_bars["process RSS"].value > 0
    assert p.memory_rows["process RSS"].layout.display is None
    assert p.memory_rows["allocated"].layout.display == "none"  # no GPU rows on a CPU
    assert "CPU" in p.memory_title.value
    # The Train tab offers the shipped example, so a first round trip needs no typing.
    assert p.data.value.endswith("word_forms.jsonl") and "{instruction}" in p.prompt.value
    assert [p.tabs.get_title(i) for i in range(4)] == ["Load", "Train", "Generate", "Save"]
    assert p.widget.get_state()["_model_name"] == "VBoxModel"


def test_the_forms_start_at_the_config_defaults():
    from qlora_magic.config import GenerateConfig, LoadConfig, TrainConfig

    p = qlora_magic.panel()
    assert p.load_config() == LoadConfig()
    assert p.train_config() == TrainConfig(data=p.data.value, prompt=p.prompt.value, response=p.response.value, display="none")
    p.gen_prompt.value = "Hello"
    assert p.generate_config() == GenerateConfig(prompt="Hello")


def test_an_action_without_a_model_fails_as_one_line():
    p = qlora_magic.panel()
    p.gen_prompt.value = "Hello"
    click(p, p.generate_button)
    assert p.status_text == ("NoModelError: No model is loaded, so generation cannot run: "
                             "run %qlora_load (or qlora_magic.load()) first.")
    assert isinstance(p.last_error, QloraError)
    assert "#d62728" in p.status.value  # shown in red
    assert not p.generate_button.disabled and not p.busy


def test_unexpected_errors_show_their_first_line(monkeypatch):
    def boom(**_):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(api, "generate", boom)
    p = qlora_magic.panel()
    p.gen_prompt.value = "Hello"
    click(p, p.generate_button)
    assert p.status_text == "RuntimeError: boom"


def test_bad_form_values_fail_in_the_config_check(tiny_loaded):
    p = qlora_magic.panel(data="", prompt="Q: {q}", response="{a}")
    click(p, p.train_button)
    assert p.status_text.startswith("ConfigError: No data")
    p.data.value = "$nowhere"
    click(p, p.train_button)
    assert "names no variable" in p.status_text
    p.save_path.value = " "
    click(p, p.save_button)
    assert p.status_text == "ConfigError: Give a folder to save the adapter to."


def test_load_errors_show_in_the_panel(tmp_path):
    p = qlora_magic.panel()
    p.model.value = str(tmp_path / "no-such-model")
    click(p, p.load_button)
    assert p.status_text.startswith("ModelNotFoundError: ")
    assert "\n" not in p.status_text
    assert qlora_magic.get_session().model is None


def test_round_trip_load_train_generate_save(tiny_model_dir, rows, tmp_path):
    p = qlora_magic.panel(data=rows, prompt="Q: {question}\nA: ", response="{answer}")
    p.model.value = tiny_model_dir
    p.bits.value = 4
    p.r.value = 4
    click(p, p.load_button)
    assert p.last_error is None, p.status_text
    session = qlora_magic.get_session()
    assert session.load_config.bits == 4 and session.load_config.r == 4
    assert "Model loaded" in p.load_info.value
    assert p.memory_bars["model footprint"].value > 0

    p.max_steps.value, p.batch_size.value, p.grad_accum.value, p.lr.value = 3, 4, 1, 1e-3
    p.eval_split.value = 8
    click(p, p.train_button)
    assert p.last_error is None, p.status_text
    assert p.status_text.startswith("Training completed: 3/3 steps; loss ")
    assert p.reporter.bar.value == 1 and p.reporter.bar.bar_style == "success"
    assert p.reporter.chart.value[:4] == b"\x89PNG"
    assert "eval loss" in p.reporter.readout.value
    assert [r["step"] for r in session.history if "loss" in r] == [1, 2, 3]
    assert session.train_configs[-1]["max_steps"] == 3 and session.train_configs[-1]["eval_split"] == 8
    assert p.stop_button.disabled

    p.gen_prompt.value, p.max_new_tokens.value, p.greedy.value, p.raw.value = "Q: sky\nA: ", 5, True, True
    click(p, p.generate_button)
    assert p.last_error is None, p.status_text
    assert session.last_generation and session.last_generation in p.answer.value.replace("&#x27;", "'")
    p.which.value = "base"
    click(p, p.generate_button)
    assert "base model" in p.status_text

    p.save_path.value = str(tmp_path / "adapter")
    click(p, p.save_button)
    assert p.status_text == f"Saved the adapter, tokenizer and run record to {tmp_path / 'adapter'}/"
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()

    # ...and the Load tab restores it.
    p.adapter.value, p.model.value, p.bits.value = str(tmp_path / "adapter"), "", None
    click(p, p.load_button)
    assert p.last_error is None, p.status_text
    assert qlora_magic.get_session().load_config.bits == 4  # the bits it was trained with
    assert len(qlora_magic.get_session().history) == len(session.history)


def test_stop_ends_training_at_a_step_boundary_and_keeps_the_adapter(tiny_loaded, rows):
    import torch

    p = qlora_magic.panel(data=rows, prompt="Q: {question}\nA: ", response="{answer}")
    p.max_steps.value, p.batch_size.value, p.grad_accum.value, p.lr.value = 200, 2, 1, 1e-3
    seen = {}
    step = p.reporter.step

    def step_then_press_stop(progress):
        step(progress)
        if progress["step"] == 2:
            assert p.busy and not p.stop_button.disabled
            p.load_button.click()  # a second action while one runs is refused, in one line under the status
            seen["busy"] = p.status_text
            other = qlora_magic.panel()  # panels share the session, so another panel waits its turn too
            other.load_button.click()
            seen["other"] = other.status_text
            p.stop_button.click()  # what the browser sends when Stop is pressed

    p.reporter.step = step_then_press_stop
    lora_before = {n: t.clone() for n, t in tiny_loaded.model.named_parameters() if "lora_B" in n}
    click(p, p.train_button)
    busy = "BusyError: Training in progress (started from the panel): stop it first (the panel's Stop button), or wait."
    assert seen["busy"] == f"Training… (Stop ends it after the step in flight)\n{busy}"  # beside the action's status
    assert seen["other"] == busy and p.last_error is None
    summary = tiny_loaded.last_train_summary
    assert summary.status == "interrupted" and summary.steps_done == 2
    assert p.status_text.startswith("Training interrupted: 2/200 steps")
    assert p.reporter.bar.bar_style == "warning"
    changed = [n for n, t in tiny_loaded.model.named_parameters() if "lora_B" in n and not torch.equal(t, lora_before[n])]
    assert changed, "the two steps trained before Stop are kept"


def test_train_from_a_notebook_variable(tiny_loaded, rows, ip):
    ip.user_ns["my_rows"] = rows
    p = qlora_magic.panel(data="$my_rows", prompt="Q: {question}\nA: ", response="{answer}")
    p.max_steps.value, p.batch_size.value, p.grad_accum.value = 1, 2, 1
    click(p, p.train_button)
    assert p.last_error is None, p.status_text
    assert tiny_loaded.train_configs[-1]["max_steps"] == 1


def test_widget_reporter_draws_events():
    from qlora_magic.engine.training import TrainSummary

    r = WidgetReporter(refresh_seconds=0)
    r.start({"total_steps": 4, "settings": {"lr": 0.001}})
    assert "lr=0.001" in r.settings.value and r.bar.value == 0
    history = [{"step": 1, "loss": 2.5, "learning_rate": 1e-3, "grad_norm": 1.0, "tokens_per_second": 100.0}]
    r.step({"step": 1, "total_steps": 4, "elapsed": 1.0, "eta": 3.0})
    r.log(history[0], {"step": 1, "total_steps": 4, "elapsed": 1.0, "eta": 3.0}, history)
    assert r.bar.value == 0.25
    assert "2.5000" in r.readout.value and r.chart.value[:4] == b"\x89PNG"
    assert "<b>ETA</b> 00:03" in r.readout.value
    r.end(TrainSummary(status="failed", steps_done=1, steps_planned=4, seconds=1.0, run_dir="x", history=history))
    assert r.bar.bar_style == "danger" and r.bar.description == "failed"
    assert "<b>ETA</b> -" in r.readout.value  # an ended run waits for nothing (it showed the last step's ETA)


def test_display_widget_chooses_the_widget_reporter():
    reporter = choose_reporter("widget")
    assert isinstance(reporter, WidgetReporter) and reporter.show
    assert qlora_magic.config.TrainConfig(display="widget").display == "widget"


def test_qlora_panel_magic_returns_the_panel(ip):
    p = ip.run_line_magic("qlora_panel", "")
    assert isinstance(p, Panel)
    assert "dashboard" in ip.find_line_magic("qlora_panel").__doc__


def test_load_ext_does_not_import_ipywidgets_or_torch():
    import subprocess
    import sys

    code = ("import sys; from IPython.core.interactiveshell import InteractiveShell; "
            "ip = InteractiveShell.instance(); ip.extension_manager.load_extension('qlora_magic'); "
            "print(json.dumps(['torch' in sys.modules, 'ipywidgets' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True,
                         cwd=Path(__file__).parents[1], check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == [False, False]


def test_load_tab_loads_a_classifier_and_the_train_tab_takes_a_label(tiny_model_dir):
    from transformers import LlamaForSequenceClassification

    from tiny_model import sentiment_rows

    p = qlora_magic.panel(data=sentiment_rows(), prompt="{text}", response="{sentiment}")
    assert p.num_labels.layout.display == "none" and p.label.layout.display == "none"  # causal-lm by default
    p.task.value = "seq-cls"
    assert p.num_labels.layout.display is None and p.label.layout.display is None and p.response.layout.display == "none"
    p.model.value, p.num_labels.value = tiny_model_dir, 2
    click(p, p.load_button)
    assert p.last_error is None, p.status_text
    session = qlora_magic.get_session()
    assert isinstance(session.model.get_base_model(), LlamaForSequenceClassification)
    assert session.load_config.task == "seq-cls" and session.model.config.num_labels == 2
    assert "(seq-cls)" in p.status_text
    p.label.value = "sentiment"
    p.max_steps.value, p.batch_size.value, p.grad_accum.value, p.lr.value, p.eval_split.value = 2, 4, 1, 5e-3, 8
    click(p, p.train_button)
    assert p.last_error is None, p.status_text
    assert session.train_configs[-1]["label"] == "sentiment" and session.train_configs[-1]["response"] is None
    assert "accuracy" in p.reporter.readout.value


def test_load_tab_seq2seq_on_a_decoder_only_model_is_one_red_line(tiny_model_dir):
    qlora_magic.load(tiny_model_dir, bits=8)
    session = qlora_magic.get_session()
    before = (session.model, session.load_config)
    p = qlora_magic.panel()
    p.model.value, p.task.value = tiny_model_dir, "seq2seq"
    assert p.num_labels.layout.display == "none"
    click(p, p.load_button)
    assert p.status_text.startswith("ConfigError: ") and "is decoder-only: use --task causal-lm" in p.status_text
    assert "\n" not in p.status_text and "#d62728" in p.status.value
    assert (session.model, session.load_config) == before and qlora_magic.get_session() is session


def test_the_panel_uses_only_public_names_of_other_modules():
    import ast

    import qlora_magic.front.panel as module

    tree = ast.parse(Path(module.__file__).read_text())
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names]
    modules = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names
               if alias.name in ("api", "examples")}
    reached = [node.attr for node in ast.walk(tree)
               if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules]
    assert modules == {"api", "examples"}
    assert not [name for name in imported + reached if name.startswith("_") and name != "__future__"]


def test_the_check_button_shows_the_data_check_and_trains_nothing(tiny_loaded, rows):
    p = qlora_magic.panel(data=rows + rows[:2], prompt="Q: {question}\nA: ", response="{answer}")
    click(p, p.check_button)
    assert p.last_error is None, p.status_text
    assert p.status_text.startswith(f"Data check: {len(rows) + 2} rows, columns used: question, answer;")
    assert "qlora-data-report" in p.check_info.value and "qlora-token qlora-trained" in p.check_info.value
    assert tiny_loaded.history == [] and tiny_loaded.runs == []
    p.response.value = "{nope}"
    click(p, p.check_button)
    assert p.status_text.startswith("DataError: The response template uses {nope}")


def test_the_doctor_line_under_the_memory_bars():
    p = qlora_magic.panel()
    assert p.doctor_line.value and "not run yet" in p.doctor_line.value
    click(p, p.doctor_button)
    assert p.last_error is None, p.status_text
    assert p.doctor_line.value.count("Doctor: ") == 1 and "qlora-doctor" in p.doctor_info.value
    assert p.status_text.startswith("Doctor: ")


def test_the_save_tab_exports_a_checked_gguf_with_its_modelfile_or_a_merged_folder(tiny_loaded, rows, tmp_path):
    qlora_magic.train(rows, prompt="Q: {question}\nA: ", response="{answer}", max_steps=2, batch_size=4, grad_accum=1,
                      eval_split=8, display="none")
    p = qlora_magic.panel()
    assert p.export_format.value == "gguf" and p.export_quant.value == "f16" and p.export_quant.layout.display is None
    p.export_path.value = str(tmp_path / "gguf")
    p.export_quant.value, p.export_ollama.value = "q8_0", True
    click(p, p.export_button)
    assert p.last_error is None, p.status_text
    (file,) = (tmp_path / "gguf").glob("*.gguf")
    assert (tmp_path / "gguf" / "Modelfile").read_text().startswith(f"FROM ./{file.name}")
    assert p.status_text.startswith(f"Exported to {file}") and "answers the same, perplexity drift " in p.status_text
    assert "GGUF export" in p.export_info.value and "ollama create" in p.export_info.value

    p.export_format.value = "merged"  # a folder for vLLM / transformers: no GGUF type, no Modelfile
    assert p.export_quant.layout.display == "none" and p.export_ollama.layout.display == "none"
    p.export_path.value = str(tmp_path / "merged")
    click(p, p.export_button)
    assert p.last_error is None, p.status_text
    assert (tmp_path / "merged" / "config.json").is_file() and p.status_text.startswith(f"Merged to {tmp_path / 'merged'}")
    assert "Merged model" in p.export_info.value


@pytest.mark.parametrize("field, value, message", [
    ("export_path", "", "needs a format and a folder to write to"),
    ("report_to", "mlflow, nonsense", "nonsense"),
])
def test_bad_export_and_tracker_fields_are_one_red_line_and_change_nothing(tiny_loaded, tmp_path, monkeypatch, field, value, message):
    monkeypatch.chdir(tmp_path)
    p = qlora_magic.panel(data=[{"q": "a", "a": "b"}] * 4, prompt="{q}", response="{a}")
    getattr(p, field).value = value
    history = list(qlora_magic.get_session().history)
    click(p, p.export_button if field == "export_path" else p.train_button)
    assert isinstance(p.last_error, QloraError) and message in p.status_text and "\n" not in p.status_text
    assert qlora_magic.get_session().history == history and list(tmp_path.iterdir()) == []


def test_hiding_a_field_hides_no_other():
    """Each field has a Layout of its own: the Train tab hides the label column for a causal-lm model, which once
    hid every field that shared its Layout (data, model, targets, adapter) in the browser."""
    p = qlora_magic.panel()
    shown = [p.model, p.targets, p.adapter, p.data, p.report_to, p.save_path, p.export_path]
    assert p.label.layout.display == "none"
    assert all(field.layout.display != "none" for field in shown)
    layouts = [field.layout for field in shown + [p.label, p.response, p.num_labels, p.export_quant]]
    assert len({id(layout) for layout in layouts}) == len(layouts)
