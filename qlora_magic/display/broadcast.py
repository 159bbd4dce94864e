"""One run's events passed on to every view attached to it, and kept, so a view attached mid-run (a later cell,
a reloaded page, another notebook of the same kernel) first draws the run so far, then follows it live."""

from __future__ import annotations

import threading

from .reporters import Reporter


class Broadcast(Reporter):
    """The reporter a background run trains with: it keeps the run's state (the start info, the latest progress,
    the run's history rows, notes, the summary) and sends each event on to the views attached.

    `attach(view)` may be called from any thread while the run goes: under the lock that each event takes to
    change the state, the view is given the state so far (start, the last row with the whole history, progress,
    notes, end) and joins the views; the events are sent after their change, to the views there were then. So a
    view misses no event and sees none twice, and a slow view never holds up an attach. A view that raises is
    dropped: a broken view never fails the run."""

    def __init__(self):
        self._lock = threading.Lock()
        self._views: list[Reporter] = []
        self.info: dict | None = None
        self.progress: dict = {"step": 0, "total_steps": 0}
        self.history: list = []  # this run's rows (the session's history holds earlier runs' too)
        self.notes: list[str] = []
        self.summary = None
        self.error: str | None = None  # the one line of an error that ended the run
        self.started = threading.Event()  # set by the first event: the run's checks passed and training began

    # --- events from training -----------------------------------------------------------------------

    def start(self, info):
        with self._lock:
            self.info = info
            self.progress = {"step": 0, "total_steps": info["total_steps"]}
            views = list(self._views)
        self._send(views, "start", info)
        self.started.set()

    def step(self, progress):
        with self._lock:
            self.progress = progress
            views = list(self._views)
        self._send(views, "step", progress)

    def log(self, row, progress, history):
        rows = [r for r in history if r.get("run") == row.get("run")]  # a new list: views may keep it
        with self._lock:
            self.progress, self.history = progress, rows
            views = list(self._views)
        self._send(views, "log", row, progress, rows)

    def note(self, text):
        with self._lock:
            self.notes.append(text)
            views = list(self._views)
        self._send(views, "note", text)

    def end(self, summary):
        with self._lock:
            self.summary = summary
            views = list(self._views)
        self._send(views, "end", summary)

    def fail(self, message: str):
        """The run ended with an error (after `end`): the views that can show it (`failed(message)`) do."""
        with self._lock:
            self.error = message
            views = list(self._views)
        self._send(views, "failed", message)

    # --- views ------------------------------------------------------------------------------------

    def attach(self, view: Reporter) -> Reporter:
        """Give `view` the run so far, then every later event (until `detach`); returns the view."""
        with self._lock:
            try:
                self._replay(view)
            except Exception:  # noqa: BLE001 - a view that cannot draw is not attached; the run goes on
                return view
            self._views.append(view)
        return view

    def detach(self, view: Reporter):
        with self._lock:
            if view in self._views:
                self._views.remove(view)

    @property
    def views(self) -> list[Reporter]:
        with self._lock:
            return list(self._views)

    def _replay(self, view):
        if self.info is None:
            return
        view.start(self.info)
        if self.history:
            view.log(self.history[-1], self.progress, self.history)
        view.step(self.progress)
        for text in self.notes:
            view.note(text)
        if self.summary is not None:
            view.end(self.summary)
        if self.error is not None and hasattr(view, "failed"):
            view.failed(self.error)

    def _send(self, views, event, *args):
        """Outside the lock: a slow view delays the run's thread, never an attach."""
        for view in views:
            if not hasattr(view, event):  # `failed`: a plain Reporter has no place for it
                continue
            try:
                getattr(view, event)(*args)
            except Exception:  # noqa: BLE001 - training must not fail because a view did
                self.detach(view)
