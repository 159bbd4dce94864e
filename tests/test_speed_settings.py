"""The speed settings: the batch layout chosen from memory, and packing computing the same loss as padding."""

import pytest

import qlora_magic
from qlora_magic.config import TrainConfig
from qlora_magic.errors import ConfigError
from qlora_magic.config import parse_memory
from qlora_magic.engine.speed import GiB, SAFETY, BatchLayout, BatchPlan, activation_bytes, plan_batches, workspace_bytes

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


@pytest.mark.parametrize("bits, budget_gb, layout", [(4, 10, (16, 1, True)), (4, 24, (16, 1, True)), (4, 80, (16, 1, False)),
                                                     (8, 10, (8, 2, True)), (8, 24, (16, 1, True)), (8, 80, (16, 1, False))])
def test_plans_are_the_layouts_measured_on_the_gpu(bits, budget_gb, layout):
    """The rows of docs/benchmarks.md ran these layouts; a change of constants that moves them needs a new run."""
    for lengths in (LENGTHS, [512] * 64):
        plan = plan_batches(16, lengths, True, LLAMA_7B, budget_gb * GiB, IN_USE[bits], LORA_Q_V, chunked_loss=True)
        assert (plan.layout.micro, plan.layout.accum, plan.checkpointing) == layout


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


def test_8bit_on_a_10gb_budget_takes_a_bigger_micro_batch_with_checkpointing():
    """The budget mode for 8-bit (docs/benchmarks.md): 4x4 before; 8x2 fits even the worst micro-batch.
    The budget is the measured runs' (--max-memory 10GB, read as 10 GiB before units were decimal)."""
    plan = plan_batches(16, LENGTHS, True, LLAMA_7B, 10 * GiB, IN_USE[8], LORA_Q_V, chunked_loss=True)
    assert (plan.layout, plan.checkpointing) == (BatchLayout(8, 2), True)
    assert plan.estimate <= SAFETY * 10 * GiB
    # 4-bit on the same budget: one micro-batch of 16, checkpointed
    plan = plan_batches(16, LENGTHS, True, LLAMA_7B, 10 * GiB, IN_USE[4], LORA_Q_V, chunked_loss=True)
    assert (plan.layout.micro, plan.checkpointing) == (16, True)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("card_gb", [24, 80])
@pytest.mark.parametrize("chunked_loss", [True, False])
def test_automatic_plan_fits_a_card_even_when_every_example_is_max_length(bits, card_gb, chunked_loss):
    """7B at max length 512: the worst case packs 16 x 512 tokens into one micro-batch. The GPU run checks
    the same with the process's memory capped (benchmarks/gpu_speed.py, 'worst case' rows)."""
    plan = plan_batches(16, [512] * 64, True, LLAMA_7B, card_gb * GiB, IN_USE[bits], LORA_Q_V, chunked_loss=chunked_loss)
    assert plan.estimate <= SAFETY * card_gb * GiB
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


def test_training_with_the_chunked_loss_takes_the_same_steps(tiny_model_dir):
    """End to end on the real (8-bit, CPU) path, where it is off by default: forced on, the same losses."""
    import datasets
    import torch

    from qlora_magic.config import TrainConfig
    from qlora_magic.display.reporters import NullReporter
    from qlora_magic.engine.training import TrainingData, run_training

    _, rows = _tokenized(tiny_model_dir, n=16)
    losses = {}
    for chunked in (False, True):
        torch.manual_seed(0)  # the same LoRA initialization
        qlora_magic.load(tiny_model_dir, bits=8)
        session = qlora_magic.get_session()
        config = TrainConfig(max_steps=3, batch_size=2, grad_accum=2, lr=2e-3, display="none")
        summary = run_training(session.model, session.tokenizer, config, TrainingData(datasets.Dataset.from_list(rows)),
                               NullReporter(), overrides={"chunked_loss": True} if chunked else None)
        assert summary.settings["chunked_loss"] is chunked  # off on the CPU unless forced
        losses[chunked] = [r["loss"] for r in summary.history if "loss" in r]
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


# --- a budget that cannot be met is said before training, with the smallest one that works ----------------

LLAMA3_8B = {"hidden": 4096, "intermediate": 14336, "layers": 32, "vocab": 128256}


@pytest.mark.parametrize("in_use_gb, budget_gb", [(10.5, 10), (3.6, 4), (6.5, 6.8)])
def test_a_budget_too_small_fails_in_one_line_with_one_that_works(in_use_gb, budget_gb):
    from qlora_magic.engine.speed import check_budget, plan_fits

    in_use, budget = int(in_use_gb * 1e9), int(budget_gb * 1e9)
    plan = plan_batches(16, LENGTHS, True, LLAMA3_8B, budget, in_use, LORA_Q_V, chunked_loss=True)
    assert not plan_fits(plan, budget)
    with pytest.raises(ConfigError) as error:
        check_budget(plan, budget, in_use, LENGTHS, given=True)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"--max-memory {budget_gb:.2f} GB is too small: the model")
    assert ("alone takes" in message) == (in_use_gb >= budget_gb * SAFETY)
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
