"""Past one GPU (issue 13), measured: DDP scaling of `%%qlora_train --gpus N`, the launcher against in-kernel
training on one GPU, and FSDP of a 70B-shaped 4-bit model split over the GPUs.

    python benchmarks/multi_gpu.py --out benchmarks/results/DATE-h200x2-multi     # 2 GPUs (~25 min; ~140 GB disk for 70B)
    python benchmarks/multi_gpu.py --skip-fsdp --unload --out /tmp/multi-1gpu      # 1 GPU: launcher vs in-kernel, --unload
    python benchmarks/multi_gpu.py --quick --out /tmp/multi-quick                  # CPU: tiny random Llama, gloo workers

Everything goes through the public API, as a notebook would: `qlora_magic.load` in this process (the "kernel"),
then `qlora_magic.train(..., gpus=N)`, which writes the run folder, starts N workers with torchrun and follows
their history. The model is gpu_speed.py's Llama-2-7B shape with random bf16 weights, built locally (no hub),
loaded 4-bit with LoRA dropout 0 (so runs compare step for step), a word-level tokenizer over the random ids
(the rows are gpu_speed.py's synthetic instruction rows written as text: prompt and response templates).
Effective batch 32 (batch_size x grad_accum given; the planner splits it into micro-batches per GPU and each
rank takes its share of the accumulation), seed 0, every run from the same saved LoRA initialization.

1. DDP scaling: the same run in-kernel (no workers), then with --gpus 1, 2, ... up to the GPUs there are
   (--gpus-list). Per run: real tokens/s over the steps after the first (all ranks' tokens: the Trainer gathers
   them), s/step, the launch overhead (wall time minus the steps' time), rank 0's peak memory, the loss at
   every step. Reported: the speed-up of N GPUs over 1 (the issue asks >= 1.8x for 2), and the largest
   per-step loss difference of each run against the 1-GPU launcher run and the in-kernel run (the same
   effective batch and data order: float noise only).
2. FSDP: a model with Llama-2-70B's width (hidden 8192, 64 heads, 8 KV heads, MLP 28672) and --fsdp-layers
   layers (80: the 70B itself, ~138 GB of bf16 safetensors written shard by shard; fewer when the disk has
   less room: the report says how many), loaded 4-bit and trained with --gpus N --strategy fsdp (FSDP2 through
   the Trainer, the 4-bit weights stored as bf16 for sharding). Reported: whether it ran, tokens/s, rank 0's
   peak (the issue asks for under 80 GB per GPU on 2 GPUs), the loss curve. The kernel holds no 70B: the
   session loads a 2-layer model of the same width to write the run folder from, and the workers are pointed
   at the full checkpoint (the start adapter only holds LoRA weights, which have the same shapes per layer).
   --fsdp-load host (the default) has each worker load the model into CPU memory, quantized on its GPU, and
   FSDP move one layer's shard at a time onto the GPU: the path a model larger than one GPU takes; gpu loads a
   whole copy onto each GPU first.

Writes results.md and results.json to --out. Timings are for reading, never for test assertions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from gpu_speed import LLAMA_7B, PAD_ID, build_random_checkpoint, environment, log, synthetic_rows  # noqa: E402

EFFECTIVE_BATCH = 32
LLAMA_70B_WIDTH = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                       vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            vocab_size=1000, max_position_embeddings=256)
PROMPT, RESPONSE = "{prompt}", "{response}"


def word_tokenizer(vocab_size):
    """gpu_speed.py's id-level vocabulary, split on spaces, so text rows "t17 t3051 ..." are those ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def text_rows(n, vocab, max_length, seed=0):
    """synthetic_rows as text: the prompt part and the response part of each example (one token shorter than
    max_length, so the stop token the training appends is kept: the data check refuses rows that all lose it)."""
    rows = []
    for row in synthetic_rows(n, vocab, max_length=max_length - 1, seed=seed):
        cut = row["labels"].count(-100)
        ids = row["input_ids"]
        rows.append({"prompt": " ".join(f"t{i}" for i in ids[:cut]) + " ",
                     "response": " ".join(f"t{i}" for i in ids[cut:])})
    return rows


def checkpoint(folder: Path, shape: dict, device: str) -> Path:
    """A random-weight checkpoint of `shape` with the word tokenizer (built once)."""
    build_random_checkpoint(folder, shape, device)
    word_tokenizer(shape["vocab_size"]).save_pretrained(folder)
    return folder


def build_by_shards(folder: Path, shape: dict, shard_bytes=5 * 2**30) -> Path:
    """A random bf16 Llama checkpoint written tensor by tensor (a 70B does not fit in memory at once): the
    architecture on the meta device names the tensors, each is drawn and written into shards of ~5 GiB."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    if (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.for_model("llama", **{"tie_word_embeddings": False, **shape}, bos_token_id=1, eos_token_id=2,
                                  pad_token_id=PAD_ID, dtype="bfloat16")
    with torch.device("meta"):
        names = [(name, tuple(p.shape)) for name, p in AutoModelForCausalLM.from_config(config).state_dict().items()]
    generator = torch.Generator().manual_seed(0)
    shard, size, index, weight_map = {}, 0, 0, {}

    def flush():
        nonlocal shard, size, index
        if shard:
            index += 1
            file = f"model-{index:05d}.safetensors"
            save_file(shard, str(folder / file), metadata={"format": "pt"})
            weight_map.update({name: file for name in shard})
            shard, size = {}, 0

    for name, dims in names:
        if name.endswith("norm.weight"):
            tensor = torch.ones(dims, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(dims, generator=generator) * 0.02).to(torch.bfloat16)
        shard[name] = tensor
        size += tensor.numel() * 2
        if size >= shard_bytes:
            flush()
    flush()
    total = sum((folder / f).stat().st_size for f in set(weight_map.values()))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    config.save_pretrained(folder)
    word_tokenizer(shape["vocab_size"]).save_pretrained(folder)
    return folder


def disk_layers(folder: Path, shape: dict, wanted: int) -> int:
    """How many layers of `shape` fit on the disk under `folder` (bf16, 10% spare), at most `wanted`."""
    h, m, kv = shape["hidden_size"], shape["intermediate_size"], shape["num_key_value_heads"]
    head = h // shape["num_attention_heads"]
    per_layer = 2 * (2 * h * h + 2 * h * kv * head + 3 * h * m)
    fixed = 2 * 2 * shape["vocab_size"] * h
    free = shutil.disk_usage(folder if folder.exists() else folder.parent).free * 0.9
    return max(1, min(wanted, int((free - fixed) // per_layer)))


def one_run(rows, workers, args, start, out_dir, strategy=None, model=None, unload=False):
    """One training run from the saved start adapter: in-kernel (workers 0) or with `workers` GPUs (or CPU
    processes with --quick). Returns its numbers; with `unload` (--unload) also the kernel's own memory while
    the workers train and how long the model took to load back."""
    import qlora_magic as qm

    qm.load(adapter=str(start))
    options = dict(prompt=PROMPT, response=RESPONSE, max_length=args.max_length, max_steps=args.steps,
                   batch_size=args.batch_size, grad_accum=EFFECTIVE_BATCH // args.batch_size, seed=0, display="none",
                   checkpoint_minutes=0, output_dir=str(out_dir), warmup=0.0)
    if workers:
        options["processes" if args.quick else "gpus"] = workers
    if strategy:
        options["strategy"] = strategy
    if unload:
        options["unload"] = True
    if model is not None:
        options["_model"] = model
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # the in-kernel run's peak is this process's
    watch = KernelMemoryWatch() if unload else contextlib.nullcontext()
    started = time.perf_counter()
    try:
        with watch:
            summary = qm.train(rows, **{k: v for k, v in options.items() if not k.startswith("_")})
    except Exception as error:  # noqa: BLE001 - the report says what failed, the other runs go on
        traceback.print_exc()
        return {"workers": workers, "strategy": strategy or ("ddp" if workers else "in-kernel"), "ok": False,
                "error": (str(error).splitlines() or [type(error).__name__])[0], "unload": unload}
    wall = time.perf_counter() - started
    steps = [row for row in summary.history if "loss" in row]
    speeds = [row["tokens_per_second"] for row in steps[1:] if row.get("tokens_per_second")]
    step_seconds = summary.seconds_per_step
    return {"workers": workers, "strategy": strategy or ("ddp" if workers else "in-kernel"), "ok": True,
            "status": summary.status, "steps": summary.steps_done, "wall_s": round(wall, 1),
            "tokens_per_s": sum(speeds) / len(speeds) if speeds else None,
            "s_per_step": step_seconds, "peak_rank0_gb": rank0_peak_gb(summary.run_dir, steps),
            "losses": [row["loss"] for row in steps], "settings": {k: str(v) for k, v in summary.settings.items()},
            "run_dir": summary.run_dir, "unload": unload, **(watch.numbers() if unload else {})}


class KernelMemoryWatch:
    """While a --unload run trains: this process's GPU memory (allocated and reserved, sampled every 0.2 s) at
    its lowest, against what it held before; and the seconds `_load_back` took to load the model again."""

    def __init__(self):
        import threading

        self.before = self.lowest = None
        self.reload_s = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def _held():
        import torch

        return (torch.cuda.memory_allocated(), torch.cuda.memory_reserved()) if torch.cuda.is_available() else (0, 0)

    def _sample(self):
        while not self._done.wait(0.2):
            now = self._held()
            self.lowest = now if self.lowest is None else tuple(map(min, self.lowest, now))

    def __enter__(self):
        from qlora_magic.tasks import multi_process

        self.before = self._held()
        self._original = multi_process._load_back

        def timed(*args, **kwargs):
            self._done.set()  # the workers have ended: what follows is the reload
            began = time.perf_counter()
            try:
                return self._original(*args, **kwargs)
            finally:
                self.reload_s = time.perf_counter() - began

        multi_process._load_back = timed
        self._thread.start()
        return self

    def __exit__(self, *exc):
        from qlora_magic.tasks import multi_process

        self._done.set()
        self._thread.join()
        multi_process._load_back = self._original

    def numbers(self):
        gb = lambda pair: None if pair is None else [round(v / 1e9, 2) for v in pair]  # noqa: E731
        return {"kernel_gb_before": gb(self.before), "kernel_gb_lowest_while_workers": gb(self.lowest),
                "reload_s": None if self.reload_s is None else round(self.reload_s, 1)}


def from_workers_log(run_dir, pattern: str) -> str | None:
    """The last value rank 0 printed in the run's workers.log that `pattern` (one group) finds; None: not there."""
    import re

    log_file = Path(run_dir or "") / "workers.log"
    found = re.findall(pattern, log_file.read_text()) if log_file.is_file() else []
    return found[-1] if found else None


def sharded_modules(run_dir) -> int | None:
    """How many modules FSDP2 sharded, as rank 0 printed it (None: not printed)."""
    found = from_workers_log(run_dir, r"rank 0: (\d+) modules sharded by FSDP2")
    return None if found is None else int(found)


def rank0_peak_gb(run_dir, steps) -> float:
    """Rank 0's peak allocated memory as the worker printed it in workers.log (the history's memory is what is
    allocated when a step is logged, not the peak); in-kernel, the process's own peak."""
    import torch

    found = from_workers_log(run_dir, r"rank 0: peak GPU memory allocated ([\d.]+) GB")
    if found is not None:
        return float(found)
    if torch.cuda.is_available() and not (Path(run_dir or "") / "workers.log").is_file():
        return torch.cuda.max_memory_allocated() / 1e9
    return max((r.get("memory") or 0 for r in steps), default=0) / 1e9


def largest_difference(a, b):
    if not a or not b:
        return None
    return max(abs(x - y) for x, y in zip(a, b))


def scaling(args, tmp, out, gpus_there):
    import torch

    import qlora_magic as qm

    device = "cpu" if args.quick else "cuda"
    shape = TINY if args.quick else LLAMA_7B
    path = checkpoint(tmp / ("tiny" if args.quick else "llama-7b-shape"), shape, device)
    rows = text_rows(EFFECTIVE_BATCH * args.steps, shape["vocab_size"], args.max_length)
    torch.manual_seed(0)
    qm.load(str(path), bits=4, dropout=0.0, device=device)
    start = qm.save(tmp / "start-adapter")
    counts = [n for n in args.gpus_list if n <= gpus_there]
    runs = [one_run(rows, 0, args, start, tmp / "runs")]
    for n in counts:
        runs.append(one_run(rows, n, args, start, tmp / "runs"))
    if args.unload and counts:
        runs.append(one_run(rows, counts[0], args, start, tmp / "runs", unload=True))
    one = next((r for r in runs if r["workers"] == 1 and r["ok"]), None)
    kernel = runs[0] if runs[0]["ok"] else None
    for run in runs:
        if run["ok"]:
            run["max_loss_diff_vs_1"] = largest_difference(run["losses"], one and one["losses"])
            run["max_loss_diff_vs_in_kernel"] = largest_difference(run["losses"], kernel and kernel["losses"])
            if one and one.get("tokens_per_s") and run.get("tokens_per_s"):
                run["speedup_vs_1"] = run["tokens_per_s"] / one["tokens_per_s"]
    qm.unload()
    return runs


def fsdp(args, tmp, out, gpus_there):
    import torch

    import qlora_magic as qm

    n = min(max(args.gpus_list), gpus_there)
    if args.quick:  # the same steps on a 4-layer tiny model, with ddp: accelerate does not shard on the CPU
        shape, layers = {**TINY, "num_hidden_layers": 2}, 4
        full = checkpoint(tmp / "tiny-deep", {**TINY, "num_hidden_layers": layers}, "cpu")
    else:
        folder = Path(args.fsdp_dir or tmp / "llama-70b-width")
        layers = disk_layers(folder, LLAMA_70B_WIDTH, args.fsdp_layers)
        log(f"FSDP model: Llama-2-70B width, {layers} layers ({'the full 70B' if layers == 80 else 'fewer: disk'})")
        full = build_by_shards(folder, {**LLAMA_70B_WIDTH, "num_hidden_layers": layers})
        shape = {**LLAMA_70B_WIDTH, "num_hidden_layers": 2}
    small = checkpoint(tmp / "fsdp-session-model", shape, "cpu" if args.quick else "cuda")
    rows = text_rows(EFFECTIVE_BATCH * args.steps, shape["vocab_size"], args.max_length)
    device = "cpu" if args.quick else "cuda"
    torch.manual_seed(0)
    qm.load(str(small), bits=4, dropout=0.0, device=device)
    start = qm.save(tmp / "fsdp-start-adapter")
    qm.load(adapter=str(start))
    options = dict(prompt=PROMPT, response=RESPONSE, max_length=args.max_length, max_steps=args.steps,
                   batch_size=args.batch_size, grad_accum=EFFECTIVE_BATCH // args.batch_size, seed=0, display="none",
                   checkpoint_minutes=0, output_dir=str(tmp / "runs"), warmup=0.0,
                   **({"processes": n} if args.quick else {"gpus": n, "strategy": "fsdp"}))
    result = {"workers": n, "strategy": "ddp (--quick: CPU)" if args.quick else "fsdp", "layers": layers,
              "hidden": shape["hidden_size"]}
    try:
        from qlora_magic.tasks import multi_process

        config = qm.config.TrainConfig(data=rows, **options)
        if not args.quick:  # where the workers load: "host" is the path of weights larger than one GPU
            import os

            os.environ[multi_process.HOST_LOAD] = args.fsdp_load
        written = multi_process.write_workers_run(qm.get_session(), config)
        result["load"] = written.folder.record["launch"].get("load")
        record = written.folder.record
        # The workers load the full-depth checkpoint: the session's 2-layer model only wrote the run folder.
        record["load_config"]["model"] = str(full)
        written.folder.write_record(record)
        _retarget_start(written.folder.path / multi_process.START_ADAPTER, full, layers)
        started = time.perf_counter()
        summary = multi_process.follow_workers(written.folder, written.launch, qm.display.choose_reporter("none"))
        steps = [row for row in summary.history if "loss" in row]
        speeds = [row["tokens_per_second"] for row in steps[1:] if row.get("tokens_per_second")]
        result.update(ok=True, status=summary.status, steps=summary.steps_done, wall_s=round(time.perf_counter() - started, 1),
                      tokens_per_s=sum(speeds) / len(speeds) if speeds else None,
                      peak_rank0_gb=rank0_peak_gb(written.folder.path, steps),
                      sharded_modules=sharded_modules(written.folder.path),
                      losses=[row["loss"] for row in steps], settings={k: str(v) for k, v in summary.settings.items()},
                      run_dir=str(written.folder.path))
    except Exception as error:  # noqa: BLE001
        traceback.print_exc()
        result.update(ok=False, error=(str(error).splitlines() or [type(error).__name__])[0])
    qm.unload()
    return result


def _retarget_start(adapter: Path, model: Path, layers: int):
    """The start adapter, made for the full model: its base named as `model`, and LoRA weights (zero B, the
    A of layer 0 and 1 repeated) for all `layers` layers, so the workers load it onto the deep checkpoint."""
    import re

    from safetensors.torch import load_file, save_file

    config_file = adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = str(model)
    config_file.write_text(json.dumps(config, indent=2))
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    deep = {}
    for name, tensor in weights.items():
        match = re.search(r"\.layers\.(\d+)\.", name)
        if not match:
            deep[name] = tensor
            continue
        for layer in range(int(match[1]), layers, 2):
            deep[name.replace(f".layers.{match[1]}.", f".layers.{layer}.")] = tensor.clone()
    save_file(deep, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    run_file = adapter / "qlora_magic.json"
    record = json.loads(run_file.read_text())
    record["load_config"]["model"] = str(model)
    record.pop("base_check", None)
    run_file.write_text(json.dumps(record, indent=2))


def report(env, runs, fsdp_result, args) -> str:
    lines = [f"# Past one GPU: DDP scaling and FSDP ({env['device']}, {env['date']})", "",
             f"Effective batch {EFFECTIVE_BATCH}, {args.steps} steps, max_length {args.max_length}, 4-bit, LoRA r=8 q/v, "
             f"dropout 0, seed 0; model {'tiny random (CPU, --quick)' if args.quick else 'Llama-2-7B shape, random weights'}.", "",
             "| run | status | batch/rank | tokens/s | x 1 GPU | s/step | wall s | rank-0 peak GB | max loss diff vs 1 / in-kernel |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        name = "in-kernel" if not run["workers"] else f"{run['workers']} {'proc' if args.quick else 'GPU'} {run['strategy']}"
        name += " --unload" if run.get("unload") else ""
        if not run["ok"]:
            lines.append(f"| {name} | failed: {run['error']} | | | | | | | |")
            continue
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        lines.append(f"| {name} | {run['status']} {run['steps']} | {run['settings'].get('batch')} | {fmt(run['tokens_per_s'], ',.0f')} | "
                     f"{fmt(run.get('speedup_vs_1'), '.2f')} | {fmt(run['s_per_step'], '.2f')} | {run['wall_s']} | "
                     f"{run['peak_rank0_gb']:.1f} | {fmt(run.get('max_loss_diff_vs_1'), '.2e')} / {fmt(run.get('max_loss_diff_vs_in_kernel'), '.2e')} |")
    for run in runs:
        if run.get("unload") and run["ok"]:
            lines.append(f"\n--unload: the kernel's GPU memory (allocated, reserved GB) {run.get('kernel_gb_before')} before the "
                         f"run, {run.get('kernel_gb_lowest_while_workers')} at its lowest while the workers trained; "
                         f"the model loaded back in {run.get('reload_s')} s.")
    if fsdp_result:
        lines += ["", "## FSDP", "", "```", json.dumps({k: v for k, v in fsdp_result.items() if k != "losses"}, indent=1, default=str),
                  "```", f"losses: {fsdp_result.get('losses')}"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="CPU: a tiny random Llama, --processes workers (gloo)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 20; 3 with --quick)")
    parser.add_argument("--batch-size", type=int, default=None, help="micro-batch asked for (default 4; 2 with --quick)")
    parser.add_argument("--max-length", type=int, default=None, help="default 512; 48 with --quick")
    parser.add_argument("--gpus-list", default="1,2", help="worker counts to compare (those above the GPUs there are skipped)")
    parser.add_argument("--skip-fsdp", action="store_true")
    parser.add_argument("--unload", action="store_true",
                        help="also the first worker count with --unload: the kernel's memory meanwhile, the reload time")
    parser.add_argument("--skip-ddp", action="store_true", help="only the FSDP run")
    parser.add_argument("--fsdp-layers", type=int, default=80, help="layers of the 70B-width model (fewer if the disk is short)")
    parser.add_argument("--fsdp-load", choices=("host", "gpu"), default="host",
                        help="FSDP workers load the model into CPU memory and shard it onto the GPUs (host: what a model "
                             "larger than one GPU takes), or whole onto each GPU first (gpu)")
    parser.add_argument("--fsdp-dir", default=None, help="where to build (or find) the 70B-width checkpoint")
    parser.add_argument("--tmp", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    args.steps = args.steps or (3 if args.quick else 20)
    args.batch_size = args.batch_size or (2 if args.quick else 4)
    args.max_length = args.max_length or (48 if args.quick else 512)
    args.gpus_list = [int(n) for n in str(args.gpus_list).split(",") if n.strip()]
    import torch

    gpus_there = 2 if args.quick else torch.cuda.device_count()
    if not args.quick and gpus_there == 0:
        parser.error("no CUDA GPU here: use --quick for the CPU check")
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.tmp or Path(tempfile.mkdtemp(prefix="qlora-multi-gpu-"))
    env = environment()
    log(f"multi_gpu: {env['device']} x{gpus_there}, scratch {tmp}")
    runs = [] if args.skip_ddp else scaling(args, tmp, args.out, gpus_there)
    fsdp_result = None if args.skip_fsdp else fsdp(args, tmp, args.out, gpus_there)
    text = report(env, runs, fsdp_result, args)
    (args.out / "results.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps({"env": env, "args": {k: str(v) for k, v in vars(args).items()},
                                                       "ddp": runs, "fsdp": fsdp_result}, indent=1, default=str))
    log(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
