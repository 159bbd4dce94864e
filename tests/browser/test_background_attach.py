"""A background run re-attached after a page reload, in JupyterLab in headless Chromium.

The notebook loads the embedded model and starts `%%qlora_train --background` (about a second a step on this
CPU, more steps than the test lasts). The page is then reloaded, which loses the cell's live view as a closed
tab would; the kernel goes on training. A new cell runs `%qlora_attach`: its view must show the steps trained so
far (at least those in the run's history.jsonl before the reload), draw the chart, and keep growing (the step
read twice, seconds apart, increases, and the chart image is replaced). A last cell runs `%qlora_stop`: the
attached view ends "interrupted", and so does the run's record.

Setup and skipping as for test_notebooks_in_browser.py (scripts/setup-browser.sh; QLORA_SKIP_BROWSER=1;
QLORA_BROWSER_OUT=/dir keeps the screenshots)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import notebook_in_browser as nib  # noqa: E402
from test_notebooks_in_browser import CHROMIUM, _require_browser_tools  # noqa: E402

TIMEOUT = float(os.environ.get("QLORA_BROWSER_TIMEOUT", "600"))
STEPS = 400  # ~1 s a step here: the test stops the run long before its end
PROMPT = "Instruction: {instruction}\\n\\nInput: {context}\\n\\nResponse: "
STEP = re.compile(r"step (\d+)/(\d+)")
RERUN_AFTER = 20  # seconds a typed cell's prompt may stay blank before it is run again


def notebook_cells(data: str) -> list[str]:
    return [
        "%load_ext qlora_magic\n%qlora_load",
        f"%%qlora_train --background --max-steps {STEPS} --name browser\n"
        f"data: {data}\nprompt: \"{PROMPT}\"\nresponse: \"{{response}}\"\n"
        "batch_size: 1\ngrad_accum: 1\nmax_length: 64\n",
    ]


def new_notebook(tmp_path: Path, name: str, cells: list[str]) -> tuple[Path, Path]:
    """(the folder for screenshots and logs: $QLORA_BROWSER_OUT/name, kept, or one in tmp_path; a notebook of
    `cells` in a folder of its own, where what it writes lands)."""
    base = os.environ.get("QLORA_BROWSER_OUT")
    out = (Path(base).resolve() if base else tmp_path) / name
    out.mkdir(parents=True, exist_ok=True)
    notebook = tmp_path / "notebook" / f"{name}.ipynb"
    notebook.parent.mkdir()
    write_notebook(notebook, cells)
    return out, notebook


def write_notebook(path: Path, cells: list[str]):
    path.write_text(json.dumps({
        "cells": [{"cell_type": "code", "execution_count": None, "id": f"cell-{i}", "metadata": {}, "outputs": [],
                   "source": source} for i, source in enumerate(cells)],
        "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
        "nbformat": 4, "nbformat_minor": 5,
    }, indent=1))


# The text and chart image of one cell's outputs.
JS_CELL = r"""(index) => {
  const cell = document.querySelectorAll('.jp-Notebook .jp-Cell')[index];
  if (!cell) return null;
  const outputs = Array.from(cell.querySelectorAll('.jp-OutputArea-output'));
  const img = cell.querySelector('.jp-OutputArea-output img');
  const bar = cell.querySelector('.widget-progress .widget-label, .widget-hprogress .widget-label');
  return {
    prompt: ((cell.querySelector('.jp-InputPrompt') || {}).textContent || '').trim(),
    text: outputs.map(o => o.innerText || '').join('\n'),
    widgets: cell.querySelectorAll('.jupyter-widgets').length,
    image: img ? {src: img.src, width: img.naturalWidth, complete: img.complete} : null,
    bar: bar ? bar.textContent.trim() : null,
  };
}"""


class Notebook:
    """One JupyterLab page on a notebook: run cells, add cells, read a cell's output."""

    def __init__(self, page, server, deadline):
        self.page, self.server, self.deadline = page, server, deadline
        self.run = nib.BrowserRun(page, server, Path("."), settle=1.0)

    def open(self, reload=False):
        """Load the page (`reload`: reload it, as F5 does: one navigation, so the page that stays is the only one
        that connected to the kernel), then wait for its cells and its kernel."""
        if reload:
            self.page.reload(timeout=self.deadline.left(120) * 1000)
            self.page.wait_for_selector(".jp-Notebook .jp-Cell", state="attached", timeout=self.deadline.left(120) * 1000)
        else:
            self.run.open(self.deadline)
        self.run.wait_kernel_ready(self.deadline)
        # wait_kernel_ready passes a page whose indicator is not drawn yet; a cell run before the page's kernel
        # connection is up (after a reload, on a loaded machine) is dropped, so wait for the indicator too.
        try:
            nib.poll(lambda: self.run.state()["indicator"] == "idle", self.deadline.left(60), 0.5, "the page's kernel")
        except TimeoutError:
            nib.log(f"the page's kernel indicator reads {self.run.state()['indicator']!r}, not idle: going on")
        self.run.collapse_left_sidebar()

    def cell(self, index) -> dict:
        return self.page.evaluate(JS_CELL, index)

    def cells(self) -> int:
        return self.run.state()["cells"]

    def add_and_run(self, code: str) -> int:
        """Type `code` into a new cell at the end (the empty one Shift+Enter left there, or one added) and run it
        (Shift+Enter); returns its index."""
        last = self.page.locator(".jp-Notebook .jp-Cell").last
        editor = last.locator(".jp-InputArea-editor")
        index = self.cells() - 1
        editor.click()
        if editor.inner_text().strip():
            self.page.keyboard.press("Escape")
            self.page.keyboard.press("b")
            nib.poll(lambda: self.cells() == index + 2, 20, what="the new cell")
            self.page.keyboard.press("Enter")
            index += 1
        self.type_into(self.page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".jp-InputArea-editor"), code)
        self.page.keyboard.press("Shift+Enter")
        self.wait_ran(index)
        return index

    def type_into(self, editor, code: str):
        """Type `code` into the focused `editor` and check it arrived whole: on a loaded machine the first keys can
        land before the editor has focus (a cell then runs `qlora_attach`, a NameError). Retyped once if not."""
        for attempt in range(2):
            self.page.keyboard.type(code)
            try:
                nib.poll(lambda: editor.inner_text().strip() == code, 5, what=f"the cell to read {code!r}")
                return
            except TimeoutError:
                if attempt:
                    raise
                editor.click()
                self.page.keyboard.press("Control+a")
                self.page.keyboard.press("Delete")

    def wait_ran(self, index, timeout=240):
        """Until cell `index` ran (its prompt reads [n]). A cell the page did not queue (its prompt still blank
        after RERUN_AFTER s: right after a reload the page's kernel connection may not be back yet, and JupyterLab
        then drops the run) is run again once, with Ctrl+Enter. A timeout says what the page and kernel showed."""
        start, rerun = time.monotonic(), []

        def ran():
            prompt = self.cell(index)["prompt"]
            if re.search(r"\[\d+\]", prompt):
                return True
            if not rerun and "*" not in prompt and time.monotonic() - start > RERUN_AFTER:
                rerun.append(prompt)
                nib.log(f"cell {index} not queued after {RERUN_AFTER} s (prompt {prompt!r}): running it again")
                self.page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".jp-InputPrompt").click()
                self.page.keyboard.press("Control+Enter")
            return False

        try:
            nib.poll(ran, self.deadline.left(timeout), what=f"cell {index} to run")
        except TimeoutError as error:
            raise TimeoutError(f"{error}; {self.describe(index)}") from None

    def describe(self, index) -> str:
        """What a failure should show: the cell, the page's and the server's kernel state, the server log's end."""
        cell = self.cell(index) or {}
        return (f"cell {index} showed: input prompt {cell.get('prompt')!r}, text {cell.get('text', '')[-600:]!r}, "
                f"image {(cell.get('image') or {}).get('width')!r}, bar {cell.get('bar')!r}; page kernel indicator "
                f"{self.run.state()['indicator']!r}, server kernel state {self.server.kernel_state()!r}; server log "
                f"ends:\n{self.server.log_tail(25)}")

    def wait_for(self, index, check, what, timeout=120) -> dict:
        """The cell's outputs (JS_CELL) once `check` holds for them."""
        seen = {}

        def passing():
            cell = seen["cell"] = self.cell(index)
            return cell if cell and check(cell) else None

        try:
            return nib.poll(passing, self.deadline.left(timeout), 0.5, what)
        except TimeoutError as error:  # say what the cell showed instead, so a failure in CI can be read
            raise TimeoutError(f"{error}; {self.describe(index)}") from None


@contextlib.contextmanager
def lab_on(notebook: Path, out: Path, deadline):
    """JupyterLab on `notebook` in headless Chromium, opened and its kernel ready: yields the Notebook. A failure
    inside leaves a screenshot (failed.png) in `out`; the server is stopped however it ends."""
    from playwright.sync_api import sync_playwright

    server = nib.JupyterServer("lab", notebook, out, out / "server.log", sys.executable, user_config=False)
    page = None
    try:
        server.start(deadline)
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                str(out / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=nib.CHROMIUM_ARGS,
                viewport={"width": 1280, "height": 1400}, timeout=60000)
            context.set_default_timeout(30000)
            page = context.pages[0] if context.pages else context.new_page()
            lab = Notebook(page, server, deadline)
            lab.open()
            yield lab
            context.close()
    except Exception:
        if page is not None:
            try:
                page.screenshot(path=str(out / "failed.png"), full_page=True)
            except Exception:  # noqa: BLE001 - the picture is a help, not the check
                pass
        raise
    finally:
        server.stop()


def history_steps(root: Path) -> int:
    files = list(root.glob("runs/*-browser/history.jsonl"))
    return len(files[0].read_text().splitlines()) if files else 0


def shown_step(cell: dict) -> int | None:
    found = STEP.search(cell["text"] if cell else "")
    return int(found[1]) if found else None


@pytest.mark.browser
def test_a_background_run_reattached_after_a_reload_keeps_growing_and_stops(tmp_path):
    from qlora_magic import examples

    _require_browser_tools()
    out, notebook = new_notebook(tmp_path, "background_attach", notebook_cells(examples.path("word_forms")))
    root = notebook.parent
    deadline = nib.Deadline(TIMEOUT)
    with lab_on(notebook, out, deadline) as lab:
        page = lab.page
        lab.run.run_all()
        lab.run.wait_run_done(deadline)  # the load, then the background cell returns at once
        trained = lab.wait_for(1, lambda c: c["widgets"] and (shown_step(c) or 0) >= 3, "the run's own view at step 3")
        assert "-browser" in trained["text"] and "Traceback" not in trained["text"]

        # A reload loses the cell's view (the notebook is not saved); the kernel trains on.
        before = history_steps(root)
        assert before >= 3, "the run writes its history as it goes"
        lab.open(reload=True)
        assert lab.cell(1)["widgets"] == 0

        attach = lab.add_and_run("%qlora_attach")
        first = lab.wait_for(attach, lambda c: shown_step(c) is not None and c["image"] and c["image"]["width"],
                             "the attached view with its chart")
        assert shown_step(first) >= before, first["text"]  # every step logged before the reload is there
        assert f"/{STEPS}" in first["text"] and "-browser" in first["text"] and "%qlora_stop" in first["text"]
        later = lab.wait_for(attach, lambda c: (shown_step(c) or 0) >= shown_step(first) + 3
                             and c["image"]["src"] != first["image"]["src"], "the attached view to grow", 90)
        assert later["image"]["width"] > 0 and later["bar"] == "training"

        stop = lab.add_and_run("%qlora_stop")
        said = lab.wait_for(stop, lambda c: "Stopped" in c["text"], "%qlora_stop's line")["text"]
        assert re.search(r"Stopped \S+-browser at step \d+/\d+ \(interrupted\)", said), said
        ended = lab.wait_for(attach, lambda c: c["bar"] == "interrupted", "the attached view to end", 120)
        assert ended["text"].lstrip().splitlines()[0].endswith("-browser")  # the header: no stop hint any more
        assert "interrupted · " in ended["text"] and shown_step(ended) >= shown_step(later)
        assert shown_step(ended) < STEPS
        record = json.loads(next(root.glob("runs/*-browser/run.json")).read_text())
        assert record["status"] == "interrupted" and record["steps_done"] == shown_step(ended)

        cells = page.evaluate(nib.JS_COLLECT)["cells"]
        errors, widget_errors = nib.find_errors(cells)
        assert errors == [] and widget_errors == [], (errors, widget_errors)
        page.screenshot(path=str(out / "attached.png"), full_page=True)
