"""--report-to: the Trainer's tracker integrations pointed at local stores; a real MLflow store holds what the
session's history holds."""

import importlib.util

import pytest

import qlora_magic
from qlora_magic.config import TrainConfig
from qlora_magic.engine import trackers
from qlora_magic.errors import ConfigError
from qlora_magic.front import parsing
from test_run_folders import _stop_at  # a Stop click during a given step

BODY = 'data: $rows\nprompt: "Q: {question}\\nA: "\nresponse: "{answer}"\n'
ROWS = {"rows": [{"question": "q", "answer": "a"}]}


def _settings(**changes):
    return TrainConfig(data=[{"q": 1}], prompt="{q}", response="{q}", **changes)


def test_report_to_is_parsed_and_defaults_to_tensorboard():
    assert parsing.parse_train("", BODY, ROWS).report_to == "tensorboard"
    assert parsing.parse_train("--report-to TensorBoard,mlflow", BODY, ROWS).report_to == "tensorboard,mlflow"
    assert parsing.parse_train("--report-to none", BODY, ROWS).report_to == "none"
    assert _settings(report_to=["wandb", "trackio"]).report_to == "wandb,trackio"
    tune = parsing.parse_tune("--report-to mlflow", BODY + "eval_split: 0.25\nsearch:\n  r: [2, 4]\n", ROWS)
    assert tune.train.report_to == "mlflow"


@pytest.mark.parametrize("value", ["", "comet", "mlflow,mlflow", "none,mlflow", "mlflow,"])
def test_bad_report_to_is_one_line(value):
    with pytest.raises(ConfigError, match="--report-to takes") as error:
        _settings(report_to=value)
    assert "\n" not in str(error.value)


def test_the_trainer_gets_every_tracker_but_tensorboard():
    assert trackers.trainer_report_to(("tensorboard",)) == ["none"]
    assert trackers.trainer_report_to(("tensorboard", "mlflow", "wandb")) == ["mlflow", "wandb"]


def test_a_tracker_not_installed_names_its_pip_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trackio" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install trackio"):
        trackers.check_installed(("tensorboard", "trackio"))


def test_a_tracker_not_installed_fails_before_anything_is_written(tiny_loaded, rows, tmp_path, monkeypatch):
    monkeypatch.setattr(trackers, "PACKAGES", {**trackers.PACKAGES, "trackio": "trackio-not-a-package"})
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trackio" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install trackio-not-a-package"):
        qlora_magic.train(data=rows, prompt="{question}", response="{answer}", max_steps=1,
                          output_dir=str(tmp_path / "runs"), report_to="trackio")
    assert not (tmp_path / "runs").exists() and not qlora_magic.get_session().history


def test_wandb_without_a_key_goes_offline_with_a_note(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setattr(trackers, "check_installed", lambda names: None)
    notes = []
    with trackers.trackers_for_run(("wandb",), tmp_path, note=notes.append):
        import os

        assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_PROJECT"] == "qlora_magic"
    assert "WANDB_MODE" not in os.environ  # only for the run
    assert len(notes) == 1 and "offline" in notes[0] and "\n" not in notes[0]
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    with trackers.trackers_for_run(("wandb",), tmp_path, note=notes.append):
        assert "WANDB_MODE" not in os.environ
    assert len(notes) == 1


mlflow = pytest.importorskip("mlflow") if importlib.util.find_spec("mlflow") else None


@pytest.mark.skipif(mlflow is None, reason="mlflow is not installed")
def test_mlflow_store_holds_the_sessions_history(tiny_loaded, rows, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(trackers, "_our_mlflow_uri", None)
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    qlora_magic.train(data=rows, prompt="Q: {question}\nA: ", response="{answer}", max_steps=4, batch_size=4,
                      grad_accum=1, output_dir=str(tmp_path / "runs"), name="tracked", report_to="tensorboard,mlflow",
                      display="none")
    history = [(row["step"], row["loss"]) for row in qlora_magic.get_session().history if row.get("loss") is not None]
    assert len(history) == 4
    client = mlflow.tracking.MlflowClient(trackers.mlflow_store(tmp_path / "runs"))
    (experiment,) = [e for e in client.search_experiments() if e.name == "qlora_magic"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name.endswith("-tracked") and run.info.status == "FINISHED"
    logged = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(logged) == pytest.approx(history)
    assert mlflow.active_run() is None
    (folder,) = (tmp_path / "runs").glob("*-tracked")
    assert (folder / "tensorboard").is_dir()


@pytest.fixture
def local_mlflow(monkeypatch):
    """MLflow with no store chosen yet, as in a new kernel: the run's folder decides it."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.setattr(trackers, "_our_mlflow_uri", None)
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)


@pytest.mark.skipif(mlflow is None, reason="mlflow is not installed")
def test_a_resumed_run_carries_on_its_mlflow_run(tiny_loaded, rows, tmp_path, local_mlflow):
    from qlora_magic.engine.run_folder import list_runs
    from qlora_magic.tasks.finetune import finetune

    config = TrainConfig(data=rows, prompt="Q: {question}\nA: ", response="{answer}", max_steps=4, batch_size=4,
                         grad_accum=1, output_dir=str(tmp_path / "runs"), name="kept", report_to="mlflow", display="none")
    flag, stop_at = _stop_at(2)
    stopped = finetune(qlora_magic.get_session(), config, stop=flag, callbacks=[stop_at])
    assert stopped.status == "interrupted" and stopped.steps_done == 2
    (folder,) = list_runs(tmp_path / "runs")
    client = mlflow.tracking.MlflowClient(trackers.mlflow_store(tmp_path / "runs"))
    (first,) = client.search_runs([client.get_experiment_by_name("qlora_magic").experiment_id])
    assert folder.record["trackers"] == {"mlflow": first.info.run_id}

    qlora_magic.reset_session()  # as a new kernel
    trackers._our_mlflow_uri = None
    mlflow.tracking._tracking_service.utils._tracking_uri = None
    resumed = qlora_magic.train(resume=str(folder.path), display="none")
    assert resumed.status == "completed" and resumed.steps_done == 4
    (run,) = client.search_runs([client.get_experiment_by_name("qlora_magic").experiment_id])  # still one
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    history = {row["step"]: row["loss"] for row in qlora_magic.get_session().history if row.get("loss") is not None}
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert sorted(history) == [1, 2, 3, 4] and logged == pytest.approx(history)
    assert mlflow.active_run() is None and "MLFLOW_RUN_ID" not in __import__("os").environ


@pytest.mark.skipif(mlflow is None, reason="mlflow is not installed")
def test_a_resumed_run_whose_mlflow_run_is_elsewhere_logs_a_new_one_and_says_so(tmp_path, local_mlflow):
    notes = []
    with trackers.trackers_for_run(("mlflow",), tmp_path, note=notes.append, resume={"mlflow": "0" * 32}):
        assert "MLFLOW_RUN_ID" not in __import__("os").environ
    assert len(notes) == 1 and "not in this store" in notes[0] and "new MLflow run" in notes[0]


@pytest.mark.skipif(mlflow is None, reason="mlflow is not installed")
def test_tune_trials_are_nested_runs_of_one_parent(tiny_loaded, rows, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(trackers, "_our_mlflow_uri", None)
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    qlora_magic.tune(rows, prompt="Q: {question}\nA: ", response="{answer}", eval_split=0.25, max_steps=2, batch_size=4,
                     grad_accum=1, output_dir=str(tmp_path / "runs"), report_to="mlflow", search={"r": [2, 4]},
                     trials=2, prune=False)
    client = mlflow.tracking.MlflowClient(trackers.mlflow_store(tmp_path / "runs"))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and parents[0].info.run_name.startswith("tune-")
    assert sorted(r.info.run_name.rsplit("-", 1)[1] for r in trials) == ["trial0", "trial1"]
    assert not (tmp_path / "runs" / "tensorboard").exists() and mlflow.active_run() is None


def test_trackio_gets_the_runs_losses_through_the_trainers_integration(tiny_loaded, rows, tmp_path, monkeypatch):
    """trackio itself is not a test dependency (it would change shared packages): a stand-in records the calls."""
    import importlib.machinery
    import sys
    from unittest import mock

    fake = mock.MagicMock(__version__="0.43.0", __spec__=importlib.machinery.ModuleSpec("trackio", None))
    fake.context_vars.current_space_id.get.return_value = None  # local: no Space
    monkeypatch.setitem(sys.modules, "trackio", fake)
    qlora_magic.train(data=rows, prompt="Q: {question}\nA: ", response="{answer}", max_steps=3, batch_size=4,
                      grad_accum=1, output_dir=str(tmp_path / "runs"), name="tracked", report_to="trackio", display="none")
    (init,) = fake.init.call_args_list
    assert init.kwargs["project"] == "qlora_magic" and init.kwargs["name"].endswith("-tracked") and not init.kwargs["space_id"]
    logged = [(c.args[0]["train/global_step"], c.args[0]["train/loss"]) for c in fake.log.call_args_list if "train/loss" in c.args[0]]
    history = [(row["step"], row["loss"]) for row in qlora_magic.get_session().history if row.get("loss") is not None]
    assert logged == pytest.approx(history) and fake.finish.called
    (folder,) = (tmp_path / "runs").glob("*-tracked")
    assert not (folder / "tensorboard").exists()  # --report-to names every tracker: TensorBoard only when asked


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_without_a_key_logs_a_real_run_offline_and_asks_nothing(tiny_loaded, rows, tmp_path, monkeypatch):
    """A notebook with no W&B login: the run goes offline with a note (no prompt waits for input; pytest's stdin
    raises if anything reads it), and run.json keeps the W&B run's id for --resume."""
    from qlora_magic.engine.run_folder import list_runs

    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no wandb settings
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    summary = qlora_magic.train(data=rows, prompt="Q: {question}\nA: ", response="{answer}", max_steps=2,
                                batch_size=4, grad_accum=1, output_dir=str(tmp_path / "runs"), report_to="wandb",
                                display="none")
    assert summary.status == "completed" and "WANDB_MODE" not in __import__("os").environ
    (offline,) = tmp_path.glob("wandb/offline-run-*")
    (folder,) = list_runs(tmp_path / "runs")
    assert offline.name.endswith("-" + folder.record["trackers"]["wandb"])
    assert list(offline.glob("*.wandb"))  # the run's own log, for `wandb sync`
