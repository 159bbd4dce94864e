"""The speed settings: the batch layout chosen from memory, and packing computing the same loss as padding."""

import pytest

import qlora_magic
from qlora_magic.config import TrainConfig
from qlora_magic.errors import ConfigError
from qlora_magic.speed import GB, activation_bytes, parse_memory, plan_batches

LLAMA_7B = {"hidden": 4096, "intermediate": 11008, "layers": 32, "vocab": 32000}
LENGTHS = [180] * 900 + [512] * 100  # instruction data: most short, some cut at max_length


def test_parse_memory():
    assert parse_memory("10GB") == 10 * GB
    assert parse_memory("10 GiB") == 10 * GB
    assert parse_memory("512MB") == 512 * 1024**2
    assert parse_memory(24) == 24 * GB
    assert parse_memory(None) is None
    with pytest.raises(ConfigError, match="10GB"):
        parse_memory("ten gigs")
    with pytest.raises(ConfigError, match="max-memory"):
        TrainConfig(max_memory="lots")


@pytest.mark.parametrize("budget_gb", [10, 24, 40, 80, 140])
def test_plan_keeps_the_effective_batch_and_fits_the_budget(budget_gb):
    in_use = int(3.9 * GB)  # a 7B model in NF4
    plan = plan_batches(16, LENGTHS, True, LLAMA_7B, budget_gb * GB, in_use, trainable=4_194_304)
    assert plan["micro"] * plan["accum"] == 16
    assert plan["estimate"] <= budget_gb * GB


def test_plan_prefers_one_big_micro_batch_without_checkpointing_when_memory_allows():
    plan = plan_batches(16, LENGTHS, True, LLAMA_7B, 140 * GB, int(3.9 * GB))
    assert (plan["micro"], plan["accum"], plan["checkpointing"]) == (16, 1, False)


def test_plan_checkpoints_on_a_small_budget():
    plan = plan_batches(16, LENGTHS, True, LLAMA_7B, 10 * GB, int(3.9 * GB))
    assert plan["checkpointing"] is True


def test_plan_respects_fixed_checkpointing():
    plan = plan_batches(16, LENGTHS, True, LLAMA_7B, 10 * GB, int(3.9 * GB), checkpointing=False)
    assert plan["checkpointing"] is False and plan["micro"] < 16


def test_plan_on_the_cpu_is_one_micro_batch():
    assert plan_batches(16, LENGTHS, True, LLAMA_7B, None, 0) == {"micro": 16, "accum": 1, "checkpointing": False, "estimate": None}


def test_packing_estimate_is_below_padding():
    few_long = [180] * 995 + [512] * 5  # packing's worst case is the 16 longest examples together
    packed = plan_batches(16, few_long, True, LLAMA_7B, 140 * GB, 0)["estimate"]
    padded = plan_batches(16, few_long, False, LLAMA_7B, 140 * GB, 0)["estimate"]
    assert packed < padded
    assert activation_bytes(LLAMA_7B, 1000, True) < activation_bytes(LLAMA_7B, 1000, False) / 5


def _tokenized(tiny_model_dir, n=8):
    from transformers import AutoTokenizer

    from qlora_magic.data import ExampleTokenizer
    from tiny_model import toy_rows

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = ExampleTokenizer(tokenizer, "Q: {question} ", "{answer}")
    rows = [examples(r) for r in toy_rows(n)]
    rows[1] = {k: v + v[:7] for k, v in rows[1].items()}  # lengths differ, so padding happens
    return tokenizer, rows


def test_packed_batch_has_the_padded_loss(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_magic.data import make_collator
    from qlora_magic.speed import no_kv_cache

    tokenizer, rows = _tokenized(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.train()  # the training forward; dropout is 0 in this model
    padded = make_collator(tokenizer, packing=False)([dict(r) for r in rows])
    packed = make_collator(tokenizer, packing=True)([dict(r) for r in rows])
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    with torch.no_grad(), no_kv_cache(model):
        assert model(**packed).loss.item() == pytest.approx(model(**padded).loss.item(), rel=1e-5)
    assert model.config.use_cache is True  # restored


def test_training_packed_and_padded_take_the_same_first_step(tiny_model_dir, rows):
    """End to end on the real (8-bit, CPU) path: the first logged loss is the same batch's loss."""
    losses = {}
    for packing in (True, False):
        qlora_magic.load(tiny_model_dir, bits=8)
        summary = qlora_magic.train(rows, prompt="Q: {question} ", response="{answer}", max_steps=1,
                                    packing=packing, display="none")
        assert summary.settings["packing"] is packing
        assert summary.settings["batch"] == "4x4"  # the CPU keeps the layout asked for
        losses[packing] = summary.train_loss[0]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_default_train_settings_show_in_the_readout(tiny_loaded, rows):
    summary = qlora_magic.train(rows, prompt="Q: {question} ", response="{answer}", max_steps=1, display="none")
    settings = dict(summary.rows())["settings"]
    # On the CPU: the layout asked for, no packing (neither paid there); the GPU's are in test_gpu.py.
    assert "packing=False" in settings and "batch=4x4" in settings and "effective_batch=16" in settings
