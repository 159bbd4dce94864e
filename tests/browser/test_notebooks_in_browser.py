"""Run notebooks in JupyterLab in headless Chromium and check what renders.

Each notebook in NOTEBOOKS is run through tests/browser/notebook_in_browser.py
(Run All in a real browser): the test passes when the script exits 0 and its
report.json shows no tracebacks, no widget errors, every code cell executed,
and at least the given numbers of widget views and images.

Setup (once per machine): scripts/setup-browser.sh   (Debian chromium + pinned pip packages)
Run:                       python3 -m pytest tests/browser -q
Skip on purpose:           QLORA_SKIP_BROWSER=1  (or deselect with -m "not browser")
Keep screenshots/reports:  QLORA_BROWSER_OUT=/some/dir  (one subfolder per notebook;
                           default: pytest's tmp_path)
Time budget per notebook:  QLORA_BROWSER_TIMEOUT=600 (seconds, the script's --timeout)
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).resolve().parent / "notebook_in_browser.py"

# (notebook path relative to the repo root, min widget views, min images)
NOTEBOOKS = [
    ("tests/browser/widgets_and_chart.ipynb", 3, 1),  # VBox(IntSlider, Button, Label) + a matplotlib chart
    # HTML readouts and the loss chart (the HTML reporter: no widgets), no tracebacks.
    ("notebooks/01_quickstart.ipynb", 0, 1),
    # The dashboard: tabs, forms, buttons, memory bars (~60 views); the training widget's chart image and
    # the summary's chart image.
    ("notebooks/panel.ipynb", 30, 2),
]

WIDGET_MANAGER = "@jupyter-widgets/jupyterlab-manager"  # Lab's widget extension (from jupyterlab_widgets)
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
TIMEOUT = float(os.environ.get("QLORA_BROWSER_TIMEOUT", "600"))  # the quickstart trains ~23 steps on the CPU


def _require_browser_tools() -> None:
    """Skip when QLORA_SKIP_BROWSER=1; otherwise FAIL (one line) if a prerequisite is missing."""
    if os.environ.get("QLORA_SKIP_BROWSER") == "1":
        pytest.skip("QLORA_SKIP_BROWSER=1")
    missing = []
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        missing.append(f"chromium ({CHROMIUM})")
    for module in ("playwright", "jupyterlab", "ipykernel", "ipywidgets", "jupyterlab_widgets"):
        if importlib.util.find_spec(module) is None:
            missing.append(f"python package {module} (in {sys.executable})")
    if missing:
        pytest.fail(f"browser test prerequisites missing: {', '.join(missing)}; "
                    f"run scripts/setup-browser.sh (or set QLORA_SKIP_BROWSER=1 to skip)",
                    pytrace=False)


def _out_dir(tmp_path: Path, notebook: Path) -> Path:
    base = os.environ.get("QLORA_BROWSER_OUT")
    out = (Path(base).resolve() if base else tmp_path) / notebook.stem
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.mark.browser
@pytest.mark.parametrize("rel_path, min_widgets, min_images", NOTEBOOKS,
                         ids=[n[0] for n in NOTEBOOKS])
def test_notebook_renders_in_jupyterlab(rel_path, min_widgets, min_images, tmp_path):
    notebook = REPO / rel_path
    _require_browser_tools()
    if not notebook.is_file():
        pytest.fail(f"notebook listed in NOTEBOOKS does not exist: {rel_path} "
                    f"(looked for {notebook})", pytrace=False)

    out = _out_dir(tmp_path, notebook)
    cmd = [sys.executable, str(SCRIPT), str(notebook), "--out", str(out), "--app", "lab",
           "--timeout", str(TIMEOUT),
           "--min-widgets", str(min_widgets), "--min-images", str(min_images)]
    if min_widgets > 0:
        cmd += ["--require-labextension", WIDGET_MANAGER]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          timeout=TIMEOUT + 120)  # the script also needs time to shut down

    report_path = out / "report.json"
    assert report_path.is_file(), (
        f"no report.json (exit {proc.returncode}); stderr:\n{proc.stderr[-4000:]}")
    report = json.loads(report_path.read_text())
    where = f"report, screenshots and logs in {out}"
    assert proc.returncode == 0, (
        f"{rel_path}: notebook_in_browser.py exit {proc.returncode} "
        f"(1 = check failed, 2 = could not run); failures: {report.get('failures')}; "
        f"{where}\nstderr tail:\n{proc.stderr[-3000:]}")

    assert report["ok"] is True, where
    assert report["errors"] == [], f"tracebacks in outputs: {report['errors']}; {where}"
    assert report["widget_errors"] == [], f"widget errors: {report['widget_errors']}; {where}"
    assert report["cells"]["not_executed"] == [], f"cells not executed; {where}"
    assert report["cells"]["in_page"] == report["cells"]["total"], where
    assert report["widget_count"] >= min_widgets, (
        f"{report['widget_count']} widget views < {min_widgets}: {report['widgets']}; {where}")
    assert report["image_count"] >= min_images, (
        f"{report['image_count']} images < {min_images}: {report['images']}; {where}")
    if min_widgets > 0:
        assert report["widget_manager"] is True, f"{WIDGET_MANAGER} not loaded; {where}"
    print(f"{rel_path}: {report['widget_count']} widget views, {report['image_count']} images, "
          f"{report['seconds'].get('total')} s; {where}")
