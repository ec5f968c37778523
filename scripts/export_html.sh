#!/usr/bin/env bash
# Execute the notebooks and export them to static HTML in build/html/ (or $OUT) — one
# self-contained file per notebook that opens offline in any browser and makes no network
# request: plotly.js is embedded once per file, and every figure with its animation frames,
# so the schedule animations still play (▶ Play and the step slider). Widgets (the schedule
# explorer, the live profiling view) need a running kernel: each notebook shows a static
# figure of the same state next to them, which is what the export keeps.
#
#   bash scripts/export_html.sh                                # every notebooks/NN_*.ipynb
#   bash scripts/export_html.sh notebooks/03_the_grid.ipynb    # some of them
#   OUT=/tmp/html bash scripts/export_html.sh ...              # somewhere else
set -euo pipefail
cd "$(dirname "$0")/.."
JUPYTER="${JUPYTER:-.venv/bin/jupyter}"
OUT="${OUT:-build/html}"

# In a kernel plotly's default renderer emits only its JSON mimetype, which JupyterLab draws but
# nbconvert's HTML exporter drops. Adding the "notebook" renderer also emits each figure as HTML
# with an inline plotly.js, which the export keeps.
export PLOTLY_RENDERER="plotly_mimetype+notebook"
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 KINETO_LOG_LEVEL=6

if [ "$#" -eq 0 ]; then
  set -- notebooks/[0-9][0-9]_*.ipynb
fi
mkdir -p "$OUT"
# scripts/html_offline: the lab template without its CDN scripts (require.js, MathJax, mermaid, widgets).
"$JUPYTER" nbconvert --to html --execute --ExecutePreprocessor.timeout=600 \
  --TemplateExporter.extra_template_basedirs=scripts --template html_offline --output-dir "$OUT" "$@"

# plotly's "notebook" renderer adds a MathJax <script src> from a CDN to every figure, for TeX in
# labels; no figure here has TeX, so those tags go. Then no external script source may remain.
PYTHON="${PYTHON:-$(dirname "$JUPYTER")/python}"
"$PYTHON" - "$OUT" "$@" <<'PY'
import re
import sys
from pathlib import Path

out, notebooks = Path(sys.argv[1]), sys.argv[2:]
mathjax = re.compile(r'<script[^>]*\bsrc="https?://[^"]*mathjax[^"]*"[^>]*>\s*</script>', re.I)
external = re.compile(r'<script[^>]*\bsrc=["\']?(https?:)?//', re.I)
for nb in notebooks:
    html = out / (Path(nb).stem + ".html")
    text = mathjax.sub("", html.read_text(encoding="utf-8"))
    html.write_text(text, encoding="utf-8")
    found = external.search(text)
    if found:
        sys.exit(f"error: {html} still loads a script from the network: {text[found.start():found.start() + 120]}")
PY

# The schedule animation must have survived the export: frames, a slider and plotly.js itself.
grid_html="$OUT/03_the_grid.html"
if [ -f "$grid_html" ]; then
  for needle in 'Plotly.addFrames' '"sliders"' 'plotly.js v'; do
    grep -q -- "$needle" "$grid_html" || { echo "error: $grid_html lacks $needle" >&2; exit 1; }
  done
fi
ls -l "$OUT"
