"""Real-browser test of the suite: JupyterLab serves a copy of notebooks/, Debian's
chromium (driven by Playwright) opens 03_the_grid.ipynb, runs every cell, and checks that
the interactive schedule explorer (ipywidgets sliders + a plotly FigureWidget) and the
plotly figures render, and that moving the explorer's step slider changes which cells
of the grid are highlighted as running. A screenshot goes to test-output/.

Skips only when /usr/bin/chromium is missing (scripts/install_browser.sh installs it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
NOTEBOOK = "03_the_grid.ipynb"
SCREENSHOT = ROOT / "test-output" / "browser_03_the_grid.png"
FAILURE_SCREENSHOT = ROOT / "test-output" / "browser_03_the_grid_failure.png"
RUNNING = 1  # diaglab.viz.RUNNING: the state code of a running cell in the grid heatmap
EXPLORER_L, EXPLORER_S = 4, 8  # the explorer in 03_the_grid.ipynb
STEP_AFTER_RUN = 5  # the notebook sets explorer.step.value = 5 in the cell after the explorer

pytestmark = [
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing: install Debian's chromium "
                       "(scripts/install_browser.sh) to run the real-browser test"),
    pytest.mark.timeout(175),
]

# JupyterLab settings for a quiet, deterministic session: every cell stays in the DOM (no
# windowing), and no news or update toasts appear over the page.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                       "checkForUpdates": False},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with code {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"jupyter lab did not answer {url} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on a random port over a temporary copy of notebooks/; yields (base_url, token)."""
    root = tmp_path / "notebooks"
    shutil.copytree(ROOT / "notebooks", root, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    settings = tmp_path / "settings"
    for rel, value in LAB_SETTINGS.items():
        (settings / rel).parent.mkdir(parents=True, exist_ok=True)
        (settings / rel).write_text(json.dumps(value))
    port, token = _free_port(), "diaglab-browser-test"
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path / "config"), JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    env.pop("PLOTLY_RENDERER", None)
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    log = tmp_path / "jupyterlab.log"
    with open(log, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for_server(f"{base}/api/status?token={token}", proc, log)
        yield base, token, log
    finally:
        proc.terminate()  # the server shuts its kernels down on SIGTERM
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _prompts(page) -> list[str]:
    return page.evaluate("() => [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')]"
                         ".map(e => e.textContent.trim())")


def _errors(page) -> list[str]:
    return page.evaluate("() => [...document.querySelectorAll("
                         "'.jp-OutputArea-output[data-mime-type=\"application/vnd.jupyter.stderr\"]')]"
                         ".map(e => e.textContent).filter(t => /Error|Traceback/.test(t))")


def _menu(page, menu: str, item: str) -> None:
    """Click a menu-bar menu, then one of its items, by their labels (as a user would)."""
    page.locator(".lm-MenuBar-item", has_text=re.compile(f"^{menu}$")).click()
    label = page.locator(".lm-Menu-itemLabel", has_text=re.compile(f"^{re.escape(item)}$"))
    page.locator(".lm-MenuBar-menu .lm-Menu-item", has=label).click()


def _wait_all_run(page, n_code: int, timeout: float = 120.0) -> None:
    """Until every code cell shows an execution count [k]: (fail fast on a traceback)."""
    page.wait_for_function("() => [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')]"
                           ".some(e => e.textContent.trim() !== '[ ]:')", timeout=30_000)  # the run has started
    deadline = time.monotonic() + timeout
    prompts: list[str] = []
    while time.monotonic() < deadline:
        errors = _errors(page)
        assert not errors, f"a cell failed in the browser:\n{errors[0][-2000:]}"
        prompts = _prompts(page)
        if len(prompts) == n_code and all(re.fullmatch(r"\[\d+\]:", p) for p in prompts):
            return
        page.wait_for_timeout(500)
    raise AssertionError(f"cells did not finish within {timeout:.0f} s; prompts: {prompts}")


def _running_cells(plot) -> list[tuple[int, int]]:
    """(layer, segment) of the cells the explorer's heatmap shows as running, read from plotly's gd.data."""
    z = plot.evaluate("gd => gd.data[0].z")
    return sorted((l, s) for l, row in enumerate(z) for s, v in enumerate(row) if v == RUNNING)


def test_grid_notebook_runs_and_explorer_responds(lab):
    from playwright.sync_api import sync_playwright

    base, token, log = lab
    nb = json.loads((ROOT / "notebooks" / NOTEBOOK).read_text())
    # a collapsed input (an exercise's hidden solution) shows a placeholder without a prompt: count the others
    n_code = sum(c["cell_type"] == "code" and not c["metadata"].get("jupyter", {}).get("source_hidden")
                 for c in nb["cells"])
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.set_default_timeout(60_000)
            page.goto(f"{base}/lab/tree/{NOTEBOOK}?token={token}")
            page.locator(".jp-NotebookPanel .jp-Notebook .jp-CodeCell").first.wait_for()
            # the status bar reads "Python 3 (ipykernel) | Idle" once the kernel is up and connected
            page.locator(".jp-StatusBar-TextItem", has_text=re.compile(r"\| Idle$")).wait_for(timeout=90_000)

            # 1. clear the stored outputs (so every count below comes from this run), then run all cells
            _menu(page, "Edit", "Clear Outputs of All Cells")
            page.wait_for_function("() => [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')]"
                                   ".every(e => e.textContent.trim() === '[ ]:')", timeout=10_000)
            _menu(page, "Run", "Run All Cells")
            _wait_all_run(page, n_code)

            # 2. the explorer: ipywidgets sliders and a plotly FigureWidget inside the same widget box
            explorer = page.locator(".widget-vbox", has=page.locator(".widget-slider")).filter(
                has=page.locator(".js-plotly-plot")).first
            explorer.wait_for()
            labels = explorer.locator(".widget-slider .widget-label").all_inner_texts()
            assert [t.strip() for t in labels] == ["L (layers)", "S (segments)", "step"], labels
            plot = explorer.locator(".js-plotly-plot").first
            plot.wait_for()
            assert page.locator(".jp-OutputArea-output.js-plotly-plot").count() >= 5  # static figures, drawn by jupyterlab-plotly

            # 3. the step slider: the notebook left it at step 5; two ArrowRight presses move it to 7
            expected = lambda t: [(l, t - l) for l in range(EXPLORER_L) if 0 <= t - l < EXPLORER_S]  # anti-diagonal t
            page.wait_for_function("gd => gd.data && gd.data[0].z.flat().filter(v => v === 1).length === 4",
                                   arg=plot.element_handle())
            before = _running_cells(plot)
            assert before == expected(STEP_AFTER_RUN), before
            handle = explorer.locator(".widget-slider", has_text="step").locator(".noUi-handle")
            handle.scroll_into_view_if_needed()
            handle.click()
            handle.press("ArrowRight")
            handle.press("ArrowRight")
            page.wait_for_function(
                "([gd, want]) => JSON.stringify(gd.data[0].z.flatMap((row, l) => row.flatMap((v, s) =>"
                " v === 1 ? [[l, s]] : []))) === JSON.stringify(want)",
                arg=[plot.element_handle(), [list(c) for c in expected(STEP_AFTER_RUN + 2)]], timeout=20_000)
            after = _running_cells(plot)
            assert after == expected(STEP_AFTER_RUN + 2) and after != before
            assert f"step {STEP_AFTER_RUN + 2}" in explorer.inner_text()

            explorer.scroll_into_view_if_needed()
            page.screenshot(path=str(SCREENSHOT))
        except Exception:
            page.screenshot(path=str(FAILURE_SCREENSHOT))  # what the browser showed when it failed
            print(f"jupyter lab log (tail):\n{log.read_text()[-3000:]}")  # shown by pytest on failure
            raise
        finally:
            browser.close()
    assert SCREENSHOT.stat().st_size > 10_000
