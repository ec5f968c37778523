"""The figures and the explorer widget: frames match the schedule cell for cell, the
HTML export keeps the animation, the widget patches its figure in place, the largest
grids stay small, and the figures stay readable (labels only where they fit, legends
outside the plots, log ticks labelled in full)."""


import numpy as np
import plotly.graph_objects as go
import pytest

from diaglab.schedule import diagonal, ring, sequential
from diaglab.viz import (
    DONE,
    PALETTE,
    RUNNING,
    WAITING,
    accuracy_figure,
    bench_figure,
    compare_animation,
    grid_figure,
    group_size_figure,
    ring_animation,
    ring_figure,
    schedule_animation,
    speedup_figure,
    step_figure,
    utilisation_figure,
)
from diaglab.widgets import schedule_explorer

ORDERS = {"diagonal": diagonal, "sequential": sequential}


def cells_in_state(z, state):
    """Set of (layer, segment) whose code in the (L, S) array z equals state."""
    return {(int(l), int(s)) for l, s in zip(*np.nonzero(np.asarray(z) == state))}


def check_states(z, steps, t):
    """Running == step t, done == every earlier step, waiting == every later step."""
    assert cells_in_state(z, RUNNING) == set(steps[t])
    assert cells_in_state(z, DONE) == {cell for step in steps[:t] for cell in step}
    assert cells_in_state(z, WAITING) == {cell for step in steps[t + 1:] for cell in step}


@pytest.mark.parametrize("order", ["diagonal", "sequential"])
@pytest.mark.parametrize("L, S", [(1, 1), (3, 5), (5, 3), (4, 4)])
def test_animation_frames_replay_the_schedule(order, L, S):
    steps = ORDERS[order](L, S)
    fig = schedule_animation(L, S, order)
    assert len(fig.frames) == len(steps)
    assert len(fig.layout.sliders[0].steps) == len(steps)
    assert np.asarray(fig.data[0].z).shape == (L, S)
    for t, frame in enumerate(fig.frames):
        check_states(frame.data[0].z, steps, t)
        labels = np.asarray(frame.data[0].text)
        assert all(labels[l, s].startswith("▶") for l, s in steps[t])
    assert str(len(steps)) in fig.layout.title.text


def test_animation_rejects_unknown_order():
    with pytest.raises(ValueError):
        schedule_animation(2, 2, "zigzag")


def test_html_export_keeps_frames_and_slider():
    fig = schedule_animation(3, 4)
    html = fig.to_html(include_plotlyjs=False)
    assert "Plotly.addFrames" in html and '"sliders"' in html and '"method":"animate"' in html
    frames = html[html.index("Plotly.addFrames"):]
    assert all(f'"name":"{t}"' in frames for t in range(len(fig.frames)))


def test_compare_animation_diagonal_finishes_early_and_stays_done():
    L, S = 3, 4
    fig = compare_animation(L, S)
    assert len(fig.frames) == S * L
    seq, diag = sequential(L, S), diagonal(L, S)
    for t, frame in enumerate(fig.frames):
        z_seq, z_diag = (frame.data[i].z for i in (0, 1))
        check_states(z_seq, seq, t)
        if t < len(diag):
            check_states(z_diag, diag, t)
        else:
            assert cells_in_state(z_diag, DONE) == {(l, s) for l in range(L) for s in range(S)}
    assert "finished" in fig.frames[-1].layout.title.text


def test_grid_hover_names_cell_step_and_memory():
    fig = grid_figure(4, 8, diagonal(4, 8), step=2)
    trace = fig.data[0]
    assert "layer %{y}, segment %{x}" in trace.hovertemplate
    assert "reads/writes memory of layer %{y}" in trace.hovertemplate
    assert np.asarray(trace.customdata)[2, 5] == 7  # cell (2, 5) runs in diagonal step 7
    check_states(trace.z, diagonal(4, 8), 2)


def test_grid_layer_zero_is_at_the_bottom():
    fig = grid_figure(3, 3, diagonal(3, 3))
    assert list(fig.data[0].y) == [0, 1, 2]
    assert fig.layout.yaxis.autorange != "reversed"
    assert fig.layout.yaxis.range[0] < fig.layout.yaxis.range[1]


def test_selected_cell_gets_both_dependency_arrows():
    fig = grid_figure(4, 8, diagonal(4, 8), step=5, selected=(2, 3))
    arrows = [a for a in fig.layout.annotations if a.showarrow]
    assert len(arrows) == 2
    tails = sorted((round(a.ay), round(a.ax)) for a in arrows)  # (layer, segment) each arrow starts from
    assert tails == [(1, 3), (2, 2)]
    assert all(abs(a.y - 2) < 0.5 and abs(a.x - 3) < 0.5 for a in arrows)  # both end in (2, 3)
    corner = grid_figure(4, 8, diagonal(4, 8), selected=(0, 0))
    assert not [a for a in corner.layout.annotations if a.showarrow]
    with pytest.raises(ValueError):
        grid_figure(4, 8, diagonal(4, 8), selected=(4, 0))


def test_grid_rejects_an_invalid_schedule_and_step():
    with pytest.raises(ValueError):
        grid_figure(2, 2, [[(0, 0)], [(1, 1)], [(0, 1), (1, 0)]])
    with pytest.raises(ValueError):
        grid_figure(2, 2, diagonal(2, 2), step=4)


def test_ring_figure_colours_cells_by_request():
    L, lengths = 3, [2, 3]
    steps = ring(L, lengths)
    z = np.asarray(ring_figure(L, lengths).data[0].z)
    assert z.shape == (L, len(steps))
    for t, step in enumerate(steps):
        assert {(l, int(z[l, t])) for l in range(L) if not np.isnan(z[l, t])} == {(l, r) for l, r, _ in step}
    anim = ring_animation(L, lengths)
    assert len(anim.frames) == len(steps)
    first = np.asarray(anim.frames[0].data[0].z)
    assert np.count_nonzero(~np.isnan(first)) == 1  # only (slot 0, request 0, segment 0) so far


def test_cost_figures():
    steps = diagonal(3, 5)
    assert list(group_size_figure(steps, 3).data[0].y) == [1, 2, 3, 3, 3, 2, 1]
    util = utilisation_figure(4, [1, 4, 16])
    assert list(util.data[0].y) == pytest.approx([1 / 4, 16 / 28, 64 / 76])
    speed = speedup_figure(4, [1, 8])
    assert list(speed.data[0].y) == [4, 32] and list(speed.data[1].y) == [4, 11]
    assert list(speed.data[2].y) == pytest.approx([1.0, 32 / 11])


def test_step_figure_from_saved_records():
    """Step records as scripts/gpu_checks.py saves them (dicts): bars of ms coloured and
    labelled by G; a record without the fields is refused with what it needs."""
    records = [{"step": 0, "group_size": 1, "layers": (0, 0), "segments": (0,), "ms": 0.5, "peak_mem": None,
                "tokens_done": 0},
               {"step": 1, "group_size": 2, "layers": (0, 1), "segments": (1, 0), "ms": 0.7, "peak_mem": None,
                "tokens_done": 32}]
    fig = step_figure(records)
    assert list(fig.data[0].y) == [0.5, 0.7]
    assert list(fig.data[0].marker.color) == [1, 2] and list(fig.data[0].text) == ["1", "2"]
    assert fig.layout.uniformtext.mode == "hide"                  # a label that does not fit is dropped
    with pytest.raises(ValueError, match=r"lacks \['group_size', 'layers', 'segments', 'tokens_done'\]"):
        step_figure([{"step": 0, "ms": 1.0}])


def bench_rows(tokens, dtypes=("float32",), seconds_per_token=1e-4):
    modes = (("full", 3.0), ("sequential", 2.0), ("sequential_grouped", 1.5), ("diagonal", 1.0), ("ideal", 0.9))
    return [dict(mode=m, dtype=d, device="cpu", preset="tiny", tokens=N, segments=N // 32,
                 seconds=f * N * seconds_per_token, seconds_min=f * N * seconds_per_token,
                 seconds_max=f * N * seconds_per_token) for d in dtypes for N in tokens for m, f in modes]


def test_bench_figure_legend_sits_below_the_plots():
    """5 modes in 2 dtypes plus 3 speed-up lines each: a horizontal legend anchored below the
    plot area, one entry per mode and dtype (a speed-up line shares its mode's entry), with
    the bottom margin grown to hold the legend's lines twice over."""
    fig = bench_figure(bench_rows([32, 1024, 131072], dtypes=("float32", "bfloat16")))
    assert len(fig.data) == 16
    legend = fig.layout.legend
    assert legend.orientation == "h" and legend.yanchor == "top" and legend.y < 0
    shown = [t for t in fig.data if t.showlegend is not False]
    assert [t.name for t in shown[:5]] == [f"{m} (float32)" for m in ("full", "sequential", "sequential_grouped",
                                                                      "diagonal", "ideal")]
    assert len(shown) == 10 and all(t.xaxis == "x" for t in shown)
    assert {t.legendgroup for t in fig.data if t.xaxis == "x2"} <= {t.legendgroup for t in shown}
    assert fig.layout.margin.b >= 90 + 22 * 4
    symbols = {t.marker.symbol for t in fig.data if t.xaxis == "x"}
    assert len(symbols) == 5                                      # a marker per mode, not only a colour
    assert {t.line.dash for t in fig.data} == {"solid", "dash"}   # a dash per dtype


def test_bench_figure_log_ticks_are_labelled_in_full():
    """No bare minor-tick digits: the token axis ticks at the measured lengths (4K, 128K) and
    the seconds axis at decades (wide range) or powers of two (narrow range)."""
    wide = bench_figure(bench_rows([32, 4096, 131072]))
    assert list(wide.layout.xaxis.tickvals) == [32, 4096, 131072]
    assert list(wide.layout.xaxis.ticktext) == ["32", "4K", "128K"]
    assert wide.layout.xaxis.type == wide.layout.yaxis.type == "log"
    assert wide.layout.yaxis.dtick == 1 and wide.layout.yaxis.minor.dtick == "D1"
    narrow = bench_figure(bench_rows([64, 128]))
    assert narrow.layout.yaxis.dtick == pytest.approx(np.log10(2)) and narrow.layout.yaxis.tickformat == ".2~g"
    assert speedup_figure(4, [1, 8]).layout.yaxis.dtick == 1


def test_accuracy_figure_one_style_per_task_and_memory():
    result = {"tasks": ["needle", "recall"], "chance": 1 / 16, "samples_per_distance": 50,
              "by_distance": [{"distance": d, "needle": 1.0, "needle_zeroed": 0.1, "recall": 0.9,
                               "recall_zeroed": 0.05} for d in (1, 2, 3)]}
    fig = accuracy_figure(result)
    assert [t.name for t in fig.data] == ["needle in a haystack: memory on", "needle in a haystack: memory zeroed",
                                          "associative recall: memory on", "associative recall: memory zeroed"]
    assert [t.line.dash for t in fig.data] == ["solid", "dot", "solid", "dot"]
    assert fig.data[0].marker.symbol != fig.data[2].marker.symbol
    assert {t.line.color for t in fig.data} <= set(PALETTE.values())
    assert list(fig.data[3].y) == [0.05] * 3


def test_cells_are_labelled_only_where_the_label_fits():
    """Labels need about 28 px a cell: 24 segments keep them, 25 do not (however few layers),
    nor do 600+ cells."""
    assert grid_figure(4, 24, diagonal(4, 24)).data[0].texttemplate == "%{text}"
    for L, S in ((4, 25), (2, 128), (26, 24)):
        trace = grid_figure(L, S, diagonal(L, S)).data[0]
        assert trace.text is None and trace.texttemplate is None


def test_explorer_patches_the_same_figure_in_place():
    explorer = schedule_explorer(4, 8)
    figure, trace = explorer.figure, explorer.figure.data[0]
    assert isinstance(figure, go.FigureWidget)
    assert explorer.widget.children[-1] is figure
    steps = diagonal(4, 8)
    for k in (3, 7, 0):
        explorer.step.value = k
        check_states(figure.data[0].z, steps, k)
    assert figure.data[0] is trace  # patched, not replaced
    explorer.step.value = explorer.step.max  # one past the last step: all done
    assert cells_in_state(figure.data[0].z, DONE) == {(l, s) for l in range(4) for s in range(8)}


def test_explorer_follows_sizes_and_order():
    explorer = schedule_explorer(4, 8)
    figure = explorer.figure
    explorer.layers.value = 6
    explorer.segments.value = 10
    assert figure is explorer.figure
    assert np.asarray(figure.data[0].z).shape == (6, 10)
    assert explorer.step.max == explorer.play.max == 6 + 10 - 1
    explorer.order.value = "sequential"
    assert explorer.step.max == 60
    explorer.step.value = 13
    check_states(figure.data[0].z, sequential(6, 10), 13)
    assert "60 steps" in explorer.count.value
    explorer.layers.value, explorer.segments.value = 32, 128  # too many cells to label
    assert np.asarray(figure.data[0].z).shape == (32, 128)
    assert figure.data[0].text is None and figure.data[0].texttemplate is None
    explorer.layers.value = 4                                 # few layers, but 128 columns: slivers
    assert np.asarray(figure.data[0].z).shape == (4, 128)
    assert figure.data[0].text is None and figure.data[0].texttemplate is None
    explorer.segments.value = 8                               # labels come back where they fit
    assert figure.data[0].texttemplate == "%{text}" and np.asarray(figure.data[0].text).shape == (4, 8)


def test_explorer_selects_a_cell_and_displays():
    explorer = schedule_explorer(4, 8)
    explorer.select(2, 3)
    assert len([a for a in explorer.figure.layout.annotations if a.showarrow]) == 2
    explorer.layers.value = 2  # the selection falls off the grid and is dropped
    assert explorer.selected is None and not explorer.figure.layout.annotations
    bundle = explorer._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle


@pytest.mark.parametrize("build", [
    lambda: grid_figure(32, 128, diagonal(32, 128), step=60, selected=(5, 40)),
    lambda: schedule_animation(32, 128),
], ids=["grid_figure", "schedule_animation"])
def test_largest_grid_builds_with_one_heatmap_and_a_frame_per_step(build):
    """The widget's largest grid (32 x 128): one heatmap of the whole grid, and for the
    diagonal animation one frame per step — L + S - 1 = 159, under 1 MB of figure JSON
    (how long building takes is a benchmark question, not a test's)."""
    fig = build()
    assert np.asarray(fig.data[0].z).shape == (32, 128)
    assert len(fig.frames) in (0, 32 + 128 - 1)
    assert len(fig.to_json()) < 1_000_000


def test_long_orders_are_strided():
    """4096 sequential steps are shown as at most 300 frames (every k-th plus the last), so
    the figure stays a few MB instead of ~20 MB of HTML."""
    from diaglab import viz
    seq = viz.schedule_animation(32, 128, order="sequential")
    both = viz.compare_animation(32, 128)
    assert len(seq.frames) <= 300 and len(both.frames) <= 300
    assert seq.frames[-1].name == str(32 * 128 - 1)          # the finished grid is always shown
    assert "one frame every" in seq.layout.title.text
    assert len(seq.to_json()) < 2_000_000 and len(both.to_json()) < 4_000_000
    assert viz.frame_steps(10, 300) == list(range(10))
    assert viz.frame_steps(10, 4) == [0, 3, 6, 9]


def test_explorer_step_slider_is_wide_enough_for_long_schedules():
    from diaglab import widgets
    ex = widgets.schedule_explorer(L=8, S=128)
    assert ex.step.max == 8 + 128 - 1 and int(ex.step.layout.width.removesuffix("px")) >= 5 * ex.step.max
