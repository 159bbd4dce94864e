"""`%%qlora_train --gpus N` (and `--processes N` on the CPU): the run trains in worker processes, one per GPU,
started through torch.distributed's own launcher (torchrun), while the cell shows the same progress.

The run folder is written first, as for any run, plus the adapter the session has now (start/, so the workers
start from exactly it) and a "launch" entry in run.json (how many workers, on what, which strategy). Then

    python -m torch.distributed.run --standalone --nproc-per-node N -m qlora_magic.run RUN_FOLDER

runs as a child process (the kernel cannot fork its CUDA context, so each worker loads the base model itself),
its output in RUN_FOLDER/workers.log. The cell follows history.jsonl, which rank 0 appends to, and feeds the
rows to the reporter the in-kernel run would have had; Stop (a StopFlag, Ctrl-C) writes the STOP file every
rank checks after each step. A worker that fails ends the cell in one line naming workers.log, never a hang;
a run that ends well leaves its adapter in the session, as if it had trained here.

With `--unload` the session's model leaves memory once the run folder is written (its GPU memory goes to the
workers, and the plan counts it as theirs) and is loaded back when the workers end, however they end, from the
same base and start/ adapter; then the trained adapter goes into it as without --unload."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import TrainConfig
from ..display.formatting import gb
from ..engine.distributed import OUT_OF_MEMORY_FILE, read_out_of_memory
from ..engine.run_folder import HISTORY_FILE, RunFolder, checkpoint_step
from ..errors import ConfigError, OutOfMemory, WorkerError, one_line

START_ADAPTER = "start"  # the run folder's adapter the workers start from (the session's when launched)
LOG_FILE = "workers.log"  # what the workers print
POLL_SECONDS = 0.2
STOP_GRACE_SECONDS = 120  # after Stop, how long the workers may take to finish their step before they are ended


@dataclass
class Launch:
    """How many workers, on what: the device kind ("cuda" or "cpu"), the number, the strategy, the GPUs."""

    device: str
    workers: int
    strategy: str = "ddp"
    visible: str | None = None  # CUDA_VISIBLE_DEVICES for the workers (None: as this process has it)
    gpus: tuple = ()  # the GPUs the workers use, as this process numbers them
    reason: str | None = None  # why the strategy, when it was chosen for the user ("auto: fits one GPU")
    load: str = "gpu"  # where each worker loads the model: "gpu", or "host" (CPU memory; FSDP moves its shards)

    def to_json(self) -> dict:
        return {"device": self.device, "workers": self.workers, "strategy": self.strategy,
                "strategy_reason": self.reason, "load": self.load}

    def shown(self, settings: dict) -> dict:
        """The workers' settings as the settings row shows them: the strategy with why it was chosen."""
        notes = [self.reason, "loaded in CPU memory, sharded onto the GPUs" if self.load == "host" else None]
        notes = [note for note in notes if note]
        if notes and settings.get("strategy") == self.strategy:
            return {**settings, "strategy": f"{self.strategy} ({'; '.join(notes)})"}
        return settings


def plan_launch(config: TrainConfig) -> Launch:
    """The workers `--gpus` / `--processes` asks for, checked against this machine (one line otherwise)."""
    strategy = config.strategy or "ddp"
    if config.processes is not None:
        return Launch("cpu", config.processes, strategy)
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(f"--gpus {config.gpus}: torch sees no CUDA GPU here: drop --gpus to train in this process "
                          "(or --processes N for worker processes on the CPU).")
    wanted = count if config.gpus == "all" else config.gpus
    if wanted > count:
        raise ConfigError(f"--gpus {config.gpus}: this machine has {count} GPU{'s' if count > 1 else ''}: "
                          f"give --gpus {count} (or --gpus all).")
    visible, gpus = None, tuple(range(count))
    if wanted < count:
        # GPUs where this kernel holds memory (its session's model) go last: a worker there trains beside that copy
        gpus = tuple(sorted(sorted(range(count), key=kernel_holds)[:wanted]))
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = shown.split(",") if shown else [str(i) for i in range(count)]
        visible = ",".join(ids[i] for i in gpus)
    return Launch("cuda", wanted, strategy, visible, gpus=gpus)


def kernel_holds(index: int) -> bool:
    """Whether this process holds memory on GPU `index` (asked only where it has a CUDA context already)."""
    import torch

    return torch.cuda.is_initialized() and torch.cuda.memory_reserved(index) > 0


@dataclass
class WorkersRun:
    """A run folder written for workers (`write_workers_run`): the folder, the launch, and the run as the
    session will record it (its TrainRun and index)."""

    folder: RunFolder
    launch: Launch
    run: object  # adapter_folder.TrainRun
    index: int
    unload: bool = False  # the session's model leaves memory while the workers train (--unload, or chosen for it)


def write_workers_run(session, config: TrainConfig) -> WorkersRun:
    """Everything checked (the workers this machine has, the batch split, the data and templates), then the run
    folder written: run.json with a launch entry, data.jsonl for in-memory rows, and start/, the session's
    adapter now. Nothing is started: `python -m qlora_magic.run FOLDER` under torchrun trains it (on a cluster
    too: write it to a shared disk and submit the workers)."""
    from ..engine.adapter_folder import TrainRun, save_adapter
    from ..engine.adapters import adapter_names
    from ..engine.data import load_rows
    from .finetune import task_examples
    from .resuming import start_run_folder

    session.require_model("training")
    if session.task != "causal-lm":
        raise ConfigError(f"--gpus / --processes train causal-lm models for now; this one is {session.task}: drop the option.")
    names = adapter_names(session.model)
    if len(names) > 1:
        raise ConfigError(f"Worker runs train a model with one adapter; this one has {len(names)} ({', '.join(names)}): "
                          "save the one to train (%qlora_save PATH), load it alone (%qlora_load --adapter PATH), then train.")
    launch = plan_launch(config)
    check_split(config, launch.workers)
    rows = load_rows(config.data, config.split)
    examples = task_examples(session, config, rows)  # a bad template fails here, in one line, before anything starts
    budget = gpu_memory(launch.gpus, config.max_memory, kernel_leaves=config.unload) if launch.device == "cuda" else None
    unload = config.unload
    if budget is not None and config.strategy is None:
        launch.strategy, launch.reason, budget, unload = _auto_strategy(session, config, rows, examples, launch, budget)
    if budget is not None and launch.strategy == "fsdp":
        from ..engine.strategy import shardable

        if not shardable(session.model):
            raise ConfigError("--strategy fsdp shards 4-bit weights only; this model has 8-bit layers: load it with "
                              "--bits 4, or train it with --strategy ddp.")
        launch.load = worker_load(session.model, launch.workers, budget)
    run, index = TrainRun.of(config), len(session.runs)
    folder = start_run_folder(session, config, rows, run, index).folder
    try:
        save_adapter(session, folder.path / START_ADAPTER)
        folder.update(launch=launch.to_json(), status="launched")  # "running" once rank 0 trains
    except BaseException:
        folder.update(status="failed")
        raise
    return WorkersRun(folder, launch, run, index, unload)


def gpu_memory(gpus, max_memory=None, kernel_leaves=False) -> int:
    """Bytes each worker may plan with: the smallest of the GPUs the workers use (`gpus`, as this process numbers
    them), capped by --max-memory. A GPU this kernel already uses (its session's model; a worker trains beside
    it) counts what is free there now, plus with `kernel_leaves` (--unload) what this process's allocator holds
    there (the model's memory, given back before the workers start); the others count their whole memory, read
    from the cards' properties, which opens no CUDA context on them."""
    import torch

    from ..config import parse_memory

    def usable(index):
        if kernel_holds(index):  # the kernel's copy of the model is not the workers' (unless it leaves)
            return torch.cuda.mem_get_info(index)[0] + (torch.cuda.memory_reserved(index) if kernel_leaves else 0)
        return torch.cuda.get_device_properties(index).total_memory

    smallest = min(usable(i) for i in gpus)
    limit = parse_memory(max_memory)
    return int(min(smallest, limit) if limit else smallest)


#: Where FSDP workers load the model when the weights take more than this share of the smallest GPU: in CPU
#: memory (quantized on the GPU all the same). A whole copy would not fit beside CUDA's own memory and the first
#: layers' activations, and the shards are all each GPU has to hold.
HOST_LOAD_SHARE = 0.8
HOST_LOAD = "QLORA_WORKERS_LOAD"  # "host" or "gpu": forces the choice (benchmarks check the host path on one GPU)


def worker_load(model, workers: int, gpu_bytes: int) -> str:
    """Where the workers of an FSDP run load the model: "gpu" (each loads it whole onto its GPU, then FSDP
    shards it), or "host" when its weights take more than HOST_LOAD_SHARE of the smallest GPU: each worker
    loads it into CPU memory and FSDP moves one layer's shard at a time to the GPU. The workers of one machine
    then hold a copy each in RAM for a while: too little RAM is a one-line refusal here, before anything starts."""
    import psutil

    weights = int(model.get_memory_footprint())
    forced = os.environ.get(HOST_LOAD, "").strip().lower()
    if forced in ("host", "gpu"):
        load = forced
    else:
        load = "host" if weights > HOST_LOAD_SHARE * gpu_bytes else "gpu"
    needed, available = int(1.1 * workers * weights), psutil.virtual_memory().available
    if load == "host" and needed > available:
        raise ConfigError(f"--strategy fsdp: the model's weights ({gb(weights)}) are too big to load whole onto one GPU "
                          f"({gb(gpu_bytes)}), so each of the {workers} workers loads them into CPU memory first: that needs about {gb(needed)} "
                          f"of RAM and {gb(available)} is free: free memory (%qlora_unload, other programs) or use fewer GPUs.")
    return load


def _auto_strategy(session, config: TrainConfig, rows, examples, launch: Launch, budget: int):
    """(strategy, why, budget, unload): ddp or fsdp from the per-rank memory plan of the data's tokenized lengths
    (engine/strategy.py). A run that fits neither way beside the session's copy of the model, but fits once that
    copy leaves the GPU, unloads it as --unload does (a reload after the run is cheaper than no run); one that
    fits neither way even then is refused here, before anything is written."""
    from ..engine.data import prepare_datasets
    from ..engine.strategy import choose_strategy

    train_set, _, _ = prepare_datasets(rows, examples, config.eval_split, seed=config.seed)
    lengths = [len(ids) for ids in train_set["input_ids"]]

    def choose(memory):
        return choose_strategy(session.model, lengths, config.batch_size * config.grad_accum, memory, launch.workers,
                               packing=True if config.packing is None else config.packing,
                               checkpointing=config.gradient_checkpointing)

    try:
        choice = choose(budget)
    except ConfigError:
        if config.unload or not any(kernel_holds(index) for index in launch.gpus):
            raise
        freed = gpu_memory(launch.gpus, config.max_memory, kernel_leaves=True)
        choice = choose(freed)  # not even then: its one line counts the whole GPU
        return choice.strategy, f"{choice.reason}, once the session's model leaves the GPU: unloaded meanwhile", freed, True
    return choice.strategy, choice.reason, budget, config.unload


def check_split(config: TrainConfig, workers: int):
    """The effective batch (batch_size x grad_accum) must split evenly over the workers (one line otherwise)."""
    effective = config.batch_size * config.grad_accum
    if workers > 1 and effective % workers:
        raise ConfigError(f"The effective batch ({config.batch_size} x {config.grad_accum} = {effective}) does not split "
                          f"over {workers} workers: make batch_size x grad_accum a multiple of {workers}.")


def train_in_workers(session, config: TrainConfig, reporter=None, stop=None):
    """A new run (config.gpus or config.processes) trained by worker processes; returns the TrainSummary, the
    trained adapter put into the session's active adapter and the run recorded as an in-kernel run would be."""
    from ..display import choose_reporter

    written = write_workers_run(session, config)
    folder, run, index = written.folder, written.run, written.index
    reporter = reporter or choose_reporter(config.display)
    with model_away(session, folder) if written.unload else contextlib.nullcontext():
        summary = follow_workers(folder, written.launch, reporter, stop, history=list(session.history))
    _take_adapter(session, folder, summary)
    session.runs.append(run)
    session.history.extend(row for row in folder.history() if row.get("run") == index)
    session.last_train_summary = summary
    return summary


def resume_in_workers(point, reporter=None, stop=None, config: TrainConfig | None = None):
    """`--resume` of a run its workers trained: the workers are started again on the run folder, from its
    checkpoint (the same number of them, on the same kind of device). Returns the TrainSummary; the caller
    loads the final checkpoint into the session."""
    from ..display import choose_reporter

    folder = point.folder
    before = folder.record["launch"]
    launch = plan_launch(TrainConfig(processes=before["workers"]) if before.get("device") == "cpu"
                         else TrainConfig(gpus=before["workers"], strategy=before.get("strategy")))
    launch.reason, launch.load = before.get("strategy_reason"), before.get("load", "gpu")
    kept = _cut_history(folder, point.step)
    folder.update(launch={**before, **launch.to_json(), "resume_from": str(point.checkpoint.relative_to(folder.path))})
    display = config.display if config is not None else "auto"
    return follow_workers(folder, launch, reporter or choose_reporter(display), stop, history=kept, resumed=True)


def worker_command(folder: RunFolder, launch: Launch) -> list[str]:
    """The torchrun command that starts this machine's workers on the run folder."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={launch.workers}",
            "-m", "qlora_magic.run", str(folder.path)]


def worker_environment(launch: Launch) -> dict:
    """This process's environment for the workers: the same qlora_magic first on their path (the one this kernel
    imported, installed or not), and the devices they may use."""
    env = dict(os.environ)
    package_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([package_parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if launch.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # CPU workers must not open a CUDA context on the kernel's GPU
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // launch.workers)))
    elif launch.visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = launch.visible
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def follow_workers(folder: RunFolder, launch: Launch, reporter, stop=None, history=None, resumed=False):
    """Start the workers on `folder` and show their run through `reporter` until they end; returns the
    TrainSummary. Stop (`stop` set, or Ctrl-C) writes the STOP file; a second Ctrl-C ends the workers at once.
    A worker whose step ran out of GPU memory has every rank relaunched from the last checkpoint with the next
    back-off layout (the in-kernel sequence, speed.smaller_layout), one note in the cell each time. A failed
    worker raises WorkerError (one line naming workers.log); out of memory at the smallest layout, OutOfMemory."""
    from ..engine.stopping import StopFlag
    from ..engine.training import TrainSummary

    stop = stop if stop is not None else StopFlag()
    history = list(history or [])
    first_row = len(history)
    log_path = folder.path / LOG_FILE
    follower = _HistoryFollower(folder.path / HISTORY_FILE, skip_existing=resumed)
    started, info = time.perf_counter(), {}
    while True:
        log_start = log_path.stat().st_size if log_path.exists() else 0
        code, info = _run_workers(folder, launch, reporter, stop, follower, history, info, started)
        marker = read_out_of_memory(folder.path) if code != 0 and not stop else None
        if marker is None or not marker.get("backoff"):
            break
        step = _relaunch_after_out_of_memory(folder, marker)
        history[first_row:] = [row for row in history[first_row:] if step and row.get("step", 0) <= step]
        follower = _HistoryFollower(folder.path / HISTORY_FILE, skip_existing=True)
        reporter.note(f"Out of GPU memory at step {marker['step'] + 1} on rank {marker['rank']}: every rank relaunched "
                      f"from step {step} with {marker['now']} (was {marker['was']}); the effective batch is the same.")
    record = folder.record
    status = folder.status(record)
    rows = history[first_row:]
    summary = TrainSummary.from_history(
        rows, status=status if status in ("completed", "interrupted") else "failed",
        steps_planned=record.get("total_steps") or 0, seconds=time.perf_counter() - started, run_dir=str(folder.path),
        settings=launch.shown(dict(record.get("settings") or {})),
        steps_done=record.get("steps_done") or max((r.get("step", 0) for r in rows), default=0))
    if info.get("started"):
        reporter.end(summary)
    if code != 0 or status not in ("completed", "interrupted"):
        out_of_memory = marker.get("error") if marker is not None else None
        if status in ("launched", "running", "crashed") or out_of_memory:  # (not the other ranks' broken collective)
            folder.update(status="failed", error=out_of_memory or f"a worker exited with status {code}")
        if out_of_memory:
            raise OutOfMemory(f"{out_of_memory} (rank {marker['rank']}; see {log_path})")
        raise WorkerError(_failure_line(folder, code, log_path, log_start))
    return summary


def _run_workers(folder: RunFolder, launch: Launch, reporter, stop, follower, history: list, info: dict, started):
    """One launch of the workers, followed until they end; returns (torchrun's exit status, the follow state)."""
    from ..engine.distributed import STOP_FILE

    for left in (STOP_FILE, OUT_OF_MEMORY_FILE):  # from an earlier launch
        (folder.path / left).unlink(missing_ok=True)
    log_path = folder.path / LOG_FILE
    try:
        with open(log_path, "ab") as log:
            process = subprocess.Popen(worker_command(folder, launch), env=worker_environment(launch), stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as error:
        folder.update(status="failed", error=str(error))
        raise WorkerError(f"Could not start the workers ({error.strerror or error}): see {log_path}") from None
    stopping_since = None
    try:
        while True:
            try:
                ended = process.poll() is not None
                info = _follow_once(folder, follower, reporter, history, info, started, launch)
                if ended:
                    return process.returncode, info
                if stop and stopping_since is None:
                    stopping_since = time.monotonic()
                    (folder.path / STOP_FILE).touch()
                if stopping_since is not None and time.monotonic() - stopping_since > STOP_GRACE_SECONDS:
                    _end_workers(process)
                time.sleep(POLL_SECONDS)
            except KeyboardInterrupt:
                if stopping_since is not None:  # a second Ctrl-C: end the workers now
                    _end_workers(process)
                    raise
                stop.set("interrupted")
    finally:
        if process.poll() is None:
            _end_workers(process)


def _relaunch_after_out_of_memory(folder: RunFolder, marker: dict) -> int:
    """The run folder set for the workers to start again after a rank ran out of memory: from its last
    checkpoint (or from the start adapter when there is none yet), the history cut back to it, the back-off's
    settings in the launch entry. Returns the step the relaunch carries on from."""
    checkpoint = folder.latest_checkpoint()
    step = checkpoint_step(checkpoint) if checkpoint is not None else 0
    _cut_history(folder, step if checkpoint is not None else None)
    resume_from = str(checkpoint.relative_to(folder.path)) if checkpoint is not None else None
    folder.update(launch={**folder.record["launch"], "backoff": marker["backoff"], "resume_from": resume_from},
                  status="launched")
    return step


def _cut_history(folder: RunFolder, step: int | None) -> list[dict]:
    """history.jsonl cut back to the rows up to `step` (None: none), as the relaunched workers go on from it."""
    kept = [row for row in folder.history() if row.get("step", 0) <= step] if step is not None else []
    folder.open_history(keep=kept)
    folder.close()
    return kept


class _HistoryFollower:
    """The rows appended to history.jsonl since the last call (only whole lines)."""

    def __init__(self, path: Path, skip_existing=False):
        self.path, self.offset, self.rest = path, 0, b""
        if skip_existing:
            with contextlib.suppress(OSError):
                self.offset = path.stat().st_size

    def new_rows(self) -> list[dict]:
        try:
            with open(self.path, "rb") as file:
                file.seek(self.offset)
                data = file.read()
        except OSError:
            return []
        self.offset += len(data)
        lines = (self.rest + data).split(b"\n")
        self.rest = lines.pop()
        rows = []
        for line in lines:
            with contextlib.suppress(ValueError):
                rows.append(json.loads(line))
        return rows


def _follow_once(folder, follower, reporter, history, info, started, launch: Launch):
    """One look at the run folder: the start event once rank 0 said the run began (run.json names another
    process than this one, with the settings it chose), then each new row."""
    if not info.get("started"):
        record = folder.record
        process = record.get("process") or {}
        if not (record.get("settings") and record.get("total_steps") and process.get("pid") != os.getpid()):
            return info
        info = {"started": True, "total_steps": record["total_steps"]}
        reporter.start({"total_steps": record["total_steps"], "settings": launch.shown(record["settings"]),
                        "run_dir": str(folder.path), "history": history})
    rows = follower.new_rows()
    history.extend(rows)  # first, so a Ctrl-C while they are shown loses none
    for row in rows:
        elapsed = time.perf_counter() - started
        step, total = row.get("step", 0), info["total_steps"]
        progress = {"step": step, "total_steps": total, "elapsed": elapsed,
                    "eta": elapsed / step * (total - step) if step else None}
        reporter.step(progress)
        reporter.log(row, progress, history)
    return info


def _end_workers(process):
    """SIGTERM to the launcher's process group (torchrun passes it on to the workers), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=wait)
            return


def _failure_line(folder: RunFolder, code, log_path: Path, log_start: int = 0) -> str:
    """One line: what failed, the worker's error line (in the log from `log_start`, where the last launch's part
    begins), what was kept, where the log is."""
    cause = _last_error_line(log_path, log_start)
    checkpoint = folder.latest_checkpoint()
    kept = (f"; step {checkpoint_step(checkpoint)} is kept (%qlora_train --resume {folder.path} carries it on)"
            if checkpoint is not None else "")
    return (f"A worker process failed (exit status {code}{': ' + cause if cause else ''}){kept}: "
            f"see {log_path}")


def _last_error_line(log_path: Path, start: int = 0) -> str | None:
    """The first worker's error line in the log (qlora_magic.errors.ConfigError: ...), shortened; torchrun's
    own report of the failure (ChildFailedError) is not the cause."""
    with contextlib.suppress(OSError):
        with open(log_path, "rb") as log:
            log.seek(start)
            text = log.read().decode(errors="replace")
        for line in text.splitlines():
            text = line.split("]:", 1)[-1].strip() if line.startswith("[rank") else line.strip()
            head = text.split(":", 1)[0]
            if (head and " " not in head and head.endswith(("Error", "Exception", "KeyboardInterrupt"))
                    and not head.startswith("torch.distributed.elastic")):
                return " ".join(text.split())[:200]  # one line, whatever the error's text holds
    return None


@contextlib.contextmanager
def model_away(session, folder: RunFolder):
    """The session's model out of memory for the block (--unload), and back after it however it ends: the same
    base loaded as the session had it, with the run's start/ adapter (the session's adapter as it was when the
    workers were launched), so the session is as before the run until the trained weights go in. The session's
    history, runs and settings are kept. A reload that fails is one line saying how to load the model again
    (and what ended the run, if it did not end well)."""
    from ..engine.memory_usage import release_memory

    load_config = session.load_config
    session.model = None
    release_memory(workspaces=True)
    try:
        yield
    except BaseException as error:
        _load_back(session, load_config, folder, ended_by=error)
        raise
    _load_back(session, load_config, folder)


def _load_back(session, load_config, folder: RunFolder, ended_by: BaseException | None = None):
    from ..engine.loading import load_model

    start = folder.path / START_ADAPTER
    try:
        loaded = load_model(load_config.replace(adapter=str(start)))
    except Exception as error:  # noqa: BLE001 - any failure leaves the session without a model: say how to recover
        session.tokenizer = session.load_config = session.last_load_report = None
        run = f"; the run had ended with {one_line(ended_by)}" if ended_by else ""
        checkpoint = folder.latest_checkpoint()
        raise ConfigError(f"--unload: the session's model could not be loaded back after the workers ended "
                          f"({one_line(error)}){run}. The run is kept in {str(folder.path)!r}: "
                          f"%qlora_load --adapter {checkpoint or start} loads its adapter with its base.") from None
    session.model, session.tokenizer = loaded.model, loaded.tokenizer


def _take_adapter(session, folder: RunFolder, summary):
    """The trained adapter (the run's last checkpoint) into the session's active adapter, in place."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    checkpoint = folder.latest_checkpoint()
    if checkpoint is None or not summary.steps_done:
        return
    model = session.model
    weights = load_file(str(checkpoint / "adapter_model.safetensors"), device=str(next(model.parameters()).device))
    set_peft_model_state_dict(model, weights, adapter_name=model.active_adapter)
