"""The non-benchmark half of the GPU run (scripts/gpu_bench.sh calls it): exactness of the
diagonal executor on the real shapes, per-step records of one long diagonal run, and a
torch.profiler table. Needs torch and transformers only (a bare GPU image has no plotly).

    python scripts/gpu_checks.py OUT_DIR [--preset llama_1b] [--device cuda] [--steps-tokens 131072]

Writes OUT_DIR/gpu_exact.json (with, on CUDA, the CUDA-graph check), OUT_DIR/gpu_steps.json, OUT_DIR/gpu_profile.txt (time per
phase of the grouped steps, then the operator table) and prints
a summary. Exits non-zero when an exactness bound fails (after writing the files).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout, no install

import diaglab  # noqa: E402
import diaglab.bench  # noqa: E402
from diaglab.bench import live_preset, random_tokens  # noqa: E402
from diaglab.paths import write_json  # noqa: E402
from diaglab.profiling import phase_breakdown, profile_steps, torch_profile  # noqa: E402

BOUNDS = {"float32": 1e-5, "bfloat16": 2e-2}  # the project's exactness standard (relative error)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def exactness(model: diaglab.ARMT, segments: float, seed: int = 0) -> dict:
    """Diagonal vs sequential on `segments` segments (a partial last one if fractional):
    logits and every layer's W_mem and z."""
    n = model.config.segment_size
    ids = random_tokens(model, int(segments * n), seed)                               # (1, N)
    with torch.no_grad():
        seq = model(ids)
        diag = diaglab.DiagonalExecutor(model)(ids)
    return {"tokens": ids.shape[1],
            "logits": rel(diag.logits, seq.logits),
            "W_mem_worst_layer": max(rel(d, s) for d, s in zip(diag.state.W_mem, seq.state.W_mem)),
            "z_worst_layer": max(rel(d, s) for d, s in zip(diag.state.z, seq.state.z)),
            "is_first_equal": bool(torch.equal(diag.state.is_first, seq.state.is_first))}


def cudagraph_check(device: str, segments: int = 12) -> dict:
    """DiagonalExecutor(compile=True, compile_mode="reduce-overhead") — CUDA graphs — on `tiny`
    fp32: two calls, each against the sequential model, and the first call's logits and memory
    read again after the second (a graph replay reuses its output buffers: what a call returned
    must not live in them). Untested until a session draws a GPU; a failure is recorded, not
    raised."""
    model = live_preset("tiny", torch.float32, device)
    n = model.config.segment_size
    a, b = random_tokens(model, segments * n, 2), random_tokens(model, segments * n, 3)
    out: dict = {"preset": "tiny", "segments": segments}
    try:
        ex = diaglab.DiagonalExecutor(model, compile=True, compile_mode="reduce-overhead")
        with torch.no_grad():
            first = ex(a)
            kept = (first.logits.clone(), first.state.W_mem.clone(), first.state.z.clone())
            second = ex(b)
            seq_a, seq_b = model(a), model(b)
            out["first_logits"] = rel(first.logits, seq_a.logits)
            out["second_logits"] = rel(second.logits, seq_b.logits)
            out["W_mem_worst_layer"] = max(max(rel(d, s) for d, s in zip(x.state.W_mem, y.state.W_mem))
                                           for x, y in ((first, seq_a), (second, seq_b)))
            out["first_unchanged"] = all(torch.equal(k, now) for k, now in
                                         zip(kept, (first.logits, first.state.W_mem, first.state.z)))
        out["compile_seconds"] = ex.compile_seconds
        out["pass"] = out["first_unchanged"] and max(out["first_logits"], out["second_logits"],
                                                     out["W_mem_worst_layer"]) <= BOUNDS["float32"]
    except Exception as err:   # noqa: BLE001 — recorded in the report, the other checks still run
        out.update(error=f"{type(err).__name__}: {err}"[:500], **{"pass": False})
    return out


def build(preset: str, dtype: torch.dtype, device: str, **overrides) -> diaglab.ARMT:
    t0 = time.perf_counter()
    model = live_preset(preset, dtype, device, **overrides)
    print(f"built {preset} {str(dtype).removeprefix('torch.')} on {device} in {time.perf_counter() - t0:.1f} s",
          flush=True)
    return model


def main(argv: list[str] | None = None) -> int:
    p = diaglab.bench.OneLineParser(prog="python scripts/gpu_checks.py", description=__doc__.split("\n\n")[0])
    count = diaglab.bench._int
    p.add_argument("out", type=Path)
    p.add_argument("--preset", default="llama_1b", choices=sorted(diaglab.PRESETS))
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=count(1), help="override the preset's layer count (CPU dry runs)")
    p.add_argument("--exact-segments", type=float, default=3.5, help="input length of the exactness checks, > 0")
    p.add_argument("--steps-tokens", type=count(1, 1 << 24), default=131072, help="length of the per-step diagonal run")
    p.add_argument("--profile-tokens", type=count(1, 1 << 24), default=16384, help="length of the torch.profiler run")
    args = p.parse_args(argv)   # every check before the first model is built: one line, exit status 2
    if not 0 < args.exact_segments <= 1024:
        p.error(f"--exact-segments: expected a number of segments in (0, 1024], got {args.exact_segments}")
    try:
        diaglab.bench.check_device(args.device)
        args.out.mkdir(parents=True, exist_ok=True)
    except (ValueError, RuntimeError, OSError) as err:
        p.error(f"{'--device' if not isinstance(err, OSError) else 'out'}: {err}")
    overrides = {"layers": args.layers} if args.layers else {}
    ok = True

    # 1. exactness, fp32 and bf16, with random non-zero W_mv (randomize_memory_)
    exact = {}
    for name in ("float32", "bfloat16"):
        model = build(args.preset, getattr(torch, name), args.device, **overrides)
        errs = exactness(model, args.exact_segments)
        errs["bound"] = BOUNDS[name]
        errs["pass"] = (max(errs["logits"], errs["W_mem_worst_layer"], errs["z_worst_layer"]) <= BOUNDS[name]
                        if name == "float32" else errs["logits"] <= BOUNDS[name]) and errs["is_first_equal"]
        ok &= errs["pass"]
        exact[name] = errs
        print(f"exactness {name}: " + ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in errs.items()), flush=True)
        if name == "float32":
            del model
            if args.device == "cuda":
                torch.cuda.empty_cache()
    if args.device == "cuda":   # CUDA graphs: exact, and nothing returned lives in a graph's buffers
        exact["cudagraphs"] = cudagraph_check(args.device)
        ok &= exact["cudagraphs"]["pass"]
        print(f"cudagraphs (reduce-overhead): {exact['cudagraphs']}", flush=True)
    exact["device"] = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    exact["torch"], exact["preset"] = torch.__version__, args.preset
    write_json(args.out / "gpu_exact.json", exact)

    # 2. one long diagonal run, step by step (bf16 model from above)
    ex = diaglab.DiagonalExecutor(model)
    ids = random_tokens(model, args.steps_tokens, seed=1)
    profile_steps(ex, ids[:, :model.config.segment_size * 2], keep_logits="none")       # warm-up
    records = profile_steps(ex, ids, keep_logits="none")
    total_ms = sum(r.ms for r in records)
    full = [r.ms for r in records if r.group_size == model.num_layers]
    print(f"per-step run: {len(records)} steps, {total_ms:.0f} ms in all, full-group steps median "
          f"{statistics.median(full) if full else float('nan'):.2f} ms", flush=True)
    (args.out / "gpu_steps.json").write_text(json.dumps(
        {"tokens": args.steps_tokens, "preset": args.preset, "dtype": "bfloat16",
         "records": [dataclasses.asdict(r) for r in records]}) + "\n")

    # 3. torch.profiler: the operator table and the time per phase of the grouped steps
    short = ids[:, :args.profile_tokens]
    table = torch_profile(ex, short, keep_logits="none", row_limit=25)
    phases = phase_breakdown(ex, short, keep_logits="none")
    share = ", ".join(f"{k} {v / phases['steps']:.0%}" for k, v in phases.items() if k != "steps")
    print(f"phases at {args.profile_tokens} tokens ({phases['steps']:.0f} ms of steps under the profiler): {share}",
          flush=True)
    (args.out / "gpu_profile.txt").write_text(
        f"phases (ms) at {args.profile_tokens} tokens: {json.dumps(phases)}\n\n{table}\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
