"""engine/training.py's pieces: the settings a run uses (overrides included), the TrainingArguments built from
them, and where a run's rows go."""

import pytest

import qlora_magic
from qlora_magic.config import TrainConfig
from qlora_magic.errors import ConfigError


def _train_set(tiny_model_dir, n=8):
    import datasets
    from transformers import AutoTokenizer

    from qlora_magic.engine.data import ExampleTokenizer
    from tiny_model import toy_rows

    examples = ExampleTokenizer(AutoTokenizer.from_pretrained(tiny_model_dir), "Q: {question} ", "{answer}")
    return datasets.Dataset.from_list([examples(r) for r in toy_rows(n)])


def test_a_batch_override_in_its_text_form_is_the_trainers_layout(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_magic.engine.speed import BatchLayout
    from qlora_magic.engine.training import TrainSummary, run_settings, training_arguments

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    train_set, config = _train_set(tiny_model_dir), TrainConfig(max_steps=2, eval_steps=1)
    settings = run_settings(config, "cpu", model, train_set)
    assert settings["batch"] == BatchLayout(config.batch_size, config.grad_accum)  # the CPU keeps the layout asked for

    settings = run_settings(config, "cpu", model, train_set, overrides={"batch": "2x8", "packing": True})
    assert settings["batch"] == BatchLayout(2, 8) and settings["packing"] is True
    args = training_arguments(config, settings, tmp_path, "cpu", evaluate=True)
    assert (args.per_device_train_batch_size, args.per_device_eval_batch_size, args.gradient_accumulation_steps) == (2, 2, 8)
    assert args.eval_strategy == "steps" and args.eval_on_start and args.include_num_input_tokens_seen == "all"
    shown = dict(TrainSummary("completed", 0, 2, 0.0, str(tmp_path), settings).rows())["settings"]
    assert "batch=2x8" in shown  # the readout is the text form
    with pytest.raises(ConfigError, match="like '4x4'"):
        run_settings(config, "cpu", model, train_set, overrides={"batch": "2 by 8"})


def test_fsdp_shards_on_one_launched_rank_too_and_never_in_the_kernel(tiny_model_dir, monkeypatch):
    """A one-GPU `--gpus 1 --strategy fsdp` worker runs the FSDP2 code path of N ranks (so one GPU can check it);
    the same config in a process torchrun did not start trains unsharded."""
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_magic.engine.training import distributed_arguments, run_settings

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    train_set, config = _train_set(tiny_model_dir), TrainConfig(max_steps=2, gpus=1, strategy="fsdp")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert "strategy" not in run_settings(config, "cpu", model, train_set) and distributed_arguments({"device": "cpu"}) == {}
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    settings = run_settings(config, "cpu", model, train_set)
    assert settings["strategy"] == "fsdp" and settings["ranks"] == 1
    arguments = distributed_arguments(settings)
    assert arguments["fsdp"] is True and arguments["fsdp_config"]["version"] == 2
    ddp = run_settings(config.replace(strategy="ddp"), "cpu", model, train_set)
    assert distributed_arguments(ddp) == {}  # one ddp rank: nothing to reduce with


def test_a_diverged_run_is_seen_and_put_back_when_fsdp_shards_the_adapter(one_process_group):
    """The NaN check and the put-back read and write LoRA weights that FSDP2 left sharded (DTensors)."""
    import torch
    from torch.distributed.tensor import Shard, distribute_tensor

    from qlora_magic.engine.training import _put_back, _trainable_weights, _weights_diverged

    model = torch.nn.Module()
    start = torch.randn(6, 4)
    model.lora_A = torch.nn.Parameter(distribute_tensor(start.clone(), one_process_group, [Shard(0)]))
    model.frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    before = _trainable_weights(model)
    assert set(before) == {"lora_A"} and type(before["lora_A"]) is torch.Tensor and torch.equal(before["lora_A"], start)
    assert _weights_diverged(model, 3) is None
    with torch.no_grad():
        model.lora_A.to_local()[1, 2] = float("nan")
    assert _weights_diverged(model, 3) == ("adapter's weights became NaN or infinite", 3)
    _put_back(model, before)
    assert torch.equal(model.lora_A.full_tensor(), start)


def test_a_runs_rows_go_to_the_log_tagged_with_its_index(tiny_model_dir):
    from qlora_magic.display.reporters import NullReporter
    from qlora_magic.engine.training import RunLog, TrainingData, run_training

    qlora_magic.load(tiny_model_dir, bits=8)
    session = qlora_magic.get_session()
    earlier = [{"step": 1, "loss": 9.0, "run": 0}]
    log = RunLog(earlier, run=1)
    train_set = _train_set(tiny_model_dir)
    summary = run_training(session.model, session.tokenizer, TrainConfig(max_steps=2, logging_steps=1, display="none"),
                           TrainingData(train_set, eval=train_set.select(range(2))), NullReporter(), log)
    new_rows = earlier[1:]
    assert new_rows and all(r["run"] == 1 for r in new_rows)
    assert summary.history == new_rows  # the summary holds this run's rows only
    assert summary.eval_loss[0] is not None and summary.steps_done == 2
