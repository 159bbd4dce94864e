"""The course notebooks (notebooks/02_*.ipynb ... 15_*.ipynb) and the panel notebook run top to bottom.

Each is executed with nbclient in notebooks/ (as in Jupyter) on the embedded default model; a failing cell fails
the test with its error, and a cell tagged `raises-exception` must show its error, in one line. The executed copy
goes to a temporary folder, not back into notebooks/: `python scripts/notebooks.py execute` does that when the
committed outputs should change. One to a few minutes each on 2 CPU cores, so they are `slow`.
tests/test_notebooks.py runs the quickstart (01) as `make demo` does.
"""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
COURSE = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb") if p.name != "01_quickstart.ipynb")


@pytest.mark.slow
@pytest.mark.parametrize("name", COURSE)
def test_course_notebook_runs(name, tmp_path):
    import nbformat

    sys.path.insert(0, str(ROOT / "scripts"))
    from run_notebook import run

    nb = nbformat.read(run(NOTEBOOKS / name, tmp_path), as_version=4)
    for cell in nb.cells:
        errors = [o for o in cell.get("outputs", []) if o.output_type == "error"]
        expected = "raises-exception" in cell.metadata.get("tags", [])
        assert bool(errors) == expected, f"{name}: {cell.source[:60]!r}"
        if expected:  # a user error is shown as one line, no traceback
            assert len(errors[0]["traceback"]) == 1, errors[0]["traceback"]
