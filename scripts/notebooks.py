"""The course notebooks: sources in notebooks/src/*.py (jupytext percent format), executed copies in notebooks/*.ipynb.

    python scripts/notebooks.py build                  # write notebooks/*.ipynb from their sources
    python scripts/notebooks.py execute                # build, then execute every notebook in place
    python scripts/notebooks.py execute 04 panel       # ...only those whose name starts with 04 or panel
    python scripts/notebooks.py check                  # exit 1 listing the notebooks out of step with their sources

Edit the source, never the .ipynb: `# %%` starts a code cell (magics are written commented, `# %qlora_load`),
`# %% [markdown]` a markdown cell whose lines start with `# `, and `# %% tags=["raises-exception"]` a cell that
shows a one-line error on purpose (execution goes on). Or open the source in Jupyter with jupytext installed.
Then `execute` the notebook and commit both files: the .ipynb keeps its outputs, so the course reads with
results on GitHub.

`build` keeps the outputs (and ids) of the cells whose type and source are unchanged and leaves the new or edited
cells unexecuted; `execute` runs each notebook with nbclient in notebooks/, as Jupyter does (what the notebooks
write goes to notebooks/runs/, git-ignored), and writes the outputs into the .ipynb. `check` (and
tests/test_notebook_sources.py) fails when a notebook has no source or a source no notebook, when a notebook's
cells (type, source, tags) differ from its source's, or when a code cell has not been executed.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import sys
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient.exceptions import CellExecutionError
from nbformat.v4 import new_notebook

from run_notebook import run

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SOURCES = NOTEBOOKS / "src"


def source_of(notebook: Path) -> Path:
    return SOURCES / f"{notebook.stem}.py"


def notebook_of(source: Path) -> Path:
    return NOTEBOOKS / f"{source.stem}.ipynb"


def cells(nb) -> list[tuple[str, str, list[str]]]:
    """What a notebook and its source must agree on: each cell's type, source and tags."""
    return [(c.cell_type, c.source, list(c.metadata.get("tags", []))) for c in nb.cells]


def combine(source: nbformat.NotebookNode, old: nbformat.NotebookNode | None) -> nbformat.NotebookNode:
    """The notebook of `source`'s cells, with the outputs of `old`'s cells whose type and source are unchanged."""
    nb = new_notebook()
    if old is not None:
        nb.metadata.update(copy.deepcopy(old.metadata))  # language_info, widget state
    nb.metadata.update(copy.deepcopy(source.metadata))  # kernelspec
    nb.metadata.pop("jupytext", None)  # how jupytext read the source, not a pairing
    nb.cells = []
    old_cells = old.cells if old is not None else []
    kept = {}  # index in source -> index in old
    matcher = difflib.SequenceMatcher(None, [(c.cell_type, c.source) for c in old_cells],
                                      [(c.cell_type, c.source) for c in source.cells], autojunk=False)
    for block in matcher.get_matching_blocks():
        kept.update({block.b + k: block.a + k for k in range(block.size)})
    for i, cell in enumerate(source.cells):
        cell = copy.deepcopy(cell)
        if i in kept:
            before = old_cells[kept[i]]
            cell.id = before.get("id", cell.get("id"))
            if "execution" in before.metadata:
                cell.metadata["execution"] = before.metadata["execution"]
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = before.outputs, before.execution_count
        nb.cells.append(cell)
    return nb


def build(source: Path) -> bool:
    """Writes the notebook of `source` (keeping what outputs it can); True if the file changed."""
    target = notebook_of(source)
    old = nbformat.read(target, as_version=4) if target.exists() else None
    text = nbformat.writes(combine(jupytext.read(source), old))
    text += "" if text.endswith("\n") else "\n"  # as nbformat.write
    if target.exists() and target.read_text(encoding="utf-8") == text:
        return False
    target.write_text(text, encoding="utf-8")
    return True


def problems() -> list[str]:
    """One line per notebook out of step with its source (empty when all is well)."""
    found = []
    sources = {p.stem for p in SOURCES.glob("*.py")}
    notebooks = {p.stem for p in NOTEBOOKS.glob("*.ipynb")}
    found += [f"notebooks/{n}.ipynb: no source notebooks/src/{n}.py" for n in sorted(notebooks - sources)]
    found += [f"notebooks/src/{n}.py: no notebook (run build)" for n in sorted(sources - notebooks)]
    for name in sorted(sources & notebooks):
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        if cells(nb) != cells(jupytext.read(SOURCES / f"{name}.py")):
            found.append(f"notebooks/{name}.ipynb: cells differ from notebooks/src/{name}.py (run execute {name})")
        elif not all(c.get("execution_count") for c in nb.cells if c.cell_type == "code"):
            found.append(f"notebooks/{name}.ipynb: not executed (run execute {name})")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build", help="write notebooks/*.ipynb from notebooks/src/*.py, keeping unchanged cells' outputs")
    execute = commands.add_parser("execute", help="build, then execute the notebooks in place")
    execute.add_argument("prefixes", nargs="*", metavar="PREFIX", help="only the notebooks whose name starts with one")
    execute.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    commands.add_parser("check", help="exit 1 listing the notebooks out of step with their sources")
    args = parser.parse_args()

    if args.command == "check":
        found = problems()
        print("\n".join(found) if found else "notebooks match their sources")
        return 1 if found else 0

    for source in sorted(SOURCES.glob("*.py")):
        if build(source):
            print(f"built {notebook_of(source).relative_to(ROOT)}", flush=True)
    if args.command == "build":
        return 0
    targets = [p for p in sorted(NOTEBOOKS.glob("*.ipynb")) if not args.prefixes or any(p.name.startswith(x) for x in args.prefixes)]
    if not targets:
        parser.error(f"no notebook starts with {' or '.join(args.prefixes)}")
    failed = []
    for path in targets:
        started = time.perf_counter()
        try:
            run(path, path.parent, timeout=args.timeout)
        except CellExecutionError as error:
            failed.append(path.name)
            print(f"FAILED {path.relative_to(ROOT)}: {str(error).strip().splitlines()[-1]}", flush=True)
            continue
        print(f"executed {path.relative_to(ROOT)} in {time.perf_counter() - started:.0f} s", flush=True)
    if failed:
        print(f"{len(failed)} failed (partly executed, outputs written): {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
