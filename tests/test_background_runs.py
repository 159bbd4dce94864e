"""Runs in the background (`%%qlora_train --background`), listed (`%qlora_runs`), re-attached (`%qlora_attach`)
and stopped (`%qlora_stop`). Real runs on the tiny offline Llama; a run is held inside a step (PauseAt) when the
test must act while it certainly trains."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

import qlora_magic as qm
from qlora_magic.display.broadcast import Broadcast
from qlora_magic.display.reporters import Reporter
from qlora_magic.engine.run_folder import RunFolder
from qlora_magic.errors import BusyError, ConfigError, NoModelError
from qlora_magic.tasks import live_runs, run_handle

pytest.importorskip("ipywidgets")

FAST = dict(prompt="{question} ", response="{answer}", batch_size=8, grad_accum=1, lr=2e-2, logging_steps=1)
BUSY = "Training in progress (started from a background run): stop it first (%qlora_stop), or wait."
BODY = "data: $rows\nprompt: '{question} '\nresponse: '{answer}'\nbatch_size: 8\n"


@pytest.fixture(autouse=True)
def no_live_runs(monkeypatch):
    """Each test sees only its own background runs, and none outlives it (the session reset would be refused)."""
    monkeypatch.setattr(live_runs, "_runs", [])
    yield
    for run in live_runs._runs:
        run.stop()
        assert run.wait(300), "a background run did not end"


class PauseAt(Reporter):
    """A view that holds the run inside step `at` until `resume()`."""

    def __init__(self, at):
        self.at, self.reached, self.resumed = at, threading.Event(), threading.Event()

    def step(self, progress):
        if progress["step"] == self.at:
            self.reached.set()
            self.resumed.wait(timeout=300)

    def resume(self):
        self.resumed.set()


def start_paused(rows, at=2, steps=6, **options):
    pause = PauseAt(at)
    handle = qm.train(rows, max_steps=steps, background=True, reporter=pause, **{**FAST, **options})
    assert pause.reached.wait(timeout=300), handle.error
    return handle, pause


def loss_steps(rows):
    return [row["step"] for row in rows if row.get("loss") is not None]


def test_a_background_run_returns_at_once_holds_the_model_and_stops_at_a_step(tiny_loaded, rows):
    session = tiny_loaded
    handle, pause = start_paused(rows, at=2, steps=6)
    try:
        assert handle.status == "running" and handle.live is not None
        for cell in (lambda: qm.generate("sky", stream=False), lambda: qm.train(rows, max_steps=1, **FAST),
                     lambda: qm.train(rows, max_steps=1, background=True, **FAST)):
            with pytest.raises(BusyError) as refused:
                cell()
            assert str(refused.value) == BUSY
        table = qm.runs()
        assert table.names == [handle.name] and table.live == [handle.name]
        info = table[handle.name]
        assert (info.status, info.step, info.total_steps) == ("running", 2, 6) and info.loss is not None
        said = qm.stop(wait=False)
        assert said == (f"Stopping {handle.name} after the step in flight (step 2/6); "
                        "the adapter keeps every finished step.")
        assert handle.status == "stopping"
    finally:
        pause.resume()
    handle.wait(300)
    assert handle.status == "interrupted" and handle.error is None
    assert handle.summary.steps_done == 2
    assert loss_steps(session.history) == [1, 2] and len(session.runs) == 1  # the adapter keeps its two steps
    record = RunFolder(handle.folder.path).record
    assert record["status"] == "interrupted" and record["steps_done"] == 2
    info = qm.runs()[handle.name]
    assert (info.status, info.step, info.checkpoint_step) == ("interrupted", 2, 2)
    assert qm.stop() == f"Nothing to stop: {handle.name} already ended (interrupted, step 2/6)."
    assert qm.generate("sky", greedy=True, max_new_tokens=2, stream=False) is not None  # the model is free again


def test_a_stopped_background_run_resumed_in_the_kernel_lists_as_its_folder_says(tiny_loaded, rows):
    """After the thread ended, a --resume writes the folder on: %qlora_runs and %qlora_attach show the resumed
    run (completed 6/6), not the thread's last word (interrupted 2/6)."""
    handle, pause = start_paused(rows, at=2, steps=6)
    qm.stop(wait=False)
    pause.resume()
    handle.wait(300)
    assert qm.runs()[handle.name].status == "interrupted"  # nothing written since: the thread's word
    qm.train(resume=str(handle.folder.path), display="none")
    info = qm.runs()[handle.name]
    assert (info.status, info.step, info.total_steps, info.checkpoint_step) == ("completed", 6, 6, 6)
    attached = qm.attach(handle.name)
    assert attached.status == "completed" and loss_steps(attached.history)[-1] == 6
    assert qm.stop(handle.name) == f"Nothing to stop: {handle.name} already ended (completed, step 6/6)."


def test_attach_draws_the_history_so_far_then_follows_the_run(tiny_loaded, rows):
    handle, pause = start_paused(rows, at=3, steps=6)
    try:
        view = qm.attach().view()  # no name: this kernel's newest background run
        assert loss_steps(view.history) == [1, 2]  # held at step 3's end, before its row is logged
        assert "<b>step</b> 3/6" in view.readout.value and view.readout.value.startswith("running")
        assert bytes(view.chart.value).startswith(b"\x89PNG")
        assert handle.name in view.header.value and f"%qlora_stop {handle.name}" in view.header.value
        first_chart = view.chart.value
    finally:
        pause.resume()
    handle.wait(300)
    assert handle.status == "completed"
    assert loss_steps(view.history) == [1, 2, 3, 4, 5, 6]
    assert "<b>step</b> 6/6" in view.readout.value and view.readout.value.startswith("completed")
    assert view.bar.bar_style == "success" and view.chart.value != first_chart
    assert "%qlora_stop" not in view.header.value
    # Attached after it ended: the same run, drawn whole; from another kernel (only its folder), the same rows.
    again = qm.attach(handle.name).view()
    assert loss_steps(again.history) == [1, 2, 3, 4, 5, 6] and again.status == "completed"
    on_disk = run_handle.RunHandle(RunFolder(handle.folder.path)).view()
    assert loss_steps(on_disk.history) == [1, 2, 3, 4, 5, 6] and on_disk.status == "completed"
    assert "<b>step</b> 6/6" in on_disk.readout.value and bytes(on_disk.chart.value).startswith(b"\x89PNG")


def test_the_magics(tiny_loaded, rows, ip, capsys):
    ip.user_ns["rows"] = rows
    result = ip.run_cell(f"%%qlora_train --background --max-steps 3 --name magic --output-dir out\n{BODY}")
    assert result.error_in_exec is None
    shown = capsys.readouterr().out  # no kernel here: the handle shows as its table
    assert shown.startswith("Training run") and "-magic" in shown
    handle = qm.attach()
    handle.wait(300)
    assert handle.status == "completed" and handle.folder.path.parent.name == "out"
    ip.run_cell("%qlora_runs --output-dir out")
    listed = capsys.readouterr().out
    assert f"*  {handle.name}  completed  3/3" in listed
    ip.run_cell("%qlora_attach magic --output-dir out")
    attached = capsys.readouterr().out
    assert f"run         {handle.name}" in attached and "status      completed" in attached
    ip.run_cell("%qlora_stop magic")
    assert capsys.readouterr().out.strip() == f"Nothing to stop: {handle.name} already ended (completed, step 3/3)."

    second, pause = start_paused(rows, at=1, steps=4)
    try:
        threading.Timer(0.5, pause.resume).start()  # the step goes on while %qlora_stop waits for it to end
        ip.run_cell("%qlora_stop")
        assert capsys.readouterr().out.strip() == (f"Stopped {second.name} at step 1/4 (interrupted): the adapter keeps "
                                                   "every finished step; %qlora_train --resume carries the run on.")
    finally:
        pause.resume()
    assert second.wait(300).status == "interrupted"


@pytest.mark.parametrize("body, error", [
    ("data: $rows\nprompt: '{question} '\n", "ConfigError: The cell body needs a response: template"),
    ("data: missing.jsonl\nprompt: '{q}'\nresponse: '{a}'\n", "DataError: "),
    ("data: $rows\nprompt: '{nope} '\nresponse: '{answer}'\n", "DataError: The prompt template uses {nope}"),
])
def test_bad_input_in_a_background_cell_fails_in_the_cell(tiny_loaded, rows, ip, capsys, body, error):
    ip.user_ns["rows"] = rows
    result = ip.run_cell(f"%%qlora_train --background --max-steps 3\n{body}")
    assert result.error_in_exec is not None
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and error in out[0], out
    assert live_runs.live_runs() == [] and qm.api.session_lock.refusal() is None
    assert tiny_loaded.runs == []


def test_no_model_and_busy_fail_in_the_cell(rows):
    with pytest.raises(NoModelError):
        qm.train(rows, max_steps=1, background=True, **FAST)
    assert live_runs.live_runs() == []
    with qm.api.session_lock.hold("Merging", by="the panel"):
        done = []
        thread = threading.Thread(target=lambda: done.append(_error_of(
            lambda: qm.train(rows, max_steps=1, background=True, **FAST))))
        thread.start()
        thread.join(60)
    assert done == ["BusyError: Merging in progress (started from the panel): wait for it to finish, then try again."]


def _error_of(call):
    try:
        call()
    except Exception as error:  # noqa: BLE001
        return f"{type(error).__name__}: {error}"
    return None


def test_an_error_in_the_thread_ends_the_run_as_failed_and_shows_its_line(tiny_loaded, rows, monkeypatch):
    appended = RunFolder.append

    def full_disk_at_step_3(self, row):
        if row.get("step") == 3:
            raise OSError(28, "No space left on device")
        appended(self, row)

    monkeypatch.setattr(RunFolder, "append", full_disk_at_step_3)
    handle = qm.train(rows, max_steps=6, background=True, **FAST)  # the error comes after training began
    view = handle.view()
    handle.wait(300)
    assert handle.status == "failed"
    assert handle.error == "OSError: [Errno 28] No space left on device"
    assert view.status == "failed" and handle.error in view.header.value and view.bar.bar_style == "danger"
    info = qm.runs()[handle.name]
    assert info.status == "failed" and info.step == 3
    assert RunFolder(handle.folder.path).record["error"] == "[Errno 28] No space left on device"
    assert handle.error in repr(qm.attach())
    late = qm.attach().view()  # attached after it failed: the error is there too
    assert late.status == "failed" and handle.error in late.header.value


def test_a_broken_view_never_fails_the_run(tiny_loaded, rows):
    class Broken(Reporter):
        def log(self, row, progress, history):
            raise RuntimeError("cannot draw")

    broken = Broken()
    handle = qm.train(rows, max_steps=3, background=True, reporter=broken, **FAST)
    handle.wait(300)
    assert handle.status == "completed" and broken not in handle.live.broadcast.views


def write_run(root, name, status, process, history=((1, 2.5), (2, 2.1)), total=10):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"name": name, "status": status, "process": process,
                                                 "total_steps": total, "started_at": "2026-01-02T03:04:05"}))
    (folder / "history.jsonl").write_text("".join(json.dumps({"step": s, "loss": loss, "run": 0}) + "\n"
                                                  for s, loss in history))
    return RunFolder(folder)


def dead_process() -> dict:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(child.pid).create_time()
    child.wait()
    return {"host": socket.gethostname(), "pid": child.pid, "started": started}


def another_live_process() -> dict:
    parent = psutil.Process(os.getppid())
    return {"host": socket.gethostname(), "pid": parent.pid, "started": parent.create_time()}


def test_a_run_whose_process_is_gone_lists_as_crashed(tmp_path):
    folder = write_run(tmp_path / "runs", "20260102-030405-lost", "running", dead_process())
    table = qm.runs()
    assert table.live == [] and table["20260102-030405-lost"].status == "crashed"
    assert repr(table).splitlines()[3].split() == ["20260102-030405-lost", "crashed", "2/10", "2.1000", "-", "-",
                                                   "2026-01-02", "03:04"]
    assert qm.stop("lost") == ("Nothing to stop: 20260102-030405-lost crashed at step 2/10 (its process is gone); "
                               "it wrote no checkpoint, so train it again.")
    (folder.path / "checkpoints" / "step-000002").mkdir(parents=True)
    (folder.path / "checkpoints" / "step-000002" / "trainer_state.json").write_text("{}")
    assert qm.stop("lost").endswith("%qlora_train --resume runs/20260102-030405-lost carries it on from step 2.")
    assert "%qlora_train --resume runs/20260102-030405-lost carries it on from step 2" in repr(qm.attach("lost"))
    view = qm.attach("lost").view()
    assert view.status == "crashed" and loss_steps(view.history) == [1, 2] and view.bar.bar_style == "danger"


def test_a_run_another_process_trains_is_followed_and_not_stopped_here(tmp_path, monkeypatch):
    monkeypatch.setattr(run_handle, "FOLLOW_SECONDS", 0.1)
    folder = write_run(tmp_path / "runs", "20260102-030405-elsewhere", "running", another_live_process())
    assert qm.runs()["20260102-030405-elsewhere"].status == "running"
    with pytest.raises(ConfigError, match=r"running in another process \(pid \d+ on .*\), not this kernel: interrupt"):
        qm.stop()
    view = qm.attach().view()
    assert view.status == "running" and loss_steps(view.history) == [1, 2]
    with open(folder.path / "history.jsonl", "a") as file:  # the other process logs a step, then ends
        file.write(json.dumps({"step": 3, "loss": 1.9, "run": 0}) + "\n")
    deadline = time.monotonic() + 30
    while loss_steps(view.history) != [1, 2, 3] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert loss_steps(view.history) == [1, 2, 3] and "<b>step</b> 3/10" in view.readout.value
    folder.update(status="completed")
    while view.status != "completed" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert view.status == "completed"


def test_run_names_a_prefix_a_suffix_or_a_path_and_bad_ones_are_one_line(tmp_path):
    with pytest.raises(ConfigError) as none:
        qm.attach()
    assert str(none.value) == ("No runs yet: none in this kernel and no run folder under 'runs'; "
                               "%%qlora_train makes one (--output-dir names another folder).")
    root = tmp_path / "runs"
    gone = dead_process()
    for name in ("20260102-030405-alpha", "20260102-040000-beta", "20260103-050000-alpha"):
        write_run(root, name, "completed", gone)
    assert qm.attach("beta").name == "20260102-040000-beta"
    assert qm.attach("20260103").name == "20260103-050000-alpha"
    assert qm.attach(str(root / "20260102-030405-alpha")).name == "20260102-030405-alpha"
    with pytest.raises(ConfigError) as several:
        qm.attach("alpha")
    assert str(several.value) == "'alpha' matches 2 runs (20260103-050000-alpha, 20260102-030405-alpha): give more of its name."
    with pytest.raises(ConfigError) as unknown:
        qm.stop("gamma")
    assert str(unknown.value) == ("No run 'gamma' in this kernel or under 'runs'; there are 20260103-050000-alpha, "
                                  "20260102-040000-beta, 20260102-030405-alpha: give a name, its start or end, or a "
                                  "run folder's path.")
    assert "\n" not in str(unknown.value)


def test_a_bad_run_name_in_a_magic_is_one_line(ip, capsys):
    result = ip.run_cell("%qlora_attach nothing-here")
    assert isinstance(result.error_in_exec, ConfigError)
    assert capsys.readouterr().out.strip().splitlines() == [
        "ConfigError: No run 'nothing-here': none in this kernel and no run folder under 'runs' "
        "(--output-dir names another folder, or give the run folder's path)."]


def test_the_broadcast_gives_a_late_view_the_run_so_far_then_each_event_once():
    class Recorder(Reporter):
        def __init__(self):
            self.events = []

        def start(self, info):
            self.events.append(("start", info["total_steps"]))

        def step(self, progress):
            self.events.append(("step", progress["step"]))

        def log(self, row, progress, history):
            self.events.append(("log", [r["step"] for r in history]))

        def end(self, summary):
            self.events.append(("end", summary))

    broadcast = Broadcast()
    early = broadcast.attach(Recorder())
    broadcast.start({"total_steps": 3})
    history = [{"step": 7, "loss": 2.0, "run": 0}]  # the session's history: an earlier run's row, then this run's
    for step in (1, 2):
        broadcast.step({"step": step, "total_steps": 3})
        history.append({"step": step, "loss": 1.0, "run": 1})
        broadcast.log(history[-1], {"step": step, "total_steps": 3}, history)
    late = broadcast.attach(Recorder())
    broadcast.step({"step": 3, "total_steps": 3})
    broadcast.end("done")
    assert early.events == [("start", 3), ("step", 1), ("log", [1]), ("step", 2), ("log", [1, 2]), ("step", 3),
                            ("end", "done")]
    assert late.events == [("start", 3), ("log", [1, 2]), ("step", 2), ("step", 3), ("end", "done")]
