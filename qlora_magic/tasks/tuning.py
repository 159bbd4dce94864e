"""Hyperparameter search with Optuna (the course's slide 10, done so it can run in a notebook).

Every trial trains a fresh LoRA adapter on the same quantized base: a new adapter's update starts at
zero (PEFT initializes B = 0), so each trial starts from the same weights without reloading the model.
The objective is the held-out eval loss (the masked response loss). A trial whose eval loss trails the
median of earlier trials at the same step is stopped early (Optuna's MedianPruner), by a Trainer
callback that sets the same stop flag Ctrl-C sets. The adapters of finished trials are deleted, except the best so far; memory is
measured after each trial, so growth would show in the table.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, field

from ..config import TUNE_LORA, TrainConfig, TuneConfig
from ..display.formatting import gb, html_grid, text_grid
from ..errors import DivergedError

def _pruning_callback(trial, stop):
    """A TrainerCallback that hands each eval loss to Optuna and ends the run when the trial should be
    pruned. It sets the run's stop flag, as Ctrl-C does, so no final evaluation follows."""
    from transformers import TrainerCallback

    class PruneTrial(TrainerCallback):
        pruned = False

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            loss = (metrics or {}).get("eval_loss")
            if loss is None or state.global_step == 0:  # the "before" point of eval_on_start
                return
            trial.report(loss, state.global_step)
            if trial.should_prune():
                self.pruned = True
                stop.set("pruned")
                control.should_training_stop = True

    return PruneTrial()


def _suggest(trial, config: TuneConfig) -> dict:
    params = {}
    for name, spec in config.search.items():
        if isinstance(spec, list):
            # Optuna stores plain values: a list of target modules becomes "q_proj,v_proj".
            params[name] = trial.suggest_categorical(name, [",".join(c) if isinstance(c, list) else c for c in spec])
        elif config.is_int(name):
            params[name] = trial.suggest_int(name, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log")),
                                             step=int(spec.get("step", 1)))
        else:
            params[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")),
                                               step=spec.get("step"))
    return params


def _memory_now(model):
    import torch

    if next(model.parameters()).device.type == "cuda":
        return torch.cuda.memory_allocated()
    import psutil

    return psutil.Process().memory_info().rss


def other_tensor_bytes(model) -> int:
    """Bytes of every tensor Python still holds (each storage counted once), less the LoRA weights the
    model carries now: the base model plus whatever a finished trial left alive (its deleted adapter,
    optimizer state, activations). On a CPU the process RSS also moves with the allocator's caching and
    arena reuse; this moves only when tensors are kept alive, so it is the precise measure of a leak."""
    import gc

    import torch

    adapters = sum(p.nbytes for name, p in model.named_parameters() if "lora_" in name)
    storages = {}
    for obj in gc.get_objects():
        try:
            if issubclass(type(obj), torch.Tensor) and not obj.is_meta:  # type(): no __getattr__ of lazy proxies
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError, ReferenceError):  # tensor subclasses without a plain storage
            continue
    return sum(storages.values()) - adapters


def run_search(session, config: TuneConfig, on_trial=None) -> "TuneReport":
    """Run the trials; `on_trial(report)` is called after each one (for a live table)."""
    import optuna

    from ..engine.adapters import adapter_names, delete_adapter, switch_adapter

    model = session.require_model("tuning")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial raises its own one-line error; no logged traceback
    previous = model.active_adapter
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2) if config.prune else optuna.pruners.NopPruner()
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=config.seed), pruner=pruner)
    search = _Search(session, config, study, on_trial)
    try:
        with _trials_grouped(config.train, search):
            study.optimize(search.objective, n_trials=config.trials, catch=())
    finally:
        if search.best_name and config.keep:
            switch_adapter(session, search.best_name)  # the winner stays, active, under its trial's name
        else:
            if search.best_name:
                delete_adapter(session, search.best_name)
            if previous in adapter_names(model):
                switch_adapter(session, previous)
    report = search.report
    report.kept = search.best_name if config.keep else None
    if report.best:
        best_params = {k: report.best[k] for k in config.search}
        report.best_train_config = config.train.replace(**{k: v for k, v in best_params.items() if k not in TUNE_LORA})
        report.best_lora = {k: v for k, v in best_params.items() if k in TUNE_LORA}
    session.last_tune_report = report
    return report


def _trials_grouped(train: TrainConfig, search: "_Search"):
    """--report-to trackers see one run per trial, grouped under tune-<time> (an MLflow parent run, a W&B group);
    each trial's run is named <group>-trialN."""
    import datetime
    from pathlib import Path

    from ..config import parse_trackers
    from ..engine.trackers import tracking_group

    search.group = "tune-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return tracking_group(parse_trackers(train.report_to), search.group, Path(train.output_dir or "runs"))


class _Search:
    """The objective Optuna calls once per trial: a fresh adapter, one training run, the eval loss; it keeps
    the best trial's adapter and deletes the others."""

    def __init__(self, session, config: TuneConfig, study, on_trial=None):
        self.session, self.config, self.study, self.on_trial = session, config, study, on_trial
        self.report = TuneReport(search=config.search)
        self.best_name = None
        self.group = None  # the trackers' group name of the trials

    def objective(self, trial):
        import optuna

        from ..engine.adapters import add_adapter, delete_adapter
        from ..engine.stopping import StopFlag
        from .finetune import finetune

        params = _suggest(trial, self.config)
        name = f"trial{trial.number}"
        add_adapter(self.session, name, **{k: v for k, v in params.items() if k in TUNE_LORA})
        stop = StopFlag()
        pruning = _pruning_callback(trial, stop)
        started = time.perf_counter()
        train_config = self.config.train.replace(display="none", **{k: v for k, v in params.items() if k not in TUNE_LORA})
        if self.group:
            train_config = train_config.replace(name=f"{self.group}-{name}")
        try:
            summary = finetune(self.session, train_config, stop=stop, callbacks=[pruning], run_folder=False)
        except DivergedError:  # these settings blew up (lr too high): a failed trial, not a failed search
            delete_adapter(self.session, name)
            self._record(trial, params, None, 0, "diverged", started)
            raise optuna.TrialPruned() from None
        except BaseException:
            delete_adapter(self.session, name)
            raise
        value = summary.eval_loss[1]
        state = "pruned" if pruning.pruned else ("interrupted" if summary.status == "interrupted" else "complete")
        self._keep_if_best(name, state, value)
        self._record(trial, params, value, summary.steps_done, state, started)
        if state == "interrupted":
            self.study.stop()
        if pruning.pruned:
            raise optuna.TrialPruned()
        return value

    def _record(self, trial, params, value, steps, state, started):
        """One row of the report (memory measured after the trial's adapter is kept or deleted), shown at once."""
        from ..engine.memory_usage import release_memory

        release_memory()
        model = self.session.model
        self.report.trials.append({"trial": trial.number, **params, "eval_loss": value, "steps": steps, "state": state,
                                   "seconds": time.perf_counter() - started, "memory": _memory_now(model),
                                   "other_tensors": other_tensor_bytes(model)})
        if self.on_trial:
            self.on_trial(self.report)

    def _keep_if_best(self, name, state, value):
        from ..engine.adapters import delete_adapter

        best = self.report.best
        if state == "complete" and value is not None and (best is None or value < best["eval_loss"]):
            if self.best_name:
                delete_adapter(self.session, self.best_name)
            self.best_name = name
        else:
            delete_adapter(self.session, name)


@dataclass(repr=False)
class TuneReport:
    """The trials (params, eval loss, state, time, memory after) and the best one."""

    search: dict
    trials: list = field(default_factory=list)
    kept: str | None = None
    best_train_config: object = None
    best_lora: dict = field(default_factory=dict)

    @property
    def best(self):
        done = [t for t in self.trials if t["state"] == "complete" and t["eval_loss"] is not None]
        return min(done, key=lambda t: t["eval_loss"]) if done else None

    @property
    def best_params(self):
        return {k: self.best[k] for k in self.search} if self.best else None

    def _cells(self):
        best = self.best
        rows = []
        for t in self.trials:
            params = [f"{t[k]:.3g}" if isinstance(t[k], float) else str(t[k]) for k in self.search]
            loss = "-" if t["eval_loss"] is None else f"{t['eval_loss']:.4f}"
            rows.append([("* " if t is best else "") + str(t["trial"]), *params, loss, t["steps"], t["state"],
                         f"{t['seconds']:.1f} s", gb(t["memory"]), _mb(t.get("other_tensors"))])
        return ["trial", *self.search, "eval loss", "steps", "state", "time", "memory after", "other tensors"], rows

    def memory_growth(self, key="memory") -> int | None:
        """Bytes gained from after the first trial to after the last: `key` "memory" (process RSS on a
        CPU, allocated on a GPU) or "other_tensors" (live tensors besides the loaded adapters)."""
        values = [t.get(key) for t in self.trials]
        return None if len(values) < 2 or None in values else values[-1] - values[0]

    def _memory_line(self):
        if self.memory_growth() is None:
            return ""
        first, last = self.trials[0], self.trials[-1]
        line = (f"memory after trial {first['trial']} -> {last['trial']}: {gb(first['memory'])} -> {gb(last['memory'])} "
                f"({self.memory_growth() / 1e6:+.1f} MB)")
        if self.memory_growth("other_tensors") is not None:
            line += f"; other tensors {self.memory_growth('other_tensors') / 1e6:+.3f} MB"
        return line

    def _title(self):
        best = self.best
        text = f"Tuning: {len(self.trials)} trials"
        if best:
            text += f"; best trial {best['trial']} (eval loss {best['eval_loss']:.4f})"
        if self.kept:
            text += f", kept as adapter '{self.kept}' (active)"
        return text

    def __repr__(self):
        line = self._memory_line()
        return text_grid(self._title(), *self._cells()) + (f"\n  {line}" if line else "")

    def _repr_html_(self):
        line = self._memory_line()
        return html_grid(self._title(), *self._cells()) + (f"<p>{html.escape(line)}</p>" if line else "")


def _mb(value):
    return "-" if value is None else f"{value / 1e6:.2f} MB"
