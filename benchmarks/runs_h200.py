"""Runs that survive (issue 11), measured on a GPU: the out-of-memory back-off under a real memory cap, what a
checkpoint costs, and whether GPU memory comes back after a failed run and after `qlora_magic.unload()`.

    python benchmarks/runs_h200.py --out benchmarks/results/2026-12-02-h200-runs   # GPU: Llama-2-7B shape (~4 min)
    python benchmarks/runs_h200.py --quick --out /tmp/runs-quick                   # CPU: a small random Llama, to check the script

All in one process, on a Llama with Llama-2-7B's shape and random weights (built locally by gpu_speed.py's
builder, no hub), loaded 4-bit by `qlora_magic.load` with LoRA dropout 0 (no randomness in a step, so runs
compare), trained by `engine.training.run_training` (what `qlora_magic.train` runs) on gpu_speed.py's synthetic
instruction rows, effective batch 16 at the layout the planner picks, seed 0, each run from the same LoRA
initialization (the adapter's weights are put back between runs).

1. Out-of-memory back-off. A reference run (12 optimizer steps, a run folder as a user's run has), the same
   run forced to the next smaller layout (the layout-only difference), the reference again (the GPU's
   run-to-run difference at one layout), then the same run once more where a
   TrainerCallback, at the start of step 4, caps the process (`torch.cuda.set_per_process_memory_fraction`, then
   `empty_cache`, so the cached blocks must be taken again under the cap) between the reference's step-4 peak
   and the smaller layout's largest peak: the planned micro-batch cannot fit, the smaller one can. The planner
   chose with the whole card at the start. Reports the layouts, whether all steps ran, the per-step loss
   differences after the back-off against the reference (and the smaller layout's own difference), the seconds
   the back-off cost, and the steps logged (none lost or repeated). The cap is set back to 1.0 after.
   --quick (CPU): the out-of-memory error is raised by a patched Trainer.training_step instead.
2. Checkpoint cost, at the default LoRA (r=8 on q/v) and at r=16 on all linear layers: the same steps with no
   run folder, and with a run folder whose checkpoint_minutes is tiny (a checkpoint after every step, as the
   Trainer writes it: adapter, optimizer, scheduler, RNG, Trainer state, plus the tokenizer); each
   `RunFolder.write_checkpoint` timed (GPU synchronized first); the checkpoint's size on disk; the share of
   the default 10-minute interval one checkpoint takes.
3. Memory comes back: `torch.cuda.memory_allocated()` before a run, after a run that a callback's exception
   ends at step 3 (caught here, and kept alive as IPython keeps the last error), through the verbs' error path
   (`api._verb`, what `qlora_magic.train` runs in) and, for comparison, straight from `run_training`; then after
   `qlora_magic.unload()`, against the memory before the model was loaded, and once more after freeing
   cuBLAS's workspaces (PyTorch allocates them through its allocator and keeps them for the process's life).

Prints a table and writes results.md and results.json to --out. Timings are for reading, never for test
assertions.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from gpu_speed import (EFFECTIVE_BATCH, LLAMA_7B, QUICK, as_dataset, build_random_checkpoint, environment,  # noqa: E402
                       log, synthetic_rows)

GB, MB = 1e9, 1e6


# ------------------------------------------------------------------------------------------------ helpers

def on_gpu():
    import torch

    return torch.cuda.is_available()


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def allocated():
    """GPU memory allocated (the CPU process's RSS in --quick)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.memory_allocated()
    import psutil

    return psutil.Process().memory_info().rss


def clear_cublas_workspaces():
    """Free cuBLAS's per-handle workspaces (PyTorch allocates them through its caching allocator, so they count
    in memory_allocated, and keeps them for the process's life); returns the allocated bytes after."""
    import torch

    if torch.cuda.is_available() and hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
        torch._C._cuda_clearCublasWorkspaces()
        collect()
    return allocated()


def collect():
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load(path, **lora):
    import torch

    import qlora_magic

    started = time.perf_counter()
    torch.manual_seed(0)  # the same LoRA initialization for every run compared
    qlora_magic.load(path, bits=4, dropout=0.0, **lora)
    return time.perf_counter() - started


def lora_weights():
    """A CPU copy of the adapter's trainable weights, to put back before each run (all runs start alike)."""
    import qlora_magic

    model = qlora_magic.get_session().model
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def put_back(weights):
    import torch

    import qlora_magic

    with torch.no_grad():
        for n, p in qlora_magic.get_session().model.named_parameters():
            if n in weights:
                p.copy_(weights[n])


def step_marks():
    """A TrainerCallback that records, per step, its start and end times, the micro-batch and the step's peak
    memory (allocated and reserved), and each Trainer's start (a back-off starts a second one)."""
    import torch
    from transformers import TrainerCallback

    class StepMarks(TrainerCallback):
        def __init__(self):
            self.steps, self.trainers, self._begin = [], [], None

        def on_train_begin(self, args, state, control, **kwargs):
            sync()
            self.trainers.append({"t": time.perf_counter(), "from_step": state.global_step,
                                  "micro": args.per_device_train_batch_size, "accum": args.gradient_accumulation_steps})

        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            self._begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            cuda = torch.cuda.is_available()
            self.steps.append({"step": state.global_step, "trainer": len(self.trainers), "begin": self._begin,
                               "end": time.perf_counter(), "micro": args.per_device_train_batch_size,
                               "peak": torch.cuda.max_memory_allocated() if cuda else None,
                               "peak_reserved": torch.cuda.max_memory_reserved() if cuda else None})

        def seconds(self, first_step=1):
            return [s["end"] - s["begin"] for s in self.steps if s["step"] >= first_step]

        def peak(self, step, key="peak"):
            return next((s[key] for s in self.steps if s["step"] == step), None)

    return StepMarks()


def memory_cap(at_step, cap_bytes, planned_micro):
    """A TrainerCallback that, at the start of optimizer step `at_step`, caps the process's GPU memory at
    `cap_bytes` (and empties the cache, so the cached blocks count against the cap again). On the CPU
    (--quick) it arms a patched Trainer.training_step instead, which raises torch.OutOfMemoryError while the
    micro-batch is `planned_micro` or more."""
    import torch
    from transformers import TrainerCallback

    class MemoryCap(TrainerCallback):
        applied_at = None
        armed = False

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 < at_step or self.applied_at is not None:
                return
            sync()
            self.applied_at = time.perf_counter()
            if torch.cuda.is_available():
                total = torch.cuda.get_device_properties(0).total_memory
                torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total))
                torch.cuda.empty_cache()
            else:
                self.armed = True

    cap = MemoryCap()
    return cap


@contextlib.contextmanager
def injected_out_of_memory(cap, planned_micro):
    """--quick: Trainer.training_step raises torch.OutOfMemoryError once `cap` is armed and the micro-batch is
    still `planned_micro` or more (what a real cap does to the planned layout on a GPU)."""
    import torch
    from transformers import Trainer

    real = Trainer.training_step

    def training_step(self, model, inputs, num_items_in_batch=None):
        if cap.armed and self.args.per_device_train_batch_size >= planned_micro:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by --quick)")
        return real(self, model, inputs, num_items_in_batch)

    Trainer.training_step = training_step
    try:
        yield
    finally:
        Trainer.training_step = real


class NotingReporter:
    """A reporter that keeps the run's notes (the back-off's one line)."""

    def __init__(self):
        from qlora_magic.display.reporters import NullReporter

        self.notes = []
        self._null = NullReporter()

    def __getattr__(self, name):
        return getattr(self._null, name)

    def note(self, text):
        self.notes.append(text)


def train(rows, tmp, name, steps, callbacks=(), checkpoint_minutes=None, overrides=None, reporter=None,
          extras=True):
    """One run through run_training on the session's model. checkpoint_minutes None: no run folder (nothing
    written but TensorBoard); a number: a run folder (0: checkpoints only at the end), as a user's run keeps.
    Returns (summary, run folder or None)."""
    import qlora_magic
    from qlora_magic.config import TrainConfig
    from qlora_magic.engine.run_folder import RunFolder
    from qlora_magic.engine.training import Checkpointing, TrainingData, run_training

    session = qlora_magic.get_session()
    config = TrainConfig(max_steps=steps, batch_size=4, grad_accum=4, seed=0, display="none",
                         output_dir=str(tmp / "tb" / name))
    checkpointing = folder = None
    if checkpoint_minutes is not None:
        folder = RunFolder.create(tmp / "runs", name)
        tokenizer = session.tokenizer
        write_tokenizer = (lambda where: tokenizer.save_pretrained(str(where))) if extras else None
        checkpointing = Checkpointing(folder, checkpoint_minutes or None, write_tokenizer)
    summary = run_training(session.model, session.tokenizer, config, TrainingData(as_dataset(rows)),
                           reporter or NotingReporter(), overrides=overrides, callbacks=list(callbacks),
                           checkpointing=checkpointing)
    return summary, folder


def losses(summary):
    return {row["step"]: row["loss"] for row in summary.history if row.get("loss") is not None}


def loss_steps(summary):
    return [row["step"] for row in summary.history if row.get("loss") is not None]


def differences(a, b, first_step, last_step=None):
    steps = [s for s in sorted(a) if s >= first_step and s in b and (last_step is None or s <= last_step)]
    if not steps:
        return {"steps": 0}
    diffs = [abs(a[s] - b[s]) for s in steps]
    rel = [abs(a[s] - b[s]) / max(abs(a[s]), 1e-12) for s in steps]
    return {"steps": len(steps), "from": steps[0], "to": steps[-1], "max_abs": max(diffs), "mean_abs": sum(diffs) / len(diffs),
            "max_rel": max(rel)}


# ------------------------------------------------------------------------------------ 1. out of memory

def out_of_memory(rows, tmp, steps, at_step, quick):
    import torch

    from qlora_magic.engine.speed import smaller_layout

    weights = lora_weights()
    result = {"steps": steps, "cap_at_step": at_step}

    put_back(weights)
    collect()
    ref_marks = step_marks()
    ref, ref_folder = train(rows, tmp, "reference", steps, [ref_marks], checkpoint_minutes=10)
    layout = ref.settings["batch"]
    result["reference"] = {"layout": str(layout), "checkpointing": ref.settings["gradient_checkpointing"],
                           "memory_plan": ref.settings.get("memory_plan"), "seconds": ref.seconds,
                           "losses": losses(ref), "step_peaks": [s["peak"] for s in ref_marks.steps],
                           "step_seconds": ref_marks.seconds()}
    smaller = smaller_layout(dict(ref.settings))
    small_overrides = {k: str(v) if k == "batch" else v for k, v in smaller.items()}
    log(f"reference: {layout}, {ref.seconds:.1f} s, step peaks GB "
        f"{[round((p or 0) / GB, 1) for p in result['reference']['step_peaks']]}; smaller layout {small_overrides}")

    put_back(weights)
    collect()
    small_marks = step_marks()
    small, _ = train(rows, tmp, "smaller-layout", steps, [small_marks], checkpoint_minutes=10, overrides=small_overrides)
    result["smaller_layout"] = {"layout": str(small.settings["batch"]), "checkpointing": small.settings["gradient_checkpointing"],
                                "seconds": small.seconds, "losses": losses(small),
                                "step_peaks": [s["peak"] for s in small_marks.steps],
                                "step_peaks_reserved": [s["peak_reserved"] for s in small_marks.steps],
                                "step_seconds": small_marks.seconds()}

    put_back(weights)
    collect()
    again, _ = train(rows, tmp, "reference-again", steps, checkpoint_minutes=10)
    result["reference_again"] = {"layout": str(again.settings["batch"]), "seconds": again.seconds, "losses": losses(again)}

    cap_bytes = None
    if on_gpu():
        must_fail = ref_marks.peak(at_step)  # the planned layout's step `at_step` needs this much
        fits = max(max(s["peak"], s["peak_reserved"]) for s in small_marks.steps if s["step"] >= at_step)
        cap_bytes = int((must_fail + fits) / 2)
        total = torch.cuda.get_device_properties(0).total_memory
        result.update(cap_bytes=cap_bytes, cap_fraction=cap_bytes / total, planned_step_peak=must_fail,
                      smaller_largest_peak=fits, card_bytes=total)
        log(f"cap: step {at_step} at {layout} peaked at {must_fail / GB:.2f} GB, the smaller layout at most "
            f"{fits / GB:.2f} GB (reserved or allocated): cap {cap_bytes / GB:.2f} GB = fraction {cap_bytes / total:.4f}")
        if fits >= must_fail:
            log("WARNING: the smaller layout's peak is not below the planned one's: the cap cannot separate them")

    put_back(weights)
    collect()
    marks, cap, reporter = step_marks(), memory_cap(at_step, cap_bytes, layout.micro), NotingReporter()
    error = None
    try:
        with injected_out_of_memory(cap, layout.micro) if quick else contextlib.nullcontext():
            backed, folder = train(rows, tmp, "out-of-memory", steps, [cap, marks], checkpoint_minutes=10,
                                   reporter=reporter)
    except Exception as exc:  # noqa: BLE001 - a failed back-off is the finding
        error = "".join(traceback.format_exception(exc))
        log(error)
        backed = folder = None
    finally:
        if on_gpu():
            torch.cuda.set_per_process_memory_fraction(1.0)
        collect()
    result["notes"] = reporter.notes
    if backed is None:
        result["backed_off"] = {"error": error}
        return result
    history_steps = [json.loads(line)["step"] for line in (folder.path / "history.jsonl").read_text().splitlines()
                     if "loss" in json.loads(line)]
    ref_losses, got = losses(ref), losses(backed)
    second = [t for t in marks.trainers[1:]]
    typical_small = statistics.median(small_marks.seconds(at_step + 1)) if small_marks.seconds(at_step + 1) else None
    cost = None
    if cap.applied_at is not None and len(marks.trainers) > 1:
        redone = next((s for s in marks.steps if s["step"] == at_step and s["trainer"] == 2), None)
        if redone is not None:
            cost = {"failed_step_to_new_trainer_s": marks.trainers[1]["t"] - cap.applied_at,
                    "new_trainer_to_step_end_s": redone["end"] - marks.trainers[1]["t"],
                    "redone_step_s": redone["end"] - redone["begin"],
                    "typical_smaller_step_s": typical_small}
            cost["total_s"] = redone["end"] - cap.applied_at - (typical_small or 0)
    result["backed_off"] = {
        "status": backed.status, "steps_done": backed.steps_done, "layout": str(backed.settings["batch"]),
        "checkpointing": backed.settings["gradient_checkpointing"], "out_of_memory": backed.settings.get("out_of_memory"),
        "seconds": backed.seconds, "losses": got, "trainers": marks.trainers,
        "steps_by_trainer": [[s["step"] for s in marks.steps if s["trainer"] == i + 1] for i in range(len(marks.trainers))],
        "step_peaks": [s["peak"] for s in marks.steps], "loss_steps": loss_steps(backed), "history_jsonl_steps": history_steps,
        "steps_once_each": loss_steps(backed) == list(range(1, steps + 1)) == history_steps,
        "vs_reference_before": differences(ref_losses, got, 1, at_step - 1),
        "vs_reference_after": differences(ref_losses, got, at_step),
        "smaller_vs_reference_after": differences(ref_losses, losses(small), at_step),
        "repeat_vs_reference_after": differences(ref_losses, losses(again), at_step),
        "vs_smaller_after": differences(losses(small), got, at_step),
        "cost": cost, "second_trainers": len(second),
        "checkpoint": str(folder.latest_checkpoint().name) if folder.latest_checkpoint() else None,
    }
    b = result["backed_off"]
    log(f"back-off: {b['status']} {b['steps_done']}/{steps}, {b['out_of_memory']}, after: {b['vs_reference_after']}, "
        f"cost {cost}")
    return result


# ------------------------------------------------------------------------------------ 2. checkpoint cost

def checkpoint_cost(rows, tmp, steps, label):
    """The same `steps` with no run folder, with a checkpoint after every step, and with none again."""
    from qlora_magic.engine.run_folder import RunFolder

    timed = []
    real_write = RunFolder.write_checkpoint

    def write_checkpoint(self, step, write_files):
        sync()
        started = time.perf_counter()
        path = real_write(self, step, write_files)
        timed.append({"step": step, "seconds": time.perf_counter() - started, "path": str(path)})
        return path

    weights = lora_weights()
    runs = {}
    for key, minutes in (("plain_1", None), ("every_step", 0.001), ("plain_2", None)):
        put_back(weights)
        collect()
        marks = step_marks()
        RunFolder.write_checkpoint = write_checkpoint if minutes else real_write
        try:
            summary, folder = train(rows, tmp, f"ckpt-{label}-{key}", steps, [marks], checkpoint_minutes=minutes)
        finally:
            RunFolder.write_checkpoint = real_write
        runs[key] = {"seconds": summary.seconds, "steps": summary.steps_done,
                     "train_s": marks.steps[-1]["end"] - marks.trainers[0]["t"]}
        if minutes:
            latest = folder.latest_checkpoint()
            files = {p.name: p.stat().st_size for p in sorted(latest.iterdir()) if p.is_file()}
            runs[key].update(folder=str(folder.path), checkpoint=latest.name, files=files, bytes=sum(files.values()))
    put_back(weights)
    seconds = [t["seconds"] for t in timed]
    plain = min(runs["plain_1"]["seconds"], runs["plain_2"]["seconds"])
    import qlora_magic

    model = qlora_magic.get_session().model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    del model
    result = {"label": label, "steps": steps, "trainable_params": trainable, "checkpoints": len(seconds),
              "per_checkpoint_s": seconds, "median_s": statistics.median(seconds) if seconds else None,
              "bytes": runs["every_step"]["bytes"], "files": runs["every_step"]["files"], "runs": runs,
              "wall_difference_per_checkpoint_s": (runs["every_step"]["seconds"] - plain) / max(len(seconds), 1)}
    result["share_of_10_minutes"] = result["median_s"] / 600 if result["median_s"] else None
    log(f"checkpoint {label}: {result['bytes'] / MB:.1f} MB, {result['median_s']:.3f} s each (median of "
        f"{len(seconds)}), wall difference {result['wall_difference_per_checkpoint_s']:.3f} s/checkpoint")
    return result


# ------------------------------------------------------------------------------------ 3. memory comes back

def interrupted_at(step):
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= step:
                raise RuntimeError(f"benchmark: a callback's exception at step {state.global_step}")

    return Interrupt()


def memory_back(rows, tmp, steps, before_load):
    from qlora_magic.api import _verb

    result = {"before_load": before_load}
    kept = []  # the caught errors stay alive, as IPython keeps the last one (sys.last_value)

    def one(name, through_verb):
        collect()
        base = allocated()

        def run():
            return train(rows, tmp, name, steps, [interrupted_at(3)], checkpoint_minutes=10)

        fn = _verb("Training", "Training was interrupted.", stoppable=True)(run) if through_verb else run
        try:
            fn()
            raised = None
        except RuntimeError as error:
            kept.append(error)
            raised = str(error)
        as_caught = allocated()
        gc.collect()
        after_gc = allocated()
        return {"raised": raised, "baseline": base, "after": as_caught, "after_gc": after_gc,
                "difference": as_caught - base, "difference_after_gc": after_gc - base}

    result["through_verb"] = one("interrupted-verb", True)
    result["straight"] = one("interrupted-straight", False)
    # What the straight path held: let its error go.
    kept.pop()
    collect()
    result["straight"]["after_letting_go"] = allocated()
    import qlora_magic

    collect()
    result["before_unload"] = allocated()
    report = qlora_magic.unload()
    result["after_unload"] = allocated()
    collect()
    result["after_unload_gc"] = allocated()
    result["unload_freed"] = report.freed
    result["after_unload_cublas_cleared"] = clear_cublas_workspaces()
    result["kept_errors"] = len(kept)  # the verb's error is still alive here
    v = result["through_verb"]
    log(f"memory: baseline {v['baseline'] / GB:.3f} GB, after the interrupted run {v['after'] / GB:.3f} GB "
        f"({v['difference'] / MB:+.1f} MB; straight from run_training {result['straight']['difference'] / MB:+.1f} MB), "
        f"after unload {result['after_unload'] / GB:.3f} GB (before load {before_load / GB:.3f} GB)")
    return result


# ------------------------------------------------------------------------------------------------ report

def fmt_bytes(n, unit=GB, digits=2):
    return "-" if n is None else f"{n / unit:.{digits}f}"


def table(res, quick):
    lines = ["| measurement | result |", "| --- | --- |"]

    def add(what, value):
        lines.append(f"| {what} | {value} |")

    o = res.get("oom") or {}
    b = o.get("backed_off") or {}
    if o:
        ref = o["reference"]
        add("1. layout the planner chose (whole card)", f"{ref['layout']}, checkpointing {ref['checkpointing']}, plan {ref.get('memory_plan')}")
        if "cap_bytes" in o:
            add(f"cap set at the start of step {o['cap_at_step']}",
                f"{fmt_bytes(o['cap_bytes'])} GB (fraction {o['cap_fraction']:.4f}); planned step {o['cap_at_step']} peaked at "
                f"{fmt_bytes(o['planned_step_peak'])} GB, the smaller layout at most {fmt_bytes(o['smaller_largest_peak'])} GB")
        elif quick:
            add(f"out of memory from step {o['cap_at_step']}", "injected (CPU)")
        if "error" in b:
            add("back-off", "FAILED: " + b["error"].strip().splitlines()[-1])
        else:
            add("layout after the back-off", f"{b['layout']}, checkpointing {b['checkpointing']} ({b['out_of_memory']})")
            add("run completed", f"{b['status']}, {b['steps_done']}/{o['steps']} steps; Trainers: "
                + ", ".join(f"#{i + 1} steps {s[0] if s else '-'}-{s[-1] if s else '-'}" for i, s in enumerate(b["steps_by_trainer"])))
            add("steps logged (history and history.jsonl)", f"{b['loss_steps']}: each once: {b['steps_once_each']}")
            d, s, pre = b["vs_reference_after"], b["smaller_vs_reference_after"], b["vs_reference_before"]
            add(f"loss vs reference, steps {d.get('from')}-{d.get('to')} (after the back-off)",
                f"max abs {d.get('max_abs', 0):.2e}, max rel {d.get('max_rel', 0):.2e}")
            add("  the smaller layout from step 1 vs reference, same steps", f"max abs {s.get('max_abs', 0):.2e}, max rel {s.get('max_rel', 0):.2e}")
            r = b.get("repeat_vs_reference_after") or {}
            add("  the reference run again (same layout) vs reference, same steps",
                f"max abs {r.get('max_abs', 0):.2e}, max rel {r.get('max_rel', 0):.2e}")
            add(f"  steps 1-{o['cap_at_step'] - 1} (same layout, before the cap)", f"max abs {pre.get('max_abs', 0):.2e}")
            c = b.get("cost")
            if c:
                add("time the back-off cost", f"{c['total_s']:.1f} s (cap to the new Trainer {c['failed_step_to_new_trainer_s']:.1f} s, "
                    f"resume and step {o['cap_at_step']} {c['new_trainer_to_step_end_s']:.1f} s, less one "
                    f"{b['layout']} step {c['typical_smaller_step_s'] or 0:.2f} s)")
            add("run wall time: reference / smaller layout / with the back-off",
                f"{ref['seconds']:.1f} / {o['smaller_layout']['seconds']:.1f} / {b['seconds']:.1f} s")
            peaks = [p for p in b["step_peaks"][o["cap_at_step"]:] if p]
            if peaks:
                add("peak per step after the back-off", f"at most {max(peaks) / GB:.2f} GB")
    for c in res.get("checkpoints", []):
        big = ", ".join(f"{name} {size / MB:.1f} MB" for name, size in sorted(c["files"].items(), key=lambda kv: -kv[1])[:2])
        add(f"2. checkpoint, {c['label']} ({c['trainable_params'] / 1e6:.2f} M trainable)",
            f"{c['bytes'] / MB:.1f} MB ({big}); {c['median_s']:.2f} s each (median of {c['checkpoints']}, "
            f"{min(c['per_checkpoint_s']):.2f}-{max(c['per_checkpoint_s']):.2f}); {100 * c['share_of_10_minutes']:.2f}% of a 10-minute "
            f"interval; run wall difference {c['wall_difference_per_checkpoint_s']:.2f} s/checkpoint")
    m = res.get("memory")
    if m:
        v, s = m["through_verb"], m["straight"]
        what = "GPU allocated" if not quick else "CPU RSS"
        add(f"3. {what} before the run (model loaded)", f"{fmt_bytes(v['baseline'], GB, 3)} GB")
        add("  after the run a callback's exception ended at step 3 (error kept alive)",
            f"{fmt_bytes(v['after'], GB, 3)} GB ({v['difference'] / MB:+.1f} MB; after gc.collect {v['difference_after_gc'] / MB:+.1f} MB)")
        add("  the same straight from run_training (no verb clearing its frames)",
            f"{s['difference'] / MB:+.1f} MB (after gc.collect {s['difference_after_gc'] / MB:+.1f} MB; once the error is let go "
            f"{(s['after_letting_go'] - s['baseline']) / MB:+.1f} MB)")
        add("  after qlora_magic.unload()", f"{fmt_bytes(m['after_unload'], GB, 3)} GB ({(m['after_unload'] - v['baseline']) / GB:+.3f} GB "
            f"vs the run's baseline; before the model was loaded {fmt_bytes(m['before_load'], GB, 3)} GB; freed {m['unload_freed'] / GB:.3f} GB)")
        add("  then cuBLAS's workspaces freed (torch._C._cuda_clearCublasWorkspaces)", f"{m['after_unload_cublas_cleared'] / MB:.3f} MB")
    if res.get("final_unload"):
        f = res["final_unload"]
        add("  after the r=16 model's unload", f"{fmt_bytes(f['after'], GB, 3)} GB (before its load {fmt_bytes(f['before_load'], GB, 3)} GB; "
            f"cuBLAS's workspaces freed: {f['after_cublas_cleared'] / MB:.3f} MB)")
    return "\n".join(lines)


def write(out, header, res, quick):
    text = header + "\n\n" + table(res, quick) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU: a small random Llama (checks the script)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps of the back-off runs (default 12; --quick 6)")
    parser.add_argument("--cap-at", type=int, default=None, help="the step whose start caps memory (default 4; --quick 3)")
    parser.add_argument("--checkpoint-steps", type=int, default=None, help="steps of each checkpoint-cost run (default 6; --quick 3)")
    parser.add_argument("--checkpoint", default=None, help="folder for the random checkpoint (default: /dev/shm or tmp)")
    parser.add_argument("--skip", default="", help="comma-separated: oom,checkpoint,memory,r16")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/runs"))
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import shutil

    import torch

    quick = args.quick
    skip = set(filter(None, args.skip.split(",")))
    steps = args.steps or (6 if quick else 12)
    at_step = args.cap_at or (3 if quick else 4)
    ckpt_steps = args.checkpoint_steps or (3 if quick else 6)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="qlora-runs-"))
    if not quick and not torch.cuda.is_available():
        sys.exit("No GPU: run with --quick on the CPU.")
    env = environment()
    log(json.dumps(env))
    shape = QUICK if quick else LLAMA_7B
    shm_ok = Path("/dev/shm").is_dir() and shutil.disk_usage("/dev/shm").free > 20 * 1024**3
    base = Path(args.checkpoint) if args.checkpoint else (Path("/dev/shm") if shm_ok and not quick else tmp)
    started = time.perf_counter()
    path = str(build_random_checkpoint(base / f"random-{'quick' if quick else 'llama7b'}", shape, "cuda" if on_gpu() else "cpu"))
    n = EFFECTIVE_BATCH * (steps + 2)
    rows = (synthetic_rows(n, shape["vocab_size"], max_length=128, median=60) if quick
            else synthetic_rows(n, shape["vocab_size"]))
    lengths = sorted(len(r["input_ids"]) for r in rows)
    header = (f"{env['date']} · {env['device']} · torch {env['torch']} · transformers {env['transformers']} · peft {env['peft']} · "
              f"bitsandbytes {env['bitsandbytes']} · Python {env['python']} · model {'quick (small random Llama)' if quick else 'Llama-2-7B shape, random weights'}, "
              f"4-bit, LoRA dropout 0 · {len(rows)} synthetic examples (median {lengths[len(lengths) // 2]} tokens, max {lengths[-1]}) · "
              f"effective batch {EFFECTIVE_BATCH} · seed 0 · `python benchmarks/runs_h200.py{' --quick' if quick else ''}`")
    res = {"env": env, "header": header}

    def save():
        res["wall_s"] = time.perf_counter() - started
        write(out, header, res, quick)

    collect()
    before_load = allocated()
    res["load_s"] = load(path)
    log(f"loaded 4-bit r=8 q/v in {res['load_s']:.0f} s; allocated {allocated() / GB:.2f} GB")
    if "oom" not in skip:
        res["oom"] = out_of_memory(rows, tmp, steps, at_step, quick)
        save()
    res["checkpoints"] = []
    if "checkpoint" not in skip:
        res["checkpoints"].append(checkpoint_cost(rows, tmp, ckpt_steps, "r=8 on q, v (the default)"))
        save()
    if "memory" not in skip:
        res["memory"] = memory_back(rows, tmp, steps, before_load)
        save()
    if "r16" not in skip and "checkpoint" not in skip:
        from qlora_magic.engine.run_folder import RunFolder  # noqa: F401 - (imported above too)

        import qlora_magic

        if qlora_magic.get_session().model is not None:
            qlora_magic.unload()
        collect()
        before = allocated()
        res["load_r16_s"] = load(path, r=16, targets="all-linear")
        res["checkpoints"].append(checkpoint_cost(rows, tmp, ckpt_steps, "r=16 on all linear layers"))
        qlora_magic.unload()
        collect()
        res["final_unload"] = {"before_load": before, "after": allocated(), "after_cublas_cleared": clear_cublas_workspaces()}
        save()
    shutil.rmtree(tmp, ignore_errors=True)
    text = write(out, header, res, quick)
    log("\n" + text)
    log(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
