"""The quickstart notebook, executed top to bottom with nbclient as `make demo` does."""

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_and_shows_the_change(tmp_path):
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    from run_notebook import run

    executed = run(ROOT / "notebooks" / "01_quickstart.ipynb", tmp_path)
    import nbformat

    nb = nbformat.read(executed, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "Paris" in text  # the question mark stayed in the prompt
    assert 'The opposite of \\"tall\\" is' in text or 'The opposite of "tall" is' in text
    assert "eval loss" in text and "status       completed" in text
    images = [o for o in outputs if "image/png" in o.get("data", {}) or "<img" in str(o.get("data", {}).get("text/html", ""))]
    assert images  # the loss chart stays in the saved notebook
