"""Run folders for training runs, and carrying a run on from its latest checkpoint (`%qlora_train --resume`).

A run's folder (engine/run_folder.py) is made as the run starts: run.json says how the model was loaded, how
the run was set up and which rows it trains on (their fingerprint; rows given in memory are copied to
data.jsonl), so a new kernel can load the same base and go on from the checkpoint with nothing else given.
Everything a resume needs is checked before any model is loaded."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from ..config import TrainConfig
from ..engine.run_folder import (DATA_FILE, DEFAULT_OUTPUT_DIR, RunFolder, checkpoint_step, data_fingerprint,
                                 find_checkpoint, run_name)
from ..engine.training import Checkpointing
from ..errors import ConfigError

#: In-memory rows larger than this (as Arrow holds them) are not copied into the run folder; a resume then
#: needs them given again.
MAX_SAVED_ROWS_BYTES = 512 * 2**20
#: What `--resume` may set; the rest is the run's own setup.
RESUME_OPTIONS = ("data", "resume", "output_dir", "display", "background", "checkpoint_minutes")


def start_run_folder(session, config: TrainConfig, rows, run, index: int) -> Checkpointing:
    """Make the run's folder and write run.json; returns how the run keeps it (Checkpointing)."""
    from .._version import __version__
    from ..engine.adapter_folder import load_record

    folder = RunFolder.create(config.output_dir or DEFAULT_OUTPUT_DIR, run_name(config.data, config.name))
    data = {"source": run.source.to_json(), "rows": len(rows), "fingerprint": data_fingerprint(rows), "saved": None}
    if not isinstance(config.data, (str, os.PathLike)):
        data["saved"] = _save_rows(rows, folder)
    # "running" until the run ends (a kill leaves it so: "crashed" once this process is gone)
    folder.mark_running(**{
        "qlora_magic_version": __version__,
        "name": folder.path.name,
        "started_at": datetime.datetime.now().isoformat(timespec="seconds"),
        "load_config": load_record(session.load_config),
        "train_config": run.to_json(),
        "run_index": index,
        "data": data,
    })
    return Checkpointing(folder, config.checkpoint_minutes or None, _checkpoint_extras(session, run, index))


def continue_run_folder(session, config: TrainConfig, folder: RunFolder, run, index: int) -> Checkpointing:
    """How a run keeps the folder another process made for it (a worker of tasks.multi_process): its run.json
    is the launcher's; the history starts empty."""
    folder.open_history(keep=[])
    return Checkpointing(folder, config.checkpoint_minutes or None, _checkpoint_extras(session, run, index))


def _save_rows(rows, folder: RunFolder) -> str | None:
    """Copy in-memory rows to data.jsonl (None when they are too large, or hold values JSON cannot)."""
    from ..engine.quiet import no_progress_bars

    if rows.data.nbytes > MAX_SAVED_ROWS_BYTES:
        return None
    try:
        with no_progress_bars():
            rows.to_json(str(folder.path / DATA_FILE), lines=True, force_ascii=False)
    except (TypeError, ValueError, OSError):
        (folder.path / DATA_FILE).unlink(missing_ok=True)
        return None
    return DATA_FILE


def _checkpoint_extras(session, run, index: int):
    """What a checkpoint holds beside the Trainer's files: the tokenizer, and the run record with this run in
    it (so the checkpoint loads as an adapter folder, its runs and history restored)."""
    from ..engine.adapter_folder import run_record, write_beside_adapter

    def write(folder: Path):
        write_beside_adapter(session, folder, run_record(session, session.runs[:index] + [run]))

    return write


@dataclass
class ResumePoint:
    """A run to carry on: its folder, the checkpoint, its own TrainConfig (data to load again) and the rows."""

    folder: RunFolder
    checkpoint: Path
    config: TrainConfig
    rows: object  # datasets.Dataset, checked to be the rows the run started with

    @property
    def step(self) -> int:
        return checkpoint_step(self.checkpoint)

    def checkpointing(self, session, config: TrainConfig) -> Checkpointing:
        """The run folder kept as before; its history cut back to the checkpoint's step (the steps after it
        are trained again)."""
        self.folder.open_history(keep=[row for row in self.folder.history() if row.get("step", 0) <= self.step])
        index = len(session.runs) - 1
        return Checkpointing(self.folder, config.checkpoint_minutes or None,
                             _checkpoint_extras(session, session.runs[index], index), resume_from=self.checkpoint)


def plan_resume(config: TrainConfig) -> ResumePoint:
    """What `--resume` carries on, checked (the run, its checkpoint, its data) before any model is loaded."""
    from ..engine.data import load_rows

    _check_only_resume_options(config)
    folder, checkpoint = find_checkpoint(config.resume, config.output_dir or DEFAULT_OUTPUT_DIR)
    record, status = folder.record, folder.status()
    if status == "running":
        raise ConfigError(f"The run {folder.path.name!r} is still running: stop it first (%qlora_stop), or wait for it.")
    step, total = checkpoint_step(checkpoint), record.get("total_steps")
    if status == "completed" and total and step >= total:
        raise ConfigError(f"The run {folder.path.name!r} completed all its {total} steps: nothing to resume. Its adapter "
                          f"is in {str(checkpoint)!r} (%qlora_load --adapter takes it); train a new run to go further.")
    try:
        saved = TrainConfig.from_dict(record["train_config"])
        data_note = dict(record["data"])
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"{str(folder.path / 'run.json')!r} cannot be read back ({error}): resume another run.") from None
    if config.data is not None:
        data, split = config.data, saved.split
    elif data_note.get("saved"):
        data, split = str(folder.path / data_note["saved"]), "train"
    elif saved.data is not None:
        data, split = saved.data, saved.split
    else:
        raise ConfigError(f"The run trained on in-memory rows ({data_note.get('source')}) that were too large to keep in "
                          "its folder: give them again (data: $rows) with --resume.")
    rows = load_rows(data, split)
    if data_fingerprint(rows) != data_note.get("fingerprint"):
        raise ConfigError(f"These rows ({len(rows)}) are not the ones the run {folder.path.name!r} started with "
                          f"({data_note.get('rows')} rows, {data_note.get('source')}): resume with the same data, or start a new run.")
    run_config = saved.replace(data=data, display=config.display, checkpoint_minutes=config.checkpoint_minutes,
                               background=config.background)
    return ResumePoint(folder, checkpoint, run_config, rows)


def _check_only_resume_options(config: TrainConfig):
    """--resume goes on with the run's own setup: another value for one of its settings is a mistake to say."""
    defaults = TrainConfig()
    changed = [name for name in config.to_dict() if name not in RESUME_OPTIONS
               and getattr(config, name) != getattr(defaults, name)]
    if changed:
        flags = ", ".join("--" + name.replace("_", "-") for name in changed)
        raise ConfigError(f"--resume goes on with the run's own settings: drop {flags} (a new run, without --resume, "
                          "takes new settings).")
