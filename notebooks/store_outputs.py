"""Execute the suite's notebooks and store them as the repository keeps them.

The stored outputs are nbval's reference: `pytest --nbval` re-runs every cell in a fresh
kernel and compares its output with the stored one. Run this after editing a notebook,
from the repository root:

    .venv/bin/python notebooks/store_outputs.py                  # every notebooks/NN_*.ipynb
    .venv/bin/python notebooks/store_outputs.py notebooks/03_the_grid.ipynb

For each notebook it
1. runs every cell top to bottom in a fresh kernel, working directory notebooks/, with
   plotly's default renderer (PLOTLY_RENDERER is cleared);
2. drops the outputs of cells marked `# NBVAL_IGNORE_OUTPUT` — figures, widgets and
   timings: large, or different on every machine, and not checked by nbval anyway;
3. drops widget state (notebook metadata `widgets`, widget-state outputs) and per-cell
   execution timestamps, so files stay small and diffs stay quiet.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
IGNORE_MARK = "NBVAL_IGNORE_OUTPUT"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def strip(nb: nbformat.NotebookNode) -> None:
    """Steps 2 and 3 above, in place."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type != "code":
            continue
        if IGNORE_MARK in cell.source:
            cell.outputs = []
        for out in cell.outputs:
            out.get("data", {}).pop(WIDGET_STATE, None)


def store(path: Path) -> float:
    """Execute, strip and write one notebook; returns the execution time in seconds."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3", record_timing=False,
                            store_widget_state=False, resources={"metadata": {"path": str(HERE)}})
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    strip(nb)
    nbformat.validate(nb)
    nbformat.write(nb, path)
    return seconds


def main(paths: list[str]) -> None:
    os.environ.pop("PLOTLY_RENDERER", None)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    notebooks = [Path(p).resolve() for p in paths] or sorted(HERE.glob("[0-9][0-9]_*.ipynb"))
    for path in notebooks:
        seconds = store(path)
        print(f"{path.name}: executed in {seconds:.1f} s, stored {path.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main(sys.argv[1:])
