"""--bits auto: parsing, one-line errors, wiring, and real runs on the tiny model (bitsandbytes and PEFT)."""

import json
from unittest import mock

import pytest
from IPython.core.error import UsageError

import qlora_magic
from qlora_magic import api
from qlora_magic.engine.adaptive import AdaptiveReport, LayerError, choose_layers_8bit, quantized_layers
from qlora_magic.config import LoadConfig
from qlora_magic.errors import ConfigError
from qlora_magic.front.parsing import parse_load

# --- parsing --------------------------------------------------------------------------------------------


def test_bits_auto_and_keep_8bit_parse():
    assert parse_load("--bits auto").bits == "auto"
    config = parse_load("my/model --bits auto --keep-8bit 0.4")
    assert (config.model, config.bits, config.keep_8bit) == ("my/model", "auto", 0.4)
    assert parse_load("--bits 4").bits == 4  # numbers stay numbers


@pytest.mark.parametrize("line, message", [
    ("--bits auto --keep-8bit 1.5", "--keep-8bit must be a fraction between 0 and 1, got 1.5"),
    ("--bits auto --keep-8bit -0.1", "--keep-8bit must be a fraction between 0 and 1"),
    ("--bits 4 --keep-8bit 0.2", "--keep-8bit chooses layers for --bits auto, not --bits 4"),
    ("--bits auto --task seq-cls", "--bits auto measures layers with a language model's loss"),
])
def test_bad_auto_options_are_one_line_config_errors(line, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as error:
        parse_load(line)
    assert len(error.value._render_traceback_()) == 1


@pytest.mark.parametrize("calibration", ["one text", ["only one"], ["a", "  "], ["a", 3]])
def test_calibration_must_be_two_or_more_texts(calibration):
    # a single text is caught by the type check ("a list of texts, got 'one text'"), the rest by the count
    with pytest.raises(ConfigError, match="^calibration must be a list of (at least 2 non-empty )?texts"):
        LoadConfig(bits="auto", calibration=calibration)


def test_bits_must_be_a_known_choice():
    with pytest.raises(UsageError, match="choose from 4, 8, 16, auto, got 'nine'"):
        parse_load("--bits nine")


def test_layers_8bit_only_with_auto():
    with pytest.raises(ConfigError, match="layers_8bit chooses layers for --bits auto"):
        LoadConfig(bits=8, layers_8bit=["model.layers.0.self_attn.v_proj"])


# --- choosing ---------------------------------------------------------------------------------------------


def test_choice_takes_the_largest_excess_per_parameter_within_the_budget():
    layers = [LayerError("big", 800, 0.30, 0.01), LayerError("small", 100, 0.20, 0.01),
              LayerError("tiny", 100, 0.05, 0.01), LayerError("calm", 100, 0.02, 0.02)]
    # per parameter: small 1.9e-3 > tiny 4e-4 > big 3.6e-4 > calm 0; budget 0.25 * 1100 = 275
    assert choose_layers_8bit(layers, 0.25) == ["small", "tiny"]  # big does not fit; calm gains nothing
    assert choose_layers_8bit(layers, 0.0) == []
    assert choose_layers_8bit(layers, 1.0) == ["small", "tiny", "big"]


def test_report_rows_read_as_text_and_html():
    report = AdaptiveReport(layers=[LayerError("model.layers.3.self_attn.v_proj", 10, 0.2, 0.01)],
                            layers_8bit=["model.layers.3.self_attn.v_proj"], keep_8bit=0.25,
                            footprints={"8-bit": 2e6, "auto": 1.5e6, "4-bit": 1e6},
                            losses={"16-bit": 1.0, "8-bit": 1.01, "auto": 1.02, "4-bit": 1.2}, seconds=1.5, tokens=100)
    text = repr(report)
    assert "uniform 4-bit   1.0 MB, perplexity 3.320 (16-bit 2.718)" in text
    assert "3.v_proj" in text and "1 of 1 in 8-bit" in text
    assert "<table>" in report._repr_html_() and "8-bit" in report.layers_text()


# --- wiring -----------------------------------------------------------------------------------------------


def test_load_magic_passes_bits_auto(ip):
    with mock.patch.object(api, "load", return_value="report") as load:
        ip.run_line_magic("qlora_load", "--bits auto --keep-8bit 0.5")
    assert load.call_args.kwargs["config"] == LoadConfig(bits="auto", keep_8bit=0.5)


def test_panel_offers_auto_and_passes_it_to_load(monkeypatch):
    pytest.importorskip("ipywidgets")
    calls = []
    monkeypatch.setattr(api, "load", lambda config: calls.append(config))
    p = qlora_magic.panel()
    p.bits.value = "auto"
    p.load_button.click()
    p.wait(timeout=60)
    assert calls and calls[0].bits == "auto"


@pytest.mark.parametrize("line, error", [
    ("--bits auto --keep-8bit 2", "--keep-8bit must be a fraction between 0 and 1"),
    ("--keep-8bit 0.3", "--keep-8bit chooses layers for --bits auto, not --bits 8"),  # checked before any weights load
])
def test_bad_auto_input_fails_in_one_line_and_keeps_the_session(ip, capsys, tiny_loaded, line, error):
    model = tiny_loaded.model
    result = ip.run_cell(f"%qlora_load {tiny_loaded.load_config.model} {line}")
    assert not result.success
    shown = capsys.readouterr()
    assert error in shown.out + shown.err and "Traceback" not in shown.out + shown.err
    assert qlora_magic.get_session().model is model and tiny_loaded.load_config.bits == 8


def test_unknown_8bit_layer_is_a_one_line_error_before_any_weights_load(tiny_loaded):
    model = tiny_loaded.model
    with pytest.raises(ConfigError, match="layers_8bit names 'model.layers.9.mlp.up_proj', which is not a quantizable"):
        qlora_magic.load(tiny_loaded.load_config.model, bits="auto", layers_8bit=["model.layers.9.mlp.up_proj"])
    with pytest.raises(ConfigError, match="'lm_head', which is not a quantizable"):  # transformers keeps it unquantized
        qlora_magic.load(tiny_loaded.load_config.model, bits="auto", layers_8bit=["lm_head"])
    assert qlora_magic.get_session().model is model


# --- real runs on the tiny model ----------------------------------------------------------------------------


def test_your_own_calibration_texts_are_measured_and_not_saved(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    texts = ["the cat sat on the mat", "the dog ran in the park", "what is the color of the sky",
             "the sky is blue", "grass is green", "red green blue yellow"]
    report = qlora_magic.load(tiny_model_dir, bits="auto", calibration=texts)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert report.adaptive.tokens == sum(len(tokenizer(t)["input_ids"]) for t in texts[0::2])
    saved = qlora_magic.save(str(tmp_path / "adapter"))
    record = json.loads((saved / "qlora_magic.json").read_text())["load_config"]
    assert record["calibration"] == "<list of 6 rows>" and record["layers_8bit"] == report.adaptive.layers_8bit



def _short(name):
    return name.removeprefix("base_model.model.").removesuffix(".base_layer")


def _train_moves_lora_on_both_kinds(model, rows):
    """Train a few steps; assert LoRA weights moved on 8-bit and on 4-bit layers. Returns the summary."""
    import torch

    eight, four = quantized_layers(model)
    lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    summary = qlora_magic.train(rows, prompt="Q: {question} ", response="{answer}", max_steps=4, lr=1e-2,
                                batch_size=8, grad_accum=1, display="none")
    changed = {n for n, p in model.named_parameters() if "lora_B" in n and not torch.equal(p, lora_b[n])}
    for kind in (eight, four):
        assert any(n.removesuffix(".base_layer") + ".lora_B.default.weight" in changed for n in kind), kind
    return summary


def test_auto_mixes_8_and_4_bit_layers_by_measured_error(tiny_model_dir):
    report = qlora_magic.load(tiny_model_dir, bits="auto", targets="all-linear")
    session = qlora_magic.get_session()
    adaptive = report.adaptive
    eight, four = quantized_layers(session.model)
    assert eight and four, "the mix has both kinds of layer"
    assert sorted(map(_short, eight)) == sorted(session.load_config.layers_8bit) == sorted(adaptive.layers_8bit)
    assert report.quantization == f"auto: {len(eight)} layers 8-bit (LLM.int8), {len(four)} 4-bit NF4"
    # LoRA sits on both kinds (PEFT wraps Linear8bitLt only when the model says it is 8-bit)
    assert {_short(n).rsplit(".", 1)[-1] for n in eight} <= set(session.load_config.targets)
    assert sum("lora_A" in n for n, _ in session.model.named_parameters()) == len(eight) + len(four)

    # NF4 is coarser than int8 everywhere, and the 8-bit layers are those it hurts most per parameter
    layers = adaptive.layers
    assert all(e.error_4bit > e.error_8bit > 0 for e in layers)
    score = {e.name: e.excess / e.parameters for e in layers}
    chosen = set(adaptive.layers_8bit)
    assert layers[0].name in chosen
    budget = adaptive.keep_8bit * sum(e.parameters for e in layers)
    left = budget - sum(e.parameters for e in layers if e.name in chosen)
    weakest_kept = min(score[n] for n in chosen)
    for e in layers:  # a more sensitive layer left in 4-bit did not fit in what the budget had left
        if e.name not in chosen and score[e.name] > weakest_kept:
            assert e.parameters > left, e.name

    # footprint lies between uniform 4 and 8, as the measurement predicted, and so does the quality
    footprints = adaptive.footprints
    assert footprints["4-bit"] < footprints["auto"] < footprints["8-bit"]
    loads = {"auto": report, **{f"{b}-bit": qlora_magic.load(tiny_model_dir, bits=b, targets="all-linear") for b in (4, 8)}}
    assert loads["4-bit"].footprint < report.footprint < loads["8-bit"].footprint
    if session.model.device.type == "cpu":  # all fp32 there: the predicted weights are the loaded ones, LoRA aside
        assert {k: r.footprint - 4 * r.trainable_parameters for k, r in loads.items()} == footprints
    losses = adaptive.losses
    assert losses["8-bit"] < losses["auto"] < losses["4-bit"]
    assert "uniform 8-bit" in repr(report) and "perplexity" in report._repr_html_()


def test_auto_trains_both_kinds_and_restores_the_same_mix(tiny_model_dir, rows, tmp_path):
    qlora_magic.load(tiny_model_dir, bits="auto", keep_8bit=0.4, targets="all-linear")
    session = qlora_magic.get_session()
    eight, four = quantized_layers(session.model)
    first, last = _train_moves_lora_on_both_kinds(session.model, rows).train_loss
    assert last != first

    prompt = dict(prompt="Q: the sky is", greedy=True, max_new_tokens=8, stream=False)
    answer = qlora_magic.generate(**prompt)
    qlora_magic.save(str(tmp_path / "auto-adapter"))
    layers_8bit = session.load_config.layers_8bit

    qlora_magic.reset_session()
    report = qlora_magic.load(adapter=str(tmp_path / "auto-adapter"))
    restored = qlora_magic.get_session()
    assert report.adaptive is None, "restoring reuses the saved plan: no measurement"
    assert restored.load_config.bits == "auto" and restored.load_config.layers_8bit == layers_8bit
    assert quantized_layers(restored.model) == (eight, four)
    assert qlora_magic.generate(**prompt) == answer


@pytest.mark.gpu
def test_auto_on_the_gpu(tiny_model_dir, rows):
    report = qlora_magic.load(tiny_model_dir, bits="auto", targets="all-linear", device="cuda")
    model = qlora_magic.get_session().model
    eight, four = quantized_layers(model)
    assert eight and four and report.adaptive.losses["auto"] < report.adaptive.losses["4-bit"]
    assert next(model.parameters()).device.type == "cuda"
    _train_moves_lora_on_both_kinds(model, rows)

