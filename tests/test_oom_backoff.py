"""A step that runs out of GPU memory is survived: the micro-batch halves (accumulation doubles, the effective
batch stays), the run carries on from the same optimizer step, and the loss curve is the one it would have
been. Only when the smallest layout fails does the run stop, in one line, with its last step checkpointed.
On the CPU the out-of-memory error is injected at a given step; tests/test_gpu.py meets a real one."""

import json

import pytest
import torch
from transformers import Trainer

import qlora_magic as qm
from qlora_magic.errors import OutOfMemory

# No LoRA dropout: with no randomness in the step, the losses after the back-off can be compared exactly.
SETTINGS = dict(prompt="{question} ", response="{answer}", batch_size=4, grad_accum=1, lr=2e-2, max_steps=8,
                display="none", seed=0)


def _inject_oom(monkeypatch, at_step, smallest=2, fits_when_checkpointing=False):
    """Trainer.training_step raises torch.OutOfMemoryError from optimizer step `at_step` on (1-based) while the
    micro-batch holds at least `smallest` rows (None: any number), unless `fits_when_checkpointing` and the run
    recomputes activations. Returns the (step, rows) of each error raised."""
    real_step = Trainer.training_step
    raised = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        rows = inputs["input_ids"].shape[0]
        fits = fits_when_checkpointing and self.args.gradient_checkpointing
        if self.state.global_step + 1 >= at_step and (smallest is None or rows >= smallest) and not fits:
            raised.append((self.state.global_step + 1, rows))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")
        return real_step(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(Trainer, "training_step", training_step)
    return raised


def _losses(history):
    return {row["step"]: row["loss"] for row in history if row.get("loss") is not None}


@pytest.fixture
def loaded(tiny_model_dir):
    def load():
        torch.manual_seed(0)  # the same LoRA initialisation for every run compared
        qm.load(tiny_model_dir, bits=8, dropout=0.0, device="cpu")  # the layouts below are the CPU's (the user's)
        return qm.get_session()
    return load


def test_out_of_memory_halves_the_micro_batch_and_the_curve_goes_on(loaded, rows, monkeypatch):
    loaded()
    whole = qm.train(rows, **SETTINGS)
    expected = _losses(whole.history)

    loaded()
    raised = _inject_oom(monkeypatch, at_step=4, smallest=3)
    summary = qm.train(rows, **SETTINGS)

    assert raised == [(4, 4)]  # once, at 4 rows; 2 rows fit
    assert summary.status == "completed" and summary.steps_done == 8
    assert str(summary.settings["batch"]) == "2x2"  # the effective batch of 4 kept
    assert summary.settings["out_of_memory"] == "at step 4: micro-batch 4 x 1 -> micro-batch 2 x 2"
    losses = _losses(summary.history)
    assert sorted(losses) == list(range(1, 9))  # every step once: none lost, none twice
    assert losses == pytest.approx(expected, rel=1e-4)
    history = [json.loads(line) for line in open(f"{summary.run_dir}/history.jsonl")]
    assert [row["step"] for row in history if "loss" in row] == list(range(1, 9))


def test_the_back_off_goes_down_to_one_row_then_gradient_checkpointing(loaded, rows, monkeypatch):
    loaded()
    raised = _inject_oom(monkeypatch, at_step=2, smallest=None, fits_when_checkpointing=True)
    summary = qm.train(rows, **SETTINGS)

    assert raised == [(2, 4), (2, 2), (2, 1)]
    assert summary.status == "completed" and summary.steps_done == 8
    assert summary.settings["gradient_checkpointing"] is True and str(summary.settings["batch"]) == "1x4"


def test_when_the_smallest_layout_fails_the_run_stops_in_one_line_with_a_checkpoint(loaded, rows, monkeypatch, ip):
    from qlora_magic.engine.run_folder import list_runs

    session = loaded()
    _inject_oom(monkeypatch, at_step=3, smallest=None)
    ip.user_ns["rows"] = rows
    result = ip.run_cell("%%qlora_train --max-steps 8 --batch-size 2 --grad-accum 1 --gradient-checkpointing --display none\n"
                         "data: $rows\nprompt: '{question} '\nresponse: '{answer}'\n")
    error = result.error_in_exec
    assert isinstance(error, OutOfMemory)
    message = str(error)
    assert "\n" not in message and message.startswith("Training ran out of GPU memory at step 3 even with micro-batch 1 x 2")
    assert "step 2 is kept in" in message and "--resume" in message and "--bits 4" in message
    assert session.model is not None and len(session.runs) == 1  # it trained two steps: recorded
    (folder,) = list_runs("runs")
    assert folder.status() == "failed" and folder.latest_checkpoint().name == "step-000002"
    assert folder.record["error"] == message
