"""Runs that do not finish: Ctrl-C anywhere ends in one line with the session as it was and nothing held
in memory; a run is recorded only once it trained; a loss gone NaN/inf puts the adapter back; an interrupted
run says which evaluation it has. Real runs on the tiny offline Llama; the interrupt is raised from deep inside."""

import gc
import threading
import weakref

import pytest
import torch

import qlora_magic as qm
from qlora_magic.display.reporters import NullReporter
from qlora_magic.errors import ConfigError, DivergedError, Interrupted, QloraError
from qlora_magic.tasks.finetune import finetune

FAST = dict(prompt="{question} ", response="{answer}", batch_size=8, grad_accum=1, lr=2e-2, display="none")


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def same_weights(model, before):
    return all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


# --- Ctrl-C outside training: one line, the session as it was, memory released

def test_an_interrupted_load_keeps_the_loaded_model_and_frees_the_new_one(tiny_loaded, tiny_model_dir, monkeypatch):
    import peft

    old = tiny_loaded.model
    half_loaded = []

    def loaded_then_interrupted(model, **kwargs):  # the base is in memory; the LoRA step never comes
        half_loaded.append(weakref.ref(model))
        raise KeyboardInterrupt

    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", loaded_then_interrupted)
    with pytest.raises(Interrupted) as info:
        qm.load(tiny_model_dir, bits=4)
    message = str(info.value)
    assert message.startswith("The load was interrupted: the session keeps its model") and "\n" not in message
    assert isinstance(info.value, KeyboardInterrupt) and info.value.__context__ is None
    assert qm.get_session() is tiny_loaded and tiny_loaded.model is old and tiny_loaded.load_config.bits == 8
    gc.collect()
    assert half_loaded and half_loaded[0]() is None  # no traceback frame keeps the new model alive


def test_an_interrupted_first_load_in_ipython_is_one_line_and_leaves_nothing_alive(tiny_model_dir, monkeypatch, ip, capsys):
    import peft

    half_loaded = []

    def loaded_then_interrupted(model, **kwargs):
        half_loaded.append(weakref.ref(model))
        raise KeyboardInterrupt

    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", loaded_then_interrupted)
    result = ip.run_cell(f"%qlora_load {tiny_model_dir}")
    assert isinstance(result.error_in_exec, Interrupted)  # the cell failed, as a Ctrl-C fails it
    assert capsys.readouterr().out.strip().splitlines() == [
        "Interrupted: The load was interrupted: no model is loaded: run %qlora_load again."]
    qm.reset_session()
    gc.collect()
    assert half_loaded and half_loaded[0]() is None  # nor does IPython's record of the last error


def test_an_interrupted_generation_is_one_line(tiny_loaded, monkeypatch):
    from qlora_magic.engine import generation

    monkeypatch.setattr(generation, "build_inputs", interrupt)
    with pytest.raises(Interrupted, match=r"^The generation was interrupted before its first words: run it again\.$"):
        qm.generate("sky", stream=False)
    assert tiny_loaded.last_generation is None


def test_ctrl_c_in_the_middle_of_an_answer_keeps_the_text_so_far(tiny_loaded):
    chunks = []

    def reader(chunk):  # Ctrl-C arrives while the third piece is shown
        chunks.append(chunk)
        if len(chunks) == 3:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match=r"^The generation was stopped after \d+ characters: the text so far is in get_session\(\)\.last_generation\.$"):
        qm.generate("sky", greedy=True, max_new_tokens=40, raw=True, on_text=reader)
    assert tiny_loaded.last_generation == "".join(chunks)
    assert not [t for t in threading.enumerate() if t.is_alive() and t.name.startswith("Thread") and t.daemon
                and "work" in repr(getattr(t, "_target", ""))]  # the generating thread ended
    assert qm.generate("sky", greedy=True, max_new_tokens=3, raw=True, stream=False) is not None  # and it answers again


def test_an_interrupted_evaluation_records_nothing(tiny_loaded, rows, monkeypatch):
    from qlora_magic.tasks import evaluation

    monkeypatch.setattr(evaluation, "response_nll", interrupt)
    with pytest.raises(Interrupted, match=r"^The evaluation was interrupted: nothing was recorded; run it again\.$"):
        qm.evaluate(rows[:4], prompt="{question} ", response="{answer}")
    assert tiny_loaded.history == []


def test_an_interrupted_merge_writes_nothing(tiny_loaded, tmp_path, monkeypatch):
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", interrupt)
    before = trainable(tiny_loaded.model)
    with pytest.raises(Interrupted, match=r"^The merge was interrupted: the session's model is unchanged"):
        qm.merge(tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert same_weights(tiny_loaded.model, before)


def test_a_merge_or_export_interrupted_in_its_check_says_the_folder_is_whole(tiny_loaded, tmp_path, monkeypatch):
    """Written whole, then Ctrl-C in the check: the line says so (a rerun into that folder would be refused),
    and what is there loads."""
    from qlora_magic.tasks import exporting, merging

    before = trainable(tiny_loaded.model)
    monkeypatch.setattr(merging, "_verify_answers", interrupt)
    with pytest.raises(Interrupted) as merge:
        qm.merge(tmp_path / "merged")
    assert str(merge.value).startswith(f"The merge's check was interrupted: {str(tmp_path / 'merged')!r} is written whole")
    assert "\n" not in str(merge.value) and (tmp_path / "merged" / "config.json").exists()
    monkeypatch.setattr(exporting, "_verify", interrupt)
    with pytest.raises(Interrupted, match=r"^The export's check was interrupted: .*\.gguf' is written whole but not checked"):
        qm.export("gguf", tmp_path / "gguf")
    assert [p.suffix for p in (tmp_path / "gguf").iterdir()] == [".gguf"]
    assert same_weights(tiny_loaded.model, before)


def test_an_interrupted_search_leaves_the_adapters_as_they_were(tiny_loaded, rows, monkeypatch, capfd):
    from qlora_magic.engine import data

    before = trainable(tiny_loaded.model)
    monkeypatch.setattr(data, "prepare_datasets", interrupt)  # inside the first trial, its adapter added
    with pytest.raises(Interrupted, match=r"^The search was interrupted"):
        qm.tune(rows, search={"r": [4, 8]}, trials=2, max_steps=1, eval_split=8, **FAST)
    assert list(tiny_loaded.model.peft_config) == ["default"] and tiny_loaded.model.active_adapter == "default"
    assert same_weights(tiny_loaded.model, before) and tiny_loaded.last_tune_report is None
    assert "Traceback" not in capfd.readouterr().err  # nor does Optuna log the failed trial's


def test_training_interrupted_before_its_first_step_changes_nothing(tiny_loaded, rows, monkeypatch):
    from qlora_magic.engine import data

    monkeypatch.setattr(data, "prepare_datasets", interrupt)
    with pytest.raises(Interrupted, match=r"^Training was interrupted before its first step"):
        qm.train(rows, max_steps=2, **FAST)
    assert tiny_loaded.runs == [] and tiny_loaded.history == []


def test_interrupted_is_a_one_line_keyboard_interrupt():
    error = Interrupted("The load was interrupted: run it again.")
    assert isinstance(error, KeyboardInterrupt) and isinstance(error, QloraError)
    assert error._render_traceback_() == ["Interrupted: The load was interrupted: run it again."]


# --- a run is recorded only once it has trained

def test_a_run_that_fails_before_training_is_not_recorded(tiny_loaded, rows, monkeypatch, tmp_path):
    from qlora_magic.engine import training

    def no_trainer(*args, **kwargs):
        raise RuntimeError("no trainer today")

    monkeypatch.setattr(training, "build_trainer", no_trainer)
    with pytest.raises(RuntimeError, match="no trainer today"):
        qm.train(rows, max_steps=2, **FAST)
    assert tiny_loaded.runs == [] and tiny_loaded.history == []
    monkeypatch.undo()

    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    with pytest.raises(ConfigError) as info:
        qm.train(rows, max_steps=2, output_dir=str(a_file / "run"), **FAST)
    assert "a-file" in str(info.value) and "\n" not in str(info.value)
    assert tiny_loaded.runs == [] and tiny_loaded.history == [] and a_file.read_text() == "not a folder"


def test_a_run_that_fails_after_it_trained_is_recorded(tiny_loaded, rows):
    from transformers import TrainerCallback

    class FailAtStep2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        finetune(tiny_loaded, qm.config.TrainConfig(data=rows, max_steps=5, **FAST), callbacks=[FailAtStep2()])
    assert len(tiny_loaded.runs) == 1  # two steps changed the adapter: the record says how


# --- a loss or gradient gone non-finite

class PoisonAt:
    """After optimizer step `step`, one LoRA weight becomes NaN (as a too-large learning rate ends): the next
    step's loss and gradients are NaN."""

    def __new__(cls, step):
        from transformers import TrainerCallback

        class Poison(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step == step:
                    with torch.no_grad():
                        next(p for n, p in model.named_parameters() if "lora_A" in n)[0, 0] = float("nan")

        return Poison()


def test_a_loss_gone_nan_puts_the_adapter_back_and_says_so(tiny_loaded, rows):
    qm.train(rows, max_steps=2, **FAST)  # an earlier run: the adapter goes back to its weights after it
    before, history = trainable(tiny_loaded.model), list(tiny_loaded.history)
    answer_before = qm.generate("sky", greedy=True, max_new_tokens=3, stream=False, raw=True)
    config = qm.config.TrainConfig(data=rows, max_steps=20, **FAST)
    with pytest.raises(DivergedError) as info:
        finetune(tiny_loaded, config, callbacks=[PoisonAt(3)])
    assert str(info.value) == ("The training loss became nan at step 4: the adapter is back to its weights before "
                               "this run; lower --lr (now 0.02).")
    assert same_weights(tiny_loaded.model, before)
    assert len(tiny_loaded.runs) == 1 and tiny_loaded.history == history  # the diverged run left no record
    assert tiny_loaded.last_train_summary.steps_done == 2
    answer = qm.generate("sky", greedy=True, max_new_tokens=3, stream=False, raw=True)
    assert answer is not None and answer == answer_before  # the adapter answers as it did before the run
    summary = qm.train(rows, max_steps=2, **FAST)  # and it trains again
    assert summary.status == "completed" and all(torch.isfinite(p).all() for p in trainable(tiny_loaded.model).values())


def test_weights_gone_nan_at_the_last_step_are_put_back_too(tiny_loaded, rows):
    before = trainable(tiny_loaded.model)
    with pytest.raises(DivergedError, match=r"^The adapter's weights became NaN or infinite at step 3: the adapter is back"):
        finetune(tiny_loaded, qm.config.TrainConfig(data=rows, max_steps=3, **FAST), callbacks=[PoisonAt(3)])
    assert same_weights(tiny_loaded.model, before) and tiny_loaded.runs == [] and tiny_loaded.history == []


def test_a_huge_learning_rate_is_refused_before_any_training(tiny_loaded, rows):
    # lr 1e30 once left the loss finite (stuck at ln(vocab)) and the adapter wrecked, where no divergence check sees it
    before = trainable(tiny_loaded.model)
    with pytest.raises(ConfigError, match=r"^--lr must be at most 1.0, got 1e\+37"):
        qm.train(rows, max_steps=6, **{**FAST, "lr": 1e37})
    assert same_weights(tiny_loaded.model, before) and tiny_loaded.runs == [] and tiny_loaded.history == []


# --- an interrupted run's eval loss

def test_an_interrupted_run_shows_the_one_eval_loss_it_has(tiny_loaded, rows):
    stop = qm.api.StopFlag()

    class StopAt2(NullReporter):
        def step(self, progress):
            if progress["step"] == 2:
                stop.set()

    summary = qm.train(rows, max_steps=50, eval_split=8, eval_steps=10, reporter=StopAt2(), stop=stop, **FAST)
    assert summary.status == "interrupted" and summary.steps_done == 2
    row = dict(summary.rows())["eval loss"]
    first = summary.history[0]["eval_loss"]
    assert row == f"{first:.4f} (before training; the run stopped before the next evaluation)"
    assert len(tiny_loaded.runs) == 1  # two steps trained: the run is recorded


def test_a_completed_run_shows_eval_loss_before_and_after(tiny_loaded, rows):
    summary = qm.train(rows, max_steps=3, eval_split=8, **FAST)
    first, last = summary.eval_loss
    assert dict(summary.rows())["eval loss"] == f"{first:.4f} -> {last:.4f}"
