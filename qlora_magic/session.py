"""The one session a notebook works with: model, tokenizer, adapters, history, last outputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .engine.adapter_folder import TrainRun
from .errors import NoModelError


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
