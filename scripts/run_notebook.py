"""Execute a notebook headless (nbclient) and write the executed copy.

    python scripts/run_notebook.py notebooks/01_quickstart.ipynb --out runs/demo [--timeout 900]

The kernel runs in the notebook's own folder, as in Jupyter. Prints where the executed notebook is.
Exit status 1 if a cell fails (its error is printed).
"""

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


def run(notebook: Path, out_dir: Path, timeout: int = 900) -> Path:
    nb = nbformat.read(notebook, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(notebook.parent)}})
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / notebook.name
    try:
        client.execute()
    finally:
        nbformat.write(nb, target)
    return target


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    args = parser.parse_args()
    started = time.perf_counter()
    try:
        target = run(args.notebook, args.out, args.timeout)
    except CellExecutionError as error:
        print(str(error).strip().splitlines()[-1], file=sys.stderr)
        print(f"The partly executed notebook is at {args.out / args.notebook.name}", file=sys.stderr)
        sys.exit(1)
    print(f"Executed {args.notebook} in {time.perf_counter() - started:.0f} s -> {target.resolve()}")


if __name__ == "__main__":
    main()
