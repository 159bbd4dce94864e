"""A worker process of a run folder: `python -m qlora_magic.run RUN_FOLDER`, one per GPU (or CPU process) under
torchrun, which sets RANK, LOCAL_RANK and WORLD_SIZE; the Trainer then trains under torch.distributed (DDP, or
FSDP2 with `--strategy fsdp`).

`%%qlora_train --gpus N` writes the run folder and starts the workers (tasks/multi_process.py); on a cluster the
same folder, on a shared disk, runs on several machines:

    torchrun --nnodes 2 --nproc-per-node 4 --node-rank 0 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m qlora_magic.run /shared/runs/20261203-061500-word_forms

Each worker loads the base model itself, with the adapter the session had when the run was launched (the run
folder's start/ adapter), from the settings in run.json; rank 0 writes the history, checkpoints and status.
A STOP file in the run folder ends every rank after the step in flight. A rank whose step runs out of GPU memory
writes an OUT_OF_MEMORY file (the back-off it needs) and exits; the launcher relaunches every rank from the last
checkpoint with that layout (run.json's launch "backoff")."""

from __future__ import annotations

import os
import sys
from pathlib import Path



def worker_device(record: dict, local_rank: int) -> str:
    """The device this worker trains on: its GPU (cuda:LOCAL_RANK), or the CPU for --processes runs."""
    launch = record.get("launch") or {}
    if launch.get("device") == "cpu":
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    torch.cuda.set_device(local_rank)
    return f"cuda:{local_rank}"


def train_run_folder(path) -> int:
    """Train the run in folder `path` as this worker; returns the exit status (0 when the run completed or
    was stopped)."""
    from . import api
    from .config import TrainConfig
    from .display import choose_reporter
    from .engine.distributed import world
    from .engine.run_folder import RunFolder
    from .session import get_session
    from .tasks.finetune import finetune
    from .tasks.multi_process import START_ADAPTER
    from .tasks.resuming import ResumePoint

    folder = RunFolder(path)
    record = folder.record
    if not record.get("launch"):
        print(f"{path}: no run folder written for workers (run.json with a launch entry); "
              "start one with %%qlora_train --gpus N", file=sys.stderr)
        return 2
    me = world()
    launch = record["launch"]
    device = worker_device(record, me.local_rank)
    saved = TrainConfig.from_dict(record["train_config"])
    data_note = record.get("data") or {}
    data = str(folder.path / data_note["saved"]) if data_note.get("saved") else saved.data
    config = saved.replace(data=data, split="train" if data_note.get("saved") else saved.split, display="none",
                           output_dir=str(folder.path.parent), strategy=launch.get("strategy"),
                           **({"processes": me.size} if launch.get("device") == "cpu" else {"gpus": me.size}))
    resume_from = launch.get("resume_from")
    start = folder.path / resume_from if resume_from else folder.path / START_ADAPTER
    from .engine.loading import stored_for_sharding

    with stored_for_sharding(launch.get("strategy") == "fsdp", host=launch.get("load") == "host"):
        api.load(adapter=str(start), device=device)
    session = get_session()
    reporter = choose_reporter("none")
    backoff = launch.get("backoff")  # a relaunch after a rank ran out of memory: the smaller layout it needs
    if resume_from:
        from .engine.data import load_rows

        point = ResumePoint(folder, folder.path / resume_from, config, load_rows(config.data, config.split))
        summary = finetune(session, config, reporter=reporter, resume=point, overrides=backoff)
    else:
        summary = finetune(session, config, reporter=reporter, run_folder=folder, overrides=backoff)
    if me.is_writer:
        print(f"rank 0: the run ended {summary.status} at step {summary.steps_done}/{summary.steps_planned}", flush=True)
        if launch.get("strategy") == "fsdp":  # the proof that FSDP2 sharded the model, for the log and benchmarks
            print(f"rank 0: {_sharded_modules(session.model)} modules sharded by FSDP2", flush=True)
    if str(device).startswith("cuda"):  # each rank's peak, for the log and benchmarks/multi_gpu.py
        import torch

        print(f"rank {me.rank}: peak GPU memory allocated {torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB", flush=True)
    return 0


def _sharded_modules(model) -> int:
    """How many of the model's modules FSDP2's fully_shard turned into FSDPModules (it changes their class)."""
    from torch.distributed.fsdp import FSDPModule

    return sum(isinstance(module, FSDPModule) for module in model.modules()) if model is not None else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return train_run_folder(Path(argv[0]))
    finally:
        _leave_process_group()


def _leave_process_group():
    import contextlib

    with contextlib.suppress(Exception):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
