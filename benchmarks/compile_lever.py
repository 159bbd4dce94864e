"""Regional compilation (`--compile`: each decoder layer through torch.compile) measured as a user meets it: each
variant in a fresh process (a cold compile cache), the whole run's wall time (load excluded, compile included)
and the steady tokens/s after the warm-up steps (issue 12).

    python benchmarks/compile_lever.py                # GPU: 7B shape, 4-bit; defaults and --max-memory 22GiB
    python benchmarks/compile_lever.py --model quick  # CPU: checks the script (compile off there)

Writes compile-lever.md / .json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

EFFECTIVE = 16
VARIANTS = {  # name: (--compile value, --max-memory)
    "defaults, not compiled": (False, None),
    "defaults, compiled": (True, None),
    "--max-memory 22GiB (partial checkpointing), not compiled": (False, "22GiB"),
    "--max-memory 22GiB (partial checkpointing), compiled": (True, "22GiB"),
}


def one_variant(args):
    """In this process: load, then one run of warm-up + timed steps; prints one JSON line."""
    import shutil

    import torch

    import gpu_speed
    from gpu_speed import build_random_checkpoint, guarded, load_ours, ours, synthetic_rows

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = gpu_speed.LLAMA_7B if args.model == "llama7b" else gpu_speed.QUICK
    shm = Path("/dev/shm") if device == "cuda" and shutil.disk_usage("/dev/shm").free > 20 * 2**30 else Path("/tmp")
    path = str(build_random_checkpoint(shm / f"random-compile-{args.model}", shape, device))
    rows = synthetic_rows(EFFECTIVE * (args.warmup + args.steps + 2), shape["vocab_size"])
    load_ours(path, 4)
    compiled, budget = VARIANTS[args.variant]
    started = time.perf_counter()
    row = guarded([], ours, rows, args.steps, args.warmup, Path(tempfile.mkdtemp()), args.variant,
                  max_memory=budget, config_values={"compile": compiled})
    row["run_wall_s"] = time.perf_counter() - started
    print("RESULT " + json.dumps(row, default=str), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["llama7b", "quick"], default="llama7b")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variant", choices=list(VARIANTS), default=None, help="(internal) run one variant here")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = parser.parse_args(argv)
    if args.variant:
        return one_variant(args)
    from gpu_speed import environment

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    header = (f"{env['date']} · {env['device']} · torch {env['torch']} · transformers {env['transformers']} · "
              f"model {args.model} (random weights), 4-bit, LoRA r=8 q/v, effective batch {EFFECTIVE} · each variant "
              f"a fresh process · {args.warmup} warm-up + {args.steps} timed steps")
    results = []
    for name in VARIANTS:
        command = [sys.executable, __file__, "--model", args.model, "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--variant", name]
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        row = json.loads(lines[-1][7:]) if lines else {"recipe": name, "error": done.stderr.strip().splitlines()[-1:]}
        results.append(row)
        table = [header, "", "| variant | run wall s (compile included) | s/step after warm-up | real tok/s | peak GB | settings |",
                 "| --- | --- | --- | --- | --- | --- |"]
        for r in results:
            if "error" in r:
                table.append(f"| {r['recipe']} | failed: {r['error']} | | | | |")
            else:
                table.append(f"| {r['recipe']} | {r['run_wall_s']:.1f} | {r['s_step']:.3f} | {r['tok_s']:,.0f} | "
                             f"{r['peak'] / 1e9:.1f} | {r['settings']} |")
        (out / "compile-lever.md").write_text("\n".join(table) + "\n")
        (out / "compile-lever.json").write_text(json.dumps({"header": header, "rows": results}, indent=1, default=str))
        print(table[-1], flush=True)


if __name__ == "__main__":
    main()
