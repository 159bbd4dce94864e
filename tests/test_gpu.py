"""GPU-only checks (skipped without CUDA; run on the GPU machine with `pytest -m gpu tests/test_gpu.py`)."""

import pytest

import qlora_magic

pytestmark = pytest.mark.gpu


def test_packed_batch_has_the_padded_loss_on_the_gpu(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_magic.engine.data import ExampleTokenizer, make_collator
    from qlora_magic.engine.speed import no_kv_cache
    from tiny_model import toy_rows

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = ExampleTokenizer(tokenizer, "Q: {question} ", "{answer}")
    rows = [examples(r) for r in toy_rows(8)]
    rows[1] = {k: v + v[:7] for k, v in rows[1].items()}
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).cuda().train()
    padded = {k: v.cuda() for k, v in make_collator(tokenizer, packing=False)([dict(r) for r in rows]).items()}
    packed = {k: v.cuda() for k, v in make_collator(tokenizer, packing=True)([dict(r) for r in rows]).items()}
    with torch.no_grad(), no_kv_cache(model):
        assert model(**packed).loss.item() == pytest.approx(model(**padded).loss.item(), rel=1e-4)


def test_dequantized_int8_matmul_matches_the_dequantized_weight():
    import bitsandbytes as bnb
    import torch

    from qlora_magic.engine.speed import _Int8DequantLinear

    torch.manual_seed(0)
    layer = bnb.nn.Linear8bitLt(256, 128, bias=True, has_fp16_weights=False).cuda()
    layer.train()
    x = torch.randn(2, 37, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x)  # moves the int8 weight into the state
    CB, SCB = layer.state.CB, layer.state.SCB
    weight = CB.float() * (SCB.float() / 127).unsqueeze(1)
    out = _Int8DequantLinear.apply(x, CB, SCB, layer.bias)
    ref = torch.nn.functional.linear(x.float(), weight, layer.bias.float())
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2
    out.float().pow(2).sum().backward()
    x_ref = x.detach().float().requires_grad_()
    torch.nn.functional.linear(x_ref, weight, layer.bias.float()).pow(2).sum().backward()
    assert ((x.grad.float() - x_ref.grad).norm() / x_ref.grad.norm()).item() < 2e-2


def test_chunked_loss_matches_the_models_loss_in_bf16(tiny_model_dir):
    """The loss and input gradients of speed.causal_lm_loss against the model's own, under bf16 autocast
    (how training runs on the GPU), on a packed batch."""
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_magic.engine.speed import causal_lm_loss, hidden_states_as_logits, output_head

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).cuda().train()
    for param in model.parameters():
        param.requires_grad_(False)
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, 300), device="cuda")
    positions = torch.cat([torch.arange(n, device="cuda") for n in (120, 100, 80)])[None]
    labels = ids.clone()
    labels[0, [0, 120, 220]] = -100  # each packed example's first token (the collator's separator)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected = model(inputs_embeds=embeds, position_ids=positions, labels=labels, use_cache=False).loss
    expected.backward()
    reference, embeds.grad = embeds.grad.clone(), None
    head = output_head(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with hidden_states_as_logits(model, head):
            hidden = model(inputs_embeds=embeds, position_ids=positions, use_cache=False).logits
        loss = causal_lm_loss(hidden, head.weight, labels)
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-3)
    assert ((embeds.grad.float() - reference.float()).norm() / reference.float().norm()).item() < 2e-2


@pytest.mark.parametrize("bits", [4, 8])
def test_fast_defaults_train_on_the_gpu(tiny_model_dir, rows, bits):
    import torch

    qlora_magic.load(tiny_model_dir, bits=bits)
    model = qlora_magic.get_session().model
    # the load keeps the unquantized frozen weights in bf16, the compute dtype (PEFT's preparation made them fp32)
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if "norm" in n or "embed" in n)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    summary = qlora_magic.train(rows * 4, prompt="Q: {question} ", response="{answer}", max_steps=12, lr=2e-3, display="none")
    settings = summary.settings
    assert settings["packing"] is True and str(settings["batch"]) == "16x1" and settings["gradient_checkpointing"] is False
    assert settings["optimizer"] == "adamw_torch_fused" and settings["bf16_stream"] is True
    assert settings["chunked_loss"] is True
    assert settings["int8_dequant"] is (bits == 8)
    from qlora_magic.engine.speed import PACKED_LENGTH_MULTIPLE

    assert settings["pad_packed_to"] == PACKED_LENGTH_MULTIPLE
    first, last = summary.train_loss
    assert last < first
    assert {n: p.dtype for n, p in model.named_parameters()} == dtypes  # the run leaves every dtype as it was


def test_checkpointing_asked_for_is_used_and_switched_off_after(tiny_model_dir, rows):
    qlora_magic.load(tiny_model_dir, bits=4)
    summary = qlora_magic.train(rows, prompt="Q: {question} ", response="{answer}", max_steps=2,
                                gradient_checkpointing=True, display="none")
    assert summary.settings["gradient_checkpointing"] is True
    summary = qlora_magic.train(rows, prompt="Q: {question} ", response="{answer}", max_steps=2, display="none")
    assert summary.settings["gradient_checkpointing"] is False  # and switched off again for this run


def test_loading_on_the_gpu_turns_on_expandable_segments(tiny_model_dir, monkeypatch):
    """Without a user's allocator setting, segments made after %qlora_load can grow in place."""
    import torch

    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    qlora_magic.load(tiny_model_dir, bits=4, device="cuda")
    after = torch.empty(64 * 1024**2, dtype=torch.uint8, device="cuda")  # a new segment
    segments = torch.cuda.memory._snapshot()["segments"]
    assert any(segment.get("is_expandable") for segment in segments), segments[:2]
    del after
