"""Parsing magic lines and cell bodies into configs. No execution here: each function turns text
into a config dataclass, so it can be tested alone. The option declarations below also produce
each magic's `%name?` help and the docs reference."""

from __future__ import annotations

import re

from IPython.core.error import UsageError
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from .config import GenerateConfig, LoadConfig, TrainConfig
from .errors import ConfigError


@magic_arguments()
@argument("model", nargs="?", default=None, help="Hub id or local folder (default: the embedded SmolLM2-135M-Instruct)")
@argument("--bits", type=int, choices=[4, 8, 16], default=None, help="8: LLM.int8 (default); 4: NF4 with double quantization; 16: no quantization")
@argument("--r", type=int, default=8, help="LoRA rank (default 8)")
@argument("--alpha", type=float, default=32, help="LoRA alpha; the update is scaled by alpha/r (default 32)")
@argument("--dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
@argument("--targets", default=None, help="comma-separated module names, or all-linear (default: the architecture's attention q/v)")
@argument("--task", default="causal-lm", help="causal-lm")
@argument("--adapter", default=None, help="restore a saved adapter folder (and the base model it names)")
@argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
def qlora_load(line=""):
    """Load a quantized base model with LoRA adapters and show the memory readout.

    Examples::

        %qlora_load
        %qlora_load --bits 4 --r 16 --targets all-linear
        %qlora_load --adapter runs/my-adapter
    """


@magic_arguments()
@argument("--epochs", type=float, default=None, help="passes over the data (default 1)")
@argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
@argument("--batch-size", type=int, default=None, help="examples per micro-batch (default 4)")
@argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step (default 4)")
@argument("--lr", type=float, default=None, help="peak learning rate (default 2e-4)")
@argument("--warmup", type=float, default=None, help="warm-up fraction of the steps (default 0.03)")
@argument("--scheduler", default=None, help="learning-rate schedule: linear, cosine, constant... (default linear)")
@argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default 0)")
@argument("--max-length", type=int, default=None, help="cut examples to this many tokens (default 512)")
@argument("--eval-steps", type=int, default=None, help="evaluate every N steps (default: 5 times a run)")
@argument("--logging-steps", type=int, default=None, help="log every N steps (default 1)")
@argument("--seed", type=int, default=None, help="random seed (default 42)")
@argument("--packing", action="store_true", default=None, help="pack examples into one row per batch (no padding)")
@argument("--gradient-checkpointing", action="store_true", default=None, help="recompute activations to save memory")
@argument("--output-dir", default=None, help="run folder for TensorBoard files (default runs/<time>)")
@argument("--display", default=None, choices=["auto", "html", "widget", "text", "none"], help="how to show progress (default auto)")
def qlora_train(line="", cell=""):
    """Fine-tune the loaded model's adapters. The cell body is YAML::

        %%qlora_train --epochs 1 --lr 2e-4
        data: $rows            # a variable, a .jsonl/.json/.csv/.parquet path, or a Hub dataset id
        prompt: "Question: {question}\\nAnswer: "
        response: "{answer}"
        eval_split: 0.1        # optional: fraction or row count held out
        chat: false            # true: prompt/response become chat turns
        max_length: 512

    Any option above may also be written in the body (epochs: 2); flags win over the body.
    """


@magic_arguments()
@argument("--max-new-tokens", type=int, default=128, help="most tokens to generate (default 128)")
@argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
@argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
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


def _options(args, skip=()) -> dict:
    """argparse namespace -> config keywords, dropping options the user did not give."""
    return {k: v for k, v in vars(args).items() if v is not None and k not in skip}


def parse_load(line: str) -> LoadConfig:
    args = parse_argstring(qlora_load, line)
    return LoadConfig(**_options(args))


# Body keys of %%qlora_train: the data description, plus any TrainConfig option.
BODY_KEYS = {f for f in TrainConfig.__dataclass_fields__}


def parse_train(line: str, cell: str, namespace: dict | None = None) -> TrainConfig:
    """`%%qlora_train` flags + YAML body -> TrainConfig. `$name` data is looked up in `namespace`."""
    import yaml

    args = parse_argstring(qlora_train, line)
    try:
        body = yaml.safe_load(cell or "") or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"The cell body is not valid YAML{where}: {getattr(error, 'problem', error)}; quote templates, e.g. prompt: \"Q: {{q}}\".") from None
    if not isinstance(body, dict):
        raise ConfigError("The cell body must be YAML key: value lines, e.g. data: rows.jsonl")
    body = {str(k).replace("-", "_"): v for k, v in body.items()}
    unknown = sorted(set(body) - BODY_KEYS)
    if unknown:
        raise ConfigError(f"Unknown key {unknown[0]!r} in the cell body; known keys: data, prompt, response, chat, eval_split, max_length, split, and the options of %qlora_train?.")
    for key in ("prompt", "response"):
        body[key] = _template_from_yaml(key, body.get(key))
    if isinstance(body.get("data"), str) and body["data"].startswith("$"):
        body["data"] = _lookup(body["data"][1:], namespace)
    return TrainConfig(**{**body, **_options(args)})


def _template_from_yaml(key, value):
    # YAML reads an unquoted {answer} as a mapping {answer: None}; that is what the user meant.
    if isinstance(value, dict) and len(value) == 1 and next(iter(value.values())) is None:
        return "{" + str(next(iter(value))) + "}"
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{key}: must be a text template; put it in quotes, e.g. {key}: \"{{{key}}}\".")
    return value


def _lookup(name, namespace):
    if not name.isidentifier():
        raise ConfigError(f"data: ${name} is not a variable name.")
    if namespace is None or name not in namespace:
        raise ConfigError(f"data: ${name} names no variable in the notebook: define {name} first (a list of dicts, a DataFrame or a Dataset).")
    return namespace[name]


_FLAG_VALUE = re.compile(r"\s*(\S+)")


def split_generate_line(line: str) -> tuple[str, str]:
    """Split '%qlora_generate --greedy What is -1 + 2?' into ('--greedy', 'What is -1 + 2?').

    Options are read only at the start of the line; the prompt is the rest, kept exactly as written
    (words that start with '-' included). A '--' ends the options explicitly.
    """
    parser = qlora_generate.parser
    takes_value = {s for a in parser._actions for s in a.option_strings if a.nargs != 0}
    flags = {s for a in parser._actions for s in a.option_strings}
    pos, options = 0, []
    while True:
        match = _FLAG_VALUE.match(line, pos)
        if not match:
            break
        token = match.group(1)
        if token == "--":
            pos = match.end()
            break
        name = token.split("=", 1)[0]
        if name not in flags:
            break
        options.append(token)
        pos = match.end()
        if name in takes_value and "=" not in token:
            value = _FLAG_VALUE.match(line, pos)
            if not value:
                raise UsageError(f"{name} needs a value.")
            options.append(value.group(1))
            pos = value.end()
    return " ".join(options), line[pos:].strip()


def parse_generate(line: str, cell: str | None = None) -> GenerateConfig:
    options_text, prompt = split_generate_line(line)
    args = parse_argstring(qlora_generate, options_text)
    if cell is not None:
        if prompt:
            raise ConfigError("%%qlora_generate takes the prompt from the cell body; the line holds only options.")
        prompt = cell.strip("\n")
    return GenerateConfig(prompt=prompt, **_options(args, skip={"prompt"}))


def parse_save(line: str) -> str:
    return parse_argstring(qlora_save, line).path


@magic_arguments()
def qlora_panel(line=""):
    """Show the dashboard: Load, Train, Generate and Save tabs over a live memory readout.

    Training runs in the background, so the Stop button works while it runs. Same as
    ``qlora_magic.panel()``; needs ipywidgets.
    """


MAGIC_DECLARATIONS = [qlora_load, qlora_train, qlora_generate, qlora_save, qlora_memory, qlora_panel]
