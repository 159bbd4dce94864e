"""The speed settings: the batch layout chosen from memory, and packing computing the same loss as padding."""

import pytest

import qlora_magic
from qlora_magic.config import TrainConfig
from qlora_magic.errors import ConfigError
from qlora_magic.config import parse_memory
from qlora_magic.engine.speed import GiB, BatchLayout, BatchPlan, activation_bytes, plan_batches, plan_fits, workspace_bytes

LLAMA_7B = {"hidden": 4096, "intermediate": 11008, "layers": 32, "vocab": 32000}
LENGTHS = [180] * 900 + [512] * 100  # instruction data: most short, some cut at max_length
IN_USE = {4: int(3.61 * GiB), 8: int(6.54 * GiB)}  # a 7B model during a run (bf16 stream), NF4 and LLM.int8
LORA_Q_V = 4_194_304
# Peaks measured on an H200 (docs/benchmarks.md), minus the model: (checkpointing, chunked loss, tokens of the
# largest micro-batch the run saw, GiB). bf16 stream, packed; 8,192 tokens: every example at max length 512.
MEASURED = [(False, False, 4138, 21.99), (False, False, 4138, 21.89), (False, True, 4138, 20.69),
            (False, True, 8192, 43.09), (True, False, 4055, 2.66), (True, False, 2563, 1.69),
            (True, False, 1699, 1.16), (True, True, 8192, 4.09), (True, True, 4096, 2.06),
            (True, True, 2563, 1.36), (True, True, 4138, 2.09)]


def test_parse_memory_reads_decimal_units_and_binary_only_with_an_i():
    """As readouts show memory (gb()) and accelerate reads max_memory: GB = 1e9 bytes, GiB = 2**30."""
    assert parse_memory("10GB") == 10 * 10**9
    assert parse_memory("10 gb") == 10 * 10**9
    assert parse_memory("10 GiB") == 10 * GiB
    assert parse_memory("1.5GiB") == int(1.5 * GiB)
    assert parse_memory("512MB") == 512 * 10**6
    assert parse_memory("512MiB") == 512 * 1024**2
    assert parse_memory("2T") == 2 * 10**12
    assert parse_memory("10") == parse_memory(10) == 10 * 10**9  # a bare number is GiB
    assert parse_memory(24) == 24 * 10**9
    assert parse_memory(0.5) == 500 * 10**6
    assert parse_memory(20 * 10**9) == 20 * 10**9  # a byte count
    assert parse_memory(None) is None and parse_memory("auto") is None
    for bad in ("ten gigs", "10XB", "10iB", "-1GB"):
        with pytest.raises(ConfigError, match="10GB, 10GiB or 512MB"):
            parse_memory(bad)
    with pytest.raises(ConfigError, match="max-memory"):
        TrainConfig(max_memory="lots")


def test_memory_readouts_and_budgets_use_one_decimal_convention():
    from qlora_magic.display.formatting import gb

    assert gb(parse_memory("10GB")) == "10.00 GB"
    assert gb(parse_memory("512MB")) == "512.0 MB"
    assert gb(parse_memory("10GiB")) == "10.74 GB"
    assert gb(None) == "-"


def test_batch_layout_reads_as_micro_x_accum():
    layout = BatchLayout(4, 4)
    assert str(layout) == "4x4" and f"batch={layout}" == "batch=4x4"
    assert BatchLayout.of("16x1") == BatchLayout(16, 1) and BatchLayout.of(" 2 x 8 ") == BatchLayout(2, 8)
    assert BatchLayout.of(layout) is layout
    for bad in ("4", "0x4", "4x0", "four by four", "4x4x4", None):
        with pytest.raises(ConfigError, match="like '4x4'"):
            BatchLayout.of(bad)


@pytest.mark.parametrize("budget_gb", [10, 24, 40, 80, 140])
def test_plan_keeps_the_effective_batch_and_fits_the_budget(budget_gb):
    in_use = int(3.9 * GiB)  # a 7B model in NF4
    plan = plan_batches(16, LENGTHS, True, LLAMA_7B, budget_gb * GiB, in_use, trainable=4_194_304)
    assert plan.layout.micro * plan.layout.accum == 16
    assert plan.estimate <= budget_gb * GiB


def test_plan_prefers_one_big_micro_batch_without_checkpointing_when_memory_allows():
    plan = plan_batches(16, LENGTHS, True, LLAMA_7B, 140 * GiB, int(3.9 * GiB))
    assert (plan.layout, plan.checkpointing) == (BatchLayout(16, 1), False)


def test_plan_checkpoints_on_a_small_budget():
    plan = plan_batches(16, LENGTHS, True, LLAMA_7B, 10 * GiB, int(3.9 * GiB))
    assert plan.checkpointing is True


def test_plan_respects_fixed_checkpointing():
    plan = plan_batches(16, LENGTHS, True, LLAMA_7B, 10 * GiB, int(3.9 * GiB), checkpointing=False)
    assert plan.checkpointing is False and plan.layout.micro < 16


def test_plan_on_the_cpu_is_one_micro_batch():
    assert plan_batches(16, LENGTHS, True, LLAMA_7B, None, 0) == BatchPlan(BatchLayout(16, 1), checkpointing=False, estimate=None)


def test_packing_estimate_is_below_padding():
    few_long = [180] * 995 + [512] * 5  # packing's worst case is the 16 longest examples together
    packed = plan_batches(16, few_long, True, LLAMA_7B, 140 * GiB, 0).estimate
    padded = plan_batches(16, few_long, False, LLAMA_7B, 140 * GiB, 0).estimate
    assert packed < padded
    assert activation_bytes(LLAMA_7B, 1000, True) < activation_bytes(LLAMA_7B, 1000, False) / 5


@pytest.mark.parametrize("checkpointing, chunked_loss, tokens, measured_gb", MEASURED)
def test_activation_estimate_is_calibrated_on_the_measured_peaks(checkpointing, chunked_loss, tokens, measured_gb):
    """Never below what was measured, and not far above it."""
    estimate = (activation_bytes(LLAMA_7B, tokens, checkpointing, chunked_loss) + workspace_bytes(LLAMA_7B)) / GiB
    assert measured_gb <= estimate <= 1.2 * measured_gb


# 16x1 with every layer checkpointed into CPU memory and the token cap forced (H200, 2026-12-04,
# benchmarks/peers.py --caps; results/2026-12-04-h200/caps.md): (compiled, cap, peak GB of the whole process).
# The model held 3.883 GB before its first run (cuBLAS's workspace comes with the first matmul).
OFFLOADED_PEAKS = [(False, 512, 4.210), (False, 1024, 4.325), (False, 1536, 4.441), (False, 2048, 4.559),
                   (False, 3072, 4.800), (False, 4096, 5.047), (True, 512, 4.223), (True, 1024, 4.277),
                   (True, 1536, 4.373), (True, 2048, 4.470), (True, 3072, 4.668), (True, 4096, 4.873)]


@pytest.mark.parametrize("compiled, cap, peak_gb", OFFLOADED_PEAKS)
def test_offloaded_estimate_is_at_or_above_the_peak_measured_compiled_or_not(compiled, cap, peak_gb):
    """The smallest budgets' layout: never under the measured peak, and within 0.5 GB of it. At a budget that
    only the offloaded layout fits, the planner takes it with exactly that estimate."""
    from qlora_magic.engine.speed import headroom

    in_use = int(3.883e9)
    forced = (in_use + 16 * LORA_Q_V + workspace_bytes(LLAMA_7B)
              + activation_bytes(LLAMA_7B, cap, True, True, cap * cap, offload=True, compiled=compiled))
    budget = forced + headroom(forced, in_use, 10**15)
    plan = plan_batches(16, [cap // 16] * 16, True, LLAMA_7B, budget, in_use, LORA_Q_V, checkpointing=True,
                        chunked_loss=True, host_budget=10**12, compiled=compiled)
    assert (plan.layout, plan.offload) == (BatchLayout(16, 1), True)
    assert plan.estimate >= forced - 1  # the planner adds what activation_bytes says
    assert plan.estimate == forced
    assert peak_gb * 1e9 <= forced <= (peak_gb + 0.5) * 1e9


def test_a_compiled_run_at_the_smallest_budget_takes_longer_forwards():
    """4.7 GiB on the 4-bit 7B, a second run in the kernel (cuBLAS's workspace held): uncompiled a 1,536-token cap
    (measured 3,783 tok/s compiled at that cap), compiled 2,048 (5,491 tok/s, peak reserved 4.67 GB of the 5.05):
    the compiled recompute keeps less."""
    budget, in_use = int(4.7 * GiB), int(3.950e9)
    lengths = list(range(24, 513, 8)) * 4  # benchmarks/gpu_speed.py's rows: 24-512 tokens
    plain = plan_batches(16, lengths, True, LLAMA_7B, budget, in_use, LORA_Q_V, chunked_loss=True, host_budget=10**12)
    compiled = plan_batches(16, lengths, True, LLAMA_7B, budget, in_use, LORA_Q_V, chunked_loss=True,
                            host_budget=10**12, compiled=True)
    assert (plain.layout, plain.offload, plain.max_tokens) == (BatchLayout(16, 1), True, 1536)
    assert (compiled.layout, compiled.offload, compiled.max_tokens) == (BatchLayout(16, 1), True, 2048)
    assert plan_fits(compiled, budget) and compiled.estimate >= 4.470e9


PLANS = [  # bits, budget GiB, data, (micro, accum, checkpointing, checkpointed layers, token cap)
    (4, 10, "mixed", (16, 1, True, 28, 5120)), (4, 10, "512", (16, 1, True, 30, None)),
    (4, 24, "mixed", (16, 1, True, 10, 4608)), (4, 24, "512", (16, 1, True, 22, None)),
    (4, 80, "mixed", (16, 1, False, None, None)), (4, 80, "512", (16, 1, False, None, None)),
    (8, 10, "mixed", (16, 1, True, None, 5120)), (8, 10, "512", (16, 1, True, 30, 4096)),
    (8, 24, "mixed", (16, 1, True, 14, 4608)), (8, 24, "512", (16, 1, True, 24, None)),
    (8, 80, "mixed", (16, 1, False, None, None)), (8, 80, "512", (16, 1, False, None, None)),
]


@pytest.mark.parametrize("bits, budget_gb, data, plan", PLANS)
def test_plans_are_the_layouts_measured_on_the_gpu(bits, budget_gb, data, plan):
    """The plans of benchmarks/memory_shapes.py's and peers.py's rows (docs/benchmarks.md); a change of constants
    that moves them needs a new run."""
    lengths = LENGTHS if data == "mixed" else [512] * 64
    chosen = plan_batches(16, lengths, True, LLAMA_7B, budget_gb * GiB, IN_USE[bits], LORA_Q_V, chunked_loss=True)
    assert (chosen.layout.micro, chosen.layout.accum, chosen.checkpointing, chosen.checkpointed_layers,
            chosen.max_tokens) == plan
    assert plan_fits(chosen, budget_gb * GiB)


def test_packed_attention_mask_grows_with_the_square_of_the_micro_batch():
    short = activation_bytes(LLAMA_7B, 4096, False, True)
    long = activation_bytes(LLAMA_7B, 8192, False, True)
    assert long > 2 * short  # measured 5.37 MB/token at 4,138 tokens, 5.65 at 8,192
    padded = activation_bytes(LLAMA_7B, 8192, False, True, mask_pairs=16 * 512 * 512)
    assert padded < long


def test_chunked_loss_estimate_drops_the_logits():
    for checkpointing in (False, True):
        assert activation_bytes(LLAMA_7B, 4096, checkpointing, chunked_loss=True) < activation_bytes(LLAMA_7B, 4096, checkpointing)
    # with checkpointing the logits were two thirds of the activations
    assert activation_bytes(LLAMA_7B, 4096, True, chunked_loss=True) < 0.8 * activation_bytes(LLAMA_7B, 4096, True)


def test_8bit_on_a_10gb_budget_takes_one_micro_batch_capped_by_tokens():
    """The budget mode for 8-bit (docs/benchmarks.md): 4x4 at first, then 8x2 (which fit the worst micro-batch);
    now 16 examples a forward, the rare micro-batch over 5,120 tokens trained in two."""
    plan = plan_batches(16, LENGTHS, True, LLAMA_7B, 10 * GiB, IN_USE[8], LORA_Q_V, chunked_loss=True)
    assert (plan.layout, plan.checkpointing, plan.max_tokens) == (BatchLayout(16, 1), True, 5120)
    assert plan_fits(plan, 10 * GiB)
    # 4-bit on the same budget: one micro-batch of 16, most layers checkpointed
    plan = plan_batches(16, LENGTHS, True, LLAMA_7B, 10 * GiB, IN_USE[4], LORA_Q_V, chunked_loss=True)
    assert (plan.layout.micro, plan.checkpointing) == (16, True)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("card_gb", [24, 80])
@pytest.mark.parametrize("chunked_loss", [True, False])
def test_automatic_plan_fits_a_card_even_when_every_example_is_max_length(bits, card_gb, chunked_loss):
    """7B at max length 512: the worst case packs 16 x 512 tokens into one micro-batch. The GPU run checks
    the same with the process's memory capped (benchmarks/gpu_speed.py, 'worst case' rows)."""
    plan = plan_batches(16, [512] * 64, True, LLAMA_7B, card_gb * GiB, IN_USE[bits], LORA_Q_V, chunked_loss=chunked_loss)
    assert plan_fits(plan, card_gb * GiB)
    assert plan.layout.micro * plan.layout.accum == 16
    if card_gb == 80:
        assert (plan.layout.micro, plan.checkpointing) == (16, False)


def _tokenized(tiny_model_dir, n=8):
    from transformers import AutoTokenizer

    from qlora_magic.engine.data import ExampleTokenizer
    from tiny_model import toy_rows

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = ExampleTokenizer(tokenizer, "Q: {question} ", "{answer}")
    rows = [examples(r) for r in toy_rows(n)]
    rows[1] = {k: v + v[:7] for k, v in rows[1].items()}  # lengths differ, so padding happens
    return tokenizer, rows


def test_packed_batch_has_the_padded_loss(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_magic.engine.data import make_collator
    from qlora_magic.engine.speed import no_kv_cache

    tokenizer, rows = _tokenized(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.train()  # the training forward; dropout is 0 in this model
    padded = make_collator(tokenizer, packing=False)([dict(r) for r in rows])
    packed = make_collator(tokenizer, packing=True)([dict(r) for r in rows])
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    with torch.no_grad(), no_kv_cache(model):
        assert model(**packed).loss.item() == pytest.approx(model(**padded).loss.item(), rel=1e-5)
    assert model.config.use_cache is True  # restored


def test_packed_batch_rounded_up_keeps_the_loss(tiny_model_dir):
    """The pad segment that rounds a packed batch's length is its own example with no labels."""
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_magic.engine.data import make_collator, packed_real_tokens
    from qlora_magic.engine.speed import no_kv_cache

    tokenizer, rows = _tokenized(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).train()
    packed = make_collator(tokenizer, packing=True)([dict(r) for r in rows])
    rounded = make_collator(tokenizer, packing=True, pad_to_multiple_of=64)([dict(r) for r in rows])
    length = packed["input_ids"].shape[1]
    assert length % 64 and rounded["input_ids"].shape[1] == length + (-length % 64)
    assert rounded["position_ids"][0, length].item() == 0  # the pad segment starts a sequence of its own
    # Tokens per second count real tokens only: the pad segment is found and left out.
    assert packed_real_tokens(rounded, tokenizer.pad_token_id) == length == packed_real_tokens(packed, tokenizer.pad_token_id)
    with torch.no_grad(), no_kv_cache(model):
        assert model(**rounded).loss.item() == pytest.approx(model(**packed).loss.item(), rel=1e-5)


def test_a_lone_example_is_rounded_up_as_one_causal_sequence(tiny_model_dir):
    """One example per micro-batch (long context): the pad continues it, so attention needs no mask; the
    loss and the real-token count are the example's own."""
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_magic.engine.data import make_collator, packed_real_tokens
    from qlora_magic.engine.speed import no_kv_cache

    tokenizer, rows = _tokenized(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).train()
    alone = make_collator(tokenizer, packing=True)([dict(rows[1])])
    rounded = make_collator(tokenizer, packing=True, pad_to_multiple_of=64)([dict(rows[1])])
    length = alone["input_ids"].shape[1]
    assert length % 64 and rounded["input_ids"].shape[1] == length + (-length % 64)
    assert rounded["position_ids"][0].tolist() == list(range(rounded["input_ids"].shape[1]))  # one sequence
    assert packed_real_tokens(rounded, tokenizer.pad_token_id) == length == packed_real_tokens(alone, tokenizer.pad_token_id)
    with torch.no_grad(), no_kv_cache(model):
        assert model(**rounded).loss.item() == pytest.approx(model(**alone).loss.item(), rel=1e-5)
        logits = model(**rounded).logits[0, :length]
        assert torch.allclose(logits, model(**alone).logits[0], atol=1e-5)  # nothing before the pad sees it


def test_rounded_packing_trains_the_same_and_counts_real_tokens(tiny_model_dir, rows, tmp_path):
    """A real run with the GPU's rounding forced on the CPU: same losses, same tokens counted."""
    from transformers import TrainerCallback

    from qlora_magic.config import TrainConfig
    from qlora_magic.engine.data import ExampleTokenizer, load_rows, prepare_datasets
    from qlora_magic.display.reporters import NullReporter
    from qlora_magic.engine.training import TrainingData, run_training

    class Tokens(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            self.seen = state.num_input_tokens_seen

    results = {}
    for multiple in (1, 64):
        qlora_magic.load(tiny_model_dir, bits=8)
        session = qlora_magic.get_session()
        config = TrainConfig(max_steps=2, output_dir=str(tmp_path / str(multiple)), display="none")
        train_set, _, _ = prepare_datasets(load_rows(rows), ExampleTokenizer(session.tokenizer, "Q: {question} ", "{answer}"))
        tokens = Tokens()
        summary = run_training(session.model, session.tokenizer, config, TrainingData(train_set), NullReporter(),
                               overrides={"packing": True, "pad_packed_to": multiple}, callbacks=[tokens])
        results[multiple] = (summary.train_loss, tokens.seen)
    assert results[64][1] == results[1][1] > 0
    assert results[64][0] == pytest.approx(results[1][0], rel=1e-4)


def test_training_packed_and_padded_take_the_same_first_step(tiny_model_dir, rows):
    """End to end on the real (8-bit, CPU) path: the first logged loss is the same batch's loss."""
    losses = {}
    for packing in (True, False):
        qlora_magic.load(tiny_model_dir, bits=8)
        summary = qlora_magic.train(rows, prompt="Q: {question} ", response="{answer}", max_steps=1,
                                    packing=packing, display="none")
        assert summary.settings["packing"] is packing
        assert summary.settings["batch"] == BatchLayout(4, 4)  # the CPU keeps the layout asked for
        losses[packing] = summary.train_loss[0]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_default_train_settings_show_in_the_readout(tiny_loaded, rows):
    summary = qlora_magic.train(rows, prompt="Q: {question} ", response="{answer}", max_steps=1, display="none")
    settings = dict(summary.rows())["settings"]
    # On the CPU: the layout asked for, no packing (neither paid there); the GPU's are in test_gpu.py.
    assert "packing=False" in settings and "batch=4x4" in settings and "effective_batch=16" in settings


@pytest.mark.parametrize("num_items", [None, 23])
def test_chunked_loss_equals_the_models_loss_and_gradients(tiny_model_dir, num_items):
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_magic.engine.speed import causal_lm_loss, hidden_states_as_logits, output_head

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    for param in model.parameters():
        param.requires_grad_(False)
    embeddings = model.get_input_embeddings().weight.requires_grad_(True)  # something upstream to train
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 37))
    labels = ids.clone()
    labels[:, :9] = -100  # the prompt
    labels[1, 30:] = -100  # padding
    model(input_ids=ids, labels=labels, use_cache=False, num_items_in_batch=num_items).loss.backward()
    reference, embeddings.grad = embeddings.grad.clone(), None
    expected = model(input_ids=ids, labels=labels, use_cache=False, num_items_in_batch=num_items).loss.item()
    head = output_head(model)
    with hidden_states_as_logits(model, head):
        hidden = model(input_ids=ids, use_cache=False).logits
    assert model.get_output_embeddings() is head  # put back
    loss = causal_lm_loss(hidden, head.weight, labels, num_items)
    loss.backward()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert torch.allclose(embeddings.grad, reference, atol=1e-6)


def test_chunked_loss_gathers_a_head_fsdp_left_sharded(one_process_group):
    """Under FSDP2 the output head's weight can still be a sharded DTensor when the loss reads it: the loss
    gathers it whole (one gloo process here; a real run shards it over its ranks)."""
    import torch
    from torch.distributed.tensor import Shard, distribute_tensor

    from qlora_magic.engine.speed import causal_lm_loss

    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 9, 16), torch.randn(40, 16)
    labels = torch.randint(0, 40, (2, 9))
    sharded = distribute_tensor(weight, one_process_group, [Shard(0)])
    assert hasattr(sharded, "full_tensor")
    assert causal_lm_loss(hidden, sharded, labels).item() == pytest.approx(causal_lm_loss(hidden, weight, labels).item())


def test_chunked_loss_is_only_for_plain_frozen_heads(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_magic.engine.speed import output_head

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.get_output_embeddings().weight.requires_grad_(False)
    assert output_head(model) is model.get_output_embeddings()
    model.get_output_embeddings().weight.requires_grad_(True)  # a trained head needs its weight gradient
    assert output_head(model) is None
    model.get_output_embeddings().weight.requires_grad_(False)
    model.config.model_type = "gemma2"  # soft-capped logits: not lm_head(hidden) alone
    assert output_head(model) is None


def test_training_with_the_chunked_loss_takes_the_same_steps(tiny_model_dir, monkeypatch):
    """End to end on the real (8-bit, CPU) path, where it is off by default: forced on, the same training and
    eval losses, and the evaluation too never asks the model for its logits."""
    import datasets
    import torch

    from qlora_magic.config import TrainConfig
    from qlora_magic.display.reporters import NullReporter
    from qlora_magic.engine import speed
    from qlora_magic.engine.training import TrainingData, run_training

    _, rows = _tokenized(tiny_model_dir, n=20)
    calls = {"chunked": 0}
    chunked_loss = speed.causal_lm_loss

    def counted(*args, **kwargs):
        calls["chunked"] += 1
        return chunked_loss(*args, **kwargs)

    monkeypatch.setattr(speed, "causal_lm_loss", counted)
    losses, eval_losses = {}, {}
    for chunked in (False, True):
        torch.manual_seed(0)  # the same LoRA initialization
        qlora_magic.load(tiny_model_dir, bits=8)
        session = qlora_magic.get_session()
        config = TrainConfig(max_steps=3, batch_size=2, grad_accum=2, lr=2e-3, eval_steps=3, display="none")
        data = TrainingData(datasets.Dataset.from_list(rows[:16]), eval=datasets.Dataset.from_list(rows[16:]))
        before = calls["chunked"]
        summary = run_training(session.model, session.tokenizer, config, data,
                               NullReporter(), overrides={"chunked_loss": True} if chunked else None)
        assert summary.settings["chunked_loss"] is chunked  # off on the CPU unless forced
        losses[chunked] = [r["loss"] for r in summary.history if "loss" in r]
        eval_losses[chunked] = [r["eval_loss"] for r in summary.history if r.get("eval_loss") is not None]
        # 3 steps x 2 micro-batches, and 2 evaluations (before, after) x 2 eval batches of 2
        assert calls["chunked"] - before == (6 + 4 if chunked else 0)
    assert len(losses[True]) == 3 and len(eval_losses[True]) == 2
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    assert eval_losses[True] == pytest.approx(eval_losses[False], rel=1e-4)


# --- a budget that cannot be met is said before training, with the smallest one that works ----------------

LLAMA3_8B = {"hidden": 4096, "intermediate": 14336, "layers": 32, "vocab": 128256}


@pytest.mark.parametrize("in_use_gb, budget_gb", [(10.5, 10), (3.6, 4), (6.5, 6.8)])
def test_a_budget_too_small_fails_in_one_line_with_one_that_works(in_use_gb, budget_gb):
    from qlora_magic.engine.speed import check_budget, fits

    in_use, budget = int(in_use_gb * 1e9), int(budget_gb * 1e9)
    plan = plan_batches(16, LENGTHS, True, LLAMA3_8B, budget, in_use, LORA_Q_V, chunked_loss=True)
    assert not plan_fits(plan, budget)
    with pytest.raises(ConfigError) as error:
        check_budget(plan, budget, in_use, LENGTHS, given=True)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"--max-memory {budget_gb:.2f} GB is too small: the model")
    assert ("alone takes" in message) == (not fits(in_use, in_use, budget))  # the model leaves no headroom
    assert "--bits 4" in message and "(the longest example is 512 tokens)" in message
    offered = parse_memory(message.split("Give --max-memory ")[1].split(" or more")[0].replace(" ", ""))
    # The budget offered works: planned with it, the same data fits.
    assert plan_fits(plan_batches(16, LENGTHS, True, LLAMA3_8B, offered, in_use, LORA_Q_V, chunked_loss=True), offered)
    with pytest.raises(ConfigError, match="or lower --max-length \\(the longest example is 512 tokens\\)\\.$"):
        check_budget(plan, budget, in_use, LENGTHS, given=True, four_bit=True)  # already 4-bit: not offered again


def test_without_max_memory_an_over_budget_plan_runs_and_a_fitting_one_is_quiet():
    from qlora_magic.engine.speed import check_budget

    budget, in_use = int(10e9), int(10.5e9)
    plan = plan_batches(16, LENGTHS, True, LLAMA3_8B, budget, in_use, LORA_Q_V, chunked_loss=True)
    check_budget(plan, budget, in_use, LENGTHS, given=False)  # the card's memory: the back-off is there
    fitting = plan_batches(16, LENGTHS, True, LLAMA_7B, 80 * GiB, IN_USE[4], LORA_Q_V, chunked_loss=True)
    check_budget(fitting, 80 * GiB, IN_USE[4], LENGTHS, given=True)


def test_bf16_stream_puts_the_frozen_fp32_weights_back_bit_for_bit():
    import torch

    from qlora_magic.engine.speed import bf16_stream

    model = torch.nn.Sequential(torch.nn.Embedding(100, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 100))
    for name, param in model.named_parameters():
        param.requires_grad_(name == "2.weight")  # one trainable weight, as LoRA's: it stays fp32
    with torch.no_grad():
        model[0].weight.mul_(1 + 1e-4)  # values bf16 cannot hold exactly
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    with bf16_stream(model, torch.bfloat16) as cast:
        assert cast == 4
        assert {name: p.dtype for name, p in model.named_parameters()} == {
            "0.weight": torch.bfloat16, "1.weight": torch.bfloat16, "1.bias": torch.bfloat16,
            "2.weight": torch.float32, "2.bias": torch.bfloat16}
    for name, param in model.named_parameters():
        assert param.dtype == torch.float32 and torch.equal(param, before[name]), name


# --- the load keeps bf16 weights in bf16 when bf16 is the compute dtype --------------------------------------

@pytest.mark.parametrize("dtype_name, task, frozen_dtype", [
    ("bfloat16", "causal-lm", "bfloat16"),  # bf16 GPUs: PEFT's fp32 cast would only double them
    ("float16", "causal-lm", "float32"),  # fp16 GPUs (a T4): norms in fp32, as PEFT prepares them
    ("bfloat16", "seq-cls", "float32"),  # a classifier's new head is trained: fp32 for the optimizer
])
def test_kbit_preparation_freezes_the_base_and_casts_only_where_it_helps(tiny_model_dir, dtype_name, task, frozen_dtype):
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_magic.engine.loading import prepare_for_kbit_training

    dtype = getattr(torch, dtype_name)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)
    model = prepare_for_kbit_training(model, dtype, task)
    assert not any(p.requires_grad for p in model.parameters())
    assert {str(p.dtype) for p in model.parameters()} == {f"torch.{frozen_dtype}"}


def test_the_memory_plan_says_when_the_plan_is_over_the_budget_or_the_slowest_layout():
    from qlora_magic.engine.speed import BatchLayout, BatchPlan, memory_plan_text

    budget = int(10e9)
    assert memory_plan_text(BatchPlan(BatchLayout(8, 2), True, int(8.3e9)), budget) == "8.30 GB of 10.00 GB"
    over = memory_plan_text(BatchPlan(BatchLayout(1, 16), True, int(9.5e9)), budget)
    assert over.startswith("9.50 GB of 10.00 GB (more than fits")
    slowest = memory_plan_text(BatchPlan(BatchLayout(1, 16), True, int(8.3e9)), budget)
    assert "the slowest layout: 16 micro-batches of one example" in slowest and "--bits 4" in slowest
    assert "--bits 4" not in memory_plan_text(BatchPlan(BatchLayout(1, 16), True, int(8.3e9)), budget, four_bit=True)
    assert "slowest" not in memory_plan_text(BatchPlan(BatchLayout(1, 1), True, int(8.3e9)), budget)  # nothing to split


# --- the estimate against the peaks measured on five model shapes (benchmarks/memory_shapes.py, H200) --------

SHAPES = {  # dims, and the LoRA (r=8 on q and v) parameters they train
    "llama2-7b": ({"hidden": 4096, "intermediate": 11008, "layers": 32, "vocab": 32000}, 4096),
    "llama3-8b": ({"hidden": 4096, "intermediate": 14336, "layers": 32, "vocab": 128256}, 1024),
    "qwen2.5-7b": ({"hidden": 3584, "intermediate": 18944, "layers": 28, "vocab": 152064}, 512),
    "qwen2.5-3b-tied": ({"hidden": 2048, "intermediate": 11008, "layers": 36, "vocab": 151936}, 256),
    "qwen2.5-14b": ({"hidden": 5120, "intermediate": 13824, "layers": 48, "vocab": 152064}, 1024),
}
# (shape, model GB after loading, micro-batch x example length, checkpointing, measured peak GB): every example
# at its length, so the worst micro-batch is the one that ran. docs/benchmarks.md, "Memory on five shapes".
SHAPE_PEAKS = [
    ("llama2-7b", 3.95, (16, 512), True, 8.23), ("llama2-7b", 7.09, (16, 512), True, 11.37),
    ("llama2-7b", 7.09, (8, 512), True, 9.22),
    ("llama3-8b", 5.72, (16, 512), True, 10.38), ("llama3-8b", 5.72, (8, 512), True, 8.06),
    ("llama3-8b", 9.17, (16, 512), True, 13.77), ("llama3-8b", 9.17, (1, 512), True, 9.58),
    ("llama3-8b", 5.79, (2, 8192), True, 15.34), ("llama3-8b", 5.79, (1, 8192), True, 10.08),
    ("llama3-8b", 5.79, (1, 16384), True, 14.35),
    ("qwen2.5-7b", 5.62, (16, 512), True, 10.07), ("qwen2.5-7b", 5.62, (8, 512), True, 7.82),
    ("qwen2.5-7b", 8.79, (16, 512), True, 13.23), ("qwen2.5-7b", 8.79, (1, 512), True, 9.19),
    ("qwen2.5-3b-tied", 2.06, (16, 512), True, 5.05), ("qwen2.5-3b-tied", 3.48, (16, 512), True, 6.39),
    ("qwen2.5-3b-tied", 3.48, (8, 512), True, 4.90),
    ("qwen2.5-14b", 10.03, (16, 512), True, 16.68), ("qwen2.5-14b", 10.03, (8, 512), True, 13.36),
    ("qwen2.5-14b", 16.43, (8, 512), True, 19.80), ("qwen2.5-14b", 16.43, (1, 512), True, 17.03),
]


@pytest.mark.parametrize("shape, model_gb, batch, checkpointing, peak_gb", SHAPE_PEAKS)
def test_the_estimate_is_at_or_above_the_peak_measured_on_every_shape(shape, model_gb, batch, checkpointing, peak_gb):
    """GQA, 128k-152k vocabularies, a tied head, 3B to 14B, 4- and 8-bit: the plan's estimate never under the
    measured peak (the whole process's, model included), and within 10% + 0.5 GB of it."""
    dims, kv_width = SHAPES[shape]
    micro, length = batch
    trainable = dims["layers"] * 8 * (2 * dims["hidden"] + dims["hidden"] + kv_width)
    plan = plan_batches(micro, [length] * micro, True, dims, 10**15, int(model_gb * 1e9), trainable,
                        checkpointing=checkpointing, chunked_loss=True)
    assert plan.layout == BatchLayout(micro, 1) and plan.checkpointing is checkpointing
    assert peak_gb * 1e9 <= plan.estimate <= (1.1 * peak_gb + 0.5) * 1e9


def test_offloading_the_checkpoints_is_the_last_resort_before_the_smallest_layout():
    """8,192-token examples on a 4-bit 8B model: checkpointing alone fits one example per micro-batch in 24 GB
    but not two of 16k tokens in 16 GB; the checkpoints in CPU memory do, when the CPU has the room."""
    dims = SHAPES["llama3-8b"][0]
    model = int(5.79e9)
    fits = plan_batches(1, [8192], True, dims, int(24e9), model, chunked_loss=True, host_budget=10**12)
    assert (fits.checkpointing, fits.offload) == (True, False)  # no need: not chosen
    tight = plan_batches(1, [16384], True, dims, int(16e9), model, chunked_loss=True, host_budget=10**12)
    assert (tight.checkpointing, tight.offload) == (True, True) and plan_fits(tight, int(16e9))
    from qlora_magic.engine.speed import checkpoint_bytes

    kept = plan_batches(1, [16384], True, dims, int(16e9), model, chunked_loss=True, host_budget=0)
    assert kept.offload is False and kept.estimate - tight.estimate == checkpoint_bytes(dims, 16384)
    small_host = plan_batches(1, [16384], True, dims, int(16e9), model, chunked_loss=True,
                              host_budget=checkpoint_bytes(dims, 16384) - 1)
    assert small_host.offload is False  # the CPU memory it would need is not there
    user_said_no = plan_batches(1, [16384], True, dims, int(16e9), model, checkpointing=False, chunked_loss=True,
                                host_budget=10**12)
    assert user_said_no.offload is False and user_said_no.checkpointing is False


def test_checkpoints_in_cpu_memory_train_the_same_steps(tiny_model_dir, monkeypatch):
    """The real run on the CPU with checkpointing forced, its checkpoints offloaded or not: the same losses,
    and every checkpointed layer went through the offloading checkpoint."""
    import datasets
    import torch

    from qlora_magic.config import TrainConfig
    from qlora_magic.display.reporters import NullReporter
    from qlora_magic.engine import speed
    from qlora_magic.engine.training import TrainingData, run_training

    _, rows = _tokenized(tiny_model_dir, n=16)
    calls = []
    offloaded = speed.offloaded_checkpoint
    monkeypatch.setattr(speed, "offloaded_checkpoint", lambda *a, **k: calls.append(1) or offloaded(*a, **k))
    losses = {}
    for offload in (False, True):
        torch.manual_seed(0)
        qlora_magic.load(tiny_model_dir, bits=8)
        session = qlora_magic.get_session()
        config = TrainConfig(max_steps=3, batch_size=2, grad_accum=2, lr=2e-3, display="none")
        summary = run_training(session.model, session.tokenizer, config, TrainingData(datasets.Dataset.from_list(rows)),
                               NullReporter(), overrides={"gradient_checkpointing": True, "offload_checkpoints": offload})
        losses[offload] = [r["loss"] for r in summary.history if "loss" in r]
    layers = qlora_magic.get_session().model.config.num_hidden_layers
    assert len(calls) == 3 * 2 * layers  # 3 steps x 2 micro-batches, each layer once in the forward
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


# --- partial checkpointing and the token cap: the worst micro-batch no longer dictates a slow plan --------------

def test_partial_checkpointing_is_estimated_between_none_and_all():
    none, all_ = (activation_bytes(LLAMA_7B, 4096, c, True) for c in (False, True))
    half = activation_bytes(LLAMA_7B, 4096, True, True, checkpointed_layers=16)
    assert all_ < half < none
    assert activation_bytes(LLAMA_7B, 4096, True, True, checkpointed_layers=32) == all_
    assert activation_bytes(LLAMA_7B, 4096, True, True, checkpointed_layers=0) == none


def test_a_budget_between_checkpointing_all_and_none_checkpoints_only_some_layers():
    """On the measured data of issue 12 (54-512 tokens) at Unsloth's 18.8 GiB: the plan checkpoints part of the
    layers (faster than all) and fits the worst micro-batch."""
    import random

    draw = random.Random(1)
    lengths = [draw.randint(54, 512) for _ in range(1000)]
    plan = plan_batches(16, lengths, True, LLAMA_7B, int(18.8 * GiB), IN_USE[4], LORA_Q_V, chunked_loss=True)
    assert plan.checkpointing and 0 < plan.checkpointed_layers < 32
    assert plan_fits(plan, int(18.8 * GiB))
    everything = plan_batches(16, lengths, True, LLAMA_7B, int(18.8 * GiB), IN_USE[4], LORA_Q_V, checkpointing=True,
                              chunked_loss=True)
    assert everything.checkpointed_layers is None  # the user's --gradient-checkpointing means every layer


def test_a_token_cap_lets_a_budget_take_the_typical_micro_batch_not_the_worst():
    from qlora_magic.engine.speed import forwards_per_micro_batch, token_groups

    assert token_groups([300, 300, 300, 700, 100], 1024) == [[0, 1, 2], [3, 4]]
    assert token_groups([2000, 10], 1024) == [[0], [1]]  # one example is never split
    assert token_groups([5, 5], None) == [[0, 1]]
    # 15 short examples and one cut at max length: rarely over 4,096 tokens together, the worst case 8,192
    lengths = [180] * 990 + [512] * 10
    assert forwards_per_micro_batch(lengths, 16, 4096) == 1.0 and forwards_per_micro_batch(lengths, 16, 1024) >= 3
    plan = plan_batches(16, lengths, True, LLAMA_7B, 40 * GiB, IN_USE[4], LORA_Q_V, chunked_loss=True)
    assert (plan.layout.micro, plan.checkpointing) == (16, False) and plan.max_tokens is not None
    assert plan.max_tokens >= 512 and plan_fits(plan, 40 * GiB)
    uncapped = plan_batches(16, lengths, True, LLAMA_7B, 80 * GiB, IN_USE[4], LORA_Q_V, chunked_loss=True)
    assert uncapped.max_tokens is None  # the worst case fits: nothing is ever split
    padded = plan_batches(16, lengths, False, LLAMA_7B, 40 * GiB, IN_USE[4], LORA_Q_V, chunked_loss=True)
    assert padded.max_tokens is None  # only packed micro-batches are split


def test_arrange_checkpoints_keeps_checkpointing_on_the_first_layers_only(tiny_model_dir):
    from qlora_magic.engine.speed import arrange_checkpoints, compiled_offloaded_checkpoint, offloaded_checkpoint

    qlora_magic.load(tiny_model_dir, bits=8)
    model = qlora_magic.get_session().model
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    for layer in layers:
        layer.compile()  # as compiled_layers leaves them when the back-off turns offloading on mid-run
    assert arrange_checkpoints(model, 1, offload=True) == 1
    assert layers[0]._compiled_call_impl is None and layers[1]._compiled_call_impl is not None
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]
    assert layers[0]._gradient_checkpointing_func is offloaded_checkpoint  # a run that is not compiled
    arrange_checkpoints(model, 1, offload=True, compiled=True)
    assert layers[0]._gradient_checkpointing_func is compiled_offloaded_checkpoint  # compiled inside the hooks


def test_offloaded_checkpoints_of_compiled_layers_compile_the_layer_inside_the_hooks(tiny_model_dir):
    """The compiler cannot trace the offloading hooks: a layer compiled whole breaks its graph there. Compiled
    inside them, the layers' forward is one compiled graph (shared by the layers), and the gradients are the
    uncompiled, unoffloaded run's."""
    import torch
    from torch._dynamo.testing import CompileCounterWithBackend

    from qlora_magic.engine import speed

    grads = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        qlora_magic.load(tiny_model_dir, bits=4, dropout=0.0)
        model = qlora_magic.get_session().model
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        counter = CompileCounterWithBackend("inductor")
        with speed.compiled_layers(model, compiled):
            speed.arrange_checkpoints(model, None, offload=compiled, compiled=compiled)
            with pytest.MonkeyPatch.context() as patch:  # count the graphs torch.compile makes
                real = torch.compile
                patch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend=counter))
                ids = torch.arange(2, 34).reshape(2, 16) % 90
                for _ in range(2):
                    model.zero_grad()
                    model(input_ids=ids, labels=ids).loss.backward()
        grads[compiled] = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        if compiled:
            assert counter.frame_count == 1  # one forward graph, reused by both layers and both steps
    torch._dynamo.reset()
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads[False], grads[True]))


def test_compiled_8bit_layers_compile_once_not_again_at_the_second_step(tiny_model_dir):
    """bitsandbytes settles an 8-bit layer's state on its first call; compiled_layers settles it before
    compiling, so the second step reuses the first step's graphs (it compiled every layer again), and the
    gradients are those of the uncompiled layers."""
    import torch
    from torch._dynamo.testing import CompileCounterWithBackend

    from qlora_magic.engine import speed

    grads, frames = {}, []
    ids = torch.arange(2, 34).reshape(2, 16) % 90
    for compiled in (False, True):
        torch.manual_seed(0)
        qlora_magic.load(tiny_model_dir, bits=8, dropout=0.0)
        model = qlora_magic.get_session().model
        model.train()
        counter = CompileCounterWithBackend("eager")
        with pytest.MonkeyPatch.context() as patch:  # count the graphs: nn.Module.compile calls torch.compile
            real = torch.compile
            patch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend=counter))
            with speed.compiled_layers(model, compiled):
                for _ in range(2):
                    model.zero_grad()
                    model(input_ids=ids, labels=ids).loss.backward()
                    frames.append(counter.frame_count)
        grads[compiled] = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    torch._dynamo.reset()
    assert frames[:2] == [0, 0] and frames[2] > 0 and frames[3] == frames[2]  # nothing compiled at step 2
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads[False], grads[True]))


@pytest.mark.parametrize("chunked_loss", [False, True])
def test_a_micro_batch_over_the_token_cap_trains_as_pieces_with_the_same_steps(tiny_model_dir, chunked_loss):
    """The real run on the CPU (4-bit), packed and rounded as on the GPU, one of two layers checkpointed: with a
    token cap that splits every micro-batch, the same losses and gradient norms, and more forwards."""
    import datasets
    import torch

    from qlora_magic.config import TrainConfig
    from qlora_magic.display.reporters import NullReporter
    from qlora_magic.engine.training import TrainingData, run_training

    _, rows = _tokenized(tiny_model_dir, n=16)
    cap = max(len(r["input_ids"]) for r in rows) + 7 & ~7
    runs = {}
    for max_tokens in (None, cap):
        torch.manual_seed(0)
        qlora_magic.load(tiny_model_dir, bits=4, dropout=0.0)  # dropout draws differ per forward
        session = qlora_magic.get_session()
        forwards = []
        session.model.register_forward_hook(lambda *a: forwards.append(1) if session.model.training else None)
        config = TrainConfig(max_steps=3, batch_size=4, grad_accum=2, lr=2e-3, display="none")
        overrides = {"packing": True, "pad_packed_to": 8, "chunked_loss": chunked_loss, "gradient_checkpointing": True,
                     "checkpointed_layers": 1, "max_tokens": max_tokens}
        summary = run_training(session.model, session.tokenizer, config, TrainingData(datasets.Dataset.from_list(rows)),
                               NullReporter(), overrides=overrides)
        assert summary.settings["max_tokens"] == max_tokens and summary.settings["checkpointed_layers"] == 1
        history = [r for r in summary.history if "loss" in r]
        runs[max_tokens] = ([r["loss"] for r in history], [r["grad_norm"] for r in history], len(forwards))
    assert runs[None][2] == 3 * 2  # one forward per micro-batch
    assert runs[cap][2] > runs[None][2]
    assert runs[cap][0] == pytest.approx(runs[None][0], rel=1e-5)
    assert runs[cap][1] == pytest.approx(runs[None][1], rel=1e-4)


def test_the_headroom_is_a_share_of_the_activations_not_of_the_budget():
    """A small budget keeps what fragmentation needs (measured 9-18% of the activations), not 10% of everything;
    a large one never keeps less than before (the plans measured there hold)."""
    from qlora_magic.engine.speed import HEADROOM_MIN, fits, headroom, smallest_budget

    model, budget = int(3.95e9), int(4.83e9)
    assert headroom(int(4.5e9), model, budget) == HEADROOM_MIN  # 0.11 GB of activations: the floor
    assert fits(int(4.5e9), model, budget) and not fits(int(4.6e9), model, budget)
    assert headroom(int(20e9), model, int(25e9)) == pytest.approx(0.1 * 25e9)  # capped at 10% of the budget
    for estimate in (int(4.5e9), int(9e9), int(20e9)):
        needed = smallest_budget(estimate, model)
        assert fits(estimate, model, needed) and not fits(estimate, model, needed - int(2e8))


def test_layers_are_compiled_on_a_gpu_for_long_runs_only_and_put_back_after(tiny_model_dir, monkeypatch):
    from qlora_magic.engine import speed

    monkeypatch.setattr(speed, "_can_compile", lambda: True)
    assert speed.should_compile(None, speed.COMPILE_MIN_STEPS) is True
    assert speed.should_compile(None, 30) is False  # the compile would not pay for itself
    assert speed.should_compile(True, 30) is True
    assert speed.should_compile(False, 10_000) is False
    monkeypatch.setattr(speed, "_can_compile", lambda: False)
    assert speed.should_compile(True, 10_000) is False  # no Triton: never
    assert speed.smaller_layout({"batch": BatchLayout(1, 16), "gradient_checkpointing": True, "device": "cuda:0",
                                 "compile": True}) == {"offload_checkpoints": True}  # compiled inside the hooks

    qlora_magic.load(tiny_model_dir, bits=8)
    model = qlora_magic.get_session().model
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    with speed.compiled_layers(model, True):
        assert all(layer._compiled_call_impl is not None for layer in layers)
    assert all(layer._compiled_call_impl is None for layer in layers)
    with speed.compiled_layers(model, False):
        assert all(layer._compiled_call_impl is None for layer in layers)


def test_compile_is_a_train_option():
    from qlora_magic.front.parsing import parse_train

    body = "data: x.jsonl\nprompt: \"Q: {q}\"\nresponse: \"{a}\""
    assert parse_train("--compile", body).compile is True
    assert parse_train("--no-compile", body).compile is False
    assert parse_train("", body).compile is None
