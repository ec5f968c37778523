#!/usr/bin/env bash
# Execute the notebooks and export them to static HTML in build/html/ — one self-contained
# file per notebook that opens offline in any browser: plotly.js is embedded once per file,
# and every figure is embedded with its animation frames, so the schedule animations still
# play (▶ Play and the step slider). Widgets need a live kernel and export as static text.
#
#   bash scripts/export_html.sh                                # every notebooks/NN_*.ipynb
#   bash scripts/export_html.sh notebooks/03_the_grid.ipynb    # some of them
set -euo pipefail
cd "$(dirname "$0")/.."
JUPYTER="${JUPYTER:-.venv/bin/jupyter}"
OUT=build/html

# In a kernel plotly's default renderer emits only its JSON mimetype, which JupyterLab draws but
# nbconvert's HTML exporter drops. Adding the "notebook" renderer also emits each figure as HTML
# with an inline plotly.js, which the export keeps.
export PLOTLY_RENDERER="plotly_mimetype+notebook"
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 KINETO_LOG_LEVEL=6

if [ "$#" -eq 0 ]; then
  set -- notebooks/[0-9][0-9]_*.ipynb
fi
mkdir -p "$OUT"
"$JUPYTER" nbconvert --to html --execute --ExecutePreprocessor.timeout=600 --output-dir "$OUT" "$@"

# The schedule animation must have survived the export: frames, a slider and plotly.js itself.
grid_html="$OUT/03_the_grid.html"
if [ -f "$grid_html" ]; then
  for needle in 'Plotly.addFrames' '"sliders"' 'plotly.js v'; do
    grep -q -- "$needle" "$grid_html" || { echo "error: $grid_html lacks $needle" >&2; exit 1; }
  done
fi
ls -l "$OUT"
