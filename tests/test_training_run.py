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
