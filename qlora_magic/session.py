"""The one session a notebook works with: model, tokenizer, adapters, history, last outputs; and the one lock
that keeps two threads (the panel's background action and a cell) from using its model at once."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any

from .engine.adapter_folder import TrainRun
from .errors import BusyError, NoModelError


@dataclass
class Session:
    """State shared by the magics, the panels and the Python API.

    Attributes:
        model: the PEFT model (quantized base + LoRA adapters), or None before loading.
        tokenizer: its tokenizer.
        load_config: the LoadConfig the model came from.
        runs: one TrainRun per training run, in order (its TrainConfig, where its rows came from, a
            classifier's class names); restored with a saved adapter.
        train_configs: the same runs as dicts (`train_configs[-1]["lr"]`), computed from `runs`.
        history: one dict per logged step (step, loss, learning_rate, grad_norm,
            tokens_per_second, epoch); evaluation rows carry eval_loss.
        last_generation: the text of the last answer, without the prompt.
        last_load_report / last_train_summary: the readouts last shown.
    """

    model: Any = None
    tokenizer: Any = None
    load_config: Any = None
    runs: list[TrainRun] = field(default_factory=list)
    history: list = field(default_factory=list)
    last_generation: str | None = None
    last_load_report: Any = None
    last_train_summary: Any = None
    last_tune_report: Any = None  # the TuneReport of the last %%qlora_tune (best params, trials)

    def require_model(self, action="this"):
        if self.model is None:
            raise NoModelError(action)
        return self.model

    @property
    def device(self):
        return None if self.model is None else next(self.model.parameters()).device

    @property
    def task(self) -> str:
        """The loaded model's --task (causal-lm before anything is loaded)."""
        return getattr(self.load_config, "task", "causal-lm")

    @property
    def train_configs(self) -> list[dict]:
        """One dict per training run (`TrainRun.to_dict`: the TrainConfig's fields, and "label_names" for a
        classifier), as notebooks read them. A view: assigning a list of such dicts replaces the runs."""
        return [run.to_dict() for run in self.runs]

    @train_configs.setter
    def train_configs(self, records):
        self.runs = [TrainRun.from_dict(record) for record in records]

    @property
    def label_names(self) -> list | None:
        """The class names the last classifier run trained (restored with its adapter), or None."""
        return next((run.label_names for run in reversed(self.runs) if run.label_names), None)


@dataclass
class Activity:
    """What the thread holding the session lock is doing, as a refused call names it."""

    what: str  # "Training"
    by: str  # "the panel", "a cell", "another thread"
    stoppable: bool = False  # training and tuning can be stopped; the rest is waited for
    stop_with: str | None = None  # how, when there is a control for it: "the panel's Stop button"

    def refusal(self) -> str:
        if self.stoppable:
            how = f"stop it first ({self.stop_with}), or wait." if self.stop_with else "stop it first, or wait."
        else:
            how = "wait for it to finish, then try again."
        return f"{self.what} in progress (started from {self.by}): {how}"


class SessionLock:
    """One thread at a time uses the session's model: the panel's background action, a cell, or a run a script
    started in a thread. Another thread is refused at once (BusyError, naming what runs) rather than made to
    wait, as a cell blocked until training ends would look hung. Re-entrant in the thread that holds it (the
    panel's action holds it and calls the api verbs, which hold it too); the outermost hold names the activity.

    >>> with session_lock.hold("Training", by="the panel", stop_with="the panel's Stop button"):
    ...     api.train(...)
    """

    def __init__(self):
        self._lock = threading.RLock()
        self._depth = 0  # changed only by the thread holding the lock
        self.activity: Activity | None = None

    @contextlib.contextmanager
    def hold(self, what: str, *, by: str | None = None, stoppable: bool = False, stop_with: str | None = None):
        """Hold the lock while the block runs; BusyError at once when another thread holds it."""
        if not self._lock.acquire(blocking=False):
            raise BusyError(self._held_elsewhere())
        self._depth += 1
        if self._depth == 1:
            self.activity = Activity(what, by or _this_thread(), stoppable or stop_with is not None, stop_with)
        try:
            yield self.activity
        finally:
            self._depth -= 1
            if not self._depth:
                self.activity = None
            self._lock.release()

    def refusal(self) -> str | None:
        """Why an action started now in a thread of its own (a panel's click) would be refused, or None when
        the lock is free."""
        if self._lock.acquire(blocking=False):
            try:
                if self._depth == 0:
                    return None
            finally:
                self._lock.release()
        return self._held_elsewhere()

    def _held_elsewhere(self) -> str:
        activity = self.activity  # None for the instant between another thread's acquire and its naming
        return activity.refusal() if activity else "Another action is using the model: wait for it to finish, then try again."


def _this_thread() -> str:
    return "a cell" if threading.current_thread() is threading.main_thread() else "another thread"


session_lock = SessionLock()  # one for the process, as there is one current session


_session: Session | None = None


def get_session() -> Session:
    """The current session (created empty on first use)."""
    global _session
    if _session is None:
        _session = Session()
    return _session


def reset_session() -> Session:
    """Forget the model and history; returns the new empty session. Frees the model's memory.
    Refused (BusyError) while another thread, such as the panel's, uses the model."""
    global _session
    with session_lock.hold("Resetting the session"):
        old, _session = _session, Session()
        if old is not None and old.model is not None:
            from .engine.memory_usage import release_memory

            old.model = None
            release_memory()
    return _session
