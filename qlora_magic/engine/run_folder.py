"""A run's folder on disk: what a run was, how far it got, and a checkpoint to carry it on from, kept so that
a dead kernel, a dropped Colab runtime or a closed tab loses at most the minutes since the last checkpoint.

    runs/20261202-141500-word_forms/
      run.json         the load and train settings, the data's source and fingerprint, status, the process
      history.jsonl    one row per logged step or evaluation, appended and flushed as it is logged
      data.jsonl       rows given in memory (a list, DataFrame or Dataset), so a new kernel can resume
      checkpoints/step-000120/   the latest checkpoint: an adapter folder (%qlora_load --adapter takes it)
                       plus the Trainer's optimizer, scheduler, RNG and state files
      tensorboard/

A checkpoint is written whole or not at all (folder_writing), and the one before stays until it is.
Under torch.distributed (worker processes, tasks/multi_process.py) only global rank 0 writes the folder: the
other ranks' writes are skipped here, so the training code is the same for every rank.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

DEFAULT_OUTPUT_DIR = "runs"
RECORD_FILE = "run.json"
HISTORY_FILE = "history.jsonl"
DATA_FILE = "data.jsonl"
CHECKPOINTS = "checkpoints"
_CHECKPOINT = re.compile(r"step-(\d+)")
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
ELSEWHERE_SILENT_SECONDS = 600  # a run on another machine that logged nothing for this long has stopped
TRAINER_STATE = "trainer_state.json"  # transformers' name; a checkpoint is complete only with it

#: Statuses a run folder can show. "running" in run.json while the process that wrote it is gone is "crashed";
#: "launched": written for worker processes (tasks/multi_process.py) that have not begun training yet.
STATUSES = ("running", "completed", "interrupted", "failed", "crashed", "launched")


def run_name(data, name: str | None = None) -> str:
    """The run folder's name after its time: `name` if given, else the data file's stem, else "run"."""
    if name is None and isinstance(data, (str, os.PathLike)):
        name = Path(str(data)).stem or Path(str(data)).name
    safe = _NAME_UNSAFE.sub("-", str(name or "run")).strip("-.") or "run"
    return safe[:80]


def data_fingerprint(rows) -> str:
    """A hash of the rows' content (a datasets.Dataset), so a resume can tell the same data from other data."""
    digest = hashlib.sha256()
    for batch in rows.iter(batch_size=1000):
        digest.update(json.dumps(batch, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


class RunFolder:
    """One run's folder (see the module's doc). Writing: `create`, `write_record`/`update`, `append` (history),
    `write_checkpoint`. Reading: `record`, `history`, `latest_checkpoint`, `info`."""

    def __init__(self, path):
        self.path = Path(path)
        self._history = None  # the open history.jsonl while the run writes

    def __repr__(self):
        return f"RunFolder({str(self.path)!r})"

    @classmethod
    def create(cls, output_dir, name: str) -> "RunFolder":
        """A new, empty run folder `output_dir/<time>-<name>` (a suffix when one of that name exists)."""
        from ..config import check_folder

        check_folder(output_dir)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = Path(output_dir).expanduser() / f"{stamp}-{name}"
        for attempt in range(1000):
            path = base if attempt == 0 else base.with_name(f"{base.name}-{attempt + 1}")
            try:
                path.mkdir(parents=True)
                return cls(path)
            except FileExistsError:
                continue
            except OSError as error:
                raise ConfigError(f"Cannot make the run folder {str(path)!r} ({error.strerror or error}): "
                                  "choose another --output-dir.") from None
        raise ConfigError(f"Too many runs named {base.name!r}: give the run another --name.")

    # --- run.json ---------------------------------------------------------------------------------------

    @property
    def record(self) -> dict:
        """run.json as written ({} when there is none, or it cannot be read)."""
        try:
            record = json.loads((self.path / RECORD_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def write_record(self, record: dict):
        """Replace run.json in one rename (a kill leaves the old one or the new one)."""
        if not _writes():
            return
        staging = self.path / f".{RECORD_FILE}.{os.getpid()}"
        with open(staging, "w") as file:
            json.dump(record, file, indent=2, default=str)
            file.flush()
            os.fsync(file.fileno())
        os.replace(staging, self.path / RECORD_FILE)

    def update(self, **fields):
        self.write_record({**self.record, **fields, "updated_at": _now()})

    def mark_running(self, **fields):
        """Say in run.json that this process runs it (so another process can tell a crash from a live run), with
        `fields` (what else the record should say now), in one write."""
        self.update(**fields, status="running", process=_this_process())

    # --- history.jsonl ----------------------------------------------------------------------------------

    def open_history(self, keep: list | None = None):
        """Start appending rows; `keep` (a resume): the rows to keep, the file rewritten to hold just them."""
        if not _writes():
            return
        if keep is not None:
            staging = self.path / f".{HISTORY_FILE}.{os.getpid()}"
            staging.write_text("".join(json.dumps(row, default=str) + "\n" for row in keep))
            os.replace(staging, self.path / HISTORY_FILE)
        self._history = open(self.path / HISTORY_FILE, "a")

    def append(self, row: dict):
        """Add one history row; flushed at once, so a killed process loses none it logged."""
        if not _writes():
            return
        if self._history is None:
            self.open_history()
        self._history.write(json.dumps(row, default=_json_number) + "\n")
        self._history.flush()

    def close(self):
        if self._history is not None:
            self._history.close()
            self._history = None

    def history(self) -> list[dict]:
        """The rows logged so far (a last line cut short by a kill is skipped)."""
        rows = []
        with contextlib.suppress(OSError):
            for line in (self.path / HISTORY_FILE).read_text().splitlines():
                with contextlib.suppress(ValueError):
                    rows.append(json.loads(line))
        return rows

    # --- checkpoints ------------------------------------------------------------------------------------

    def checkpoints(self) -> list[Path]:
        """The complete checkpoints, oldest first."""
        found = []
        with contextlib.suppress(OSError):
            for path in (self.path / CHECKPOINTS).iterdir():
                match = _CHECKPOINT.fullmatch(path.name)
                if match and (path / TRAINER_STATE).exists():
                    found.append((int(match[1]), path))
        return [path for _, path in sorted(found)]

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def write_checkpoint(self, step: int, write_files) -> Path:
        """`write_files(folder)` fills a staging folder that then becomes checkpoints/step-<step>, whole; the
        older checkpoints are removed only after. Returns the checkpoint's path."""
        from .folder_writing import folder_written

        target = self.path / CHECKPOINTS / f"step-{step:06d}"
        if not _writes():
            return target
        older = [path for path in self.checkpoints() if path != target]
        with folder_written(target, "the checkpoint") as staging:
            write_files(staging)
        for path in older:
            shutil.rmtree(path, ignore_errors=True)
        self.update(checkpoint=str(target.relative_to(self.path)), checkpoint_step=step)
        return target

    # --- what it shows ----------------------------------------------------------------------------------

    def status(self, record: dict | None = None) -> str:
        """The run's status; `record`: run.json when the caller has just read it."""
        record = self.record if record is None else record
        status = record.get("status", "crashed")
        if status == "running" and not self._still_running(record.get("process") or {}):
            return "crashed"
        return status

    def _still_running(self, process: dict) -> bool:
        """Whether the process that wrote "running" is alive: the same pid and start time on this host. A run on
        another machine (a Colab runtime writing to Drive) counts as running while it logged in the last minutes."""
        import psutil

        if process.get("host") != socket.gethostname():
            with contextlib.suppress(OSError):
                return time.time() - (self.path / HISTORY_FILE).stat().st_mtime < ELSEWHERE_SILENT_SECONDS
            return False
        try:
            return abs(psutil.Process(process["pid"]).create_time() - process["started"]) < 1
        except (psutil.Error, KeyError, TypeError):
            return False

    def info(self, status: str | None = None, history: list | None = None, step: int | None = None,
             total_steps: int | None = None) -> "RunInfo":
        """What %qlora_runs shows of the run, from its folder; a run of this process passes what its events say
        (status, history, step, total_steps), which is more recent than the files."""
        from ..display.reporters import last_row

        record = self.record
        history = self.history() if history is None else history
        loss, evaluation, checkpoint = last_row(history, "loss"), last_row(history, "eval_loss"), self.latest_checkpoint()
        return RunInfo(
            path=self.path, name=self.path.name, status=status or self.status(record),
            step=max((row.get("step", 0) for row in history), default=0) if step is None else step,
            total_steps=total_steps or record.get("total_steps"),
            loss=loss and loss["loss"], eval_loss=evaluation and evaluation["eval_loss"],
            checkpoint_step=checkpoint_step(checkpoint) if checkpoint else None,
            started_at=record.get("started_at"), updated_at=record.get("updated_at"),
        )


@dataclass
class RunInfo:
    """One line of %qlora_runs: a run folder's name, status, progress and last losses."""

    path: Path
    name: str
    status: str
    step: int
    total_steps: int | None
    loss: float | None
    eval_loss: float | None
    checkpoint_step: int | None
    started_at: str | None
    updated_at: str | None


def list_runs(output_dir=DEFAULT_OUTPUT_DIR) -> list[RunFolder]:
    """The run folders under `output_dir`, newest first (by the time in their names, then their record); none
    when there is no such folder. One line when `output_dir` is no path a file system takes."""
    root = readable_path(output_dir, "--output-dir")
    with contextlib.suppress(OSError):
        folders = [RunFolder(path) for path in root.iterdir() if (path / RECORD_FILE).is_file()]
        return sorted(folders, key=lambda folder: (folder.record.get("started_at") or "", folder.path.name), reverse=True)
    return []


def readable_path(path, what: str) -> Path:
    """`path` as a Path that can be looked at (it need not exist); ConfigError (one line) for a NUL, a lone
    surrogate, ~ of no user or a name too long for the file system."""
    try:
        folder = Path(str(path)).expanduser()
        os.stat(folder)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return folder
    except (ValueError, OSError, RuntimeError) as error:
        raise ConfigError(f"{what} {str(path)!r} is no path a file system takes ({error}): give a folder path.") from None
    return folder


def find_checkpoint(where, output_dir=DEFAULT_OUTPUT_DIR) -> tuple[RunFolder, Path]:
    """The run folder and checkpoint `--resume` means: `where` True (the newest run under `output_dir` that has a
    checkpoint), a run folder (its latest checkpoint), or a checkpoint folder. One line when there is none."""
    if where is True:
        for folder in list_runs(output_dir):
            checkpoint = folder.latest_checkpoint()
            if checkpoint is not None:
                return folder, checkpoint
        raise ConfigError(f"No run under {str(output_dir)!r} has a checkpoint to resume: give --resume the run folder, "
                          "or --output-dir the folder that holds your runs.")
    path = readable_path(where, "--resume")
    if (path / TRAINER_STATE).is_file() and path.parent.name == CHECKPOINTS:
        return RunFolder(path.parent.parent), path
    if (path / RECORD_FILE).is_file():
        folder = RunFolder(path)
        checkpoint = folder.latest_checkpoint()
        if checkpoint is None:
            raise ConfigError(f"The run {str(path)!r} stopped before its first checkpoint: nothing to resume; train it again.")
        return folder, checkpoint
    raise ConfigError(f"--resume {str(where)!r} is not a run folder (no {RECORD_FILE} there): give a folder under "
                      f"{DEFAULT_OUTPUT_DIR}/, or --resume alone for the latest run.")


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a checkpoint folder (checkpoints/step-000120) holds."""
    return int(_CHECKPOINT.fullmatch(checkpoint.name)[1])


def _writes() -> bool:
    """Whether this process writes run folders: always, but for the ranks other than 0 of distributed workers."""
    from .distributed import world

    return world().is_writer


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def _json_number(value):
    """history rows hold plain floats; a tensor or numpy number that slipped in is written as a number."""
    with contextlib.suppress(TypeError, ValueError):
        return float(value)
    return str(value)


def _this_process() -> dict:
    import psutil

    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time()}
