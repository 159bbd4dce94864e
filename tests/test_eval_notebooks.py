"""Course notebooks 08_evaluation, 09_adapters_and_merge, 10_tuning and 11_classification_and_summarization: written by
scripts/make_eval_notebooks.py, and they run top to bottom (slow: a few minutes each on 2 CPU cores)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def _generator():
    spec = importlib.util.spec_from_file_location("make_eval_notebooks", ROOT / "scripts" / "make_eval_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_notebooks_match_the_generator():
    import nbformat

    for name, cells in _generator().NOTEBOOKS.items():
        committed = nbformat.read(NOTEBOOKS / name, as_version=4)
        assert [c.source for c in committed.cells] == [src for _, src in cells], (
            f"notebooks/{name} differs from the generator: run python scripts/make_eval_notebooks.py --execute {name[:2]}")
        assert all(c.get("execution_count") for c in committed.cells if c.cell_type == "code"), f"notebooks/{name} is not executed"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(_generator().NOTEBOOKS))
def test_notebook_runs(name):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    for cell in nb.cells:
        errors = [o for o in cell.get("outputs", []) if o.output_type == "error"]
        expected = "raises-exception" in cell.metadata.get("tags", [])
        assert bool(errors) == expected, f"{name}: {cell.source[:60]!r}"
        if expected:  # a user error is shown as one line, no traceback
            assert len(errors[0]["traceback"]) == 1, errors[0]["traceback"]
