"""Fine-tuning: what `qlora_magic.train` does. The rows and templates are checked and tokenized for the
loaded model's task before the model is touched; then one Trainer run updates the active adapter, and
the run is recorded in the session (its config, and the history rows as they are logged)."""

from __future__ import annotations

from ..config import TrainConfig
from ..errors import ConfigError


def finetune(session, config: TrainConfig, reporter=None, stop=None, callbacks=None):
    """Train the session's active adapter as `config` says; returns the TrainSummary.
    `callbacks`: extra transformers TrainerCallbacks (tuning prunes trials through one)."""
    from ..display import choose_reporter
    from ..engine.data import load_rows, prepare_datasets
    from ..engine.training import RunLog, TrainingData, run_training

    model = session.require_model("training")
    if config.data is None:
        raise ConfigError("No data given: pass data= (a file, Hub id, list of dicts, DataFrame or Dataset).")
    task = session.task
    if task != "causal-lm":
        if config.packing:
            raise ConfigError(f"--packing is for causal-lm models; a {task} model trains on padded batches: drop --packing.")
        config = config.replace(packing=False)
    # Everything that can fail on bad input runs before the model is touched.
    rows = load_rows(config.data, config.split)
    examples = task_examples(session, config, rows)
    train_set, eval_set, _ = prepare_datasets(rows, examples, config.eval_split, seed=config.seed)
    reporter = reporter or choose_reporter(config.display)
    record = config.to_dict()
    if task == "seq-cls":
        record["label_names"] = examples.names
        set_class_names(model, examples.names)
    session.train_configs.append(record)
    summary = run_training(model, session.tokenizer, config, TrainingData(train_set, eval_set, task), reporter,
                           RunLog(session.history, run=len(session.train_configs) - 1), stop=stop, callbacks=callbacks)
    session.last_train_summary = summary
    return summary


def task_examples(session, config, rows):
    """The row tokenizer for the loaded model's task (checked against the templates given)."""
    from ..engine.data import ClassificationExamples, ExampleTokenizer, Seq2SeqExamples, label_names

    task = session.task
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


def set_class_names(model, names):
    """Name a classifier's classes in its config (id2label/label2id), as training learned them."""
    model.config.id2label = {i: str(name) for i, name in enumerate(names)}
    model.config.label2id = {str(name): i for i, name in enumerate(names)}
