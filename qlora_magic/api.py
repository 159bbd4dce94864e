"""The Python API: the same verbs as the magics. Each takes keyword options (the names of the
config dataclasses) or a ready `config=`. Heavy libraries are imported inside the functions.

A verb that uses the model holds the session lock while it runs: while another thread (the panel's action, a
run started in a thread) holds it, the verb fails at once with a one-line BusyError. A Ctrl-C ends any verb in
one line (Interrupted); training stops at the next step boundary instead and keeps what it learned."""

from __future__ import annotations

import functools
import traceback

from .config import GenerateConfig, LoadConfig, TrainConfig, check_adapter_options
from .errors import BusyError, ConfigError, ConflictingOptionsError, DivergedError, Interrupted, NoModelError, QloraError
from .engine.stopping import StopFlag
from .session import get_session, session_lock


def _config(cls, config, options):
    if config is not None and options:
        example = next(iter(options))
        raise ConflictingOptionsError(f"Give either config= or keyword options, not both: change a ready config with config=config.replace({example}=...).")
    return config if config is not None else cls.from_options(options)


def _verb(what, interrupted, stoppable=False):
    """An api verb that uses the session's model: it holds the session lock while it runs (BusyError at once
    when another thread, such as the panel's, holds it), and a Ctrl-C that reaches it ends in one line,
    Interrupted(`interrupted`: the message, or a function of the session that makes it).

    Whatever else leaves the verb leaves nothing alive behind it: IPython keeps the last error
    (sys.last_traceback), and its frames would keep the tensors of a failed run, or an out-of-memory step,
    in memory until the next error (pytorch#37726)."""

    def decorate(verb):
        @functools.wraps(verb)
        def run(*args, **kwargs):
            from .engine.memory_usage import release_memory

            with session_lock.hold(what, stoppable=stoppable):
                try:
                    return verb(*args, **kwargs)
                except Interrupted as error:  # one line already, raised deep down (an answer stopped midway)
                    _let_go(error)
                    raise
                except KeyboardInterrupt as error:
                    # Raised below, once this handler has dropped the interrupt. Its frames are cleared first:
                    # one the interrupt left suspended (an import it broke) would keep its locals, the model too.
                    traceback.clear_frames(error.__traceback__)
                except BaseException as error:
                    _let_go(error)
                    raise
                release_memory()  # what the interrupted frames held (a half-loaded model) is garbage now
                raise Interrupted(interrupted(get_session()) if callable(interrupted) else interrupted) from None

        return run

    return decorate


def _let_go(error):
    """Clear the locals of the frames `error` (and the errors it was raised from) passed through, then collect
    what they held when it can be much: after an unexpected error (a failed step, out of GPU memory) or a
    one-line error raised mid-work (a Ctrl-C, a run gone NaN). The traceback still shows each frame's file,
    line and code. A bad option fails before anything is built, and skips the collection (half a second
    with a model loaded)."""
    import traceback

    from .engine.memory_usage import release_memory

    errors, seen = [error], set()
    while errors:
        chained = errors.pop()
        if chained is not None and id(chained) not in seen:
            seen.add(id(chained))
            traceback.clear_frames(chained.__traceback__)  # skips the frames still running (this one, the cell's)
            errors += [chained.__cause__, chained.__context__]
    if not isinstance(error, QloraError) or isinstance(error, (Interrupted, DivergedError)):
        release_memory()


def _load_interrupted(session):
    if session.model is None:
        return "The load was interrupted: no model is loaded: run %qlora_load again."
    return (f"The load was interrupted: the session keeps its model ({session.load_config.model or 'the default'}): "
            "run %qlora_load again to replace it.")


def _tune_interrupted(session):
    active = session.model.active_adapter if session.model is not None else None
    return f"The search was interrupted: the active adapter is {active!r}; run %%qlora_tune again for a full search."


_ADAPTERS_INTERRUPTED = "The adapter change was interrupted: %qlora_adapters list shows the adapters there are now."


@_verb("Loading a model", _load_interrupted)
def load(model=None, *, config: LoadConfig | None = None, **options):
    """Load a quantized base model with LoRA adapters into the session; returns the LoadReport.

    >>> qlora_magic.load()                                # embedded SmolLM2-135M, 8-bit, r=8 on q/v
    >>> qlora_magic.load("my/model", bits=4, r=16, targets="all-linear")
    >>> qlora_magic.load(bits="auto", keep_8bit=0.25)     # per layer: the most 4-bit-sensitive kept 8-bit
    >>> qlora_magic.load(adapter="runs/my-adapter")      # restore a saved adapter and its base

    The session's previous model is replaced only once the new one has loaded: a failed or interrupted
    load keeps it. When the two do not fit in GPU memory together, the previous one is freed and the load
    tried once more.
    """
    from .engine.loading import load_model
    from .engine.memory_usage import release_memory

    if model is not None:
        options["model"] = model
    check_adapter_options(options)
    config = _config(LoadConfig, config, options)
    session = get_session()
    loaded = _load_beside(session, config)
    if loaded is None:  # out of GPU memory beside the previous model (released here, outside the except block)
        session.model = None
        release_memory()
        loaded = load_model(config)
    session.model = None
    release_memory()
    session.model, session.tokenizer, session.load_config = loaded.model, loaded.tokenizer, loaded.config
    session.runs, session.history, session.last_generation = [], [], None
    if loaded.adapter_folder is not None:  # the saved adapter's runs and history, as load_model read them
        from .tasks.finetune import set_class_names

        session.runs, session.history = loaded.adapter_folder.runs, loaded.adapter_folder.history
        if loaded.config.task == "seq-cls" and session.label_names:
            set_class_names(loaded.model, session.label_names)
    session.last_load_report = loaded.report
    return loaded.report


def _load_beside(session, config):
    """The LoadedModel, or None when the GPU ran out of memory while the session's previous model holds some."""
    import torch

    from .engine.loading import load_model

    try:
        return load_model(config)
    except torch.OutOfMemoryError:
        if session.model is None:
            raise
    return None  # the half-loaded model went with the except block; the caller frees the old one


def train(data=None, *, config: TrainConfig | None = None, reporter=None, stop=None, **options):
    """Fine-tune the session's adapters on `data`; returns a TrainSummary.

    >>> qlora_magic.train(rows, prompt="Q: {question}\\nA: ", response="{answer}", epochs=1, eval_split=0.1)

    Rows go to `get_session().history` as they are logged. Ctrl-C stops at the next step and keeps the
    adapter as trained so far; so does `stop.set()` on the `StopFlag` given as `stop=` (the panel's Stop).

    With `background=True` the run trains in a thread of its own, and `train` returns as soon as its checks
    passed and training began (a bad option, data or template still fails here): a RunHandle, which a notebook
    shows as the run's live view. Meanwhile the model is the run's (other verbs are refused, BusyError);
    `attach()` shows the run again, `runs()` lists it, `stop()` ends it after the step in flight.

    >>> run = qlora_magic.train(rows, prompt="Q: {question}\\nA: ", response="{answer}", background=True)
    >>> run.wait().status                                 # or qlora_magic.stop()

    With `gpus=2` (or "all"; `processes=2` on the CPU) the run trains in worker processes started through
    torch.distributed (DDP when one GPU holds the model, FSDP sharding when only shards fit: chosen from the memory
    plan unless `strategy=` says), shown as an in-kernel run is; the trained adapter is the session's afterwards.
    A failed worker raises a one-line WorkerError naming its log; a rank out of memory has every rank relaunched
    with a smaller layout.

    >>> qlora_magic.train(rows, prompt="Q: {question}\\nA: ", response="{answer}", gpus=2)
    """
    if data is not None:
        options["data"] = data
    config = _config(TrainConfig, config, options)
    _check_trackers(config)
    if config.background:
        return _train_in_background(config, reporter, stop)
    return _train(config, reporter, stop)


def _check_trackers(config: TrainConfig):
    """A --report-to tracker not installed: one line naming its pip install, before anything is loaded or written."""
    from .config import parse_trackers
    from .engine.trackers import check_installed

    check_installed(parse_trackers(config.report_to))


@_verb("Training", "Training was interrupted before its first step: the adapter and history are unchanged.", stoppable=True)
def _train(config: TrainConfig, reporter=None, stop=None):
    from .tasks.finetune import finetune

    if config.resume is not None:
        return _resume(config, reporter, stop)
    if config.in_workers:  # --gpus / --processes: worker processes through torch.distributed
        from .tasks.multi_process import train_in_workers

        return train_in_workers(get_session(), config, reporter=reporter, stop=stop)
    return finetune(get_session(), config, reporter=reporter, stop=stop)


def _resume(config, reporter, stop):
    """`train(resume=...)`: the run, its checkpoint and its data checked; then its base and the checkpoint's
    adapter loaded (as %qlora_load --adapter would: runs and history restored), and the run carried on."""
    from .tasks.finetune import finetune
    from .tasks.resuming import plan_resume

    point = plan_resume(config)
    if point.folder.record.get("launch"):  # its workers trained it: they carry it on, then the session takes it
        from .tasks.multi_process import resume_in_workers

        summary = resume_in_workers(point, reporter, stop, config)
        load(adapter=str(point.folder.latest_checkpoint()))
        get_session().last_train_summary = summary
        return summary
    load(adapter=str(point.checkpoint))
    return finetune(get_session(), point.config, reporter=reporter, stop=stop, resume=point)


def _train_in_background(config: TrainConfig, reporter, stop):
    """`train(background=True)`: refused at once while another thread uses the model (as a panel's click is);
    otherwise the run starts in a thread that holds the session lock until it ends."""
    from .tasks import live_runs
    from .tasks.run_handle import RunHandle

    refusal = session_lock.refusal()
    if refusal:
        raise BusyError(refusal)
    stop = stop if stop is not None else StopFlag()  # the run's, and its LiveRun's: %qlora_stop sets it

    def train_holding_the_session(broadcast):  # in the run's thread
        with session_lock.hold("Training", by="a background run", stop_with=live_runs.STOP_WITH):
            return _train(config, broadcast, stop)

    run = live_runs.start(train_holding_the_session, stop, views=[reporter] if reporter is not None else ())
    return RunHandle(run.folder, run)


def runs(output_dir=None):
    """The training runs: this kernel's background runs first, then the run folders under `output_dir`
    (default runs/), newest first, with status (running, completed, interrupted, failed, crashed), step, last
    train and eval loss, checkpoint step. Reads only: free while a run trains.

    >>> qlora_magic.runs()["20261202-141500-word_forms"].loss
    """
    from .tasks.run_lookup import runs_table

    return runs_table(output_dir)


def attach(run=None, *, output_dir=None):
    """A run as a RunHandle, shown in a notebook as its view: the whole history so far, then live while it trains
    in this kernel (a run another process trains is re-read every 2 s; one that ended is drawn as it ended).

    `run`: a run folder's name, a start or end of it only one run has, or its path; default this kernel's newest
    background run, else the newest run folder under `output_dir` (default runs/).

    >>> qlora_magic.attach()                              # after a page reload, in any cell
    >>> qlora_magic.attach("word_forms", output_dir="/content/drive/MyDrive/runs")
    """
    from .tasks.run_lookup import find_run

    return find_run(run, output_dir)


def stop(run=None, *, output_dir=None, wait=True) -> str:
    """Stop a background run of this kernel after the step in flight (the adapter keeps every finished step) and,
    with `wait`, return once it has, so the next cell can use the model; returns one line saying so, or why there
    is nothing to stop (the run ended, or crashed). A run another process trains cannot be stopped from here:
    ConfigError (interrupt that kernel). `run` as for attach()."""
    from .tasks.run_lookup import find_run

    return find_run(run, output_dir).stop(wait=wait)


def _not_for_classifier(session, action):
    if session.task == "seq-cls":
        raise ConfigError(f"This model is a classifier (--task seq-cls), so {action} does not apply: use qm.classify(texts) for labels and probabilities.")


@_verb("Classifying", "Classification was interrupted: run it again.")
def classify(texts, *, batch_size=16, max_length=512):
    """Labels and class probabilities from a classifier (a model loaded with task="seq-cls").

    >>> result = qlora_magic.classify(["A wonderful film.", "Dull and too long."])
    >>> result.labels, result.probabilities[0]
    """
    from .config import ClassifyConfig
    from .engine.classification import classify_texts

    config = ClassifyConfig(texts=texts, batch_size=batch_size, max_length=max_length)
    return classify_texts(get_session(), config.texts, batch_size=config.batch_size, max_length=config.max_length)


@_verb("Generating", "The generation was interrupted before its first words: run it again.")
def generate(prompt=None, *, config: GenerateConfig | None = None, on_text=None, **options) -> str:
    """Answer `prompt`, streaming the text; returns the new text (also in `get_session().last_generation`).

    The text is printed as it comes, then a newline; `stream=False` prints nothing, and `on_text(chunk)`
    receives the chunks instead of the output.

    >>> qlora_magic.generate("What is the capital of France?", greedy=True)
    >>> qlora_magic.generate("Instruction: ...\\n\\nResponse: ", raw=True, base=True)
    """
    from .engine.generation import generate_text

    if prompt is not None:
        options["prompt"] = prompt
    config = _config(GenerateConfig, config, options)
    session = get_session()
    model = session.require_model("generation")
    _not_for_classifier(session, "generation")
    if session.task == "seq2seq":
        if config.system:
            raise ConfigError("--system goes into a chat template, and a seq2seq model reads the text as written: "
                              "drop --system and put the instruction in the prompt.")
        config = config.replace(raw=True)  # the encoder reads the text as written: no chat template
    to_output = on_text is None and config.stream
    send = _print_text if to_output else (on_text or (lambda chunk: None))
    pieces = []

    def keep_and_send(chunk):  # the text so far stays in the session if Ctrl-C stops the answer
        pieces.append(chunk)
        session.last_generation = "".join(pieces)
        send(chunk)

    try:
        text = generate_text(model, session.tokenizer, config, on_text=keep_and_send)
    except KeyboardInterrupt:
        if not pieces:
            raise  # nothing shown yet: the plain interrupted message
        raise Interrupted(f"The generation was stopped after {len(session.last_generation)} characters: the text so far "
                          "is in get_session().last_generation.") from None
    finally:
        if to_output and pieces:
            _print_text("\n")
    session.last_generation = text
    return text


def _print_text(text):
    """Where generate streams when no on_text is given: the output (a notebook cell's, or the terminal)."""
    print(text, end="", flush=True)


@_verb("Saving", "The save was interrupted: run %qlora_save again.")
def save(path):
    """Save the adapter (PEFT format), tokenizer and run record to the folder `path`; returns the Path."""
    from .engine.adapter_folder import save_adapter

    session = get_session()
    session.require_model("saving")
    return save_adapter(session, path)


def memory():
    """The memory readout now: model footprint, GPU allocated/reserved/total, or CPU memory."""
    from .engine.memory_usage import memory_report

    return memory_report(get_session().model)


@_verb("Unloading the model", "The unload was interrupted: run %qlora_unload again.")
def unload():
    """Drop the session's model and tokenizer and give their memory back; returns an UnloadReport (memory
    before and after, what was freed). With no model loaded it says so and changes nothing.

    >>> qlora_magic.unload()                              # then load another model, or none

    The history and the last training and tuning readouts stay (they hold no tensors); the next load starts
    them afresh.
    """
    from .engine.memory_usage import UnloadReport, memory_report, release_memory

    session = get_session()
    if session.model is None:
        return UnloadReport(None)
    loaded = session.last_load_report
    unloaded = (f"{loaded.model_name}, {loaded.quantization}" if loaded is not None
                else getattr(session.load_config, "model", None) or "the embedded default")
    before = memory_report(session.model)
    session.model = session.tokenizer = session.load_config = session.last_load_report = None
    release_memory(workspaces=True)
    return UnloadReport(unloaded, before, memory_report())


__all__ = ["load", "train", "generate", "classify", "save", "memory", "unload", "runs", "attach", "stop", "NoModelError",
           "StopFlag"]


# --- evaluation, comparison, adapters, merge -------------------------------------------------------

@_verb("Evaluating", "The evaluation was interrupted: nothing was recorded; run it again.")
def evaluate(data=None, *, config=None, **options):
    """Perplexity over response tokens and, on request, BLEU/ROUGE/exact match of greedy answers;
    returns an EvalReport (one row per model) and records rows of kind 'eval' in the session history.

    >>> qlora_magic.evaluate(base=True)                       # the last run's held-out split
    >>> qlora_magic.evaluate(rows, prompt="Q: {q}\\nA: ", response="{a}", metrics=["perplexity", "bleu", "rouge"])
    """
    from .config import EvalConfig
    from .tasks.evaluation import evaluate_model

    if data is not None:
        options["data"] = data
    session = get_session()
    _not_for_classifier(session, "%qlora_eval (accuracy and F1 are reported by training with eval_split)")
    recorded = len(session.history)
    try:
        return evaluate_model(session, _config(EvalConfig, config, options))
    except KeyboardInterrupt:
        del session.history[recorded:]  # the rows of the models it had finished: all or nothing
        raise


@_verb("Comparing", "The comparison was interrupted: run it again.")
def compare(prompts=None, *, config=None, on_update=None, **options):
    """Answer the same prompts with the base model and each adapter (greedy by default); returns a
    Comparison, shown as a side-by-side table.

    >>> qlora_magic.compare(["Instruction: ...\\n\\nResponse: "], raw=True, max_new_tokens=20)
    """
    from .tasks.comparison import compare_answers
    from .config import CompareConfig

    if prompts is not None:
        options["prompts"] = prompts
    _not_for_classifier(get_session(), "%qlora_compare")
    return compare_answers(get_session(), _config(CompareConfig, config, options), on_update=on_update)


def list_adapters():
    """The adapters on the loaded model (name, active, r, alpha, targets, size)."""
    from .engine.adapters import adapter_table

    return adapter_table(get_session().require_model("listing adapters"))


@_verb("Changing adapters", _ADAPTERS_INTERRUPTED)
def add_adapter(name, *, r=None, alpha=None, dropout=None, targets=None, activate=True):
    """Add a fresh LoRA adapter beside the existing ones, on the same quantized base; it becomes the
    active one (trained by the next train(), used by generate()) unless activate=False."""
    from .engine import adapters

    return adapters.add_adapter(get_session(), name, r=r, alpha=alpha, dropout=dropout, targets=targets, activate=activate)


@_verb("Changing adapters", _ADAPTERS_INTERRUPTED)
def load_adapter(path, name=None, *, activate=True):
    """Load a saved adapter folder beside the existing adapters."""
    from .engine import adapters

    return adapters.load_adapter(get_session(), path, name, activate=activate)


@_verb("Changing adapters", _ADAPTERS_INTERRUPTED)
def switch_adapter(name):
    """Make adapter `name` the active one."""
    from .engine import adapters

    return adapters.switch_adapter(get_session(), name)


@_verb("Changing adapters", _ADAPTERS_INTERRUPTED)
def delete_adapter(name):
    """Remove adapter `name` (not the last one)."""
    from .engine import adapters

    return adapters.delete_adapter(get_session(), name)


@_verb("Changing adapters", _ADAPTERS_INTERRUPTED)
def combine_adapters(name, weights, *, combination_type=None, activate=True):
    """Add adapter `name`, a weighted combination of existing ones: weights={"default": 0.5, "task2": 0.5}."""
    from .engine import adapters

    return adapters.combine_adapters(get_session(), name, weights, combination_type=combination_type, activate=activate)


@_verb("Merging", "The merge was interrupted: the session's model is unchanged; run %qlora_merge again.")
def merge(path=None, *, config=None, **options):
    """Merge the active adapter into an unquantized 16-bit copy of the base, save it (safetensors) to
    `path`, and check the saved model's greedy answers and perplexity against the adapter's.

    >>> qlora_magic.merge("merged/word-forms")                 # float16; dtype="bfloat16" or "float32"
    """
    from .config import MergeConfig
    from .tasks.merging import merge_adapter

    if path is not None:
        options["path"] = str(path)
    return merge_adapter(get_session(), _config(MergeConfig, config, options))


@_verb("Exporting", "The export was interrupted: nothing was written and the session's model is unchanged; run %qlora_export again.")
def export(format=None, path=None, *, config=None, **options):
    """Merge the active adapter as `merge` does, write it to the folder `path` as one GGUF file (llama.cpp, Ollama,
    LM Studio) in `quant`, with `ollama=True` an Ollama Modelfile beside it, and check the file's greedy answers and
    perplexity against the adapter's. RAM and disk are checked first.

    >>> qlora_magic.export("gguf", "exported/word-forms", quant="q8_0", ollama=True)
    """
    from .config import ExportConfig
    from .tasks.exporting import export_model

    if format is not None:
        options["format"] = format
    if path is not None:
        options["path"] = str(path)
    return export_model(get_session(), _config(ExportConfig, config, options))


__all__ += ["evaluate", "compare", "list_adapters", "add_adapter", "load_adapter", "switch_adapter", "delete_adapter",
            "combine_adapters", "merge", "export"]


@_verb("Tuning", _tune_interrupted, stoppable=True)
def tune(data=None, *, search=None, config=None, on_trial=None, **options):
    """Optuna search over LoRA and training options; each trial trains a fresh adapter on the same base,
    scored by held-out eval loss. Returns a TuneReport; the best adapter stays active (keep=False drops it).

    >>> qlora_magic.tune(rows, prompt="Q: {q}\\nA: ", response="{a}", eval_split=0.2, max_steps=10,
    ...                  search={"r": [4, 8, 16], "lr": {"low": 1e-4, "high": 1e-2, "log": True}}, trials=5)
    """
    from .config import TrainConfig, TuneConfig
    from .tasks.tuning import run_search

    if config is None:
        tune_keys = {"trials", "prune", "seed", "keep"}
        tune_options = {k: options.pop(k) for k in list(options) if k in tune_keys}
        if data is not None:
            options["data"] = data
        config = TuneConfig(train=TrainConfig.from_options(options), search=search or {}, **tune_options)
    elif data is not None or search is not None or options:
        raise ConflictingOptionsError("Give either config= or keyword options, not both: change a ready config with config=config.replace(train=...).")
    _check_trackers(config.train)
    return run_search(get_session(), config, on_trial=on_trial)


__all__ += ["tune"]


# --- checks before the GPU time -------------------------------------------------------------------------

@_verb("Checking the data", "The data check was interrupted: nothing changed; run it again.")
def check_data(data=None, *, config: TrainConfig | None = None, **options):
    """Check training data before training: the rows tokenized with the loaded tokenizer exactly as `train` would
    (the same options), then counted: prompt/response token lengths, rows max_length cuts, rows left with no
    trained token, whether targets keep a stop token that generation stops at, duplicates, empty fields.
    Returns a DataReport (shown with the first rows as tokens, trained ones marked). Changes nothing.

    >>> qlora_magic.check_data(rows, prompt="Q: {question}\\nA: ", response="{answer}", max_length=256)

    `train` runs the same checks first: a problem (no trained token in any row, every response empty, no stop
    token kept) stops it in one line; the warnings go into its readout.
    """
    from .tasks.finetune import check_data as check

    if data is not None:
        options["data"] = data
    return check(get_session(), _config(TrainConfig, config, options))


def doctor(model=None, *, bits=None):
    """Check the environment before spending GPU time: frontend and widget support, the live display's form,
    torch/CUDA/driver, bitsandbytes for this device, GPU memory against the loaded (or named) model in 4 and
    8 bits, RAM and disk for a merge, Hub access and cache, tracker logins. Returns a DoctorReport: one row per
    check, OK / warning / problem, each with a one-line fix. Reads only, makes no network call, takes seconds.

    >>> qlora_magic.doctor()
    >>> qlora_magic.doctor("Qwen/Qwen2.5-7B-Instruct", bits=4)   # would it fit? (a config in the local cache)
    """
    from pathlib import Path

    from .tasks.doctor import diagnose

    if model is not None and not isinstance(model, (str, Path)):
        raise ConfigError(f"model must be a Hub id or a folder, not {model!r} (of type {type(model).__name__}).")
    if bits is not None and (isinstance(bits, bool) or bits not in (4, 8)):
        raise ConfigError(f"bits must be 4 or 8 (or None: both), not {bits!r}.")
    return diagnose(get_session(), model=None if model is None else str(model), bits=bits)


__all__ += ["check_data", "doctor"]
