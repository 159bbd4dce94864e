"""A run's attached view (`%qlora_attach`, `%%qlora_train --background`): the run's name, then the widget
reporter's progress bar, readout and loss chart. A view of a live run is fed by its Broadcast (the history so
far on attach, then each event); a view of a run on disk is drawn from its rows (`draw`), again as they grow
when another process runs it.

Only widget values change, which ipywidgets sends from any thread, so the training thread (or a thread that
reads a run folder) may update it while the kernel runs other cells; nothing is written into a cell's output."""

from __future__ import annotations

import html
import time

from .widget_reporter import BAR_STYLES, WidgetReporter, require_ipywidgets

STYLES = {**BAR_STYLES, "stopping": "warning", "crashed": "danger"}

# The views of one live run draw the same rows list at once (the Broadcast sends one to all): one PNG for them.
# The list itself is kept, so its identity cannot be reused by another.
_chart_cache: tuple = (None, 0, b"")  # (rows, len(rows), png)


class RunView(WidgetReporter):
    """One view of one run. `stop_with` names how to stop it, shown while it runs."""

    def __init__(self, name: str, stop_with: str | None = None):
        super().__init__(show=False)
        w = require_ipywidgets()
        self.name, self.stop_with, self.error = name, stop_with, None
        self.header = w.HTML()
        self.widget = w.VBox([self.header, self.settings, self.bar, self.readout, self.chart])
        self._draw_header()

    # --- a live run's events (Broadcast)

    def start(self, info):
        super().start(info)
        self._draw_header()

    def end(self, summary):
        super().end(summary)
        self._draw_header()

    def failed(self, message: str):
        self.status, self.error = "failed", message
        self.bar.bar_style, self.bar.description = STYLES["failed"], "failed"
        self._draw_readout()
        self._draw_header()

    # --- a run on disk

    def draw(self, status: str, history: list, step: int, total_steps: int | None, settings: dict | None = None,
             error: str | None = None):
        """Show a run as its folder has it: its status, its rows so far, and its step of total_steps."""
        if settings is not None:
            self.settings.value = ("<span style='color:#555;font-size:90%'>"
                                   f"{html.escape(', '.join(f'{k}={v}' for k, v in settings.items()))}</span>")
        self.status, self.history, self.error = status, history, error
        self._progress = {"step": step, "total_steps": total_steps or 0}
        self.bar.bar_style = STYLES.get(status, "info")
        self.bar.description = "training" if status == "running" else status
        self._draw_readout()
        self._draw_chart()
        self._draw_header()

    # --- drawing

    def _draw_header(self):
        text = f"<b>{html.escape(self.name)}</b>"
        if self.status in ("running", "idle") and self.stop_with:
            text += f" <span style='color:#555'>· {html.escape(self.stop_with)} stops it after the step in flight</span>"
        if self.error:
            text += f"<br><span style='color:#d62728'>{html.escape(self.error)}</span>"
        self.header.value = text

    def _draw_chart(self):
        global _chart_cache
        from .chart import loss_chart_png

        rows = self.history
        if rows:
            cached, length, png = _chart_cache
            if cached is not rows or length != len(rows):
                png = loss_chart_png(rows)
                _chart_cache = (rows, len(rows), png)
            self.chart.value = png
        self._last_chart = time.monotonic()
