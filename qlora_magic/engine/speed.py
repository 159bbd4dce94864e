"""How a training run is made fast: the batch layout chosen from the memory there is, and two GPU paths
that leave the model's numbers alone but skip work.

Measured on an H200 with a Llama-2-7B-shaped model (docs/benchmarks.md), what pays, biggest first:

- packing (no pad token is computed; position ids restart per example, so attention stays inside it),
- one big micro-batch instead of gradient accumulation (a quantized weight is dequantized once per
  micro-batch forward and once per backward, so fewer micro-batches means fewer dequantizations),
- no gradient checkpointing unless the memory estimate needs it (it recomputes the forward: ~1/3 more),
- a bf16 residual stream: `prepare_model_for_kbit_training` casts norms and embeddings to fp32 (a habit
  from fp16, where it avoids overflow); with bf16 every elementwise op then moves twice the bytes (the load
  now keeps them bf16 on bf16 GPUs; `bf16_stream` casts a model that has them in fp32 for the run),
- 8-bit weights dequantized to bf16 for a plain matmul during training, instead of LLM.int8's
  activation quantization and outlier split (the same stored weights, computed more exactly),
- the loss computed from the final hidden states in chunks of tokens, so the fp32 logits (14 bytes per
  token and vocabulary entry at the loss's backward: 0.45 MB/token for a 32k vocabulary, two thirds of
  what a checkpointed 7B step holds) never exist for the whole batch.

Everything here is pure Python except the two context managers, so the choices are testable on a CPU.
"""

from __future__ import annotations

import contextlib
import math
import random
import re
from dataclasses import dataclass

from ..config import parse_memory
from ..display.formatting import gb
from ..errors import ConfigError

# Sizes of buffers and measured peaks (binary, as the allocator counts them); what users read is decimal (gb()).
GiB = 1024**3
MiB = 1024**2
# Activation memory, calibrated on an H200 with a Llama-2-7B shape, LoRA r=8 on q/v and the bf16 residual
# stream (docs/benchmarks.md): peak allocated minus the model, at the largest micro-batch a run saw (its tokens
# recomputed from the benchmark's data and the Trainer's sampler order), or with every example at max length.
# Without checkpointing, ~165 KB per token and layer: A x hidden + B x intermediate (168 KB at the 7B shape).
ACT_HIDDEN, ACT_INTERMEDIATE = 25, 6
# Attention over a packed micro-batch with SDPA keeps a (tokens x tokens) mask: 1 byte per query-key pair,
# plus a 2-byte bias per layer saved for its backward (the peak grew with the square of the micro-batch's
# length: 5.37 MB/token at 4,138 tokens, 5.65 at 8,192).
MASK_BYTES, MASK_BYTES_PER_LAYER = 1, 2
# With checkpointing each layer keeps only its input (bf16, 2 x hidden) and one layer at a time is recomputed
# with its backward's temporaries: measured 1.2-1.3 x a layer's activations (with its mask bias) on the 7B shape,
# up to 1.46 x on a 3B shape with a wide MLP (Qwen2.5-3B: intermediate 5.4 x hidden; benchmarks/memory_shapes.py).
CKPT_HIDDEN = 2
RECOMPUTE = 1.5
# The same recompute with the checkpoints in CPU memory and the layer's forward compiled (fused elementwise work
# keeps fewer temporaries): on the 7B shape 1.06 x a layer's activations per token against 1.30 uncompiled
# (16x1 with token caps of 512-4,096 forced, H200, benchmarks/peers.py --caps; docs/benchmarks.md). The same
# margin over the measurement as RECOMPUTE's (1.5 / 1.30), for the wider-MLP shapes.
COMPILED_RECOMPUTE = 1.25
# The loss: the model's own keeps bf16 logits, their fp32 copy, log-softmax and its gradient at once (14 bytes
# per token and vocabulary entry; 0.45 MB/token at a 32k vocabulary); the chunked loss keeps the hidden states
# and their gradient (bf16) plus one chunk of logits at a time (rows of 12 bytes per vocabulary entry: the bf16
# logits, their fp32 copy turned into probabilities in place, and those in bf16; _loss_chunk_rows keeps a chunk
# under half of CHUNK_BYTES).
LOGIT_BYTES = 14
CHUNKED_HIDDEN = 4
CHUNK_BYTES = 256 * MiB
CUBLAS_WORKSPACE = 64 * MiB
# A packed micro-batch's length is rounded up to a multiple of this (a pad segment of its own, no loss).
# Every new length costs the GPU a first-time setup: on the 7B shape (H200, 30 steps, the first run after
# loading) 0.68 s/step with every length new, 0.41 rounded to 128, 0.39 to 256, 0.37 to 512, and 0.36-0.37
# once all lengths had been seen. The pad costs nothing measurable (a micro-batch's time hardly depends on its
# length there) and up to 511 tokens of activations, which the memory plan counts. docs/benchmarks.md.
PACKED_LENGTH_MULTIPLE = 512
# What the plan leaves free of the budget for the allocator's fragmentation (reserved above allocated): measured
# 0.15-0.92 GB on five shapes, 9-18% of the activations (benchmarks/memory_shapes.py). The headroom is
# HEADROOM_SHARE of the activations, at least HEADROOM_MIN, and never more than 1 - SAFETY of the budget (a
# large budget's plans stay as they were measured).
SAFETY = 0.9
HEADROOM_SHARE = 0.2
HEADROOM_MIN = 256 * MiB
LOSS_ROW_BYTES = 12
# On the 7B shape a micro-batch costs ~0.3 s whatever its size between 800 and 3,500 tokens (the GPU
# waits on kernel launches and dequantization, not on arithmetic), about what 8,192 tokens cost at full
# speed: so fewer, bigger micro-batches win, and checkpointing (x1.37 measured) beats a split in two.
MICRO_BATCH_OVERHEAD_TOKENS = 8192
CHECKPOINTING_COST = 4 / 3  # the forward runs twice (1.37x measured)
# Checkpointing with the layers' saved inputs in (pinned) CPU memory: copied out in the forward and back in the
# backward, 2 x hidden bytes per token and layer each way. 7B, 16x1 on an H200: 0.66 s/step against 0.50, peak
# 5.2 GB against 6.3. Chosen only when nothing fits without it: the copies cost more where the host link is slower.
OFFLOAD_COST = 1.32
HOST_SHARE = 0.5  # offload into at most this share of the CPU memory available when the run starts
# Each decoder layer compiled (regional compilation: one graph for all the layers, their weights its inputs)
# fuses the norms, rotary embedding, activations and casts that were 40% of the GPU's busy time on the 7B shape
# in 4,935 kernel launches a step (benchmarks/profile_step.py). H200, a fresh process each
# (benchmarks/compile_lever.py): 0.292 s/step against 0.365 (1.25x), 20.9 GB peak against 25.9; the cold
# compile adds ~23 s once (a second run in the kernel reuses it), won back after ~300 steps of a 7B model
# (later on a smaller one, whose steps save less), so by default only for long runs.
COMPILE_MIN_STEPS = 500


@dataclass(frozen=True)
class BatchLayout:
    """How the effective batch is split: `micro` examples per forward, `accum` forwards per optimizer step.
    Reads "4x4" (micro x accum), as the run's settings show it."""

    micro: int
    accum: int

    def __str__(self):
        return f"{self.micro}x{self.accum}"

    @classmethod
    def of(cls, value) -> BatchLayout:
        """A BatchLayout, or its "4x4" form (how benchmarks and tests write an override)."""
        if isinstance(value, cls):
            return value
        match = re.fullmatch(r"\s*([1-9]\d*)\s*x\s*([1-9]\d*)\s*", str(value))
        if not match:
            raise ConfigError(f"A batch layout is micro-batch x accumulation steps like '4x4', got {value!r}.")
        return cls(int(match.group(1)), int(match.group(2)))


@dataclass(frozen=True)
class BatchPlan:
    """What plan_batches chose: the layout, whether to checkpoint (and keep the checkpoints in CPU memory:
    `offload`), and the estimated peak (bytes; None without a budget to plan against). `checkpointed_layers`:
    how many layers (the first ones) are checkpointed when not all are (None: all, when checkpointing);
    `max_tokens`: a packed micro-batch longer than this is trained as several forwards of at most this many
    tokens each (None: never split)."""

    layout: BatchLayout
    checkpointing: bool
    estimate: int | None = None
    offload: bool = False
    checkpointed_layers: int | None = None
    max_tokens: int | None = None
    in_use: int = 0  # what the model held when planned (the headroom is a share of the rest)


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


def workspace_bytes(dims: dict) -> int:
    """Memory besides activations: a dequantized copy of the largest weight in the forward and one in the
    backward (bf16), and cuBLAS's workspace. The measured peaks fit with no more than this (docs/benchmarks.md)."""
    return 2 * 2 * dims["hidden"] * max(dims["intermediate"], dims["hidden"]) + CUBLAS_WORKSPACE


def checkpoint_bytes(dims: dict, tokens: int, layers: int | None = None) -> int:
    """The checkpointed layers' saved inputs (bf16; all layers unless `layers`): what offloading moves to CPU memory."""
    return tokens * (dims["layers"] if layers is None else layers) * CKPT_HIDDEN * dims["hidden"]


def activation_bytes(dims: dict, tokens: int, checkpointing: bool, chunked_loss: bool = False,
                     mask_pairs: int | None = None, offload: bool = False, checkpointed_layers: int | None = None,
                     compiled: bool = False) -> int:
    """Estimated activation memory at the peak of one micro-batch of `tokens` tokens (forward + backward).
    `mask_pairs`: query-key pairs in its attention mask (tokens squared when packed into one sequence,
    the default; micro-batch x longest squared when padded). `offload`: the checkpoints wait in CPU memory.
    `checkpointed_layers`: with checkpointing, how many layers are (the first ones; None: all). `compiled`: the
    run compiles the layers (counted where measured: the recompute of offloaded layers, COMPILED_RECOMPUTE).

    The layers that are not checkpointed keep all their activations until the backward reaches them: the peak
    is at the loss's backward with all of them held, or, with checkpointing, while one layer is recomputed (by
    then the later, kept layers are freed)."""
    pairs = tokens * tokens if mask_pairs is None else mask_pairs
    per_layer = ACT_HIDDEN * dims["hidden"] + ACT_INTERMEDIATE * dims["intermediate"]
    if chunked_loss:
        rows = min(tokens, _loss_chunk_rows(dims["vocab"])) if dims.get("vocab") else 0
        loss_per_token, loss_fixed = CHUNKED_HIDDEN * dims["hidden"], rows * LOSS_ROW_BYTES * dims.get("vocab", 0)
    else:
        loss_per_token, loss_fixed = LOGIT_BYTES * dims["vocab"], 0
    checkpointed = 0 if not checkpointing else dims["layers"] if checkpointed_layers is None else checkpointed_layers
    kept = (dims["layers"] - checkpointed) * (tokens * per_layer + pairs * MASK_BYTES_PER_LAYER)
    inputs = 0 if offload else checkpoint_bytes(dims, tokens, checkpointed)
    factor = COMPILED_RECOMPUTE if compiled and offload else RECOMPUTE
    recompute = tokens * factor * per_layer + pairs * MASK_BYTES_PER_LAYER if checkpointed else 0
    return int(inputs + pairs * MASK_BYTES + max(kept + tokens * loss_per_token + loss_fixed, recompute))


def micro_batch_tokens(lengths: list[int], micro: int, packing: bool) -> tuple[int, float]:
    """(worst case, typical) tokens in a micro-batch of `micro` examples (packed: rounded up to
    PACKED_LENGTH_MULTIPLE, as training on the GPU does)."""
    if not lengths:
        return 0, 0.0
    longest = sorted(lengths, reverse=True)[:micro]
    typical = micro * sum(lengths) / len(lengths)
    worst = sum(longest) if packing else micro * longest[0]
    if packing:
        worst += -worst % PACKED_LENGTH_MULTIPLE
        typical += PACKED_LENGTH_MULTIPLE / 2
    if not packing:  # padded to the longest in the batch: about the mean of the longest of `micro` draws
        typical = micro * min(longest[0], 1.5 * sum(lengths) / len(lengths))
    return worst, typical


def mask_pairs(lengths: list[int], micro: int, packing: bool) -> int:
    """Query-key pairs in the worst micro-batch's attention mask: one sequence when packed, else one
    square per padded row. A packed micro-batch of one example is one causal sequence: no mask at all
    (data._RoundedPacking pads it as its continuation)."""
    worst, _ = micro_batch_tokens(lengths, micro, packing)
    if packing:
        return 0 if micro == 1 else worst * worst
    return worst * (worst // micro if micro else 0)


def token_groups(lengths: list[int], max_tokens: int | None) -> list[list[int]]:
    """The examples of a packed micro-batch (their lengths, in order) as groups of indices of at most
    `max_tokens` tokens each, one forward each: filled in order; an example longer than the cap goes alone."""
    groups, used = [[]], 0
    for index, length in enumerate(lengths):
        if groups[-1] and max_tokens and used + length > max_tokens:
            groups.append([])
            used = 0
        groups[-1].append(index)
        used += length
    return groups


def forwards_per_micro_batch(lengths: list[int], micro: int, max_tokens: int | None, draws: int = 32) -> float:
    """How many forwards a micro-batch of `micro` examples drawn from `lengths` takes on average under a token
    cap (token_groups; 1 without a cap). Drawn with a fixed seed, so a plan is the same every time."""
    if not max_tokens or not lengths:
        return 1.0
    rng = random.Random(0)
    return sum(len(token_groups(rng.choices(lengths, k=micro), max_tokens)) for _ in range(draws)) / draws


def plan_batches(effective: int, lengths: list[int], packing: bool, dims: dict | None,
                 budget: int | None, in_use: int, trainable: int = 0, checkpointing: bool | None = None,
                 chunked_loss: bool = False, host_budget: int = 0, compiled: bool = False) -> BatchPlan:
    """The fastest (micro-batch, accumulation, checkpointing) that keeps the effective batch and whose
    estimated peak fits `budget` bytes. `in_use`: bytes the model already holds; `checkpointing`: None to
    choose, or fixed by the user. Without a budget (the CPU) the layout is one micro-batch per step.

    The estimate is for the worst micro-batch the data allows (its longest examples together), not a typical
    one: a plan that fits can never run out of memory later in the run. Three ways keep that worst case from
    dictating a slow plan: checkpointing only as many layers as the budget needs (the first ones; each costs a
    share of a second forward), and, when packed, a token cap (`max_tokens`) under which the rare micro-batch
    over it is trained as several forwards (each costs a micro-batch's overhead). The checkpoints may wait in CPU
    memory (at most `host_budget` bytes of it; OFFLOAD_COST): on a small budget that beats many small forwards.
    A plan fits when its estimate leaves the budget its headroom (fits()). `compiled`: the run compiles its layers.
    """
    divisors = [m for m in range(effective, 0, -1) if effective % m == 0]
    if budget is None or not dims or not dims.get("layers"):
        return BatchPlan(BatchLayout(effective, 1), bool(checkpointing))
    optimizer = 16 * trainable  # fp32 gradient + two Adam moments (+ the fp32 master already in in_use)
    fixed = in_use + optimizer + workspace_bytes(dims)
    layers = dims["layers"]
    longest = max(lengths, default=0)
    shortest_cap = longest + -longest % PACKED_LENGTH_MULTIPLE  # one example is never split
    tokens = {m: micro_batch_tokens(lengths, m, packing) for m in divisors}  # (worst, typical), sorted once each
    pairs_of = {m: mask_pairs(lengths, m, packing) for m in divisors}

    def estimate(micro, checkpointed, offload=False, max_tokens=None):
        worst = tokens[micro][0]
        if max_tokens and max_tokens < worst:  # a capped packed micro-batch: one sequence of <= max_tokens
            worst, pairs = max_tokens, max_tokens * max_tokens if micro > 1 else 0
        else:
            pairs = pairs_of[micro]
        return fixed + activation_bytes(dims, worst, checkpointed > 0, chunked_loss, pairs, offload, checkpointed, compiled)

    def largest_cap(micro, checkpointed, offload):
        """The longest token cap (a multiple of PACKED_LENGTH_MULTIPLE) whose estimate fits, or None."""
        low, high = shortest_cap // PACKED_LENGTH_MULTIPLE, tokens[micro][0] // PACKED_LENGTH_MULTIPLE - 1
        if not packing or micro == 1 or low > high or not ok(estimate(micro, checkpointed, offload, low * PACKED_LENGTH_MULTIPLE)):
            return None
        while low < high:
            middle = (low + high + 1) // 2
            if ok(estimate(micro, checkpointed, offload, middle * PACKED_LENGTH_MULTIPLE)):
                low = middle
            else:
                high = middle - 1
        return low * PACKED_LENGTH_MULTIPLE

    ok = lambda peak: fits(peak, in_use, budget)  # noqa: E731
    if checkpointing is None:
        step = max(1, math.ceil(layers / 16))
        modes = [(k, False) for k in sorted({*range(0, layers, step), layers})]
    else:
        modes = [(layers if checkpointing else 0, False)]
    if checkpointing is not False:
        modes.append((layers, True))
    best = None
    for checkpointed, offload in modes:
        for micro in divisors:
            max_tokens = None
            peak = estimate(micro, checkpointed, offload)
            if not ok(peak):
                max_tokens = largest_cap(micro, checkpointed, offload)
                if max_tokens is None:
                    continue
                peak = estimate(micro, checkpointed, offload, max_tokens)
            worst, typical = tokens[micro]
            worst = min(worst, max_tokens or math.inf)
            if offload and checkpoint_bytes(dims, worst, checkpointed) > host_budget:
                continue
            accum = effective // micro
            forwards = forwards_per_micro_batch(lengths, micro, max_tokens)
            cost = (accum * (forwards * MICRO_BATCH_OVERHEAD_TOKENS + typical + (forwards - 1) * PACKED_LENGTH_MULTIPLE / 2)
                    * (1 + (CHECKPOINTING_COST - 1) * checkpointed / layers) * (OFFLOAD_COST if offload else 1))
            if best is None or cost < best[0]:
                partial = checkpointed if 0 < checkpointed < layers else None
                best = (cost, BatchPlan(BatchLayout(micro, accum), checkpointed > 0, peak, offload, partial, max_tokens, in_use))
    if best is None:  # nothing fits by the estimate: the smallest layout, and let the allocator say
        recompute = True if checkpointing is None else checkpointing
        checkpointed = layers if recompute else 0
        offload = recompute and checkpoint_bytes(dims, tokens[1][0]) <= host_budget
        return BatchPlan(BatchLayout(1, effective), recompute, estimate(1, checkpointed, offload), offload, in_use=in_use)
    return best[1]


def smaller_layout(settings: dict) -> dict | None:
    """After a step ran out of memory: the changes to `settings` that use less, the effective batch kept.
    First smaller micro-batches (half, or the largest divisor of the effective batch below half: accumulation
    rises), then gradient checkpointing (of every layer), then the checkpoints in CPU memory; None when the
    smallest layout is already in use."""
    batch = settings["batch"]
    effective = batch.micro * batch.accum
    micro = next((m for m in range(batch.micro // 2, 0, -1) if effective % m == 0), None)
    if micro is not None:
        return {"batch": BatchLayout(micro, effective // micro)}
    if not settings["gradient_checkpointing"] or settings.get("checkpointed_layers") is not None:
        return {"gradient_checkpointing": True, "checkpointed_layers": None}
    if not settings.get("offload_checkpoints") and settings.get("device", "").startswith("cuda"):
        return {"offload_checkpoints": True}  # a compiled run stays compiled: inside the offloading hooks
    return None


def headroom(estimate: int, in_use: int, budget: int) -> int:
    """Bytes a plan of `estimate` leaves free of `budget` for fragmentation: HEADROOM_SHARE of what it adds to
    the model's `in_use`, at least HEADROOM_MIN, at most 1 - SAFETY of the budget."""
    return int(min((1 - SAFETY) * budget, max(HEADROOM_MIN, HEADROOM_SHARE * (estimate - in_use))))


def fits(estimate: int, in_use: int, budget: int) -> bool:
    return estimate + headroom(estimate, in_use, budget) <= budget


def smallest_budget(estimate: int, in_use: int) -> int:
    """The smallest budget a plan of `estimate` fits (fits()), rounded up to 0.1 GB."""
    needed = min(estimate / SAFETY, estimate + max(HEADROOM_MIN, HEADROOM_SHARE * (estimate - in_use)))
    return int(math.ceil(needed / 1e8) * 1e8)


def plan_fits(plan: BatchPlan, budget: int | None) -> bool:
    """Whether the plan's estimated peak leaves the budget its headroom."""
    return budget is None or plan.estimate is None or fits(plan.estimate, plan.in_use, budget)


def check_budget(plan: BatchPlan, budget: int | None, in_use: int, lengths: list[int], given: bool,
                 four_bit: bool = False):
    """One line, before training, when a --max-memory budget (`given`) cannot be met: the model alone is over
    it, or even the smallest layout's estimate is. It says the smallest budget that works and what else to
    change. Without --max-memory (the card's memory) the run goes ahead and the settings say it is over."""
    if not given or plan_fits(plan, budget):
        return
    needed = smallest_budget(plan.estimate, in_use)
    longest = f" (the longest example is {max(lengths)} tokens)" if lengths else ""
    if not fits(in_use, in_use, budget):
        why = f"the model alone takes {gb(in_use)}"
    else:
        layout = f"micro-batch {plan.layout.micro}" + (" with gradient checkpointing" if plan.checkpointing else "")
        layout += " in CPU memory" if plan.offload else ""
        why = f"the model takes {gb(in_use)} and training it at the smallest layout ({layout}) about {gb(plan.estimate)} in all"
    bits = "" if four_bit else ", or load the model with --bits 4"
    raise ConfigError(f"--max-memory {gb(budget)} is too small: {why}. Give --max-memory {gb(needed)} or more, "
                      f"or lower --max-length{longest}{bits}.")


def memory_plan_text(plan: BatchPlan, budget: int | None, four_bit: bool = False) -> str:
    """The settings row's memory_plan: the estimate against the budget, and what is wrong with the plan when
    something is: over the budget (the card's: it runs, a step out of memory splits the micro-batch), or the
    slowest layout (one example per micro-batch with checkpointing: on a 7-8B model slower than the course's
    4x4 recipe, which the user should hear rather than find out)."""
    text = f"{gb(plan.estimate)} of {gb(budget)}"
    if not plan_fits(plan, budget):
        return text + " (more than fits: a step out of memory makes the micro-batch smaller)"
    if plan.layout.micro == 1 and plan.layout.accum > 1 and plan.checkpointing:
        faster = "more memory" + ("" if four_bit else " or --bits 4")
        return text + (f" (the slowest layout: {plan.layout.accum} micro-batches of one example a step, "
                       f"with gradient checkpointing; {faster} trains faster)")
    return text


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


def host_budget() -> int:
    """CPU memory the checkpoints may be offloaded into: a share of what is available now (the data, the
    DataLoader and the notebook need the rest)."""
    import psutil

    return int(HOST_SHARE * psutil.virtual_memory().available)


def offloaded_checkpoint(function, *args, **kwargs):
    """torch's checkpoint (non-reentrant, as the Trainer's) whose saved inputs, the only activations a
    checkpointed layer keeps, wait in CPU memory (pinned on CUDA, so the copies are fast) until the backward
    recomputes the layer. Tensors saved inside the layer are the checkpoint's own (recomputed, not stored)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    kwargs.setdefault("use_reentrant", False)
    with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
        return checkpoint(function, *args, **kwargs)


def compiled_offloaded_checkpoint(function, *args, **kwargs):
    """`offloaded_checkpoint` of the layer's forward compiled: the offloading hooks stay outside the compiler
    (it cannot trace them: a layer compiled whole breaks its graph there), the layer's work inside it. Dynamo
    caches by code, so all layers share one compiled forward, as `compiled_layers` does."""
    import torch

    return offloaded_checkpoint(torch.compile(function), *args, **kwargs)


def arrange_checkpoints(model, layers: int | None = None, offload: bool = False, compiled: bool = False) -> int:
    """Once checkpointing is on (the Trainer turns it on when training starts, with torch's own checkpoint):
    keep it on the first `layers` checkpointed layers only (None: all), the rest keeping their activations
    (faster: no second forward), and with `offload` make the checkpointed ones keep their saved input in CPU
    memory, their forward compiled inside the offloading hooks when the run is `compiled`. Returns how many
    layers stay checkpointed."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    # The layers, not the model that holds them (it carries the same flag).
    checkpointed = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)
                    and getattr(m, "gradient_checkpointing", False) and callable(getattr(m, "_gradient_checkpointing_func", None))]
    keep = len(checkpointed) if layers is None else layers
    for layer in checkpointed[keep:]:
        layer.gradient_checkpointing = False
    if offload:
        for layer in checkpointed[:keep]:
            layer._gradient_checkpointing_func = compiled_offloaded_checkpoint if compiled else offloaded_checkpoint
            # A layer compiled whole (compiled_layers) would take the offloading hooks into its graph, which the
            # compiler cannot trace; also when the out-of-memory back-off turns offloading on mid-run.
            layer._compiled_call_impl = None
    return min(keep, len(checkpointed))


def should_compile(asked: bool | None, steps: int) -> bool:
    """Whether to compile the decoder layers for a run on the GPU: as asked, else for runs of COMPILE_MIN_STEPS
    or more. Never where torch.compile cannot run (no Triton: Windows, some old GPUs). With the checkpoints in
    CPU memory too: the layers' forward is then compiled inside the offloading hooks (1.43x at 4.7 GiB on the
    7B shape)."""
    if asked is False or not _can_compile():
        return False
    return bool(asked) or steps >= COMPILE_MIN_STEPS


def _can_compile() -> bool:
    try:
        from torch.utils._triton import has_triton

        return has_triton()
    except Exception:  # noqa: BLE001 - an older torch without the probe: do not compile
        return False


@contextlib.contextmanager
def compiled_layers(model, enabled: bool):
    """Regional compilation for the duration of a run: each decoder layer compiled in place
    (nn.Module.compile), then put back as it was (generation's one-token steps are other shapes, not worth a
    compile). torch.compile caches by code, so a second run in the same kernel does not compile again."""
    if not enabled:
        yield
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        _settle_int8_state(layer)
        layer.compile()
    try:
        yield
    finally:
        for layer in layers:
            layer._compiled_call_impl = None


def _settle_int8_state(module):
    """bitsandbytes moves an 8-bit layer's int8 weight and scales into its matmul state on the layer's first
    call, which changes what a compiled graph guards on: every layer compiled again at the second step (2 graphs
    became 4 for the tiny model). Done here, before compiling, as that first call would do it."""
    import bitsandbytes as bnb

    for m in module.modules():
        if isinstance(m, bnb.nn.Linear8bitLt) and getattr(m.weight, "CB", None) is not None:
            m.init_8bit_state()


ALLOCATOR_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


def use_expandable_segments() -> bool:
    """Let the CUDA caching allocator grow segments in place instead of cutting new ones per shape.

    Packed micro-batches change length every step; with fixed segments the first run after loading spent
    its time in cudaMalloc/cudaFree (7B, --bits 4: 0.86 s/step, 0.49 with this; steady state unchanged).
    The setting applies to segments made from now on, so it is set before the model's weights load.
    A user's own allocator setting wins. Returns whether the setting was made.
    """
    import os

    import torch

    if any(os.environ.get(name) for name in ALLOCATOR_VARIABLES) or not torch.cuda.is_available():
        return False
    # A private hook (torch's own tests use it); its name moved in torch 2.9. Absent or refused: only slower.
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or getattr(torch.cuda.memory, "_set_allocator_settings", None)
    try:
        setter("expandable_segments:True")
    except (TypeError, RuntimeError):
        return False
    return True


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
    """Cast frozen fp32 floating parameters (norms, embeddings, output head) to `dtype` for the run, and
    put the fp32 originals back afterwards, bit for bit. LoRA weights (trainable) stay fp32 for the optimizer.

    The originals wait in CPU memory: each is moved off the device before its `dtype` copy is made, so the
    cast adds no transient to the run's peak (cast in place, the fp32 and bf16 copies of a 128k-vocabulary
    embedding were both on the GPU, ~1 GiB more than the estimate), and casting back does not round the
    frozen weights to bf16 precision."""
    import torch

    cast = _frozen_fp32(model) if dtype is not None and dtype != torch.float32 else []
    originals = []
    try:
        for param in cast:
            device = param.device
            original = param.data.to("cpu", copy=True) if device.type != "cpu" else param.data
            param.data = original  # the device's fp32 copy is freed here, before the smaller one is made
            originals.append(original)
            param.data = original.to(device, dtype=dtype)
        yield len(cast)
    finally:
        for param, original in zip(cast, originals):
            param.data = original.to(param.device)


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


# Causal LMs whose logits are exactly `lm_head(final hidden states)`: no soft-capping or scaling of the
# logits (Gemma 2/3, Cohere, Granite have those) and no auxiliary loss added to the model's own (MoE routers).
CHUNKED_LOSS_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "olmo", "olmo2"}
IGNORE_INDEX = -100


def output_head(model):
    """The frozen, bias-free linear output head of a supported causal LM (or a PEFT wrapper of one), for
    the chunked loss; None when the model's own loss must be used."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if getattr(config, "model_type", None) not in CHUNKED_LOSS_MODEL_TYPES or not type(base).__name__.endswith("ForCausalLM"):
        return None
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None or head.weight.requires_grad:
        return None  # quantized, LoRA-adapted or trained head: the model's own path handles it
    return head


@contextlib.contextmanager
def hidden_states_as_logits(model, head):
    """Stand an identity in for the output head, so the model's forward (its autocast, checkpointing and
    PEFT hooks unchanged) returns the final hidden states where the logits would be."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = next(n for n, child in base.named_children() if child is head)
    setattr(base, name, torch.nn.Identity())
    try:
        yield
    finally:
        setattr(base, name, head)


def _loss_chunk_rows(vocab: int) -> int:
    """Tokens per chunk so that one chunk's logits and their gradient (~12 bytes each) stay near CHUNK_BYTES."""
    rows = 128
    while rows * 2 * LOSS_ROW_BYTES * vocab <= CHUNK_BYTES and rows < 4096:
        rows *= 2
    return rows


class _LinearCrossEntropy:
    """sum over tokens of cross_entropy(hidden @ weight.T, labels), chunk by chunk. The gradient with respect
    to `hidden` is computed in the forward (softmax minus one-hot, times the weight), one chunk of logits at
    a time, and kept: the logits of the whole batch never exist. The same arithmetic as the model's loss
    (a matmul in the compute dtype, then fp32 log-softmax); the weight gets no gradient (it is frozen)."""

    _function = None

    @classmethod
    def apply(cls, hidden, weight, labels, chunk):
        if cls._function is None:
            import torch

            class Function(torch.autograd.Function):
                @staticmethod
                def forward(ctx, hidden, weight, labels, chunk):
                    dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype
                    weight_c = weight.to(dtype)
                    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
                    grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
                    for start in range(0, hidden.shape[0], chunk):
                        h, y = hidden[start:start + chunk], labels[start:start + chunk]
                        logits = torch.nn.functional.linear(h.to(dtype), weight_c).float()
                        lse = torch.logsumexp(logits, dim=-1)
                        total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
                        if grad is not None:
                            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' memory
                            probs[torch.arange(len(y), device=y.device), y] -= 1
                            grad[start:start + chunk] = (probs.to(dtype) @ weight_c).to(hidden.dtype)
                        del logits
                    ctx.save_for_backward(grad)
                    return total

                @staticmethod
                def backward(ctx, grad_total):
                    (grad,) = ctx.saved_tensors
                    return grad * grad_total.to(grad.dtype), None, None, None

            cls._function = Function
        return cls._function.apply(hidden, weight, labels, chunk)


def whole_tensor(tensor):
    """`tensor` as one tensor: FSDP2 leaves weights sharded over the ranks (DTensors), gathered here (a
    collective: every rank calls this at the same point); any other tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def causal_lm_loss(hidden, weight, labels, num_items_in_batch=None):
    """The causal-LM loss transformers computes (labels shifted by one, -100 ignored; summed and divided by
    `num_items_in_batch` when given, else the mean), from the final hidden states (batch, tokens, hidden)
    and the output head's weight, without the batch's logits. Only tokens with a label are computed."""
    import torch

    weight = whole_tensor(weight)  # a head FSDP2 left sharded
    shifted = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
    keep = (shifted != IGNORE_INDEX).nonzero().squeeze(1)
    flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
    total = _LinearCrossEntropy.apply(flat, weight, shifted.index_select(0, keep), _loss_chunk_rows(weight.shape[0]))
    if num_items_in_batch is None:
        return total / max(len(keep), 1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


# --- the layout policy: what a run uses, decided from the device and its memory

def choose_settings(config, device: str, n_train: int, model=None, lengths=None, rank_memory=None) -> dict:
    """Settings the user did not fix, decided from the device and its free memory. Shown in the readout.
    `rank_memory(model, config, budget, host, in_use)`, for worker ranks, returns the memory to plan with
    (distributed.rank_memory).

    The effective batch (batch_size x grad_accum) is kept; how it is split into micro-batches, packing
    and gradient checkpointing are chosen for speed within the memory budget (see speed.py).
    """
    import torch

    on_gpu = device.startswith("cuda")
    effective = config.batch_size * config.grad_accum
    steps_per_epoch = math.ceil(n_train / effective)
    total = config.max_steps or max(1, math.ceil(steps_per_epoch * config.epochs))
    precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if on_gpu else "fp32"
    # Packing computes no pad token; transformers keeps attention inside each example from the
    # restarting position ids (tests/test_speed_settings.py checks the loss equals the padded one).
    # On the CPU neither packing nor a bigger micro-batch paid (the default model's demo ran 6-14%
    # slower than plain 4x4 dynamic padding, docs/benchmarks.md), so there the user's layout is kept.
    packing = on_gpu if config.packing is None else config.packing
    budget = gpu_budget(device, config.max_memory) if on_gpu else None
    in_use = torch.cuda.memory_allocated(device) if on_gpu else 0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if model is not None else 0
    dims = model_dims(model) if model is not None else None
    if on_gpu and precision == "bf16" and model is not None:
        in_use -= sum(p.numel() * 2 for p in _frozen_fp32(model))  # bf16_stream halves them during the run
    # The loss from hidden states in chunks: the batch's fp32 logits never exist (0.45 MB/token on a 7B
    # model, two thirds of a checkpointed step's activations), which lets a memory budget take bigger
    # micro-batches. On the CPU memory is not what limits, so the model's own loss is kept there.
    chunked_loss = on_gpu and model is not None and output_head(model) is not None
    compiled = on_gpu and should_compile(config.compile, total)
    if on_gpu:
        host = host_budget()
        if rank_memory is not None:  # a worker's rank: its shard of FSDP weights, and one plan for all ranks
            budget, host, in_use = rank_memory(model, config, budget, host, in_use)
        plan = plan_batches(effective, list(lengths or []), packing, dims, budget, in_use, trainable,
                            checkpointing=config.gradient_checkpointing, chunked_loss=chunked_loss,
                            host_budget=host, compiled=compiled)
        check_budget(plan, budget, in_use, list(lengths or []), given=config.max_memory is not None,
                     four_bit=bool(getattr(model, "is_loaded_in_4bit", False)))
    else:
        plan = BatchPlan(BatchLayout(config.batch_size, config.grad_accum), bool(config.gradient_checkpointing))
    settings = {
        "device": device,
        "precision": precision,
        "batch": plan.layout,
        "effective_batch": effective,
        "lr": config.lr,
        "steps": total,
        "packing": packing,
        "gradient_checkpointing": plan.checkpointing,
        "chunked_loss": chunked_loss,
    }
    if plan.checkpointed_layers is not None:
        settings["checkpointed_layers"] = plan.checkpointed_layers
    if plan.offload:
        settings["offload_checkpoints"] = True
    if plan.max_tokens is not None:
        settings["max_tokens"] = plan.max_tokens
    if on_gpu:
        settings["optimizer"] = "adamw_torch_fused"  # one kernel for all LoRA tensors
        settings["compile"] = compiled
        if packing:
            settings["pad_packed_to"] = PACKED_LENGTH_MULTIPLE
        settings["memory_plan"] = memory_plan_text(plan, budget, four_bit=bool(getattr(model, "is_loaded_in_4bit", False)))
        settings["bf16_stream"] = precision == "bf16"
        settings["int8_dequant"] = precision == "bf16" and _has_int8_layers(model)
    return settings


def _frozen_fp32(model):
    import torch

    return [p for p in model.parameters() if not p.requires_grad and p.dtype == torch.float32
            and p.__class__.__name__ not in ("Params4bit", "Int8Params")]


def _has_int8_layers(model):
    return model is not None and any(type(m).__name__ == "Linear8bitLt" for m in model.modules())
