"""Where a training step's time goes: torch.profiler over qlora_magic's steps on the 7B shape, 4-bit (issue 12:
the next speed lever is chosen from this, not guessed).

    python benchmarks/profile_step.py                 # GPU: defaults (16x1), then 4 micro-batches of 4
    python benchmarks/profile_step.py --model quick   # CPU: checks the script

Each recipe runs warm-up steps, then `--steps` profiled steps. Writes profile.md to --out: the step time, the
GPU's busy time and the share of each kind of kernel (matmuls, 4-bit dequantization, attention, elementwise,
the loss, the optimizer), and the top kernels and CPU-side operators by time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

EFFECTIVE = 16
KINDS = [  # (kind, substrings of kernel names), first match wins
    ("4-bit dequantization", ("dequantize", "kDequantize", "dequant")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient_attention")),
    ("matmul", ("gemm", "cutlass", "nvjet", "sm90_xmma", "ampere_", "matmul", "cublas")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("loss / softmax", ("softmax", "logsumexp", "cross_entropy", "nll")),
    ("copies and casts", ("copy", "cast", "memcpy", "Memcpy", "to_copy")),
]


def kind_of(name: str) -> str:
    return next((kind for kind, keys in KINDS if any(k in name for k in keys)), "elementwise and other")


def profile_recipe(rows, steps, warmup, tmp, label, overrides):
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    import gpu_speed

    cuda = torch.cuda.is_available()

    class Profiled(TrainerCallback):
        """Profiles the steps after the warm-up ones; times them without the profiler's own first-step cost."""

        def __init__(self):
            self.prof, self.times, self.started = None, [], None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
                self.prof = profile(activities=activities)
                self.prof.__enter__()
            if cuda:
                torch.cuda.synchronize()
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            if state.global_step > warmup:
                self.times.append(time.perf_counter() - self.started)
            if state.global_step == warmup + steps and self.prof is not None:
                self.prof.__exit__(None, None, None)

    probe = Profiled()
    row = gpu_speed.guarded([], _run, rows, steps, warmup, tmp, label, overrides, probe)
    if "error" in row or probe.prof is None:
        return row, []
    events = probe.prof.key_averages()
    device_time = lambda e: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))  # noqa: E731
    kernels = [(e.key, device_time(e), e.count) for e in events if device_time(e) > 0]
    cpu_ops = sorted(((e.key, e.self_cpu_time_total, e.count) for e in events), key=lambda x: -x[1])[:15]
    row["step_s"] = sum(probe.times) / max(len(probe.times), 1)
    row["gpu_busy_s"] = sum(t for _, t, _ in kernels) / 1e6 / steps
    kinds = {}
    for name, t, _ in kernels:
        kinds[kind_of(name)] = kinds.get(kind_of(name), 0) + t / 1e6 / steps
    row["kinds"] = dict(sorted(kinds.items(), key=lambda kv: -kv[1]))
    row["top_kernels"] = [(n[:90], t / 1e3 / steps, c // steps) for n, t, c in sorted(kernels, key=lambda x: -x[1])[:15]]
    row["top_cpu"] = [(n[:90], t / 1e3 / steps, c // steps) for n, t, c in cpu_ops]
    return row, kernels


def _run(rows, steps, warmup, tmp, label, overrides, probe):
    from gpu_speed import ours

    return ours(rows, steps, warmup, tmp, label, overrides=overrides, callbacks=[probe])


def compile_layers():
    """Regional compilation: each decoder layer compiled in place (one graph for all, the weights its inputs);
    packed lengths are multiples of 512, so a handful of shapes, marked dynamic after the first."""
    import torch
    from transformers.modeling_layers import GradientCheckpointingLayer

    import qlora_magic

    torch._dynamo.config.cache_size_limit = 64
    for module in qlora_magic.get_session().model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.compile()


def report(rows, header) -> str:
    lines = [header, ""]
    for row in rows:
        lines.append(f"## {row['recipe']}")
        if "error" in row:
            lines += [f"failed: {row['error']}", ""]
            continue
        lines.append(f"step {row['step_s']:.3f} s (profiled), GPU busy {row['gpu_busy_s']:.3f} s "
                     f"({100 * row['gpu_busy_s'] / row['step_s']:.0f}%); {row['tok_s']:,.0f} tok/s timed; {row['settings']}")
        lines += ["", "| kind of kernel | s per step | share of GPU busy |", "| --- | --- | --- |"]
        lines += [f"| {k} | {t:.3f} | {100 * t / row['gpu_busy_s']:.0f}% |" for k, t in row["kinds"].items()]
        lines += ["", "| top kernels | ms per step | calls per step |", "| --- | --- | --- |"]
        lines += [f"| `{n}` | {t:.1f} | {c} |" for n, t, c in row["top_kernels"]]
        lines += ["", "| top CPU operators (self) | ms per step | calls per step |", "| --- | --- | --- |"]
        lines += [f"| `{n}` | {t:.1f} | {c} |" for n, t, c in row["top_cpu"]]
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["llama7b", "quick"], default="llama7b")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--compile", action="store_true", help="also a run with every decoder layer compiled")
    args = parser.parse_args(argv)
    import shutil

    import torch

    import gpu_speed
    from gpu_speed import build_random_checkpoint, environment, load_ours, synthetic_rows

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = gpu_speed.LLAMA_7B if args.model == "llama7b" else gpu_speed.QUICK
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shm = Path("/dev/shm") if device == "cuda" and shutil.disk_usage("/dev/shm").free > 20 * 2**30 else Path("/tmp")
    path = str(build_random_checkpoint(shm / f"random-profile-{args.model}", shape, device))
    rows = synthetic_rows(EFFECTIVE * (args.warmup + args.steps + 2), shape["vocab_size"])
    load_ours(path, 4)
    tmp = Path(tempfile.mkdtemp(prefix="profile-"))
    env = environment()
    header = (f"{env['date']} · {env['device']} · torch {env['torch']} · transformers {env['transformers']} · "
              f"bitsandbytes {env['bitsandbytes']} · model {args.model} (random weights), 4-bit, LoRA r=8 q/v · "
              f"{args.warmup} warm-up + {args.steps} profiled steps")
    recipes = [("defaults (16x1 on a GPU)", None), ("4x4, packed", {"batch": "4x4"})]
    if args.compile:
        recipes.append(("defaults, each decoder layer torch.compile'd (regional compilation)", None))
    results = []
    for label, overrides in recipes:
        if "compile" in label:
            compile_layers()
        row, _ = profile_recipe(rows, args.steps, args.warmup, tmp, label, overrides)
        results.append(row)
        (out / "profile.md").write_text(report(results, header))
        print(report([row], ""), flush=True)


if __name__ == "__main__":
    main()
