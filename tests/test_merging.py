"""%qlora_merge / qlora_magic.merge: parsing, wiring, and a real merge of the tiny model."""

import pytest

import qlora_magic
from qlora_magic import parsing
from qlora_magic.errors import ConfigError, QloraError


def test_parse_merge():
    config = parsing.parse_merge("out/merged --dtype bfloat16 --adapter task2 --no-verify")
    assert (config.path, config.dtype, config.adapter, config.verify) == ("out/merged", "bfloat16", "task2", False)
    assert parsing.parse_merge("out").dtype == "float16"
    with pytest.raises(ConfigError, match="--tolerance must be > 0"):
        parsing.parse_merge("out --tolerance 0")


def test_magic_passes_its_config_to_the_api(ip, monkeypatch):
    seen = {}
    monkeypatch.setattr(qlora_magic.api, "merge", lambda config: seen.setdefault("config", config))
    ip.run_line_magic("qlora_merge", "merged/x --dtype float32")
    assert seen["config"].path == "merged/x" and seen["config"].dtype == "float32"


def test_merge_matches_the_adapter(tiny_loaded, rows, tmp_path):
    from transformers import AutoModelForCausalLM

    qlora_magic.train(rows, prompt="Q: {question}\nA: ", response="{answer}", eval_split=0.25, max_steps=4, eval_steps=4, lr=1e-2,
                      batch_size=4, grad_accum=1, display="none")
    report = qlora_magic.merge(tmp_path / "merged", dtype="float32", max_new_tokens=6)
    assert (tmp_path / "merged" / "model.safetensors").exists() and report.size > 0
    assert len(report.prompts) == 4 and report.adapter_perplexity and report.merged_perplexity
    # The adapter ran on 8-bit weights, the merged model on the originals: close, not equal.
    assert abs(report.perplexity_drift) < 0.05
    assert "perplexity" in repr(report) and "drift" in report._repr_html_()
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))  # no peft, no bitsandbytes
    assert not any("lora" in name for name, _ in plain.named_parameters())
    with pytest.raises(QloraError, match="not empty"):
        qlora_magic.merge(tmp_path / "merged")


def test_merge_without_training_checks_answers_only(tiny_loaded, tmp_path):
    report = qlora_magic.merge(tmp_path / "m16", max_new_tokens=4)
    assert report.prompts == ["The capital of France is"] and report.perplexity_drift is None
