"""The notebooks: stored with their outputs (fast checks), and re-executed (the `notebooks` tier).

The fast checks read the stored files: every code cell ran, none failed, the plots are there.
`test_notebook_executes` runs each notebook top to bottom with nbclient on this machine (about
a minute each on 2 CPU cores) and fails if a cell raises or a cell that shows a plot in the
stored notebook shows none; it carries the `slow` and `notebooks` markers, so it runs with
`python -m pytest --runslow -m "slow or notebooks"` (the second command in .ci/run) and not in
the default run. Regenerate the stored outputs with `python notebooks/execute.py`.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
# the plots each notebook must show (images in its outputs)
PLOTS = {"01_operator.ipynb": 2, "02_performance.ipynb": 1, "03_training.ipynb": 1, "04_gate_rwkv7.ipynb": 1}


def _code_cells(nb):
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def _images(cell) -> int:
    return sum("image/png" in o.get("data", {}) for o in cell.get("outputs", []))


def test_all_notebooks_listed():
    assert [p.name for p in NOTEBOOKS] == list(PLOTS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_stored_with_outputs(path):
    nb = json.loads(path.read_text())
    cells = _code_cells(nb)
    counts = [c["execution_count"] for c in cells]
    assert all(n is not None for n in counts), f"{path.name}: a code cell was not run: {counts}"
    assert counts == sorted(counts), f"{path.name}: cells run out of order: {counts}"
    errors = [o for c in cells for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert not errors, f"{path.name}: stored with an error: {errors[0].get('ename')}"
    assert sum(map(_images, cells)) == PLOTS[path.name], f"{path.name}: expected {PLOTS[path.name]} plots"
    assert "matplotlib.use(" not in "".join("".join(c["source"]) for c in cells), "inline plots only"


def test_performance_notebook_reads_committed_results_only():
    nb = json.loads((NOTEBOOK_DIR / "02_performance.ipynb").read_text())
    source = "".join("".join(c["source"]) for c in _code_cells(nb))
    assert '"git", "ls-files"' in source
    assert "glob(" not in source.split("except")[0]  # globbing is only the fallback outside git


@pytest.mark.slow
@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path):
    for module in ("nbformat", "nbclient", "ipykernel", "matplotlib"):
        pytest.importorskip(module, reason=f'{module} is missing: pip install -e ".[notebooks]"')
    spec = importlib.util.spec_from_file_location("notebooks_execute", NOTEBOOK_DIR / "execute.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    stored = json.loads(path.read_text())
    nb = runner.execute(path, timeout=300)  # raises nbclient's CellExecutionError naming the cell
    ran = _code_cells(nb)
    for i, (old, new) in enumerate(zip(_code_cells(stored), ran, strict=True)):
        assert _images(new) >= _images(old), f"{path.name}: code cell {i} stored a plot, now shows none"
    assert sum(map(_images, ran)) == PLOTS[path.name]
