"""Training shown with widgets: a progress bar, a line of readouts and the loss chart. The panel's Train tab
shows one; `%%qlora_train --display widget` displays one on its own."""

from __future__ import annotations

import html
import time

from ..errors import QloraError
from .reporters import Reporter, last_row, readout_items

WIDGET_REFRESH_SECONDS = 1.0  # redrawing the chart PNG costs ~50 ms; once a second keeps it under 5%
BAR_STYLES = {"running": "info", "completed": "success", "interrupted": "warning", "failed": "danger"}


def require_ipywidgets():
    """The ipywidgets module, or a one-line error saying how to install it."""
    try:
        import ipywidgets
    except ImportError:
        raise QloraError("The panel needs ipywidgets: pip install ipywidgets (the magics work without it).") from None
    return ipywidgets


class WidgetReporter(Reporter):
    """Training shown with widgets: a progress bar, a line of readouts and the loss chart.

    Only widget values change while training runs, which ipywidgets sends from any thread, so it
    also works when training runs in the background (as in the panel). `show=True` displays the
    widget when training starts (what `--display widget` does); the panel places it itself.
    """

    def __init__(self, show=False, refresh_seconds=WIDGET_REFRESH_SECONDS):
        w = require_ipywidgets()
        self.show = show
        self.refresh_seconds = refresh_seconds
        self.settings = w.HTML(layout=w.Layout(width="100%"))
        self.bar = w.FloatProgress(value=0, min=0, max=1, bar_style="info", description="training",
                                   layout=w.Layout(width="100%", max_width="540px"))
        self.readout = w.HTML()
        self.chart = w.Image(format="png", layout=w.Layout(max_width="540px"))
        self.widget = w.VBox([self.settings, self.bar, self.readout, self.chart])
        self.status = "idle"
        self.history: list = []
        self._progress = {"step": 0, "total_steps": 0}
        self._last_chart = 0.0
        self.notes: list[str] = []

    def start(self, info):
        self.status, self.history, self.notes = "running", [], []
        self._progress = {"step": 0, "total_steps": info["total_steps"]}
        settings = ", ".join(f"{k}={v}" for k, v in info.get("settings", {}).items())
        self.settings.value = f"<span style='color:#555;font-size:90%'>{html.escape(settings)}</span>"
        self.bar.bar_style, self.bar.value = BAR_STYLES["running"], 0
        self.chart.value = b""
        self._draw_readout()
        if self.show:
            from IPython.display import display

            display(self.widget)

    def step(self, progress):
        self._progress = progress
        self._draw_readout()

    def log(self, row, progress, history):
        self._progress, self.history = progress, history
        self._draw_readout()
        if time.monotonic() - self._last_chart >= self.refresh_seconds:
            self._draw_chart()

    def end(self, summary):
        self.status = summary.status
        self.bar.bar_style = BAR_STYLES.get(summary.status, "info")
        self.bar.description = summary.status
        self._progress = {**self._progress, "step": summary.steps_done, "eta": None}  # ended: nothing left to wait for
        self.history = summary.history or self.history
        self._draw_readout()
        self._draw_chart()

    def note(self, text):
        self.notes.append(text)
        self._draw_readout()

    def _draw_readout(self):
        p = self._progress
        self.bar.value = p["step"] / p["total_steps"] if p.get("total_steps") else 0
        items = readout_items(last_row(self.history, "loss"), last_row(self.history, "eval_loss"), p)
        self.readout.value = f"{html.escape(self.status)} · " + " · ".join(
            f"<b>{html.escape(k)}</b> {html.escape(v)}" for k, v in items) + "".join(
            f"<br><span style='color:#b35900'>{html.escape(note)}</span>" for note in self.notes)

    def _draw_chart(self):
        from ..display.chart import loss_chart_png

        if self.history:
            self.chart.value = loss_chart_png(self.history)
        self._last_chart = time.monotonic()

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)
