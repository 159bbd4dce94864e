"""%qlora_merge / qlora_magic.merge: parsing, wiring, and a real merge of the tiny model."""

import pytest

import qlora_magic
from qlora_magic.front import parsing
from qlora_magic.errors import ConfigError, DataError, QloraError


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


def test_merge_on_a_16_bit_base_is_exact(tiny_model_dir, rows, tmp_path):
    """What the merge itself adds, without quantization in between: nothing beyond float rounding."""
    import torch
    from transformers import AutoModelForCausalLM

    qlora_magic.load(tiny_model_dir, bits=16, device="cpu")
    qlora_magic.train(rows, prompt="Q: {question}\nA: ", response="{answer}", max_steps=3, lr=1e-2, display="none")
    report = qlora_magic.merge(tmp_path / "merged16", dtype="float32", max_new_tokens=4)
    session = qlora_magic.get_session()
    ids = session.tokenizer(["Q: what is two plus two?\nA: four"], return_tensors="pt")
    session.model.eval()
    with torch.no_grad():
        adapter_logits = session.model(**ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged16"))(**ids).logits
    assert session.model.get_base_model().model.layers[0].self_attn.q_proj.lora_B["default"].weight.abs().max() > 0
    assert (merged_logits - adapter_logits).abs().max().item() < 1e-4
    assert report.answers_matching == len(report.prompts)


def test_merge_without_training_checks_answers_only(tiny_loaded, tmp_path):
    report = qlora_magic.merge(tmp_path / "m16", max_new_tokens=4)
    assert report.prompts == ["The capital of France is"] and report.perplexity_drift is None


def test_merge_a_classifier_keeps_its_head_and_class_names(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from tiny_model import sentiment_rows

    qlora_magic.load(tiny_model_dir, bits=8, task="seq-cls", device="cpu")
    qlora_magic.train(sentiment_rows(), prompt="{text}", label="sentiment", eval_split=0.25, lr=5e-3, max_steps=12,
                      batch_size=4, grad_accum=1, display="none")
    report = qlora_magic.merge(tmp_path / "clf", dtype="float32")
    assert len(report.prompts) == 12  # every held-out row, with its label
    assert report.answers_matching == 12 and report.adapter_accuracy == report.merged_accuracy == 1.0
    # 8-bit weights vs the originals: the logits move a little, never enough to change a label.
    assert 0 < report.mean_probability_drift <= report.max_probability_drift < 0.05 and report.max_logit_drift > 0
    assert report.within_tolerance
    assert "accuracy" in repr(report) and "mean probability change" in report._repr_html_()
    plain = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "clf"))  # no peft, no bitsandbytes
    assert plain.config.id2label == {0: "angry", 1: "calm"} and plain.config.label2id == {"angry": 0, "calm": 1}
    assert not any("lora" in n or "modules_to_save" in n for n, _ in plain.named_parameters())
    tok = qlora_magic.get_session().tokenizer
    batch = tok(["the sky is blue", "the sky is red"], return_tensors="pt", padding=True)
    assert [plain.config.id2label[i] for i in plain(**batch).logits.argmax(-1).tolist()] == ["calm", "angry"]
    with pytest.raises(DataError, match="no label column 'sentiment'") as info:  # data= without the last run's label column
        qlora_magic.merge(tmp_path / "bad", data=[{"text": "the sky is blue"}])
    assert "\n" not in str(info.value) and not (tmp_path / "bad").exists()


def test_merge_a_seq2seq_model(tiny_t5_dir, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    from tiny_model import summary_rows

    qlora_magic.load(tiny_t5_dir, bits=8, task="seq2seq", device="cpu", targets="all-linear")
    qlora_magic.train(summary_rows(), prompt="{article}", response="{summary}", eval_split=0.25, lr=2e-2, max_steps=40,
                      batch_size=4, grad_accum=1, display="none")
    report = qlora_magic.merge(tmp_path / "t5", dtype="float32", max_new_tokens=5)
    assert len(report.prompts) == 4 and report.answers_matching == 4
    assert abs(report.perplexity_drift) < 0.05 and report.within_tolerance and "loss" in repr(report)
    plain = AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "t5"))
    assert not any("lora" in n for n, _ in plain.named_parameters())
    tok = qlora_magic.get_session().tokenizer
    ids = plain.generate(**tok("what is the color of the sky", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert tok.decode(ids[0], skip_special_tokens=True).strip() == qlora_magic.generate(
        "what is the color of the sky", greedy=True, max_new_tokens=5, stream=False).strip()
