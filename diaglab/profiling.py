"""Measuring a run with torch alone: wall time, one record per grouped step of an
executor, the torch.profiler view and the time per phase of the grouped steps. Peak memory
is diaglab.peakmem; the figures are diaglab.viz; the live view is diaglab.widgets.

Timing. CUDA kernels run asynchronously, so a host clock alone would measure launches:
`Timer` records CUDA events around the block and synchronises; on CPU it reads
time.perf_counter.

Per-step records come from the executor's `on_step(t, cells)` hook. On CUDA each step is
synchronised before it is timed: the records are exact per step, but the forced syncs
remove the overlap of host and device between steps, so their sum is a little more than
an unprofiled run. Use `Timer` around the whole call for end-to-end latency.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .peakmem import PeakMemory


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


@dataclass
class RingStepRecord:
    step: int                                  # t: the ring step's index
    cells: tuple[tuple[int, int, int], ...]    # (slot = layer, request id, segment) of each busy slot
    ms: float                                  # wall time of the step
    finished: tuple[int, ...]                  # request ids whose last segment left the ring in this step

    @property
    def resets(self) -> tuple[int, ...]:
        """Slots whose memory starts empty in this step: a request's first segment reached them."""
        return tuple(l for l, _, s in self.cells if s == 0)


def profile_ring(runner, requests: list[torch.Tensor],
                 on_record: Callable[[RingStepRecord], None] | None = None) -> tuple[list, list[RingStepRecord]]:
    """Submit `requests` to a RingExecutor and step it to the end under torch.no_grad, timing
    every step. Returns (outputs in request order, one RingStepRecord per step)."""
    device = runner.model.device
    records: list[RingStepRecord] = []
    with torch.no_grad():
        rids = [runner.submit(ids) for ids in requests]
        done: dict = {}
        while runner.pending:
            t0 = time.perf_counter()
            finished = runner.step()
            synchronize(device)
            record = RingStepRecord(runner.step_count - 1, tuple(runner.history[-1]),
                                    (time.perf_counter() - t0) * 1e3, tuple(finished))
            records.append(record)
            done.update(finished)
            if on_record is not None:
                on_record(record)
    return [done[r] for r in rids], records


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
    of the steps ('other': gathering each group's inputs and memory, and a masked step's
    rows and masks; embedding and the LM head lie outside the steps), and their sum ('steps'). Read off one run under torch.profiler from the executor's
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
