"""%qlora_adapters and the adapter verbs: parsing, wiring, and real runs on the tiny model."""

import pytest
import torch

import qlora_magic
from qlora_magic.front import parsing
from qlora_magic.errors import AdapterError, ConfigError


def test_parse_adapters():
    assert parsing.parse_adapters("") == {"action": "list"}
    assert parsing.parse_adapters("add task2 --r 4 --targets q_proj") == {
        "action": "add", "name": "task2", "activate": True, "r": 4, "targets": "q_proj"}
    assert parsing.parse_adapters("use task2") == {"action": "switch", "name": "task2"}
    assert parsing.parse_adapters("load runs/a --name older --keep-active") == {
        "action": "load", "path": "runs/a", "name": "older", "activate": False}
    combine = parsing.parse_adapters("combine mix --weights default=0.7,task2=0.3 --combination cat")
    assert combine["weights"] == {"default": 0.7, "task2": 0.3} and combine["combination_type"] == "cat"


@pytest.mark.parametrize("line, message", [
    ("rename a", "Unknown action 'rename'"),
    ("add", "needs a name"),
    ("load", "needs a folder"),
    ("combine mix --weights a=x", "not a number"),
])
def test_parse_adapters_errors(line, message):
    with pytest.raises(ConfigError, match=message):
        parsing.parse_adapters(line)


def test_magic_calls_the_verb(ip, monkeypatch):
    seen = []
    monkeypatch.setattr(qlora_magic.api, "add_adapter", lambda **kw: seen.append(kw))
    ip.run_line_magic("qlora_adapters", "add task2 --r 4")
    assert seen == [{"name": "task2", "activate": True, "r": 4}]


def _lora_weights(model, name):
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{name}." in n and "lora_" in n}


def test_second_adapter_trains_alone_on_the_same_base(tiny_loaded, rows):
    model = tiny_loaded.model
    table = qlora_magic.add_adapter("task2", r=4)
    assert table.names == ["default", "task2"] and table.active == "task2"
    assert {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad} == {"task2"}
    before_default, before_task2 = _lora_weights(model, "default"), _lora_weights(model, "task2")
    qlora_magic.train(rows[:8], prompt="{question} ", response="{answer}", max_steps=2, lr=1e-2,
                      batch_size=4, grad_accum=1, display="none")
    after_default, after_task2 = _lora_weights(model, "default"), _lora_weights(model, "task2")
    assert all(torch.equal(before_default[k], after_default[k]) for k in before_default)
    assert any(not torch.equal(before_task2[k], after_task2[k]) for k in before_task2)

    assert qlora_magic.switch_adapter("default").active == "default"
    mix = qlora_magic.combine_adapters("mix", {"default": 0.5, "task2": 0.5})  # ranks differ: cat
    assert mix.active == "mix" and model.peft_config["mix"].r == 12
    assert "* " in repr(mix) or "*  mix" in repr(mix)
    assert qlora_magic.delete_adapter("mix").names == ["default", "task2"]
    assert qlora_magic.list_adapters().active in ("default", "task2")


def test_saved_adapter_loads_beside_the_others(tiny_loaded, tmp_path):
    qlora_magic.save(tmp_path / "first")
    table = qlora_magic.load_adapter(tmp_path / "first", activate=False)
    assert table.names == ["default", "first"] and table.active == "default"


def test_adapter_errors(tiny_loaded):
    with pytest.raises(AdapterError, match="No adapter 'nope': this model has default"):
        qlora_magic.switch_adapter("nope")
    with pytest.raises(AdapterError, match="only adapter"):
        qlora_magic.delete_adapter("default")
    with pytest.raises(AdapterError, match="already an adapter 'default'"):
        qlora_magic.add_adapter("default")
    with pytest.raises(ConfigError, match="single words"):
        qlora_magic.add_adapter("my adapter")
    with pytest.raises(ConfigError, match="'base' names the model"):
        qlora_magic.add_adapter("base")
    with pytest.raises(AdapterError, match="No saved adapter"):
        qlora_magic.load_adapter("nowhere")
    with pytest.raises(AdapterError, match="No adapter 'ghost'"):
        qlora_magic.combine_adapters("mix", {"default": 1, "ghost": 1})


def test_unknown_adapter_in_the_magic_is_one_line(ip, tiny_loaded):
    result = ip.run_cell("%qlora_adapters switch nope")
    assert isinstance(result.error_in_exec, AdapterError)
    assert result.error_in_exec._render_traceback_() == [
        "AdapterError: No adapter 'nope': this model has default (see %qlora_adapters list)."]


@pytest.mark.parametrize("call, message", [
    (lambda: qlora_magic.combine_adapters("mix", {"default": float("nan")}), "The weight of 'default' must be a finite number"),
    (lambda: qlora_magic.combine_adapters("mix", {"default": float("inf")}), "must be a finite number, like default=0.5; got inf"),
    (lambda: qlora_magic.combine_adapters("mix", {"default": "abc"}), "got 'abc'"),
    (lambda: qlora_magic.combine_adapters("mix", ["default"]), "Name the adapters to combine"),
    (lambda: qlora_magic.combine_adapters("mix", {"default": 1}, combination_type="bogus"), "--combination must be one of linear, cat"),
    (lambda: qlora_magic.load_adapter(None), "Give the folder of a saved adapter"),
    (lambda: qlora_magic.load_adapter(""), "Give the folder of a saved adapter"),
])
def test_bad_combine_and_load_values_are_one_line_and_add_nothing(tiny_loaded, call, message):
    before = _lora_weights(tiny_loaded.model, "default")
    with pytest.raises(ConfigError, match=message) as info:
        call()
    assert "\n" not in str(info.value)
    assert qlora_magic.list_adapters().names == ["default"]
    after = _lora_weights(tiny_loaded.model, "default")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_targets_that_name_no_module_are_one_line_not_silently_skipped(tiny_model_dir):
    with pytest.raises(qlora_magic.errors.ConfigError, match=r"^--targets 'bogus_proj' names no module of this model: choose from .*q_proj"):
        qlora_magic.load(tiny_model_dir, bits=8, device="cpu", targets="q_proj,bogus_proj")
    qlora_magic.load(tiny_model_dir, bits=8, device="cpu", targets="q_proj")
    before = qlora_magic.list_adapters()
    with pytest.raises(qlora_magic.errors.ConfigError, match=r"^--targets 'nope' names no module"):
        qlora_magic.add_adapter("task2", targets="v_proj,nope")
    assert repr(qlora_magic.list_adapters()) == repr(before)  # nothing added
