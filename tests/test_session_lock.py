"""One session lock: while the panel (or any other thread) trains, a cell that would use or change the model
fails at once in one line, and the run in flight goes on undisturbed. Real runs on the tiny offline Llama."""

import threading

import pytest

import qlora_magic as qm
from qlora_magic.display.reporters import NullReporter
from qlora_magic.errors import BusyError, QloraError

pytest.importorskip("ipywidgets")

FAST = dict(prompt="{question} ", response="{answer}", batch_size=8, grad_accum=1, lr=2e-2, display="none")
PANEL_BUSY = "Training in progress (started from the panel): stop it first (the panel's Stop button), or wait."


class PausedPanelRun:
    """The panel's Train button pressed, with the run held inside step `at` until `resume()`: the test's thread
    (a notebook cell's) then acts while training is certainly in progress."""

    def __init__(self, rows, at=2, steps=4):
        self.panel = qm.panel(data=rows, prompt="{question} ", response="{answer}")
        p = self.panel
        p.max_steps.value, p.batch_size.value, p.grad_accum.value, p.lr.value = steps, 8, 1, 2e-2
        self.reached, self.resumed = threading.Event(), threading.Event()
        step = p.reporter.step

        def step_then_pause(progress):
            step(progress)
            if progress["step"] == at:
                self.reached.set()
                self.resumed.wait(timeout=300)

        p.reporter.step = step_then_pause

    def __enter__(self):
        self.panel.train_button.click()
        assert self.reached.wait(timeout=300), self.panel.status_text
        return self.panel

    def __exit__(self, *exc):
        self.resumed.set()
        self.panel.wait(timeout=300)


def lora_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_cells_are_refused_in_one_line_while_the_panel_trains(tiny_loaded, rows, tmp_path):
    session = tiny_loaded
    model = session.model
    saved = tmp_path / "adapter"
    cells = {
        "train": lambda: qm.train(rows, max_steps=1, **FAST),
        "load": lambda: qm.load(),
        "generate": lambda: qm.generate("sky", greedy=True, stream=False),
        "classify": lambda: qm.classify(["sky"]),
        "save": lambda: qm.save(saved),
        "evaluate": lambda: qm.evaluate(rows, prompt="{question} ", response="{answer}"),
        "compare": lambda: qm.compare(["sky"]),
        "add adapter": lambda: qm.add_adapter("second"),
        "load adapter": lambda: qm.load_adapter(tmp_path),
        "switch adapter": lambda: qm.switch_adapter("default"),
        "delete adapter": lambda: qm.delete_adapter("default"),
        "combine adapters": lambda: qm.combine_adapters("mix", {"default": 1.0}),
        "merge": lambda: qm.merge(tmp_path / "merged"),
        "tune": lambda: qm.tune(rows, search={"r": [4]}, trials=1, max_steps=1, eval_split=8, **FAST),
        "reset": lambda: qm.reset_session(),
    }
    refused = {}
    with PausedPanelRun(rows) as p:
        for name, cell in cells.items():
            with pytest.raises(BusyError) as info:
                cell()
            refused[name] = str(info.value)
        # Reading is free: the memory readout and the adapter table.
        assert qm.memory().model_footprint > 0 and "default" in repr(qm.list_adapters())
        assert p.status_text.startswith("Training…")  # the panel still says what it is doing
    assert refused == {name: PANEL_BUSY for name in cells}
    assert p.last_error is None, p.status_text
    assert p.status_text.startswith("Training completed: 4/4 steps")
    assert qm.get_session() is session and session.model is model
    assert [r["step"] for r in session.history if "loss" in r] == [1, 2, 3, 4]  # the panel's run, and only it
    assert len(session.runs) == 1 and session.runs[0].config.max_steps == 4
    assert not saved.exists() and not (tmp_path / "merged").exists()
    assert list(model.peft_config) == ["default"]


def test_a_refused_magic_is_one_line_and_fails_the_cell(tiny_loaded, rows, ip, capsys):
    with PausedPanelRun(rows):
        result = ip.run_cell("%qlora_generate --greedy sky")
    assert isinstance(result.error_in_exec, BusyError)
    assert capsys.readouterr().out.strip().splitlines() == [f"BusyError: {PANEL_BUSY}"]
    assert qm.get_session().last_generation is None


def test_a_second_click_is_shown_beside_the_running_action_and_forgotten_after(tiny_loaded, rows):
    with PausedPanelRun(rows) as p:
        p.load_button.click()  # the same panel: its buttons are disabled in a browser, but a script can click
        same = p.status_text
        other = qm.panel()  # panels share the one session
        other.load_button.click()
        assert not other.busy  # refused at the click: no thread was started
    assert same.startswith("Training…") and f"BusyError: {PANEL_BUSY}" in same
    assert other.status_text == f"BusyError: {PANEL_BUSY}" and isinstance(other.last_error, BusyError)
    assert p.last_error is None and p.status_text.startswith("Training completed: 4/4 steps")
    assert "BusyError" not in p.status_text


def test_a_run_in_another_thread_refuses_cells_and_the_panel(tiny_loaded, rows):
    model = tiny_loaded.model
    reached, resumed = threading.Event(), threading.Event()

    class PauseAtStep2(NullReporter):
        def step(self, progress):
            if progress["step"] == 2:
                reached.set()
                resumed.wait(timeout=300)

    results = []
    worker = threading.Thread(target=lambda: results.append(qm.train(rows, max_steps=3, reporter=PauseAtStep2(), **FAST)))
    worker.start()
    try:
        assert reached.wait(timeout=300)
        busy = "Training in progress (started from another thread): stop it first, or wait."
        with pytest.raises(BusyError, match=r"^Training in progress \(started from another thread\)"):
            qm.generate("sky", stream=False)
        p = qm.panel()
        p.gen_prompt.value = "sky"
        p.generate_button.click()
        assert p.status_text == f"BusyError: {busy}" and not p.busy
    finally:
        resumed.set()
        worker.join(timeout=300)
    assert results and results[0].status == "completed" and results[0].steps_done == 3
    assert tiny_loaded.model is model and len(tiny_loaded.runs) == 1
    # Free again: the same thread re-enters (tune trains through finetune inside its own hold).
    assert qm.generate("sky", greedy=True, max_new_tokens=2, stream=False) is not None


def test_the_lock_is_reentrant_in_one_thread_and_names_the_outer_action():
    from qlora_magic.session import session_lock

    with session_lock.hold("Merging", by="the panel"):
        with session_lock.hold("Generating"):  # a verb called inside the panel's action
            assert session_lock.activity.what == "Merging"
        errors = []
        thread = threading.Thread(target=lambda: errors.append(_refusal(session_lock)))
        thread.start()
        thread.join()
    assert errors == ["Merging in progress (started from the panel): wait for it to finish, then try again."]
    with session_lock.hold("Generating"):  # free once the outer hold ends
        pass


def _refusal(lock):
    try:
        with lock.hold("Loading"):
            return None
    except QloraError as error:
        return str(error)
