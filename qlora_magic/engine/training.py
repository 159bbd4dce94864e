"""One training run with transformers' Trainer: callbacks feed the session history and the reporter;
Ctrl-C (a kernel interrupt) stops at the next step boundary and keeps what was learned; a loss that becomes
NaN or infinite ends the run there and puts the adapter back as it was before the run."""

from __future__ import annotations

import contextlib
import datetime
import math
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from ..config import TrainConfig, parse_trackers
from ..display.formatting import Readout, gb
from ..display.reporters import Reporter
from ..errors import ConfigError, DivergedError, OutOfMemory
from .data import PIECES
from .distributed import per_rank_layout, rank_memory, training_device, world
from .speed import BatchLayout, choose_settings, whole_tensor
from .stopping import StopFlag, stop_on_interrupt
from .trackers import PROJECT, recorder, trackers_for_run, trainer_report_to


def _make_callback(reporter: Reporter, log: RunLog, stop: StopFlag, device: str, folder=None):
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
            if folder is not None:
                folder.append(row)
            reporter.log(row, self.progress(state), log.history)

    return EventsCallback()


def _checkpoint_callback(every_seconds: float | None):
    """Asks the Trainer to write a checkpoint every `every_seconds` (None: only at evaluations) and after each
    evaluation, so a run killed at any moment loses at most that much time."""
    from transformers import TrainerCallback

    class CheckpointCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            if every_seconds is not None and time.monotonic() - self.last >= every_seconds:
                control.should_save = True

        def on_evaluate(self, args, state, control, **kwargs):
            if state.global_step > 0:  # not the "before" evaluation: nothing is learned yet
                control.should_save = True

        def on_save(self, args, state, control, **kwargs):
            self.last = time.monotonic()

    return CheckpointCallback()


def _memory_now(device):
    import torch

    if device.startswith("cuda"):
        return {"memory": torch.cuda.memory_allocated(), "memory_kind": "GPU allocated"}
    import psutil

    return {"memory": psutil.Process().memory_info().rss, "memory_kind": "CPU RSS"}


def default_run_dir() -> Path:
    return Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def _trainer_class(chunked_loss: bool, rounded_pad_id: int | None = None):
    """transformers' Trainer, whose checkpoints go whole into the run folder (`CheckpointingTrainer`) and which
    trains a micro-batch the collator split by tokens as its pieces (`PieceTrainer`); one whose training and
    evaluation loss come from `speed.causal_lm_loss` (same numbers, without the batch's logits; an evaluation
    with metrics keeps the model's own loss, it returns the logits), and which, when packed batches are rounded
    up (rounded_pad_id given), counts tokens without the pad segment."""
    base = _piece_trainer(_chunked_loss_trainer() if chunked_loss else _checkpointing_trainer())
    if rounded_pad_id is None:
        return base
    from .data import packed_real_tokens

    class RealTokensTrainer(base):
        def _track_num_input_tokens(self, inputs):  # transformers >= 5.2x; older ones count the pad too
            inputs = {k: v for k, v in inputs.items() if k != PIECES}
            self.state.num_input_tokens_seen += packed_real_tokens(inputs, rounded_pad_id)

    return RealTokensTrainer


def _piece_trainer(base):
    class PieceTrainer(base):
        """A packed micro-batch over the run's token cap comes with its examples regrouped into pieces
        (data.PIECES, made by the collator): each piece is a forward and backward of its own, their gradients
        add up to the whole micro-batch's, since each piece's loss is its sum over the step's label count
        (num_items_in_batch). Without that count (a model whose loss takes no such argument) the micro-batch
        is trained whole."""

        def training_step(self, model, inputs, num_items_in_batch=None):
            pieces = inputs.pop(PIECES, None)
            if not pieces or num_items_in_batch is None:
                return super().training_step(model, inputs, num_items_in_batch)
            loss = 0
            for index, piece in enumerate(pieces):
                last = index == len(pieces) - 1
                # With several processes only the last backward of the micro-batch syncs the gradients.
                sync = contextlib.nullcontext() if last or self.accelerator.num_processes == 1 else self.accelerator.no_sync(model)
                with sync:
                    loss = loss + super().training_step(model, piece, num_items_in_batch)
            return loss

        def prediction_step(self, model, inputs, *args, **kwargs):
            inputs.pop(PIECES, None)
            return super().prediction_step(model, inputs, *args, **kwargs)

    return PieceTrainer


def _checkpointing_trainer():
    from transformers import Trainer

    class CheckpointingTrainer(Trainer):
        """Writes each checkpoint into `run_folder` (a RunFolder) whole: the adapter, optimizer, scheduler, RNG
        and Trainer state as transformers writes them, plus `checkpoint_extras(folder)` (the tokenizer and run
        record that make it a loadable adapter folder), into a staging folder renamed into place."""

        run_folder = None
        checkpoint_extras = None

        def _save_checkpoint(self, model, trial):
            if self.run_folder is None:
                return
            self.store_flos()  # a collective under torch.distributed: every rank comes here at the same step
            if self.args.world_size > 1:
                self._save_checkpoint_of_ranks()
                return
            self.run_folder.write_checkpoint(self.state.global_step, self._checkpoint_files)

        def _save_checkpoint_of_ranks(self):
            """Every rank writes its part (its RNG state; under FSDP the gathered weights and optimizer state are
            collectives too) into one staging folder of the run folder; rank 0 then moves it into the checkpoint,
            whole (write_checkpoint). On machines that do not share the run folder, the other ranks' parts stay
            in their own copy and are removed."""
            import shutil

            import torch.distributed as dist

            from .run_folder import CHECKPOINTS

            staging = self.run_folder.path / CHECKPOINTS / f".step-{self.state.global_step:06d}.ranks"
            if self.is_world_process_zero():
                shutil.rmtree(staging, ignore_errors=True)
            dist.barrier()
            staging.mkdir(parents=True, exist_ok=True)
            self._checkpoint_files(staging)
            dist.barrier()

            def move_parts(folder):
                for part in staging.iterdir():
                    shutil.move(str(part), str(folder / part.name))

            self.run_folder.write_checkpoint(self.state.global_step, move_parts)  # rank 0 only writes
            if self.is_world_process_zero():
                shutil.rmtree(staging, ignore_errors=True)
            dist.barrier()
            shutil.rmtree(staging, ignore_errors=True)  # another machine's own copy (a shared one is gone already)

        def _checkpoint_files(self, folder):
            self.save_model(str(folder), _internal_call=True)  # writes on rank 0 (under FSDP every rank gathers)
            self._save_optimizer_and_scheduler(str(folder))
            self._save_scaler(str(folder))
            self._save_rng_state(str(folder))  # under torch.distributed: one file per rank
            if self.is_world_process_zero():
                self.state.save_to_json(str(folder / "trainer_state.json"))
                if self.checkpoint_extras is not None:
                    self.checkpoint_extras(folder)

    return CheckpointingTrainer


def _chunked_loss_trainer():
    from .speed import causal_lm_loss, hidden_states_as_logits, output_head

    class ChunkedLossTrainer(_checkpointing_trainer()):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            module = self.accelerator.unwrap_model(model)
            head = output_head(module)
            # Evaluation asks for the outputs; with no metrics to compute from them (a language model's eval
            # loss) the loss alone is returned, so the eval batch's logits (10 bytes per token and vocabulary
            # entry: 10 GB for 8,192 tokens at a 128k vocabulary) are not made either.
            loss_only = return_outputs and not model.training and self.compute_metrics is None
            if (return_outputs and not loss_only) or "labels" not in inputs or head is None:
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
            return (loss, {"loss": loss}) if return_outputs else loss

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
    first_row: int | None = None  # where this run's rows start (a resumed run's include those before it stopped)
    steps_kept: int = 0  # set as the run ends: the optimizer steps the adapter keeps (0: none, or put back)


@dataclass
class Checkpointing:
    """A run that keeps a run folder: its rows go to history.jsonl as they are logged, and checkpoints go to
    checkpoints/ every `every_minutes` (None: only after evaluations), after each evaluation and at the end.

    extras(folder): writes what else a checkpoint holds (the tokenizer and run record that make it an adapter
        folder %qlora_load --adapter takes). resume_from: a checkpoint to carry on from (adapter, optimizer,
        scheduler, data position and RNG restored by the Trainer)."""

    folder: Any  # run_folder.RunFolder
    every_minutes: float | None = 10
    extras: Any = None
    resume_from: Path | None = None


def run_training(model, tokenizer, config: TrainConfig, data: TrainingData, reporter: Reporter,
                 log: RunLog | None = None, stop: StopFlag | None = None, overrides: dict | None = None,
                 callbacks: list | None = None, checkpointing: Checkpointing | None = None):
    """Train `model` in place. Returns a TrainSummary. Rows are appended to `log.history` as they come.

    overrides: settings to force over `choose_settings`' choice (benchmarks compare layouts this way:
    {"batch": "4x4", "packing": False, "gradient_checkpointing": True, "bf16_stream": False,
    "chunked_loss": False, ...}).
    callbacks: extra transformers TrainerCallbacks.
    checkpointing: the run folder to keep (Checkpointing); without it, TensorBoard files go to
    `config.output_dir` (or runs/<time>) and nothing else is written.
    """
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    stop = stop if stop is not None else StopFlag()  # an unset StopFlag is falsy
    log = log if log is not None else RunLog()
    device = training_device(model)
    settings = run_settings(config, device, model, data.train, overrides)
    if checkpointing is not None:
        run_dir = checkpointing.folder.path
    else:
        run_dir = Path(config.output_dir) if config.output_dir else default_run_dir()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file in the way, no permission, a read-only disk
        raise ConfigError(f"Cannot use {str(run_dir)!r} as output_dir ({error.strerror or error}): choose another folder.") from None
    if not settings["gradient_checkpointing"] and getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()  # left on by an earlier run that needed it
    trackers = parse_trackers(config.report_to)
    # The store of a tracker like MLflow sits beside the run folders, so it holds every run of this output_dir.
    output_root = run_dir.parent if checkpointing is not None else Path(config.output_dir or "runs")
    with contextlib.ExitStack() as stack:
        resumed = checkpointing.folder.record.get("trackers") if checkpointing and checkpointing.resume_from else None
        tracked = stack.enter_context(trackers_for_run(trackers, output_root, note=reporter.note, resume=resumed))
        extra = []
        if "tensorboard" in trackers:
            writer = stack.enter_context(contextlib.closing(SummaryWriter(log_dir=str(run_dir / "tensorboard"))))
            extra.append(TensorBoardCallback(tb_writer=writer))
        watcher = _make_callback(reporter, log, stop, device, checkpointing and checkpointing.folder)
        extra.append(watcher)
        if checkpointing is not None:
            every = checkpointing.every_minutes
            extra.append(_checkpoint_callback(every * 60 if every else None))
            extra.append(recorder(trackers, checkpointing.folder))
        extra += list(callbacks or [])
        if settings.get("ranks", 1) > 1:  # last: the ranks agree on what the callbacks before asked for
            from .distributed import STOP_FILE, stop_callback

            extra.append(stop_callback(stop, checkpointing and checkpointing.folder.path / STOP_FILE))

        def make_trainer(settings: dict, resuming: bool):
            args = training_arguments(config, settings, run_dir, device, evaluate=data.eval is not None, resuming=resuming,
                                      run_name=run_dir.name if checkpointing is not None else (config.name or run_dir.name))
            trainer = build_trainer(model, tokenizer, args, settings, data, extra)
            tracked.watch(trainer)
            if checkpointing is not None:
                trainer.run_folder, trainer.checkpoint_extras = checkpointing.folder, checkpointing.extras
            return trainer

        return _train(make_trainer, model, settings, reporter, log, stop, run_dir, watcher, checkpointing)


def run_settings(config: TrainConfig, device: str, model, train_set, overrides: dict | None = None) -> dict:
    """What the run uses: `choose_settings`' choice for this model and data, with `overrides` forced over it
    (a "batch" override may be a BatchLayout or its "4x4" form)."""
    lengths = [len(ids) for ids in train_set["input_ids"]]
    settings = choose_settings(config, device, len(train_set), model=model, lengths=lengths, rank_memory=rank_memory)
    settings.update(overrides or {})
    settings["batch"] = BatchLayout.of(settings["batch"])
    workers = world()
    # The effective batch is kept: each rank takes its share of the accumulation. FSDP runs sharded even as the
    # only rank of a launch (one GPU then runs the code path of several).
    if workers.distributed or (workers.launched and config.strategy == "fsdp"):
        settings["batch"] = per_rank_layout(settings["batch"], workers.size)
        settings["ranks"] = workers.size
        settings["strategy"] = config.strategy or "ddp"
    return settings


def training_arguments(config: TrainConfig, settings: dict, run_dir: Path, device: str, evaluate: bool,
                       resuming: bool = False, run_name: str | None = None):
    """transformers' TrainingArguments for the config and the chosen settings; `evaluate`: there is an eval set;
    `resuming`: the run goes on from a checkpoint (its "before" evaluation was made before it stopped);
    `run_name`: the run's name in the trackers."""
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
        eval_on_start=evaluate and not resuming,  # the "before" point of the eval curve
        save_strategy="no",  # checkpoints are asked for by CheckpointCallback, and written by CheckpointingTrainer
        # TensorBoard is added as a callback, with our own folder; the other trackers are the Trainer's integrations
        report_to=trainer_report_to(parse_trackers(config.report_to)),
        run_name=run_name or run_dir.name,
        project=PROJECT,  # trackio's project
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
        **distributed_arguments(settings),
    )


def distributed_arguments(settings: dict) -> dict:
    """TrainingArguments for worker processes: DDP registers only the LoRA weights (the frozen base has no
    gradient to wait for); FSDP2 shards the model (its 4-bit weights stored in the compute dtype,
    bnb_4bit_quant_storage, so FSDP can flatten them with the rest), on one rank too."""
    if settings.get("ranks", 1) <= 1 and settings.get("strategy") != "fsdp":
        return {}
    arguments = {"ddp_find_unused_parameters": False}
    if settings["device"] == "cpu":
        arguments["ddp_backend"] = "gloo"
    if settings.get("strategy") == "fsdp":
        arguments.update(fsdp=True, fsdp_config={
            "version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "reshard_after_forward": True,
            "state_dict_type": "FULL_STATE_DICT", "cpu_ram_efficient_loading": False,
        })
    return arguments


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
                                     pad_to_multiple_of=settings.get("pad_packed_to"),
                                     max_tokens=settings.get("max_tokens") if settings["packing"] else None),
        compute_metrics=classification_metrics if data.task == "seq-cls" else None,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; the reporter shows them
    layers, offload = settings.get("checkpointed_layers"), bool(settings.get("offload_checkpoints"))
    if settings["gradient_checkpointing"] and (layers is not None or offload):
        trainer.add_callback(_checkpoints_callback(layers, offload, bool(settings.get("compile"))))
    return trainer


def _checkpoints_callback(layers: int | None, offload: bool, compiled: bool):
    """Once the Trainer has turned checkpointing on (at the start of train()): only the first `layers` layers
    checkpointed, and their checkpoints in CPU memory with `offload`, compiled inside the offloading hooks in a
    `compiled` run (speed.arrange_checkpoints)."""
    from transformers import TrainerCallback

    from .speed import arrange_checkpoints

    class ArrangeCheckpoints(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is not None and not arrange_checkpoints(model, layers, offload, compiled) and offload:
                raise RuntimeError("offload_checkpoints: the model has no checkpointed layers")

    return ArrangeCheckpoints()


def _train(make_trainer, model, settings: dict, reporter: Reporter, log: RunLog, stop: StopFlag, run_dir: Path,
           watcher, checkpointing: Checkpointing | None = None) -> TrainSummary:
    """trainer.train() inside the run's context managers, then the summary. The reporter gets its end
    event however the run ends: completed, interrupted (Stop, Ctrl-C) or failed (then the error is raised).
    A loss gone NaN/inf (seen by `watcher`, the EventsCallback), or weights left so by the last step, fail the
    run with DivergedError, the trainable weights put back as they were before it."""
    import torch

    from .bnb_cpu import trainable_4bit
    from .speed import bf16_stream, compiled_layers, dequantized_int8_training, no_kv_cache

    history = log.history
    resume_from = checkpointing and checkpointing.resume_from
    trainer = make_trainer(settings, resuming=bool(resume_from))
    attempts = [trainer]  # the trainer that ran last (a new one after each out-of-memory back-off)
    evaluates = trainer.eval_dataset is not None
    stream_dtype = torch.bfloat16 if settings.get("bf16_stream") else None
    first_row = len(history) if log.first_row is None else log.first_row
    before = _trainable_weights(model)
    if checkpointing is not None:
        checkpointing.folder.mark_running(total_steps=settings["steps"], settings={k: str(v) for k, v in settings.items()})
    reporter.start({"total_steps": settings["steps"], "settings": settings, "run_dir": str(run_dir),
                    "history": history})
    started = time.perf_counter()
    status, error = "completed", None
    try:
        with trainable_4bit(model), stop_on_interrupt(stop), no_kv_cache(model), bf16_stream(model, stream_dtype), \
                dequantized_int8_training(settings.get("int8_dequant", False)), \
                compiled_layers(model, settings.get("compile", False)):
            trainer = _train_backing_off(attempts, make_trainer, settings, reporter, resume_from)
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
        trainer = attempts[-1]
        model.eval()
        log.steps_kept = 0 if isinstance(error, DivergedError) else trainer.state.global_step
        if checkpointing is not None:
            _end_run_folder(trainer, checkpointing.folder, status, error, log.steps_kept)
        summary = TrainSummary.from_history(
            history[first_row:], status=status, steps_planned=settings["steps"], seconds=time.perf_counter() - started,
            run_dir=str(run_dir), settings=settings, steps_done=trainer.state.global_step,
        )
        reporter.end(summary)
    if error is not None:
        raise error
    return summary


def _train_backing_off(attempts: list, make_trainer, settings: dict, reporter: Reporter, resume_from=None):
    """attempts[-1].train(); when a step runs out of GPU memory, its tensors are freed, the layout made smaller
    (`speed.smaller_layout`: the effective batch kept) and the run carried on from the same optimizer step by a
    new Trainer, resumed from a checkpoint of the last step (in the run folder, or a temporary one). Raises
    OutOfMemory (one line) when the smallest layout fails too. Returns the trainer that finished."""
    import tempfile

    import torch

    from .memory_usage import release_memory
    from .speed import smaller_layout

    scratch = None
    try:
        while True:
            trainer = attempts[-1]
            try:
                trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
                return trainer
            except torch.OutOfMemoryError as error:
                traceback.clear_frames(error.__traceback__)  # the failed step's activations go with its frames
                tried = _tried_bytes(str(error))
            trainer.model.zero_grad(set_to_none=True)  # the half-accumulated step is dropped, not applied
            release_memory()
            step, smaller = trainer.state.global_step, smaller_layout(settings)
            if settings.get("ranks", 1) > 1:  # the other ranks wait for this one: the launcher relaunches them all
                _leave_for_relaunch(trainer, settings, step, smaller, tried)
            if smaller is None:
                raise OutOfMemory(_out_of_memory_message(trainer, settings, step, tried)) from None
            was = _layout_text(settings)
            settings.update(smaller)
            trainer.state.train_batch_size = settings["batch"].micro  # what the resumed Trainer will use
            if trainer.run_folder is not None:
                trainer._save_checkpoint(trainer.model, None)
                resume_from = trainer.run_folder.latest_checkpoint()
            else:
                scratch = scratch or tempfile.TemporaryDirectory(prefix="qlora-backoff-")
                resume_from = Path(scratch.name) / f"step-{step}"
                resume_from.mkdir(exist_ok=True)
                trainer._checkpoint_files(resume_from)
            settings["out_of_memory"] = f"at step {step + 1}: {was} -> {_layout_text(settings)}"
            reporter.note(f"Out of GPU memory at step {step + 1}: carried on with {_layout_text(settings)} "
                          f"(was {was}); the effective batch is the same.")
            attempts.append(make_trainer(settings, resuming=True))
    finally:
        if scratch is not None:
            scratch.cleanup()


def _leave_for_relaunch(trainer, settings: dict, step: int, smaller: dict | None, tried: int | None) -> NoReturn:
    """A worker's step ran out of memory: the run folder is told what the next back-off is (or, when there is
    none, the one-line error), and this process ends at once (distributed.leave_out_of_memory)."""
    from .distributed import backoff_settings, leave_out_of_memory

    from .run_folder import checkpoint_step

    was = _layout_text(settings)
    if smaller is None:  # a worker writes no checkpoint as it leaves: the folder's last one is what is kept
        latest = trainer.run_folder.latest_checkpoint()
        kept = checkpoint_step(latest) if latest is not None else 0
        error = OutOfMemory(_out_of_memory_message(trainer, settings, step, tried, kept_step=kept))
        leave_out_of_memory(trainer.run_folder.path, step, None, was, error=error)
    changed = {**settings, **smaller}
    backoff = backoff_settings(changed)
    backoff["out_of_memory"] = f"at step {step + 1}: {was} -> {_layout_text(changed)}"
    leave_out_of_memory(trainer.run_folder.path, step, backoff, was, _layout_text(changed))


def _layout_text(settings: dict) -> str:
    checkpointing = " + gradient checkpointing" if settings["gradient_checkpointing"] else ""
    if checkpointing and settings.get("checkpointed_layers") is not None:
        checkpointing += f" of {settings['checkpointed_layers']} layers"
    checkpointing += " in CPU memory" if checkpointing and settings.get("offload_checkpoints") else ""
    return f"micro-batch {settings['batch'].micro} x {settings['batch'].accum}{checkpointing}"


def _tried_bytes(message: str) -> int | None:
    """The allocation that failed, from PyTorch's message ("Tried to allocate 2.00 GiB")."""
    match = re.search(r"Tried to allocate ([\d.]+) ([KMGT]i?B)", message)
    if not match:
        return None
    return int(float(match[1]) * 1024 ** ("KMGT".index(match[2][0]) + 1))


def _out_of_memory_message(trainer, settings: dict, step: int, tried: int | None, kept_step: int | None = None) -> str:
    """What ran out, what would have been needed, where the work is kept (`kept_step`: the run's last step, which
    its end writes as a checkpoint, unless given) and what to change."""
    import torch

    need = ""
    if settings["device"].startswith("cuda"):
        index = torch.device(settings["device"]).index or 0
        peak = torch.cuda.max_memory_allocated(index)
        total = torch.cuda.get_device_properties(index).total_memory
        need = f" (it needed about {gb(peak + (tried or 0))}; the GPU has {gb(total)})"
    kept = ""
    kept_step = step if kept_step is None else kept_step
    if trainer.run_folder is not None and kept_step:
        kept = f"; step {kept_step} is kept in {str(trainer.run_folder.path)!r} (%qlora_train --resume carries it on)"
    return (f"Training ran out of GPU memory at step {step + 1} even with {_layout_text(settings)}{need}{kept}: "
            "lower --max-length, load the model with --bits 4, or free GPU memory (%qlora_unload another model).")


def _end_run_folder(trainer, folder, status: str, error, steps_kept: int):
    """The last checkpoint (unless the adapter was put back, or the last one is of this step) and the status."""
    from .run_folder import checkpoint_step

    latest = folder.latest_checkpoint()
    if steps_kept and (latest is None or checkpoint_step(latest) != steps_kept):
        try:
            trainer._save_checkpoint(trainer.model, None)
        except Exception as problem:  # noqa: BLE001 - a full disk must not hide the run's own outcome
            folder.update(checkpoint_error=str(problem).splitlines()[0] if str(problem) else type(problem).__name__)
    folder.update(status=status, steps_done=trainer.state.global_step, ended_at=datetime.datetime.now().isoformat(timespec="seconds"),
                  error=None if error is None else (str(error).splitlines() or [type(error).__name__])[0])
    folder.close()


def _trainable_weights(model) -> dict:
    """A copy of the weights the run trains (LoRA, a classifier's head): small, and kept on the CPU, so a
    diverged run can be put back without holding device memory."""
    return {name: whole_tensor(p.detach()).to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


def _weights_diverged(model, step):
    """Whether the last step left a trainable weight NaN/inf (no loss was logged after it): one check per run."""
    import torch

    weights = [whole_tensor(p.detach()) for p in model.parameters() if p.requires_grad]
    if weights and not torch.stack([p.isfinite().all() for p in weights]).all():
        return ("adapter's weights became NaN or infinite", step)
    return None


def _put_back(model, weights: dict):
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in weights:
                continue
            if hasattr(p, "full_tensor"):  # sharded by FSDP2: each rank takes its shard of the same copy
                from torch.distributed.tensor import distribute_tensor

                p.copy_(distribute_tensor(weights[name].to(p.device), p.device_mesh, p.placements))
            else:
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
    notes: list = field(default_factory=list)  # the data check's warnings, one short line each

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
        rows += [("data check", note) for note in self.notes]
        rows.append(("run folder", self.run_dir))
        if (Path(self.run_dir) / "tensorboard").is_dir():  # --report-to without tensorboard writes none
            rows.append(("TensorBoard", f"{self.run_dir}/tensorboard"))
        if self.status == "interrupted":
            rows.append(("note", f"stopped at step {self.steps_done}; the adapter keeps what it learned so far "
                                 "(%qlora_train --resume carries the run on from its checkpoint)"))
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
