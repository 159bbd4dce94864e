"""Adaptive quantization (`--bits auto`, slide 14): keep the layers that 4-bit hurts most in 8-bit.

1. Measure: the unquantized base answers a few calibration texts while hooks keep a sample of each
   quantizable linear layer's inputs X. For each layer, the relative output error of its weight W after
   a quantization round trip, ||X (Q(W) - W)^T|| / ||X W^T||, for NF4 (blocksize 64, double quantization,
   as `--bits 4` loads) and for LLM.int8 (row-wise int8, as `--bits 8` stores it).
2. Choose: rank layers by the error 4-bit adds over 8-bit per parameter (bytes kept in 8-bit are twice the
   4-bit bytes, so this is error per byte) and keep the top ones in 8-bit up to a fraction of the quantized
   parameters (`--keep-8bit`, default 0.25).
3. Report: the same model, its weights swapped for their round trips (uniform 8, the mix, uniform 4), scores
   held-out calibration texts, so the quality table needs no second model in memory.
4. Build: load 4-bit NF4 with the chosen layers skipped, then turn those into bitsandbytes `Linear8bitLt`.

A saved adapter records the chosen layers (`layers_8bit` in qlora_magic.json), so restoring rebuilds the same
mix without measuring again.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field

from ..display.formatting import Readout, gb, html_grid, text_grid

#: Fraction of the quantized parameters kept in 8-bit by default (docs/user-guide.md has the measurement).
DEFAULT_KEEP_8BIT = 0.25
#: Input rows (tokens) kept per layer for the error measurement: plenty for a stable ranking, little memory.
SAMPLED_TOKENS = 256
BLOCKSIZE = 64  # bitsandbytes' NF4 blocksize, as Params4bit uses when loading


@dataclass
class LayerError:
    """One layer's relative output error after an NF4 and an int8 round trip of its weight."""

    name: str
    parameters: int
    error_4bit: float
    error_8bit: float

    @property
    def excess(self) -> float:
        """What 4-bit costs over 8-bit in output error: the score layers are ranked by (per parameter)."""
        return self.error_4bit - self.error_8bit


@dataclass(repr=False)
class AdaptiveReport(Readout):
    """The per-layer sensitivities, the chosen 8-bit layers, and footprint and quality of each choice."""

    layers: list  # LayerError, most sensitive first
    layers_8bit: list
    keep_8bit: float
    footprints: dict = field(default_factory=dict)  # "8-bit", "auto", "4-bit" -> bytes
    losses: dict = field(default_factory=dict)  # "16-bit", "8-bit", "auto", "4-bit" -> held-out loss
    seconds: float = 0.0
    tokens: int = 0

    title = "Adaptive quantization"

    def perplexity(self, kind) -> float:
        return math.exp(self.losses[kind])

    def rows(self):
        n8 = len(self.layers_8bit)
        rows = [("layers", f"{n8} of {len(self.layers)} in 8-bit ({self.keep_8bit:.0%} of the quantized parameters at most)")]
        reference = f"16-bit {self.perplexity('16-bit'):.3f}" if "16-bit" in self.losses else ""
        for kind, label in (("8-bit", "uniform 8-bit"), ("auto", "auto"), ("4-bit", "uniform 4-bit")):
            size = gb(self.footprints[kind]) if kind in self.footprints else "-"
            quality = f"perplexity {self.perplexity(kind):.3f} ({reference})" if kind in self.losses else ""
            rows.append((label, f"{size}, {quality}".rstrip(", ")))
        if self.layers:
            top = ", ".join(short_name(e.name) for e in self.layers[:3])
            rows.append(("most sensitive", f"{top} (4-bit error {self.layers[0].error_4bit:.3f} vs 8-bit {self.layers[0].error_8bit:.4f})"))
        rows.append(("measured", f"{self.tokens} calibration tokens in {self.seconds:.1f} s"))
        return rows

    def layer_table(self, top=None):
        """The ranking as rows: name, parameters, 4-bit and 8-bit error, the excess, kept in 8-bit or not."""
        kept = set(self.layers_8bit)
        return [{"layer": e.name, "parameters": e.parameters, "error_4bit": e.error_4bit, "error_8bit": e.error_8bit,
                 "excess": e.excess, "8-bit": e.name in kept} for e in self.layers[:top]]

    def to_dataframe(self, top=None):
        import pandas as pd

        return pd.DataFrame(self.layer_table(top))

    def layers_text(self, top=10) -> str:
        return text_grid("Most sensitive layers", *self._layer_cells(top))

    def layers_html(self, top=10) -> str:
        return html_grid("Most sensitive layers", *self._layer_cells(top))

    def _layer_cells(self, top):
        rows = [[r["layer"], f"{r['parameters']:,}", f"{r['error_4bit']:.4f}", f"{r['error_8bit']:.5f}",
                 "8-bit" if r["8-bit"] else "4-bit"] for r in self.layer_table(top)]
        return ["layer", "parameters", "4-bit error", "8-bit error", "kept"], rows


def short_name(name: str) -> str:
    """model.layers.3.self_attn.v_proj -> 3.v_proj"""
    match = re.search(r"(\d+)\.(?:\w+\.)*?(\w+)$", name)
    return f"{match.group(1)}.{match.group(2)}" if match else name


# --- what gets quantized, and the round trips -------------------------------------------------------------


def quantizable_linears(model) -> dict:
    """name -> nn.Linear for the layers bitsandbytes quantizes when transformers loads this model
    (all linear layers but the output head and what transformers keeps unquantized by default)."""
    import torch
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = get_keys_to_not_convert(model) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and should_convert_module(name, skip)}


def nf4_quantize(weight):
    import bitsandbytes.functional as F

    return F.quantize_4bit(weight, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)


def nf4_dequantize(packed, dtype):
    import bitsandbytes.functional as F

    return F.dequantize_4bit(*packed).to(dtype)


def int8_quantize(weight):
    import bitsandbytes.functional as F
    import torch

    CB, SCB, _ = F.int8_vectorwise_quant(weight.to(torch.float16))  # as Int8Params quantizes at load
    return CB, SCB


def int8_dequantize(packed, dtype):
    CB, SCB = packed
    return (CB.float() * (SCB.float() / 127.0).unsqueeze(1)).to(dtype)


# --- measuring ----------------------------------------------------------------------------------------------


def calibration_texts(tokenizer, texts=None) -> tuple[list[str], list[str]]:
    """(texts to measure on, held-out texts to score on): the given texts, every other one each; by default rows
    of the shipped word_forms data written with the chat template (or as prompt + response where there is
    none), every tenth row each, 10 and 10."""
    import json

    from ..examples import path

    if texts is not None:
        return list(texts[0::2]), list(texts[1::2])
    with open(path("word_forms")) as file:
        rows = [json.loads(line) for line in file]
    texts = []
    for row in rows:
        prompt = f"{row['instruction']}\n\n{row['context']}"
        if getattr(tokenizer, "chat_template", None):
            texts.append(tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["response"]}], tokenize=False))
        else:
            texts.append(f"{prompt}\n{row['response']}")
    return texts[0::10], texts[5::10]


def _batch(tokenizer, texts, device, max_length=128):
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    return {k: v.to(device) for k, v in batch.items()}


def sample_layer_inputs(model, linears: dict, batch, tokens=SAMPLED_TOKENS) -> dict:
    """name -> up to `tokens` input rows of that layer, sampled from the batch's real (unpadded) tokens."""
    import torch

    keep = batch["attention_mask"].reshape(-1).bool()
    generator = torch.Generator().manual_seed(0)
    chosen = torch.randperm(int(keep.sum()), generator=generator)[:tokens].to(keep.device)
    inputs, hooks = {}, []

    def hook(name):
        def capture(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])[keep]
            inputs[name] = x[chosen].detach()
        return capture

    for name, module in linears.items():
        hooks.append(module.register_forward_pre_hook(hook(name)))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return inputs


def relative_error(x, weight, approx) -> float:
    import torch

    x = x.float()
    exact = x @ weight.float().T
    return float(torch.linalg.norm(x @ approx.float().T - exact) / torch.linalg.norm(exact).clamp_min(1e-12))


def choose_layers_8bit(layers: list, keep_8bit: float) -> list[str]:
    """The layers to keep in 8-bit: largest excess error per parameter first, within `keep_8bit` of the
    quantized parameters (a greedy knapsack: a layer too big for what is left is passed over)."""
    budget = keep_8bit * sum(e.parameters for e in layers)
    chosen, used = [], 0
    for e in sorted(layers, key=lambda e: e.excess / e.parameters, reverse=True):
        if e.excess > 0 and used + e.parameters <= budget:
            chosen.append(e.name)
            used += e.parameters
    return chosen


def mean_loss(model, batch) -> float:
    import torch

    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        return float(model(**batch, labels=labels).loss)


def footprint(model, linears: dict, layers_8bit) -> int:
    """Bytes of the model once quantized as planned: 1 byte per weight in 8-bit layers, half a byte in 4-bit
    ones, everything else as it is (counted as `get_memory_footprint` counts a bitsandbytes model)."""
    total = model.get_memory_footprint()
    kept = set(layers_8bit)
    for name, module in linears.items():
        n = module.weight.numel()
        total += (n if name in kept else n // 2) - n * module.weight.element_size()
    return int(total)


def measure(model, tokenizer, keep_8bit=DEFAULT_KEEP_8BIT, layers_8bit=None, texts=None) -> AdaptiveReport:
    """Measure every quantizable layer of the unquantized `model` and choose the 8-bit ones (or take the
    given `layers_8bit`); score uniform 4-bit, the mix and uniform 8-bit on held-out texts. The model's
    weights end up replaced by their int8 round trips: it is meant to be dropped afterwards."""
    import torch

    started = time.perf_counter()
    device = next(model.parameters()).device
    linears = quantizable_linears(model)
    measure_texts, score_texts = calibration_texts(tokenizer, texts)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch, held_out = _batch(tokenizer, measure_texts, device), _batch(tokenizer, score_texts, device)
    model.eval()
    inputs = sample_layer_inputs(model, linears, batch)
    losses = {"16-bit": mean_loss(model, held_out)}
    int8, layers = {}, []
    with torch.no_grad():  # each weight becomes its NF4 round trip; only the int8 form is kept (1 byte a weight)
        for name, module in linears.items():
            weight = module.weight.data
            nf4 = nf4_dequantize(nf4_quantize(weight), weight.dtype)
            int8[name] = int8_quantize(weight)
            x = inputs.pop(name)
            layers.append(LayerError(name, weight.numel(), relative_error(x, weight, nf4),
                                     relative_error(x, weight, int8_dequantize(int8[name], weight.dtype))))
            weight.copy_(nf4)
    layers.sort(key=lambda e: e.excess / e.parameters, reverse=True)
    if layers_8bit is None:
        layers_8bit = choose_layers_8bit(layers, keep_8bit)
    losses["4-bit"] = mean_loss(model, held_out)
    chosen = set(layers_8bit)
    kept = [name for name in linears if name in chosen]
    # The mix first, then the rest of the layers to 8-bit too: each step swaps in only what changes.
    for kind, names in (("auto", kept), ("8-bit", [n for n in linears if n not in chosen])):
        with torch.no_grad():
            for name in names:
                weight = linears[name].weight.data
                weight.copy_(int8_dequantize(int8[name], weight.dtype))
        losses[kind] = mean_loss(model, held_out)
    all_names = list(linears)
    footprints = {"8-bit": footprint(model, linears, all_names), "auto": footprint(model, linears, layers_8bit),
                  "4-bit": footprint(model, linears, [])}
    return AdaptiveReport(layers=layers, layers_8bit=list(layers_8bit), keep_8bit=keep_8bit, footprints=footprints,
                          losses=losses, seconds=time.perf_counter() - started,
                          tokens=int(batch["attention_mask"].sum()))


# --- building the mixed model -------------------------------------------------------------------------------


def skip_patterns(layers_8bit) -> list[str]:
    """transformers reads llm_int8_skip_modules as regexes matched from the start of a module's name."""
    return [re.escape(name) for name in layers_8bit]


def to_int8(model, layers_8bit, device):
    """Replace the named (unquantized) nn.Linear layers by bitsandbytes Linear8bitLt with the same weights,
    and mark the model 8-bit too, which PEFT checks before it wraps a Linear8bitLt with LoRA."""
    import bitsandbytes as bnb

    modules = dict(model.named_modules())
    for name in layers_8bit:
        linear = modules[name]
        parent_name, _, child = name.rpartition(".")
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False, device="meta")
        # Int8Params quantizes (row-wise int8, as --bits 8 loads) when moved off the CPU's unquantized copy.
        layer.weight = bnb.nn.Int8Params(linear.weight.data.to("cpu"), requires_grad=False,
                                         has_fp16_weights=False).to(device)
        layer.bias = linear.bias
        setattr(modules[parent_name] if parent_name else model, child, layer)
    model.is_loaded_in_8bit = bool(layers_8bit)
    return model


def quantized_layers(model) -> tuple[list[str], list[str]]:
    """(names of the 8-bit layers, names of the 4-bit layers) of a loaded model, LoRA-wrapped or not."""
    import bitsandbytes as bnb

    eight, four = [], []
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear8bitLt):
            eight.append(name)
        elif isinstance(module, bnb.nn.Linear4bit):
            four.append(name)
    return eight, four
