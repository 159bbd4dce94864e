"""The settings of each action, as dataclasses that check their own values.

Magics and widget panels both build these; the Python API takes the same names as keywords.
Every check quotes the bad value and says what would be accepted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import math
import numbers
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, UnknownOptionError

BITS = (4, 8, 16, "auto")  # auto: each layer 4- or 8-bit by its measured sensitivity (adaptive.py)
TASKS = ("causal-lm", "seq-cls", "seq2seq")
#: LoRA targets per architecture when none are given: the attention query and value projections,
#: as in the QLoRA course (slide 1). Architectures not listed fall back to PEFT's own table.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
}


def _option(name) -> str:
    """How the message names field `name`: the option's flag (--max-new-tokens), or the body key as written."""
    return name if name in _WRITTEN_AS_KEYS else "--" + name.replace("_", "-")


# Fields written as cell-body keys or arguments, not as --options.
_WRITTEN_AS_KEYS = {"model", "data", "prompt", "response", "label", "chat", "messages", "eval_split", "split", "layers_8bit",
                    "calibration", "prompts", "path", "search", "train"}

_KIND_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "text",
               list: "a list of texts", dict: "a mapping"}  # every list field holds texts


def _kinds(hint) -> tuple:
    """The runtime types a field's type hint allows (int | None -> (int, NoneType)); () for Any."""
    if hint is Any:
        return ()
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return tuple(typing.get_origin(arg) or arg for arg in args)


def _checked(name, value, hint, default=None):
    """`value` as the field `name` of type `hint` holds it, or a one-line ConfigError: numbers finite and whole
    where whole numbers are meant (4.0 is read as 4), text where text is meant (a path too), and so on."""
    kinds = _kinds(hint)
    if not kinds or (value is None and type(None) in kinds):
        return value
    wanted = " or ".join(_KIND_NAMES[k] for k in kinds if k in _KIND_NAMES and not (k is int and float in kinds))
    bad = f"{_option(name)} must be {wanted}, got {value!r}"
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if is_number and (int in kinds or float in kinds):
        if isinstance(value, numbers.Integral):
            return int(value) if int in kinds else float(value)
        if not math.isfinite(value):
            example = f", e.g. {default:g} (the default)" if isinstance(default, (int, float)) and not isinstance(default, bool) else ""
            raise ConfigError(f"{_option(name)} must be a finite number, got {value!r}{example}.")
        if float in kinds:
            return float(value)
        if float(value).is_integer():
            return int(value)
    elif isinstance(value, bool) and bool in kinds or isinstance(value, dict) and dict in kinds:
        return value
    elif isinstance(value, (str, os.PathLike)) and str in kinds:
        return os.fspath(value)
    elif isinstance(value, (list, tuple)) and list in kinds and all(isinstance(item, str) for item in value):
        return list(value)
    elif is_number and str in kinds:
        raise ConfigError(f"{bad}: put it in quotes, e.g. \"{value}\".")
    raise ConfigError(f"{bad}.")


def _positive(name, value, allow_zero=False, most=None, why=""):
    """A range check on a number the type check has let through (None: not given)."""
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}.")
    if most is not None and value > most:
        raise ConfigError(f"{name} must be at most {most}, got {value!r}{why}.")


SEED_LIMIT = 2**32  # numpy's seeds, which transformers' set_seed also sets, are below 2**32


def _seed(name, value):
    if value is not None and not 0 <= value < SEED_LIMIT:
        raise ConfigError(f"{name} must be a whole number from 0 to {SEED_LIMIT - 1}, got {value!r}.")


#: Learning-rate schedules (transformers' SchedulerType names) that need no settings beyond warm-up and steps;
#: the others (cosine_with_min_lr, warmup_stable_decay, reduce_lr_on_plateau, greedy...) need ones we do not pass.
# Experiment trackers --report-to takes, through the Trainer's own integrations (TensorBoard: the default).
TRACKERS = ("tensorboard", "mlflow", "trackio", "wandb")


def parse_trackers(value) -> tuple[str, ...]:
    """'tensorboard,mlflow' (or a list) -> ('tensorboard', 'mlflow'); 'none' -> (). One-line ConfigError otherwise."""
    names = [str(v).strip().lower() for v in (value.split(",") if isinstance(value, str) else value)]
    if names == ["none"]:
        return ()
    bad = [n for n in names if n not in TRACKERS]
    if bad or not names or len(set(names)) != len(names):
        raise ConfigError(f"--report-to takes a comma-separated list of {', '.join(TRACKERS)} (or none), got {value!r}.")
    return tuple(names)


SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt")
MAX_EPOCHS, MAX_STEPS, MAX_RANK, MAX_NEW_TOKENS, MAX_TRIALS, MAX_LABELS = 1000, 1_000_000, 4096, 32768, 1000, 100_000
# Adam moves each weight by about lr per step: above 1 every step wrecks the adapter, and from ~1e30 the loss
# can stay finite (stuck at ln(vocab)) so no divergence check sees it.
MAX_LR = 1.0
STRATEGIES = ("ddp", "fsdp")
MAX_WORKERS = 1024  # worker processes on one machine (--gpus, --processes): more is a typo
MAX_CHECKPOINT_MINUTES = 7 * 24 * 60  # a week: longer is a typo (0 is the way to say "not by time")


def check_folder(path, what="--output-dir"):
    """A one-line ConfigError if a folder could not be made at `path`: a file is there, or a file is on the
    way, a name is too long, or the nearest existing folder is read-only or not a real filesystem (/proc).
    Creates nothing, so a bad path fails before anything is loaded, trained or written."""
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ConfigError(f"{what} must be a folder path (text), got {path!r}.")
    try:
        _check_folder(Path(path).expanduser().absolute(), str(path), what)
    except ConfigError:
        raise
    except RuntimeError:  # ~name of no such user
        raise ConfigError(f"{what} {str(path)!r}: {str(path).split('/')[0]!r} is no user's home folder; write the path out.") from None
    except (ValueError, OSError) as error:  # a NUL, a lone surrogate: a name no file system takes
        raise ConfigError(f"{what} {str(path)!r} cannot be a folder name ({error}): choose another path.") from None


def _check_folder(folder: Path, path: str, what: str):
    longest = max(folder.parts, key=len)
    if len(longest.encode()) > 255:
        raise ConfigError(f"{what}: the name {longest[:20]!r}... is {len(longest.encode())} bytes long; folder names must be at most 255.")
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        os.lstat(folder)  # a NUL in the name fails here (pathlib's exists() only says False)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{what} {path!r} is a file, not a folder: choose another path, or move the file.")
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{what} {path!r} is under {str(existing)!r}, which is a file: choose a path under a folder.")
    # /proc and /sys say writable to root, yet hold no folders of ours. (Not "a filesystem with no blocks":
    # some FUSE mounts, e.g. network drives in notebooks, report none and are writable.)
    pseudo = existing.resolve().parts[1:2] in (("proc",), ("sys",))
    if pseudo or os.statvfs(existing).f_flag & os.ST_RDONLY or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path!r}: {str(existing)!r} is not a folder you can write to; choose one you can.")


def parse_memory(value) -> int | None:
    """'10GB', '10 GiB', '512MB', 10 (GB) or a byte count -> bytes; None stays None.

    Decimal units, as every readout shows memory and as accelerate reads its max_memory strings:
    '10GB' is 10e9 bytes, '512MB' 512e6; binary only when the i is written ('10GiB' is 10 x 2**30).
    A bare number is GB ('10' or 10 -> 10e9); a number of 4096 or more is a byte count.
    """
    if value is None or value == "auto":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"--max-memory must be more than 0 GB, got {value!r}: write e.g. 10GB.")
        return int(value * 1e9) if value < 4096 else int(value)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(i?))?B?\s*", str(value), re.IGNORECASE)
    if not match or float(match.group(1)) == 0:
        raise ConfigError(f"--max-memory must look like 10GB, 10GiB or 512MB, got {value!r}.")
    number, unit, binary = float(match.group(1)), (match.group(2) or "G").upper(), bool(match.group(3))
    power = "KMGT".index(unit) + 1
    return int(number * (1024**power if binary else 1000**power))


class _Config:
    """Shared checks and helpers: every field's value checked against its type hint (finite numbers, whole
    numbers where meant, text where meant), a dict form for saving, and `replace` that re-runs the checks."""

    def __post_init__(self):
        hints = _type_hints(type(self))
        for f in dataclasses.fields(self):
            default = None if f.default is dataclasses.MISSING else f.default
            setattr(self, f.name, _checked(f.name, getattr(self, f.name), hints[f.name], default))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_options(cls, options: dict[str, Any]):
        """The config of keyword options, as the Python API takes them; a name it has not is one line."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [name for name in options if name not in names]
        if unknown:
            close = difflib.get_close_matches(unknown[0], names, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise UnknownOptionError(f"Unknown option {unknown[0]!r}: {hint}The options are {', '.join(names)}.")
        return cls(**options)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


@functools.cache
def _type_hints(config) -> dict:
    return typing.get_type_hints(config)


#: The LoRA settings of a new adapter; a saved adapter brings its own.
LORA_OPTIONS = ("r", "alpha", "dropout", "targets", "seed")


def check_adapter_options(options: dict):
    """A one-line ConfigError when `options` (as the user gave them) restore an adapter and also set LoRA
    settings, which would be ignored. Checked on the options, since a LoadConfig cannot tell r=8 from the default."""
    given = [name for name in LORA_OPTIONS if options.get(name) is not None]
    if options.get("adapter") is not None and given:
        raise ConfigError(f"--{given[0]} does not apply with --adapter: a saved adapter keeps its own LoRA settings "
                          f"and weights (r, alpha, dropout, targets). For new ones, load the base alone (%qlora_load --{given[0]} ...) "
                          f"or add an adapter beside it (%qlora_adapters add new --{given[0]} ...).")


@dataclass
class LoadConfig(_Config):
    """How to load the base model and which LoRA adapters to put on it."""

    model: str | None = field(default=None, metadata={"help": "Hub id or local folder; None is the embedded default model"})
    bits: int | str | None = field(default=None, metadata={"help": "8 (LLM.int8, the default), 4 (NF4 + double quantization), 16 (none) or 'auto' (the layers 4-bit hurts most in 8-bit, the rest 4-bit); with an adapter, the bits it was trained with"})
    keep_8bit: float | None = field(default=None, metadata={"help": "bits='auto': the largest fraction (0-1) of the quantized parameters kept in 8-bit; None: 0.25"})
    layers_8bit: list[str] | None = field(default=None, metadata={"help": "bits='auto': the layers kept in 8-bit (filled in by the measurement; given, it is used as is)"})
    calibration: list[str] | None = field(default=None, metadata={"help": "bits='auto': your texts to measure the layers on and score the choice with (every other one each); None: 20 rows of the shipped word_forms data"})
    r: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: float = field(default=32, metadata={"help": "LoRA alpha (scaling = alpha / r)"})
    dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    targets: list[str] | str | None = field(default=None, metadata={"help": "module names, 'all-linear', or None for the architecture's attention q/v"})
    seed: int = field(default=42, metadata={"help": "seed of the new weights' random start (the LoRA matrices, a classifier's head): the same seed, the same adapter before training"})
    task: str = field(default="causal-lm", metadata={"help": "causal-lm (a decoder), seq-cls (text classification) or seq2seq (an encoder-decoder, e.g. summarization)"})
    num_labels: int = field(default=2, metadata={"help": "classes of a seq-cls model (its head is made this size)"})
    adapter: str | None = field(default=None, metadata={"help": "folder of a saved adapter to restore"})
    device: str | None = field(default=None, metadata={"help": "'cuda', 'cpu', or None for CUDA when available"})
    device_map: str | None = field(default=None, metadata={"help": "'auto': the layers spread over every GPU there is (a model larger than one GPU, for generation, evaluation and small experiments); None: all on --device"})

    def __post_init__(self):
        super().__post_init__()
        if self.device_map not in (None, "auto"):
            raise ConfigError(f"--device-map takes auto (the layers spread over the GPUs), got {self.device_map!r}.")
        if self.device_map and self.device == "cpu":
            raise ConfigError("--device-map auto spreads the layers over the GPUs; with --device cpu leave it out.")
        if self.bits is not None and self.bits not in BITS:
            raise ConfigError(f"--bits must be 4, 8, 16 or auto, got {self.bits!r}.")
        if self.keep_8bit is not None and not 0 <= self.keep_8bit <= 1:
            raise ConfigError(f"--keep-8bit must be a fraction between 0 and 1, got {self.keep_8bit!r}.")
        if self.calibration is not None and (isinstance(self.calibration, str) or len(self.calibration) < 2
                                             or not all(isinstance(t, str) and t.strip() for t in self.calibration)):
            raise ConfigError("calibration must be a list of at least 2 non-empty texts (every other one measures, the rest score).")
        for name, value in (("--keep-8bit", self.keep_8bit), ("layers_8bit", self.layers_8bit), ("calibration", self.calibration)):
            if value is not None and self.bits not in ("auto", None):
                raise ConfigError(f"{name} chooses layers for --bits auto, not --bits {self.bits}: add --bits auto or drop {name}.")
        _seed("--seed", self.seed)
        _positive("--r", self.r, most=MAX_RANK, why=" (the adapter would outweigh the model); ranks of 4 to 64 are usual")
        _positive("--alpha", self.alpha)
        if not (0 <= self.dropout < 1):
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout!r}.")
        if self.task not in TASKS:
            raise ConfigError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}.")
        if self.bits == "auto" and self.task != "causal-lm" and self.layers_8bit is None:
            raise ConfigError(f"--bits auto measures layers with a language model's loss, so it needs --task causal-lm, not {self.task}: use --bits 4 or 8.")
        _positive("--num-labels", self.num_labels, most=MAX_LABELS)
        if self.task == "seq-cls" and self.num_labels < 2:
            raise ConfigError(f"--num-labels must be at least 2 for classification, got {self.num_labels!r}.")
        if isinstance(self.targets, str) and self.targets != "all-linear":
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if isinstance(self.targets, (list, tuple)):
            if not self.targets:
                raise ConfigError("--targets is empty: give module names like q_proj,v_proj or 'all-linear'.")
            self.targets = list(self.targets)
        if self.device not in (None, "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"--device must be cpu or cuda, got {self.device!r}.")


def _check_messages(messages, **given):
    """messages: names a column, and replaces the templates (one line when both are given)."""
    if messages is None:
        return
    if not messages.strip():
        raise ConfigError("messages: must name the column that holds the conversations, e.g. messages: messages.")
    clash = [key for key, value in given.items() if value is not None]
    if clash:
        raise ConfigError(f"messages: trains on whole conversations through the chat template, so {clash[0]}: does not "
                          f"apply: drop {clash[0]}:, or drop messages: and use prompt: and response: templates.")


@dataclass
class TrainConfig(_Config):
    """What to train on and how."""

    data: Any = field(default=None, metadata={"help": "Hub id, local .jsonl/.json/.csv/.parquet, list of dicts, DataFrame or datasets.Dataset"})
    prompt: str | None = field(default=None, metadata={"help": "prompt template with {field} placeholders"})
    response: str | None = field(default=None, metadata={"help": "response template with {field} placeholders (causal-lm: the answer; seq2seq: the target)"})
    label: str | None = field(default=None, metadata={"help": "seq-cls: the column holding each row's class (strings or ids)"})
    chat: bool = field(default=False, metadata={"help": "wrap prompt/response as user/assistant turns of the chat template"})
    messages: str | None = field(default=None, metadata={"help": "instead of prompt/response: the column of chat conversations (lists of role/content turns), trained on every assistant turn through the chat template"})
    eval_split: float | None = field(default=None, metadata={"help": "fraction (0-1) or row count held out for evaluation; 0 or none: nothing held out"})
    max_length: int = field(default=512, metadata={"help": "longest example in tokens (longer ones are cut)"})
    split: str = field(default="train", metadata={"help": "split of a Hub dataset"})
    epochs: float = field(default=1, metadata={"help": "passes over the data"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many optimizer steps"})
    batch_size: int = field(default=4, metadata={"help": "examples per micro-batch"})
    grad_accum: int = field(default=4, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    warmup: float = field(default=0.03, metadata={"help": "warm-up as a fraction of the steps"})
    scheduler: str = field(default="linear", metadata={"help": "learning-rate schedule (transformers' names)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    seed: int = field(default=42, metadata={"help": "random seed (data order, LoRA dropout)"})
    logging_steps: int = field(default=1, metadata={"help": "log every N optimizer steps"})
    eval_steps: int | None = field(default=None, metadata={"help": "evaluate every N steps (default: about 5 times a run)"})
    packing: bool | None = field(default=None, metadata={"help": "pack a micro-batch's examples into one row (attention kept inside each); None: on"})
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "trade compute for memory; None decides from the memory estimate"})
    compile: bool | None = field(default=None, metadata={"help": "compile each decoder layer with torch.compile for the run (faster steps after a one-off compile); None: on a GPU, for runs long enough to win it back"})
    max_memory: str | int | float | None = field(default=None, metadata={"help": "GPU memory budget for the batch layout: '10GB' (10e9 bytes), '10GiB' (10 x 2**30), '512MB', or a number of GB; None: the card's memory"})
    output_dir: str | None = field(default=None, metadata={"help": "folder that holds the run folders (<time>-<name>: settings, history, checkpoints, TensorBoard); default runs/ (a Google Drive folder keeps them past a Colab disconnect)"})
    name: str | None = field(default=None, metadata={"help": "the run's name, after the time in its folder's name (default: the data file's name, or run)"})
    checkpoint_minutes: float = field(default=10, metadata={"help": "write a checkpoint every N minutes (also after each evaluation and at the end); 0: only those"})
    resume: Any = field(default=None, metadata={"help": "carry on a run from its latest checkpoint: true (the newest run in --output-dir) or a run folder"})
    background: bool = field(default=False, metadata={"help": "start the run and return at once; %qlora_attach shows it, %qlora_stop stops it"})
    gpus: int | str | None = field(default=None, metadata={"help": "train in worker processes, one per GPU, through torch.distributed: a number of GPUs or 'all'; None: in this process"})
    processes: int | None = field(default=None, metadata={"help": "train in this many worker processes on the CPU (torch.distributed's gloo backend: tests, the course); None: in this process"})
    unload: bool = field(default=False, metadata={"help": "with gpus/processes: the session's model leaves memory while the workers train (its GPU memory goes to them) and is loaded back after, with the trained adapter (as long as a load takes); without it, done anyway when the run fits only that way"})
    strategy: str | None = field(default=None, metadata={"help": "with gpus/processes: ddp (each rank holds the model, LoRA gradients all-reduced) or fsdp (FSDP2: the 4-bit weights sharded over the ranks); None: chosen from the memory plan (ddp when one GPU holds the model; always ddp with processes)"})
    report_to: str | list = field(default="tensorboard", metadata={"help": "experiment trackers, comma-separated: tensorboard (in the run folder), mlflow (a local sqlite store, <output-dir>/mlflow.db, unless MLFLOW_TRACKING_URI is set), trackio (local), wandb (offline unless an API key is set up); none: no tracker"})
    display: str = field(default="auto", metadata={"help": "auto, html, widget, text or none"})

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.report_to, (list, tuple)):
            self.report_to = ",".join(map(str, self.report_to))
        self.report_to = ",".join(parse_trackers(self.report_to)) or "none"
        _positive("--epochs", self.epochs, most=MAX_EPOCHS, why="; to stop after a number of steps, use --max-steps")
        _positive("--max-steps", self.max_steps, most=MAX_STEPS)
        _positive("--batch-size", self.batch_size)
        _positive("--grad-accum", self.grad_accum)
        _positive("--lr", self.lr, most=MAX_LR, why="; LoRA learning rates are around 1e-4 to 1e-2")
        _positive("--max-length", self.max_length)
        _positive("--logging-steps", self.logging_steps)
        _positive("--eval-steps", self.eval_steps)
        _positive("--weight-decay", self.weight_decay, allow_zero=True)
        if not (0 <= self.warmup < 1):
            raise ConfigError(f"--warmup must be a fraction in [0, 1), got {self.warmup!r}.")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}.")
        _seed("--seed", self.seed)
        if self.eval_split == 0 and not isinstance(self.eval_split, bool):
            self.eval_split = None  # eval_split: 0 holds nothing out, as leaving it out does
        if self.eval_split is not None:
            v = self.eval_split
            is_fraction = isinstance(v, float) and 0 < v < 1
            is_count = v >= 1 and float(v).is_integer()
            if not (is_fraction or is_count):
                raise ConfigError(f"eval_split must be a fraction between 0 and 1 or a row count, got {v!r}.")
        if self.max_memory is not None:
            parse_memory(self.max_memory)  # a malformed budget fails here, in one line
        if self.display not in ("auto", "html", "widget", "text", "none"):
            raise ConfigError(f"--display must be auto, html, widget, text or none, got {self.display!r}.")
        resuming = self.resume is not None  # the templates are the run's own
        _check_messages(self.messages, prompt=self.prompt, response=self.response, chat=self.chat or None, label=self.label)
        templated = self.data is not None and self.messages is None and not resuming  # conversations need no templates
        if templated and self.prompt is None:
            raise ConfigError("The cell body needs a prompt: template, e.g. prompt: \"Question: {question}\\nAnswer: \" "
                              "(or, for a column of chat conversations, messages: <column>).")
        if templated and self.response is None and self.label is None:
            raise ConfigError("The cell body needs a response: template, e.g. response: \"{answer}\" (or, for --task seq-cls, label: <column>).")
        if self.output_dir is not None:
            check_folder(self.output_dir)
        _positive("--checkpoint-minutes", self.checkpoint_minutes, allow_zero=True, most=MAX_CHECKPOINT_MINUTES)
        if self.name is not None and not str(self.name).strip():
            raise ConfigError("--name is empty: give the run a name, or leave --name out.")
        if self.resume is not None and self.resume is not True and not isinstance(self.resume, (str, os.PathLike)):
            raise ConfigError(f"--resume takes a run folder, or nothing (the newest run), got {self.resume!r}.")
        self._check_workers()

    def _check_workers(self):
        """--gpus / --processes / --strategy: a number of workers, of one kind."""
        if isinstance(self.gpus, str):
            if self.gpus.strip().lower() == "all":
                self.gpus = "all"
            elif self.gpus.strip().isdecimal():  # int() reads every decimal digit (not "²", which isdigit takes)
                self.gpus = int(self.gpus)
            else:
                raise ConfigError(f"--gpus takes a number of GPUs or all, got {self.gpus!r}.")
        if self.gpus != "all":
            _positive("--gpus", self.gpus, most=MAX_WORKERS)
        _positive("--processes", self.processes, most=MAX_WORKERS)
        if self.gpus is not None and self.processes is not None:
            raise ConfigError("Give --gpus (worker processes on GPUs) or --processes (worker processes on the CPU), not both.")
        if self.strategy is not None and self.strategy not in STRATEGIES:
            raise ConfigError(f"--strategy must be {' or '.join(STRATEGIES)}, got {self.strategy!r}.")
        workers = self.gpus is not None or self.processes is not None
        if self.strategy == "fsdp" and self.processes is not None:
            raise ConfigError("--strategy fsdp shards the model over GPUs; CPU worker processes (--processes) train with "
                              "ddp: drop --strategy fsdp, or use --gpus N.")
        if self.strategy is not None and not workers:
            raise ConfigError("--strategy is for worker processes: add --gpus N (or --processes N on the CPU), or drop --strategy.")
        if self.unload and not workers:
            raise ConfigError("--unload frees the session's model for worker processes: add --gpus N (or --processes N on "
                              "the CPU), or drop --unload (a run in this kernel trains the session's model itself).")

    @property
    def in_workers(self) -> bool:
        """Whether the run trains in worker processes (--gpus / --processes) rather than in this one."""
        return self.gpus is not None or self.processes is not None

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        # A saved run's record: its output_dir says where that run wrote, which need not be writable here.
        config = super().from_dict({**values, "output_dir": None, "resume": None, "background": False,
                                    "gpus": None, "processes": None, "strategy": None, "unload": False})
        config.output_dir = values.get("output_dir")
        return config


@dataclass
class ClassifyConfig(_Config):
    """What qm.classify reads: the texts, and how many at a time."""

    texts: Any = field(default=None, metadata={"help": "a text or a list of texts"})
    batch_size: int = field(default=16, metadata={"help": "texts per forward pass"})
    max_length: int = field(default=512, metadata={"help": "longest text in tokens (longer ones are cut)"})

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.texts, str):
            self.texts = [self.texts]
        if not isinstance(self.texts, (list, tuple)) or not all(isinstance(t, str) for t in self.texts):
            raise ConfigError(f"classify needs a text or a list of texts, got {self.texts!r:.60}.")
        if not self.texts:
            raise ConfigError("No texts to classify: pass a text or a list of texts.")
        self.texts = list(self.texts)
        _positive("batch_size", self.batch_size)
        _positive("max_length", self.max_length)


@dataclass
class GenerateConfig(_Config):
    """How to answer a prompt."""

    prompt: str = ""
    max_new_tokens: int = field(default=128, metadata={"help": "most tokens to generate"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature"})
    top_p: float = field(default=0.9, metadata={"help": "nucleus sampling mass"})
    greedy: bool = field(default=False, metadata={"help": "always take the most likely token (reproducible)"})
    base: bool = field(default=False, metadata={"help": "answer with the adapters disabled"})
    raw: bool = field(default=False, metadata={"help": "send the text exactly as written, no chat template"})
    system: str | None = field(default=None, metadata={"help": "system message for the chat template"})
    seed: int | None = field(default=None, metadata={"help": "seed for sampling"})
    stream: bool = field(default=True, metadata={"help": "print text as it is produced"})

    def __post_init__(self):
        if self.prompt is None or (isinstance(self.prompt, str) and not self.prompt.strip()):
            raise ConfigError("The prompt is empty: write it after the magic, or in the cell body of %%qlora_generate.")
        super().__post_init__()  # a prompt that is not text: "prompt must be text, got 123" 
        _positive("--max-new-tokens", self.max_new_tokens, most=MAX_NEW_TOKENS, why=_LONG_ANSWER)
        _positive("--temperature", self.temperature)
        if not (0 < self.top_p <= 1):
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p!r}.")
        _seed("--seed", self.seed)


_LONG_ANSWER = "; an answer also ends at the model's context length"

#: Metrics %qlora_eval knows. Perplexity needs only the data; the others compare greedy answers with
#: the rendered response (the reference).
EVAL_METRICS = ("perplexity", "bleu", "rouge", "exact_match")


def _names(value, what) -> list[str] | None:
    """'a,b' or ['a', 'b'] -> ['a', 'b']; None stays None."""
    if value is None:
        return None
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v).strip() for v in value]
    names = [n for n in names if n]
    if not names:
        raise ConfigError(f"{what} is empty: give one or more names separated by commas.")
    return names


@dataclass
class EvalConfig(_Config):
    """What to evaluate on and which metrics to compute (see %qlora_eval?)."""

    data: Any = field(default=None, metadata={"help": "dataset as for training; None: the last training run's held-out split"})
    prompt: str | None = field(default=None, metadata={"help": "prompt template; None: the last training run's"})
    response: str | None = field(default=None, metadata={"help": "response (reference) template; None: the last training run's"})
    chat: bool | None = field(default=None, metadata={"help": "chat turns as in training; None: the last training run's"})
    messages: str | None = field(default=None, metadata={"help": "the column of chat conversations, as in training; None: the last training run's (unless templates are given)"})
    max_length: int | None = field(default=None, metadata={"help": "cut examples to this many tokens; None: the last run's (512)"})
    split: str | None = field(default=None, metadata={"help": "split of a Hub dataset or DatasetDict; None: a DatasetDict's test split (else validation, else train), a Hub dataset's train"})
    limit: int | None = field(default=None, metadata={"help": "evaluate at most this many rows"})
    metrics: list[str] | str = field(default_factory=lambda: ["perplexity"], metadata={"help": "perplexity, bleu, rouge, exact_match"})
    base: bool = field(default=False, metadata={"help": "also evaluate the base model (adapters disabled), in the same table"})
    adapters: list[str] | str | None = field(default=None, metadata={"help": "adapters to evaluate; None: the active one"})
    batch_size: int = field(default=8, metadata={"help": "examples per forward pass for perplexity"})
    max_new_tokens: int = field(default=64, metadata={"help": "longest greedy answer for bleu/rouge/exact_match"})

    def __post_init__(self):
        super().__post_init__()
        _check_messages(self.messages, prompt=self.prompt, response=self.response, chat=self.chat)
        self.metrics = _names(self.metrics, "--metrics")
        unknown = [m for m in self.metrics if m not in EVAL_METRICS]
        if unknown:
            raise ConfigError(f"Unknown metric {unknown[0]!r}: choose from {', '.join(EVAL_METRICS)}.")
        self.adapters = _names(self.adapters, "--adapters")
        _positive("--limit", self.limit)
        _positive("--batch-size", self.batch_size)
        _positive("--max-new-tokens", self.max_new_tokens, most=MAX_NEW_TOKENS, why=_LONG_ANSWER)
        _positive("--max-length", self.max_length)


@dataclass
class CompareConfig(_Config):
    """Prompts to answer with the base model and each adapter, side by side (see %qlora_compare?)."""

    prompts: list[str] | str = field(default_factory=list, metadata={"help": "one prompt or a list of prompts"})
    adapters: list[str] | str | None = field(default=None, metadata={"help": "adapters to answer with; None: all loaded adapters"})
    base: bool = field(default=True, metadata={"help": "include the base model's answer (adapters disabled)"})
    max_new_tokens: int = field(default=64, metadata={"help": "most tokens per answer"})
    raw: bool = field(default=False, metadata={"help": "send prompts exactly as written, no chat template"})
    system: str | None = field(default=None, metadata={"help": "system message for the chat template"})
    sample: bool = field(default=False, metadata={"help": "sample instead of greedy decoding (seeded, so still repeatable)"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature (with sample)"})
    top_p: float = field(default=0.9, metadata={"help": "nucleus sampling mass (with sample)"})
    seed: int = field(default=0, metadata={"help": "seed set before every answer, so each column samples alike"})

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.prompts, str):
            self.prompts = [self.prompts]
        self.prompts = [p for p in self.prompts if p.strip()]
        if not self.prompts:
            raise ConfigError("No prompts to compare: write them after the magic, or in the cell body separated by lines of ---.")
        self.adapters = _names(self.adapters, "--adapters")
        _positive("--max-new-tokens", self.max_new_tokens, most=MAX_NEW_TOKENS, why=_LONG_ANSWER)
        _positive("--temperature", self.temperature)
        if not (0 < self.top_p <= 1):
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p!r}.")
        _seed("--seed", self.seed)
        if not self.base and self.adapters == []:
            raise ConfigError("Nothing to compare: keep the base model or name an adapter.")


#: PEFT's add_weighted_adapter combination types (with another name it adds an adapter of untouched weights).
COMBINATIONS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")

MERGE_DTYPES = ("float16", "bfloat16", "float32")


@dataclass
class MergeConfig(_Config):
    """Where and how to write a merged (adapter folded in), unquantized copy of the model."""

    path: str = field(default="", metadata={"help": "folder to write the merged model to"})
    dtype: str = field(default="float16", metadata={"help": "weights of the merged copy: float16, bfloat16 or float32"})
    adapter: str | None = field(default=None, metadata={"help": "adapter to merge; None: the active one"})
    verify: bool = field(default=True, metadata={"help": "compare greedy answers and perplexity of merged vs adapter"})
    data: Any = field(default=None, metadata={"help": "rows to check on, with the last run's templates; None: its held-out rows"})
    prompts: list[str] | None = field(default=None, metadata={"help": "prompts for an answers-only check, instead of data"})
    max_new_tokens: int = field(default=24, metadata={"help": "length of the greedy answers compared"})
    tolerance: float = field(default=0.05, metadata={"help": "largest drift still reported as a match: relative perplexity, or for --task seq-cls the mean change of class probabilities"})

    def __post_init__(self):
        if not isinstance(self.path, str) or not self.path.strip():
            raise ConfigError("%qlora_merge needs a folder to write to, e.g. %qlora_merge merged/my-model.")
        super().__post_init__()
        check_folder(self.path, "The merge folder")
        if self.dtype not in MERGE_DTYPES:
            raise ConfigError(f"--dtype must be float16, bfloat16 or float32, got {self.dtype!r}.")
        _positive("--max-new-tokens", self.max_new_tokens, most=MAX_NEW_TOKENS, why=_LONG_ANSWER)
        _positive("--tolerance", self.tolerance)


EXPORT_FORMATS = ("gguf",)
#: GGML types the GGUF writer produces (qlora_magic.engine.gguf_file.QUANT_TYPES; kept here so config imports no engine)
EXPORT_QUANTS = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")


@dataclass
class ExportConfig(_Config):
    """Where and how to export the merged model for llama.cpp, Ollama or LM Studio (GGUF)."""

    format: str = field(default="gguf", metadata={"help": "file format: gguf"})
    path: str = field(default="", metadata={"help": "folder to write the .gguf file (and with ollama, the Modelfile) to"})
    quant: str = field(default="f16", metadata={"help": "GGML type of the weights: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1 or q4_0"})
    ollama: bool = field(default=False, metadata={"help": "also write an Ollama Modelfile (template, stop tokens, parameters)"})
    adapter: str | None = field(default=None, metadata={"help": "adapter to merge; None: the active one"})
    verify: bool = field(default=True, metadata={"help": "compare greedy answers and perplexity of the exported file vs the adapter"})
    data: Any = field(default=None, metadata={"help": "rows to check on, with the last run's templates; None: its held-out rows"})
    prompts: list[str] | None = field(default=None, metadata={"help": "prompts for an answers-only check, instead of data"})
    max_new_tokens: int = field(default=24, metadata={"help": "length of the greedy answers compared"})
    tolerance: float = field(default=0.05, metadata={"help": "largest relative perplexity drift still reported as a match"})

    def __post_init__(self):
        if not isinstance(self.path, str) or not self.path.strip():
            raise ConfigError("%qlora_export needs a format and a folder to write to, e.g. %qlora_export gguf exported/my-model.")
        super().__post_init__()
        if self.format not in EXPORT_FORMATS:
            raise ConfigError(f"%qlora_export writes gguf, got {self.format!r}; for a safetensors folder use %qlora_merge.")
        check_folder(self.path, "The export folder")
        if self.quant not in EXPORT_QUANTS:
            raise ConfigError(f"--quant must be one of {', '.join(EXPORT_QUANTS)}, got {self.quant!r}.")
        _positive("--max-new-tokens", self.max_new_tokens, most=MAX_NEW_TOKENS, why=_LONG_ANSWER)
        _positive("--tolerance", self.tolerance)


#: What %%qlora_tune may search: LoRA options (a fresh adapter per trial) and training options.
TUNE_LORA = ("r", "alpha", "dropout", "targets")
TUNE_TRAIN = ("lr", "epochs", "max_steps", "batch_size", "grad_accum", "warmup", "weight_decay", "scheduler")
_TUNE_INTS = ("r", "max_steps", "batch_size", "grad_accum")


@dataclass
class TuneConfig(_Config):
    """A search over LoRA and training options with Optuna (see %%qlora_tune?)."""

    train: Any = field(default=None, metadata={"help": "TrainConfig of what every trial shares (data, templates, eval_split...)"})
    search: dict = field(default_factory=dict, metadata={"help": "name: [choices] or {low, high, log}"})
    trials: int = field(default=5, metadata={"help": "number of trials"})
    prune: bool = field(default=True, metadata={"help": "stop trials whose eval loss trails the median of earlier ones"})
    seed: int = field(default=0, metadata={"help": "seed of the sampler (TPE)"})
    keep: bool = field(default=True, metadata={"help": "keep the best trial's adapter (named trialN) and make it active"})

    def __post_init__(self):
        if isinstance(self.train, dict):
            self.train = TrainConfig(**self.train)
        super().__post_init__()
        if not isinstance(self.train, TrainConfig) or self.train.data is None:
            raise ConfigError("%%qlora_tune needs data, prompt and response in the cell body, as %%qlora_train does.")
        if not self.train.eval_split:
            raise ConfigError("Tuning minimizes the held-out eval loss: add eval_split: 0.2 (or a row count) to the cell body.")
        _positive("--trials", self.trials, most=MAX_TRIALS)
        _seed("--sampler-seed", self.seed)
        if not self.search:
            raise ConfigError("The search space is empty: add e.g.  search: {r: [4, 8, 16], lr: {low: 1e-4, high: 1e-2, log: true}}")
        for name, spec in self.search.items():
            if name not in TUNE_LORA + TUNE_TRAIN:
                raise ConfigError(f"Cannot search {name!r}: choose from {', '.join(TUNE_LORA + TUNE_TRAIN)}.")
            if isinstance(spec, list):
                if not spec:
                    raise ConfigError(f"search: {name} has no choices.")
                values = spec
            elif isinstance(spec, dict) and {"low", "high"} <= set(spec) and set(spec) <= {"low", "high", "log", "step"}:
                low, high = spec["low"], spec["high"]
                if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (low, high)) or not low < high:
                    raise ConfigError(f"search: {name} needs numbers with low < high, got {low!r} and {high!r}.")
                if spec.get("log") and spec.get("step") is not None:
                    raise ConfigError(f"search: {name} takes either log: true or a step, not both.")
                if spec.get("log") and low <= 0:
                    raise ConfigError(f"search: {name} on a log scale needs low > 0, got {low!r}.")
                step = spec.get("step")
                if step is not None and not (isinstance(step, numbers.Real) and not isinstance(step, bool) and 0 < step <= high - low):
                    raise ConfigError(f"search: {name} needs a step between 0 and high - low, got {step!r}.")
                values = [low, high]
            else:
                raise ConfigError(f"search: {name} must be a list of choices or {{low: ..., high: ..., log: true}}, got {spec!r}.")
            for value in values:  # each choice, and each end of a range, is checked as the option itself is
                try:
                    LoadConfig(**{name: value}) if name in TUNE_LORA else self.train.replace(**{name: value})
                except ConfigError as error:
                    raise ConfigError(f"search: {name}: {error}") from None

    def is_int(self, name) -> bool:
        return name in _TUNE_INTS
