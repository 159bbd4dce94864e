"""Experiment trackers beyond TensorBoard (--report-to mlflow,trackio,wandb), through the Trainer's own
integrations: this module only checks they can run here and points them at a local place, for one run.

- mlflow: a sqlite store next to the run folders (<output-dir>/mlflow.db; `mlflow ui --backend-store-uri
  sqlite:///runs/mlflow.db` shows it), unless MLFLOW_TRACKING_URI is set or mlflow.set_tracking_uri was called;
  experiment "qlora_magic" unless MLFLOW_EXPERIMENT_NAME is set.
- trackio: its local store (TRACKIO_DIR, default ~/.cache/huggingface/trackio), project "qlora_magic".
- wandb: online when an API key is set up (WANDB_API_KEY, `wandb login`) or WANDB_MODE says so; otherwise
  offline in ./wandb with a one-line note, so no login prompt ever waits for input in a notebook.

`tracking_group` puts the runs started inside it in one group (%%qlora_tune's trials): nested runs under one
MLflow parent run, one W&B group.
"""

from __future__ import annotations

import contextlib
import importlib.util
import netrc
import os
from pathlib import Path

from ..errors import ConfigError

PROJECT = "qlora_magic"
PACKAGES = {"mlflow": "mlflow", "trackio": "trackio", "wandb": "wandb"}  # tracker: what to pip install
_our_mlflow_uri = None  # the store this module pointed mlflow at (a user's own set_tracking_uri is kept)


def check_installed(trackers) -> None:
    """One line naming the pip install for a tracker asked for but not installed."""
    for name in trackers:
        if name in PACKAGES and importlib.util.find_spec(name) is None:
            raise ConfigError(f"--report-to {name} needs the {name} package: pip install {PACKAGES[name]}")


def trainer_report_to(trackers) -> list[str]:
    """What TrainingArguments.report_to gets: TensorBoard stays our own callback (our folder), the rest the Trainer's."""
    return [name for name in trackers if name != "tensorboard"] or ["none"]


@contextlib.contextmanager
def _environment(values: dict):
    """os.environ with `values` set for the block, as it was after."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def mlflow_store(output_root: Path) -> str:
    """The tracking URI of the local store under `output_root` (the folder that holds the run folders)."""
    return f"sqlite:///{(Path(output_root) / 'mlflow.db').resolve()}"


def _point_mlflow(output_root: Path) -> None:
    global _our_mlflow_uri
    import mlflow

    if os.environ.get("MLFLOW_TRACKING_URI"):
        return
    if mlflow.is_tracking_uri_set() and mlflow.get_tracking_uri() != _our_mlflow_uri:
        return  # the user chose a store in this process
    _our_mlflow_uri = mlflow_store(output_root)
    mlflow.set_tracking_uri(_our_mlflow_uri)


def wandb_configured() -> bool:
    """An API key wandb would find without asking: WANDB_API_KEY or a `wandb login` entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


@contextlib.contextmanager
def trackers_for_run(trackers, output_root: Path, note=None, resume: dict | None = None):
    """The environment the Trainer's integrations read, for one run; `note(text)` gets one-line notices.
    `resume`: the tracker runs of the run this one carries on (run.json's "trackers", from `recorder`), which
    the integrations then continue: one MLflow run and one W&B run hold the whole history of a resumed run.
    Yields a `Trainers` to watch each Trainer of the run with. A run that ends in an error leaves no MLflow run
    open behind it."""
    check_installed(trackers)
    env, resume = {}, resume or {}
    if "mlflow" in trackers:
        _point_mlflow(output_root)
        env.setdefault("MLFLOW_EXPERIMENT_NAME", os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT)
        if resume.get("mlflow"):
            if _mlflow_run_here(resume["mlflow"]):
                env["MLFLOW_RUN_ID"] = resume["mlflow"]
            elif note:
                import mlflow

                note(f"mlflow: the run's MLflow run {resume['mlflow']} is not in this store "
                     f"({mlflow.get_tracking_uri()}), so the resumed steps are logged as a new MLflow run")
    if "wandb" in trackers:
        env["WANDB_PROJECT"] = os.environ.get("WANDB_PROJECT") or PROJECT
        if not os.environ.get("WANDB_MODE") and not wandb_configured():
            env["WANDB_MODE"] = "offline"
            if note:
                note("wandb: no API key here, so the run is logged offline in ./wandb (`wandb sync` uploads it; "
                     "set WANDB_API_KEY or run `wandb login` to log online)")
        if resume.get("wandb"):
            env["WANDB_RUN_ID"], env["WANDB_RESUME"] = resume["wandb"], "allow"
    parent = _mlflow_active_run() if "mlflow" in trackers else None
    watched = Trainers()
    with _environment(env):
        try:
            yield watched
        finally:
            if "mlflow" in trackers:
                _end_mlflow_runs_above(parent)
                watched.disarm()


class Trainers:
    """The run's Trainers (`watch(trainer)`), so that once it ended their MLflow callbacks end no other run: the
    callback's __del__ ends whatever run is active when it is collected (a %%qlora_tune parent run, later)."""

    def __init__(self):
        self.callbacks = []

    def watch(self, trainer):
        self.callbacks += [cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "MLflowCallback"]

    def disarm(self):
        for callback in self.callbacks:
            callback._auto_end_run = False


def recorder(trackers, folder):
    """A TrainerCallback that, once the Trainer's integrations have started their runs (their on_train_begin
    comes before it), writes their ids into the run folder's record (run.json "trackers"), for --resume."""
    from transformers import TrainerCallback

    class RecordTrackerRuns(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            ids = _tracker_run_ids(trackers) if state.is_world_process_zero else {}
            if ids and ids != folder.record.get("trackers"):
                folder.update(trackers=ids)

    return RecordTrackerRuns()


def _tracker_run_ids(trackers) -> dict:
    ids = {}
    if "mlflow" in trackers and (run_id := _mlflow_active_run()):
        ids["mlflow"] = run_id
    if "wandb" in trackers:
        import wandb

        if wandb.run is not None:
            ids["wandb"] = wandb.run.id
    return ids


def _mlflow_run_here(run_id: str) -> bool:
    """Whether the MLflow store in use holds the run `run_id` (MLFLOW_TRACKING_URI may name another since)."""
    import mlflow

    try:
        mlflow.tracking.MlflowClient().get_run(run_id)
        return True
    except Exception:  # noqa: BLE001 - MlflowException (not found), or a store that cannot be reached
        return False


def _mlflow_active_run():
    import mlflow

    run = mlflow.active_run()
    return run.info.run_id if run else None


def _end_mlflow_runs_above(parent_id) -> None:
    """End the MLflow runs this run left open (the Trainer ends its own on success, not after an error)."""
    import mlflow

    while (run := mlflow.active_run()) is not None and run.info.run_id != parent_id:
        mlflow.end_run(status="FAILED")


@contextlib.contextmanager
def tracking_group(trackers, name: str, output_root: Path):
    """The runs started inside share one group: an MLflow parent run `name` (the runs nested under it), a
    W&B group `name`. Nothing for TensorBoard and trackio (their runs are named `name`-trialN by the caller)."""
    check_installed(trackers)
    env = {}
    if "wandb" in trackers:
        env["WANDB_RUN_GROUP"] = name
    with contextlib.ExitStack() as stack:
        if "mlflow" in trackers:
            import mlflow

            _point_mlflow(output_root)
            mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT)
            stack.enter_context(mlflow.start_run(run_name=name))
            env["MLFLOW_NESTED_RUN"] = "true"
        stack.enter_context(_environment(env))
        yield
