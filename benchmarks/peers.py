"""qlora_magic beside Unsloth on the same GPU, model, data and effective batch: tokens/s and peak memory, for a
Pareto comparison (issue 12). Unsloth patches transformers when imported, so each side runs in its own process:

    python benchmarks/peers.py --side unsloth     # Unsloth rows (needs Unsloth: ../shared/tools/unsloth-site.sh)
    python benchmarks/peers.py --side ours        # qlora_magic's default, and --max-memory at each Unsloth peak
    python benchmarks/peers.py --side ours --model quick   # CPU: checks the script (no Unsloth there)

On the GPU machine, in one lease (Unsloth's own network switched off):

    mkdir -p /tmp/usite && tar xzf .devsite/unsloth.tar.gz -C /tmp/usite
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 \\
      PYTHONPATH=/tmp/usite:$PWD/.devsite/site:$PWD python benchmarks/peers.py --side unsloth --out $OUT
    PYTHONPATH=$PWD/.devsite/site:$PWD python benchmarks/peers.py --side ours --out $OUT

The planner's estimate against real peaks on the smallest budgets' layout (16x1, checkpoints in CPU memory), token
caps forced, compiled and not (results/2026-12-04-h200/caps.md; use --warmup 4 with compiling, so recompiles for
a new layout's shapes stay out of the timed steps):

    python benchmarks/peers.py --side ours --budgets-only --budgets 4.7 --caps 512 1024 2048 4096 --compile both --out $OUT

The data is gpu_speed.py's (instruction-like rows of 24-512 tokens, the prompt masked), the model its random
Llama-2-7B shape (--model llama3-8b: the GQA, 128k-vocabulary shape), LoRA r=8 alpha 32 on q/v (--targets
all: every linear layer), effective batch 16. Unsloth's rows: its defaults (4x4 padded, its offloaded
checkpointing), 16x1 padding-free with and without its checkpointing; each the first run after loading and a
second (warm) one. Unsloth's padding-free rows use transformers' flattening collator (position ids restart per
example), as qlora_magic packs. Writes peers.md / peers.json to --out; the ours side reads Unsloth's peaks from
there to set its --max-memory rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

EFFECTIVE = 16
SHAPES = {"llama7b": "LLAMA_7B", "quick": "QUICK"}
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def shape_of(name):
    import gpu_speed

    return LLAMA3_8B if name == "llama3-8b" else getattr(gpu_speed, SHAPES[name])


def row_text(row):
    if "error" in row:
        return f"| {row['side']} | {row['recipe']} | failed: {row['error']} | | | |"
    return (f"| {row['side']} | {row['recipe']} | {row['s_step']:.2f} | {row['tok_s']:,.0f} | {row['peak'] / 2**30:.1f} | "
            f"{row.get('settings', '')} |")


def save(out, rows, header):
    lines = [header, "", "| side | recipe | s/step | real tok/s | peak GiB | settings |", "| --- " * 6 + "|"]
    lines += [row_text(r) for r in rows]
    (out / "peers.md").write_text("\n".join(lines) + "\n")
    (out / "peers.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1, default=str))


def load_rows_file(out):
    path = out / "peers.json"
    return json.loads(path.read_text())["rows"] if path.exists() else []


def unsloth_side(args, path, rows, out, results, header):
    """Unsloth's rows: loaded once with its checkpointing, once without."""
    import torch
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening, Trainer, TrainingArguments
    from unsloth import FastLanguageModel

    from gpu_speed import as_dataset, peak_bytes, reset_peak, step_timer

    targets = ALL_LINEAR if args.targets == "all" else ["q_proj", "v_proj"]

    def load(checkpointing):
        model, tokenizer = FastLanguageModel.from_pretrained(model_name=path, max_seq_length=512, load_in_4bit=True,
                                                             dtype=None)
        model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=32, lora_dropout=0, target_modules=targets,
                                                 bias="none", use_gradient_checkpointing=checkpointing, random_state=0)
        return model, tokenizer

    def train(model, tokenizer, label, micro, padding_free):
        collator = (DataCollatorWithFlattening(return_position_ids=True, separator_id=-100) if padding_free
                    else DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding="longest"))
        timer = step_timer()
        trainer_args = TrainingArguments(
            output_dir="/tmp/peers-unsloth", max_steps=args.warmup + args.steps, per_device_train_batch_size=micro,
            gradient_accumulation_steps=EFFECTIVE // micro, learning_rate=2e-4, bf16=True, logging_steps=1,
            save_strategy="no", report_to="none", disable_tqdm=True, include_num_input_tokens_seen="non_padding",
            remove_unused_columns=False, optim="adamw_torch_fused", log_level="error")
        reset_peak()
        row = {"side": "unsloth", "recipe": label, "settings": f"{micro}x{EFFECTIVE // micro}, r=8 {args.targets}"}
        try:
            Trainer(model=model, args=trainer_args, train_dataset=as_dataset(rows), data_collator=collator,
                    callbacks=[timer]).train()
            row["s_step"], row["tok_s"] = timer.result(args.warmup)
            row["peak"] = peak_bytes()
        except Exception as error:  # noqa: BLE001 - one failed variant must not lose the others
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        results.append(row)
        print(row_text(row), flush=True)
        save(out, results, header)

    model, tokenizer = load("unsloth")
    train(model, tokenizer, "defaults: 4x4 padded, its checkpointing, first run", 4, False)
    train(model, tokenizer, "defaults: 4x4 padded, its checkpointing, second run", 4, False)
    train(model, tokenizer, "16x1 padding-free, its checkpointing", 16, True)
    del model
    torch.cuda.empty_cache()
    model, tokenizer = load(False)
    train(model, tokenizer, "16x1 padding-free, no checkpointing, first run", 16, True)
    train(model, tokenizer, "16x1 padding-free, no checkpointing, second run", 16, True)


def ours_side(args, path, rows, out, results, header):
    """qlora_magic's default (first and second run), then --max-memory at each Unsloth peak measured."""
    import torch

    import gpu_speed
    import qlora_magic
    from gpu_speed import guarded, load_ours, ours
    from qlora_magic.engine import speed

    if args.headroom_min is not None:  # the planner's fragmentation floor, to measure what smaller budgets need
        speed.HEADROOM_MIN = int(args.headroom_min * 2**20)

    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="peers-ours-"))
    targets = ",".join(ALL_LINEAR) if args.targets == "all" else None
    qlora_magic.reset_session()
    if targets:
        qlora_magic.load(path, bits=4, targets=targets)
    else:
        load_ours(path, 4)
    peaks = sorted({round(r["peak"] / 2**30, 1) for r in results if r["side"] == "unsloth" and "peak" in r})
    budgets = [(gib, "an Unsloth peak") for gib in peaks] + [(gib, "asked") for gib in args.budgets if gib not in peaks]
    variants = [] if args.budgets_only else [("--bits 4 (defaults), first run after loading", None),
                                             ("--bits 4 (defaults), second run", None)]
    variants += [(f"--bits 4 --max-memory {gib}GiB ({why})", f"{gib}GiB") for gib, why in sorted(budgets)]
    # A timed run is far below the 500 steps that turn compiling on by default: --compile decides it here.
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    variants = [(label + (", compiled" if compiled else ""), budget, compiled)
                for compiled in compiles for label, budget in variants]
    # --caps: the smallest budgets' layout forced (16x1, every layer checkpointed into CPU memory) with each token
    # cap and no budget: the real peaks that calibrate the planner's estimate, also where it refuses.
    small = {"batch": "16x1", "gradient_checkpointing": True, "offload_checkpoints": True}
    variants = [(label, budget, compiled, None) for label, budget, compiled in variants]
    variants += [(f"--bits 4, 16x1 offloaded, cap forced to {cap}" + (", compiled" if compiled else ""),
                  None, compiled, {**small, "max_tokens": cap})
                 for compiled in compiles for cap in args.caps]
    for label, budget, compiled, overrides in variants:
        mine = []
        in_use = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        row = guarded(mine, ours, rows, args.steps, args.warmup, tmp, label, max_memory=budget,
                      config_values={"compile": compiled}, overrides=overrides)
        row["side"], row["in_use"] = "qlora_magic", in_use
        if "peak" in row and torch.cuda.is_available():  # what a real cap of the process has to hold
            row["settings"] += (f", peak reserved {torch.cuda.max_memory_reserved() / 2**30:.2f} GiB, "
                                f"allocated before {in_use / 2**30:.2f} GiB")
        results.append(row)
        print(row_text(row), flush=True)
        save(out, results, header)
    gpu_speed.free_model()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=["unsloth", "ours"], required=True)
    parser.add_argument("--model", choices=["llama7b", "llama3-8b", "quick"], default="llama7b")
    parser.add_argument("--targets", choices=["qv", "all"], default="qv")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--compile", choices=["off", "on", "both"], default="both",
                        help="ours: the regional compile (--compile) off, on, or each variant both ways")
    parser.add_argument("--budgets", type=float, nargs="*", default=[],
                        help="ours: more --max-memory budgets (GiB) besides Unsloth's measured peaks")
    parser.add_argument("--budgets-only", action="store_true", help="ours: only the --max-memory rows")
    parser.add_argument("--caps", type=int, nargs="*", default=[],
                        help="ours: token caps to force on the 16x1 offloaded layout (no budget)")
    parser.add_argument("--headroom-min", type=float, default=None,
                        help="ours: the planner's headroom floor in MiB (default speed.HEADROOM_MIN, 256)")
    args = parser.parse_args(argv)
    if args.side == "unsloth":
        import unsloth  # noqa: F401 - first, before transformers: it patches it on import
    import shutil

    import torch

    from gpu_speed import build_random_checkpoint, environment, synthetic_rows

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = shape_of(args.model)
    shm = Path("/dev/shm") if device == "cuda" and shutil.disk_usage("/dev/shm").free > 20 * 2**30 else Path("/tmp")
    path = str(build_random_checkpoint(shm / f"random-peers-{args.model}", shape, device))
    rows = synthetic_rows(EFFECTIVE * (args.warmup + args.steps + 2), shape["vocab_size"])
    env = environment()
    results = load_rows_file(out)
    header = (f"{env['date']} · {env['device']} · torch {env['torch']} · transformers {env['transformers']} · peft "
              f"{env['peft']} · bitsandbytes {env['bitsandbytes']} · model {args.model} (random weights) · LoRA r=8 "
              f"{args.targets} · effective batch {EFFECTIVE} · {args.warmup} warm-up + {args.steps} timed steps")
    if args.side == "unsloth":
        import unsloth

        header += f" · unsloth {getattr(unsloth, '__version__', '?')}"
        results = [r for r in results if r["side"] != "unsloth"]
        unsloth_side(args, path, rows, out, results, header)
    else:
        results = [r for r in results if r["side"] != "qlora_magic"]
        ours_side(args, path, rows, out, results, header)
    print("\n" + (out / "peers.md").read_text())


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"{time.perf_counter() - started:.0f} s")
