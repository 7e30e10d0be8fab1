"""Runs the notebooks top to bottom and stores them with their outputs (plots, tables).

    pip install -e ".[notebooks]"
    python notebooks/execute.py                 # all of them, in place
    python notebooks/execute.py 02_performance  # one (a name or a prefix)

Uses the `python3` Jupyter kernel from the environment (`python -m ipykernel install --user`
if Jupyter cannot find one), with each notebook's folder as the working directory, so the
notebooks import the checkout they sit in. Cell timing metadata is dropped to keep diffs small.
"""

from __future__ import annotations

import pathlib
import sys
import time

import nbclient
import nbformat

HERE = pathlib.Path(__file__).resolve().parent


def execute(path: pathlib.Path, timeout: int = 300):
    """Executes the notebook at `path` from a clean slate; returns it with its outputs."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = nbclient.NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    return nb


def main(argv: list[str]) -> int:
    paths = sorted(HERE.glob("*.ipynb"))
    if argv:
        paths = [p for p in paths if any(p.name.startswith(a) for a in argv)]
        if not paths:
            print(f"no notebook matches {argv}", file=sys.stderr)
            return 2
    for path in paths:
        t0 = time.perf_counter()
        nb = execute(path)
        nbformat.write(nb, path)
        print(f"{path.name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
