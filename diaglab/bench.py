"""Latency and peak memory of one ARMT forward pass in each execution order, against
full attention over the whole sequence, and the command line that measures them.

Modes, all inference under torch.no_grad on one model and one input:
  full                the base LlamaForCausalLM on all N tokens at once (SDPA, no KV cache,
                      logits_to_keep=1, so it is not charged for an (N, V) logits tensor)
  sequential          the reference ARMT, model(...): S * L HF decoder-layer calls
  sequential_grouped  DiagonalExecutor(order="sequential"): the same order through the
                      grouped kernels — the fair baseline for the schedule's own gain
  diagonal            DiagonalExecutor: L + S - 1 grouped steps
  ideal               the paper's ideal even load, run: S grouped steps of G = L layers on
                      the real shapes, back to back, each fed by the last (even_load_run)
  schedule            (opt-in) the diagonal schedule's own L + S - 1 grouped steps, bare: the
                      ramps' partial groups included, none of the executor's work (schedule_run).
                      diagonal / schedule is the executor's overhead, schedule / ideal what the
                      ramps cost on this machine
ARMT modes keep only the last segment's logits (keep_logits="last_segment").

Modes run interleaved — every repeat visits each mode once, starting from a different
mode each round — so load from other processes hits all of them alike and the ratios
stay fair on a noisy machine. Latency is the median over repeats, with min and max.
The machine's limit is timed the same way: a torch.mm at the best of the anchor's sizes
(flops.mm_peak, measured once at the start) runs in every round among the modes, and each
row's pct_of_peak is its GFLOP/s over that point's median mm rate (peak_gflops; the start's
figure stays as peak_gflops_at_start), so a fast or slow spell moves both alike.
Peak memory comes from one more call per mode after the timed ones (peakmem.PeakMemory:
CUDA allocations, or resident-set growth on CPU). The figures of these rows are
viz.bench_figure; scripts/merge_reports.py joins the JSON files of several runs.

    python -m diaglab.bench --preset tiny --segments 1,2,4,8,16,32,64,128 \
        --dtype float32,bfloat16 --json data/bench/cpu_tiny.json
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from . import flops, heap
from ._checks import (MAX_COUNT, MAX_THREADS, OneLineParser,   # bench's names for them too (scripts import them)
                      check_device, check_int)
from .armt import ARMT, randomize_memory_
from .diagonal import DiagonalExecutor
from .paths import write_json
from .peakmem import PeakMemory
from .presets import PRESETS, from_preset, llama_config
from .profiling import timed
from .tables import format_table

MODES = ("full", "sequential", "sequential_grouped", "diagonal", "ideal")
# opt-in: DiagonalExecutor(compile=True), its first call pays the compile (tens of seconds on a CPU;
# the warm-up rounds absorb it and each row reports it as compile_seconds)
# opt-in too: the bare diagonal schedule (schedule_run), which splits diagonal / ideal into its two causes
ALL_MODES = MODES + ("diagonal_compiled", "schedule")
ROW_KEYS = ("mode", "dtype", "device", "preset", "layers", "segments", "tokens", "seconds", "seconds_min",
            "seconds_max", "tokens_per_s", "peak_mem_bytes", "batch", "segment_size", "num_mem_tokens",
            "repeats", "threads")
# and, in every row measured since the FLOP model: the model width, the work and how close it came to
# the machine's limit measured in the same run (anchor()), and the machine
LIMIT_KEYS = ("hidden", "gflop", "gflops", "pct_of_peak", "peak_gflops", "mm_gflops_by_size",
              "plateau_gemm_gflops", "machine")
# since 2026-12-02 also: the peak timed in the point's own interleaved rounds, and at the run's start
PEAK_KEYS = ("peak_gflops_at_start", "peak_mm_size")
PEAK_MODE = "mm_peak"   # the torch.mm round that runs among the modes of every point (not a row of its own)
DTYPES = ("float32", "bfloat16", "float16")


# ---- the model and input every benchmark uses --------------------------------------------
def live_preset(preset: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                seed: int = 0, **overrides) -> ARMT:
    """The named preset (random weights) with its memory path switched on (randomize_memory_:
    with the paper's W_mv = 0 the read and write would be skipped work), in eval mode."""
    dev = check_device(device)
    return randomize_memory_(from_preset(preset, seed=seed, dtype=dtype, device=dev, **overrides)).eval()


def random_tokens(model: ARMT, tokens: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    """(batch, tokens) random ids from the model's vocabulary, seeded, on the model's device."""
    return torch.randint(0, model.base.config.vocab_size, (batch, tokens),
                         generator=torch.Generator().manual_seed(seed)).to(model.device)


def make_inputs(model: ARMT, segments: Sequence[int] | None = None, lengths: Sequence[int] | None = None,
                batch: int = 1, seed: int = 0) -> list[torch.Tensor]:
    """One (batch, N) random_tokens input per point: N = S * n for each S of segments, or
    each N of lengths (cut into ceil(N / n) segments, the last one partial)."""
    if (segments is None) == (lengths is None):
        raise ValueError("give exactly one of segments or lengths")
    n = model.config.segment_size
    tokens = [S * n for S in segments] if segments is not None else list(lengths)
    return [random_tokens(model, N, seed + i, batch) for i, N in enumerate(tokens)]


# ---- what each mode runs --------------------------------------------------------------
class _Bare:
    """What even_load_run and schedule_run share: each run reads the executor's layer stack (so
    replaced or moved weights are followed, as an executor call follows them), runs in inference
    mode exactly when the executor would run its steps so, and keeps seeded rows X0 (rows, B, T, d)
    of a new segment, their RoPE tables and an empty memory in the model's current dtype and device."""

    def __init__(self, model: ARMT, executor: DiagonalExecutor, batch: int, rows: int):
        if executor.model is not model:
            raise ValueError("the executor was built on another model: pass DiagonalExecutor(model) for this model")
        check_int("batch", batch, 1)
        self.model, self.executor, self.batch, self.rows, self._made = model, executor, batch, rows, None
        with self.run():   # built now (stacks, tables, rows), so a first timed run pays no set-up
            pass

    @contextlib.contextmanager
    def run(self):
        """(layers, step, X0, cos, sin, W0, z0) for one run, inside the executor's grad/inference mode."""
        model = self.model
        with torch.no_grad():   # the tied stacks the timed runs use, not in-graph copies
            layers, step = self.executor.layer_stack()
        key = (model.dtype, model.device)
        if self._made is None or self._made[0] != key:
            n, M, d, dev = model.config.segment_size, model.config.num_mem_tokens, \
                model.hidden_size, model.device
            gen = torch.Generator().manual_seed(0)
            X0 = torch.randn(self.rows, self.batch, n + M, d, generator=gen).to(dev, model.dtype)
            with torch.inference_mode(False):
                cos, sin = model.base.model.rotary_emb(X0[0], torch.arange(n + M, device=dev)[None])   # (1, T, hd)
            empty = model.empty_state(self.batch)
            self._made = (key, (X0, cos, sin, empty.W_mem, empty.z))
        # as DiagonalExecutor.__call__: inference mode only for the fast path (no hook or adapter the
        # grouped kernels would skip) under no_grad
        infer = not self.executor._check.problems() and not torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        with torch.inference_mode() if infer else contextlib.nullcontext():
            yield (layers, step, *self._made[1])


def even_load_run(model: ARMT, executor: DiagonalExecutor, batch: int, steps: int) -> Callable[[], object]:
    """The ideal even load, run (design §3): `steps` full-group steps back to back, each taking
    the last one's output and memory the way the executor's plateau does (X <- [a new
    segment's rows; Y[:-1]]; every layer past its first segment, so the read runs and no
    first-segment mask is needed), in inference mode under no_grad as the executor runs them.
    Timing it gives t(full group) x S in the steady state of a run's plateau, where one call
    timed alone and scaled by S would include a cold start S times (on a 2-core CPU, `tiny`:
    1.76 against 1.54 ms a step in scripts/step_costs.py, which let the diagonal run look faster than its
    own ideal).
    Returns the last step's (Y, W_mem, z)."""
    check_int("steps", steps, 1)
    bare = _Bare(model, executor, batch, model.num_layers)
    L, n = model.num_layers, model.config.segment_size

    def run():
        with bare.run() as (layers, step, X0, cos, sin, W_mem, z):
            X, Y = X0, None
            for t in range(steps):
                if t:   # layer 0 takes a new segment, layer l what layer l - 1 gave
                    X = torch.cat([X0[:1], Y[:-1]])
                Y, W_mem, z = step(X, layers=layers, lo=0, hi=L - 1, n_text=n, cos=cos, sin=sin, mask=None,
                                   W_mem=W_mem, z=z, is_first=None)   # as the plateau: no row is first
            return Y, W_mem, z
    return run


def schedule_run(model: ARMT, executor: DiagonalExecutor, batch: int, segments: int) -> Callable[[], object]:
    """The diagonal schedule itself, bare: its L + S - 1 grouped steps, group sizes 1, 2, ..., L,
    ..., L, ..., 2, 1, each fed by the last as in even_load_run (layer 0 takes a new segment's
    rows, layer l what layer l - 1 gave, each layer its own memory), in inference mode under
    no_grad — and nothing else: no embedding, no first-segment masks (every step reads and
    writes as a settled one; a layer's memory starts at zero), no MemoryState bookkeeping, no
    LM head. It splits diagonal / ideal in two measured factors: schedule / ideal, what the
    ramps' partial groups cost on this machine (each step pays its launches whatever its size;
    the anti-diagonal order cannot avoid them), and diagonal / schedule, the executor's own work.
    Returns the last step's (Y, W_mem, z) (the last layer's)."""
    check_int("segments", segments, 1)
    bare = _Bare(model, executor, batch, 1)
    L, n = model.num_layers, model.config.segment_size

    def run():
        with bare.run() as (layers, step, X0, cos, sin, W0, z0):
            Y, W_mem, z, prev_lo = None, None, None, 0
            for t in range(L + segments - 1):
                lo, hi = max(0, t - segments + 1), min(t, L - 1)
                parts = [X0] if lo == 0 else []
                if hi >= 1:   # layers max(lo, 1)..hi take what the layer below gave at the last step
                    parts.append(Y[max(lo - 1, 0) - prev_lo:hi - prev_lo])
                X = parts[0] if len(parts) == 1 else torch.cat(parts)
                if t == 0:
                    W_mem, z = W0[:1], z0[:1]
                else:         # the layers still busy keep what they wrote; a layer starting now, zeros
                    W_mem, z = W_mem[lo - prev_lo:], z[lo - prev_lo:]
                    if hi == t:
                        W_mem, z = torch.cat([W_mem, W0[hi:hi + 1]]), torch.cat([z, z0[hi:hi + 1]])
                Y, W_mem, z = step(X, layers=layers, lo=lo, hi=hi, n_text=n, cos=cos, sin=sin, mask=None,
                                   W_mem=W_mem, z=z, is_first=None)
                prev_lo = lo
            return Y, W_mem, z
    return run


def executors(model: ARMT, compiled: bool = False) -> dict[str, DiagonalExecutor]:
    """The diagonal and the grouped-sequential executor (and, if asked, the compiled diagonal
    one) on the same model, and one for the ideal mode's even_load_run, each with its weights
    stacked and its layer stack built up front, so a first timed call pays no set-up even with
    no warm-up (they share one set of stacks: grouped.TiedStacks adopts existing ones)."""
    execs = {"diagonal": DiagonalExecutor(model),
             "sequential_grouped": DiagonalExecutor(model, order="sequential"),
             "ideal": DiagonalExecutor(model)}
    if compiled:
        execs["diagonal_compiled"] = DiagonalExecutor(model, compile=True)
    with torch.no_grad():
        for ex in execs.values():
            ex.layer_stack()
    return execs


def check_modes(modes: Sequence[str], allowed: tuple[str, ...], what: str = "modes") -> tuple[str, ...]:
    """modes as a tuple, or a ValueError naming the problem: a str where a list of names
    belongs, no modes, a name not in allowed, a name given twice."""
    if isinstance(modes, str):
        raise ValueError(f"{what} must be a list of names, got the str {modes!r}: write ({modes!r},)")
    modes = tuple(modes)
    if not modes:
        raise ValueError(f"{what} is empty: choose one or more of {allowed}")
    unknown = set(modes) - set(allowed)
    if unknown:
        raise ValueError(f"unknown {what} {sorted(unknown)}; choose from {allowed}")
    twice = sorted({m for m in modes if modes.count(m) > 1})
    if twice:
        raise ValueError(f"{what} name {twice} more than once: give each mode once")
    return modes


def mode_runners(model: ARMT, input_ids: torch.Tensor, modes: tuple[str, ...],
                 execs: dict[str, DiagonalExecutor] | None = None) -> dict[str, Callable[[], object]]:
    """One zero-argument callable per mode, all on the same weights and input_ids (B, N);
    execs from executors(model), built here if not given. The 'ideal' callable runs S
    full-group steps back to back (even_load_run, on execs["ideal"])."""
    modes = check_modes(modes, ALL_MODES)
    execs = execs or executors(model, "diagonal_compiled" in modes)
    runs = {
        "diagonal_compiled": lambda: execs["diagonal_compiled"](input_ids, keep_logits="last_segment"),
        "full": lambda: model.base(input_ids=input_ids, use_cache=False, logits_to_keep=1),
        "sequential": lambda: model(input_ids, keep_logits="last_segment"),
        "sequential_grouped": lambda: execs["sequential_grouped"](input_ids, keep_logits="last_segment"),
        "diagonal": lambda: execs["diagonal"](input_ids, keep_logits="last_segment"),
    }
    S = math.ceil(input_ids.shape[1] / model.config.segment_size)
    if "ideal" in modes:
        runs["ideal"] = even_load_run(model, execs["ideal"], input_ids.shape[0], S)
    if "schedule" in modes:   # (the ideal's executor: the same stacks, no state of its own)
        runs["schedule"] = schedule_run(model, execs["ideal"], input_ids.shape[0], S)
    return {mode: runs[mode] for mode in modes}


def interleaved(fns: dict[str, Callable[[], object]], warmup: int, repeats: int,
                call: Callable[[Callable[[], object]], object]) -> dict[str, list]:
    """Rounds that run every mode once, the start rotating by round, so load from other
    processes hits all modes alike: mode -> call(fn) of each of the timed rounds (the first
    `warmup` rounds are dropped)."""
    names = list(fns)
    out: dict[str, list] = {m: [] for m in names}
    for r in range(warmup + repeats):
        k = r % len(names)
        for mode in names[k:] + names[:k]:
            value = call(fns[mode])
            if r >= warmup:
                out[mode].append(value)
    return out


def measure(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int,
            repeats: int) -> dict[str, tuple[list[float], int | None]]:
    """Interleaved timing (interleaved()), then one more call per mode under PeakMemory,
    apart from the timed calls because measuring memory on CPU returns the free heap to the
    OS, which slows the next call. Returns mode -> (seconds of each timed repeat, peak bytes)."""
    times = interleaved(fns, warmup, repeats, lambda fn: timed(fn, device)[1])
    peaks = {}
    for mode in fns:
        if mode == PEAK_MODE:   # the torch.mm round is timed, not a mode whose memory is reported
            peaks[mode] = None
            continue
        with PeakMemory(device) as pm:
            fns[mode]()
        peaks[mode] = pm.bytes
    return {m: (times[m], peaks[m]) for m in fns}


# ---- the benchmark ------------------------------------------------------------------
def anchor(model: ARMT, batch: int = 1, sizes: Sequence[int] | None = None, repeats: int = 3) -> dict:
    """What this machine can do, measured now: torch.mm GFLOP/s at large square sizes in the
    model's dtype (the peak the rows are put against), bmm GFLOP/s on the plateau step's own
    GEMM shapes, and the machine's identity."""
    if sizes is None:
        sizes = (2048, 4096) if model.device.type == "cuda" else (512, 1024)
    peak = flops.mm_peak(model.dtype, model.device, tuple(sizes), repeats)
    return {"peak_gflops": peak["peak"], "mm_gflops_by_size": peak["gflops_by_size"],
            "plateau_gemm_gflops": flops.gemm_rates(model, batch, repeats), "machine": flops.machine(model.device)}


def run_bench(model: ARMT, inputs: Sequence[torch.Tensor], modes: Sequence[str] = MODES, warmup: int = 1,
              repeats: int = 3, full_max_tokens: int | None = None, preset: str = "custom",
              on_point: Callable[[list[dict]], None] | None = None, progress: bool = False,
              anchor_sizes: Sequence[int] | None = None) -> list[dict]:
    """Measure every mode on every input (each (B, N) token ids, e.g. from make_inputs);
    returns one row (ROW_KEYS) per (input, mode), `preset` naming the model in them.
    full_max_tokens skips full attention above that many tokens (it is O(N^2)).
    on_point(rows of the point) is called after each input (the command line saves there,
    so a run stopped part-way keeps its finished points). progress: a tqdm.auto bar over
    the inputs (a widget in a notebook), the last speed-up of diagonal over sequential as
    its postfix."""
    modes = check_modes(modes, ALL_MODES)
    check_int("warmup", warmup, 0)
    check_int("repeats", repeats, 1)
    if full_max_tokens is not None:
        check_int("full_max_tokens", full_max_tokens, 1)
    if isinstance(inputs, torch.Tensor):
        raise ValueError(f"inputs must be a list of (B, N) tensors, got one tensor of shape {tuple(inputs.shape)}: "
                         "pass [ids]")
    if len(inputs) == 0:
        raise ValueError("inputs is empty: give at least one (B, N) tensor of token ids "
                         "(make_inputs(model, segments=[1, 4]) builds them)")
    for i, ids in enumerate(inputs):
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.numel() == 0:
            got = f"shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"inputs[{i}] must be a non-empty (B, N) tensor of token ids, got {got}")
    batches = sorted({ids.shape[0] for ids in inputs})
    if len(batches) > 1:
        raise ValueError(f"inputs mix batch sizes {batches}: one batch size per call (the anchor's GEMM rates are "
                         "for one); call run_bench once per batch size")
    from tqdm.auto import tqdm
    dtype = str(model.dtype).removeprefix("torch.")
    execs = executors(model, "diagonal_compiled" in modes)
    L, n = model.num_layers, model.config.segment_size
    limit = anchor(model, inputs[0].shape[0], anchor_sizes)   # the same run, the same machine state
    size = int(max(limit["mm_gflops_by_size"], key=limit["mm_gflops_by_size"].get))   # the anchor's best size
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=gen).to(model.device, model.dtype) for _ in range(2))
    mm_round = lambda: torch.mm(a, b)                                                    # noqa: E731
    rows = []
    with tqdm(total=len(inputs), unit="point", desc=f"bench {preset} {dtype}", disable=not progress) as bar:
        for ids in inputs:                                                              # (B, N)
            B, N = ids.shape
            S = math.ceil(N / n)
            point_modes = tuple(m for m in modes if m != "full" or full_max_tokens is None or N <= full_max_tokens)
            runners = mode_runners(model, ids, point_modes, execs)
            runners[PEAK_MODE] = mm_round
            with torch.no_grad():
                result = measure(runners, model.device, warmup, repeats)
            # the peak of this point: torch.mm timed in the same interleaved rounds as the modes, so a
            # fast or slow spell of the machine moves both alike (a machine's speed drifts by 10-20 %)
            peak_gflops = 2 * size ** 3 / statistics.median(result.pop(PEAK_MODE)[0]) / 1e9
            point = []
            for mode, (secs, peak) in result.items():
                median = statistics.median(secs)
                gflop = flops.run_flops(model, N, B, mode.removesuffix("_compiled"))["total"] / 1e9
                extra = ({"compile_seconds": execs[mode].compile_seconds} if mode == "diagonal_compiled" else {})
                point.append(dict(mode=mode, dtype=dtype, device=str(model.device), preset=preset, layers=L,
                                  segments=S, tokens=N, seconds=median, seconds_min=min(secs),
                                  seconds_max=max(secs), tokens_per_s=B * N / median, peak_mem_bytes=peak,
                                  batch=B, segment_size=n, num_mem_tokens=model.config.num_mem_tokens,
                                  repeats=repeats, threads=torch.get_num_threads(), hidden=model.hidden_size,
                                  gflop=gflop, gflops=gflop / median,
                                  pct_of_peak=100 * gflop / median / peak_gflops,
                                  **{**limit, "peak_gflops": peak_gflops}, peak_gflops_at_start=limit["peak_gflops"],
                                  peak_mm_size=size, **extra))
            rows += point
            if on_point is not None:
                on_point(point)
            ratio = speedups({r["mode"]: r for r in point}).get("sequential/diagonal")
            bar.set_postfix_str(f"N={N}" + (f": sequential/diagonal {ratio:.2f}x" if ratio else ""))
            bar.update(1)
    return rows


# ---- many requests: one queue through the ring, back to back, or batched ----------------
QUEUE_MODES = ("ring", "back_to_back", "batched", "ideal")
QUEUE_ROW_KEYS = ("mode", "dtype", "device", "preset", "layers", "requests", "request_segments", "segments", "tokens",
                  "seconds", "seconds_min", "seconds_max", "tokens_per_s", "latency_ms", "steps", "even_load_steps",
                  "segment_size", "num_mem_tokens", "repeats", "threads")


def is_queue(rows: list[dict]) -> bool:
    """Whether rows are run_queue_bench's (they count their requests), not run_bench's."""
    return any("requests" in r for r in rows)


def queue_requests(model: ARMT, requests: int = 8, segments: tuple[int, int] = (2, 8),
                   seed: int = 0) -> list[torch.Tensor]:
    """A seeded queue: `requests` token rows [1, N_i], each of S_i segments with S_i drawn
    from segments (low, high) and a partial last segment of random length."""
    low, high = segments
    if not (isinstance(requests, int) and requests >= 1 and 1 <= low <= high):
        raise ValueError(f"need requests >= 1 and 1 <= low <= high segments, got {requests} and {segments}")
    n, g = model.config.segment_size, torch.Generator().manual_seed(seed)
    S = torch.randint(low, high + 1, (requests,), generator=g).tolist()
    cut = torch.randint(0, n, (requests,), generator=g).tolist()
    return [random_tokens(model, S_i * n - c, seed + 1 + i) for i, (S_i, c) in enumerate(zip(S, cut))]


def queue_rows(requests: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The requests as [1, N] rows ([N] is taken as [1, N], like RingExecutor.submit), or a
    ValueError: no requests, or the first that is neither."""
    if isinstance(requests, torch.Tensor):
        raise ValueError(f"requests must be a list of [1, N] tensors (one per request), got one tensor of shape "
                         f"{tuple(requests.shape)}: pass list(ids) for one request per row")
    rows = []
    for i, ids in enumerate(requests):
        row = ids[None] if isinstance(ids, torch.Tensor) and ids.dim() == 1 else ids
        if not isinstance(row, torch.Tensor) or row.dim() != 2 or row.shape[0] != 1 or row.shape[1] == 0:
            got = f"shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"requests[{i}] must be token ids [1, N] or [N] with N >= 1 (one request; queue a "
                             f"batch row by row), got {got}")
        rows.append(row)
    if not rows:
        raise ValueError("requests is empty: give at least one [1, N] tensor of token ids "
                         "(queue_requests(model, 8) draws a queue)")
    return rows


def queue_runners(model: ARMT, requests: Sequence[torch.Tensor],
                  modes: Sequence[str] = QUEUE_MODES) -> dict[str, Callable[[], list[float]]]:
    """mode -> a callable that serves the whole queue and returns each request's finish time
    (seconds from the start). ideal: the even load of the queue's segments, run (sum S_i
    full-group steps back to back, even_load_run), all finishing at the end."""
    from .ring import RingExecutor
    modes = check_modes(modes, QUEUE_MODES, "queue modes")
    requests = queue_rows(requests)
    dev, n = model.device, model.config.segment_size
    ex = DiagonalExecutor(model)

    def clock(t0: float) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    runner = RingExecutor(model)   # built once, like back_to_back's executor: no set-up in the timed runs
    ideal_ex = DiagonalExecutor(model)   # the ideal step's own layer stack: its RoPE tables are not a request's
    with torch.no_grad():   # the layer stacks too, as executors() does, so a first timed run pays no set-up
        runner._diag.layer_stack()
        ex.layer_stack()

    def ring() -> list[float]:
        t0 = time.perf_counter()
        rids = [runner.submit(ids, keep_logits="last_segment") for ids in requests]
        done: dict[int, float] = {}
        while runner.pending:
            for rid in runner.step():
                done[rid] = clock(t0)
        return [done[r] for r in rids]

    def back_to_back() -> list[float]:
        t0, ends = time.perf_counter(), []
        for ids in requests:
            ex(ids, keep_logits="last_segment")
            ends.append(clock(t0))
        return ends

    longest = max(ids.shape[1] for ids in requests)
    padded = torch.stack([torch.nn.functional.pad(ids[0], (0, longest - ids.shape[1])) for ids in requests])
    mask = torch.stack([torch.arange(longest, device=dev) < ids.shape[1] for ids in requests]).long()

    def batched() -> list[float]:
        t0 = time.perf_counter()
        model(padded, attention_mask=mask, keep_logits="last_segment")
        return [clock(t0)] * len(requests)

    total_segments = sum(math.ceil(ids.shape[1] / n) for ids in requests)
    even = even_load_run(model, ideal_ex, 1, total_segments)

    def ideal() -> list[float]:
        t0 = time.perf_counter()
        even()
        return [clock(t0)] * len(requests)
    runs = {"ring": ring, "back_to_back": back_to_back, "batched": batched, "ideal": ideal}
    return {m: runs[m] for m in modes}


def run_queue_bench(model: ARMT, requests: Sequence[torch.Tensor], modes: Sequence[str] = QUEUE_MODES,
                    warmup: int = 1, repeats: int = 3, preset: str = "custom") -> list[dict]:
    """Serve one queue of requests ([1, N_i] or [N_i] each) in every mode, interleaved like run_bench;
    one row per mode: total seconds (median, min, max), tokens/s, each request's median
    latency (time to finish) in ms, the steps the mode takes and the even-load steps."""
    modes = check_modes(modes, QUEUE_MODES, "queue modes")
    check_int("warmup", warmup, 0)
    check_int("repeats", repeats, 1)
    requests = queue_rows(requests)
    fns = queue_runners(model, requests, modes)
    names = list(fns)
    with torch.no_grad():
        ends: dict[str, list[list[float]]] = interleaved(fns, warmup, repeats, lambda fn: fn())
    L, n = model.num_layers, model.config.segment_size
    machine = flops.machine(model.device)   # the allocator setting included
    S = [math.ceil(ids.shape[1] / n) for ids in requests]
    steps = {"ring": sum(S) + L - 1, "back_to_back": sum(s + L - 1 for s in S), "batched": max(S) * L,
             "ideal": sum(S)}
    tokens = sum(ids.shape[1] for ids in requests)
    rows = []
    for mode in names:
        totals = [max(e) for e in ends[mode]]
        median = statistics.median(totals)
        rows.append(dict(mode=mode, dtype=str(model.dtype).removeprefix("torch."), device=str(model.device),
                         preset=preset, layers=L, requests=len(requests), request_segments=S, segments=sum(S),
                         tokens=tokens, seconds=median, seconds_min=min(totals), seconds_max=max(totals),
                         tokens_per_s=tokens / median,
                         latency_ms=[statistics.median(e[i] for e in ends[mode]) * 1e3 for i in range(len(S))],
                         steps=steps[mode], even_load_steps=sum(S), segment_size=n,
                         num_mem_tokens=model.config.num_mem_tokens, repeats=repeats,
                         threads=torch.get_num_threads(), hidden=model.hidden_size, machine=machine))
    return rows


def queue_table(rows: list[dict]) -> str:
    """Queue rows as text: total ms, tokens/s, mean and worst latency, steps, time over ring."""
    ring = next((r for r in rows if r["mode"] == "ring"), None)
    body = [[r["mode"], f"{r['seconds'] * 1e3:.1f}", f"{r['tokens_per_s']:.0f}",
             f"{statistics.mean(r['latency_ms']):.1f}", f"{max(r['latency_ms']):.1f}", str(r["steps"]),
             "-" if ring is None else f"{r['seconds'] / ring['seconds']:.2f}x"] for r in rows]
    r0 = rows[0]
    notes = [f"{r0['requests']} requests, segments {r0['request_segments']} (sum {r0['segments']}), "
             f"{r0['tokens']} tokens; even load takes {r0['even_load_steps']} steps",
             "x / ring: a mode's total time over the ring's; latency: time until a request's last logits"]
    return format_table(["mode", "total ms", "tokens/s", "mean latency ms", "worst ms", "steps", "x / ring"],
                        body, notes)


# ---- reading the rows ---------------------------------------------------------------
def by_point(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """(dtype, device, preset, segments, tokens, batch, hidden) -> mode -> row, in first-seen
    order (rows of files written before the width sweep have hidden None)."""
    points: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        key = (r["dtype"], r["device"], r["preset"], r["segments"], r["tokens"], r.get("batch"), r.get("hidden"))
        points.setdefault(key, {})[r["mode"]] = r
    return points


def speedups(by_mode: dict[str, dict]) -> dict[str, float]:
    """The ratios of one point: diagonal's speed-up over each baseline, its time over ideal,
    and, with the schedule mode, the two factors of that: diagonal / schedule and schedule / ideal."""
    secs = {m: r["seconds"] for m, r in by_mode.items()}
    out = {}
    if "diagonal" in secs:
        out = {f"{m}/diagonal": secs[m] / secs["diagonal"] for m in ("sequential", "sequential_grouped", "full")
               if m in secs}
        out.update({f"diagonal/{m}": secs["diagonal"] / secs[m] for m in ("ideal", "schedule") if m in secs})
    if "schedule" in secs and "ideal" in secs:   # diagonal / ideal = diagonal / schedule x schedule / ideal
        out["schedule/ideal"] = secs["schedule"] / secs["ideal"]
    return out


_PEAK_SOURCES = {"cuda": "CUDA allocations", "cpu": "process RSS growth"}


def table(rows: list[dict]) -> str:
    """The rows as text under 100 columns: a line per point and mode with its median ms,
    peak MiB and speed-up (the mode's time over diagonal's), then a legend line."""
    body = []
    sweeps = [name for name, i in (("B", 5), ("d", 6)) if len({key[i] for key in by_point(rows)}) > 1]
    for (dtype, _, _, S, N, B, d), by_mode in by_point(rows).items():
        diag = by_mode.get("diagonal")
        swept = [str(v) for name, v in (("B", B), ("d", d)) if name in sweeps]
        for mode in (m for m in ALL_MODES if m in by_mode):
            r = by_mode[mode]
            peak = "-" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**20:.1f}"
            ratio = "-" if diag is None else f"{r['seconds'] / diag['seconds']:.2f}x"
            rate = (f"{r['gflops']:.1f}", f"{r['pct_of_peak']:.0f}") if "gflops" in r else ("-", "-")
            body.append([dtype, *swept, str(S), str(N), mode, f"{r['seconds'] * 1e3:.1f}", peak, ratio, *rate])
    sources = dict.fromkeys(_PEAK_SOURCES.get(torch.device(r["device"]).type, "none") for r in rows)
    notes = [f"a speed-up is x / diagonal; MiB is peak memory measured as {' or '.join(sources)}"]
    for (dtype, _, _, S, _, B, d), by_mode in by_point(rows).items():   # the schedule mode's split, per point
        ratio = speedups(by_mode)
        if "schedule/ideal" in ratio and "diagonal/ideal" in ratio:
            where = ", ".join([dtype, f"S = {S}", *([f"B = {B}"] if "B" in sweeps else []),
                               *([f"d = {d}"] if "d" in sweeps else [])])
            notes.append(f"{where}: diagonal/ideal {ratio['diagonal/ideal']:.3f} = diagonal/schedule "
                         f"{ratio['diagonal/schedule']:.3f} (executor) x schedule/ideal {ratio['schedule/ideal']:.3f} "
                         "(ramps)")
    peaks: dict[str, dict[str, list[float]]] = {}   # how the peak was timed -> dtype -> the rows' peaks
    for r in rows:
        if "peak_gflops" in r:   # rows from before PEAK_KEYS put the modes against the run's start-of-run peak
            how = "timed in each point's own rounds" if "peak_gflops_at_start" in r else "measured in the same run"
            peaks.setdefault(how, {}).setdefault(r["dtype"], []).append(r["peak_gflops"])
    if peaks:
        spans = "; ".join(how + " (" + ", ".join(f"{dt} {min(p):.0f}" + (f"-{max(p):.0f}" if max(p) > min(p) else "")
                                                   for dt, p in by_dtype.items()) + " GFLOP/s)"
                          for how, by_dtype in peaks.items())
        m = next(r["machine"] for r in rows if "machine" in r)
        notes += [f"% peak: GFLOP/s over torch.mm's, {spans}",
                  f"on {m['cpu'][:48]} ({m['cpu_capability']}, {m['threads']} threads, torch {m['torch']})"]
    return format_table(["dtype", *sweeps, "S", "tokens", "mode", "median ms", "peak MiB", "speed-up", "GFLOP/s",
                         "% peak"], body, notes)


def write_rows(rows: list[dict], json_path: str | None = None, csv_path: str | None = None) -> None:
    """Save rows as a JSON list and/or a CSV with one column per key (ROW_KEYS for the
    single-input modes)."""
    if json_path:
        write_json(json_path, rows)
    if csv_path:
        Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else list(ROW_KEYS))
            writer.writeheader()
            writer.writerows(rows)


def read_rows(paths: list[str]) -> list[dict]:
    """Rows from JSON files written by write_rows (e.g. one run per length), ordered by
    dtype (first seen), tokens and mode, so they print and plot as one run. Queue rows
    (--queue, is_queue) keep the files' order: each queue's modes together."""
    rows = [r for path in paths for r in json.loads(Path(path).read_text())]
    for r in rows:
        if "mem_tokens" in r:   # files written before the rows took ARMTConfig's name
            r["num_mem_tokens"] = r.pop("mem_tokens")
    queue = is_queue(rows)
    if queue and not all("requests" in r for r in rows):
        raise ValueError(f"queue rows (--queue) and single-input rows cannot be joined in one table: {paths}")
    missing = [k for r in rows for k in (QUEUE_ROW_KEYS if queue else ROW_KEYS) if k not in r]
    if missing:
        raise ValueError(f"not a diaglab.bench JSON (row lacks {missing[0]!r}): {paths}")
    if queue:
        return rows
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    return sorted(rows, key=lambda r: (dtypes.index(r["dtype"]), r["tokens"], ALL_MODES.index(r["mode"])))


# ---- command line ---------------------------------------------------------------------
MAX_SEED = 2**63 - 1   # torch.Generator.manual_seed takes < 2**64, and inputs are seeded seed + point index


def _twice(values: Sequence) -> object | None:
    """The first value that comes again, or None."""
    return next((v for i, v in enumerate(values) if v in values[:i]), None)


def _int_list(low: int, high: int = MAX_COUNT, unique: bool = True) -> Callable[[str], list[int]]:
    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            values = []
        if not values or min(values) < low:
            raise argparse.ArgumentTypeError(f"expected a comma list of integers >= {low} like 1,4,16; got {text!r}")
        if max(values) > high:
            raise argparse.ArgumentTypeError(f"expected a comma list of integers from {low} to {high}; got {text!r}")
        if unique and _twice(values) is not None:
            raise argparse.ArgumentTypeError(f"{_twice(values)} comes twice in {text!r}: give each value once")
        return values
    return parse


def _int(low: int, high: int = MAX_COUNT) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}; got {text!r}")
        if value > high:
            raise argparse.ArgumentTypeError(f"expected an integer from {low} to {high}; got {text!r}")
        return value
    return parse


def _names(allowed: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(v for v in text.split(",") if v)
        bad = [v for v in names if v not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)}; got {text!r}")
        if _twice(names) is not None:
            raise argparse.ArgumentTypeError(f"{_twice(names)} comes twice in {text!r}: give each name once")
        return names
    return parse


def add_output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", help="write the rows as a JSON list (saved again after every point)")
    p.add_argument("--csv", metavar="PATH", help="write the rows as CSV (saved again after every point)")
    p.add_argument("--html", metavar="PATH", help="write viz.bench_figure as a standalone HTML page (needs plotly)")


def unwritable(path: str) -> str | None:
    """Why a file cannot be written at path (it is a directory, its directory cannot be
    created, no permission), or None. Creates the missing directories; leaves no file."""
    if not str(path).strip():
        return "an empty path: give a file path"
    target = Path(path)
    if target.is_dir():
        return f"{path} is a directory: give a file path inside it"
    existed = target.exists()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "a"):
            pass
    except OSError as err:
        return f"cannot write {path} ({err.strerror or err}): choose a writable location"
    if not existed:
        target.unlink()
    return None


def check_outputs(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject unwritable --json/--csv/--html paths, two of them naming one file, and --html
    without plotly, before any work (a failure after minutes of measuring would lose them)."""
    seen: dict[Path, str] = {}
    for flag in ("json", "csv", "html"):   # (a script's parser may have only some of these flags)
        path = getattr(args, flag, None)
        if path is None:
            continue
        if Path(path).resolve() in seen:
            p.error(f"--{seen[Path(path).resolve()]} and --{flag} name the same file {path}: give each its own path")
        seen[Path(path).resolve()] = flag
    for flag in ("json", "csv", "html"):
        path = getattr(args, flag, None)
        problem = None if path is None else unwritable(path)
        if problem:
            p.error(f"--{flag}: {problem}")
    if getattr(args, "html", None):
        try:
            import plotly  # noqa: F401
        except ImportError:
                p.error("--html needs plotly, which is not installed here: pip install plotly, or drop --html "
                    "(JSON and CSV need only torch)")


def write_outputs(rows: list[dict], args: argparse.Namespace) -> None:
    """Write the files the output flags ask for, then print the table."""
    write_rows(rows, args.json, args.csv)
    queue = is_queue(rows)   # from the rows: scripts/merge_reports.py has no --queue
    if args.html:
        from . import viz   # plotly only here: measuring needs torch alone
        (viz.queue_figure if queue else viz.bench_figure)(rows).write_html(args.html, include_plotlyjs=True)
    print(queue_table(rows) if queue else table(rows))


def width_overrides(preset: str, width: int | None) -> dict:
    """Preset overrides for model width `width` (None: the preset's own), the MLP keeping the
    preset's intermediate / hidden ratio (rounded to a multiple of 8)."""
    if width is None:
        return {}
    base = PRESETS[preset]
    return {"hidden": width, "intermediate": max(8, round(base["intermediate"] / base["hidden"] * width / 8) * 8)}


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="python -m diaglab.bench", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                   help="model size, random weights (default tiny: 8 layers, width 128, segments of 32)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--segments", type=_int_list(1),
                      help="comma list of segment counts S, N = S * n tokens each (default 1,2,4,8,16,32,64)")
    size.add_argument("--lengths", type=_int_list(1), help="comma list of token counts N (S = ceil(N / n))")
    p.add_argument("--modes", type=_names(ALL_MODES),
                   help=f"comma list from {','.join(ALL_MODES)} (default {','.join(MODES)}; diagonal_compiled "
                        "compiles the full-group step first, tens of seconds on a CPU; schedule is the bare "
                        "diagonal schedule, which splits diagonal / ideal into the executor's work and the ramps')")
    p.add_argument("--dtype", type=_names(DTYPES), default=("float32",),
                   help=f"comma list of model dtypes from {','.join(DTYPES)}, measured one after the other "
                        "(default float32)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where to run (default auto: cuda when available)")
    p.add_argument("--batch", type=_int_list(1),
                   help="sequences per input B; a comma list sweeps it (e.g. 1,2,4,8: latency and throughput of "
                        "batching against the diagonal order) (default 1)")
    p.add_argument("--widths", type=_int_list(1), metavar="D,...",
                   help="sweep the model width d (e.g. 64,128,256,512,1024; the MLP keeps the preset's ratio): "
                        "where the diagonal order stops paying on this machine")
    p.add_argument("--warmup", type=_int(0), default=1, help="untimed rounds over all modes first (default 1)")
    p.add_argument("--repeats", type=_int(1), default=3, help="timed rounds; the median is reported (default 3)")
    p.add_argument("--threads", type=_int(1, MAX_THREADS), help="torch CPU threads (default: torch's choice)")
    p.add_argument("--default-malloc", dest="keep_heap", action="store_false",
                   help="measure with glibc's default allocator behaviour, which returns freed blocks to the OS "
                        "(by default the bench keeps them: diaglab.heap.keep_freed_memory, recorded in each row)")
    p.add_argument("--full-max-tokens", type=_int(1), metavar="N",
                   help="skip full attention above N tokens: it is O(N^2) (default: never skip)")
    p.add_argument("--layers", type=_int(1), help="override the preset's layer count")
    p.add_argument("--heads", type=_int(1), help="override the preset's attention heads (must divide its width)")
    p.add_argument("--kv-heads", type=_int(1), help="override the preset's key/value heads (must divide the heads)")
    p.add_argument("--queue", type=_int(1), metavar="R",
                   help="instead of single inputs: serve a seeded queue of R requests through the ring, back to "
                        "back (diagonal, one request after another), batched (sequential, padded to the longest) "
                        "and the even-load ideal; reports total time, tokens/s and each request's latency")
    p.add_argument("--queue-segments", type=_int_list(1, unique=False), metavar="LOW,HIGH",
                   help="segments per queued request, drawn uniformly from LOW..HIGH (default 2,8)")
    p.add_argument("--seed", type=_int(0, MAX_SEED), default=0, help="seed of the inputs and of the queue (default 0)")
    add_output_flags(p)
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar; one line per point on stderr instead")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, every value checked before any work: a bad one exits with code 2 and one line."""
    p = build_parser()
    args = p.parse_args(argv)
    # flags that only one kind of run reads default to None, so a flag the run would ignore is refused
    if args.queue is None and args.queue_segments is not None:
        p.error("--queue-segments shapes the requests of --queue R: add --queue, or drop --queue-segments")
    if args.queue is not None:
        ignored = [flag for flag in ("segments", "lengths", "modes", "batch", "full_max_tokens", "widths")
                   if getattr(args, flag) is not None]
        if len(args.dtype) > 1:
            p.error(f"--queue measures one queue in one dtype, got --dtype {','.join(args.dtype)}: run once per dtype")
        if ignored:
            p.error(f"--queue measures one queue of requests in its own modes ({','.join(QUEUE_MODES)}): drop "
                    + ", ".join("--" + flag.replace("_", "-") for flag in ignored))
        args.queue_segments = args.queue_segments or [2, 8]
        if len(args.queue_segments) != 2 or args.queue_segments[0] > args.queue_segments[1]:
            p.error(f"--queue-segments: expected LOW,HIGH with LOW <= HIGH, got {args.queue_segments}")
    if args.segments is None and args.lengths is None:
        args.segments = [1, 2, 4, 8, 16, 32, 64]
    args.modes = args.modes or MODES
    args.batch = args.batch or [1]
    args.overrides = {k: v for k in ("layers", "heads", "kv_heads") if (v := getattr(args, k)) is not None}
    for width in args.widths or [None]:
        shape = {k: v for k, v in {**PRESETS[args.preset], **args.overrides, **width_overrides(args.preset, width)}
                 .items() if k not in ("segment_size", "num_mem_tokens", "d_mem")}   # those belong to ARMTConfig
        try:
            llama_config(**shape)
        except ValueError as err:
            flags = "--widths" if width is not None else "--heads/--kv-heads"
            p.error(f"{flags}: {err} (preset {args.preset!r} at width {shape['hidden']})")
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        check_device(args.device)
    except ValueError as err:
        p.error(f"--device: {err}")
    check_outputs(p, args)
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_heap:
        heap.keep_freed_memory()
    from tqdm.auto import tqdm
    log = (lambda msg: tqdm.write(msg, file=sys.stderr)) if args.progress else (lambda msg: print(msg, file=sys.stderr))
    rows: list[dict] = []

    def on_point(point: list[dict]) -> None:
        rows.extend(point)
        write_rows(rows, args.json, args.csv)
        r = point[0]
        log(f"{r['dtype']} S={r['segments']} N={r['tokens']}: "
            + ", ".join(f"{p['mode']} {p['seconds'] * 1e3:.1f} ms" for p in point))

    for dtype in args.dtype:
        for width in args.widths or [None]:
            model = live_preset(args.preset, getattr(torch, dtype), args.device,
                                **args.overrides, **width_overrides(args.preset, width))
            if args.queue is not None:
                requests = queue_requests(model, args.queue, tuple(args.queue_segments), args.seed)
                rows += run_queue_bench(model, requests, QUEUE_MODES, args.warmup, args.repeats, args.preset)
                write_rows(rows, args.json, args.csv)
                continue
            for batch in args.batch:
                run_bench(model, make_inputs(model, args.segments, args.lengths, batch, args.seed), args.modes,
                          args.warmup, args.repeats, args.full_max_tokens, args.preset, on_point, args.progress)
            del model   # free these weights before building the next
    write_outputs(rows, args)
    return rows


if __name__ == "__main__":
    main()
