"""Measuring a run: wall time, peak memory, one record per grouped step of an executor,
the torch.profiler view, and a live figure that fills in while a run progresses.

Timing. CUDA kernels run asynchronously, so a host clock alone would measure launches:
`Timer` records CUDA events around the block and synchronises; on CPU it reads
time.perf_counter.

Memory. `PeakMemory` reports the peak bytes a block needed ABOVE what was in use when
it began (weights and inputs excluded), so sizes and devices compare:
  - CUDA: torch.cuda.max_memory_allocated (peak stats reset at the start) minus
    memory_allocated at the start — the tensors torch allocated, not the caching
    allocator's reserve.
  - CPU (Linux): growth of the process's resident set. The kernel's peak (VmHWM in
    /proc/self/status) is reset through /proc/self/clear_refs at the start, so the peak
    belongs to this block and not to everything the process did before (ru_maxrss only
    ever grows). glibc keeps freed memory for reuse, and reusing it would not show in
    RSS, so the start also hands free heap pages back (malloc_trim): whatever the block
    touches then shows up. RSS counts whole 4 KiB pages and everything in them (Python
    objects, allocator bookkeeping), so it bounds the tensor bytes from above and is
    coarse — a MiB or two — for blocks of small tensors. Trimming makes the next
    allocations fault their pages in again: time and measure memory in separate calls
    (bench does).
  - anywhere else: None; no per-block peak is available without a fresh process.

Per-step records come from the executor's `on_step(t, cells)` hook. On CUDA each step is
synchronised before it is timed: the records are exact per step, but the forced syncs
remove the overlap of host and device between steps, so their sum is a little more than
an unprofiled run. Use `Timer` around the whole call for end-to-end latency.
"""

from __future__ import annotations

import ctypes
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

if TYPE_CHECKING:  # plotly is imported where a figure is built: timing and memory need only torch
    import plotly.graph_objects as go

_KIB = 1024
_BAR_COLOURS = "Viridis"
_LINE_COLOUR = "#D55E00"  # Okabe-Ito vermillion


# ---- time ---------------------------------------------------------------------------
def synchronize(device: torch.device | str) -> None:
    """Wait for queued CUDA work on device (no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Context manager: `with Timer(device) as t: ...` then t.seconds (wall time of the block)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.seconds: float | None = None

    def __enter__(self) -> "Timer":
        synchronize(self.device)  # earlier queued work is not ours
        if self.device.type == "cuda":
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record(torch.cuda.current_stream(self.device))
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self._end.record(torch.cuda.current_stream(self.device))
            self._end.synchronize()
            self.seconds = self._start.elapsed_time(self._end) / 1e3  # elapsed_time is in ms
        else:
            self.seconds = time.perf_counter() - self._t0


def timed(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[object, float]:
    """Run fn() once; return (its result, wall seconds)."""
    with Timer(device) as t:
        result = fn()
    return result, t.seconds


# ---- memory -------------------------------------------------------------------------
def _proc_status_bytes(field: str) -> int | None:
    """A 'kB' field of /proc/self/status (VmRSS, VmHWM) in bytes, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * _KIB
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    """Set the kernel's peak RSS (VmHWM) to the current RSS; False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _release_free_heap() -> None:
    """Give glibc's free heap pages back to the OS (malloc_trim), so that using them again
    shows up in RSS. A no-op off glibc (then CPU peaks are lower bounds)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class PeakMemory:
    """Peak bytes in use during a block above those in use when it began (module docstring
    says what that means per device). `with PeakMemory(device) as pm: ...` then pm.bytes;
    pm.bytes is None where the platform cannot measure it.

    For per-step peaks: start() once, then read() and reset_peak() after every step. On
    CPU the heap is trimmed only at start(), so within a run freed memory is reused
    unseen and each step reads the resident growth of the run so far.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.bytes: int | None = None
        self._base: int | None = None

    def start(self) -> None:
        synchronize(self.device)
        if self.device.type == "cuda":
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _release_free_heap()
            self._base = _proc_status_bytes("VmRSS")
        self.reset_peak()

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif not _reset_rss_peak():
            self._base = None  # a peak that cannot be reset would be the whole process's

    def read(self) -> int | None:
        """Peak bytes above the start since the last reset_peak()."""
        synchronize(self.device)
        if self._base is None:
            return None
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _proc_status_bytes("VmHWM")
        return None if peak is None else max(0, peak - self._base)

    def __enter__(self) -> "PeakMemory":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bytes = self.read()


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[object, int | None]:
    """Run fn() once; return (its result, peak bytes above those in use before the call)."""
    with PeakMemory(device) as pm:
        result = fn()
    return result, pm.bytes


# ---- per-step records ---------------------------------------------------------------
@dataclass(frozen=True)
class StepRecord:
    step: int                   # t: the step's index in the executor's schedule
    group_size: int             # G: cells (layers) run together in this step
    layers: tuple[int, int]     # (lo, hi), inclusive
    segments: tuple[int, ...]   # the segment each layer lo..hi processed
    ms: float                   # wall time of the step
    peak_mem: int | None        # peak bytes during the step above those in use when the run began
    tokens_done: int            # tokens (B * n_s, padding included) whose segment left the last layer


def _segment_tokens(model, input_ids: torch.Tensor) -> list[int]:
    """B * n_s for each segment s of input_ids (B, N)."""
    B, N = input_ids.shape
    n = model.config.segment_size
    return [B * (min(N, a + n) - a) for a in range(0, N, n)]


def profile_steps(executor, input_ids: torch.Tensor,
                  on_record: Callable[[StepRecord], None] | None = None, **call_kw) -> list[StepRecord]:
    """Run executor(input_ids, **call_kw) under torch.no_grad and time every grouped step.

    input_ids: (B, N). on_record(record) is called after each step, outside the timed span
    (a live figure can redraw there without slowing the steps it shows). Returns one
    StepRecord per step, in order. On CPU the run starts from a trimmed heap (PeakMemory),
    so its first steps also pay for faulting their memory in: read the steady state.
    """
    model = executor.model
    device, last_layer = model.device, model.num_layers - 1
    seg_tokens = _segment_tokens(model, input_ids)
    records: list[StepRecord] = []
    memory = PeakMemory(device)
    t0 = [0.0]  # start of the step being timed; a cell so the hook can restart it

    def on_step(t: int, cells: list[tuple[int, int]]) -> None:
        synchronize(device)
        ms = (time.perf_counter() - t0[0]) * 1e3
        done = sum(seg_tokens[s] for l, s in cells if l == last_layer)
        record = StepRecord(t, len(cells), (cells[0][0], cells[-1][0]), tuple(s for _, s in cells),
                            ms, memory.read(), done)
        records.append(record)
        if on_record is not None:
            on_record(record)
        memory.reset_peak()
        t0[0] = time.perf_counter()

    with torch.no_grad():
        memory.start()
        t0[0] = time.perf_counter()
        executor(input_ids, on_step=on_step, **call_kw)
    return records


# ---- torch.profiler -----------------------------------------------------------------
def _profiled_run(executor, input_ids: torch.Tensor, **call_kw) -> torch.profiler.profile:
    """One executor call under torch.no_grad and torch.profiler (CPU, plus CUDA kernels on a GPU)."""
    device = executor.model.device
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.no_grad(), torch.profiler.profile(activities=activities) as prof:
        executor(input_ids, **call_kw)
        synchronize(device)
    return prof


def torch_profile(executor, input_ids: torch.Tensor, trace_path: str | Path | None = None,
                  row_limit: int = 20, sort_by: str | None = None, **call_kw) -> str:
    """Run executor(input_ids, **call_kw) once under torch.profiler (CPU, plus CUDA on a GPU).

    Returns prof.key_averages() as a table sorted by self device time on CUDA, self CPU
    time otherwise (or sort_by); each step shows up as a 'diag_step t layers lo-hi' range.
    Writes a Chrome trace (open in chrome://tracing or ui.perfetto.dev) if trace_path is given.
    """
    device = executor.model.device
    prof = _profiled_run(executor, input_ids, **call_kw)
    if trace_path is not None:
        Path(trace_path).parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace_path))
    sort_by = sort_by or ("self_device_time_total" if device.type == "cuda" else "self_cpu_time_total")
    return prof.key_averages().table(sort_by=sort_by, row_limit=row_limit)


def phase_breakdown(executor, input_ids: torch.Tensor, **call_kw) -> dict[str, float]:
    """Where a diagonal run's time goes: milliseconds in each phase of the grouped steps
    (grouped.PHASES: the associative read, attention, MLP, the associative write), the rest
    of the steps ('other': embedding, stacking the group's inputs and memory, the LM head),
    and their sum ('steps'). Read off one run under torch.profiler from the executor's
    'diag_step' and grouped_layer's 'phase' ranges: CPU time on CPU, kernel time on CUDA.
    The profiler adds its own overhead to every range: compare shares, not absolute times."""
    from .grouped import PHASES

    device = executor.model.device
    prof = _profiled_run(executor, input_ids, **call_kw)

    def ms(event) -> float:
        return (event.device_time_total if device.type == "cuda" else event.cpu_time_total) / 1e3

    out = dict.fromkeys(PHASES, 0.0)
    steps = 0.0
    for event in prof.events():   # the host-side ranges only: on CUDA each range also has a device-side
        if event.device_type != torch.autograd.DeviceType.CPU:   # twin, which must not be counted twice
            continue
        if event.name.startswith("phase ") and event.name[6:] in out:
            out[event.name[6:]] += ms(event)
        elif event.name.startswith("diag_step "):
            steps += ms(event)
    out["other"] = max(steps - sum(out.values()), 0.0)
    out["steps"] = steps
    return out


# ---- figures ------------------------------------------------------------------------
def _step_arrays(records: list[StepRecord]) -> dict:
    """What the step figure draws, as plain lists: per-step bars and the cumulative rate."""
    elapsed, done, rate = 0.0, 0, []
    for r in records:
        elapsed, done = elapsed + r.ms / 1e3, done + r.tokens_done
        rate.append(done / elapsed if elapsed > 0 else 0.0)
    return {
        "step": [r.step for r in records],
        "ms": [r.ms for r in records],
        "group": [r.group_size for r in records],
        "hover": [[f"{r.layers[0]}-{r.layers[1]}", ", ".join(map(str, r.segments)), r.group_size]
                  for r in records],
        "rate": rate,
        "elapsed": elapsed,
        "done": done,
    }


def progress_text(records: list[StepRecord], n_steps: int | None = None, total_tokens: int | None = None) -> str:
    """'step 12/135 · 2,048/4,096 tokens · 9,871 tokens/s · 207 ms' for the figure title."""
    a = _step_arrays(records)
    steps = f"step {len(records)}" + (f"/{n_steps}" if n_steps else "")
    tokens = f"{a['done']:,}" + (f"/{total_tokens:,}" if total_tokens else "") + " tokens"
    rate = a["rate"][-1] if records else 0.0
    return f"{steps} · {tokens} · {rate:,.0f} tokens/s · {a['elapsed'] * 1e3:,.0f} ms"


def step_figure(records: list[StepRecord], max_group: int | None = None, n_steps: int | None = None,
                total_tokens: int | None = None) -> go.Figure:
    """Per-step latency bars coloured by group size G, with the cumulative tokens/s
    (tokens whose segment has left the last layer, over the time so far) on a second axis.
    max_group / n_steps / total_tokens fix the colour range and the progress title before
    all records exist (a live run); by default they come from the records."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    a = _step_arrays(records)
    cmax = max_group or max(a["group"], default=1)
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Bar(x=a["step"], y=a["ms"], name="step latency", customdata=a["hover"],
                         marker=dict(color=a["group"], coloraxis="coloraxis"),
                         hovertemplate="step %{x}: %{y:.2f} ms<br>layers %{customdata[0]} · G = "
                                       "%{customdata[2]}<br>segments %{customdata[1]}<extra></extra>"),
                  secondary_y=False)
    fig.add_trace(go.Scatter(x=a["step"], y=a["rate"], name="tokens/s so far", mode="lines",
                             line=dict(color=_LINE_COLOUR, width=2),
                             hovertemplate="after step %{x}: %{y:,.0f} tokens/s<extra></extra>"),
                  secondary_y=True)
    fig.update_layout(template="plotly_white", title=progress_text(records, n_steps, total_tokens),
                      coloraxis=dict(colorscale=_BAR_COLOURS, cmin=1, cmax=max(cmax, 2),
                                     colorbar=dict(title="G", x=1.12)),
                      legend=dict(orientation="h", y=-0.2), bargap=0.1)
    fig.update_xaxes(title_text="step t")
    fig.update_yaxes(title_text="ms per step", rangemode="tozero", secondary_y=False)
    fig.update_yaxes(title_text="tokens/s (cumulative)", rangemode="tozero", showgrid=False, secondary_y=True)
    return fig


# ---- live view ----------------------------------------------------------------------
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
        import plotly.graph_objects as go
        self.figure = go.FigureWidget(step_figure([], self.max_group, self.n_steps, self.total_tokens))

    def run(self, **call_kw) -> list[StepRecord]:
        """Profile one executor call (see profile_steps), redrawing as steps complete."""
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
        a = _step_arrays(self.records)
        with self.figure.batch_update():
            self.figure.data[0].update(x=a["step"], y=a["ms"], customdata=a["hover"], marker_color=a["group"])
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
