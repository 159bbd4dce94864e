"""Parsing magic lines and cell bodies into configs. No execution here: each function turns text
into a config dataclass, so it can be tested alone. The option declarations below also produce
each magic's `%name?` help and the docs reference."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import shlex
import typing
from argparse import ArgumentTypeError

from IPython.core.error import UsageError
from IPython.core.magic_arguments import argument, magic_arguments

from ..config import (COMBINATIONS, CompareConfig, EvalConfig, EXPORT_QUANTS, ExportConfig, GenerateConfig, LoadConfig, MergeConfig, TrainConfig, TuneConfig,
                      check_adapter_options, check_folder)
from ..errors import ConfigError


def config_default(config, name):
    """The default of field `name` of the config dataclass `config`. The dataclass is the one source of
    defaults: the options' help below and the panel's initial values read them from there."""
    field = config.__dataclass_fields__[name]
    return field.default if field.default_factory is dataclasses.MISSING else field.default_factory()


def _default(config, name) -> str:
    """'(default 8)' for an option's help, from the field's default: _default(LoadConfig, "r")."""
    value = config_default(config, name)
    if isinstance(value, (list, tuple)):
        text = ",".join(map(str, value))
    elif isinstance(value, float) and 0 < abs(value) < 1e-3:  # 2e-4 rather than 0.0002
        mantissa, exponent = f"{value:e}".split("e")
        text = f"{float(mantissa):g}e{int(exponent)}"
    elif isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
    return f"(default {text})"


def _bits(text):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise ArgumentTypeError(f"choose from 4, 8, 16, auto, got {text!r}") from None


@magic_arguments()
@argument("model", nargs="?", default=None, help="Hub id or local folder (default: the embedded SmolLM2-135M-Instruct)")
@argument("--bits", type=_bits, choices=[4, 8, 16, "auto"], default=None,
          help="8: LLM.int8 (default); 4: NF4 with double quantization; 16: no quantization; auto: the layers 4-bit hurts most in 8-bit, the rest 4-bit")
@argument("--keep-8bit", type=float, default=None, help="with --bits auto: the largest fraction of the quantized parameters kept in 8-bit (default 0.25)")
@argument("--r", type=int, default=None, help=f"LoRA rank {_default(LoadConfig, 'r')}")
@argument("--alpha", type=float, default=None, help=f"LoRA alpha; the update is scaled by alpha/r {_default(LoadConfig, 'alpha')}")
@argument("--dropout", type=float, default=None, help=f"LoRA dropout {_default(LoadConfig, 'dropout')}")
@argument("--targets", default=None, help="comma-separated module names, or all-linear (default: the architecture's attention q/v)")
@argument("--seed", type=int, default=None, help=f"seed of the new LoRA weights' random start (and a classifier's new head): the same seed, the same adapter before training {_default(LoadConfig, 'seed')}")
@argument("--task", default=None, help=f"causal-lm: a decoder-only language model; seq-cls: text classification; seq2seq: an encoder-decoder model, e.g. summarization {_default(LoadConfig, 'task')}")
@argument("--num-labels", type=int, default=None, help=f"seq-cls: number of classes {_default(LoadConfig, 'num_labels')}")
@argument("--adapter", default=None, help="restore a saved adapter folder (and the base model it names)")
@argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
@argument("--device-map", default=None, help="auto: spread the layers over every GPU (a model larger than one GPU; for training past one GPU use %%qlora_train --gpus)")
def qlora_load(line=""):
    """Load a quantized base model with LoRA adapters and show the memory readout.

    Examples::

        %qlora_load
        %qlora_load --bits 4 --r 16 --targets all-linear
        %qlora_load --bits auto --keep-8bit 0.25
        %qlora_load --adapter runs/my-adapter
        %qlora_load microsoft/deberta-v3-base --task seq-cls --num-labels 2
        %qlora_load google/flan-t5-base --task seq2seq
    """


@magic_arguments()
@argument("--epochs", type=float, default=None, help=f"passes over the data {_default(TrainConfig, 'epochs')}")
@argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
@argument("--batch-size", type=int, default=None, help=f"examples per micro-batch {_default(TrainConfig, 'batch_size')}")
@argument("--grad-accum", type=int, default=None, help=f"micro-batches per optimizer step {_default(TrainConfig, 'grad_accum')}")
@argument("--lr", type=float, default=None, help=f"peak learning rate {_default(TrainConfig, 'lr')}")
@argument("--warmup", type=float, default=None, help=f"warm-up fraction of the steps {_default(TrainConfig, 'warmup')}")
@argument("--scheduler", default=None, help=f"learning-rate schedule: linear, cosine, constant... {_default(TrainConfig, 'scheduler')}")
@argument("--weight-decay", type=float, default=None, help=f"AdamW weight decay {_default(TrainConfig, 'weight_decay')}")
@argument("--max-length", type=int, default=None, help=f"cut examples to this many tokens {_default(TrainConfig, 'max_length')}")
@argument("--eval-steps", type=int, default=None, help="evaluate every N steps (default: 5 times a run)")
@argument("--logging-steps", type=int, default=None, help=f"log every N steps {_default(TrainConfig, 'logging_steps')}")
@argument("--seed", type=int, default=None, help=f"random seed {_default(TrainConfig, 'seed')}")
@argument("--packing", action="store_true", default=None, help="pack examples into one row per batch, no padding (default on)")
@argument("--no-packing", dest="packing", action="store_false", default=None, help="pad each batch to its longest example instead of packing")
@argument("--gradient-checkpointing", action="store_true", default=None, help="recompute activations to save memory (default: when the memory estimate needs it)")
@argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false", default=None, help="never recompute activations")
@argument("--compile", action="store_true", default=None, help="compile each decoder layer with torch.compile (default: on a GPU, for runs long enough to win back the compile)")
@argument("--no-compile", dest="compile", action="store_false", default=None, help="run the layers as they are, never compiled")
@argument("--max-memory", default=None, help="GPU memory budget for choosing the batch layout: 10GB (10e9 bytes), 10GiB (10 x 2**30), 512MB, or a number of GB (default: the card's memory)")
@argument("--output-dir", default=None, help="folder that holds the run folders: settings, history, checkpoints, TensorBoard (default runs/; a Google Drive folder survives a Colab disconnect)")
@argument("--name", default=None, help="the run's name: its folder is <output-dir>/<time>-<name> (default: the data file's name)")
@argument("--checkpoint-minutes", type=float, default=None, help=f"write a checkpoint every N minutes, also after each evaluation and at the end; 0: only those {_default(TrainConfig, 'checkpoint_minutes')}")
@argument("--resume", nargs="?", const=True, default=None, help="carry on the newest run in --output-dir from its latest checkpoint, or the run folder given (a new kernel loads its model)")
@argument("--background", action="store_true", default=None, help="start the run and return the cell at once; %%qlora_attach shows it, %%qlora_stop stops it")
@argument("--gpus", default=None, help="train in worker processes, one per GPU (torch.distributed): a number, or all (default: in this kernel)")
@argument("--processes", type=int, default=None, help="train in N worker processes on the CPU (torch.distributed's gloo backend: tests, the course)")
@argument("--unload", action="store_true", default=None, help="with --gpus/--processes: the session's model leaves memory while the workers train (its GPU memory goes to them) and is loaded back after, with the trained adapter; without it, done anyway when the run fits only that way")
@argument("--strategy", default=None, choices=["ddp", "fsdp"], help="with --gpus: ddp (each GPU holds the model) or fsdp (FSDP2: the 4-bit weights sharded over the GPUs); default: chosen from the memory plan")
@argument("--report-to", default=None, help=f"experiment trackers, comma-separated: tensorboard, mlflow (a local store, <output-dir>/mlflow.db, unless MLFLOW_TRACKING_URI is set), trackio (local), wandb (offline unless an API key is set up), or none {_default(TrainConfig, 'report_to')}")
@argument("--display", default=None, choices=["auto", "html", "widget", "text", "none"], help=f"how to show progress {_default(TrainConfig, 'display')}")
def qlora_train(line="", cell=""):
    """Fine-tune the loaded model's adapters. The cell body is YAML::

        %%qlora_train --epochs 1 --lr 2e-4
        data: $rows            # a variable, a .jsonl/.json/.csv/.parquet path, or a Hub dataset id
        prompt: "Question: {question}\\nAnswer: "
        response: "{answer}"
        eval_split: 0.1        # optional: fraction or row count held out
        chat: false            # true: prompt/response become chat turns
        max_length: 512

    With --task seq-cls, give label: <column> instead of response: (prompt: is the text to classify);
    with --task seq2seq, prompt: is the source and response: the target.
    With --gpus 2 (or all) the run trains in worker processes launched through torch.distributed, one per
    GPU, each loading the base model itself; the cell shows the same progress, and the trained adapter comes
    back into the session. The run folder also runs on a cluster: python -m qlora_magic.run RUN_FOLDER under torchrun.
    Any option above may also be written in the body (epochs: 2); flags win over the body.
    """


@magic_arguments()
@argument("--max-new-tokens", type=int, default=None, help=f"most tokens to generate {_default(GenerateConfig, 'max_new_tokens')}")
@argument("--temperature", type=float, default=None, help=f"sampling temperature {_default(GenerateConfig, 'temperature')}")
@argument("--top-p", type=float, default=None, help=f"nucleus sampling mass {_default(GenerateConfig, 'top_p')}")
@argument("--greedy", action="store_true", help="take the most likely token each time (reproducible)")
@argument("--base", action="store_true", help="answer with the adapters disabled (the base model)")
@argument("--raw", action="store_true", help="no chat template: send the text exactly as written")
@argument("--system", default=None, help="system message for the chat template")
@argument("--seed", type=int, default=None, help="seed for sampling")
@argument("prompt", nargs="*", help="the prompt (the rest of the line; in %%qlora_generate, the cell body)")
def qlora_generate(line="", cell=None):
    """Generate an answer, streaming it into the output.

    Examples::

        %qlora_generate What is the capital of France?
        %qlora_generate --greedy --base Tell me a joke.
        %%qlora_generate --raw --greedy
        Instruction: Give the opposite of the word.

        Input: {hot}

        Response:
    """


@magic_arguments()
@argument("path", help="folder to write the adapter to")
def qlora_save(line=""):
    """Save the adapter (PEFT safetensors), tokenizer, and the run's configs and metrics."""


@magic_arguments()
def qlora_memory(line=""):
    """Show memory now: model footprint, GPU allocated/reserved/total, or the process's CPU memory."""


@magic_arguments()
def qlora_unload(line=""):
    """Drop the loaded model and tokenizer and show the memory freed (GPU memory on a GPU, the process's RSS
    on the CPU). The history stays; %qlora_load loads a model again."""


# --- magic lines: split as a shell would, then read with the magic's declared options ---------------

def parse_line(declaration, line: str):
    """The argparse namespace of a magic line: `parse_line(qlora_save, '"my runs/ad"').path == 'my runs/ad'`.

    The line is split as a shell would: quotes group words and are removed (IPython's own splitter keeps
    them, and %qlora_save "a b/c" wrote to a folder named '"a b'). Any problem with the line is one line."""
    return _read_words(declaration, _shell_words(line))


def _shell_words(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as error:  # an unclosed quote, or a backslash at the very end
        raise UsageError(f"Cannot read the line: {error}; {_how_to_close(text)}") from None


def _how_to_close(text: str) -> str:
    """Where the unclosed quote of `text` opens, to quote it in the message."""
    quote, start, escaped = None, None, False
    for i, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote is None and char in "\"'":
            quote, start = char, i
        elif char == quote:
            quote = None
    if quote is None:
        return "remove the backslash at the end, or write \\\\ for a backslash."
    fragment = text[start:start + 30] + ("..." if len(text) > start + 30 else "")
    return f"close the quotes around `{fragment}`."


def _read_words(declaration, words: list[str]):
    # The parser's errors (an unknown option, a bad number) are UsageErrors: one line in IPython.
    try:
        return declaration.parser.parse_args(words)
    except UsageError as error:
        raise UsageError(f"%{declaration.__name__}: {error}; %{declaration.__name__}? lists the options.") from None


def _options(args, skip=()) -> dict:
    """argparse namespace -> config keywords, dropping options the user did not give."""
    return {k: v for k, v in vars(args).items() if v is not None and k not in skip}


def parse_load(line: str) -> LoadConfig:
    options = _options(parse_line(qlora_load, line))
    check_adapter_options(options)
    return LoadConfig(**options)


# --- YAML cell bodies: %%qlora_train, %%qlora_eval and %%qlora_tune read theirs alike --------------

def _holds_number(hint) -> bool:
    return bool({int, float} & set(typing.get_args(hint) or (hint,)))


class CellBody:
    """What one magic's YAML cell body may hold, and the one reader of such bodies.

    Keys are the fields of `configs` (plus `extra`, name: type). Every body is read alike: a YAML error
    names its line; an unquoted {answer} is the template "{answer}"; text written like a number
    (1e-3, which YAML 1.1 leaves a string) becomes one only under keys that hold numbers, so text
    (prompt, response, data, label, split...) stays exactly as written; and data: $name is the
    notebook variable `name`.
    """

    def __init__(self, magic, *configs, extra=None, keys_text=None):
        types = {name: hint for config in configs for name, hint in typing.get_type_hints(config).items()}
        types.update(extra or {})
        self.magic = magic
        self.keys = set(types)
        self.numbers = {name for name, hint in types.items() if _holds_number(hint)}
        self.keys_text = keys_text or ", ".join(sorted(self.keys))

    def read(self, cell, flags=None, namespace=None) -> dict:
        """The body as config keywords; `flags` (the options on the magic's line) win over it, and a
        $name data, from either, is looked up in `namespace`."""
        import yaml

        try:
            body = yaml.load(cell or "", Loader=_unique_keys_loader()) or {}
        except yaml.YAMLError as error:
            line = _yaml_error_line(error, cell)
            where = f" (line {line})" if line else ""
            problem = str(getattr(error, "problem", None) or error).splitlines()[0]
            fix = "remove that character" if isinstance(error, yaml.reader.ReaderError) else "quote templates, e.g. prompt: \"Q: {q}\""
            raise ConfigError(f"The cell body is not valid YAML{where}: {problem}; {fix}.") from None
        if not isinstance(body, dict):
            raise ConfigError("The cell body must be YAML key: value lines, e.g. data: rows.jsonl")
        body = {str(k).replace("-", "_"): v for k, v in body.items()}
        unknown = sorted(set(body) - self.keys)
        if unknown:
            raise ConfigError(f"Unknown key {unknown[0]!r} in the cell body of {self.magic}; known keys: {self.keys_text}.")
        for key in ("prompt", "response"):
            if key in body:
                body[key] = _template_from_yaml(key, body[key])
        options = {**{k: _number(v) if k in self.numbers else v for k, v in body.items()}, **(flags or {})}
        data = options.get("data")
        if isinstance(data, str) and data.startswith("$"):
            options["data"] = lookup_variable(data[1:], namespace)
        return options


@functools.cache
def _unique_keys_loader():
    """YAML's safe loader, except that a key given twice in one mapping (two prompt: lines, the second silently
    winning) is a one-line ConfigError naming both lines."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                if not isinstance(key, typing.Hashable):  # YAML's own error follows (an unhashable key)
                    continue
                if key in seen:
                    raise ConfigError(f"The cell body gives {key!r} twice (lines {seen[key]} and {line}): keep one.")
                seen[key] = line
            return super().construct_mapping(node, deep=deep)

    return UniqueKeys


def _yaml_error_line(error, cell) -> int | None:
    """The body line a YAML error is on; at the end of the body (an unclosed quote or bracket), the
    line where the unclosed part starts."""
    if getattr(error, "position", None) is not None:  # a character YAML does not allow (a control character)
        return (cell or "")[:error.position].count("\n") + 1
    mark, start = getattr(error, "problem_mark", None), getattr(error, "context_mark", None)
    if mark is not None and start is not None and mark.index >= len((cell or "").rstrip()):
        mark = start
    return None if mark is None else mark.line + 1


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _number(value):
    # PyYAML (YAML 1.1) reads 1e-3 as a string; the user meant a number.
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        number = float(value)
        return int(number) if number.is_integer() and "e" not in value.lower() and "." not in value else number
    return value


def _template_from_yaml(key, value):
    # YAML reads an unquoted {answer} as a mapping {answer: None}; that is what the user meant.
    if isinstance(value, dict) and len(value) == 1 and next(iter(value.values())) is None:
        return "{" + str(next(iter(value))) + "}"
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{key}: must be a text template; put it in quotes, e.g. {key}: \"{{{key}}}\".")
    return value


_TRAIN_KEYS = "data, prompt, response, label, chat, messages, eval_split, max_length, split, and any option that %qlora_train? lists (e.g. epochs: 2)"
TRAIN_BODY = CellBody("%%qlora_train", TrainConfig, keys_text=_TRAIN_KEYS)
EVAL_BODY = CellBody("%%qlora_eval", EvalConfig)
TUNE_BODY = CellBody("%%qlora_tune", TrainConfig, extra={"search": dict, "trials": int}, keys_text="search, trials, " + _TRAIN_KEYS)
# Body keys of %%qlora_train: the data description, plus any TrainConfig option.
BODY_KEYS = TRAIN_BODY.keys


def parse_train(line: str, cell: str, namespace: dict | None = None, declaration=None, body=TRAIN_BODY) -> TrainConfig:
    """`%%qlora_train` flags + YAML body -> TrainConfig. `$name` data is looked up in `namespace`.
    `declaration`, `body`: another magic's, with the same options and body (%%qlora_data)."""
    flags = _options(parse_line(declaration or qlora_train, line))
    for name, value in flags.items():  # IPython fills in $name from the notebook; one left as written names nothing
        if isinstance(value, str) and value.startswith("$"):
            raise ConfigError(f"--{name.replace('_', '-')} {value}: no notebook variable {value[1:]!r}; define it first, or write the value itself.")
    return TrainConfig(**body.read(cell, flags, namespace))


def _options_of(declaration):
    """Give a magic the declared options of `declaration` (put under @magic_arguments(), which builds the parser)."""

    def decorate(func):
        func.has_arguments, func.decorators = True, list(declaration.decorators)
        return func

    return decorate


@magic_arguments()
@_options_of(qlora_train)
def qlora_data(line="", cell=""):
    """Check training data before training: the body and options are %%qlora_train's, the rows are tokenized with
    the loaded tokenizer exactly as training would, and nothing is trained or changed::

        %%qlora_data --max-length 256
        data: $rows
        prompt: "Question: {question}\\nAnswer: "
        response: "{answer}"

    Shows rows and columns used, a token length histogram of prompts and responses, the rows max_length cuts and
    those left with no trained token, whether targets keep a stop token that generation stops at (the
    tokenizer's eos, the chat template's end of turn, generation_config.eos_token_id), duplicates, empty fields,
    and the first rows as tokens marked by whether they count in the loss. %%qlora_train runs the same checks
    first: a problem stops it in one line, warnings go into its readout.
    """


def parse_data(line: str, cell: str, namespace: dict | None = None) -> TrainConfig:
    """`%%qlora_data` flags + YAML body -> the TrainConfig %%qlora_train would make of them."""
    return parse_train(line, cell, namespace, declaration=qlora_data, body=DATA_BODY)


DATA_BODY = CellBody("%%qlora_data", TrainConfig, keys_text=_TRAIN_KEYS)


@magic_arguments()
@argument("model", nargs="?", default=None, help="a Hub id (in the local cache) or folder to size against free memory (default: the loaded model, else the embedded default)")
@argument("--bits", type=int, choices=[4, 8], default=None, help="size the model for this quantization only (default: 4 and 8)")
def qlora_doctor(line=""):
    """Check the environment before spending GPU time: one row per check, OK / warning / problem, each with a
    one-line fix. Frontend and widget support (ipywidgets and the widget manager's versions, Colab, VS Code), the
    live display's form, torch/CUDA/driver, bitsandbytes on this device, free GPU memory against the model in 4
    and 8 bits, RAM and disk for a merge, Hub access and cache, tracker logins. Reads only; no network call.

    Examples::

        %qlora_doctor
        %qlora_doctor Qwen/Qwen2.5-7B-Instruct --bits 4
    """


def parse_doctor(line: str) -> dict:
    """`%qlora_doctor` line -> the keywords of api.doctor."""
    args = parse_line(qlora_doctor, line)
    return {"model": args.model, "bits": args.bits}


def lookup_variable(name, namespace):
    """The notebook variable `$name` names (data: $rows), or a one-line error."""
    if not name.isidentifier():
        raise ConfigError(f"data: ${name} is not a variable name.")
    if namespace is None or name not in namespace:
        raise ConfigError(f"data: ${name} names no variable in the notebook: define {name} first (a list of dicts, a DataFrame or a Dataset).")
    return namespace[name]


_WORD = re.compile(r"\s*(\S+)")


def split_options(line: str, declaration=None) -> tuple[list[str], str]:
    """Split '%qlora_generate --greedy What is -1 + 2?' into (['--greedy'], 'What is -1 + 2?').

    Options are read only at the start of the line, each split as a shell would ('--system "Be brief"');
    the prompt is the rest, kept exactly as written (words that start with '-' and quotes included).
    A '--' ends the options explicitly.
    """
    parser = (declaration or qlora_generate).parser  # also %qlora_compare's
    takes_value = {s for a in parser._actions for s in a.option_strings if a.nargs != 0}
    flags = {s for a in parser._actions for s in a.option_strings}
    pos, words = 0, []
    while match := _WORD.match(line, pos):
        token = match.group(1)
        if token == "--":
            pos = match.end()
            break
        name = token.split("=", 1)[0]
        if name not in flags:
            break
        word, pos = _next_shell_word(line, match.start(1))
        words.append(word)
        if name in takes_value and "=" not in token:
            if not _WORD.match(line, pos):
                raise UsageError(f"{name} needs a value.")
            value, pos = _next_shell_word(line, pos)
            words.append(value)
    return words, line[pos:].strip()


def _next_shell_word(line: str, pos: int) -> tuple[str, int]:
    """The shell word starting at `pos` (quotes removed) and where the rest of the line starts."""
    lexer = shlex.shlex(line[pos:], posix=True)
    lexer.whitespace_split, lexer.commenters = True, ""
    try:
        word = lexer.get_token()
    except ValueError as error:
        raise UsageError(f"Cannot read the line: {error}; {_how_to_close(line[pos:])}") from None
    return word, pos + lexer.instream.tell()


def parse_generate(line: str, cell: str | None = None) -> GenerateConfig:
    words, prompt = split_options(line)
    args = _read_words(qlora_generate, words)
    if cell is not None:
        if prompt:
            raise ConfigError("%%qlora_generate takes the prompt from the cell body; the line holds only options.")
        prompt = cell.strip("\n")
    return GenerateConfig(prompt=prompt, **_options(args, skip={"prompt"}))


def parse_save(line: str) -> str:
    """The folder of `%qlora_save PATH`, checked before anything is written."""
    path = parse_line(qlora_save, line).path
    check_folder(path, "%qlora_save")
    return path


@magic_arguments()
def qlora_panel(line=""):
    """Show the dashboard: Load, Train, Generate and Save tabs over a live memory readout.

    Training runs in the background, so the Stop button works while it runs. Same as
    ``qlora_magic.panel()``; needs ipywidgets.
    """


MAGIC_DECLARATIONS = [qlora_load, qlora_train, qlora_generate, qlora_save, qlora_memory, qlora_unload, qlora_panel]


# --- evaluation, comparison, adapters, merge -------------------------------------------------------

@magic_arguments()
@argument("--metrics", default=None, help=f"comma-separated: perplexity, bleu, rouge, exact_match {_default(EvalConfig, 'metrics')}")
@argument("--base", action="store_true", default=None, help="also evaluate the base model (adapters disabled), in the same table")
@argument("--adapters", default=None, help="comma-separated adapters to evaluate (default: the active one)")
@argument("--data", default=None, help="dataset as for %%qlora_train, or $variable (default: the last run's held-out split)")
@argument("--limit", type=int, default=None, help="evaluate at most N rows")
@argument("--batch-size", type=int, default=None, help=f"examples per forward pass {_default(EvalConfig, 'batch_size')}")
@argument("--max-new-tokens", type=int, default=None, help=f"longest greedy answer for bleu/rouge/exact_match {_default(EvalConfig, 'max_new_tokens')}")
def qlora_eval(line="", cell=None):
    """Evaluate the adapter: perplexity over response tokens, and BLEU/ROUGE/exact match of greedy
    answers against the references. Results also go to get_session().history (kind 'eval').

    Examples::

        %qlora_eval --base                                  # the last run's held-out split
        %qlora_eval --base --metrics perplexity,bleu,rouge --limit 20
        %%qlora_eval --metrics rouge
        data: test.jsonl          # or $rows; prompt/response default to the last run's
        prompt: "Question: {question}\\nAnswer: "
        response: "{answer}"
    """


@magic_arguments()
@argument("--adapters", default=None, help="comma-separated adapters to answer with (default: all loaded)")
@argument("--no-base", action="store_true", help="leave out the base model's answers")
@argument("--max-new-tokens", type=int, default=None, help=f"most tokens per answer {_default(CompareConfig, 'max_new_tokens')}")
@argument("--raw", action="store_true", default=None, help="no chat template: send each prompt exactly as written")
@argument("--system", default=None, help="system message for the chat template")
@argument("--sample", action="store_true", default=None, help="sample (seeded) instead of greedy decoding")
@argument("--temperature", type=float, default=None, help=f"sampling temperature, with --sample {_default(CompareConfig, 'temperature')}")
@argument("--seed", type=int, default=None, help=f"seed set before each answer {_default(CompareConfig, 'seed')}")
@argument("prompt", nargs="*", help="one prompt (the rest of the line); in %%qlora_compare, prompts separated by lines of ---")
def qlora_compare(line="", cell=None):
    """Answer the same prompts with the base model and each adapter, side by side (one model in memory).

    Examples::

        %qlora_compare Name the capital of France.
        %%qlora_compare --raw --max-new-tokens 20
        Instruction: Give the plural.

        Input: mouse

        Response:
        ---
        Instruction: Give the past tense.

        Input: run

        Response:
    """


ADAPTER_ACTIONS = ("list", "add", "load", "switch", "delete", "combine")


@magic_arguments()
@argument("action", nargs="?", default="list", help="list (default), add NAME, load PATH, switch NAME, delete NAME, combine NAME")
@argument("name", nargs="?", default=None, help="adapter name (for load: the folder; --name sets its name)")
@argument("--name", dest="as_name", default=None, help="load: the name to give the loaded adapter (default: the folder's name)")
@argument("--r", type=int, default=None, help="add: LoRA rank (default: as the loaded model)")
@argument("--alpha", type=float, default=None, help="add: LoRA alpha")
@argument("--dropout", type=float, default=None, help="add: LoRA dropout")
@argument("--targets", default=None, help="add: comma-separated module names, or all-linear")
@argument("--weights", default=None, help="combine: name=weight pairs, e.g. default=0.7,task2=0.3")
@argument("--combination", default=None, choices=COMBINATIONS, help="combine: PEFT's combination type (default: linear when the ranks agree, else cat)")
@argument("--keep-active", action="store_true", help="add/load/combine: do not switch to the new adapter")
def qlora_adapters(line=""):
    """Several LoRA adapters on one quantized base. The active one is used and trained.

    Examples::

        %qlora_adapters                       # list them
        %qlora_adapters add task2 --r 16      # a fresh adapter beside the first; now active
        %%qlora_train ...                     # trains task2 only
        %qlora_adapters switch default
        %qlora_adapters load runs/my-adapter --name older
        %qlora_adapters combine mix --weights default=0.5,task2=0.5
        %qlora_adapters delete task2
    """


@magic_arguments()
@argument("path", help="folder to write the merged model to (safetensors + tokenizer)")
@argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"], help=f"weights of the merged copy {_default(MergeConfig, 'dtype')}")
@argument("--adapter", default=None, help="adapter to merge (default: the active one)")
@argument("--no-verify", action="store_true", help="skip the check of merged vs adapter answers and perplexity")
@argument("--max-new-tokens", type=int, default=None, help=f"length of the greedy answers compared {_default(MergeConfig, 'max_new_tokens')}")
@argument("--tolerance", type=float, default=None, help=f"largest drift reported as a match: relative perplexity, or for --task seq-cls the mean change of class probabilities {_default(MergeConfig, 'tolerance')}")
def qlora_merge(line=""):
    """Merge the adapter into an unquantized 16-bit copy of the base (reloaded from its original
    weights, not dequantized from 8/4-bit) and save it as a plain transformers model; then check that
    the merged model answers and scores like the adapter, and report the drift.

    Examples::

        %qlora_merge merged/word-forms
        %qlora_merge merged/word-forms --dtype bfloat16 --adapter task2
    """



@magic_arguments()
@argument("format", help="file format: gguf (llama.cpp, Ollama, LM Studio)")
@argument("path", help="folder to write the .gguf file (and with --ollama, the Modelfile) to")
@argument("--quant", default=None, help=f"GGML type of the weights: {', '.join(EXPORT_QUANTS)} {_default(ExportConfig, 'quant')}")
@argument("--ollama", action="store_true", help="also write an Ollama Modelfile: template, stop tokens and parameters from the model's chat template and generation config")
@argument("--adapter", default=None, help="adapter to merge (default: the active one)")
@argument("--no-verify", action="store_true", help="skip the check of the file's answers and perplexity against the adapter's")
@argument("--max-new-tokens", type=int, default=None, help=f"length of the greedy answers compared {_default(ExportConfig, 'max_new_tokens')}")
@argument("--tolerance", type=float, default=None, help=f"largest relative perplexity drift reported as a match {_default(ExportConfig, 'tolerance')}")
def qlora_export(line=""):
    """Merge the adapter as %qlora_merge does (into the original 16-bit weights), write it as one GGUF file for
    llama.cpp, Ollama or LM Studio, quantized to --quant, and with --ollama a Modelfile beside it; then check the
    file's greedy answers and perplexity against the adapter's (through llama.cpp when llama-cpp-python is
    installed) and report the drift. RAM and disk are checked before anything starts. Llama-architecture models.

    Examples::

        %qlora_export gguf exported/word-forms
        %qlora_export gguf exported/word-forms-q8 --quant q8_0 --ollama
    """

def parse_eval(line: str, cell: str | None = None, namespace: dict | None = None) -> EvalConfig:
    """`%qlora_eval` flags (+ the YAML body of `%%qlora_eval`) -> EvalConfig; `$name` data from `namespace`."""
    args = parse_line(qlora_eval, line)
    return EvalConfig(**EVAL_BODY.read(cell, _options(args), namespace))


_SEPARATOR = re.compile(r"^\s*---\s*$", re.MULTILINE)


def parse_compare(line: str, cell: str | None = None) -> CompareConfig:
    words, prompt = split_options(line, qlora_compare)
    args = _read_words(qlora_compare, words)
    if cell is not None:
        if prompt:
            raise ConfigError("%%qlora_compare takes the prompts from the cell body; the line holds only options.")
        prompts = [p.strip("\n") for p in _SEPARATOR.split(cell)]
    else:
        prompts = [prompt]
    options = _options(args, skip={"prompt", "no_base"})
    return CompareConfig(prompts=prompts, base=not args.no_base, **options)


def parse_adapters(line: str) -> dict:
    """-> {'action': ..., plus the keywords of that action's API function}."""
    args = parse_line(qlora_adapters, line)
    action = {"use": "switch", "remove": "delete"}.get(args.action, args.action)
    if action not in ADAPTER_ACTIONS:
        raise ConfigError(f"Unknown action {args.action!r}: use one of {', '.join(ADAPTER_ACTIONS)}.")
    given = [k for k in _ADAPTER_OPTIONS if getattr(args, k) not in (None, False)] + (["name"] if args.name else [])
    stray = [k for k in given if k not in _ADAPTER_OPTIONS_OF[action]]
    if stray:
        what = "name" if stray[0] == "name" else _ADAPTER_OPTIONS[stray[0]]
        raise ConfigError(f"%qlora_adapters {action} takes no {what}: it would be ignored; %qlora_adapters? says which action takes it.")
    if action == "list":
        return {"action": action}
    if not args.name:
        raise ConfigError(f"%qlora_adapters {action} needs a {'folder' if action == 'load' else 'name'}, e.g. %qlora_adapters {action} {'runs/my-adapter' if action == 'load' else 'task2'}.")
    if action == "add":
        extra = {k: getattr(args, k) for k in ("r", "alpha", "dropout", "targets") if getattr(args, k) is not None}
        return {"action": action, "name": args.name, "activate": not args.keep_active, **extra}
    if action == "load":
        return {"action": action, "path": args.name, "name": args.as_name, "activate": not args.keep_active}
    if action == "combine":
        return {"action": action, "name": args.name, "weights": parse_weights(args.weights),
                "combination_type": args.combination, "activate": not args.keep_active}
    return {"action": action, "name": args.name}


# The options of %qlora_adapters, as written, and the ones each action reads (besides its name).
_ADAPTER_OPTIONS = {"as_name": "--name", "r": "--r", "alpha": "--alpha", "dropout": "--dropout", "targets": "--targets",
                    "weights": "--weights", "combination": "--combination", "keep_active": "--keep-active"}
_ADAPTER_OPTIONS_OF = {"list": (), "switch": ("name",), "delete": ("name",),
                       "add": ("name", "r", "alpha", "dropout", "targets", "keep_active"),
                       "load": ("name", "as_name", "keep_active"),
                       "combine": ("name", "weights", "combination", "keep_active")}


def parse_weights(text: str) -> dict:
    """'default=0.7,task2=0.3' -> {'default': 0.7, 'task2': 0.3}; a bare name weighs 1."""
    weights = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, _, value = part.partition("=")
        try:
            weight = float(value) if value.strip() else 1.0
        except ValueError:
            weight = None
        if weight is None or not math.isfinite(weight):
            kind = "a number" if weight is None else "a finite number"
            raise ConfigError(f"--weights: {value.strip()!r} is not {kind}; write name=weight, e.g. default=0.5.")
        weights[key.strip()] = weight
    return weights


def parse_merge(line: str) -> MergeConfig:
    args = parse_line(qlora_merge, line)
    return MergeConfig(verify=not args.no_verify, **_options(args, skip={"no_verify"}))


def parse_export(line: str) -> ExportConfig:
    args = parse_line(qlora_export, line)
    return ExportConfig(verify=not args.no_verify, **_options(args, skip={"no_verify"}))


MAGIC_DECLARATIONS += [qlora_eval, qlora_compare, qlora_adapters, qlora_merge, qlora_export]


# --- background runs ---------------------------------------------------------------------------------

_RUN_HELP = ("a run folder's name, a start or end of it only one run has, or its path (default: this kernel's "
             "newest background run, else the newest run folder)")
_RUNS_DIR_HELP = "folder that holds the run folders (default runs/)"


@magic_arguments()
@argument("--output-dir", default=None, help=_RUNS_DIR_HELP)
def qlora_runs(line=""):
    """List the training runs: this kernel's background runs first (marked *), then the run folders under
    --output-dir, newest first, with status (running, completed, interrupted, failed, crashed), step, last
    train and eval loss, checkpoint and start time.

    Examples::

        %qlora_runs
        %qlora_runs --output-dir /content/drive/MyDrive/runs
    """


@magic_arguments()
@argument("run", nargs="?", default=None, help=_RUN_HELP)
@argument("--output-dir", default=None, help=_RUNS_DIR_HELP)
def qlora_attach(line=""):
    """Show a run: its whole history so far (chart, progress, last losses), then live while it trains in this
    kernel, from any later cell, after a page reload, or in another notebook of the same kernel. A run that
    ended (or crashed) is drawn as it ended; one another process trains is re-read every 2 s.

    Examples::

        %%qlora_train --background --name word-forms
        ...
        %qlora_attach                 # after a reload: the newest background run
        %qlora_attach word-forms
    """


@magic_arguments()
@argument("run", nargs="?", default=None, help=_RUN_HELP)
@argument("--output-dir", default=None, help=_RUNS_DIR_HELP)
def qlora_stop(line=""):
    """Stop a background run of this kernel after the step in flight; the adapter keeps every finished step,
    and the run's folder has its last checkpoint. A run another kernel trains is stopped there (interrupt it).

    Examples::

        %qlora_stop
        %qlora_stop word-forms
    """


MAGIC_DECLARATIONS += [qlora_runs, qlora_attach, qlora_stop]


def parse_runs(line: str) -> dict:
    """`%qlora_runs` flags -> the keywords of api.runs."""
    return {"output_dir": parse_line(qlora_runs, line).output_dir}


def parse_run_choice(declaration, line: str) -> dict:
    """`%qlora_attach` / `%qlora_stop` line -> {"run": ..., "output_dir": ...}, the keywords of api.attach/stop."""
    args = parse_line(declaration, line)
    return {"run": args.run, "output_dir": args.output_dir}


@magic_arguments()
@argument("--trials", type=int, default=None, help=f"number of trials {_default(TuneConfig, 'trials')}")
@argument("--no-prune", action="store_true", help="run every trial to the end (default: stop trials behind the median)")
@argument("--no-keep", action="store_true", help="delete every trial's adapter, the best one too")
@argument("--sampler-seed", type=int, default=None, help=f"seed of Optuna's TPE sampler {_default(TuneConfig, 'seed')}")
@argument("--report-to", default=None, help="experiment trackers as in %%qlora_train: one run per trial, grouped (an MLflow parent run, a W&B group)")
def qlora_tune(line="", cell=""):
    """Search LoRA and training options with Optuna; each trial trains a fresh adapter on the same
    quantized base and is scored by its held-out eval loss. The body is %%qlora_train's, plus search::

        %%qlora_tune --trials 6
        data: $rows
        prompt: "Q: {question}\\nA: "
        response: "{answer}"
        eval_split: 0.2
        max_steps: 15
        search:
          r: [4, 8, 16]                         # a list: choices
          lr: {low: 1e-4, high: 1e-2, log: true}  # a range (log scale)
          dropout: {low: 0.0, high: 0.1}

    Searchable: r, alpha, dropout, targets, lr, epochs, max_steps, batch_size, grad_accum, warmup,
    weight_decay, scheduler. The best trial's adapter stays loaded and active.
    """


# Options %%qlora_tune may search whose values are numbers (r: [4, 8]; lr: {low: 1e-4, high: 1e-2}).
_SEARCHED_NUMBERS = {name for config in (LoadConfig, TrainConfig)
                     for name, hint in typing.get_type_hints(config).items() if _holds_number(hint)}


def parse_tune(line: str, cell: str, namespace: dict | None = None) -> TuneConfig:
    """`%%qlora_tune` flags + body -> TuneConfig; the body minus search: and trials: is %%qlora_train's."""
    args = parse_line(qlora_tune, line)
    body = TUNE_BODY.read(cell, namespace=namespace)
    search = body.pop("search", None)
    trials = body.pop("trials", None)
    if search is not None and not isinstance(search, dict):
        raise ConfigError("search: must be a mapping of option: choices or range, e.g. search: {r: [4, 8]}.")
    search = {str(name): _search_values(str(name), spec) for name, spec in (search or {}).items()}
    if args.report_to is not None:
        body["report_to"] = args.report_to
    train = TrainConfig(**body)
    options = {"trials": trials if args.trials is None else args.trials, "seed": args.sampler_seed}
    return TuneConfig(train=train, search=search, prune=not args.no_prune, keep=not args.no_keep,
                      **{k: v for k, v in options.items() if v is not None})


def _search_values(name, spec):
    """The choices or range of one searched option, numbers read as the body reads them."""
    if name not in _SEARCHED_NUMBERS:
        return spec
    if isinstance(spec, list):
        return [_number(v) for v in spec]
    if isinstance(spec, dict):
        return {key: _number(v) for key, v in spec.items()}
    return spec


MAGIC_DECLARATIONS += [qlora_tune, qlora_data, qlora_doctor]
