"""Checks on every committed notebook: size, no widget state, the teaching conventions
(imports diaglab, asserts, ends with "What you learned"), a stored state that nbval can
compare against (notebooks/store_outputs.py writes it), the exercises' shape, references
that resolve, one name per yardstick. Two tests run a kernel: nbval on a copy of the suite
outside the repository, and the static HTML export (no script from the network). Running
every cell of every notebook is nbval's job: `pytest --nbval notebooks` (see the Makefile)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
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


# ---- the course: exercises, references, vocabulary -------------------------------------
REPO = NOTEBOOKS_DIR.parent
MIN_EXERCISES = {"01": 2, "02": 2, "03": 2, "04": 2, "06": 1}


def _exercises(nb) -> list[tuple[int, list]]:
    """(index of each 'Your turn' heading, the code cells up to the next markdown cell)."""
    found = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown" and cell.source.startswith("### Your turn"):
            block = []
            for nxt in nb.cells[i + 1:]:
                if nxt.cell_type != "code":
                    break
                block.append(nxt)
            found.append((i, block))
    return found


def test_exercises_have_a_template_a_checker_and_a_hidden_solution(notebook):
    """A visible template that the checker reports as not attempted, then a collapsed cell
    with the solution that asserts the checker's verdict (nbval runs it)."""
    path, nb = notebook
    exercises = _exercises(nb)
    assert len(exercises) >= MIN_EXERCISES.get(path.name[:2], 0), \
        f"{path.name}: {len(exercises)} 'Your turn' exercises, want {MIN_EXERCISES[path.name[:2]]}"
    for i, block in exercises:
        assert len(block) >= 2, f"{path.name} cell {i}: an exercise needs a template cell and a solution cell"
        template, solution = block[0], block[1]
        assert re.search(r"exercises\.check_\w+\(", template.source), f"{path.name} cell {i + 1}: no checker call"
        assert "NotImplementedError" in template.source or "= None" in template.source, \
            f"{path.name} cell {i + 1}: the template must leave the answer open"
        assert not template.metadata.get("jupyter", {}).get("source_hidden"), f"{path.name}: the template is hidden"
        assert solution.metadata.get("jupyter", {}).get("source_hidden") is True, \
            f"{path.name} cell {i + 2}: collapse the solution (metadata jupyter.source_hidden)"
        assert solution.source.startswith("# Solution") and "assert verdict" in solution.source
        stored = "".join(o.get("data", {}).get("text/plain", "") for o in template.outputs)
        assert "not attempted yet" in stored, f"{path.name} cell {i + 1}: stored output {stored!r}"


def _markdown_and_code(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    return "\n".join(c.source for c in nb.cells)


def test_every_reference_resolves():
    """No SPEC (it is not in the repository), no data path relative to the working directory,
    and every link to the design notes or the glossary points at an anchor that exists."""
    design = (REPO / "docs" / "design.md").read_text()
    anchors = set(re.findall(r'<a id="([\w-]+)"></a>', design))
    assert anchors >= {f"s{k}" for k in range(1, 8)}, f"docs/design.md anchors: {sorted(anchors)}"
    for k in range(1, 8):
        assert re.search(rf'<a id="s{k}"></a>\n## §{k} ', design), f"design §{k} must follow its anchor"
    glossary = set(re.findall(r'<a id="([\w-]+)"></a>', _markdown_and_code(NOTEBOOKS_DIR / "00_welcome.ipynb")))
    texts = {p.name: _markdown_and_code(p) for p in NOTEBOOKS} | {"README.md": (REPO / "README.md").read_text()}
    for name, text in texts.items():
        assert not re.search(r"(?<!TORCH_)\bSPEC\b", text), f"{name} mentions SPEC: point it at docs/design.md"
        assert "../data" not in text and "../shared" not in text, f"{name}: find data with diaglab.paths.data_path"
        assert "Path.cwd()" not in text, f"{name}: the working directory is wherever the notebook was opened"
        for anchor in re.findall(r"design\.md#([\w-]+)", text):
            assert anchor in anchors, f"{name} links design.md#{anchor}, which does not exist"
        for anchor in re.findall(r"00_welcome\.ipynb#([\w-]+)", text):
            assert anchor in glossary, f"{name} links 00_welcome.ipynb#{anchor}, which does not exist"


def test_one_name_per_yardstick():
    """The glossary's names are used; the retired ones ('ceiling', 'ideal speed-up') are not."""
    welcome = _markdown_and_code(NOTEBOOKS_DIR / "00_welcome.ipynb")
    for term in ("step ratio", "modelled speed-up", "ideal even load"):
        assert f"**{term}**" in welcome, f"the glossary in 00 must define **{term}**"
    for path in NOTEBOOKS:
        text = _markdown_and_code(path).lower()
        for retired in ("ceiling", "ideal speed-up"):
            assert retired not in text, f"{path.name} says {retired!r}: use the glossary's names"


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "KINETO_LOG_LEVEL": "6", "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    env.pop("DIAGLAB_DATA", None)
    env.pop("PLOTLY_RENDERER", None)
    return env


def test_notebooks_run_from_a_copy_outside_the_repository(tmp_path):
    """nbval on a copy of notebooks/ in a temporary folder: 06 reads the trained checkpoint
    and 05 the stored benchmarks, so neither may depend on the working directory. Runs 00
    and 06 (the data user that is quick); 05 finds its data the same way."""
    pytest.importorskip("nbval")
    copy = tmp_path / "course"
    shutil.copytree(NOTEBOOKS_DIR, copy, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval",
                          "--nbval-sanitize-with", "sanitize.cfg", "--nbval-cell-timeout=300",
                          "00_welcome.ipynb", "06_memory_in_action.ipynb"],
                         cwd=copy, env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout


def test_html_export_loads_nothing_from_the_network(tmp_path):
    """scripts/export_html.sh on notebook 00: the file embeds plotly.js and its figures and has
    no <script src="http..."> (no require.js, MathJax or widget manager from a CDN)."""
    jupyter = Path(sys.executable).with_name("jupyter")
    if not jupyter.exists():
        pytest.skip("jupyter (nbconvert) is not installed next to this python")
    pytest.importorskip("nbconvert")
    run = subprocess.run(["bash", str(REPO / "scripts" / "export_html.sh"), "notebooks/00_welcome.ipynb"],
                         cwd=REPO, env={**_env(), "OUT": str(tmp_path), "JUPYTER": str(jupyter)},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    html = (tmp_path / "00_welcome.html").read_text(encoding="utf-8")
    assert "plotly.js v" in html and "Plotly.newPlot" in html                        # figures embedded
    assert "Plotly.addFrames" in html                                                 # the animation too
    external = re.findall(r'<script[^>]*\bsrc=["\']?(?:https?:)?//[^>]*>', html, re.I)
    assert not external, f"the export loads scripts from the network: {external[:3]}"
    assert "require.min.js" not in html and "MathJax.js" not in html
