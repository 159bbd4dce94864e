"""Training under torch.distributed (worker processes started by torchrun, one per GPU or, with gloo, per CPU
process): who this process is, how the effective batch is split over the ranks, and a stop every rank takes
at the same step.

The Trainer does the distributed work itself (DDP, or FSDP through accelerate) when the process was started by
torchrun (RANK, LOCAL_RANK, WORLD_SIZE in the environment); this module holds only what qlora_magic adds."""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from ..errors import ConfigError
from .speed import BatchLayout, model_dims

STOP_FILE = "STOP"  # in the run folder: the launcher's Stop (every rank ends after the step in flight)
OUT_OF_MEMORY_FILE = "OUT_OF_MEMORY"  # in the run folder: a rank ran out of memory, and the back-off it needs
OUT_OF_MEMORY_EXIT = 75  # a worker's exit status after it wrote OUT_OF_MEMORY_FILE
# The settings speed.smaller_layout changes: a relaunch after an out-of-memory step fixes them all.
BACKOFF_KEYS = ("batch", "gradient_checkpointing", "checkpointed_layers", "offload_checkpoints")


@dataclass(frozen=True)
class World:
    """This process among the workers: its global rank, its rank on this machine, how many there are."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    launched: bool = False  # started by torchrun (a worker of a run folder), even as its only rank

    @property
    def is_writer(self) -> bool:
        """Only global rank 0 writes the run folder (run.json, history, checkpoints)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """This process's place, from the variables torchrun sets (none: a single process)."""
    def number(name, default):
        try:
            return int(os.environ.get(name, default))
        except ValueError:
            return default

    return World(number("RANK", 0), number("LOCAL_RANK", 0), max(1, number("WORLD_SIZE", 1)), "WORLD_SIZE" in os.environ)


#: Set on a model an FSDP worker loaded into CPU memory (loading.stored_for_sharding(host=True)): the GPU it
#: trains on, where FSDP2 moves its shards when the Trainer wraps it.
TRAINS_ON = "qlora_trains_on"


def training_device(model) -> str:
    """The device a run of `model` trains on: where its parameters are, or the GPU a host-loaded FSDP worker's
    model is waiting in CPU memory for."""
    return getattr(model, TRAINS_ON, None) or str(next(model.parameters()).device)


def fsdp_share(weights: int, ranks: int, layers: int) -> int:
    """The weight bytes one FSDP2 rank holds on its GPU: a 1/ranks share, and one layer gathered whole at a time."""
    return weights // ranks + weights // max(1, layers)


def fsdp_weights_change(model) -> int:
    """How the GPU memory an FSDP worker holds before its run changes once the Trainer has sharded its model:
    the whole copy it loaded onto the GPU goes (none when it loaded into CPU memory), its share comes."""
    me = world()
    if not me.launched:
        return 0
    weights = int(model.get_memory_footprint())
    whole = 0 if getattr(model, TRAINS_ON, None) else weights
    return fsdp_share(weights, me.size, model_dims(model)["layers"]) - whole


def per_rank_layout(layout: BatchLayout, ranks: int) -> BatchLayout:
    """The micro-batch and accumulation of each rank that keep the effective batch: micro x accum x ranks =
    layout.micro x layout.accum. The accumulation is divided first (the micro-batch fits memory as planned);
    then the micro-batch; a layout that cannot be split evenly is a one-line error.

    >>> per_rank_layout(BatchLayout(4, 4), 2)
    BatchLayout(micro=4, accum=2)
    """
    if ranks <= 1:
        return layout
    effective = layout.micro * layout.accum
    if effective % ranks:
        raise ConfigError(f"The effective batch ({layout.micro} x {layout.accum} = {effective}) does not split over "
                          f"{ranks} workers: make batch_size x grad_accum a multiple of {ranks}.")
    share = math.gcd(layout.accum, ranks)
    accum, rest = layout.accum // share, ranks // share
    if layout.micro % rest:
        raise ConfigError(f"The effective batch ({layout.micro} x {layout.accum}) does not split over {ranks} workers: "
                          f"make batch_size x grad_accum a multiple of {ranks}.")
    return BatchLayout(layout.micro // rest, accum)


def agreed_memory(budget: int, host: int, in_use: int) -> tuple[int, int, int]:
    """The memory every rank plans its batch layout with: the smallest GPU budget and host budget of all ranks,
    and the most any rank's model already holds. Each rank plans for itself from the same data; on budgets of
    their own they could choose different layouts (rank 0 shares its GPU with the notebook's kernel, which
    holds its own copy of the model), and ranks whose micro-batch counts differ wait for each other in
    collectives that never come (FSDP reduces at every backward). One all-reduce, before the Trainer, on the
    process group started here when there is none yet (the Trainer then takes it as it is)."""
    if not world().distributed:
        return budget, host, in_use
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():  # as the Trainer would start it (its ddp_timeout's default, 30 min)
        from datetime import timedelta

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(seconds=1800))
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    values = torch.tensor([-budget, -host, in_use], dtype=torch.float64, device=device)  # bytes: exact below 2**53
    dist.all_reduce(values, op=dist.ReduceOp.MAX)  # the max of the negated budgets is their min
    return int(-values[0].item()), int(-values[1].item()), int(values[2].item())


def rank_memory(model, config, budget: int, host: int, in_use: int) -> tuple[int, int, int]:
    """The memory a worker's rank plans with (speed.choose_settings' `rank_memory`): with fsdp, its shard of the
    weights in place of the copy it loaded (fsdp_weights_change); then the budgets all ranks agree on."""
    if model is not None and getattr(config, "strategy", None) == "fsdp":
        in_use += fsdp_weights_change(model)
    return agreed_memory(budget, host, in_use)


def stop_callback(stop, stop_file: Path | None):
    """A TrainerCallback, added after the others, that at each step's end agrees across the ranks (one
    all-reduce of two numbers) on whether to stop (the StopFlag set, or the launcher's STOP file there) and
    whether to write a checkpoint now (a rank's clock asked for one). Every rank then takes the same decision,
    so none waits alone in a collective (the checkpoint's store_flos is one)."""
    from transformers import TrainerCallback

    class AgreeOnStep(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if state.is_world_process_zero:  # the workers' log says how the model is spread
                import torch.distributed as dist

                backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else "none"
                print(f"rank 0: training {type(model).__name__} on {args.world_size} ranks ({backend})", flush=True)

        def on_step_end(self, args, state, control, **kwargs):
            import torch
            import torch.distributed as dist

            asked = bool(stop) or (stop_file is not None and stop_file.exists())
            votes = torch.tensor([float(asked), float(bool(control.should_save))])
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                if dist.get_backend() == "nccl":
                    votes = votes.to(f"cuda:{torch.cuda.current_device()}")
                dist.all_reduce(votes, op=dist.ReduceOp.MAX)
            asked, save = bool(votes[0].item()), bool(votes[1].item())
            if asked:
                stop.set()
                control.should_training_stop = True
            control.should_save = save

    return AgreeOnStep()


def backoff_settings(settings: dict) -> dict:
    """The settings of a back-off (BACKOFF_KEYS) as a relaunch forces them over its own choice (run.json's
    launch "backoff", JSON). The batch is written as the whole effective batch (micro x accum x ranks), which
    per_rank_layout divides back into this rank's micro x accum."""
    kept = {key: settings[key] for key in BACKOFF_KEYS if key in settings}
    batch = settings["batch"]
    kept["batch"] = str(BatchLayout(batch.micro, batch.accum * settings.get("ranks", 1)))
    return kept


def leave_out_of_memory(run_dir: Path, step: int, backoff: dict | None, was: str, now: str | None = None,
                        error: Exception | None = None) -> NoReturn:
    """End this worker after its step ran out of GPU memory: the other ranks wait for it in a collective, which
    only the launcher can end (torchrun ends them when this one exits), and anything more this process did (the
    run's last checkpoint, leaving the process group) would be a collective too, and hang. So the run folder is
    told what the relaunch needs (OUT_OF_MEMORY_FILE: the step, the next back-off's settings, or the one-line
    `error` when there is none left) and the process exits now; the folder keeps its last whole checkpoint."""
    me = world()
    marker = {"rank": me.rank, "step": step, "backoff": backoff, "was": was, "now": now,
              "error": None if error is None else str(error)}
    path = Path(run_dir) / OUT_OF_MEMORY_FILE
    partial = path.with_name(f"{path.name}.{me.rank}.tmp")
    partial.write_text(json.dumps(marker))
    os.replace(partial, path)  # whole, even when two ranks run out at once
    print(f"rank {me.rank}: out of GPU memory at step {step + 1} with {was}; "
          + (f"the launcher relaunches every rank with {now}" if backoff else "no smaller layout is left"),
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(OUT_OF_MEMORY_EXIT)


def read_out_of_memory(run_dir: Path) -> dict | None:
    """The marker a worker left when it ran out of memory (leave_out_of_memory), or None."""
    try:
        return json.loads((Path(run_dir) / OUT_OF_MEMORY_FILE).read_text())
    except (OSError, ValueError):
        return None
