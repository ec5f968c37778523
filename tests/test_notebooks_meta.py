"""Checks on every committed notebook that need no kernel: size, no widget state, the
teaching conventions (imports diaglab, asserts, ends with "What you learned"), and a
stored state that nbval can compare against (notebooks/store_outputs.py writes it).
Running the cells is nbval's job: `pytest --nbval notebooks` (see the Makefile)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
MAX_BYTES = 300 * 1024
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def _code(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


def _markdown(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "markdown"]


def test_the_suite_is_there():
    names = [p.name for p in NOTEBOOKS]
    for expected in ("00_welcome.ipynb", "01_rmt_from_scratch.ipynb", "02_armt_from_scratch.ipynb",
                     "03_the_grid.ipynb", "04_diagonal_batching.ipynb", "08_beyond_one_device.ipynb"):
        assert expected in names, f"notebooks/{expected} is missing"


@pytest.fixture(params=NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def notebook(request) -> tuple[Path, nbformat.NotebookNode]:
    path = request.param
    return path, nbformat.read(path, as_version=4)


def test_name_is_numbered_in_reading_order(notebook):
    path, _ = notebook
    assert re.fullmatch(r"\d\d_[a-z0-9_]+\.ipynb", path.name), \
        f"{path.name}: name notebooks NN_snake_case.ipynb, numbered in reading order"


def test_valid_and_small(notebook):
    path, nb = notebook
    nbformat.validate(nb)
    size = path.stat().st_size
    assert size < MAX_BYTES, (f"{path.name} is {size / 1024:.0f} KB (limit {MAX_BYTES // 1024} KB): strip figure "
                              "outputs — mark those cells # NBVAL_IGNORE_OUTPUT and run notebooks/store_outputs.py")


def test_no_widget_state(notebook):
    path, nb = notebook
    assert "widgets" not in nb.metadata, f"{path.name}: notebook metadata holds widget state; strip it"
    assert WIDGET_STATE not in path.read_text(), f"{path.name}: an output holds {WIDGET_STATE}; strip it"


def test_teaching_conventions(notebook):
    path, nb = notebook
    code = "\n".join(_code(nb))
    assert re.search(r"^\s*(import diaglab\b|from diaglab\b)", code, re.M), f"{path.name} does not import diaglab"
    assert re.search(r"^\s*assert\b", code, re.M), f"{path.name} has no assert: check facts, do not only print them"
    learned = [i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and "What you learned" in c.source]
    assert learned, f"{path.name} has no 'What you learned' section"
    assert all(c.cell_type == "markdown" for c in nb.cells[learned[-1]:]), \
        f"{path.name}: the 'What you learned' section must come last"


def test_stored_state_is_a_valid_nbval_reference(notebook):
    """nbval fails on a cell with outputs but no execution count, and a stored error is never intended."""
    path, nb = notebook
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        assert not (cell.outputs and cell.execution_count is None), \
            f"{path.name} cell {i}: outputs without an execution count (re-run notebooks/store_outputs.py)"
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, f"{path.name} cell {i} stores an error: {errors[0].get('ename')}"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", f"{path.name}: kernelspec must be python3"


def test_welcome_map_lists_every_notebook():
    welcome = nbformat.read(NOTEBOOKS_DIR / "00_welcome.ipynb", as_version=4)
    text = json.dumps(_markdown(welcome))
    missing = [p.name for p in NOTEBOOKS if p.name not in text]
    assert not missing, f"the map in 00_welcome.ipynb does not mention {missing}; add them to its table"
