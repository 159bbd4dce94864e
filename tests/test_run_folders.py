"""Every training run keeps a run folder (run.json, history.jsonl, data.jsonl, checkpoints) and can be carried
on from its latest checkpoint with --resume; what --resume cannot do is said in one line, before any model is
loaded, with the session left as it was. Real runs on the tiny offline Llama (the SIGKILL test of a real
kernel is tests/test_resume.py)."""

import json
import os

import pytest
import torch

import qlora_magic as qm
from qlora_magic.engine.run_folder import RunFolder, data_fingerprint, list_runs
from qlora_magic.engine.stopping import StopFlag
from qlora_magic.errors import ConfigError

FAST = dict(prompt="{question} ", response="{answer}", batch_size=4, grad_accum=1, lr=2e-2, display="none", seed=0)


def _stop_at(step):
    """A StopFlag and a callback that sets it as a Stop click during step `step` would: the run's own check,
    which comes before this callback's, sees it at the end of step `step`."""
    from transformers import TrainerCallback

    flag = StopFlag()

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step - 1:
                flag.set("test")

    return flag, StopAt()


def _run(rows, callbacks=None, stop=None, **options):
    from qlora_magic.config import TrainConfig
    from qlora_magic.tasks.finetune import finetune

    return finetune(qm.get_session(), TrainConfig(data=rows, **{**FAST, **options}), callbacks=callbacks, stop=stop)


def test_a_run_leaves_a_folder_with_its_record_history_and_a_loadable_checkpoint(tiny_loaded, rows, tiny_model_dir):
    summary = qm.train(rows, max_steps=4, eval_split=8, name="colours", **FAST)
    (folder,) = list_runs("runs")
    assert folder.path.name.endswith("-colours") and str(folder.path) == summary.run_dir
    record = folder.record
    assert record["status"] == "completed" and record["steps_done"] == 4 and record["total_steps"] == 4
    assert record["load_config"]["model"] == tiny_model_dir and record["train_config"]["lr"] == FAST["lr"]
    assert record["data"]["rows"] == len(rows) and record["data"]["saved"] == "data.jsonl"
    saved_rows = [json.loads(line) for line in (folder.path / "data.jsonl").read_text().splitlines()]
    assert saved_rows == rows
    assert folder.history() == qm.get_session().history  # every row, as logged
    (checkpoint,) = folder.checkpoints()  # the one at the end; the evaluations' ones were replaced
    assert checkpoint.name == "step-000004" and folder.info().checkpoint_step == 4
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
            "qlora_magic.json"} <= {p.name for p in checkpoint.iterdir()}
    answer = qm.generate("what is the color of the sky", greedy=True, max_new_tokens=4, stream=False)
    qm.load(adapter=str(checkpoint))  # a checkpoint is an adapter folder: base, runs and history come back
    assert qm.generate("what is the color of the sky", greedy=True, max_new_tokens=4, stream=False) == answer
    assert len(qm.get_session().runs) == 1 and qm.get_session().history == folder.history()


def test_a_data_file_names_the_run_and_is_not_copied(tiny_loaded, rows, tmp_path):
    path = tmp_path / "my colours.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    qm.train(str(path), max_steps=1, **FAST)
    qm.train(str(path), max_steps=1, **FAST)
    names = sorted(folder.path.name for folder in list_runs("runs"))
    assert all(name.endswith("-my-colours") or name.endswith("-my-colours-2") for name in names)
    assert all(not (folder.path / "data.jsonl").exists() for folder in list_runs("runs"))
    assert {folder.record["data"]["source"] for folder in list_runs("runs")} == {str(path)}


def test_checkpoints_come_by_the_clock_and_only_the_latest_is_kept(tiny_loaded, rows):
    saved = []
    from transformers import TrainerCallback

    class Saves(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            saved.append(state.global_step)

    _run(rows, callbacks=[Saves()], max_steps=4, checkpoint_minutes=1e-9)
    assert saved == [1, 2, 3, 4]
    (folder,) = list_runs("runs")
    assert [p.name for p in folder.checkpoints()] == ["step-000004"]
    assert not [p for p in (folder.path / "checkpoints").iterdir() if p.name.startswith(".")]  # no staging left


def test_a_stopped_run_resumes_to_the_end_with_the_losses_of_an_uninterrupted_one(tiny_model_dir, rows):
    torch.manual_seed(0)
    qm.load(tiny_model_dir, bits=8)
    whole = qm.train(rows, max_steps=6, eval_split=8, output_dir="whole", **FAST)

    torch.manual_seed(0)
    qm.load(tiny_model_dir, bits=8)
    flag, stop_at = _stop_at(3)
    stopped = _run(rows, callbacks=[stop_at], stop=flag, max_steps=6, eval_split=8)
    assert stopped.status == "interrupted" and stopped.steps_done == 3
    (folder,) = list_runs("runs")
    assert folder.status() == "interrupted" and folder.info().checkpoint_step == 3

    qm.reset_session()  # as a new kernel: nothing loaded, no rows given
    resumed = qm.train(resume=True, display="none")
    assert resumed.status == "completed" and resumed.steps_done == 6
    history = qm.get_session().history
    assert [row["step"] for row in history if "loss" in row] == list(range(1, 7))
    expected = {row["step"]: row["loss"] for row in whole.history if "loss" in row}
    assert {row["step"]: row["loss"] for row in history if "loss" in row} == pytest.approx(expected, rel=1e-5)
    assert folder.status() == "completed" and len(qm.get_session().runs) == 1


@pytest.fixture
def stopped_run(tiny_loaded, rows):
    flag, stop_at = _stop_at(2)
    _run(rows, callbacks=[stop_at], stop=flag, max_steps=4)
    (folder,) = list_runs("runs")
    return folder


@pytest.mark.parametrize("options, message", [
    ({"resume": True, "lr": 0.5}, "--resume goes on with the run's own settings: drop --lr (a new run, without --resume, takes new settings)."),
    ({"resume": "nowhere"}, "--resume 'nowhere' is not a run folder (no run.json there): give a folder under runs/, or --resume alone for the latest run."),
    ({"resume": True, "output_dir": "empty"}, "No run under 'empty' has a checkpoint to resume: give --resume the run folder, or --output-dir the folder that holds your runs."),
    ({"resume": True, "data": [{"question": "a", "answer": "b"}]}, "These rows (1) are not the ones the run"),
])
def test_what_resume_cannot_do_is_one_line_and_the_session_stays(stopped_run, options, message):
    session = qm.get_session()
    model, history = session.model, list(session.history)
    with pytest.raises(ConfigError) as error:
        qm.train(display="none", **options)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert session.model is model and session.history == history
    assert stopped_run.status() == "interrupted"


def test_a_finished_run_or_a_running_one_is_not_resumed(stopped_run):
    qm.train(resume=True, display="none")
    with pytest.raises(ConfigError, match="completed all its 4 steps: nothing to resume"):
        qm.train(resume=True, display="none")
    stopped_run.update(status="running", process={"host": os.uname().nodename, "pid": os.getpid(),
                                                  "started": __import__("psutil").Process().create_time()})
    with pytest.raises(ConfigError, match="is still running: stop it first"):
        qm.train(resume=str(stopped_run.path), display="none")


def test_a_run_whose_process_is_gone_is_crashed(stopped_run):
    stopped_run.update(status="running", process={"host": os.uname().nodename, "pid": 2**22 + 7, "started": 0})
    assert stopped_run.status() == "crashed"
    stopped_run.update(process={"host": "another-machine", "pid": 1, "started": 0})  # a Colab runtime on Drive
    os.utime(stopped_run.path / "history.jsonl", (0, 0))  # silent for long
    assert stopped_run.status() == "crashed"


def test_a_run_that_fails_before_its_first_step_says_failed_and_keeps_no_checkpoint(tiny_loaded, rows, monkeypatch):
    from transformers import Trainer

    def broken(*args, **kwargs):
        raise RuntimeError("broken step")

    monkeypatch.setattr(Trainer, "training_step", broken)
    with pytest.raises(RuntimeError, match="broken step"):
        qm.train(rows, max_steps=2, **FAST)
    (folder,) = list_runs("runs")
    assert folder.status() == "failed" and folder.checkpoints() == [] and folder.record["error"] == "broken step"


def test_bad_run_options_are_one_line():
    with pytest.raises(ConfigError, match="--checkpoint-minutes must be >= 0"):
        qm.train([{"q": "a"}], prompt="{q}", response="{q}", checkpoint_minutes=-1)
    with pytest.raises(ConfigError, match="--name is empty"):
        qm.train([{"q": "a"}], prompt="{q}", response="{q}", name=" ")
    with pytest.raises(ConfigError, match="--resume takes a run folder"):
        qm.train(resume=5)


def test_the_fingerprint_is_the_rows_content():
    import datasets

    rows = [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]
    assert data_fingerprint(datasets.Dataset.from_list(rows)) == data_fingerprint(datasets.Dataset.from_list(list(rows)))
    assert data_fingerprint(datasets.Dataset.from_list(rows)) != data_fingerprint(datasets.Dataset.from_list(rows[::-1]))


def test_tuning_trials_keep_no_run_folders(tiny_loaded, rows):
    qm.tune(rows, trials=2, max_steps=1, eval_split=8, search={"lr": [1e-3, 1e-2]}, **{k: v for k, v in FAST.items() if k != "lr"})
    assert list_runs("runs") == []


def test_a_run_folder_cut_short_reads_back(tmp_path):
    folder = RunFolder(tmp_path)
    (tmp_path / "history.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # killed mid-line
    assert folder.history() == [{"step": 1, "loss": 2.0}] and folder.record == {} and folder.status() == "crashed"


@pytest.mark.parametrize("path", ["\x00bad", "\ud800", "x" * 300])
@pytest.mark.parametrize("verb", ["runs", "attach", "stop", "resume"])
def test_paths_no_file_system_takes_are_one_line(verb, path):
    call = {"runs": lambda: qm.runs(output_dir=path), "attach": lambda: qm.attach(path),
            "stop": lambda: qm.stop("x", output_dir=path), "resume": lambda: qm.train(resume=path)}[verb]
    with pytest.raises(ConfigError) as error:
        call()
    assert "\n" not in str(error.value) and "is no path a file system takes" in str(error.value)
