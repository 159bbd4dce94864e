"""A training run as `%%qlora_train --background` and `%qlora_attach` return it: a background run of this
process (live: its Broadcast feeds the view) or a run folder on disk (drawn from history.jsonl; followed every
few seconds while another process runs it).

Displayed in a kernel with ipywidgets it is the run's view (RunView): the whole history so far, then live. Each
display is a view of its own, so a later cell, a reloaded page or another notebook of the same kernel shows the
run again. Elsewhere (a terminal, no ipywidgets) it is a table of the run's status and last losses."""

from __future__ import annotations

import threading
import time

from ..display.formatting import Readout
from ..engine.run_folder import RunFolder, RunInfo
from ..errors import ConfigError
from .live_runs import STOP_WITH, LiveRun

FOLLOW_SECONDS = 2.0  # how often a view re-reads the folder of a run another process trains


class RunHandle(Readout):
    """One run: `status`, `info()` (step, total, losses, checkpoint), `history`, `stop()`, `wait()`, `view()`."""

    title = "Training run"

    def __init__(self, folder: RunFolder, live: LiveRun | None = None):
        self.folder, self.live = folder, live

    @property
    def name(self) -> str:
        return self.folder.path.name

    @property
    def _live_knows_best(self) -> bool:
        """The background thread's events say where the run is (every step, ahead of history.jsonl, and the
        error that ended it), until its folder was written after it ended: a --resume carried the run on."""
        return self.live is not None and not self.live.folder_moved_on()

    @property
    def status(self) -> str:
        return self.live.status if self._live_knows_best else self.folder.status()

    def info(self) -> RunInfo:
        return self.live.info() if self._live_knows_best else self.folder.info()

    @property
    def history(self) -> list[dict]:
        """The run's rows so far (train and eval)."""
        return list(self.live.broadcast.history) if self._live_knows_best else self.folder.history()

    @property
    def summary(self):
        """The TrainSummary of a background run of this process once it ended (None before, or from disk)."""
        return self.live.summary if self.live is not None else None

    @property
    def error(self) -> str | None:
        """The line of the error that ended the run, if one did."""
        if self._live_knows_best:
            return self.live.error
        return self.folder.record.get("error")

    def wait(self, timeout: float | None = None) -> "RunHandle":
        """Block until a background run of this process ended (or `timeout` seconds passed)."""
        if self.live is not None:
            self.live.wait(timeout)
        return self

    def stop(self, wait: bool = True) -> str:
        """Ask the run to stop after the step in flight and, with `wait`, wait until it has (Ctrl-C stops waiting,
        not the stopping); returns one line saying what happened. A run of another process cannot be stopped
        from here (ConfigError: interrupt it there)."""
        info = self.info()
        where = f"step {info.step}/{info.total_steps}" if info.total_steps else f"step {info.step}"
        if self.live is not None and self.live.running:
            self.live.stop()
            if not wait:
                return (f"Stopping {self.name} after the step in flight ({where}); "
                        "the adapter keeps every finished step.")
            try:  # the next cell can use the model: the run has let go of it (a step takes seconds at most)
                while not self.live.wait(0.1):
                    pass
            except KeyboardInterrupt:
                return f"Stopping {self.name} after the step in flight ({where}); %qlora_runs shows when it has."
            info = self.info()
            return (f"Stopped {self.name} at step {info.step}/{info.total_steps or '?'} ({self.live.status}): the adapter "
                    "keeps every finished step; %qlora_train --resume carries the run on.")
        status = self.status
        if status == "running":
            process = self.folder.record.get("process") or {}
            raise ConfigError(f"{self.name} is running in another process (pid {process.get('pid', '?')} on "
                              f"{process.get('host', '?')}), not this kernel: interrupt that kernel to stop it at its next step.")
        if status == "crashed":
            return f"Nothing to stop: {self.name} crashed at {where} (its process is gone); {self._resume_hint(info)}."
        return f"Nothing to stop: {self.name} already ended ({status}, {where})."

    # --- showing it

    def view(self):
        """A new widget view of the run (display.run_view.RunView): a live run's attached to it, a run on disk
        drawn from its folder (and re-read every FOLLOW_SECONDS while another process runs it)."""
        from ..display.run_view import RunView

        if self._live_knows_best:
            view = RunView(self.name, stop_with=f"{STOP_WITH} {self.name}")
            return self.live.broadcast.attach(view)
        view = RunView(self.name)
        _draw_from_folder(view, self.folder)
        if view.status == "running":
            _follow(view, self.folder)
        return view

    def rows(self):
        info = self.info()
        rows = [("run", self.name), ("status", info.status)]
        if self.error:
            rows.append(("error", self.error))
        rows.append(("step", f"{info.step}/{info.total_steps}" if info.total_steps else str(info.step)))
        if info.loss is not None:
            rows.append(("loss", f"{info.loss:.4f}"))
        if info.eval_loss is not None:
            rows.append(("eval loss", f"{info.eval_loss:.4f}"))
        if info.checkpoint_step is not None:
            rows.append(("checkpoint", f"step {info.checkpoint_step}"))
        rows.append(("folder", str(self.folder.path)))
        note = self._note(info)
        if note:
            rows.append(("note", note))
        return rows

    def _note(self, info: RunInfo) -> str | None:
        status = info.status
        if self.live is not None and self.live.running:
            return f"{STOP_WITH} {self.name} stops it after the step in flight; %qlora_attach shows it again"
        if self.live is None and status == "running":
            return "running in another process; %qlora_attach there, or here (followed from its folder)"
        if status == "crashed":
            return f"its process is gone; {self._resume_hint(info)}"
        return None

    def _resume_hint(self, info: RunInfo) -> str:
        if info.checkpoint_step is None:
            return "it wrote no checkpoint, so train it again"
        return f"%qlora_train --resume {self.folder.path} carries it on from step {info.checkpoint_step}"

    def _repr_html_(self):
        from ..display.chart import loss_chart_png, png_img_tag

        history = self.history
        return super()._repr_html_() + (png_img_tag(loss_chart_png(history)) if history else "")

    def _ipython_display_(self):
        from IPython.display import display

        from ..display import in_notebook

        if in_notebook() and _has_ipywidgets():
            display(self.view())
        else:
            display({"text/plain": repr(self), "text/html": self._repr_html_()}, raw=True)


def _has_ipywidgets() -> bool:
    import importlib.util

    return importlib.util.find_spec("ipywidgets") is not None


def _draw_from_folder(view, folder: RunFolder, history: list | None = None):
    info, record = folder.info(), folder.record
    view.draw(info.status, folder.history() if history is None else history, info.step, info.total_steps,
              settings=record.get("settings"), error=record.get("error"))


def _follow(view, folder: RunFolder, every: float | None = None):
    """Re-read `folder` every `every` seconds (FOLLOW_SECONDS) in a daemon thread, redrawing `view` when it has new rows, until
    the run ends or the view is closed. (Only widget values change: safe from a thread.)"""

    every = every or FOLLOW_SECONDS

    def follow():
        seen = len(view.history)
        while getattr(view.widget, "comm", True) is not None:  # closed widgets lose their comm
            time.sleep(every)
            history, status = folder.history(), folder.status()
            if len(history) != seen or status != "running":
                seen = len(history)
                _draw_from_folder(view, folder, history)
            if status != "running":
                return

    threading.Thread(target=follow, name=f"qlora-follow-{folder.path.name}", daemon=True).start()
