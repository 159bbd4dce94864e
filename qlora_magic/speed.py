"""How a training run is made fast: the batch layout chosen from the memory there is, and two GPU paths
that leave the model's numbers alone but skip work.

Measured on an H200 with a Llama-2-7B-shaped model (docs/benchmarks.md), what pays, biggest first:

- packing (no pad token is computed; position ids restart per example, so attention stays inside it),
- one big micro-batch instead of gradient accumulation (a quantized weight is dequantized once per
  micro-batch forward and once per backward, so fewer micro-batches means fewer dequantizations),
- no gradient checkpointing unless the memory estimate needs it (it recomputes the forward: ~1/3 more),
- a bf16 residual stream: `prepare_model_for_kbit_training` casts norms and embeddings to fp32 (a habit
  from fp16, where it avoids overflow); with bf16 every elementwise op then moves twice the bytes,
- 8-bit weights dequantized to bf16 for a plain matmul during training, instead of LLM.int8's
  activation quantization and outlier split (the same stored weights, computed more exactly).

Everything here is pure Python except the two context managers, so the choices are testable on a CPU.
"""

from __future__ import annotations

import contextlib
import re

from .errors import ConfigError

GB = 1024**3
# Saved activations per token and decoder layer, in bytes, without checkpointing:
# A x hidden + B x intermediate. Fitted on an H200, Llama-2-7B shape, LoRA on q/v (docs/benchmarks.md):
# measured ~6.6 MB/token with an fp32 residual stream and ~4.8 with a bf16 one; this gives 6.6.
ACT_HIDDEN, ACT_INTERMEDIATE = 30, 7
# With checkpointing a layer keeps only its input (bf16) and recomputes one layer at a time
# (measured ~0.42 MB/token in all on the 7B shape; this gives ~0.65).
CKPT_HIDDEN = 2
# Logits for the loss: bf16 logits and their fp32 upcast.
LOGIT_BYTES = 6
WORKSPACE = int(0.75 * GB)  # cuBLAS workspaces, the allocator's slack, dequantized weight temporaries
SAFETY = 0.9  # never plan to fill more than this share of the budget
# On the 7B shape a micro-batch costs ~0.3 s whatever its size between 800 and 3,500 tokens (the GPU
# waits on kernel launches and dequantization, not on arithmetic), about what 8,192 tokens cost at full
# speed: so fewer, bigger micro-batches win, and checkpointing (x1.37 measured) beats a split in two.
MICRO_BATCH_OVERHEAD_TOKENS = 8192
CHECKPOINTING_COST = 4 / 3  # the forward runs twice (1.37x measured)


def parse_memory(value) -> int | None:
    """'10GB', '10 GiB', '512MB', 10 (GB) or a byte count -> bytes; None stays None."""
    if value is None or value == "auto":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value * GB) if value < 4096 else int(value)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", str(value), re.IGNORECASE)
    if not match:
        raise ConfigError(f"--max-memory must look like 10GB or 512MB, got {value!r}.")
    number, unit = float(match.group(1)), match.group(2).upper() or "G"
    return int(number * 1024 ** "KMGT".index(unit) * 1024)


def model_dims(model) -> dict:
    """hidden, intermediate, layers and vocab of a transformers model (or a PEFT wrapper of one)."""
    config = getattr(model, "config", None)
    get = lambda *names, default=0: next((getattr(config, n) for n in names if getattr(config, n, None)), default)  # noqa: E731
    hidden = get("hidden_size", "n_embd", "d_model")
    return {
        "hidden": hidden,
        "intermediate": get("intermediate_size", "ffn_dim", "n_inner", default=4 * hidden),
        "layers": get("num_hidden_layers", "n_layer", "num_layers"),
        "vocab": get("vocab_size"),
    }


def activation_bytes(dims: dict, tokens: int, checkpointing: bool) -> int:
    """Estimated activation memory of one micro-batch of `tokens` tokens (forward + backward peak)."""
    per_layer = ACT_HIDDEN * dims["hidden"] + ACT_INTERMEDIATE * dims["intermediate"]
    if checkpointing:
        stored = dims["layers"] * CKPT_HIDDEN * dims["hidden"] + per_layer
    else:
        stored = dims["layers"] * per_layer
    return tokens * (stored + LOGIT_BYTES * dims["vocab"])


def micro_batch_tokens(lengths: list[int], micro: int, packing: bool) -> tuple[int, float]:
    """(worst case, typical) tokens in a micro-batch of `micro` examples."""
    if not lengths:
        return 0, 0.0
    longest = sorted(lengths, reverse=True)[:micro]
    typical = micro * sum(lengths) / len(lengths)
    worst = sum(longest) if packing else micro * longest[0]
    if not packing:  # padded to the longest in the batch: about the mean of the longest of `micro` draws
        typical = micro * min(longest[0], 1.5 * sum(lengths) / len(lengths))
    return worst, typical


def plan_batches(effective: int, lengths: list[int], packing: bool, dims: dict | None,
                 budget: int | None, in_use: int, trainable: int = 0, checkpointing: bool | None = None) -> dict:
    """The fastest (micro-batch, accumulation, checkpointing) that keeps the effective batch and whose
    estimated peak fits `budget` bytes. `in_use`: bytes the model already holds; `checkpointing`: None to
    choose, or fixed by the user. Without a budget (the CPU) the layout is one micro-batch per step.

    Returns {"micro": m, "accum": a, "checkpointing": bool, "estimate": bytes or None}.
    """
    divisors = [m for m in range(effective, 0, -1) if effective % m == 0]
    if budget is None or not dims or not dims.get("layers"):
        return {"micro": effective, "accum": 1, "checkpointing": bool(checkpointing), "estimate": None}
    optimizer = 16 * trainable  # fp32 gradient + two Adam moments (+ the fp32 master already in in_use)
    fixed = in_use + optimizer + WORKSPACE
    best = None
    for recompute in (False, True) if checkpointing is None else (checkpointing,):
        for micro in divisors:
            worst, typical = micro_batch_tokens(lengths, micro, packing)
            estimate = fixed + activation_bytes(dims, worst, recompute)
            if estimate > SAFETY * budget:
                continue
            accum = effective // micro
            cost = accum * (MICRO_BATCH_OVERHEAD_TOKENS + typical) * (CHECKPOINTING_COST if recompute else 1)
            if best is None or cost < best[0]:
                best = (cost, {"micro": micro, "accum": accum, "checkpointing": recompute, "estimate": estimate})
            break  # smaller micro-batches at this checkpointing setting only cost more
    if best is None:  # nothing fits by the estimate: the smallest layout, and let the allocator say
        recompute = True if checkpointing is None else checkpointing
        worst, _ = micro_batch_tokens(lengths, 1, packing)
        return {"micro": 1, "accum": effective, "checkpointing": recompute,
                "estimate": fixed + activation_bytes(dims, worst, recompute)}
    return best[1]


def gpu_budget(device: str, max_memory=None) -> int:
    """Bytes this process may use on `device`: --max-memory, else the card's memory (times the process's
    memory fraction when one was set), counting what this process already holds as usable."""
    import torch

    index = torch.device(device).index or 0
    total = torch.cuda.get_device_properties(index).total_memory
    fraction = torch.cuda.get_per_process_memory_fraction(index) if hasattr(torch.cuda, "get_per_process_memory_fraction") else 1.0
    free, _ = torch.cuda.mem_get_info(index)
    # Other processes' memory is not ours to plan with; our own reserved-but-free cache is.
    reachable = free + torch.cuda.memory_reserved(index)
    budget = min(total * fraction, reachable)
    limit = parse_memory(max_memory)
    return int(min(budget, limit) if limit else budget)


@contextlib.contextmanager
def no_kv_cache(model):
    """Turn the KV cache off for training. A training forward has no use for it, and with a cache
    transformers does not look for packed sequences (masking_utils checks only when there is none), so
    packed examples would attend to each other: the loss then differs from the padded batch's."""
    config = getattr(model, "config", None)
    previous = getattr(config, "use_cache", None)
    if config is not None:
        config.use_cache = False
    try:
        yield
    finally:
        if config is not None and previous is not None:
            config.use_cache = previous


@contextlib.contextmanager
def bf16_stream(model, dtype):
    """Cast frozen fp32 floating parameters (norms, embeddings, output head) to `dtype` for the run,
    and back afterwards. LoRA weights (trainable) stay fp32 for the optimizer."""
    import torch

    from .training import _frozen_fp32

    cast = _frozen_fp32(model) if dtype is not None and dtype != torch.float32 else []
    for param in cast:
        param.data = param.data.to(dtype)
    try:
        yield len(cast)
    finally:
        for param in cast:
            param.data = param.data.to(torch.float32)


class _Int8DequantLinear:
    """x @ dequant(W)^T with W stored as int8 rows and per-row scales (bitsandbytes' CB, SCB)."""

    _function = None

    @classmethod
    def apply(cls, x, CB, SCB, bias):
        if cls._function is None:
            import torch

            class Function(torch.autograd.Function):
                @staticmethod
                def forward(ctx, x, CB, SCB, bias):
                    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
                    ctx.save_for_backward(CB, SCB)
                    ctx.x_dtype, ctx.dtype = x.dtype, dtype
                    weight = CB.to(dtype).mul_((SCB / 127.0).to(dtype).unsqueeze(1))
                    return torch.nn.functional.linear(x.to(dtype), weight, None if bias is None else bias.to(dtype))

                @staticmethod
                def backward(ctx, grad):
                    CB, SCB = ctx.saved_tensors
                    weight = CB.to(ctx.dtype).mul_((SCB / 127.0).to(ctx.dtype).unsqueeze(1))
                    grad_x = (grad.to(ctx.dtype) @ weight).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
                    return grad_x, None, None, None

            cls._function = Function
        return cls._function.apply(x, CB, SCB, bias)


@contextlib.contextmanager
def dequantized_int8_training(enabled: bool = True):
    """During training on CUDA, compute 8-bit (LLM.int8) layers as bf16 matmuls of their dequantized
    weights. bitsandbytes already does this on CPU and XPU (MatMul8bitFp) because it is faster there; on
    an H200 it is also ~2x faster than the int8 path for training-sized batches (docs/benchmarks.md).
    Outside training (generation) the int8 path is kept."""
    if not enabled:
        yield
        return
    import bitsandbytes as bnb

    original = bnb.matmul

    def matmul(A, B, out=None, state=None, threshold=0.0, bias=None):
        if (state is not None and state.is_training and A.is_cuda and state.CB is not None
                and not state.has_fp16_weights and out is None):
            return _Int8DequantLinear.apply(A, state.CB, state.SCB, bias)
        return original(A, B, out=out, state=state, threshold=threshold, bias=bias)

    bnb.matmul = matmul
    try:
        yield
    finally:
        bnb.matmul = original


def fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / GB:.1f} GB"

