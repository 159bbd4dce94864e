"""The one session a notebook works with: model, tokenizer, adapters, history, last outputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import NoModelError


@dataclass
class Session:
    """State shared by the magics, the panels and the Python API.

    Attributes:
        model: the PEFT model (quantized base + LoRA adapters), or None before loading.
        tokenizer: its tokenizer.
        load_config: the LoadConfig the model came from.
        train_configs: one TrainConfig dict per training run, in order.
        history: one dict per logged step (step, loss, learning_rate, grad_norm,
            tokens_per_second, epoch); evaluation rows carry eval_loss.
        last_generation: the text of the last answer, without the prompt.
        last_load_report / last_train_summary: the readouts last shown.
    """

    model: Any = None
    tokenizer: Any = None
    load_config: Any = None
    train_configs: list = field(default_factory=list)
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
    def label_names(self) -> list | None:
        """The class names the last classifier run trained (restored with its adapter), or None."""
        return next((c["label_names"] for c in reversed(self.train_configs) if c.get("label_names")), None)


_session: Session | None = None


def get_session() -> Session:
    """The current session (created empty on first use)."""
    global _session
    if _session is None:
        _session = Session()
    return _session


def reset_session() -> Session:
    """Forget the model and history; returns the new empty session. Frees the model's memory."""
    global _session
    old, _session = _session, Session()
    if old is not None and old.model is not None:
        from .engine.memory_usage import release_memory

        old.model = None
        release_memory()
    return _session
