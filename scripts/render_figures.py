"""Regenerate the schedule figures in docs/img/ (PNG via kaleido, which drives Chromium).

Run from the repository root after `make install` (diaglab installed editable):
`.venv/bin/python scripts/render_figures.py`. Kaleido finds Chromium through
BROWSER_PATH; /usr/bin/chromium is used when that is unset.
"""

import os
from pathlib import Path

from diaglab.schedule import diagonal
from diaglab.viz import grid_figure, ring_figure, schedule_animation

OUT = Path(__file__).resolve().parent.parent / "docs" / "img"


def main() -> None:
    os.environ.setdefault("BROWSER_PATH", "/usr/bin/chromium")
    OUT.mkdir(parents=True, exist_ok=True)
    # 1. the grid at step 5 of the diagonal order, cell (2, 3) selected with its two dependencies
    grid = grid_figure(4, 8, diagonal(4, 8), step=5, selected=(2, 3))
    grid.write_image(OUT / "grid.png", width=900, height=380, scale=2)
    # 2. the middle frame of the diagonal animation: copy that frame's arrays into the trace
    anim = schedule_animation(6, 12)
    mid = len(anim.frames) // 2
    anim.data[0].update(anim.frames[mid].data[0])
    anim.layout.sliders[0].active = mid
    anim.write_image(OUT / "animation_mid.png", width=1000, height=520, scale=2)
    # 3. three requests sharing a ring of 4 slots
    ring_figure(4, [3, 5, 2]).write_image(OUT / "ring.png", width=1000, height=380, scale=2)
    print("wrote", sorted(p.name for p in OUT.glob("*.png")))


if __name__ == "__main__":
    main()
