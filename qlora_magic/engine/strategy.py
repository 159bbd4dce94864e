"""Which torch.distributed strategy a `--gpus N` run takes when the user gave none: ddp when each rank can hold
the whole quantized model and train it (the memory plan of one rank fits the smallest GPU), fsdp when it fits
only with the weights sharded over the ranks, a one-line refusal with the numbers when neither fits.

Decided in the kernel before anything is launched, from the model the session holds (its weight bytes are the
same on any device) and the per-rank share of the effective batch, with speed.plan_batches: the plan that
fits decides, so the smallest layout (micro-batch 1, checkpointing, offload) counts as fitting."""

from __future__ import annotations

from dataclasses import dataclass

from ..display.formatting import gb
from ..errors import ConfigError
from .distributed import fsdp_share
from .speed import BatchPlan, host_budget, model_dims, output_head, plan_batches, plan_fits


@dataclass(frozen=True)
class StrategyChoice:
    """The strategy chosen and why, as the settings row shows it: "ddp (auto: fits one GPU)"."""

    strategy: str
    reason: str

    def __str__(self):
        return f"{self.strategy} ({self.reason})"


def rank_plan(model, weights: int, lengths: list[int], effective: int, budget: int, ranks: int, sharded: bool,
              packing: bool = True, checkpointing: bool | None = None) -> BatchPlan:
    """One rank's memory plan for its share of the effective batch: the whole model's `weights` (bytes) and
    optimizer state (ddp), or a 1/ranks share of them plus one layer gathered whole at a time (FSDP2 unshards a
    layer for its forward and backward)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dims = model_dims(model)
    if sharded:
        weights = fsdp_share(weights, ranks, dims["layers"])
        trainable = -(-trainable // ranks)
    return plan_batches(max(1, effective // ranks), lengths, packing, dims, budget, weights, trainable,
                        checkpointing=checkpointing, chunked_loss=output_head(model) is not None,
                        host_budget=host_budget())


def choose_strategy(model, lengths: list[int], effective: int, budget: int, ranks: int, packing: bool = True,
                    checkpointing: bool | None = None) -> StrategyChoice:
    """ddp when one rank's plan fits `budget` (the smallest GPU's bytes), else fsdp when the sharded plan fits,
    else ConfigError (one line: what each needs, what the GPU has, what to change)."""
    weights = int(model.get_memory_footprint())
    whole = rank_plan(model, weights, lengths, effective, budget, ranks, False, packing, checkpointing)
    if plan_fits(whole, budget):
        return StrategyChoice("ddp", "auto: fits one GPU")
    sharded = rank_plan(model, weights, lengths, effective, budget, ranks, True, packing, checkpointing)
    if ranks > 1 and plan_fits(sharded, budget) and shardable(model):
        return StrategyChoice("fsdp", f"auto: fits only sharded over {ranks} GPUs")
    shards = f", {gb(sharded.estimate)} with the weights sharded over {ranks} GPUs (fsdp)" if ranks > 1 else ""
    fix = "use more GPUs, lower --max-length, or load the model with --bits 4."
    if ranks > 1 and plan_fits(sharded, budget):  # 8-bit layers: only a 4-bit load can be sharded
        fix = "load the model with --bits 4 (fsdp shards 4-bit weights only), or lower --max-length."
    raise ConfigError(
        f"--gpus {ranks}: the model does not fit: its weights take {gb(weights)}, and training at the smallest "
        f"layout needs about {gb(whole.estimate)} per GPU with ddp{shards}; the smallest GPU has {gb(budget)}: {fix}")


def shardable(model) -> bool:
    """Whether FSDP2 can shard the model: 4-bit weights stored as floats (bnb_4bit_quant_storage) flatten with
    the rest, but bitsandbytes' 8-bit weights (--bits 8, and the 8-bit layers of --bits auto) keep their scales
    beside the int8 data, which a shard would lose."""
    import bitsandbytes as bnb

    return bool(getattr(model, "is_loaded_in_4bit", False)) and not any(
        isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())
