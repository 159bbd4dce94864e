"""Fine-tuning: what `qlora_magic.train` does. The rows and templates are checked and tokenized for the
loaded model's task before the model is touched; then one Trainer run updates the active adapter, and
the run is recorded in the session (its config, and the history rows as they are logged) once it has
changed the adapter: a run that fails before its first step, or whose loss diverged, leaves no record."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import TrainConfig
from ..engine.adapter_folder import TrainRun
from ..engine.data import ROW_INDEX, ClassificationExamples, ConversationExamples, ExampleTokenizer, Seq2SeqExamples
from ..errors import ConfigError


def finetune(session, config: TrainConfig, reporter=None, stop=None, callbacks=None, run_folder=True, resume=None,
             overrides=None):
    """Train the session's active adapter as `config` says; returns the TrainSummary.
    `callbacks`: extra transformers TrainerCallbacks (tuning prunes trials through one).
    `run_folder`: keep a run folder (run.json, history.jsonl, checkpoints) under config.output_dir (True), keep none
    (False: tuning's trials), or train in one made already (a RunFolder: a worker process of tasks.multi_process). `resume`: a ResumePoint (tasks.resuming) to carry on from, its model already loaded.
    `overrides`: settings forced over the chosen ones (run_training's; a worker relaunched after running out of memory)."""
    from ..display import choose_reporter
    from ..engine.data import prepare_datasets
    from ..engine.data_checks import raise_if_fatal
    from ..engine.training import RunLog, TrainingData, run_training

    model = session.require_model("training")
    task = session.task
    if task != "causal-lm":
        if config.packing:
            raise ConfigError(f"--packing is for causal-lm models; a {task} model trains on padded batches: drop --packing.")
        config = config.replace(packing=False)
    # Everything that can fail on bad input runs before the model is touched.
    rows, examples, checked = _checked_rows(session, config, resume.rows if resume is not None else None)
    raise_if_fatal(checked)  # nothing to learn, or nothing that teaches the model to stop: one line, no GPU time
    train_set, eval_set, _ = prepare_datasets(rows, examples, config.eval_split, seed=config.seed)
    reporter = reporter or choose_reporter(config.display)
    if task == "seq-cls":
        set_class_names(model, examples.names)
    first_row = len(session.history)  # the rows from here on go if the run leaves the adapter as it was
    if resume is not None:  # the run is the checkpoint's last one, its rows so far already in the history
        run, index = session.runs[-1], len(session.runs) - 1
        run_rows = next((i for i, row in enumerate(session.history) if row.get("run") == index), first_row)
    else:
        run, index = TrainRun.of(config, label_names=examples.names if task == "seq-cls" else None), len(session.runs)
        run_rows = first_row
    log = RunLog(session.history, run=index, first_row=run_rows)
    checkpointing = None
    if resume is not None:
        checkpointing = resume.checkpointing(session, config)
    elif run_folder is True:
        from .resuming import start_run_folder

        checkpointing = start_run_folder(session, config, rows, run, index)
    elif run_folder:  # a folder made already (a worker process trains the run its launcher wrote)
        from .resuming import continue_run_folder

        checkpointing = continue_run_folder(session, config, run_folder, run, index)
    try:
        summary = run_training(model, session.tokenizer, config, TrainingData(train_set, eval_set, task), reporter,
                               log, stop=stop, overrides=overrides, callbacks=callbacks, checkpointing=checkpointing)
    except BaseException:
        if checkpointing is not None and checkpointing.folder.record.get("status") == "running":
            checkpointing.folder.update(status="failed")  # it failed before training began
            checkpointing.folder.close()
        raise
    finally:
        if log.steps_kept:  # the adapter changed: the record says how, however the run ended
            if resume is None:
                session.runs.append(run)
        else:  # it failed before its first step, or was put back: no trace (%qlora_save would record it)
            del session.history[first_row:]
    summary.notes = [f"{f.topic}: {f.found}" for f in checked.warnings]  # the details: %%qlora_data
    session.last_train_summary = summary
    return summary


def check_data(session, config: TrainConfig):
    """The data check of `config`'s rows, tokenized for the session's model as `finetune` would tokenize them;
    returns the DataReport. Reads only: the model, the session and the data are left as they were."""
    session.require_model("the data check (it tokenizes with the model's tokenizer)")
    return _checked_rows(session, config)[2]


def _checked_rows(session, config, rows=None):
    """(rows, their row tokenizer for the loaded task, the data check of them); the rows are read from
    config.data unless given (a resumed run's)."""
    from ..engine.data import load_rows
    from ..engine.data_checks import check_examples

    if rows is None:
        rows = load_rows(config.data, config.split)  # no data: one line there
    examples = task_examples(session, config, rows)
    return rows, examples, check_examples(rows, examples, getattr(session.model, "generation_config", None))


def task_examples(session, config, rows):
    """The row tokenizer for the loaded model's task (checked against the templates given)."""
    from ..engine.data import label_names

    task = session.task
    if config.messages is not None:
        return conversation_examples(session, config.messages, config.max_length)
    if task == "seq-cls":
        if not config.label:
            raise ConfigError("A seq-cls model trains on classes: add label: <column> to the cell body (label= in Python).")
        names = label_names(rows, config.label)
        previous = session.label_names
        if previous and set(map(str, names)) <= set(map(str, previous)):
            names = previous  # the ids an earlier run (or the restored adapter) gave these classes
        head = session.model.config.num_labels
        if len(names) > head:
            shown = ", ".join(map(str, names[:6])) + (", ..." if len(names) > 6 else "")
            raise ConfigError(f"The data has {len(names)} classes ({shown}) but the model was loaded for {head}: reload with --num-labels {len(names)}.")
        names = list(names) + [f"LABEL_{i}" for i in range(len(names), head)]
        return ClassificationExamples(session.tokenizer, config.prompt, config.label, names, max_length=config.max_length)
    if config.label:
        raise ConfigError(f"label: is for --task seq-cls models; this one is {task}: give a response: template instead.")
    if config.response is None:
        raise ConfigError("The cell body needs a response: template, e.g. response: \"{answer}\".")
    if task == "seq2seq":
        return Seq2SeqExamples(session.tokenizer, config.prompt, config.response, max_length=config.max_length)
    return ExampleTokenizer(session.tokenizer, config.prompt, config.response, chat=config.chat, max_length=config.max_length)


def conversation_examples(session, column: str, max_length: int) -> ConversationExamples:
    """The row tokenizer of a messages: column (training and evaluation), for a causal-lm model only."""
    if session.task != "causal-lm":
        raise ConfigError(f"messages: trains a causal-lm model on chat conversations; this one is {session.task}: give "
                          "prompt: and response: (or label:) instead.")
    return ConversationExamples(session.tokenizer, column, max_length=max_length)


def set_class_names(model, names):
    """Name a classifier's classes in its config (id2label/label2id), as training learned them."""
    model.config.id2label = {i: str(name) for i, name in enumerate(names)}
    model.config.label2id = {str(name): i for i, name in enumerate(names)}


@dataclass
class HeldOut:
    """The rows a training run held out: raw (for prompts and references) and tokenized as training saw them."""

    rows: object  # datasets.Dataset of the raw held-out rows, in the eval set's order
    tokenized: object  # datasets.Dataset: the run's eval set, token for token


def held_out(session, run: TrainRun) -> HeldOut:
    """The rows `run` (the session's last training run) held out for evaluation, made again exactly as training
    made them: the same rows, split, templates, max_length and seed. Raises ConfigError (one line) when there are
    none to make (`why_no_held_out`): nothing held out, or in-memory rows not saved with the adapter."""
    from ..engine.data import load_rows, prepare_datasets
    from ..engine.quiet import no_progress_bars

    reason = why_no_held_out(run)
    if reason:
        raise ConfigError(reason)
    rows = load_rows(run.data, run.config.split)
    indexed = rows.add_column(ROW_INDEX, list(range(len(rows))))
    examples = keeping_row_index(task_examples(session, run.config, indexed))
    _, eval_set, _ = prepare_datasets(indexed, examples, run.config.eval_split, seed=run.config.seed)
    # Tables of their own (the held-out rows are few): rows picked from a larger table are flattened by the first
    # change of their columns (a check adds one), and datasets shows a progress bar for that in the cell.
    with no_progress_bars():
        return HeldOut(rows.select(eval_set[ROW_INDEX]).flatten_indices(), eval_set.remove_columns(ROW_INDEX))


def why_no_held_out(run: TrainRun) -> str | None:
    """Why `held_out` cannot make `run`'s held-out rows again (one line that says what to do), or None."""
    if not run.config.eval_split:
        return "The last training run held nothing out (no eval_split): pass data= to evaluate on, or train with eval_split: 0.1."
    if run.data is None:
        return (f"The last training run trained on in-memory data ({run.source.to_json()}), which was not saved "
                "with the adapter: pass data= to evaluate on.")
    return None


class _KeepsRowIndex:
    def __call__(self, row):
        return {**super().__call__(row), ROW_INDEX: row[ROW_INDEX]}


class _IndexedExamples(_KeepsRowIndex, ExampleTokenizer):
    pass


class _IndexedSeq2SeqExamples(_KeepsRowIndex, Seq2SeqExamples):
    pass


class _IndexedClassificationExamples(_KeepsRowIndex, ClassificationExamples):
    pass


class _IndexedConversationExamples(_KeepsRowIndex, ConversationExamples):
    pass


_INDEXED = {ExampleTokenizer: _IndexedExamples, Seq2SeqExamples: _IndexedSeq2SeqExamples,
            ClassificationExamples: _IndexedClassificationExamples, ConversationExamples: _IndexedConversationExamples}


def keeping_row_index(examples):
    """The same row tokenizer, which also keeps each row's ROW_INDEX column through tokenization (the split is
    made after tokenization, so this is how a held-out row is found again among the raw rows)."""
    indexed = object.__new__(_INDEXED[type(examples)])  # module-level classes: datasets can hash them
    vars(indexed).update(vars(examples))
    return indexed
