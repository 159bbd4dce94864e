"""Parsing magic lines and cell bodies into configs. No execution here: each function turns text
into a config dataclass, so it can be tested alone. The option declarations below also produce
each magic's `%name?` help and the docs reference."""

from __future__ import annotations

import re
from argparse import ArgumentTypeError

from IPython.core.error import UsageError
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from ..config import GenerateConfig, LoadConfig, TrainConfig
from ..errors import ConfigError


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
@argument("--r", type=int, default=8, help="LoRA rank (default 8)")
@argument("--alpha", type=float, default=32, help="LoRA alpha; the update is scaled by alpha/r (default 32)")
@argument("--dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
@argument("--targets", default=None, help="comma-separated module names, or all-linear (default: the architecture's attention q/v)")
@argument("--task", default="causal-lm", help="causal-lm (default); seq-cls: text classification; seq2seq: an encoder-decoder model, e.g. summarization")
@argument("--num-labels", type=int, default=None, help="seq-cls: number of classes (default 2)")
@argument("--adapter", default=None, help="restore a saved adapter folder (and the base model it names)")
@argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
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
@argument("--packing", action="store_true", default=None, help="pack examples into one row per batch, no padding (default on)")
@argument("--no-packing", dest="packing", action="store_false", default=None, help="pad each batch to its longest example instead of packing")
@argument("--gradient-checkpointing", action="store_true", default=None, help="recompute activations to save memory (default: when the memory estimate needs it)")
@argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false", default=None, help="never recompute activations")
@argument("--max-memory", default=None, help="GPU memory budget for choosing the batch layout, e.g. 10GB (default: the card's memory)")
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

    With --task seq-cls, give label: <column> instead of response: (prompt: is the text to classify);
    with --task seq2seq, prompt: is the source and response: the target.
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
    return {k: _unquote(v) for k, v in vars(args).items() if v is not None and k not in skip}


def _unquote(value):
    # IPython splits magic lines without removing quotes: --system "Be brief" arrives as '"Be brief"'.
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


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
        raise ConfigError(f"Unknown key {unknown[0]!r} in the cell body; known keys: data, prompt, response, label, chat, eval_split, max_length, split, and the options of %qlora_train?.")
    for key in ("prompt", "response"):
        body[key] = _template_from_yaml(key, body.get(key))
    body = {k: _number(v) if k not in ("prompt", "response", "data", "label") else v for k, v in body.items()}
    if isinstance(body.get("data"), str) and body["data"].startswith("$"):
        body["data"] = lookup_variable(body["data"][1:], namespace)
    return TrainConfig(**{**body, **_options(args)})


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


def lookup_variable(name, namespace):
    """The notebook variable `$name` names (data: $rows), or a one-line error."""
    if not name.isidentifier():
        raise ConfigError(f"data: ${name} is not a variable name.")
    if namespace is None or name not in namespace:
        raise ConfigError(f"data: ${name} names no variable in the notebook: define {name} first (a list of dicts, a DataFrame or a Dataset).")
    return namespace[name]


# One option token: a quoted value ("Answer in one word.") or a run of non-space characters.
_FLAG_VALUE = re.compile(r"""\s*("(?:[^"\\]|\\.)*"|'[^']*'|\S+)""")


def split_generate_line(line: str, declaration=None) -> tuple[str, str]:
    """Split '%qlora_generate --greedy What is -1 + 2?' into ('--greedy', 'What is -1 + 2?').

    Options are read only at the start of the line; the prompt is the rest, kept exactly as written
    (words that start with '-' included). A '--' ends the options explicitly.
    """
    parser = (declaration or qlora_generate).parser  # also %qlora_compare's
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
    try:
        args = parse_argstring(qlora_generate, options_text)
    except ValueError as error:  # shlex: an unclosed quote
        raise UsageError(f"Cannot read the options {options_text!r}: {error}; close the quotes around option values.") from None
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


# --- evaluation, comparison, adapters, merge -------------------------------------------------------

@magic_arguments()
@argument("--metrics", default=None, help="comma-separated: perplexity, bleu, rouge, exact_match (default perplexity)")
@argument("--base", action="store_true", default=None, help="also evaluate the base model (adapters disabled), in the same table")
@argument("--adapters", default=None, help="comma-separated adapters to evaluate (default: the active one)")
@argument("--data", default=None, help="dataset as for %%qlora_train, or $variable (default: the last run's held-out split)")
@argument("--limit", type=int, default=None, help="evaluate at most N rows")
@argument("--batch-size", type=int, default=None, help="examples per forward pass (default 8)")
@argument("--max-new-tokens", type=int, default=None, help="longest greedy answer for bleu/rouge/exact_match (default 64)")
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
@argument("--max-new-tokens", type=int, default=None, help="most tokens per answer (default 64)")
@argument("--raw", action="store_true", default=None, help="no chat template: send each prompt exactly as written")
@argument("--system", default=None, help="system message for the chat template")
@argument("--sample", action="store_true", default=None, help="sample (seeded) instead of greedy decoding")
@argument("--temperature", type=float, default=None, help="sampling temperature, with --sample (default 0.7)")
@argument("--seed", type=int, default=None, help="seed set before each answer (default 0)")
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
@argument("--combination", default=None, help="combine: PEFT combination type: linear (same ranks), cat, ties... (default: linear or cat)")
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
@argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"], help="weights of the merged copy (default float16)")
@argument("--adapter", default=None, help="adapter to merge (default: the active one)")
@argument("--no-verify", action="store_true", help="skip the check of merged vs adapter answers and perplexity")
@argument("--max-new-tokens", type=int, default=None, help="length of the greedy answers compared (default 24)")
@argument("--tolerance", type=float, default=None, help="largest drift reported as a match: relative perplexity, or for --task seq-cls the mean change of class probabilities (default 0.05)")
def qlora_merge(line=""):
    """Merge the adapter into an unquantized 16-bit copy of the base (reloaded from its original
    weights, not dequantized from 8/4-bit) and save it as a plain transformers model; then check that
    the merged model answers and scores like the adapter, and report the drift.

    Examples::

        %qlora_merge merged/word-forms
        %qlora_merge merged/word-forms --dtype bfloat16 --adapter task2
    """


def _yaml_body(cell, known, magic):
    """A YAML cell body -> dict, with templates and $variables read as %%qlora_train reads them."""
    import yaml

    try:
        body = yaml.safe_load(cell or "") or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"The cell body is not valid YAML: {getattr(error, 'problem', error)}; quote templates, e.g. prompt: \"Q: {{q}}\".") from None
    if not isinstance(body, dict):
        raise ConfigError("The cell body must be YAML key: value lines, e.g. data: rows.jsonl")
    body = {str(k).replace("-", "_"): v for k, v in body.items()}
    unknown = sorted(set(body) - set(known))
    if unknown:
        raise ConfigError(f"Unknown key {unknown[0]!r} in the cell body of {magic}; known keys: {', '.join(sorted(known))}.")
    for key in ("prompt", "response"):
        if key in body:
            body[key] = _template_from_yaml(key, body[key])
    return body


def parse_eval(line: str, cell: str | None = None, namespace: dict | None = None):
    from ..config import EvalConfig

    args = parse_argstring(qlora_eval, line)
    body = _yaml_body(cell, EvalConfig.__dataclass_fields__, "%%qlora_eval") if cell is not None else {}
    options = {**body, **_options(args)}
    if isinstance(options.get("data"), str) and options["data"].startswith("$"):
        options["data"] = lookup_variable(options["data"][1:], namespace)
    return EvalConfig(**options)


_SEPARATOR = re.compile(r"^\s*---\s*$", re.MULTILINE)


def parse_compare(line: str, cell: str | None = None):
    from ..config import CompareConfig

    options_text, prompt = split_generate_line(line, qlora_compare)
    args = parse_argstring(qlora_compare, options_text)
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
    args = parse_argstring(qlora_adapters, line)
    action = {"use": "switch", "remove": "delete"}.get(args.action, args.action)
    if action not in ADAPTER_ACTIONS:
        raise ConfigError(f"Unknown action {args.action!r}: use one of {', '.join(ADAPTER_ACTIONS)}.")
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


def parse_weights(text: str) -> dict:
    """'default=0.7,task2=0.3' -> {'default': 0.7, 'task2': 0.3}; a bare name weighs 1."""
    weights = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, _, value = part.partition("=")
        try:
            weights[key.strip()] = float(value) if value.strip() else 1.0
        except ValueError:
            raise ConfigError(f"--weights: {value.strip()!r} is not a number; write name=weight, e.g. default=0.5.") from None
    return weights


def parse_merge(line: str):
    from ..config import MergeConfig

    args = parse_argstring(qlora_merge, line)
    return MergeConfig(verify=not args.no_verify, **_options(args, skip={"no_verify"}))


MAGIC_DECLARATIONS += [qlora_eval, qlora_compare, qlora_adapters, qlora_merge]


@magic_arguments()
@argument("--trials", type=int, default=None, help="number of trials (default 5)")
@argument("--no-prune", action="store_true", help="run every trial to the end (default: stop trials behind the median)")
@argument("--no-keep", action="store_true", help="delete every trial's adapter, the best one too")
@argument("--sampler-seed", type=int, default=None, help="seed of Optuna's TPE sampler (default 0)")
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


def parse_tune(line: str, cell: str, namespace: dict | None = None):
    """`%%qlora_tune` flags + body -> TuneConfig; the body minus search: is read as %%qlora_train's."""
    from ..config import TuneConfig

    args = parse_argstring(qlora_tune, line)
    body = _yaml_body(cell, set(BODY_KEYS) | {"search", "trials"}, "%%qlora_tune")
    search = body.pop("search", None)
    trials = body.pop("trials", None)
    if search is not None and not isinstance(search, dict):
        raise ConfigError("search: must be a mapping of option: choices or range, e.g. search: {r: [4, 8]}.")
    search = {str(k): ([_number(v) for v in s] if isinstance(s, list) else
                       {kk: _number(vv) for kk, vv in s.items()} if isinstance(s, dict) else s)
              for k, s in (search or {}).items()}
    # The rest is %%qlora_train's body, read as parse_train reads it (not re-dumped to YAML: that loses newlines).
    body = {k: v if k in ("prompt", "response", "data") else _number(v) for k, v in body.items()}
    if isinstance(body.get("data"), str) and body["data"].startswith("$"):
        body["data"] = lookup_variable(body["data"][1:], namespace)
    train = TrainConfig(**body)
    options = {"trials": args.trials or trials, "seed": args.sampler_seed}
    return TuneConfig(train=train, search=search, prune=not args.no_prune, keep=not args.no_keep,
                      **{k: v for k, v in options.items() if v is not None})


MAGIC_DECLARATIONS += [qlora_tune]
