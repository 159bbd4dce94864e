"""The course notebooks (notebooks/02_*.ipynb ... 07_*.ipynb) and the panel notebook run top to bottom.

Each is executed with nbclient in notebooks/ (as in Jupyter) on the embedded default model; a failing
cell fails the test with its error. The executed copy is not written back: scripts/make_course.py
--execute does that when the committed outputs should change. About one to two minutes each on 2 CPU
cores, so they are `slow`.
"""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
COURSE = sorted(p.name for p in NOTEBOOKS.glob("0[2-7]_*.ipynb")) + ["panel.ipynb"]


def test_the_course_is_there():
    names = set(COURSE)
    for prefix in ("02_", "03_", "04_", "05_", "06_", "07_"):
        assert any(n.startswith(prefix) for n in names), f"no notebooks/{prefix}*.ipynb"


def test_committed_notebooks_match_the_generator():
    """Edit scripts/make_course.py, not the .ipynb: the cells' sources must be the generator's."""
    import importlib.util

    import nbformat

    spec = importlib.util.spec_from_file_location("make_course", ROOT / "scripts" / "make_course.py")
    make_course = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_course)
    for name, cells in make_course.NOTEBOOKS.items():
        committed = nbformat.read(NOTEBOOKS / name, as_version=4)
        assert [c.source for c in committed.cells] == [src for _, src in cells], (
            f"notebooks/{name} differs from scripts/make_course.py: run python scripts/make_course.py --execute {name[:2]}")


@pytest.mark.slow
@pytest.mark.parametrize("name", COURSE)
def test_course_notebook_runs(name, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    # Runs in notebooks/ like Jupyter does; what the notebooks write goes to notebooks/runs/ (git-ignored).
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
