"""Interactive notebook widgets: thin ipywidgets layers over the builders in `viz`.

`schedule_explorer()` shows the layer x segment grid in a `go.FigureWidget` with
sliders for L and S, a sequential/diagonal switch, and a step slider driven by a Play
button. Moving the step rewrites only the heatmap's state arrays, in place; changing L,
S or the order recomputes the schedule and redraws the same FigureWidget. Clicking a
cell selects it and draws its two dependency arrows. A notebook cell that ends with
`schedule_explorer()` displays it.

`LiveRun` / `live_profile()` show an executor call while it runs: viz.step_figure in a
`go.FigureWidget`, redrawn from profiling.profile_steps' records as the steps complete.
"""

from __future__ import annotations

import math
import time

import ipywidgets as widgets
import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

from diaglab.profiling import StepRecord, profile_steps
from diaglab.viz import ORDERS, cell_arrays, cell_steps, grid_figure, grid_title, progress_text, step_arrays, step_figure

_GRID_KEYS = ("x", "y", "z", "text", "texttemplate", "customdata")  # trace attributes that depend on L and S


class ScheduleExplorer:
    """The explorer's controls and figure; `.widget` is the VBox to display.

    Step k of an n-step schedule shows cells of step k running; step n shows the
    finished grid.
    """

    def __init__(self, L: int = 4, S: int = 8, order: str = "diagonal"):
        if order not in ORDERS:
            raise ValueError(f"order must be one of {sorted(ORDERS)}, got {order!r}")
        self.layers = widgets.IntSlider(value=L, min=1, max=32, description="L (layers)",
                                         style={"description_width": "initial"})
        self.segments = widgets.IntSlider(value=S, min=1, max=128, description="S (segments)",
                                           style={"description_width": "initial"})
        self.order = widgets.Dropdown(options=list(ORDERS), value=order, description="schedule")
        # wide enough that one step is a few pixels even at S = 128 (135 diagonal steps, 1024 sequential)
        self.step = widgets.IntSlider(value=0, min=0, max=1, description="step",
                                      layout=widgets.Layout(width="720px"))
        self.play = widgets.Play(value=0, min=0, max=1, interval=400, description="play")
        widgets.link((self.play, "value"), (self.step, "value"))
        widgets.link((self.play, "max"), (self.step, "max"))
        self.count = widgets.HTML()
        self.selected: tuple[int, int] | None = None
        self._schedule()
        self.figure = go.FigureWidget(grid_figure(L, S, self._steps, step=0))
        self.figure.data[0].on_click(self._on_click)
        self.step.observe(self._on_step, names="value")
        for control in (self.layers, self.segments, self.order):
            control.observe(self._on_grid, names="value")
        self._caption()
        self.widget = widgets.VBox([
            widgets.HBox([self.layers, self.segments, self.order]),
            widgets.HBox([self.play, self.step, self.count]),
            self.figure,
        ])

    def _schedule(self) -> None:
        """1. Recompute the schedule for the current controls and fit the step range."""
        L, S = self.layers.value, self.segments.value
        self._steps = ORDERS[self.order.value](L, S)
        self._step_of = cell_steps(L, S, self._steps)  # (L, S)
        self.step.max = len(self._steps)  # linked: play.max follows

    def _caption(self) -> None:
        L, S, t, n = self.layers.value, self.segments.value, self.step.value, len(self._steps)
        running = f"group size G = {len(self._steps[t])}" if t < n else "finished"
        self.count.value = (f"<b>{self.order.value}</b>: {n} steps "
                            f"(S·L = {S * L}, L + S − 1 = {L + S - 1}) — step {t}: {running}")

    def _on_step(self, change: dict) -> None:
        """2. A new step only changes the cell states (and labels): patch them in place."""
        arrays = cell_arrays(self._step_of, change["new"])
        with self.figure.batch_update():
            for key, value in arrays.items():
                self.figure.data[0][key] = value
            self.figure.layout.title.text = grid_title(self.layers.value, self.segments.value,
                                                       len(self._steps), change["new"])
        self._caption()

    def _on_grid(self, change: dict) -> None:
        """3. New L, S or order: new schedule, then redraw the grid into the same figure."""
        self._schedule()
        L, S = self.layers.value, self.segments.value
        if self.selected is not None and not (self.selected[0] < L and self.selected[1] < S):
            self.selected = None
        self._redraw()

    def _on_click(self, trace, points, selector) -> None:
        if points.xs:
            self.select(int(points.ys[0]), int(points.xs[0]))

    def select(self, layer: int, segment: int) -> None:
        """Outline cell (layer, segment) and draw its dependency arrows."""
        self.selected = (layer, segment)
        self._redraw()

    def _redraw(self) -> None:
        new = grid_figure(self.layers.value, self.segments.value, self._steps, self.step.value, self.selected)
        with self.figure.batch_update():
            for key in _GRID_KEYS:
                self.figure.data[0][key] = new.data[0][key]
            self.figure.layout.update(title=new.layout.title, height=new.layout.height,
                                      xaxis=new.layout.xaxis, yaxis=new.layout.yaxis)
            self.figure.layout.annotations = new.layout.annotations
            self.figure.layout.shapes = new.layout.shapes
        self._caption()

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def schedule_explorer(L: int = 4, S: int = 8, order: str = "diagonal") -> ScheduleExplorer:
    """The schedule explorer for an L x S grid (display it, or its `.widget`)."""
    return ScheduleExplorer(L, S, order)


class LiveRun:
    """A go.FigureWidget (`.figure`) and a tqdm bar that fill in while an executor runs.

    The figure redraws at most every refresh_s seconds (and once at the end), inside
    fig.batch_update() so each redraw is one message to the frontend. With no frontend
    attached (scripts, tests, nbval) the widget simply holds the final state.
    """

    def __init__(self, executor, input_ids: torch.Tensor, refresh_s: float = 0.2, progress: bool = True):
        model = executor.model
        self.executor, self.input_ids = executor, input_ids
        self.refresh_s, self.progress = refresh_s, progress
        S = math.ceil(input_ids.shape[1] / model.config.segment_size)
        steps = executor.steps(S)
        self.n_steps = len(steps)
        self.max_group = max(len(cells) for cells in steps)
        self.total_tokens = input_ids.numel()
        self.records: list[StepRecord] = []
        self.figure = go.FigureWidget(step_figure([], self.max_group, self.n_steps, self.total_tokens))

    def run(self, **call_kw) -> list[StepRecord]:
        """Profile one executor call (see profiling.profile_steps), redrawing as steps complete."""
        self.records = []
        last_draw = [time.perf_counter()]
        bar = tqdm(total=self.n_steps, unit="step", desc=f"{self.executor.order} steps",
                   disable=not self.progress)

        def on_record(record: StepRecord) -> None:
            self.records.append(record)
            bar.update(1)
            if time.perf_counter() - last_draw[0] >= self.refresh_s:
                self.draw()
                last_draw[0] = time.perf_counter()

        try:
            profile_steps(self.executor, self.input_ids, on_record=on_record, **call_kw)
        finally:
            bar.close()
        self.draw()
        return self.records

    def draw(self) -> None:
        """Rewrite the figure's arrays and title from the records so far."""
        a = step_arrays(self.records)
        with self.figure.batch_update():
            self.figure.data[0].update(x=a["step"], y=a["ms"], customdata=a["hover"], text=a["group"],
                                       marker_color=a["group"])
            self.figure.data[1].update(x=a["step"], y=a["rate"])
            self.figure.layout.title.text = progress_text(self.records, self.n_steps, self.total_tokens)


def _display_in_notebook(fig: go.FigureWidget) -> None:
    """Show fig now when running inside a Jupyter kernel; do nothing elsewhere."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None and getattr(shell, "kernel", None) is not None:
        display(fig)


def live_profile(executor, input_ids: torch.Tensor, show: bool = True, progress: bool = True,
                 refresh_s: float = 0.2, **call_kw) -> go.FigureWidget:
    """Profile one executor call with a live per-step figure; returns the FigureWidget.

    In a notebook the widget is displayed before the run starts (show=True) so it fills
    in as steps complete — assign the result (`fig = live_profile(...)`) rather than
    ending the cell with it, or it is shown twice. To keep the StepRecords as well, use
    LiveRun directly (`live = LiveRun(ex, ids); display(live.figure); live.run()`).
    """
    live = LiveRun(executor, input_ids, refresh_s, progress)
    if show:
        _display_in_notebook(live.figure)
    live.run(**call_kw)
    return live.figure
