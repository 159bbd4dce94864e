"""Which run `%qlora_attach RUN` / `%qlora_stop RUN` mean, and the table `%qlora_runs` shows: this process's
background runs (tasks/live_runs.py) and the run folders under an output folder (engine/run_folder.py).

RUN is a run folder's name (20261202-141500-word_forms), a start or end of one that only it has
(141500, word_forms), or a run folder's path; none: this kernel's newest background run, else the newest run
folder. A name that matches none, or several, is one line that lists the runs there are."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from ..display.formatting import html_grid, text_grid
from ..engine.run_folder import DEFAULT_OUTPUT_DIR, RECORD_FILE, RunFolder, RunInfo, list_runs, readable_path
from ..errors import ConfigError
from .live_runs import STOP_WITH, live_runs
from .run_handle import RunHandle

NAMES_SHOWN = 6  # in a one-line error, the runs listed before "... and N more"


def find_run(run=None, output_dir=None) -> RunHandle:
    """The run `run` names (see the module's doc), as a RunHandle; ConfigError (one line) when there is none."""
    output_dir = output_dir or DEFAULT_OUTPUT_DIR
    runs = _runs(output_dir)
    if run is None:
        if not runs:
            raise ConfigError(f"No runs yet: none in this kernel and no run folder under {str(output_dir)!r}; "
                              "%%qlora_train makes one (--output-dir names another folder).")
        return runs[0]
    text = str(run)
    path = readable_path(text, "The run")
    if (path / RECORD_FILE).is_file():
        return next((handle for handle in runs if _same(handle.folder.path, path)), None) or RunHandle(RunFolder(path))
    exact = [handle for handle in runs if handle.name == text]
    found = exact or [handle for handle in runs if handle.name.startswith(text) or handle.name.endswith(text)]
    if len(found) == 1 or exact:  # an exact name in two folders: this kernel's run, listed first
        return found[0]
    names = [handle.name for handle in runs]
    if found:
        raise ConfigError(f"{text!r} matches {len(found)} runs ({_listed([h.name for h in found])}): give more of its name.")
    if not runs:
        raise ConfigError(f"No run {text!r}: none in this kernel and no run folder under {str(output_dir)!r} "
                          "(--output-dir names another folder, or give the run folder's path).")
    raise ConfigError(f"No run {text!r} in this kernel or under {str(output_dir)!r}; there are {_listed(names)}: "
                      "give a name, its start or end, or a run folder's path.")


def _runs(output_dir) -> list[RunHandle]:
    """This kernel's background runs (newest first), then the other run folders under `output_dir` (newest first)."""
    live = [RunHandle(run.folder, run) for run in live_runs()]
    on_disk = [RunHandle(folder) for folder in list_runs(output_dir)
               if not any(_same(folder.path, handle.folder.path) for handle in live)]
    return live + on_disk


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:NAMES_SHOWN])
    return shown + (f" and {len(names) - NAMES_SHOWN} more (%qlora_runs lists them)" if len(names) > NAMES_SHOWN else "")


def runs_table(output_dir=None) -> "RunsTable":
    """What `%qlora_runs` shows: this kernel's background runs first (marked *), then the run folders under
    `output_dir`, each with its status, step, last losses, checkpoint and start."""
    output_dir = output_dir or DEFAULT_OUTPUT_DIR
    handles = _runs(output_dir)
    return RunsTable(str(output_dir), [handle.info() for handle in handles],
                     [handle.name for handle in handles if handle.live is not None])


@dataclass(repr=False)
class RunsTable:
    """Runs: name, status, step/total, last loss and eval loss, checkpoint step, when it started."""

    output_dir: str
    runs: list[RunInfo]
    live: list[str]  # the names of this kernel's background runs

    header = ["", "run", "status", "step", "loss", "eval loss", "checkpoint", "started"]

    def __getitem__(self, name) -> RunInfo:
        return next(info for info in self.runs if info.name == name)

    @property
    def names(self) -> list[str]:
        return [info.name for info in self.runs]

    def _title(self):
        return f"Runs (this kernel's, then {self.output_dir}/)" if self.live else f"Runs in {self.output_dir}/"

    def _cells(self):
        return [["*" if info.name in self.live else "", info.name, info.status,
                 f"{info.step}/{info.total_steps}" if info.total_steps else str(info.step),
                 _number(info.loss), _number(info.eval_loss),
                 "-" if info.checkpoint_step is None else f"step {info.checkpoint_step}", _when(info.started_at)]
                for info in self.runs]

    def _note(self) -> str:
        if not self.runs:
            return f"No runs yet: %%qlora_train makes a run folder under {self.output_dir}/."
        mark = "* this kernel's background runs. " if self.live else ""
        return f"{mark}%qlora_attach RUN shows a run; {STOP_WITH} RUN stops one of this kernel's."

    def __repr__(self):
        table = text_grid(self._title(), self.header, self._cells()) if self.runs else self._title()
        return f"{table}\n  {self._note()}"

    def _repr_html_(self):
        import html

        table = html_grid(self._title(), self.header, self._cells()) if self.runs else f"<b>{html.escape(self._title())}</b>"
        return f"{table}<p style='color:#555'>{html.escape(self._note())}</p>"


def _number(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _when(started_at) -> str:
    try:
        return datetime.datetime.fromisoformat(started_at).strftime("%Y-%m-%d %H:%M")
    except (TypeError, ValueError):
        return "-"

