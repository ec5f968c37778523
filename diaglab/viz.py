"""Every plotly figure of diaglab: the layer x segment grid and its schedules, what the
schedules cost, the measured steps of a run, the benchmark's latencies and the trained
model's accuracy.

Every function here is a pure builder: it takes sizes, a schedule (from
`diaglab.schedule`), measured records or rows and returns a `go.Figure`; nothing is shown.
The grid puts layer 0 at the bottom and segments left to right, so a diagonal step is
an anti-diagonal (design §3). All figures share one colour-blind-safe palette (Okabe-Ito,
`PALETTE`), and colour is never the only cue: cells carry a glyph (✓ done, ▶ running),
lines a marker symbol or a dash. Animations are plotly frames with Play/Pause and a step
slider: they keep working in a static HTML export. Each frame carries only the small
per-step arrays (state codes and labels), so a 32 x 128 diagonal animation (159 frames)
builds in well under a second.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from diaglab.bench import ALL_MODES, by_point, speedups
from diaglab.schedule import Schedule, back_to_back, diagonal, ring, sequential, stats, validate

# Okabe & Ito's colours stay distinct under the common colour-vision deficiencies; grey (not
# theirs) is the background state of a waiting cell. Every colour below is picked from here.
PALETTE = {"black": "#000000", "orange": "#E69F00", "sky": "#56B4E9", "green": "#009E73", "yellow": "#F0E442",
           "blue": "#0072B2", "vermillion": "#D55E00", "purple": "#CC79A7", "grey": "#DDDDDD"}
WAITING, RUNNING, DONE = 0, 1, 2
STATE_NAMES = ("waiting", "running", "done")
STATE_COLOURS = (PALETTE["grey"], PALETTE["orange"], PALETTE["blue"])
STATE_GLYPHS = np.array(["", "▶", "✓"], dtype=object)
REQUEST_COLOURS = tuple(PALETTE[c] for c in ("orange", "sky", "green", "yellow", "blue", "vermillion", "purple"))
MODE_STYLES = {"full": ("black", "square"), "sequential": ("orange", "circle"),   # bench mode -> colour, marker
               "sequential_grouped": ("sky", "diamond"), "diagonal": ("blue", "triangle-up"), "ideal": ("green", "x"),
               "diagonal_compiled": ("vermillion", "star"), "schedule": ("purple", "cross")}
SERIES_STYLES = (("blue", "circle"), ("orange", "square"), ("green", "diamond"),   # any other categories
                 ("vermillion", "triangle-up"), ("purple", "x"), ("sky", "cross"))
DASHES = ("solid", "dash", "dot", "dashdot")   # the second category of a line: dtype, memory zeroed
GROUP_SCALE = [[0.0, PALETTE["yellow"]], [0.5, PALETTE["green"]], [1.0, PALETTE["blue"]]]  # G: light = small
ORDERS: dict[str, Callable[[int, int], Schedule]] = {"diagonal": diagonal, "sequential": sequential}
# A cell label ("▶12") needs about 28 px: past 24 columns a notebook-wide figure leaves slivers,
# and past 600 cells the rows get too short as well, so labels go (the hover still names each cell).
MAX_LABELLED_COLUMNS, MAX_LABELLED_CELLS = 24, 600
_TEMPLATE = "plotly_white"


def _style(mode: str, dash: str = "solid") -> dict:
    """Scatter line and marker of a mode (MODE_STYLES): its colour, its marker symbol, and a dash."""
    colour, symbol = MODE_STYLES[mode]
    return {"line": dict(color=PALETTE[colour], dash=dash), "marker": dict(symbol=symbol, size=8)}


# --- per-step arrays ------------------------------------------------------------------


def cell_steps(L: int, S: int, steps: Schedule) -> np.ndarray:
    """(L, S) array: the step in which each cell runs (checks the schedule first)."""
    validate(steps, L, S)
    step_of = np.empty((L, S), dtype=np.int32)
    for t, step in enumerate(steps):
        for l, s in step:
            step_of[l, s] = t
    return step_of


def _states(step_of: np.ndarray, t: int | None) -> np.ndarray:
    """(L, S) state codes at step t; t=None is before the first step."""
    if t is None:
        return np.zeros(step_of.shape, dtype=np.int8)
    return np.where(step_of < t, DONE, np.where(step_of == t, RUNNING, WAITING)).astype(np.int8)


def _labelled(rows: int, columns: int) -> bool:
    return columns <= MAX_LABELLED_COLUMNS and rows * columns <= MAX_LABELLED_CELLS


def cell_arrays(step_of: np.ndarray, t: int | None) -> dict:
    """The grid trace's attributes that change from step to step: z (state codes) and,
    when the grid is small enough to label, text (glyph + step number)."""
    z = _states(step_of, t)
    arrays = {"z": z}
    if _labelled(*step_of.shape):
        arrays["text"] = STATE_GLYPHS[z] + step_of.astype(str).astype(object)
    return arrays


def _grid_trace(step_of: np.ndarray, t: int | None, name: str = "") -> go.Heatmap:
    L, S = step_of.shape
    return go.Heatmap(
        x=np.arange(S),
        y=np.arange(L),
        customdata=step_of,
        coloraxis="coloraxis",
        xgap=1,
        ygap=1,
        name=name,
        texttemplate="%{text}" if _labelled(L, S) else None,
        hovertemplate="layer %{y}, segment %{x}<br>runs in step %{customdata}"
        "<br>reads/writes memory of layer %{y}<extra>" + name + "</extra>",
        **cell_arrays(step_of, t),
    )


def _state_coloraxis() -> dict:
    scale = []
    for code, colour in enumerate(STATE_COLOURS):
        scale += [[code / 3, colour], [(code + 1) / 3, colour]]
    colorbar = dict(tickvals=[0, 1, 2], ticktext=list(STATE_NAMES), title="cell", len=0.6)
    return dict(colorscale=scale, cmin=-0.5, cmax=2.5, colorbar=colorbar)


def _style_grid_axes(fig: go.Figure, L: int, S: int, row: int | None = None, col: int | None = None) -> None:
    """Square cells, integer ticks, layer 0 at the bottom."""
    fig.update_xaxes(title="segment s", range=[-0.5, S - 0.5], dtick=max(1, S // 16), showgrid=False,
                     zeroline=False, row=row, col=col)
    fig.update_yaxes(title="layer l", range=[-0.5, L - 0.5], dtick=max(1, L // 8), showgrid=False,
                     zeroline=False, row=row, col=col)


def frame_steps(n_steps: int, max_frames: int) -> list[int]:
    """The steps an animation shows: all of them, or every k-th (and the last) when there
    are more than max_frames — a 32 x 128 sequential order has 4096 steps, which no one
    watches frame by frame and which would take seconds to build and ~20 MB of HTML."""
    if max_frames < 2:
        raise ValueError(f"max_frames must be >= 2, got {max_frames}")
    k = -(-n_steps // max_frames)
    shown = list(range(0, n_steps, k))
    return shown if shown[-1] == n_steps - 1 else shown + [n_steps - 1]


def _add_player(fig: go.Figure, frames: int | list[int], duration_ms: int) -> None:
    """Play/Pause buttons and a step slider driving frames named by their step numbers
    (frames: the shown steps, or a count n for steps 0..n-1)."""
    shown = list(range(frames)) if isinstance(frames, int) else frames
    n_frames = len(shown)
    still = {"frame": {"duration": 0, "redraw": True}, "mode": "immediate", "transition": {"duration": 0}}
    play = {"frame": {"duration": duration_ms, "redraw": True}, "fromcurrent": True, "transition": {"duration": 0}}
    fig.update_layout(
        updatemenus=[dict(
            type="buttons", direction="left", x=0, y=-0.12, xanchor="left", yanchor="top", showactive=False,
            buttons=[dict(label="▶ Play", method="animate", args=[None, play]),
                     dict(label="❚❚ Pause", method="animate", args=[[None], still])],
        )],
        sliders=[dict(
            active=0, x=0.22, len=0.78, y=-0.08, yanchor="top",
            currentvalue={"prefix": "step ", "xanchor": "right", "font": {"size": 14, "color": "#333"}},
            # past ~25 steps the tick labels overlap: hide them, the current value still shows
            font={"color": "#333" if n_frames <= 25 else "rgba(0,0,0,0)"},
            steps=[dict(label=str(t), method="animate", args=[[str(t)], still]) for t in shown],
        )],
    )


# --- the grid -------------------------------------------------------------------------


def _dependency_arrows(L: int, S: int, cell: tuple[int, int]) -> list[dict]:
    """Arrows into `cell` from (l-1, s) (output below) and (l, s-1) (memory on the left)."""
    l, s = cell
    if not (0 <= l < L and 0 <= s < S):
        raise ValueError(f"selected cell {cell} is outside the {L} x {S} grid")
    arrows = []
    for (dl, ds), meaning in (((l - 1, s), f"output of layer {l - 1} for segment {s}"),
                              ((l, s - 1), f"memory of layer {l} after segment {s - 1}")):
        if dl < 0 or ds < 0:
            continue
        arrows.append(dict(
            # tail 0.2 cell past the dependency's centre, head 0.35 cell short of the target's
            ax=ds + 0.2 * (s - ds), ay=dl + 0.2 * (l - dl), x=s - 0.35 * (s - ds), y=l - 0.35 * (l - dl),
            xref="x", yref="y", axref="x", ayref="y", text="", hovertext=meaning,
            showarrow=True, arrowhead=2, arrowsize=1.2, arrowwidth=2.5, arrowcolor="black",
        ))
    return arrows


def grid_title(L: int, S: int, n_steps: int, step: int | None) -> str:
    return f"{L} layers × {S} segments, {n_steps} steps" + ("" if step is None else f" — step {step}")


def grid_figure(L: int, S: int, steps: Schedule, step: int | None = None,
                selected: tuple[int, int] | None = None) -> go.Figure:
    """The L x S grid at `step` (None: before the first step): each cell coloured
    waiting/running/done and labelled with the step it runs in. `selected=(l, s)`
    outlines that cell and draws its two dependency arrows."""
    step_of = cell_steps(L, S, steps)
    if step is not None and not 0 <= step <= len(steps):
        raise ValueError(f"step must be in [0, {len(steps)}], got {step}")
    fig = go.Figure(_grid_trace(step_of, step))
    fig.update_layout(template=_TEMPLATE, title=grid_title(L, S, len(steps), step), coloraxis=_state_coloraxis(),
                      height=min(900, 160 + 40 * L), margin=dict(l=60, r=20, t=60, b=50))
    _style_grid_axes(fig, L, S)
    if selected is not None:
        l, s = selected
        fig.update_layout(annotations=_dependency_arrows(L, S, selected))
        fig.add_shape(type="rect", x0=s - 0.5, x1=s + 0.5, y0=l - 0.5, y1=l + 0.5, line=dict(color="black", width=3))
    return fig


def schedule_animation(L: int, S: int, order: str = "diagonal", duration_ms: int = 400,
                       max_frames: int = 300) -> go.Figure:
    """One frame per step of the sequential (S * L steps) or diagonal (L + S - 1) order
    (every k-th step when there are more than max_frames; the title says so)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {sorted(ORDERS)}, got {order!r}")
    steps = ORDERS[order](L, S)
    step_of = cell_steps(L, S, steps)
    shown = frame_steps(len(steps), max_frames)
    fig = grid_figure(L, S, steps, step=0)
    fig.frames = [go.Frame(name=str(t), traces=[0], data=[go.Heatmap(**cell_arrays(step_of, t))])
                  for t in shown]
    count = f"S·L = {S * L}" if order == "sequential" else f"L + S − 1 = {L + S - 1}"
    other = f"diagonal needs {L + S - 1}" if order == "sequential" else f"sequential needs {S * L}"
    stride = "" if len(shown) == len(steps) else f"; one frame every {shown[1]} steps"
    fig.update_layout(title=f"{order.capitalize()} order, L={L}, S={S}: {count} steps ({other}{stride})",
                      height=min(900, 220 + 40 * L), margin=dict(b=110))
    _add_player(fig, shown, duration_ms)
    return fig


def compare_animation(L: int, S: int, duration_ms: int = 300, max_frames: int = 300) -> go.Figure:
    """Sequential (top) and diagonal (bottom) advancing together, one frame per
    sequential step (every k-th beyond max_frames); the diagonal grid finishes after
    L + S - 1 steps and stays done."""
    n_seq, n_diag = S * L, L + S - 1
    shown = frame_steps(n_seq, max_frames)
    orders = (("sequential", sequential(L, S)), ("diagonal", diagonal(L, S)))
    step_ofs = [cell_steps(L, S, steps) for _, steps in orders]
    fig = make_subplots(rows=2, cols=1, vertical_spacing=0.18, subplot_titles=(
        f"sequential: S·L = {n_seq} steps", f"diagonal: L + S − 1 = {n_diag} steps"))
    for row, ((name, _), step_of) in enumerate(zip(orders, step_ofs), start=1):
        fig.add_trace(_grid_trace(step_of, 0, name=name), row=row, col=1)
        _style_grid_axes(fig, L, S, row=row, col=1)

    def caption(t: int) -> str:
        diag = "finished ✓" if t >= n_diag else f"{int((step_ofs[1] <= t).sum())}/{L * S} cells"
        return f"step {t}: sequential {t + 1}/{L * S} cells, diagonal {diag}"

    fig.frames = [go.Frame(name=str(t), traces=[0, 1], layout={"title": {"text": caption(t)}},
                           data=[go.Heatmap(**cell_arrays(step_of, t)) for step_of in step_ofs])
                  for t in shown]
    fig.update_layout(template=_TEMPLATE, title=caption(0), coloraxis=_state_coloraxis(),
                      height=min(1200, 300 + 80 * L), margin=dict(l=60, r=20, t=80, b=110))
    _add_player(fig, shown, duration_ms)
    return fig


# --- several requests through the ring ------------------------------------------------


def _ring_arrays(L: int, steps: list, upto: int | None) -> dict:
    """(L, n_steps) request index (NaN where the slot idles or the step is after `upto`);
    a request's first segment is marked ⟲: the layer's memory starts empty there."""
    z = np.full((L, len(steps)), np.nan)
    text = np.full((L, len(steps)), "", dtype=object)
    for t, step in enumerate(steps[: None if upto is None else upto + 1]):
        for l, r, s in step:
            z[l, t], text[l, t] = r, f"r{r}<br>s{s}" + ("⟲" if s == 0 else "")
    return {"z": z, "text": text}


def _ring_shapes(L: int, step: int | None) -> list[dict]:
    if step is None:
        return []
    return [dict(type="rect", x0=step - 0.5, x1=step + 0.5, y0=-0.5, y1=L - 0.5, line=dict(color="black", width=3))]


def _ring_steps(L: int, lengths: Sequence[int] | None, steps: list | None) -> tuple[list, list[int]]:
    """The steps to draw (schedule.ring of lengths, or a run's own history) and the
    segments per request."""
    if steps is None:
        if lengths is None:
            raise ValueError("give lengths (segments per request) or steps (a RingExecutor's history)")
        return ring(L, list(lengths)), list(lengths)
    per_request: dict[int, int] = {}
    for step in steps:
        for _, r, s in step:
            per_request[r] = max(per_request.get(r, 0), s + 1)
    return steps, [per_request[r] for r in sorted(per_request)]


def ring_figure(L: int, lengths: Sequence[int] | None = None, step: int | None = None,
                steps: list | None = None) -> go.Figure:
    """Slots (= layers) x time of the multi-request ring, each cell coloured by request
    and labelled r (request) / s (segment), ⟲ where a request's first segment resets the
    layer's memory. `steps`: a run's own history (RingExecutor.history: requests may join
    late, slots may idle) instead of schedule.ring(L, lengths). `step` shows only the cells
    run up to then. The title compares with each request's diagonal back to back."""
    steps, lengths = _ring_steps(L, lengths, steps)
    if step is not None and not 0 <= step < len(steps):
        raise ValueError(f"step must be in [0, {len(steps) - 1}], got {step}")
    R = len(lengths)
    scale = []
    for r in range(R):
        colour = REQUEST_COLOURS[r % len(REQUEST_COLOURS)]
        scale += [[r / R, colour], [(r + 1) / R, colour]]
    fig = go.Figure(go.Heatmap(
        x=np.arange(len(steps)), y=np.arange(L), coloraxis="coloraxis", xgap=2, ygap=2, hoverongaps=False,
        texttemplate="%{text}" if _labelled(L, len(steps)) else None,
        hovertemplate="slot = layer %{y}, step %{x}<br>%{text}<extra></extra>", **_ring_arrays(L, steps, step),
    ))
    ringed, baseline = stats(steps, L), stats(back_to_back(L, list(lengths)), L)
    fig.update_layout(
        template=_TEMPLATE, height=min(900, 200 + 50 * L), shapes=_ring_shapes(L, step),
        title=f"Ring of {L} slots, {R} requests: {ringed.n_steps} steps, {ringed.utilisation:.0%} busy "
              f"(back-to-back diagonal: {baseline.n_steps} steps, {baseline.utilisation:.0%})",
        coloraxis=dict(colorscale=scale, cmin=-0.5, cmax=R - 0.5, colorbar=dict(
            title="request", tickvals=list(range(R)), ticktext=[f"r{r}" for r in range(R)], len=0.6)),
    )
    fig.update_xaxes(title="step", range=[-0.5, len(steps) - 0.5], showgrid=False, zeroline=False)
    fig.update_yaxes(title="slot = layer", range=[-0.5, L - 0.5], dtick=1, showgrid=False, zeroline=False)
    return fig


def ring_animation(L: int, lengths: Sequence[int] | None = None, duration_ms: int = 400,
                   steps: list | None = None) -> go.Figure:
    """ring_figure with one frame per step, filling the time axis left to right."""
    steps, lengths = _ring_steps(L, lengths, steps)
    fig = ring_figure(L, lengths, step=0, steps=steps)
    fig.frames = [go.Frame(name=str(t), traces=[0], layout={"shapes": _ring_shapes(L, t)},
                           data=[go.Heatmap(**_ring_arrays(L, steps, t))]) for t in range(len(steps))]
    fig.update_layout(margin=dict(b=110))
    _add_player(fig, len(steps), duration_ms)
    return fig


# --- what the schedules cost ----------------------------------------------------------


def group_size_figure(steps: list, L: int) -> go.Figure:
    """Bar per step: how many cells (G) run together; the dashed line is a full group."""
    st = stats(steps, L)
    fig = go.Figure(go.Bar(x=np.arange(st.n_steps), y=st.group_sizes, marker_color=STATE_COLOURS[DONE],
                           hovertemplate="step %{x}: G = %{y}<extra></extra>"))
    fig.add_hline(y=L, line_dash="dash", annotation_text=f"L = {L} (full group)")
    fig.update_layout(template=_TEMPLATE, title=f"Group size per step: {st.n_steps} steps, {st.utilisation:.0%} busy",
                      xaxis_title="step", yaxis_title="group size G", yaxis_range=[0, L * 1.15])
    return fig


def utilisation_figure(L: int, S_values: Sequence[int]) -> go.Figure:
    """Share of the L layer slots busy per step, diagonal vs sequential, as S grows."""
    diag = [stats(diagonal(L, S), L).utilisation for S in S_values]
    fig = go.Figure([
        go.Scatter(x=list(S_values), y=diag, mode="lines+markers", name="diagonal: S / (L + S − 1)",
                   **_style("diagonal")),
        go.Scatter(x=list(S_values), y=[1 / L] * len(S_values), mode="lines+markers", name="sequential: 1 / L",
                   **_style("sequential", "dash")),
    ])
    fig.update_layout(template=_TEMPLATE, title=f"Utilisation of {L} layer slots", xaxis_title="segments S",
                      yaxis_title="busy share of slots", yaxis_range=[0, 1.05], yaxis_tickformat=".0%")
    return fig


def speedup_figure(L: int, S_values: Sequence[int], cost: Callable[[int], float] | None = None) -> go.Figure:
    """Left: step counts S·L vs L + S − 1. Right: ideal speed-up of the diagonal order
    for a grouped-call cost(G) (default 1: overhead-bound), with its S → ∞ limit."""
    cost_fn = cost or (lambda g: 1.0)
    S_list = list(S_values)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("grouped calls", "ideal speed-up over sequential"))
    fig.add_trace(go.Scatter(x=S_list, y=[S * L for S in S_list], name="sequential S·L", mode="lines+markers",
                             **_style("sequential")), row=1, col=1)
    fig.add_trace(go.Scatter(x=S_list, y=[L + S - 1 for S in S_list], name="diagonal L + S − 1", mode="lines+markers",
                             **_style("diagonal")), row=1, col=1)
    fig.add_trace(go.Scatter(x=S_list, y=[stats(diagonal(L, S), L, cost_fn).ideal_speedup for S in S_list],
                             name="diagonal speed-up", mode="lines+markers", **_style("ideal")), row=1, col=2)
    limit = L * cost_fn(1) / cost_fn(L)
    fig.add_hline(y=limit, line_dash="dot", row=1, col=2, annotation_text=f"S → ∞: {limit:.3g}×")
    fig.update_xaxes(title="segments S")
    fig.update_yaxes(title="steps", type="log", dtick=1, row=1, col=1)
    fig.update_yaxes(title="× faster", rangemode="tozero", row=1, col=2)
    fig.update_layout(template=_TEMPLATE, title=f"Sequential vs diagonal, L = {L}")
    return fig


# --- a measured run, step by step -------------------------------------------------------

_RECORD_FIELDS = ("step", "group_size", "layers", "segments", "ms", "tokens_done")


def _record_dicts(records: Sequence) -> list[dict]:
    """profiling.StepRecords, or dicts with their fields (as scripts/gpu_checks.py saves them)."""
    dicts = [r if isinstance(r, dict) else dataclasses.asdict(r) for r in records]
    for r in dicts:
        missing = [k for k in _RECORD_FIELDS if k not in r]
        if missing:
            raise ValueError(f"a step record lacks {missing}: pass profiling.StepRecords (profiling.profile_steps "
                             f"returns them) or dicts with the fields {list(_RECORD_FIELDS)}")
    return dicts


def step_arrays(records: Sequence) -> dict:
    """What the step figure draws, as plain lists: per-step bars and the cumulative rate."""
    elapsed, done, rate = 0.0, 0, []
    dicts = _record_dicts(records)
    for r in dicts:
        elapsed, done = elapsed + r["ms"] / 1e3, done + r["tokens_done"]
        rate.append(done / elapsed if elapsed > 0 else 0.0)
    return {
        "step": [r["step"] for r in dicts],
        "ms": [r["ms"] for r in dicts],
        "group": [r["group_size"] for r in dicts],
        "hover": [[f"{r['layers'][0]}-{r['layers'][1]}", ", ".join(map(str, r["segments"])), r["group_size"]]
                  for r in dicts],
        "rate": rate,
        "elapsed": elapsed,
        "done": done,
    }


def progress_text(records: Sequence, n_steps: int | None = None, total_tokens: int | None = None) -> str:
    """'step 12/135 · 2,048/4,096 tokens · 9,871 tokens/s · 207 ms' for the figure title."""
    a = step_arrays(records)
    steps = f"step {len(a['step'])}" + (f"/{n_steps}" if n_steps else "")
    tokens = f"{a['done']:,}" + (f"/{total_tokens:,}" if total_tokens else "") + " tokens"
    rate = a["rate"][-1] if a["rate"] else 0.0
    return f"{steps} · {tokens} · {rate:,.0f} tokens/s · {a['elapsed'] * 1e3:,.0f} ms"


def step_figure(records: Sequence, max_group: int | None = None, n_steps: int | None = None,
                total_tokens: int | None = None) -> go.Figure:
    """Per-step latency bars coloured and labelled by group size G, with the cumulative
    tokens/s (tokens whose segment has left the last layer, over the time so far) on a
    second axis. records: profiling.StepRecords or dicts with their fields.
    max_group / n_steps / total_tokens fix the colour range and the progress title before
    all records exist (a live run); by default they come from the records."""
    a = step_arrays(records)
    cmax = max_group or max(a["group"], default=1)
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Bar(x=a["step"], y=a["ms"], name="step latency", customdata=a["hover"], text=a["group"],
                         textposition="inside", marker=dict(color=a["group"], coloraxis="coloraxis"),
                         hovertemplate="step %{x}: %{y:.2f} ms<br>layers %{customdata[0]} · G = "
                                       "%{customdata[2]}<br>segments %{customdata[1]}<extra></extra>"),
                  secondary_y=False)
    fig.add_trace(go.Scatter(x=a["step"], y=a["rate"], name="tokens/s so far", mode="lines",
                             line=dict(color=PALETTE["vermillion"], width=2),
                             hovertemplate="after step %{x}: %{y:,.0f} tokens/s<extra></extra>"),
                  secondary_y=True)
    fig.update_layout(template=_TEMPLATE, title=progress_text(records, n_steps, total_tokens),
                      coloraxis=dict(colorscale=GROUP_SCALE, cmin=1, cmax=max(cmax, 2),
                                     colorbar=dict(title="G", x=1.12)),
                      # a bar too thin for its G label drops the label instead of shrinking it away
                      uniformtext=dict(minsize=9, mode="hide"),
                      legend=dict(orientation="h", y=-0.2), bargap=0.1)
    fig.update_xaxes(title_text="step t")
    fig.update_yaxes(title_text="ms per step", rangemode="tozero", secondary_y=False)
    fig.update_yaxes(title_text="tokens/s (cumulative)", rangemode="tozero", showgrid=False, secondary_y=True)
    return fig


# --- the benchmark ----------------------------------------------------------------------


def _tokens_label(N: int) -> str:
    return f"{N // 1024}K" if N >= 1024 and N % 1024 == 0 else f"{N:,}"


def _log_ticks(values: Sequence[float]) -> dict:
    """Ticks for a log axis over values that plotly would otherwise label with bare minor
    digits ("2", "5") between decades: one tick per decade over two decades or more, else
    one per power of two, each labelled in full."""
    lo, hi = min(values), max(values)
    if hi / lo >= 100:
        return dict(dtick=1, tickformat="~g", minor=dict(ticks="outside", dtick="D1"))
    return dict(dtick=math.log10(2), tickformat=".2~g")


def _token_ticks(tokens: Sequence[int], most: int = 10) -> dict:
    """The measured token counts themselves as ticks (every k-th past `most`), labelled 4K, 128K."""
    shown = sorted(set(tokens))
    shown = shown[::math.ceil(len(shown) / most)]
    return dict(tickvals=shown, ticktext=[_tokens_label(N) for N in shown])


def bench_figure(rows: list[dict]) -> go.Figure:
    """Latency vs tokens per mode (log-log; one line per mode and dtype, min-max bars) and
    diagonal's speed-up over sequential, sequential_grouped and full attention. rows: as
    bench.run_bench returns them, or as bench.read_rows reads them back."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1,
                        subplot_titles=("latency", "diagonal speed-up (x, > 1 = faster)"))
    dashes: dict[str, str] = {}
    for r in rows:
        dashes.setdefault(r["dtype"], DASHES[len(dashes) % len(DASHES)])
    for dtype, dash in dashes.items():
        for mode in ALL_MODES:
            pts = sorted((r["tokens"], r["seconds"], r["seconds_min"], r["seconds_max"])
                         for r in rows if r["mode"] == mode and r["dtype"] == dtype)
            if not pts:
                continue
            x, y, lo, hi = zip(*pts)
            fig.add_trace(go.Scatter(x=x, y=y, name=f"{mode} ({dtype})", mode="lines+markers", legendgroup=mode,
                                     error_y=dict(type="data", symmetric=False,
                                                  array=[h - m for h, m in zip(hi, y)],
                                                  arrayminus=[m - l for m, l in zip(y, lo)]),
                                     hovertemplate="%{x} tokens: %{y:.4f} s<extra>" + mode + "</extra>",
                                     **_style(mode, dash)),
                          row=1, col=1)
        points = [(key, speedups(by_mode)) for key, by_mode in by_point(rows).items() if key[0] == dtype]
        for base in ("sequential", "sequential_grouped", "full"):
            pts = sorted((key[4], ratios[f"{base}/diagonal"]) for key, ratios in points
                         if f"{base}/diagonal" in ratios)
            if pts:
                x, y = zip(*pts)
                # the mode's own legend entry stands for its speed-up line too (same colour,
                # marker and dash; one click hides both)
                fig.add_trace(go.Scatter(x=x, y=y, name=f"vs {base} ({dtype})", mode="lines+markers",
                                         legendgroup=base, showlegend=False, **_style(base, dash),
                                         hovertemplate="%{x} tokens: %{y:.2f}x<extra>vs " + base + "</extra>"),
                              row=1, col=2)
    fig.add_hline(y=1, line=dict(color=PALETTE["black"], width=1, dash="dot"), row=1, col=2)
    tokens = [r["tokens"] for r in rows]
    fig.update_xaxes(type="log", title_text="tokens N", **_token_ticks(tokens))
    fig.update_yaxes(type="log", title_text="seconds (median, min-max bars)",
                     **_log_ticks([r["seconds"] for r in rows]), row=1, col=1)
    fig.update_yaxes(title_text="speed-up", row=1, col=2)
    # below the plots, never over them: a column per mode, a line per dtype in it; room is kept
    # for the columns to wrap once on a narrow page
    legend_lines = 2 * len(dashes)
    fig.update_layout(template=_TEMPLATE, title="ARMT execution orders vs full attention",
                      height=420 + 22 * legend_lines, margin=dict(b=90 + 22 * legend_lines),
                      legend=dict(orientation="h", x=0, xanchor="left", y=-0.18, yanchor="top"))
    return fig


# --- a trained model's accuracy ---------------------------------------------------------

TASK_NAMES = {"needle": "needle in a haystack", "recall": "associative recall"}


def accuracy_figure(result: dict, title: str = "Accuracy by distance: memory on vs memory zeroed") -> go.Figure:
    """Accuracy against distance in segments of a train.evaluate() result: one colour and
    marker per task, solid with memory, dotted with the memory zeroed."""
    rows = result["by_distance"]
    d = [r["distance"] for r in rows]
    fig = go.Figure()
    for i, task in enumerate(result["tasks"]):
        colour, symbol = SERIES_STYLES[i % len(SERIES_STYLES)]
        name = TASK_NAMES.get(task, task)
        for key, memory, dash in ((task, "memory on", "solid"), (task + "_zeroed", "memory zeroed", "dot")):
            fig.add_scatter(x=d, y=[r[key] for r in rows], mode="lines+markers", name=f"{name}: {memory}",
                            line=dict(color=PALETTE[colour], dash=dash), marker=dict(symbol=symbol, size=8))
    fig.add_hline(y=result["chance"], line_dash="dash", line_color=PALETTE["black"],
                  annotation_text=f"chance 1/{round(1 / result['chance'])}")
    fig.update_layout(title=title, xaxis_title="distance: segments between the pair and its query",
                      yaxis_title=f"accuracy ({result['samples_per_distance']} held-out samples per point)",
                      yaxis_range=[0, 1.05], xaxis_dtick=1, template=_TEMPLATE)
    return fig


# --- many requests: the measured queue ----------------------------------------------------
_QUEUE_STYLE = {"ring": ("blue", "circle"), "back_to_back": ("orange", "square"),
                "batched": ("sky", "diamond"), "ideal": ("green", "x")}


def queue_figure(rows: list[dict]) -> go.Figure:
    """bench.run_queue_bench rows: total time per mode (bars), and each request's latency —
    the time until its last logits — per mode (markers), requests in queue order."""
    fig = make_subplots(rows=1, cols=2, column_widths=[0.35, 0.65],
                        subplot_titles=("total time (ms)", "latency per request (ms)"))
    for r in rows:
        colour, symbol = _QUEUE_STYLE.get(r["mode"], ("black", "circle"))
        fig.add_trace(go.Bar(x=[r["mode"]], y=[r["seconds"] * 1e3], marker_color=PALETTE[colour], showlegend=False,
                             text=[f"{r['seconds'] * 1e3:.0f}"], textposition="outside",
                             hovertemplate=f"{r['mode']}: %{{y:.1f}} ms, {r['tokens_per_s']:.0f} tokens/s"
                                           "<extra></extra>"), row=1, col=1)
        fig.add_trace(go.Scatter(x=list(range(len(r["latency_ms"]))), y=r["latency_ms"], mode="lines+markers",
                                 name=r["mode"], line=dict(color=PALETTE[colour]),
                                 marker=dict(symbol=symbol, size=9),
                                 customdata=r["request_segments"],
                                 hovertemplate="request %{x} (%{customdata} segments): %{y:.1f} ms<extra>"
                                               + r["mode"] + "</extra>"), row=1, col=2)
    r0 = rows[0]
    fig.update_xaxes(title="request (queue order)", dtick=1, row=1, col=2)
    fig.update_layout(template=_TEMPLATE, height=420, margin=dict(b=90),
                      legend=dict(orientation="h", yanchor="top", y=-0.18, xanchor="center", x=0.65),
                      title=f"{r0['requests']} requests, {r0['segments']} segments, {r0['layers']} layers "
                            f"({r0['dtype']}, {r0['device']}, {r0['threads']} threads)")
    return fig


# --- against the machine's limit ------------------------------------------------------------
def roofline_figure(rows: list[dict], x: str = "tokens") -> go.Figure:
    """Achieved GFLOP/s of each mode (bench rows with `gflops`) against x ('tokens', 'hidden'
    or 'batch'), with the torch.mm peak measured in the same run as a dashed line per dtype."""
    if x not in ("tokens", "hidden", "batch"):
        raise ValueError(f"x must be 'tokens', 'hidden' or 'batch', got {x!r}")
    rows = [r for r in rows if "gflops" in r]
    if not rows:
        raise ValueError("no row carries gflops: measure with diaglab.bench (it adds them) first")
    fig = go.Figure()
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    other = "hidden" if x == "batch" else "batch"          # a line per value of the other sweep, if it varies
    others = sorted({r.get(other) for r in rows}, key=lambda v: (v is None, v))
    for i, dtype in enumerate(dtypes):
        dash = DASHES[i % len(DASHES)]
        for mode in ALL_MODES:
            for j, o in enumerate(others):
                pts = sorted((r[x], r["gflops"], r["pct_of_peak"]) for r in rows
                             if r["dtype"] == dtype and r["mode"] == mode and r.get(other) == o)
                if not pts:
                    continue
                xs, ys, pct = zip(*pts)
                label = f"{mode} ({dtype}" + (f", {'B' if other == 'batch' else 'd'}={o})" if len(others) > 1 else ")")
                style = _style(mode, dash)
                style["marker"]["size"] = 6 + 3 * j
                fig.add_trace(go.Scatter(x=xs, y=ys, name=label, mode="lines+markers", customdata=pct,
                                         hovertemplate=f"{x} %{{x}}: %{{y:.1f}} GFLOP/s (%{{customdata:.0f}} % of "
                                                       f"peak)<extra>{label}</extra>", **style))
        peak = max(r["peak_gflops"] for r in rows if r["dtype"] == dtype)
        fig.add_hline(y=peak, line=dict(color=PALETTE["black"], dash="dash", width=1),
                      annotation_text=f"torch.mm peak {peak:.0f} GFLOP/s ({dtype})", annotation_position="top left")
    m = rows[0]["machine"]
    fig.update_xaxes(title={"tokens": "tokens N", "hidden": "model width d", "batch": "batch B"}[x], type="log")
    fig.update_yaxes(title="achieved GFLOP/s (matmul FLOPs / median time)", type="log")
    fig.update_layout(template=_TEMPLATE, height=480, margin=dict(b=110),
                      legend=dict(orientation="h", yanchor="top", y=-0.2, xanchor="center", x=0.5),
                      title=f"Against the machine's own limit: {m['cpu']} ({m['cpu_capability']}, {m['threads']} "
                            "threads)")
    return fig


# --- beyond one device: the grid split over ranks --------------------------------------------
RANK_COLOURS = tuple(PALETTE[c] for c in ("orange", "sky", "green", "yellow", "blue", "vermillion", "purple", "grey"))


def pipeline_figure(L: int, S: int, world_size: int = 2, split: Sequence[int] | None = None):
    """Two panels: the L x S grid coloured by the rank that owns each layer, each cell labelled
    with the step it runs in; below, each rank's busy layers per step (blank = idle), where the
    pipeline's fill and drain show as the idle corners."""
    from .distributed import rank_group_sizes, split_layers
    spans = split_layers(L, world_size, split)
    if world_size > len(RANK_COLOURS):
        raise ValueError(f"pipeline_figure draws at most {len(RANK_COLOURS)} ranks, got {world_size}")
    owner = [r for r, (a, b) in enumerate(spans) for _ in range(a, b)]
    P, steps = world_size, L + S - 1
    scale = [[v, RANK_COLOURS[int(min(v * P, P - 1))]] for r in range(P) for v in (r / P, (r + 1) / P)]
    fig = make_subplots(rows=2, cols=1, row_heights=[0.65, 0.35], vertical_spacing=0.14,
                        subplot_titles=(f"{L} layers × {S} segments on {P} ranks: cell = step it runs in",
                                        "busy layers per rank and step (blank: idle — fill and drain)"))
    fig.add_trace(go.Heatmap(
        z=[[owner[l]] * S for l in range(L)], x=list(range(S)), y=list(range(L)), colorscale=scale, zmin=0,
        zmax=P, showscale=False, xgap=1, ygap=1, text=[[str(l + s) for s in range(S)] for l in range(L)],
        texttemplate="%{text}" if _labelled(L, S) else None,
        hovertemplate="layer %{y}, segment %{x}: rank %{z}, step %{text}<extra></extra>"), row=1, col=1)
    sizes = rank_group_sizes(L, S, spans)
    fig.add_trace(go.Heatmap(
        z=[[r if g else None for g in row] for r, row in enumerate(sizes)], x=list(range(steps)),
        y=[f"rank {r}" for r in range(P)], colorscale=scale, zmin=0, zmax=P, showscale=False, xgap=1, ygap=1,
        text=[[str(g) if g else "" for g in row] for row in sizes], texttemplate="%{text}",
        hovertemplate="%{y}, step %{x}: %{text} layers busy<extra></extra>"), row=2, col=1)
    for r, (a, b) in enumerate(spans):   # rank labels on the grid, so colour is not the only cue
        fig.add_annotation(x=1, xref="x domain", y=(a + b - 1) / 2, yref="y", text=f"rank {r}: layers {a}–{b - 1}",
                           showarrow=False, xanchor="left", xshift=6)
        if r:
            fig.add_hline(y=a - 0.5, line=dict(color="black", width=3), row=1, col=1)
    fig.update_xaxes(title_text="segment s", range=[-0.5, S - 0.5], row=1, col=1)
    fig.update_yaxes(title_text="layer l", dtick=1 if L <= 16 else None, row=1, col=1)
    fig.update_xaxes(title_text="step t", range=[-0.5, steps - 0.5], row=2, col=1)
    fig.update_layout(template=_TEMPLATE, height=260 + 30 * L + 30 * P, margin=dict(l=60, r=170, t=60, b=40))
    return fig


# --- BABILong-style QA: accuracy and time by context length ----------------------------------
def accuracy_by_length_figure(result: dict) -> go.Figure:
    """babilong.evaluate() result: accuracy against context length, memory on and zeroed."""
    rows = result["by_length"]
    x = [r["tokens"] for r in rows]
    fig = go.Figure()
    fig.add_scatter(x=x, y=[r["accuracy"] for r in rows], mode="lines+markers", name="memory on",
                    line=dict(color=PALETTE["blue"]), marker_symbol="circle")
    fig.add_scatter(x=x, y=[r["accuracy_zeroed"] for r in rows], mode="lines+markers", name="memory zeroed",
                    line=dict(color=PALETTE["orange"], dash="dot"), marker_symbol="square")
    fig.add_hline(y=result["chance"], line_dash="dash", line_color=PALETTE["black"],
                  annotation_text=f"chance 1/{round(1 / result['chance'])}")
    fig.add_vline(x=result["training_tokens"], line_dash="dot", line_color=PALETTE["black"],
                  annotation_text="training length")
    fig.update_layout(title="BABILong-style QA1: accuracy by context length",
                      xaxis_title="context length, tokens (log scale)", xaxis_type="log", xaxis_tickvals=x,
                      yaxis_title=f"accuracy ({result['samples_per_length']} held-out stories per point)",
                      yaxis_range=[0, 1.05], template=_TEMPLATE)
    return fig


def babilong_timing_figure(result: dict) -> go.Figure:
    """babilong.evaluate() result: CPU seconds of each order at each context length."""
    rows = result["by_length"]
    x = [str(r["tokens"]) for r in rows]
    fig = go.Figure()
    fig.add_bar(x=x, y=[r["sequential_seconds"] for r in rows], name="sequential (L x S layer calls)",
                marker_color=PALETTE["orange"])
    fig.add_bar(x=x, y=[r["diagonal_seconds"] for r in rows], name="diagonal (L + S - 1 grouped calls)",
                marker_color=PALETTE["blue"], marker_pattern_shape="/")
    fig.update_layout(title=f"Evaluation time, {result['samples_per_length']} stories per length, "
                            f"{result['batch_size']} per call "
                            f"(total {result['speedup']:.2f}x faster diagonally)",
                      xaxis_title="context length, tokens", yaxis_title="CPU seconds", barmode="group",
                      template=_TEMPLATE)
    return fig
