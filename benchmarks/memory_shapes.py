"""Is the memory plan honest on every model shape? The planner's estimate against the measured peak, for
several real model shapes (random weights), 4- and 8-bit, automatic and with --max-memory under a real cap.

    python benchmarks/memory_shapes.py                          # GPU: every shape (~15 min on an H200)
    python benchmarks/memory_shapes.py --shapes llama3-8b,qwen2.5-14b --long-context
    python benchmarks/memory_shapes.py --shapes quick --steps 1 # CPU: checks the script (no plan on a CPU)

For each shape and bit width, after loading: the model's resident memory and the load's peak, then runs of
qlora_magic's training (run_training, as qlora_magic.train calls it) whose row says the plan's layout, its
estimate ("memory_plan") and the measured peak allocated and reserved:

- automatic on the whole card, examples of 54-512 tokens, with an eval set (evaluated before and after),
- automatic on a 24 GiB card (the process capped there), every example 512 tokens (the worst micro-batch),
- --max-memory on a card of that size (capped the same): the budget is met, or the cell fails before
  training with the smallest budget that works, which is then run under that cap to show it is enough.

--long-context adds, on the first shape at 4 bits: 8,192-token examples with --max-memory 24GB (effective
batch 16), and the longest power-of-two length that trains in 16 and 24 GiB (one example per step).

Peaks are torch.cuda.max_memory_allocated over the run (the model included), compared with the estimate,
which counts the model too. Writes memory-shapes.md/.json to --out after every row.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_speed import (  # noqa: E402 - the benchmarks share their model, data and measuring helpers
    as_dataset,
    build_random_checkpoint,
    environment,
    free_model,
    log,
    memory_fraction,
    reset_peak,
    synthetic_rows,
)

GiB = 1024**3
# name: (model_type, config sizes, --max-memory budget in GiB for the capped run)
SHAPES = {
    "llama2-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                                num_key_value_heads=32, vocab_size=32000), 10),
    "llama3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0), 10),
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                                 num_key_value_heads=4, vocab_size=152064), 10),
    "qwen2.5-3b-tied": ("qwen2", dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                      num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                                      tie_word_embeddings=True), 6),
    "qwen2.5-14b": ("qwen2", dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                                  num_key_value_heads=8, vocab_size=152064), 16),
    "quick": ("llama", dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=32000), 1),
}
DEFAULT_SHAPES = "llama2-7b,llama3-8b,qwen2.5-7b,qwen2.5-3b-tied,qwen2.5-14b"


def on_gpu():
    import torch

    return torch.cuda.is_available()


def allocated():
    import torch

    return torch.cuda.memory_allocated() if on_gpu() else 0


def peaks():
    import torch

    if not on_gpu():
        return 0, 0
    return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()


def parse_gb(text, pattern):
    match = re.search(pattern, text or "")
    return float(match.group(1)) * 1e9 if match else None


def train_once(rows, tmp, steps, max_memory=None, eval_rows=None, batch=(4, 4)):
    """One qlora_magic run on the session's model; its settings, s/step and peak memory."""
    import qlora_magic
    from qlora_magic.config import TrainConfig
    from qlora_magic.display.reporters import NullReporter
    from qlora_magic.engine.training import TrainingData, run_training

    session = qlora_magic.get_session()
    config = TrainConfig(max_steps=steps, batch_size=batch[0], grad_accum=batch[1], max_memory=max_memory,
                         output_dir=str(tmp / "runs"), display="none", eval_steps=steps if eval_rows else None)
    data = TrainingData(as_dataset(rows), eval=as_dataset(eval_rows) if eval_rows else None)
    reset_peak()
    started = time.perf_counter()
    summary = run_training(session.model, session.tokenizer, config, data, NullReporter())
    seconds = time.perf_counter() - started
    peak, reserved = peaks()
    settings = summary.settings
    keys = ("batch", "gradient_checkpointing", "checkpointed_layers", "offload_checkpoints", "max_tokens", "chunked_loss", "memory_plan")
    return {"settings": ", ".join(f"{k}={settings[k]}" for k in keys if k in settings),
            "estimate": parse_gb(settings.get("memory_plan"), r"([\d.]+) GB of"),
            "budget": parse_gb(settings.get("memory_plan"), r"of ([\d.]+) GB"),
            "over": "more than fits" in str(settings.get("memory_plan", "")),
            "peak": peak, "reserved": reserved, "s_run": seconds, "steps": summary.steps_done,
            "loss": summary.train_loss[1]}


@contextlib.contextmanager
def capped(gib):
    if gib and on_gpu():
        with memory_fraction(gib):
            yield
    else:
        yield


def measured(results, out, header, base, fn, *args, cap=None, **kwargs):
    """One row: the run's numbers, or its error (an out-of-memory or a refusal) as the row."""
    from qlora_magic.errors import ConfigError

    row = dict(base)
    try:
        with capped(cap):
            row.update(fn(*args, **kwargs))
    except ConfigError as error:  # the planner's refusal: the cell fails before training
        row["refused"] = str(error)
    except Exception as error:  # noqa: BLE001 - one failed run must not lose the others
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        reset_peak()
    row["cap_gib"] = cap
    results.append(row)
    log(format_row(row))
    write(results, out, header)
    return row


def format_row(row):
    gbs = lambda n: f"{n / 1e9:.2f}" if n else "-"  # noqa: E731
    if "refused" in row:
        outcome = f"refused before training: {row['refused']}"
    elif "error" in row:
        outcome = f"failed: {row['error']}"
    else:
        margin = (row["estimate"] - row["peak"]) / 1e9 if row.get("estimate") and row.get("peak") else None
        honest = "-" if margin is None else ("yes" if margin >= 0 else "NO")
        outcome = (f"{gbs(row.get('estimate'))} | {gbs(row.get('peak'))} | {gbs(row.get('reserved'))} | "
                   f"{honest} ({margin:+.2f}) | {row['s_run'] / max(row['steps'], 1):.2f} | {row['settings']}"
                   if margin is not None else f"- | {gbs(row.get('peak'))} | - | - | - | {row.get('settings', '')}")
    cap = f"{row['cap_gib']} GiB" if row.get("cap_gib") else "card"
    return f"| {row['shape']} | {row['bits']} | {gbs(row.get('resident'))} | {row['case']} | {cap} | {outcome} |"


def write(results, out, header):
    lines = [header, "", "| shape | bits | model GB | run | card | estimate GB | peak GB | reserved GB | "
             "estimate >= peak (margin GB) | s/step | settings |", "| --- " * 11 + "|"]
    lines += [format_row(r) for r in results]
    (out / "memory-shapes.md").write_text("\n".join(lines) + "\n")
    (out / "memory-shapes.json").write_text(json.dumps({"results": results}, indent=1, default=str))


def suggested_budget(message):
    match = re.search(r"Give --max-memory ([\d.]+) GB", message or "")
    return float(match.group(1)) if match else None


def shape_rows(name, model_type, shape, budget_gib, bits_list, args, tmp, out, header, results):
    import qlora_magic

    base_dir = Path(args.checkpoint) if args.checkpoint else (Path("/dev/shm") if Path("/dev/shm").is_dir() and on_gpu() else tmp)
    shape = {**shape, "max_position_embeddings": 65536}
    folder = build_random_checkpoint(base_dir / f"random-{name}", shape, "cuda" if on_gpu() else "cpu", model_type)
    vocab = shape["vocab_size"]
    mixed = synthetic_rows(16 * args.steps + 16, vocab)
    worst = synthetic_rows(16 * args.steps + 16, vocab, all_max_length=True, seed=1)
    eval_rows = synthetic_rows(32, vocab, seed=2)
    try:
        for bits in bits_list:
            reset_peak()
            started = time.perf_counter()
            qlora_magic.load(str(folder), bits=bits)
            load_s = time.perf_counter() - started
            load_peak, _ = peaks()
            base = {"shape": name, "bits": bits, "resident": allocated(), "load_peak": load_peak, "load_s": load_s}
            log(f"{name} {bits}-bit: loaded in {load_s:.0f} s, {allocated() / 1e9:.2f} GB resident, load peak {load_peak / 1e9:.2f} GB")
            row = lambda case, *a, **kw: measured(results, out, header, {**base, "case": case}, train_once, *a, **kw)  # noqa: E731
            row("automatic, 54-512 tokens, eval before+after", mixed, tmp, args.steps, eval_rows=eval_rows)
            row("automatic, every example 512 tokens", worst, tmp, args.steps, cap=24)
            given = row(f"--max-memory {budget_gib}GiB, every example 512 tokens", worst, tmp, args.steps,
                        max_memory=f"{budget_gib}GiB", cap=budget_gib)
            needed = suggested_budget(given.get("refused"))
            if needed:  # the budget the refusal named, run under a cap of that size
                cap = needed * 1e9 / GiB
                row(f"--max-memory {needed:g}GB (the refusal's), every example 512 tokens", worst, tmp, args.steps,
                    max_memory=f"{needed:g}GB", cap=cap)
            if args.long_context and bits == 4 and name == args.long_context_shape:
                lengths = [int(n) for n in args.lengths.split(",")] if args.lengths else None
                long_context_rows(row, vocab, tmp, *([lengths, False] if lengths else []))
            free_model()
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


def long_context_rows(row, vocab, tmp, lengths=(8192, 16384, 32768, 65536), with_batch=True):
    """8,192-token examples at the default effective batch in 24 GB, then the longest length per budget
    (`lengths` tried in order, up to the first that does not fit)."""
    if with_batch:
        rows = synthetic_rows(16 * 2, vocab, max_length=8192, all_max_length=True, seed=3)
        row("--max-memory 24GB, every example 8,192 tokens", rows, tmp, 1, max_memory="24GB", cap=24e9 / GiB)
    for gib in (16, 24):
        for length in lengths:
            one = synthetic_rows(2, vocab, max_length=length, all_max_length=True, seed=4)
            result = row(f"--max-memory {gib}GiB, one {length:,}-token example per step", one, tmp, 2,
                         max_memory=f"{gib}GiB", cap=gib, batch=(1, 1))
            needed = suggested_budget(result.get("refused"))
            if needed:  # the budget the refusal named, run under a cap of that size
                row(f"--max-memory {needed:g}GB (the refusal's), one {length:,}-token example per step", one, tmp, 2,
                    max_memory=f"{needed:g}GB", cap=needed * 1e9 / GiB, batch=(1, 1))
            if "error" in result or "refused" in result:
                break


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"comma-separated, of: {', '.join(SHAPES)}")
    parser.add_argument("--bits", default="4,8")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per run (the peak comes at the first)")
    parser.add_argument("--long-context", action="store_true")
    parser.add_argument("--long-context-shape", default="llama3-8b")
    parser.add_argument("--lengths", default=None, help="--long-context: these example lengths only (comma-separated)")
    parser.add_argument("--checkpoint", default=None, help="folder for the random checkpoints (default /dev/shm)")
    parser.add_argument("--keep", action="store_true", help="keep the random checkpoints (deleted after each shape)")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="qlora-shapes-"))
    env = environment()
    header = (f"{env['date']} · {env['device']} · torch {env['torch']} · transformers {env['transformers']} · "
              f"peft {env['peft']} · bitsandbytes {env['bitsandbytes']} · effective batch 16 · {args.steps} steps per run"
              f" · `python benchmarks/memory_shapes.py --shapes {args.shapes}{' --long-context' if args.long_context else ''}`")
    log(header)
    results = []
    bits_list = [int(b) for b in args.bits.split(",")]
    for name in args.shapes.split(","):
        model_type, shape, budget = SHAPES[name]
        shape_rows(name, model_type, shape, budget, bits_list, args, tmp, out, header, results)
    log("\n" + (out / "memory-shapes.md").read_text())


if __name__ == "__main__":
    main()
