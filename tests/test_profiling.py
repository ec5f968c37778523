"""Profiling runs end to end at tiny sizes: one record per schedule step with the right
group, layers and segments; the torch.profiler table and Chrome trace carry the step
labels; the live figure (widgets.LiveRun over viz.step_figure) ends with one bar per
step. No timing thresholds."""

import json
import sys
import time

import plotly.graph_objects as go
import pytest
from conftest import live_model, random_ids

from diaglab import DiagonalExecutor, schedule
from diaglab.grouped import PHASES
from diaglab.profiling import StepRecord, Timer, phase_breakdown, profile_steps, timed, torch_profile
from diaglab.viz import step_figure
from diaglab.widgets import LiveRun, live_profile

L, N, B = 3, 8 * 5 + 3, 2   # segment_size 8: S = 6 segments, the last one partial (3 tokens)
S = 6


@pytest.fixture(scope="module")
def model():
    return live_model(layers=L, segment_size=8).eval()


@pytest.mark.parametrize("order", ["diagonal", "sequential"])
def test_profile_steps_follows_the_schedule(model, order):
    ex = DiagonalExecutor(model, order=order)
    steps = schedule.diagonal(L, S) if order == "diagonal" else schedule.sequential(L, S)
    seen = []
    records = profile_steps(ex, random_ids(B, N), on_record=seen.append, keep_logits="last_segment")
    assert seen == records
    assert len(records) == len(steps)
    for t, (rec, cells) in enumerate(zip(records, steps)):
        assert isinstance(rec, StepRecord) and rec.step == t
        assert rec.group_size == len(cells)
        assert rec.layers == (cells[0][0], cells[-1][0])
        assert rec.segments == tuple(s for _, s in cells)
        assert rec.ms > 0
        if sys.platform == "linux":
            assert rec.peak_mem is not None and rec.peak_mem >= 0
    # every token leaves the last layer exactly once, in the step holding (L-1, its segment)
    assert sum(r.tokens_done for r in records) == B * N
    last = [r for r in records if r.layers[1] == L - 1 and r.segments[-1] == S - 1]
    assert len(last) == 1 and last[0].tokens_done == B * 3


def test_timer_and_timed_measure_wall_time():
    with Timer("cpu") as t:
        time.sleep(0.02)
    assert t.seconds >= 0.02
    result, seconds = timed(lambda: time.sleep(0.01) or 7)
    assert result == 7 and seconds >= 0.01


def test_torch_profile_table_and_chrome_trace(model, tmp_path):
    ex = DiagonalExecutor(model)
    trace = tmp_path / "trace" / "diag.json"
    table = torch_profile(ex, random_ids(1, N), trace_path=trace, row_limit=-1)  # -1: every row
    for t, cells in enumerate(schedule.diagonal(L, S)):
        assert f"diag_step {t} layers {cells[0][0]}-{cells[-1][0]}" in table
    assert "Self CPU" in table
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert "diag_step 0 layers 0-0" in names
    assert any(name.startswith("aten::bmm") for name in names)


def test_phase_breakdown_splits_the_steps(model):
    """Over a run, the four phase ranges lie inside the steps' ranges and leave room for the
    steps' own work ('other'); the read is skipped while each layer is on its first segment,
    so a one-segment run has none."""
    ex = DiagonalExecutor(model)
    parts = phase_breakdown(ex, random_ids(B, N))
    assert list(parts) == [*PHASES, "other", "steps"] == ["read", "attention", "mlp", "write", "other", "steps"]
    assert all(parts[k] > 0 for k in parts)
    assert sum(parts[k] for k in PHASES) < parts["steps"]     # nested, not clamped: 'other' is measured
    one_segment = phase_breakdown(ex, random_ids(B, 8))
    assert one_segment["read"] == 0 and one_segment["attention"] > 0 and one_segment["write"] > 0
    table = torch_profile(ex, random_ids(1, N), row_limit=-1)
    assert all(f"phase {name}" in table for name in PHASES)


def test_live_profile_has_one_bar_per_step(model):
    ids = random_ids(B, N)
    fig = live_profile(DiagonalExecutor(model), ids, show=False, progress=False, keep_logits="none")
    steps = schedule.diagonal(L, S)
    assert isinstance(fig, go.FigureWidget)
    bars, rate = fig.data
    assert list(bars.x) == list(range(len(steps)))
    assert list(bars.marker.color) == [len(c) for c in steps]
    assert all(ms > 0 for ms in bars.y)
    assert len(rate.y) == len(steps) and rate.y[-1] > 0        # all tokens done by the end
    assert fig.layout.title.text.startswith(f"step {len(steps)}/{len(steps)} · {B * N:,}/{B * N:,} tokens")


def test_live_run_redraws_during_the_run(model):
    live = LiveRun(DiagonalExecutor(model), random_ids(1, N), refresh_s=0.0, progress=False)
    assert len(live.figure.data[0].x) == 0                       # empty before the run
    drawn = []
    live.figure.data[0].on_change(lambda trace, x: drawn.append(len(x)), "x")
    records = live.run(keep_logits="none")
    assert len(records) == live.n_steps == L + S - 1
    assert drawn[:3] == [1, 2, 3]                                # one redraw per step at refresh_s = 0


def test_step_figure_is_a_pure_builder():
    records = [StepRecord(t, g, (0, g - 1), tuple(range(g - 1, -1, -1)), 1.0 + t, None, 8 * (t >= 1))
               for t, g in enumerate([1, 2, 2, 1])]
    fig = step_figure(records)
    assert type(fig) is go.Figure
    assert list(fig.data[0].y) == [1.0, 2.0, 3.0, 4.0]
    assert fig.layout.coloraxis.cmax == 2
    # cumulative rate: tokens done so far over the time so far
    assert fig.data[1].y[-1] == pytest.approx(24 / ((1 + 2 + 3 + 4) / 1e3))
    assert len(step_figure([]).data[0].x or ()) == 0
