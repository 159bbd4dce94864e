"""`%qlora_load --device-map auto`: a model spread over the GPUs (accelerate's placement), for generation,
evaluation and small experiments in the kernel. On this CPU machine accelerate puts every layer on the CPU;
the spread itself is read from the model's hf_device_map."""

from types import SimpleNamespace

import pytest
import torch

import qlora_magic as qm
from qlora_magic.config import LoadConfig
from qlora_magic.engine.memory_usage import devices_of
from qlora_magic.errors import ConfigError


def test_device_map_takes_auto_only():
    assert LoadConfig(device_map="auto").device_map == "auto"
    for bad in ("balanced", "0", ""):
        with pytest.raises(ConfigError, match="--device-map takes auto"):
            LoadConfig(device_map=bad)
    with pytest.raises(ConfigError, match="with --device cpu leave it out"):
        LoadConfig(device_map="auto", device="cpu")


def test_the_devices_of_a_spread_model_are_named_in_order():
    spread = SimpleNamespace(hf_device_map={"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1,
                                            "lm_head": "cpu"})
    assert devices_of(spread) == ["cuda:0", "cuda:1", "cpu"]


def test_a_model_loaded_with_device_map_auto_generates_and_trains_in_workers(tiny_model_dir, rows):
    """The spread model writes the workers' run (they load their own copies, planned against what it leaves
    free on each GPU: the way to FSDP of a model no single GPU holds), and takes their adapter back in place."""
    qm.load(tiny_model_dir, bits=8, device_map="auto", dropout=0.0)
    session = qm.get_session()
    assert session.load_config.device_map == "auto"
    assert qm.generate("the cat", max_new_tokens=3)
    before = session.model
    lora = {name: p.detach().clone() for name, p in before.named_parameters() if "lora_B" in name}
    summary = qm.train(rows[:16], prompt="Q: {question} ", response="{answer}", processes=2, max_steps=2,
                       batch_size=2, grad_accum=2, display="none")
    assert summary.status == "completed" and summary.steps_done == 2
    assert qm.get_session().model is before
    trained = {name: p.detach() for name, p in before.named_parameters() if "lora_B" in name}
    assert any(not torch.equal(lora[name], trained[name]) for name in lora)  # the workers' adapter, taken in place
