"""How a training run is shown. Training emits events; a reporter draws them.

- HtmlReporter: one HTML output refreshed through a display handle (works in JupyterLab, Notebook,
  VS Code and Colab, and the last state stays in the saved notebook).
- TextReporter: a tqdm bar and a line per log, for terminals, scripts and CI.
- NullReporter: nothing.
- WidgetReporter (widget_reporter.py): widgets, for the panel and --display widget.
"""

from __future__ import annotations

import html
import time

from .formatting import gb

HTML_REFRESH_SECONDS = 1.0  # drawing the chart costs ~50 ms; at most once a second keeps it under 2%


class Reporter:
    """Receives training events. Subclasses override what they show."""

    def start(self, info: dict):
        """info: total_steps, settings (dict of what was chosen), run_dir, history (the rows so far)."""

    def step(self, progress: dict):
        """After each optimizer step: step, total_steps, elapsed, eta."""

    def log(self, row: dict, progress: dict, history: list):
        """A new history row (train or eval)."""

    def end(self, summary):
        """Training ended (completed, interrupted or failed: summary.status)."""

    def note(self, text: str):
        """Something the run changed on its own, in one line (a smaller batch layout after running out of memory)."""


class NullReporter(Reporter):
    pass


def _fmt_seconds(s):
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


def readout_items(row_train: dict | None, row_eval: dict | None, progress: dict) -> list[tuple[str, str]]:
    """The numbers shown next to the chart."""
    items = [("step", f"{progress['step']}/{progress['total_steps']}"),
             ("elapsed", _fmt_seconds(progress.get("elapsed"))),
             ("ETA", _fmt_seconds(progress.get("eta")))]
    if row_train:
        items += [("loss", f"{row_train['loss']:.4f}"),
                  ("lr", f"{row_train.get('learning_rate', 0):.2e}")]
        if row_train.get("grad_norm") is not None:
            items.append(("grad norm", f"{row_train['grad_norm']:.3f}"))
        if row_train.get("tokens_per_second") is not None:
            items.append(("tokens/s", f"{row_train['tokens_per_second']:,.0f}"))
        if row_train.get("memory") is not None:
            items.append((row_train.get("memory_kind", "memory"), gb(row_train["memory"])))
    if row_eval:
        items.append(("eval loss", f"{row_eval['eval_loss']:.4f}"))
        if row_eval.get("accuracy") is not None:  # a classifier (--task seq-cls)
            items += [("accuracy", f"{row_eval['accuracy']:.1%}"), ("macro F1", f"{row_eval['f1']:.3f}")]
    return items


def last_row(history, key):
    """The newest history row that has `key` (None when none has)."""
    return next((r for r in reversed(history) if r.get(key) is not None), None)


class HtmlReporter(Reporter):
    """Displays once with a display id, then updates in place, throttled."""

    def __init__(self, refresh_seconds=HTML_REFRESH_SECONDS):
        self.refresh_seconds = refresh_seconds
        self.handle = None
        self.settings = {}
        self._last_draw = 0.0
        self._history = []
        self._progress = {"step": 0, "total_steps": 0}
        self._status = "running"
        self._notes = []

    def start(self, info):
        from IPython.display import HTML, display

        self.settings = info.get("settings", {})
        self._progress = {"step": 0, "total_steps": info["total_steps"]}
        self._history = info.get("history") or []  # a resumed run's steps before it stopped are drawn at once
        self.handle = display(HTML(self._html(chart=bool(self._history))), display_id=True)

    def step(self, progress):
        self._progress = progress
        self._maybe_draw(chart=False)

    def log(self, row, progress, history):
        self._progress, self._history = progress, history
        self._maybe_draw(chart=True)

    def end(self, summary):
        self._status = summary.status
        self._draw(chart=True)

    def note(self, text):
        self._notes.append(text)
        self._draw(chart=True)

    def _maybe_draw(self, chart):
        if time.monotonic() - self._last_draw >= self.refresh_seconds:
            self._draw(chart)

    def _draw(self, chart):
        from IPython.display import HTML

        if self.handle is not None:
            self.handle.update(HTML(self._html(chart)))
        self._last_draw = time.monotonic()

    def _html(self, chart):
        from .chart import loss_chart_png, png_img_tag

        p = self._progress
        fraction = p["step"] / p["total_steps"] if p.get("total_steps") else 0
        color = {"running": "#1f77b4", "completed": "#2ca02c", "interrupted": "#ff7f0e", "failed": "#d62728"}[self._status]
        items = readout_items(last_row(self._history, "loss"), last_row(self._history, "eval_loss"), p)
        readouts = " · ".join(f"<b>{html.escape(k)}</b> {html.escape(v)}" for k, v in items)
        settings = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        image = png_img_tag(loss_chart_png(self._history)) if chart and self._history else ""
        return (
            "<div class='qlora-train'>"
            f"<div style='font-size:90%;color:#555'>{html.escape(settings)}</div>"
            f"<div style='background:#eee;width:100%;max-width:540px;height:10px;border-radius:5px'>"
            f"<div style='background:{color};width:{100 * fraction:.1f}%;height:10px;border-radius:5px'></div></div>"
            f"<div>{html.escape(self._status)} · {readouts}</div>"
            + "".join(f"<div style='color:#b35900'>{html.escape(note)}</div>" for note in self._notes)
            + f"{image}</div>"
        )


class TextReporter(Reporter):
    """tqdm progress bar; one line per log row."""

    def __init__(self, file=None):
        self.file = file
        self.bar = None

    def start(self, info):
        from tqdm.auto import tqdm as _  # noqa: F401  (the import is the check tqdm is there)
        from tqdm import tqdm

        settings = ", ".join(f"{k}={v}" for k, v in info.get("settings", {}).items())
        tqdm.write(f"training: {settings}", file=self.file)
        self.bar = tqdm(total=info["total_steps"], unit="step", file=self.file, dynamic_ncols=True, mininterval=1.0)

    def step(self, progress):
        if self.bar is not None:
            self.bar.update(progress["step"] - self.bar.n)

    def log(self, row, progress, history):
        from tqdm import tqdm

        items = readout_items(row if "loss" in row else None, row if "eval_loss" in row else None, progress)
        tqdm.write("  ".join(f"{k} {v}" for k, v in items if k not in ("elapsed", "ETA")), file=self.file)

    def end(self, summary):
        if self.bar is not None:
            self.bar.close()

    def note(self, text):
        from tqdm import tqdm

        tqdm.write(text, file=self.file)
