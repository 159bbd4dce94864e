"""Every notebook in notebooks/ is its jupytext source in notebooks/src/, executed.

Edit notebooks/src/<name>.py, never the .ipynb, then `python scripts/notebooks.py execute <name>` and commit both
(the script's docstring says more). Fast: reads files only.
"""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SOURCES = NOTEBOOKS / "src"
NAMES = sorted({p.stem for p in NOTEBOOKS.glob("*.ipynb")} | {p.stem for p in SOURCES.glob("*.py")})


def cells(nb):
    return [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in nb.cells]


def test_the_course_is_there():
    for prefix in ("01_", "02_", "03_", "04_", "05_", "06_", "07_", "08_", "09_", "10_", "11_", "12_", "13_", "14_", "15_", "panel"):
        assert any(n.startswith(prefix) for n in NAMES), f"no notebooks/{prefix}*.ipynb"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_its_source_executed(name):
    import jupytext
    import nbformat

    notebook, source = NOTEBOOKS / f"{name}.ipynb", SOURCES / f"{name}.py"
    assert source.exists(), f"notebooks/{name}.ipynb has no source: write notebooks/src/{name}.py (jupytext percent format)"
    assert notebook.exists(), f"notebooks/src/{name}.py has no notebook: run python scripts/notebooks.py execute {name}"
    nb = nbformat.read(notebook, as_version=4)
    expected = cells(jupytext.read(source))
    got = cells(nb)
    first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
    assert got == expected, (
        f"notebooks/{name}.ipynb differs from notebooks/src/{name}.py from cell {first} on "
        f"({len(got)} vs {len(expected)} cells): run python scripts/notebooks.py execute {name}")
    unexecuted = [c.source[:60] for c in nb.cells if c.cell_type == "code" and not c.get("execution_count")]
    assert not unexecuted, f"notebooks/{name}.ipynb has unexecuted cells {unexecuted}: run python scripts/notebooks.py execute {name}"


def test_the_colab_quickstart_is_its_source_and_names_real_magics():
    """notebooks/colab/quickstart.ipynb needs a GPU and the Hub, so it is kept unexecuted (outside the executed
    notebooks/*.ipynb) and checked here: it is its source, and every magic it uses exists."""
    import re

    import jupytext
    import nbformat

    from qlora_magic.front.magics import QloraMagics

    folder = NOTEBOOKS / "colab"
    nb = nbformat.read(folder / "quickstart.ipynb", as_version=4)
    assert cells(nb) == cells(jupytext.read(folder / "quickstart.py")), (
        "notebooks/colab/quickstart.ipynb differs from quickstart.py: run "
        "python -c \"import jupytext; jupytext.write(jupytext.read('notebooks/colab/quickstart.py'), 'notebooks/colab/quickstart.ipynb')\"")
    assert nb.metadata.get("accelerator") == "GPU"
    known = {name for kind in QloraMagics.magics.values() for name in kind} | {"qlora_export"}  # export: issue 15
    used = {m for c in nb.cells if c.cell_type == "code" for m in re.findall(r"^%%?(qlora_\w+)", c.source, re.M)}
    assert used and used <= known, sorted(used - known)
