"""%qlora_compare / qlora_magic.compare: parsing, wiring, and a real run on the tiny model."""

import pytest

import qlora_magic
from qlora_magic.front import parsing
from qlora_magic.errors import AdapterError, ConfigError


def test_parse_compare_line_and_cell():
    config = parsing.parse_compare("--max-new-tokens 5 What is -1 + {x}?")
    assert config.prompts == ["What is -1 + {x}?"] and config.base and config.max_new_tokens == 5
    config = parsing.parse_compare("--raw --no-base --adapters a,b", "Input: one\n\nResponse: \n---\nInput: two\n")
    assert config.prompts == ["Input: one\n\nResponse: ", "Input: two"]
    assert config.raw and not config.base and config.adapters == ["a", "b"]


@pytest.mark.parametrize("line, cell, message", [
    ("", None, "No prompts to compare"),
    ("", "---\n  \n", "No prompts to compare"),
    ("hello", "body", "takes the prompts from the cell body"),
    ("--top-p 2 hi", None, None),  # not an option of %qlora_compare: part of the prompt
])
def test_parse_compare_errors(line, cell, message):
    if message is None:
        assert parsing.parse_compare(line, cell).prompts == [line]
        return
    with pytest.raises(ConfigError, match=message):
        parsing.parse_compare(line, cell)


def test_magic_passes_its_config_to_the_api(ip, monkeypatch):
    seen = {}
    monkeypatch.setattr(qlora_magic.api, "compare", lambda config, on_update: seen.setdefault("config", config))
    ip.run_cell_magic("qlora_compare", "--raw", "A {literal} prompt\n---\nanother")
    assert seen["config"].prompts == ["A {literal} prompt", "another"] and seen["config"].raw


def test_compare_base_and_adapters_side_by_side(tiny_loaded):
    session = tiny_loaded
    qlora_magic.add_adapter("fresh", activate=False)
    updates = []
    comparison = qlora_magic.compare(["the sky is", "grass is"], raw=True, max_new_tokens=4, on_update=updates.append)
    assert comparison.models == ["base", "default", "fresh"]
    assert len(updates) == 6 and updates[0].answers["fresh"] == ["…", "…"] and updates[-1].answers == comparison.answers
    # A LoRA adapter starts as a zero update, so untrained adapters answer exactly as the base does.
    assert comparison.answers["default"] == comparison.answers["base"] == comparison.answers["fresh"]
    assert "[2] grass is" in repr(comparison) and "<th" in comparison._repr_html_()
    assert list(comparison.to_dataframe().columns) == ["prompt", "base", "default", "fresh"]
    assert session.model.active_adapter == "default"  # switching for the comparison is undone
    with pytest.raises(AdapterError, match="No adapter 'nope'"):
        qlora_magic.compare("hi", adapters="nope")


def test_magic_runs_for_real(ip, tiny_loaded, capsys):
    result = ip.run_cell("%%qlora_compare --raw --max-new-tokens 2\nthe sky is\n---\ngrass is\n")
    assert result.error_in_exec is None
    assert "Comparison (greedy, 2 prompts)" in capsys.readouterr().out
