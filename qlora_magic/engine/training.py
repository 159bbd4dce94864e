"""One training run with transformers' Trainer: callbacks feed the session history and the reporter;
Ctrl-C (a kernel interrupt) stops at the next step boundary and keeps what was learned; a loss that becomes
NaN or infinite ends the run there and puts the adapter back as it was before the run."""

from __future__ import annotations

import contextlib
import datetime
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..display.formatting import Readout, gb
from ..display.reporters import Reporter
from ..errors import ConfigError, DivergedError
from .speed import BatchLayout, choose_settings
from .stopping import StopFlag, stop_on_interrupt


def _make_callback(reporter: Reporter, log: RunLog, stop: StopFlag, device: str):
    from transformers import TrainerCallback

    class EventsCallback(TrainerCallback):
        """Turns Trainer events into history rows and reporter events; never drives training
        except to honour a stop request, or to end a run whose loss is no longer finite."""

        diverged = None  # (what became non-finite, at which step), once it has

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()
            self.last_time, self.last_tokens = self.started, 0

        def progress(self, state):
            elapsed = time.perf_counter() - self.started
            done = state.global_step
            eta = elapsed / done * (state.max_steps - done) if done else None
            return {"step": done, "total_steps": state.max_steps, "elapsed": elapsed, "eta": eta}

        def on_step_end(self, args, state, control, **kwargs):
            reporter.step(self.progress(state))
            if stop:
                control.should_training_stop = True

        def on_evaluate(self, args, state, control, **kwargs):
            self.last_time = time.perf_counter()  # tokens/s measures training, not evaluation

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            row = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), "run": log.run}
            if "loss" in logs:
                # The loss logged is already a Python float, so this check adds no device sync.
                if not math.isfinite(logs["loss"]) and self.diverged is None:
                    self.diverged = (f"training loss became {logs['loss']}", state.global_step)
                    control.should_training_stop = True
                    control.should_evaluate = False  # the weights are about to be put back
                now, tokens = time.perf_counter(), state.num_input_tokens_seen
                row.update(
                    loss=logs["loss"],
                    learning_rate=logs.get("learning_rate"),
                    grad_norm=logs.get("grad_norm"),
                    tokens_per_second=(tokens - self.last_tokens) / max(now - self.last_time, 1e-9),
                )
                row.update(_memory_now(device))
                self.last_time, self.last_tokens = now, tokens
            elif "eval_loss" in logs:
                row["eval_loss"] = logs["eval_loss"]
                row.update({k[5:]: logs[k] for k in ("eval_accuracy", "eval_f1") if k in logs})  # seq-cls
            else:
                return  # the end-of-training summary log; the summary object carries it
            log.history.append(row)
            reporter.log(row, self.progress(state), log.history)

    return EventsCallback()


def _memory_now(device):
    import torch

    if device.startswith("cuda"):
        return {"memory": torch.cuda.memory_allocated(), "memory_kind": "GPU allocated"}
    import psutil

    return {"memory": psutil.Process().memory_info().rss, "memory_kind": "CPU RSS"}


def default_run_dir() -> Path:
    return Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def _trainer_class(chunked_loss: bool, rounded_pad_id: int | None = None):
    """transformers' Trainer, or one whose training loss comes from `speed.causal_lm_loss` (same numbers,
    without the batch's logits; evaluation keeps the model's own loss, it returns the logits), and which,
    when packed batches are rounded up (rounded_pad_id given), counts tokens without the pad segment."""
    from transformers import Trainer

    base = _chunked_loss_trainer() if chunked_loss else Trainer
    if rounded_pad_id is None:
        return base
    from .data import packed_real_tokens

    class RealTokensTrainer(base):
        def _track_num_input_tokens(self, inputs):  # transformers >= 5.2x; older ones count the pad too
            self.state.num_input_tokens_seen += packed_real_tokens(inputs, rounded_pad_id)

    return RealTokensTrainer


def _chunked_loss_trainer():
    from transformers import Trainer

    from .speed import causal_lm_loss, hidden_states_as_logits, output_head

    class ChunkedLossTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            module = self.accelerator.unwrap_model(model)
            head = output_head(module)
            if return_outputs or not model.training or "labels" not in inputs or head is None:
                return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            labels = inputs["labels"]
            with hidden_states_as_logits(module, head):
                hidden = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
            # The model's loss divides by num_items_in_batch only when it is passed the count (then the
            # Trainer does not divide by the accumulation steps again); mirror exactly that.
            divisor = num_items_in_batch if self.model_accepts_loss_kwargs else None
            with self.accelerator.autocast():
                loss = causal_lm_loss(hidden, head.weight, labels, divisor)
            if divisor is not None and getattr(self.args, "average_tokens_across_devices", False):
                loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss (1 on one GPU)
            return loss

    return ChunkedLossTrainer


@dataclass
class TrainingData:
    """The tokenized examples of one run, and the task they were made for (which decides how they are
    batched, and what evaluation reports: seq-cls batches one label per row and adds accuracy and F1)."""

    train: Any
    eval: Any = None
    task: str = "causal-lm"


@dataclass
class RunLog:
    """Where a run's rows go as they are logged: `history` (the session's, across runs), each row
    tagged with `run`, this run's index."""

    history: list = field(default_factory=list)
    run: int = 0
    steps_kept: int = 0  # set as the run ends: the optimizer steps the adapter keeps (0: none, or put back)


def run_training(model, tokenizer, config: TrainConfig, data: TrainingData, reporter: Reporter,
                 log: RunLog | None = None, stop: StopFlag | None = None, overrides: dict | None = None,
                 callbacks: list | None = None):
    """Train `model` in place. Returns a TrainSummary. Rows are appended to `log.history` as they come.

    overrides: settings to force over `choose_settings`' choice (benchmarks compare layouts this way:
    {"batch": "4x4", "packing": False, "gradient_checkpointing": True, "bf16_stream": False,
    "chunked_loss": False, ...}).
    callbacks: extra transformers TrainerCallbacks.
    """
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    stop = stop if stop is not None else StopFlag()  # an unset StopFlag is falsy
    log = log if log is not None else RunLog()
    device = str(next(model.parameters()).device)
    settings = run_settings(config, device, model, data.train, overrides)
    run_dir = Path(config.output_dir) if config.output_dir else default_run_dir()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file in the way, no permission, a read-only disk
        raise ConfigError(f"Cannot use {str(run_dir)!r} as output_dir ({error.strerror or error}): choose another folder.") from None
    if not settings["gradient_checkpointing"] and getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()  # left on by an earlier run that needed it
    with contextlib.closing(SummaryWriter(log_dir=str(run_dir / "tensorboard"))) as writer:
        args = training_arguments(config, settings, run_dir, device, evaluate=data.eval is not None)
        watcher = _make_callback(reporter, log, stop, device)
        trainer = build_trainer(model, tokenizer, args, settings, data,
                                [TensorBoardCallback(tb_writer=writer), watcher] + list(callbacks or []))
        return _train(trainer, model, settings, reporter, log, stop, run_dir, watcher)


def run_settings(config: TrainConfig, device: str, model, train_set, overrides: dict | None = None) -> dict:
    """What the run uses: `choose_settings`' choice for this model and data, with `overrides` forced over it
    (a "batch" override may be a BatchLayout or its "4x4" form)."""
    lengths = [len(ids) for ids in train_set["input_ids"]]
    settings = choose_settings(config, device, len(train_set), model=model, lengths=lengths)
    settings.update(overrides or {})
    settings["batch"] = BatchLayout.of(settings["batch"])
    return settings


def training_arguments(config: TrainConfig, settings: dict, run_dir: Path, device: str, evaluate: bool):
    """transformers' TrainingArguments for the config and the chosen settings; `evaluate`: there is an eval set."""
    from transformers import TrainingArguments

    batch = settings["batch"]
    return TrainingArguments(
        output_dir=str(run_dir),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        per_device_train_batch_size=batch.micro,
        per_device_eval_batch_size=batch.micro,
        gradient_accumulation_steps=batch.accum,
        learning_rate=config.lr,
        warmup_steps=config.warmup,
        lr_scheduler_type=config.scheduler,
        weight_decay=config.weight_decay,
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=config.eval_steps or max(1, settings["steps"] // 5),
        eval_on_start=evaluate,  # the "before" point of the eval curve
        save_strategy="no",  # %qlora_save writes the adapter; no multi-GB checkpoints by surprise
        report_to="none",  # TensorBoard is added as a callback, with our own folder
        bf16=settings["precision"] == "bf16",
        fp16=settings["precision"] == "fp16",
        use_cpu=device == "cpu",
        gradient_checkpointing=settings["gradient_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False},
        # A packed batch has no pad token (and no attention mask to count them by).
        include_num_input_tokens_seen="all" if settings["packing"] else "non_padding",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_pin_memory=device != "cpu",
        log_level="warning",
        logging_nan_inf_filter=False,  # a NaN loss is logged as NaN (so the run ends), not hidden by the average
        optim=settings.get("optimizer", "adamw_torch"),
    )


def build_trainer(model, tokenizer, args, settings: dict, data: TrainingData, callbacks: list):
    """The Trainer for the run: the chunked loss and real-token counting when the settings ask for them,
    the collator for the task and the packing, and `callbacks` in place of the one that prints log dicts."""
    from transformers import PrinterCallback

    from .classification import classification_metrics
    from .data import make_collator, pad_id

    rounded = settings["packing"] and (settings.get("pad_packed_to") or 1) > 1
    trainer = _trainer_class(settings.get("chunked_loss", False), pad_id(tokenizer) if rounded else None)(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=make_collator(tokenizer, packing=settings["packing"], task=data.task,
                                     pad_to_multiple_of=settings.get("pad_packed_to")),
        compute_metrics=classification_metrics if data.task == "seq-cls" else None,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; the reporter shows them
    return trainer


def _train(trainer, model, settings: dict, reporter: Reporter, log: RunLog, stop: StopFlag, run_dir: Path,
           watcher) -> TrainSummary:
    """trainer.train() inside the run's context managers, then the summary. The reporter gets its end
    event however the run ends: completed, interrupted (Stop, Ctrl-C) or failed (then the error is raised).
    A loss gone NaN/inf (seen by `watcher`, the EventsCallback), or weights left so by the last step, fail the
    run with DivergedError, the trainable weights put back as they were before it."""
    import torch

    from .bnb_cpu import trainable_4bit
    from .speed import bf16_stream, dequantized_int8_training, no_kv_cache

    history = log.history
    evaluates = trainer.eval_dataset is not None
    stream_dtype = torch.bfloat16 if settings.get("bf16_stream") else None
    first_row = len(history)
    before = _trainable_weights(model)
    reporter.start({"total_steps": settings["steps"], "settings": settings, "run_dir": str(run_dir)})
    started = time.perf_counter()
    status, error = "completed", None
    try:
        with trainable_4bit(model), stop_on_interrupt(stop), no_kv_cache(model), bf16_stream(model, stream_dtype), \
                dequantized_int8_training(settings.get("int8_dequant", False)):
            trainer.train()
            diverged = watcher.diverged or _weights_diverged(model, trainer.state.global_step)
            if not (stop or diverged) and evaluates and (not history or history[-1].get("eval_loss") is None):
                trainer.evaluate()  # the "after" point, when the last step was not an eval step
        if diverged:
            _put_back(model, before)
            what, step = diverged
            status, error = "failed", DivergedError(
                f"The {what} at step {step}: the adapter is back to its weights before this run; "
                f"lower --lr (now {trainer.args.learning_rate:g}).")
        elif stop:
            status = "interrupted"
    except KeyboardInterrupt:
        status = "interrupted"  # a second Ctrl-C: the step in flight is lost, earlier ones are kept
    except BaseException as exc:
        status, error = "failed", exc
    finally:
        model.eval()
        log.steps_kept = 0 if isinstance(error, DivergedError) else trainer.state.global_step
        summary = TrainSummary.from_history(
            history[first_row:], status=status, steps_planned=settings["steps"], seconds=time.perf_counter() - started,
            run_dir=str(run_dir), settings=settings, steps_done=trainer.state.global_step,
        )
        reporter.end(summary)
    if error is not None:
        raise error
    return summary


def _trainable_weights(model) -> dict:
    """A copy of the weights the run trains (LoRA, a classifier's head): small, and kept on the CPU, so a
    diverged run can be put back without holding device memory."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


def _weights_diverged(model, step):
    """Whether the last step left a trainable weight NaN/inf (no loss was logged after it): one check per run."""
    import torch

    weights = [p for p in model.parameters() if p.requires_grad]
    if weights and not torch.stack([p.isfinite().all() for p in weights]).all():
        return ("adapter's weights became NaN or infinite", step)
    return None


def _put_back(model, weights: dict):
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in weights:
                p.copy_(weights[name])


@dataclass(repr=False)
class TrainSummary(Readout):
    """What a training run did: status, steps, loss before/after, speed, memory, where its files are."""

    status: str
    steps_done: int
    steps_planned: int
    seconds: float
    run_dir: str
    settings: dict = field(default_factory=dict)
    history: list = field(default_factory=list)

    title = "Training"

    @classmethod
    def from_history(cls, rows, **kw):
        return cls(history=list(rows), **kw)

    def _series(self, key):
        return [r[key] for r in self.history if r.get(key) is not None]

    @property
    def train_loss(self):
        losses = self._series("loss")
        return (losses[0], losses[-1]) if losses else (None, None)

    @property
    def eval_loss(self):
        losses = self._series("eval_loss")
        return (losses[0], losses[-1]) if losses else (None, None)

    @property
    def seconds_per_step(self):
        return self.seconds / self.steps_done if self.steps_done else None

    @property
    def tokens_per_second(self):
        speeds = self._series("tokens_per_second")[1:]  # the first step includes warm-up
        return sum(speeds) / len(speeds) if speeds else None

    def rows(self):
        first, last = self.train_loss
        rows = [("status", self.status), ("steps", f"{self.steps_done}/{self.steps_planned}")]
        if first is not None:
            rows.append(("train loss", f"{first:.4f} -> {last:.4f}"))
        evaluations = [(r["step"], r["eval_loss"]) for r in self.history if r.get("eval_loss") is not None]
        if evaluations:
            rows.append(("eval loss", _eval_losses(evaluations, self.steps_done)))
        accuracy, f1 = self._series("accuracy"), self._series("f1")
        if accuracy:
            rows.append(("eval accuracy", f"{accuracy[0]:.1%} -> {accuracy[-1]:.1%} (macro F1 {f1[0]:.3f} -> {f1[-1]:.3f})"))
        rows.append(("time", f"{self.seconds:.1f} s" + (f" ({self.seconds_per_step:.2f} s/step)" if self.seconds_per_step else "")))
        if self.tokens_per_second:
            rows.append(("tokens/s", f"{self.tokens_per_second:,.0f}"))
        peak = max(self._series("memory"), default=None)
        if peak:
            rows.append(("peak memory", gb(peak)))
        rows.append(("settings", ", ".join(f"{k}={v}" for k, v in self.settings.items())))
        rows.append(("TensorBoard", f"{self.run_dir}/tensorboard"))
        if self.status == "interrupted":
            rows.append(("note", f"stopped at step {self.steps_done}; the adapter keeps what it learned so far"))
        return rows

    def _repr_html_(self):
        from ..display.chart import loss_chart_png, png_img_tag

        table = super()._repr_html_()
        return table + (png_img_tag(loss_chart_png(self.history)) if self.history else "")


def _eval_losses(evaluations, steps_done) -> str:
    """The eval loss before -> after; a run stopped between evaluations says which ones it has."""
    (first_step, first), (last_step, last) = evaluations[0], evaluations[-1]
    if len(evaluations) == 1:
        when = "before training" if first_step == 0 else f"at step {first_step}"
        return f"{first:.4f} ({when}; the run stopped before the next evaluation)"
    text = f"{first:.4f} -> {last:.4f}"
    return text if last_step >= steps_done else f"{text} (at step {last_step}; the run stopped at step {steps_done})"
