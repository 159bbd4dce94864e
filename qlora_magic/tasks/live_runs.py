"""This process's background runs (`%%qlora_train --background`): each trains in a daemon thread of its own,
which holds the session lock for the whole run. Its events go to a Broadcast, which keeps them and passes them
on to the views attached (`%qlora_attach`); its StopFlag ends it at the next step (`%qlora_stop`).

`start` returns once training has begun: the run's checks (options, data, templates, the run folder) run in
the thread before the first step, and an error there is raised in the caller's cell, not left in the thread.
An error after that ends the run as failed: the views show its line, and so do the run's record and
`%qlora_runs`."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

from ..display.broadcast import Broadcast
from ..engine.run_folder import RunFolder, RunInfo
from ..engine.stopping import StopFlag
from ..errors import one_line

STOP_WITH = "%qlora_stop"  # how a background run is stopped, as a refused cell and the view say
_WAIT_SECONDS = 0.05  # how often `start` looks whether the thread began training or ended

_lock = threading.Lock()
_runs: list["LiveRun"] = []  # started order


class LiveRun:
    """One background run of this process: its thread, StopFlag and Broadcast, and once training began, its
    run folder. `status`: running, stopping (asked to stop, the step in flight finishing), then completed,
    interrupted or failed."""

    def __init__(self, stop: StopFlag | None = None):
        self.stop_flag = stop if stop is not None else StopFlag()
        self.broadcast = Broadcast()
        self.thread: threading.Thread | None = None
        self.summary = None  # the TrainSummary, once it ended
        self.error: str | None = None  # "Type: first line" of the error that ended it
        self.ended = threading.Event()
        self.folder_at_end: str | None = None  # run.json's updated_at when the thread ended: later, a resume wrote
        self._error_before_start: BaseException | None = None

    def __repr__(self):
        return f"<LiveRun {self.name!r} {self.status}>"

    @property
    def folder(self) -> RunFolder | None:
        """The run's folder, once training began (None before)."""
        info = self.broadcast.info
        return RunFolder(Path(info["run_dir"])) if info and info.get("run_dir") else None

    @property
    def name(self) -> str | None:
        return self.folder.path.name if self.folder is not None else None

    @property
    def status(self) -> str:
        if not self.ended.is_set():
            return "stopping" if self.stop_flag else "running"
        if self.error is not None or self.summary is None:
            return "failed"
        return self.summary.status

    @property
    def running(self) -> bool:
        return not self.ended.is_set()

    def stop(self):
        """End the run after the step in flight; the adapter keeps every finished step."""
        self.stop_flag.set("stopped")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the run ended (or `timeout` seconds passed); whether it ended."""
        return self.ended.wait(timeout)

    def info(self) -> RunInfo:
        """What %qlora_runs shows, from the events (more recent than history.jsonl: every step, not every log)."""
        progress = self.broadcast.progress
        return self.folder.info(status=self.status, history=self.broadcast.history, step=progress.get("step", 0),
                                total_steps=progress.get("total_steps"))

    # --- the thread

    def _train(self, target: Callable):
        try:
            self.summary = target(self.broadcast)
        except BaseException as error:  # noqa: BLE001 - a thread has no cell to fail: kept, shown and listed
            if not self.broadcast.started.is_set():
                self._error_before_start = error  # raised in the cell that started it
            else:
                self.error = one_line(error)
                self.broadcast.fail(self.error)
        finally:
            folder = self.folder
            self.folder_at_end = folder.record.get("updated_at") if folder is not None else None
            self.ended.set()

    def folder_moved_on(self) -> bool:
        """Whether the run's folder was written after the thread ended (a --resume, in this kernel or another):
        then the folder, not this thread's events, says where the run is."""
        folder = self.folder
        return self.ended.is_set() and folder is not None and folder.record.get("updated_at") != self.folder_at_end


def start(target: Callable, stop: StopFlag | None = None, views=()) -> LiveRun:
    """Run `target(reporter)` (the api's training call, which holds the session lock) in a daemon thread, and
    return its LiveRun once training has begun. An error before the first step is raised here.
    `views`: reporters to attach from the start."""
    run = LiveRun(stop)
    for view in views:
        run.broadcast.attach(view)
    run.thread = threading.Thread(target=run._train, args=(target,), name="qlora-background-run", daemon=True)
    with _lock:
        _runs.append(run)  # listed once training begins (it has a name then)
    run.thread.start()
    try:
        while not (run.broadcast.started.wait(_WAIT_SECONDS) or run.ended.is_set()):
            pass
    except KeyboardInterrupt:  # Ctrl-C in the cell while the run's checks ran: it stops at its first step
        run.stop()
        raise
    if not run.broadcast.started.is_set():
        with _lock:
            _runs.remove(run)
        error, run._error_before_start = run._error_before_start, None
        raise error if error is not None else RuntimeError("The background run ended before training began.")
    return run


def live_runs() -> list[LiveRun]:
    """This process's background runs that began training, newest first (running, and ended)."""
    with _lock:
        return [run for run in reversed(_runs) if run.broadcast.started.is_set()]


