"""Latency and peak memory of one ARMT forward pass in each execution order, against
full attention over the whole sequence (the measurements of SPEC §7).

Modes, all inference under torch.no_grad on one model and one input:
  full                the base LlamaForCausalLM on all N tokens at once (SDPA, no KV cache,
                      logits_to_keep=1, so it is not charged for an (N, V) logits tensor)
  sequential          the reference ARMT, model(...): S * L HF decoder-layer calls
  sequential_grouped  DiagonalExecutor(order="sequential"): the same order through the
                      grouped kernels — the fair baseline for the schedule's own gain
  diagonal            DiagonalExecutor: L + S - 1 grouped steps
  ideal               the paper's ideal even load: one grouped step of G = L layers on the
                      real shapes, timed, times S (schedule.ideal_even_load)
ARMT modes keep only the last segment's logits (keep_logits="last_segment").

Modes run interleaved — every repeat visits each mode once, starting from a different
mode each round — so load from other processes hits all of them alike and the ratios
stay fair on a noisy machine. Latency is the median over repeats, with min and max.
Peak memory comes from one more call per mode after the timed ones (profiling.PeakMemory:
CUDA allocations, or resident-set growth on CPU).

    python -m diaglab.bench --preset tiny --segments 1,2,4,8,16,32,64,128 \
        --dtype float32,bfloat16 --json data/bench/cpu_tiny.json
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import schedule
from .armt import ARMT, randomize_memory_
from .diagonal import DiagonalExecutor
from .presets import PRESETS, from_preset
from .profiling import PeakMemory, Timer

if TYPE_CHECKING:
    import plotly.graph_objects as go

MODES = ("full", "sequential", "sequential_grouped", "diagonal", "ideal")
ROW_KEYS = ("mode", "dtype", "device", "preset", "layers", "segments", "tokens", "seconds", "seconds_min",
            "seconds_max", "tokens_per_s", "peak_mem_bytes", "batch", "segment_size", "mem_tokens",
            "repeats", "threads")
MODE_COLOURS = {"full": "#000000", "sequential": "#E69F00", "sequential_grouped": "#56B4E9",
                "diagonal": "#0072B2", "ideal": "#009E73"}  # Okabe-Ito


# ---- the model and input every benchmark uses --------------------------------------------
def live_preset(preset: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                seed: int = 0, **overrides) -> ARMT:
    """The named preset (random weights) with its memory path switched on (randomize_memory_:
    with the paper's W_mv = 0 the read and write would be skipped work), in eval mode."""
    return randomize_memory_(from_preset(preset, seed=seed, dtype=dtype, device=device, **overrides)).eval()


def random_tokens(model: ARMT, tokens: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    """(batch, tokens) random ids from the model's vocabulary, seeded, on the model's device."""
    return torch.randint(0, model.base.config.vocab_size, (batch, tokens),
                         generator=torch.Generator().manual_seed(seed)).to(model.device)


# ---- what each mode runs --------------------------------------------------------------
def full_group_step(model: ARMT, executor: DiagonalExecutor, batch: int) -> Callable[[], object]:
    """One grouped step with all L layers busy (every layer past its first segment, so the
    associative read runs too) on the shapes of a full segment: the ideal-even-load unit."""
    L, n, M = model.num_layers, model.config.segment_size, model.config.num_mem_tokens
    d, dev = model.hidden_size, model.device
    layers, step = executor.layer_stack()
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(L, batch, n + M, d, generator=gen).to(dev, model.dtype)         # (G, B, T, d)
    cos, sin = model.base.model.rotary_emb(X, torch.arange(n + M, device=dev)[None])  # (1, T, hd)
    state = model.empty_state(batch)
    not_first = torch.zeros_like(state.is_first)                                    # (L, B)
    return lambda: step(X, layers=layers, lo=0, hi=L - 1, n_text=n, cos=cos, sin=sin, mask=None,
                        W_mem=state.W_mem, z=state.z, is_first=not_first)


def executors(model: ARMT) -> dict[str, DiagonalExecutor]:
    """The diagonal and the grouped-sequential executor on the same model, weights stacked
    up front (both share one set of stacks: grouped.TiedStacks adopts existing ones)."""
    execs = {"diagonal": DiagonalExecutor(model),
             "sequential_grouped": DiagonalExecutor(model, order="sequential")}
    with torch.no_grad():
        for ex in execs.values():
            ex.stacked_weights()
    return execs


def mode_runners(model: ARMT, input_ids: torch.Tensor, modes: tuple[str, ...],
                 execs: dict[str, DiagonalExecutor] | None = None) -> dict[str, Callable[[], object]]:
    """One zero-argument callable per mode, all on the same weights and input_ids (B, N);
    execs from executors(model), built here if not given. The 'ideal' callable is ONE
    full-group step; run_bench scales its time by S."""
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    execs = execs or executors(model)
    runs = {
        "full": lambda: model.base(input_ids=input_ids, use_cache=False, logits_to_keep=1),
        "sequential": lambda: model(input_ids, keep_logits="last_segment"),
        "sequential_grouped": lambda: execs["sequential_grouped"](input_ids, keep_logits="last_segment"),
        "diagonal": lambda: execs["diagonal"](input_ids, keep_logits="last_segment"),
    }
    return {mode: full_group_step(model, execs["diagonal"], input_ids.shape[0]) if mode == "ideal"
            else runs[mode] for mode in modes}


def measure(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int,
            repeats: int) -> dict[str, tuple[list[float], int | None]]:
    """Interleaved timing: each round runs every mode once, the start rotating by round.
    Then one more call per mode under PeakMemory, apart from the timed calls because
    measuring memory on CPU returns the free heap to the OS, which slows the next call.
    Returns mode -> (seconds of each timed repeat, peak bytes)."""
    names = list(fns)
    times: dict[str, list[float]] = {m: [] for m in names}
    for r in range(warmup + repeats):
        k = r % len(names)
        for mode in names[k:] + names[:k]:
            with Timer(device) as t:
                fns[mode]()
            if r >= warmup:
                times[mode].append(t.seconds)
    peaks = {}
    for mode in names:
        with PeakMemory(device) as pm:
            fns[mode]()
        peaks[mode] = pm.bytes
    return {m: (times[m], peaks[m]) for m in names}


# ---- the benchmark ------------------------------------------------------------------
def _points(segment_size: int, segments: list[int] | None, lengths: list[int] | None) -> list[tuple[int, int]]:
    """(S, N) per point: S segments of n tokens, or N tokens cut into ceil(N / n) segments."""
    if segments is not None:
        return [(S, S * segment_size) for S in segments]
    return [(math.ceil(N / segment_size), N) for N in lengths]


def check_device(device: str | torch.device) -> torch.device:
    """torch.device(device), or a ValueError that says how to get CUDA when it is missing."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        build = "a CPU build of torch" if torch.version.cuda is None else "no visible GPU"
        raise ValueError(f"device {str(dev)!r} asked for, but CUDA is not available here ({build}, torch "
                         f"{torch.__version__}): use device 'cpu' (or 'auto'), or install a CUDA build of torch "
                         "(README: GPU users)")
    return dev


def run_bench(preset: str = "tiny", segments: list[int] | None = None, lengths: list[int] | None = None,
              dtypes: tuple[str, ...] = ("float32",), device: str = "cpu", modes: tuple[str, ...] = MODES,
              warmup: int = 1, repeats: int = 3, batch: int = 1, full_max_tokens: int | None = None,
              seed: int = 0, log: Callable[[str], None] | None = None,
              on_rows: Callable[[list[dict]], None] | None = None, progress: bool = False,
              **overrides) -> list[dict]:
    """Measure every mode at every point and dtype; returns one row (ROW_KEYS) per
    (dtype, point, mode). overrides change preset fields (e.g. layers=4 for a quick test).
    full_max_tokens skips full attention above that many tokens (it is O(N^2)).
    log(message) is called after each point with a one-line summary, on_rows(rows so far)
    too (main saves them then, so a run stopped part-way keeps its finished points).
    progress: a tqdm.auto bar over the points (a widget in a notebook), the last point's
    speed-up of diagonal over sequential as its postfix."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got {warmup} and {repeats}")
    if (segments is None) == (lengths is None):
        raise ValueError("give exactly one of segments or lengths")
    dev = check_device(device)
    from tqdm.auto import tqdm
    bar = tqdm(total=len(dtypes) * len(segments or lengths), unit="point", desc=f"bench {preset}",
               disable=not progress)
    rows = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        model = live_preset(preset, dtype, dev, seed, **overrides)
        execs = executors(model)
        L, n = model.num_layers, model.config.segment_size
        gen = torch.Generator().manual_seed(seed)
        for S, N in _points(n, segments, lengths):
            ids = torch.randint(0, model.base.config.vocab_size, (batch, N), generator=gen).to(dev)  # (B, N)
            point_modes = tuple(m for m in modes if m != "full" or full_max_tokens is None or N <= full_max_tokens)
            with torch.no_grad():
                result = measure(mode_runners(model, ids, point_modes, execs), dev, warmup, repeats)
            for mode, (secs, peak) in result.items():
                if mode == "ideal":
                    secs = [schedule.ideal_even_load(s, L, S) for s in secs]
                median = statistics.median(secs)
                rows.append(dict(mode=mode, dtype=dtype_name, device=str(dev), preset=preset, layers=L,
                                 segments=S, tokens=N, seconds=median, seconds_min=min(secs),
                                 seconds_max=max(secs), tokens_per_s=batch * N / median,
                                 peak_mem_bytes=peak, batch=batch, segment_size=n,
                                 mem_tokens=model.config.num_mem_tokens, repeats=repeats,
                                 threads=torch.get_num_threads()))
            if log is not None:
                log(f"{dtype_name} S={S} N={N}: " + ", ".join(
                    f"{r['mode']} {r['seconds'] * 1e3:.1f} ms" for r in rows[-len(result):]))
            if on_rows is not None:
                on_rows(rows)
            ratio = speedups({r["mode"]: r for r in rows[-len(result):]}).get("sequential/diagonal")
            bar.set_postfix_str(f"{dtype_name} N={N}" + (f": sequential/diagonal {ratio:.2f}x" if ratio else ""))
            bar.update(1)
        del model, execs  # free this dtype's weights before building the next
    bar.close()
    return rows


# ---- reporting ----------------------------------------------------------------------
def _by_point(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """(dtype, device, preset, segments, tokens) -> mode -> row, in first-seen order."""
    points: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        points.setdefault((r["dtype"], r["device"], r["preset"], r["segments"], r["tokens"]), {})[r["mode"]] = r
    return points


def speedups(by_mode: dict[str, dict]) -> dict[str, float]:
    """The ratios of one point: diagonal's speed-up over each baseline, and its time over ideal."""
    if "diagonal" not in by_mode:
        return {}
    diag = by_mode["diagonal"]["seconds"]
    out = {f"{m}/diagonal": by_mode[m]["seconds"] / diag
           for m in ("sequential", "sequential_grouped", "full") if m in by_mode}
    if "ideal" in by_mode:
        out["diagonal/ideal"] = diag / by_mode["ideal"]["seconds"]
    return out


def format_table(rows: list[dict]) -> str:
    """A plain-text table: ms per mode (median), peak MiB, then the speed-ups."""
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    ratio_names = sorted({k for by_mode in _by_point(rows).values() for k in speedups(by_mode)},
                         key=["sequential/diagonal", "sequential_grouped/diagonal", "full/diagonal",
                              "diagonal/ideal"].index)
    head = ["dtype", "S", "tokens"] + [f"{m} ms" for m in modes] + [f"{m} MiB" for m in modes if m != "ideal"]
    head += ratio_names
    lines = []
    for (dtype, _, _, S, N), by_mode in _by_point(rows).items():
        cells = [dtype, str(S), str(N)]
        cells += [f"{by_mode[m]['seconds'] * 1e3:.1f}" if m in by_mode else "-" for m in modes]
        cells += [f"{by_mode[m]['peak_mem_bytes'] / 2**20:.1f}"
                  if m in by_mode and by_mode[m]["peak_mem_bytes"] is not None else "-"
                  for m in modes if m != "ideal"]
        ratios = speedups(by_mode)
        cells += [f"{ratios[k]:.2f}x" if k in ratios else "-" for k in ratio_names]
        lines.append(cells)
    widths = [max(len(c) for c in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*head)] + [fmt.format(*cells) for cells in lines])


def bench_figure(rows: list[dict]) -> go.Figure:
    """Latency vs tokens per mode (log-log; one line per mode and dtype) and diagonal's
    speed-up over sequential, sequential_grouped and full attention."""
    import plotly.graph_objects as go  # only here: the measurements themselves need torch alone
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("latency", "diagonal speed-up (x, > 1 = faster)"))
    dashes = {}
    for r in rows:
        dashes.setdefault(r["dtype"], ("solid", "dash", "dot", "dashdot")[len(dashes) % 4])
    for dtype, dash in dashes.items():
        for mode in MODES:
            pts = sorted((r["tokens"], r["seconds"], r["seconds_min"], r["seconds_max"])
                         for r in rows if r["mode"] == mode and r["dtype"] == dtype)
            if not pts:
                continue
            x, y, lo, hi = zip(*pts)
            fig.add_trace(go.Scatter(x=x, y=y, name=f"{mode} ({dtype})", mode="lines+markers",
                                     line=dict(color=MODE_COLOURS[mode], dash=dash), legendgroup=mode,
                                     error_y=dict(type="data", symmetric=False,
                                                  array=[h - m for h, m in zip(hi, y)],
                                                  arrayminus=[m - l for m, l in zip(y, lo)]),
                                     hovertemplate="%{x} tokens: %{y:.4f} s<extra>" + mode + "</extra>"),
                          row=1, col=1)
        points = [(key, speedups(by_mode)) for key, by_mode in _by_point(rows).items() if key[0] == dtype]
        for base in ("sequential", "sequential_grouped", "full"):
            pts = sorted((key[4], ratios[f"{base}/diagonal"]) for key, ratios in points
                         if f"{base}/diagonal" in ratios)
            if pts:
                x, y = zip(*pts)
                fig.add_trace(go.Scatter(x=x, y=y, name=f"vs {base} ({dtype})", mode="lines+markers",
                                         line=dict(color=MODE_COLOURS[base], dash=dash), legendgroup=base,
                                         hovertemplate="%{x} tokens: %{y:.2f}x<extra>vs " + base + "</extra>"),
                              row=1, col=2)
    fig.add_hline(y=1, line=dict(color="grey", width=1), row=1, col=2)
    fig.update_xaxes(type="log", title_text="tokens N")
    fig.update_yaxes(type="log", title_text="seconds (median, min-max bars)", row=1, col=1)
    fig.update_yaxes(title_text="speed-up", row=1, col=2)
    fig.update_layout(template="plotly_white", title="ARMT execution orders vs full attention")
    return fig


def write_rows(rows: list[dict], json_path: str | None = None, csv_path: str | None = None) -> None:
    """Save rows as a JSON list and/or a CSV with ROW_KEYS columns."""
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(rows, indent=1) + "\n")
    if csv_path:
        Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=ROW_KEYS)
            writer.writeheader()
            writer.writerows(rows)


def read_rows(paths: list[str]) -> list[dict]:
    """Rows from JSON files written by write_rows (e.g. one run per length), ordered by
    dtype (first seen), tokens and mode, so they print and plot as one run."""
    rows = [r for path in paths for r in json.loads(Path(path).read_text())]
    missing = [k for r in rows for k in ROW_KEYS if k not in r]
    if missing:
        raise ValueError(f"not a diaglab.bench JSON (row lacks {missing[0]!r}): {paths}")
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    return sorted(rows, key=lambda r: (dtypes.index(r["dtype"]), r["tokens"], MODES.index(r["mode"])))


# ---- command line ---------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _names(allowed: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(v for v in text.split(",") if v)
        bad = [v for v in names if v not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)}; got {text!r}")
        return names
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m diaglab.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    size = p.add_mutually_exclusive_group()
    size.add_argument("--segments", type=_ints, help="comma list of segment counts S (default 1,2,...,64)")
    size.add_argument("--lengths", type=_ints, help="comma list of token counts N (S = ceil(N / n))")
    p.add_argument("--modes", type=_names(MODES), default=MODES, help=f"comma list from {','.join(MODES)}")
    p.add_argument("--dtype", type=_names(("float32", "bfloat16", "float16")), default=("float32",),
                   help="comma list of model dtypes (default float32)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--full-max-tokens", type=int, help="skip full attention above this many tokens")
    p.add_argument("--layers", type=int, help="override the preset's layer count")
    p.add_argument("--json", help="write rows as a JSON list")
    p.add_argument("--csv", help="write rows as CSV")
    p.add_argument("--html", help="write a plotly chart")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.add_argument("--report", type=lambda t: [v for v in t.split(",") if v],
                   help="measure nothing: read these comma-separated JSON files of earlier runs, print "
                        "their table and write --json/--csv/--html from them")
    args = p.parse_args(argv)
    if args.segments is None and args.lengths is None:
        args.segments = [1, 2, 4, 8, 16, 32, 64]
    return args


def _report(rows: list[dict], args: argparse.Namespace) -> list[dict]:
    """Write the files asked for and print the table."""
    write_rows(rows, args.json, args.csv)
    if args.html:
        Path(args.html).parent.mkdir(parents=True, exist_ok=True)
        bench_figure(rows).write_html(args.html, include_plotlyjs=True)
    print(format_table(rows))
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.html:
        try:
            import plotly  # noqa: F401  (fail before minutes of measuring, not after)
        except ImportError:
            raise SystemExit("--html needs plotly, which is not installed here: pip install plotly, "
                             "or drop --html (JSON and CSV need only torch)") from None
    if args.report:
        missing = [path for path in args.report if not Path(path).is_file()]
        if missing:
            raise SystemExit(f"--report: no such file {', '.join(missing)} (give the JSON files a run wrote with --json)")
        return _report(read_rows(args.report), args)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        check_device(device)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {"layers": args.layers} if args.layers else {}
    from tqdm.auto import tqdm
    rows = run_bench(args.preset, args.segments, args.lengths, args.dtype, device, args.modes, args.warmup,
                     args.repeats, args.batch, args.full_max_tokens,
                     log=lambda msg: tqdm.write(msg, file=sys.stderr) if args.progress else print(msg, file=sys.stderr),
                     on_rows=lambda so_far: write_rows(so_far, args.json, args.csv), progress=args.progress,
                     **overrides)
    return _report(rows, args)


if __name__ == "__main__":
    main()
