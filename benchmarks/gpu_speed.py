"""Side-by-side training speed: the course's recipe (the "seed") against qlora_magic's defaults, on the
same model, data, effective batch and device, in one process.

    python benchmarks/gpu_speed.py                   # GPU: Llama-2-7B shape, random weights (~8 min)
    python benchmarks/gpu_speed.py --model default   # CPU: the embedded SmolLM2-135M on the demo data
    python benchmarks/gpu_speed.py --model quick     # CPU: a small random Llama, to check the script
    python benchmarks/gpu_speed.py --converge --steps 100   # loss curves: seed vs qlora_magic on real text

--converge trains the seed recipe and qlora_magic's defaults for the same steps on the same real text
(the shipped word_forms rows and Python standard-library docstrings, tokenized with the default model's
tokenizer), from the same LoRA initialization and in the same data order, on the default model (real
weights), and reports both loss curves with their per-step differences; a third run, qlora_magic with
another LoRA initialization, gives the run-to-run noise to compare them against.

Speed and memory don't depend on the weights' values, so the 7B checkpoint is built locally with random
weights (no hub). Prints a table (real, non-pad tokens/s; s/step; peak allocated memory; x seed; % of the
hardware limit) and writes it with all numbers to --out (results.md, results.json). Timings are for
reading, never for test assertions.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

EFFECTIVE_BATCH = 16
PEAK_BF16_FLOPS = 790e12  # an 8192^3 bf16 matmul measured on the H200
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
QUICK = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=1024)
PAD_ID, FIRST_ID = 0, 3  # random token ids start above pad/bos/eos so "non-pad" counts are exact


def log(*parts):
    print(*parts, flush=True)


# ---------------------------------------------------------------------------------------------- model

def simple_tokenizer(vocab_size):
    """A word-level tokenizer over ids only: the benchmark feeds token ids, the tokenizer pads."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(FIRST_ID, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def build_random_checkpoint(folder: Path, shape: dict, device: str, model_type: str = "llama") -> Path:
    """Save a causal LM of `model_type` (llama, qwen2, ...) with random bf16 weights and a tokenizer to `folder`
    (once; reused if there). `shape`: its config's sizes; the head is untied unless it says tie_word_embeddings."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (folder / "config.json").exists():
        return folder
    started = time.perf_counter()
    config = AutoConfig.for_model(model_type, **{"tie_word_embeddings": False, **shape}, bos_token_id=1, eos_token_id=2,
                                  pad_token_id=PAD_ID, dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device(device):  # initialising 6.7B weights on the GPU takes seconds, on a CPU minutes
        model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    simple_tokenizer(shape["vocab_size"]).save_pretrained(folder)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    log(f"built random checkpoint {folder} in {time.perf_counter() - started:.0f} s")
    return folder


# ----------------------------------------------------------------------------------------------- data

def synthetic_rows(n, vocab, max_length=512, median=180, seed=0, all_max_length=False):
    """Instruction-like examples: lognormal lengths (median ~180, capped), the first ~40% is the prompt
    (label -100), the rest the response. `all_max_length`: every example max_length long (the worst case
    for memory: a micro-batch is then all its examples at full length)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = max(24, min(max_length, int(rng.lognormvariate(math.log(median), 0.6))))
        length = max_length if all_max_length else length
        ids = [rng.randrange(FIRST_ID, vocab) for _ in range(length)]
        prompt = int(length * rng.uniform(0.25, 0.55))
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def demo_rows(tokenizer, max_length=512):
    """The shipped demo data tokenized as qlora_magic does it (the CPU benchmark's data)."""
    from qlora_magic import examples
    from qlora_magic.engine.data import ExampleTokenizer, load_rows

    rows = load_rows(examples.path("word_forms"))
    tok = ExampleTokenizer(tokenizer, "Instruction: {instruction}\n\nInput: {context}\n\nResponse: ", "{response}",
                           max_length=max_length)
    return [tok(r) for r in rows]


STDLIB_MODULES = (
    "abc argparse ast base64 bisect calendar cmd codecs collections colorsys configparser contextlib copy csv "
    "dataclasses datetime decimal difflib dis doctest email.message enum fnmatch fractions ftplib functools "
    "getopt gettext glob gzip hashlib heapq hmac html http.client imaplib inspect ipaddress itertools json "
    "locale logging lzma mailbox mimetypes numbers operator optparse os pathlib pdb pickle platform plistlib "
    "poplib pprint queue random re sched secrets selectors shelve shlex shutil smtplib socket statistics "
    "string struct subprocess tarfile tempfile textwrap threading timeit tokenize traceback types typing "
    "unittest urllib.parse uuid warnings wave weakref zipfile").split()


def stdlib_docstrings(min_chars=200):
    """(name, docstring) of the standard library's documented modules, classes, functions and methods:
    real English prose about code, available offline. Sorted, so the same Python gives the same list."""
    import importlib
    import inspect

    seen, out = set(), []

    def add(name, obj):
        doc = inspect.getdoc(obj) if not isinstance(obj, str) else obj
        if doc and len(doc) >= min_chars and doc not in seen:
            seen.add(doc)
            out.append((name, doc))

    for module_name in STDLIB_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        add(module_name, module)
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj) or inspect.isclass(obj):
                add(f"{module_name}.{name}", obj)
            if inspect.isclass(obj):
                for attr, member in sorted(vars(obj).items()):
                    if not attr.startswith("_") and inspect.isfunction(member):
                        add(f"{module_name}.{name}.{attr}", member)
    return sorted(out)


def real_text_rows(tokenizer, max_length=512, n=None, seed=0):
    """The shipped demo data and standard-library docstrings as instruction examples ("Explain X" ->
    its documentation), tokenized as qlora_magic does it, in a fixed shuffled order."""
    from qlora_magic import examples
    from qlora_magic.engine.data import ExampleTokenizer, load_rows

    rows = list(load_rows(examples.path("word_forms")))
    rows += [{"instruction": f"Explain {name} from Python's standard library.", "context": "", "response": doc}
             for name, doc in stdlib_docstrings()]
    random.Random(seed).shuffle(rows)
    tok = ExampleTokenizer(tokenizer, "Instruction: {instruction}\n\nInput: {context}\n\nResponse: ", "{response}",
                           max_length=max_length)
    return [tok(r) for r in rows[:n]]


def padded_to(rows, length):
    """The seed's data: every example padded to `length` (slide 4)."""
    out = []
    for r in rows:
        pad = length - len(r["input_ids"])
        out.append({"input_ids": r["input_ids"] + [PAD_ID] * pad, "attention_mask": r["attention_mask"] + [0] * pad,
                    "labels": r["labels"] + [-100] * pad})
    return out


def as_dataset(rows):
    import datasets

    return datasets.Dataset.from_list(rows)


# ------------------------------------------------------------------------------------------- measuring

def step_timer():
    """A TrainerCallback that records the time and real tokens seen at the end of every step."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_train_begin(self, args, state, control, **kwargs):
            self._sync()
            self.marks = [(time.perf_counter(), state.num_input_tokens_seen)]

        def on_step_end(self, args, state, control, **kwargs):
            self._sync()
            self.marks.append((time.perf_counter(), state.num_input_tokens_seen))

        @staticmethod
        def _sync():
            if torch.cuda.is_available():
                torch.cuda.synchronize()

        def result(self, warmup):
            timed = self.marks[warmup:]
            if len(timed) < 2:
                return None, None
            seconds = timed[-1][0] - timed[0][0]
            tokens = timed[-1][1] - timed[0][1]
            return seconds / (len(timed) - 1), tokens / seconds

    return StepTimer()


def reset_peak():
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_bytes():
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    import psutil

    return psutil.Process().memory_info().rss


def free_model(*objects):
    import torch

    for o in objects:
        del o
    qlora_magic_session_reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def qlora_magic_session_reset():
    import qlora_magic

    qlora_magic.reset_session()


# ---------------------------------------------------------------------------------------------- recipes

def lora_fingerprint(model):
    """A number that is equal for equal LoRA initializations (to check two recipes start alike)."""
    return float(sum(p.detach().float().abs().sum() for n, p in model.named_parameters() if "lora_A" in n))


def logged_losses(history):
    return [row["loss"] for row in history if "loss" in row]


def seed_recipe(path, rows, steps, warmup, device, tmp, pad_length=512, init_seed=None):
    """Slides 1, 4, 5 with transformers 5 names: 8-bit, prepare_model_for_kbit_training (gradient
    checkpointing on), LoRA r=8 alpha 32 on q/v, every example padded to 512 (`pad_length`), 4 x 4, fp16.
    `init_seed`: seed torch before loading, so the LoRA initialization can be matched."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments, default_data_collator

    from qlora_magic.engine.quiet import quiet_bnb_warnings

    quiet_bnb_warnings()
    reset_peak()
    started = time.perf_counter()
    on_gpu = device == "cuda"
    if init_seed is not None:
        torch.manual_seed(init_seed)
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
        dtype=torch.float16 if on_gpu else torch.float32, device_map={"": device})
    model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.05,
                                             bias="none", task_type="CAUSAL_LM"))
    load_s = time.perf_counter() - started
    fingerprint = lora_fingerprint(model)
    timer = step_timer()
    args = TrainingArguments(
        output_dir=str(tmp / "seed"), max_steps=warmup + steps, per_device_train_batch_size=4,
        gradient_accumulation_steps=4, learning_rate=2e-4, fp16=on_gpu, use_cpu=not on_gpu, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False, log_level="error")
    reset_peak()
    trainer = Trainer(model=model, args=args, train_dataset=as_dataset(padded_to(rows, pad_length)),
                      data_collator=default_data_collator, callbacks=[timer])
    trainer.train()
    s_step, tok_s = timer.result(warmup)
    precision = "fp16" if on_gpu else "fp32"
    result = {"recipe": f"seed: 8-bit, pad to {pad_length}, checkpointing, 4x4, {precision}", "s_step": s_step, "tok_s": tok_s,
              "peak": peak_bytes(), "load_s": load_s, "settings": "slides 1, 4, 5",
              "losses": logged_losses(trainer.state.log_history), "lora_fingerprint": fingerprint}
    del model, trainer
    free_model()
    return result


def plain_trainer(rows, steps, warmup, tmp, label):
    """Plain Trainer code on the session's model doing what the demo does (dynamic padding, 4 x 4):
    the reference for 'qlora_magic is not slower than writing it yourself'."""
    from transformers import Trainer, TrainingArguments

    import qlora_magic
    from qlora_magic.engine.data import make_collator

    session = qlora_magic.get_session()
    timer = step_timer()
    args = TrainingArguments(
        output_dir=str(tmp / "plain"), max_steps=warmup + steps, per_device_train_batch_size=4,
        gradient_accumulation_steps=4, learning_rate=2e-4, use_cpu=True, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, include_num_input_tokens_seen="non_padding", remove_unused_columns=False,
        log_level="error")
    reset_peak()
    Trainer(model=session.model, args=args, train_dataset=as_dataset(rows),
            data_collator=make_collator(session.tokenizer, packing=False), callbacks=[timer]).train()
    s_step, tok_s = timer.result(warmup)
    return {"recipe": label, "s_step": s_step, "tok_s": tok_s, "peak": peak_bytes(), "settings": "4x4, dynamic padding"}


def ours(rows, steps, warmup, tmp, label, overrides=None, max_memory=None, reporter=None, config_values=None,
         callbacks=()):
    """qlora_magic's training on the session's model, through run_training (what qlora_magic.train calls).
    config_values: TrainConfig fields to change from the defaults ({"warmup": 0}, say); callbacks: more
    TrainerCallbacks (a profiler)."""
    import qlora_magic
    from qlora_magic.config import TrainConfig
    from qlora_magic.display.reporters import NullReporter
    from qlora_magic.engine.training import TrainingData, run_training

    session = qlora_magic.get_session()
    config = TrainConfig(max_steps=warmup + steps, batch_size=4, grad_accum=4, max_memory=max_memory,
                         output_dir=str(tmp / "ours"), display="none", **(config_values or {}))
    timer = step_timer()
    reset_peak()
    summary = run_training(session.model, session.tokenizer, config, TrainingData(as_dataset(rows)), reporter or NullReporter(),
                           overrides=overrides, callbacks=[timer, *callbacks])
    s_step, tok_s = timer.result(warmup)
    keys = ("batch", "packing", "gradient_checkpointing", "checkpointed_layers", "offload_checkpoints", "max_tokens", "compile", "chunked_loss",
            "bf16_stream", "int8_dequant", "memory_plan")
    settings = ", ".join(f"{k}={summary.settings[k]}" for k in keys if k in summary.settings)
    return {"recipe": label, "s_step": s_step, "tok_s": tok_s, "peak": peak_bytes(), "settings": settings,
            "loss": summary.train_loss[1], "losses": logged_losses(summary.history)}


def load_ours(path, bits, init_seed=None):
    import torch

    import qlora_magic

    started = time.perf_counter()
    if init_seed is not None:
        torch.manual_seed(init_seed)
    qlora_magic.load(path, bits=bits)
    return time.perf_counter() - started


@contextlib.contextmanager
def memory_fraction(gib):
    """Pretend the card has `gib` GiB, as a card sold as that many GB has (the process's allocator refuses more)."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 1024**3 / total))
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


def guarded(results, fn, *args, **kw):
    """Run one variant; an error (an out-of-memory, say) becomes a row, not the end of the benchmark."""
    label = kw.pop("label", None) or args[-1]
    try:
        row = fn(*args, **kw)
    except Exception as error:  # noqa: BLE001 - one failed variant must not lose the others
        import traceback

        traceback.print_exc()
        row = {"recipe": label, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
        reset_peak()
    results.append(row)
    log(format_row(row, results[0] if results else None))
    return row


# ---------------------------------------------------------------------------------------------- report

def format_row(row, seed, limit=None):
    if "error" in row:
        return f"| {row['recipe']} | failed: {row['error']} | | | | | |"
    ratio = f"{row['tok_s'] / seed['tok_s']:.1f}" if seed and seed.get("tok_s") and row.get("tok_s") else "-"
    pct = f"{100 * row['tok_s'] / limit:.1f}%" if limit and row.get("tok_s") else "-"
    return (f"| {row['recipe']} | {row['s_step']:.2f} | {row['tok_s']:,.0f} | {ratio} | {pct} | "
            f"{row['peak'] / 1e9:.1f} | {row.get('settings', '')} |")


def table(results, limit):
    seed = next((r for r in results if r["recipe"].startswith("seed") and "error" not in r), None)
    lines = ["| recipe | s/step | real tok/s | x seed | % of limit | peak GB | settings |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [format_row(r, seed, limit) for r in results]
    return "\n".join(lines)


def curve_differences(a, b):
    """Max and mean absolute difference of two loss curves, step by step (over the steps both have)."""
    diffs = [abs(x - y) for x, y in zip(a, b)]
    return {"steps": len(diffs), "max": max(diffs), "mean": sum(diffs) / len(diffs)} if diffs else {}


def converge_report(runs, header):
    """The loss curves side by side and their differences (markdown)."""
    seed, ours_, noise = (runs.get(k, {}).get("losses", []) for k in ("seed", "ours", "noise"))
    lines = [header, ""]
    for name, (a, b) in {"seed vs qlora_magic": (seed, ours_), "qlora_magic vs itself, another LoRA init": (ours_, noise),
                         "seed vs qlora_magic, warm-up 0": (seed, runs.get("ours_nowarmup", {}).get("losses", []))}.items():
        d = curve_differences(a, b)
        if d:
            lines.append(f"- {name}: max |difference| {d['max']:.4f}, mean {d['mean']:.4f} over {d['steps']} steps")
    for key, run in runs.items():
        extra = f", {run['settings']}" if run.get("settings") else ""
        lines.append(f"- {key}: {run.get('recipe', '')}{extra}; LoRA A fingerprint {run.get('lora_fingerprint', '-')}"
                     + (f"; failed: {run['error']}" if "error" in run else ""))
    keys = [k for k in ("seed", "ours", "ours_nowarmup", "noise") if runs.get(k, {}).get("losses")]
    lines += ["", "| step | " + " | ".join(keys) + " | seed - ours |", "| --- |" + " --- |" * (len(keys) + 1)]
    for i in range(max((len(runs[k]["losses"]) for k in keys), default=0)):
        values = [runs[k]["losses"][i] if i < len(runs[k]["losses"]) else None for k in keys]
        diff = (f"{seed[i] - ours_[i]:+.4f}" if i < len(seed) and i < len(ours_) else "")
        lines.append(f"| {i + 1} | " + " | ".join("-" if v is None else f"{v:.4f}" for v in values) + f" | {diff} |")
    return "\n".join(lines)


def environment():
    import peft
    import torch
    import transformers

    try:
        import bitsandbytes
        bnb = bitsandbytes.__version__
    except ImportError:
        bnb = "-"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    return {"date": time.strftime("%Y-%m-%d"), "device": gpu, "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "bitsandbytes": bnb,
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""), "load_average": os.getloadavg()}


# ------------------------------------------------------------------------------------------------ main

def write_results(out, tag, header, results, limit, env):
    text = table(results, limit)
    (out / f"results{tag}.md").write_text(header + "\n\n" + text + "\n")
    (out / f"results{tag}.json").write_text(json.dumps({"env": env, "limit": limit, "results": results}, indent=1, default=str))
    return text


def converge(args, device, out, tmp, env):
    """Seed recipe and qlora_magic's defaults, the same steps on the same real text from the same start."""
    import torch
    from transformers import AutoTokenizer

    import qlora_magic
    from qlora_magic.engine.default_model import default_model_path

    path = args.model_path or str(default_model_path())
    steps = args.steps or (100 if device == "cuda" else 6)
    rows = real_text_rows(AutoTokenizer.from_pretrained(path), args.max_length)
    lengths = sorted(len(r["input_ids"]) for r in rows)
    header = (f"{env['date']} · {env['device']} · torch {env['torch']} · transformers {env['transformers']} · "
              f"peft {env['peft']} · bitsandbytes {env['bitsandbytes']} · Python {env['python']} · model {Path(path).name} · "
              f"{len(rows)} examples (word_forms + standard-library docstrings), median {lengths[len(lengths) // 2]} "
              f"tokens, max {lengths[-1]} (max length {args.max_length}) · effective batch {EFFECTIVE_BATCH} · {steps} steps"
              f" · load average at start {env['load_average'][0]:.1f}")
    log(header)
    runs = {}

    def save():
        (out / f"converge{args.tag}.md").write_text(converge_report(runs, header) + "\n")
        (out / f"converge{args.tag}.json").write_text(json.dumps({"env": env, "runs": runs}, indent=1, default=str))

    def run(key, fn, *a, fingerprint=None, **kw):
        started = time.perf_counter()
        try:
            runs[key] = fn(*a, **kw)
        except Exception as error:  # noqa: BLE001 - keep the other curves
            import traceback

            traceback.print_exc()
            runs[key] = {"recipe": key, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
        if fingerprint is not None:
            runs[key]["lora_fingerprint"] = fingerprint
        runs[key]["wall_s"] = time.perf_counter() - started
        log(f"{key}: {runs[key].get('s_step') or 0:.2f} s/step, losses {[round(x, 3) for x in runs[key].get('losses', [])][:8]} ...")
        save()

    def loaded(init_seed):
        qlora_magic.reset_session()
        load_ours(path, 8, init_seed=init_seed)
        return lora_fingerprint(qlora_magic.get_session().model)

    run("seed", seed_recipe, path, rows, steps, 0, device, tmp, pad_length=args.max_length, init_seed=0)
    run("ours", ours, rows, steps, 0, tmp, "qlora_magic --bits 8 (defaults)", fingerprint=loaded(0))
    run("noise", ours, rows, steps, 0, tmp, "qlora_magic --bits 8 (defaults), LoRA initialized from seed 1",
        fingerprint=loaded(1))
    if "nowarmup" not in args.skip.split(","):
        run("ours_nowarmup", ours, rows, steps, 0, tmp, "qlora_magic --bits 8, --warmup 0 (the seed's schedule)",
            config_values={"warmup": 0}, fingerprint=loaded(0))
    free_model()
    torch.manual_seed(0)
    log("\n" + converge_report(runs, header))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["llama7b", "default", "quick"], default="llama7b")
    parser.add_argument("--converge", action="store_true", help="compare loss curves on real text (the default model)")
    parser.add_argument("--model-path", default=None, help="--converge: a model folder instead of the embedded default")
    parser.add_argument("--max-length", type=int, default=512, help="--converge: longest example; the seed pads to it")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--seed-steps", type=int, default=None, help="timed steps of the (slow) seed recipe")
    parser.add_argument("--checkpoint", default=None, help="folder for the random checkpoint (default: /dev/shm or tmp)")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--rounds", type=int, default=1, help="CPU, --model default: rounds of qlora_magic vs plain "
                        "Trainer, the order alternating (A B, B A, ...) so that a changing load evens out")
    parser.add_argument("--round-to", type=int, nargs="+", default=[64, 256],
                        help="group round: packed lengths rounded up to these multiples (a fresh load each; 1: not rounded)")
    parser.add_argument("--tag", default="", help="suffix of the result files' names (results-TAG.md)")
    parser.add_argument("--skip", default="", help="comma-separated variant groups to skip: "
                        "seed,q4,q8,round,budget,worst,levers,display (--converge: nowarmup)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import tempfile

    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="qlora-bench-"))
    skip = set(filter(None, args.skip.split(",")))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = environment()
    log(json.dumps(env))
    if args.converge:
        return converge(args, device, out, tmp, env)
    results = []
    if args.model == "default":
        from transformers import AutoTokenizer

        from qlora_magic.engine.default_model import default_model_path

        path = str(default_model_path())
        rows = demo_rows(AutoTokenizer.from_pretrained(path))
        steps, seed_steps = args.steps or 3, args.seed_steps or 2
        n_params = 135e6
        shape = None
    else:
        shape = LLAMA_7B if args.model == "llama7b" else QUICK
        import shutil

        shm_ok = Path("/dev/shm").is_dir() and shutil.disk_usage("/dev/shm").free > 20 * 1024**3
        base = Path(args.checkpoint) if args.checkpoint else (Path("/dev/shm") if shm_ok and args.model == "llama7b" else tmp)
        path = str(build_random_checkpoint(base / f"random-{args.model}", shape, device))
        steps, seed_steps = args.steps or (10 if device == "cuda" else 2), args.seed_steps or (4 if device == "cuda" else 1)
        rows = synthetic_rows(EFFECTIVE_BATCH * (args.warmup + max(steps, seed_steps) + 2), shape["vocab_size"])
        h, i, L, V = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
        n_params = L * (4 * h * h + 3 * h * i) + 2 * V * h
    lengths = sorted(len(r["input_ids"]) for r in rows)
    log(f"{len(rows)} examples, median {lengths[len(lengths) // 2]} tokens, max {lengths[-1]}")
    # LoRA on frozen weights: forward (2 FLOPs/param/token) + input gradients (2); no weight gradients.
    limit = PEAK_BF16_FLOPS / (4 * n_params) if device == "cuda" else None
    W = args.warmup
    header = (f"{env['date']} · {env['device']} · torch {env['torch']} · transformers {env['transformers']} · "
              f"peft {env['peft']} · bitsandbytes {env['bitsandbytes']} · model {args.model} · effective batch "
              f"{EFFECTIVE_BATCH} · {W} warm-up + {steps} timed steps (seed {seed_steps})"
              + (f" · hardware limit {limit:,.0f} tok/s" if limit else "")
              + (f" · PYTORCH_CUDA_ALLOC_CONF={env['alloc_conf']}" if env["alloc_conf"] else "")
              + (f" · load average {env['load_average'][0]:.1f}" if device == "cpu" else ""))

    def row(fn, *a, **kw):
        guarded(results, fn, *a, **kw)
        write_results(out, args.tag, header, results, limit, env)  # after every row: a timeout keeps the rest

    # Every example at max length: the worst case for memory (a micro-batch of 16 is 8,192 tokens).
    worst = synthetic_rows(EFFECTIVE_BATCH * 3, shape["vocab_size"], all_max_length=True) if shape else None
    on_gpu = device == "cuda"

    def worst_case_rows(bits):
        if not on_gpu or "worst" in skip:
            return
        for gib in (24, 80):
            with memory_fraction(gib):
                row(ours, worst, 1, 1, tmp, f"  {bits}-bit, automatic on a {gib} GiB card, every example 512 tokens")
        with memory_fraction(10):
            row(ours, worst, 1, 1, tmp, f"  {bits}-bit --max-memory 10GiB on a 10 GiB card, every example 512 tokens",
                max_memory="10GiB")

    if "seed" not in skip:
        row(seed_recipe, path, rows, seed_steps, 1, device, tmp, label="seed")
    def against_plain_trainer(bits):
        """The CPU question: is qlora_magic's demo fine-tune slower than plain Trainer code doing the same?"""
        pair = [(ours, f"qlora_magic --bits {bits} (defaults)"), (plain_trainer, f"plain Trainer, {bits}-bit, dynamic padding 4x4")]
        for i in range(args.rounds):
            for fn, label in pair if i % 2 == 0 else pair[::-1]:
                row(fn, rows, steps, W, tmp, f"{label}, round {i + 1}")

    cpu_default = device == "cpu" and args.model == "default"
    if "q4" not in skip and cpu_default:
        load_ours(path, 4)
        against_plain_trainer(4)
        free_model()
    if "q8" not in skip and cpu_default:
        load_ours(path, 8)
        against_plain_trainer(8)
        free_model()
    if cpu_default:
        skip |= {"q4", "q8"}
    if "q4" not in skip:
        load_s = load_ours(path, 4)
        log(f"loaded 4-bit in {load_s:.0f} s")
        row(ours, rows, steps, W, tmp, "qlora_magic --bits 4 (defaults), first run after loading")
        if on_gpu:
            row(ours, rows, steps, W, tmp, "qlora_magic --bits 4 (defaults), steady state (second run)")
            row(ours, rows, steps, W, tmp, "  4-bit, the model's own loss (no chunked loss)", overrides={"chunked_loss": False})
            if "budget" not in skip:
                row(ours, rows, steps, W, tmp, "qlora_magic --bits 4 --max-memory 10GiB", max_memory="10GiB")
            worst_case_rows(4)
            if "levers" not in skip:
                row(ours, rows, steps, W, tmp, "  4-bit, fp32 stream (as prepare_model_for_kbit_training leaves it)",
                    overrides={"bf16_stream": False})
                row(ours, rows, 4, W, tmp, "  4-bit, 4x4, padded, checkpointing",
                    overrides={"batch": "4x4", "packing": False, "gradient_checkpointing": True})
                row(ours, rows, steps, W, tmp, "  4-bit, 16x1, checkpointing", overrides={"gradient_checkpointing": True})
                row(ours, rows, steps, W, tmp, "  4-bit, 16x1, checkpointing with the checkpoints in CPU memory",
                    overrides={"gradient_checkpointing": True, "offload_checkpoints": True})
            if "display" not in skip:
                from qlora_magic.display.reporters import HtmlReporter

                with contextlib.redirect_stdout(io.StringIO()):  # outside a notebook display() prints
                    row(ours, rows, steps, W, tmp, "  4-bit defaults, live HTML display on", reporter=HtmlReporter())
                row(ours, rows, steps, W, tmp, "  4-bit defaults again, display off")
        free_model()
    if "round" not in skip and on_gpu:
        # A packed micro-batch's length changes every step; rounding it up (a pad segment of its own) gives
        # the GPU's per-shape caches fewer shapes to meet for the first time. Each row a fresh load.
        for multiple in args.round_to:
            load_ours(path, 4)
            what = f"packed length rounded up to {multiple}" if multiple > 1 else "packed length not rounded"
            row(ours, rows, steps, W, tmp, f"  4-bit, first run after loading, {what}", overrides={"pad_packed_to": multiple})
            row(ours, rows, steps, W, tmp, f"  4-bit, second run, {what}", overrides={"pad_packed_to": multiple})
            free_model()
    if "q8" not in skip:
        load_s = load_ours(path, 8)
        log(f"loaded 8-bit in {load_s:.0f} s")
        row(ours, rows, steps, W, tmp, "qlora_magic --bits 8 (defaults), first run after loading")
        if on_gpu:
            if "budget" not in skip:
                row(ours, rows, steps, W, tmp, "qlora_magic --bits 8 --max-memory 10GiB", max_memory="10GiB")
                with memory_fraction(24):
                    row(ours, rows, 3, 1, tmp, "  8-bit, automatic on a 24 GiB card")
            worst_case_rows(8)
            if "levers" not in skip:
                row(ours, rows, steps, W, tmp, "  8-bit, LLM.int8 matmul (no dequantized path)", overrides={"int8_dequant": False})
        free_model()
    log("\n" + header + "\n\n" + table(results, limit))


if __name__ == "__main__":
    main()
