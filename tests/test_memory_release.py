"""Memory comes back: after a run stopped by Ctrl-C or failed with an unexpected error (IPython keeping the
error in sys.last_traceback), the live tensors are those from before the run; %qlora_unload drops the model and
shows what it freed. Tensors are counted as the tuning notebook counts them (every torch tensor the garbage
collector sees, each storage once), and not collected first: what is still alive after the cell is what stays."""

import gc
import os
import re
import signal
import sys
import traceback
import weakref

import pytest
import torch

import qlora_magic as qm
from qlora_magic.display.reporters import NullReporter

FAST = dict(prompt="{question} ", response="{answer}", batch_size=8, grad_accum=1, lr=2e-2, display="none")


def live_tensors():
    """(count, bytes) of the torch tensors Python holds, each storage's bytes counted once."""
    count, storages = 0, {}
    for obj in gc.get_objects():
        try:
            if issubclass(type(obj), torch.Tensor) and not obj.is_meta:
                count += 1
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError, ReferenceError):
            continue
    return count, sum(storages.values())


def baseline(model):
    """The live tensors with the model loaded, and the slack allowed over them: a quarter of the LoRA weights'
    bytes, less than the gradients or either of Adam's states of a run (each as large as the weights)."""
    gc.collect()
    lora = sum(p.nbytes for name, p in model.named_parameters() if "lora_" in name)
    return live_tensors(), lora // 4


class At(NullReporter):
    """Does `action` when the run reports step `step`."""

    def __init__(self, step, action):
        self.at, self.action = step, action

    def step(self, progress):
        if progress["step"] == self.at:
            self.action()


def ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)  # what a kernel interrupt sends: the run stops at the step's end


def second_ctrl_c():
    raise KeyboardInterrupt  # a second Ctrl-C arrives in the middle of a step


def disk_full():
    raise RuntimeError("disk full")


def assert_back_to(before, slack):
    (count, size), (count_before, size_before) = live_tensors(), before
    assert count <= count_before and size - size_before <= slack, (
        f"{count - count_before} more tensors, {size - size_before} more bytes than before the run")


@pytest.mark.parametrize("interrupt", [ctrl_c, second_ctrl_c])
def test_memory_after_an_interrupted_run_returns_to_the_baseline(tiny_loaded, rows, ip, interrupt):
    before, slack = baseline(tiny_loaded.model)
    ip.user_ns.update(qm=qm, rows=rows, reporter=At(2, interrupt), FAST=FAST)
    result = ip.run_cell("summary = qm.train(rows, max_steps=20, reporter=reporter, **FAST)")
    assert result.success and ip.user_ns["summary"].status == "interrupted"
    assert_back_to(before, slack)  # the LoRA weights changed in place; the optimizer state and gradients went


def test_memory_after_a_failed_run_in_ipython_returns_to_the_baseline(tiny_loaded, rows, ip, capsys):
    before, slack = baseline(tiny_loaded.model)
    ip.user_ns.update(qm=qm, rows=rows, reporter=At(2, disk_full), FAST=FAST)
    result = ip.run_cell("qm.train(rows, max_steps=20, reporter=reporter, **FAST)")
    assert isinstance(result.error_in_exec, RuntimeError)
    assert sys.last_value is result.error_in_exec and sys.last_traceback is not None  # IPython keeps the error
    assert_back_to(before, slack)

    shown = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)  # the traceback still says where it failed
    assert re.search(r"qlora_magic/engine/training\.py:\d+", shown) and "RuntimeError: disk full" in shown
    frames = [frame for frame, _ in traceback.walk_tb(sys.last_traceback)]
    assert frames[-1].f_code is disk_full.__code__ and frames[-1].f_lineno == disk_full.__code__.co_firstlineno + 1
    run = next(frame for frame in frames if frame.f_code.co_name == "run_training")
    assert run.f_locals == {}  # what held the trainer, its optimizer and the batch
    assert qm.train(rows, max_steps=2, **FAST).status == "completed"  # and the model trains again


def test_unload_drops_the_model_and_says_what_it_freed(tiny_loaded, rows, ip, capsys):
    qm.train(rows, max_steps=2, **FAST)
    history, model = list(tiny_loaded.history), weakref.ref(tiny_loaded.model)
    weights = [weakref.ref(t) for t in [*tiny_loaded.model.parameters(), *tiny_loaded.model.buffers()]]
    model_bytes = sum(t().untyped_storage().nbytes() for t in weights)
    gc.collect()
    loaded_count, loaded_bytes = live_tensors()

    assert ip.run_cell("%qlora_unload").success
    shown = capsys.readouterr().out
    assert shown.startswith("Model unloaded\n") and "8-bit (LLM.int8)" in shown and "freed" in shown
    assert model() is None and tiny_loaded.model is tiny_loaded.tokenizer is tiny_loaded.load_config is None
    count, size = live_tensors()
    # Every weight of the model is gone (other tests' leftovers may still be alive: counted relative to the model).
    assert not [ref for ref in weights if ref() is not None]
    assert loaded_bytes - size >= 0.9 * model_bytes, (size, loaded_bytes, model_bytes)
    assert loaded_count - count >= len(weights) * 0.9, (count, loaded_count)
    assert tiny_loaded.history == history  # what the runs logged stays

    assert ip.run_cell("%qlora_unload").success  # nothing to unload: said, and the cell does not fail
    assert capsys.readouterr().out.strip() == "No model is loaded: nothing to unload."
    result = ip.run_cell("%qlora_generate hello")
    assert not result.success
    assert capsys.readouterr().out.strip().splitlines() == [
        "NoModelError: No model is loaded, so generation cannot run: run %qlora_load (or qlora_magic.load()) first."]


def test_the_unload_readout(tiny_loaded):
    report = qm.unload()
    assert report.unloaded.endswith("8-bit (LLM.int8)") and report.before.model_footprint > 0
    rows = dict(report.rows())
    assert rows["model footprint"] != "-" and "->" in rows["CPU process (RSS)"] and rows["freed"].endswith(" memory")
    assert "<table>" in report._repr_html_()
    nothing = qm.unload()
    assert nothing.unloaded is None and nothing.freed == 0
    assert repr(nothing) == "No model is loaded: nothing to unload." and "nothing to unload" in nothing._repr_html_()


def test_unload_takes_no_options(ip, capsys):
    result = ip.run_cell("%qlora_unload extra")
    assert not result.success
    shown = capsys.readouterr()
    assert (shown.out + shown.err).strip().splitlines() == [
        "UsageError: %qlora_unload: unrecognized arguments: extra; %qlora_unload? lists the options."]


@pytest.mark.slow
def test_unloading_the_default_model_frees_its_memory():
    qm.load()  # the embedded SmolLM2-135M, 8-bit
    report = qm.unload()
    assert report.unloaded.startswith("SmolLM2-135M-Instruct") and qm.get_session().model is None
    assert report.freed > report.before.model_footprint / 2, repr(report)  # GPU allocated, or the RSS on a CPU
