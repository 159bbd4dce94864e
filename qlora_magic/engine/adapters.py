"""Several LoRA adapters on one quantized base: add, load, list, switch, delete, combine.

PEFT keeps every adapter in the same model (`peft_config[name]`); exactly one is active, and only the
active one is trainable, so `%%qlora_train` after `%qlora_adapters add task2` trains task2 alone and
leaves the others as they were (the multi-task idea of the course's slide 14).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

from ..config import COMBINATIONS
from ..errors import AdapterError, ConfigError
from ..display.formatting import html_grid, text_grid

BASE = "base"  # the column name of the base model in tables; never an adapter's name


def adapter_names(model) -> list[str]:
    return list(getattr(model, "peft_config", {}) or {})


def active_adapter(model) -> str | None:
    name = getattr(model, "active_adapter", None)
    return name[0] if isinstance(name, (list, tuple)) else name


def check_adapter(model, name: str) -> str:
    """`name` if the model has that adapter; otherwise a one-line error listing the ones it has."""
    names = adapter_names(model)
    if name not in names:
        raise AdapterError(f"No adapter {name!r}: this model has {', '.join(names) or 'none'} (see %qlora_adapters list).")
    return name


@contextlib.contextmanager
def using(model, name: str | None):
    """Answer with adapter `name` inside the block (None or 'base': adapters disabled); the active
    adapter is restored afterwards, so evaluation and comparison leave the session as they found it."""
    if name in (None, BASE):
        with model.disable_adapter():
            yield
        return
    previous = active_adapter(model)
    check_adapter(model, name)
    if name == previous:
        yield
        return
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter(previous)


def _new_name(model, name) -> str:
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"Adapter names are single words like task2, got {name!r}.")
    if name == BASE:
        raise ConfigError("'base' names the model without adapters; choose another adapter name.")
    if name in adapter_names(model):
        raise AdapterError(f"There is already an adapter {name!r}: choose a new name, or delete it first.")
    return name


def add_adapter(session, name, *, r=None, alpha=None, dropout=None, targets=None, activate=True):
    """Add a fresh LoRA adapter beside the existing ones, on the same quantized base. Options default to
    those of the loaded model's first adapter. With `activate`, it becomes the one trained and used."""
    from peft import LoraConfig

    from ..config import LoadConfig
    from .loading import TASK_CLASSES, check_targets, seeded

    model = session.require_model("adding an adapter")
    _new_name(model, name)
    loaded = session.load_config or LoadConfig()
    # LoadConfig checks the values (and splits 'q_proj,v_proj'), as for %qlora_load.
    given = {"r": r, "alpha": alpha, "dropout": dropout, "targets": targets}  # 0 is a value, refused by the check
    options = LoadConfig(**{k: getattr(loaded, k) if v is None else v for k, v in given.items()})
    check_targets(model, options.targets)
    lora = LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                      target_modules=options.targets, bias="none", task_type=TASK_CLASSES[loaded.task][1])
    try:
        with seeded(loaded.seed):  # the load's seed: adapters added alike start alike (tuning's trials compare fairly)
            model.add_adapter(name, lora)
    except ValueError as error:
        raise ConfigError(f"Cannot add adapter {name!r}: {str(error).splitlines()[0]}") from None
    if activate:
        model.set_adapter(name)
    return adapter_table(model)


def load_adapter(session, path, name=None, *, activate=True):
    """Load a saved adapter folder beside the existing adapters (default name: the folder's name).

    The folder is read and its weights checked against the model first; if anything still fails while
    loading, the half-added adapter is deleted again, so the session is as it was and a retry can use the name."""
    from .adapter_folder import check_complete, check_fits, read_adapter_folder, warn_if_other_base
    from .loading import check_task_type

    model = session.require_model("loading an adapter")
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ConfigError(f"Give the folder of a saved adapter, e.g. %qlora_adapters load runs/my-adapter (got {path!r}).")
    saved = read_adapter_folder(path, missing=AdapterError)
    folder = saved.path
    name = _new_name(model, name or folder.name.replace("-", "_"))
    check_task_type(saved, session.task)
    check_fits(model, saved)
    try:
        model.load_adapter(str(folder), adapter_name=name, is_trainable=True)
        check_complete(model, name, saved)
    except BaseException as error:
        if name in adapter_names(model):
            model.delete_adapter(name)
        if isinstance(error, (ValueError, KeyError, RuntimeError, OSError)) and not isinstance(error, AdapterError):
            raise AdapterError(f"Cannot load adapter {str(path)!r} onto this model ({str(error).splitlines()[0].rstrip(':')}): "
                               f"load it on the base it was trained on, {saved.load_command}") from None
        raise
    warn_if_other_base(model, saved)
    if activate:
        model.set_adapter(name)
    return adapter_table(model)


def switch_adapter(session, name):
    """Make `name` the active adapter: generation, evaluation and training use it from now on."""
    model = session.require_model("switching adapters")
    model.set_adapter(check_adapter(model, name))
    return adapter_table(model)


def delete_adapter(session, name):
    """Remove adapter `name` and free its weights. The last adapter cannot be deleted."""
    model = session.require_model("deleting an adapter")
    check_adapter(model, name)
    if len(adapter_names(model)) == 1:
        raise AdapterError(f"{name!r} is the only adapter; load a new model instead of deleting it.")
    if active_adapter(model) == name:  # hand over first, so PEFT need not pick one (and warn)
        model.set_adapter(next(n for n in adapter_names(model) if n != name))
    model.delete_adapter(name)
    return adapter_table(model)


def combine_adapters(session, name, weights: dict, *, combination_type=None, activate=True):
    """A new adapter `name` = weighted combination of existing ones, e.g. {"default": 0.7, "task2": 0.3}.

    combination_type: PEFT's (linear, cat, svd, ties, ...); default linear when all ranks agree, else
    cat (concatenation, exact for any ranks).
    """
    model = session.require_model("combining adapters")
    if not weights or not isinstance(weights, dict):
        raise ConfigError("Name the adapters to combine with their weights, e.g. --weights default=0.7,task2=0.3.")
    for source, weight in weights.items():
        check_adapter(model, source)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ConfigError(f"The weight of {source!r} must be a finite number, like {source}=0.5; got {weight!r}.")
    if combination_type is not None and combination_type not in COMBINATIONS:
        raise ConfigError(f"--combination must be one of {', '.join(COMBINATIONS)}; got {combination_type!r}.")
    _new_name(model, name)
    ranks = {model.peft_config[s].r for s in weights}
    combination_type = combination_type or ("linear" if len(ranks) == 1 else "cat")
    try:
        model.base_model.add_weighted_adapter(list(weights), [float(w) for w in weights.values()], name,
                                              combination_type=combination_type)
    except BaseException as error:
        if name in adapter_names(model):  # nothing half-made stays behind
            model.delete_adapter(name)
        if isinstance(error, (ValueError, TypeError, NotImplementedError)):
            raise AdapterError(f"Cannot combine {', '.join(weights)} as {combination_type}: {str(error).splitlines()[0]}") from None
        raise
    if activate:
        model.set_adapter(name)
    return adapter_table(model)


def adapter_table(model) -> "AdapterTable":
    active = active_adapter(model)
    rows = []
    for name, config in model.peft_config.items():
        targets = config.target_modules if isinstance(config.target_modules, str) else ",".join(sorted(config.target_modules))
        size = sum(p.numel() for n, p in model.named_parameters() if f".{name}." in n and "lora_" in n)
        rows.append({"name": name, "active": name == active, "r": config.r, "alpha": config.lora_alpha,
                     "targets": targets, "parameters": size})
    return AdapterTable(rows)


@dataclass(repr=False)
class AdapterTable:
    """The adapters on the model: name, which is active, rank, alpha, targets, size."""

    adapters: list

    title = "Adapters"
    header = ["", "name", "r", "alpha", "targets", "parameters"]

    @property
    def names(self):
        return [a["name"] for a in self.adapters]

    @property
    def active(self):
        return next((a["name"] for a in self.adapters if a["active"]), None)

    def _cells(self):
        return [["*" if a["active"] else "", a["name"], a["r"], f"{a['alpha']:g}", a["targets"], f"{a['parameters']:,}"]
                for a in self.adapters]

    def __repr__(self):
        return text_grid(self.title + " (* = active)", self.header, self._cells())

    def _repr_html_(self):
        return html_grid(self.title + " (* = active)", self.header, self._cells())
