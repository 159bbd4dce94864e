"""The loss chart: train and eval loss against steps, drawn off-screen to PNG bytes."""

from __future__ import annotations

import base64
import io


def loss_chart_png(history: list[dict], width=6.0, height=2.8) -> bytes:
    """PNG of train loss (line) and eval loss (dots) by step. Uses matplotlib's Agg canvas directly,
    so no figure is registered with pyplot and the inline backend shows nothing twice."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [(r["step"], r["loss"]) for r in history if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in history if r.get("eval_loss") is not None]
    fig = Figure(figsize=(width, height), dpi=90)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train loss", color="#1f77b4", linewidth=1.5)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="#d62728", markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def png_img_tag(png: bytes, alt="loss chart") -> str:
    return f"<img alt='{alt}' src='data:image/png;base64,{base64.b64encode(png).decode()}'/>"
