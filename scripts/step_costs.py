"""Where a grouped step's time goes, the figures behind the README's and data/bench/README.md's
explanation of diagonal / ideal: one step by group size G (1..L layers busy), the same step with
every width shrunk to almost nothing (what launching its operations costs), one full step timed
alone against the same step run back to back (why the ideal is run, not extrapolated), and the
full step with and without inference mode; and from these costs the floor that the schedule's
ramps set under diagonal / ideal at S = L, 4L and 16L (schedule.ramps_over_ideal), as measured
and with only the launches fixed. Prints a table, writes JSON.

    python scripts/step_costs.py --preset tiny --json data/bench/cpu_step_costs.json

Each figure is the median of --repeats calls, in one process, measured in rounds that alternate
the cases so the machine's drift hits all alike.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

from diaglab import DiagonalExecutor, bench, flops, heap, schedule
from diaglab.paths import write_json


def step_call(model, ex, batch: int, G: int, inference: bool):
    """One grouped step of layers 0..G-1 on full-segment shapes, every layer past its first segment
    (ex: a DiagonalExecutor of model, whose layer stack it runs)."""
    with torch.no_grad():
        layers, step = ex.layer_stack()
    n, M, d = model.config.segment_size, model.config.num_mem_tokens, model.hidden_size
    X = torch.randn(G, batch, n + M, d, generator=torch.Generator().manual_seed(0)).to(model.dtype)
    cos, sin = model.base.model.rotary_emb(X, torch.arange(n + M)[None])
    state = model.empty_state(batch)
    W_mem, z = state.W_mem[:G], state.z[:G]

    def call():
        with torch.no_grad(), torch.inference_mode() if inference else contextlib.nullcontext():
            return step(X, layers=layers, lo=0, hi=G - 1, n_text=n, cos=cos, sin=sin, mask=None,
                        W_mem=W_mem, z=z, is_first=None)
    return call


def ramp_floors(ms: dict[str, float], L: int) -> dict[str, dict[str, float]]:
    """schedule.ramps_over_ideal at S = L, 4L and 16L from the measured step costs ('G=1'..'G=L'),
    and again with a step costing its launches (the 'full, minimal widths' step) plus the rest
    of a full step in proportion to G: the lowest the ramps could cost with these launches."""
    full, launches = ms[f"G={L}"], min(ms["full, minimal widths"], ms[f"G={L}"])
    out = {}
    for S in (L, 4 * L, 16 * L):
        out[f"S={S}"] = {
            "measured": schedule.ramps_over_ideal(lambda G: ms[f"G={G}"], L, S),
            "launches_only": schedule.ramps_over_ideal(lambda G: launches + (full - launches) * G / L, L, S)}
    return out


def timed_ms(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e3


def main(argv=None) -> dict:
    p = bench.OneLineParser(prog="python scripts/step_costs.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=("tiny", "small"), default="tiny")
    p.add_argument("--threads", type=bench._int(1, bench.MAX_THREADS), default=2)
    p.add_argument("--repeats", type=bench._int(1), default=7)
    p.add_argument("--calls", type=bench._int(1), default=50, help="steps per timed loop")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    bench.check_outputs(p, args)   # before the measuring, not after it
    torch.set_num_threads(args.threads)
    heap.keep_freed_memory()
    model = bench.live_preset(args.preset)
    L = model.num_layers
    floor = bench.live_preset(args.preset, hidden=16, heads=2, kv_heads=1, intermediate=16, d_mem=2,
                              num_mem_tokens=1, segment_size=1)
    ideal, diagonal = DiagonalExecutor(model), DiagonalExecutor(model)   # (the second adopts the first's stacks)
    cases = {f"G={G}": step_call(model, ideal, 1, G, True) for G in range(1, L + 1)}
    cases["full, minimal widths"] = step_call(floor, DiagonalExecutor(floor), 1, floor.num_layers, True)
    cases["full, no inference mode"] = step_call(model, ideal, 1, L, False)
    chain = bench.even_load_run(model, ideal, 1, args.calls)
    full = cases[f"G={L}"]
    ids = bench.random_tokens(model, 8 * model.config.segment_size)
    for fn in cases.values():
        fn()
    rounds: dict[str, list[float]] = {k: [] for k in [*cases, "full, back to back (even_load_run)", "full, alone"]}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            rounds[name].append(timed_ms(fn, args.calls))
        with torch.no_grad():
            rounds["full, back to back (even_load_run)"].append(timed_ms(chain, 1) / args.calls)
            diagonal(ids)                                   # other work, as between a benchmark's modes
        rounds["full, alone"].append(timed_ms(full, 1))     # one call after other work: a cold start
    ms = {k: statistics.median(v) for k, v in rounds.items()}
    one, full = ms["G=1"], ms[f"G={L}"]
    fixed = one - (full - one) / (L - 1)           # cost(G) = fixed + G * per_layer, from G = 1 and G = L
    out = {"preset": args.preset, "layers": L, "ms": ms, "fixed_ms": fixed, "per_layer_ms": (full - one) / (L - 1),
           "ramps_over_ideal": ramp_floors(ms, L),
           "machine": flops.machine("cpu"), "repeats": args.repeats, "calls": args.calls}
    for k, v in ms.items():
        print(f"{k:38s} {v:7.3f} ms")
    print(f"a step costs about {fixed:.3f} ms + {out['per_layer_ms']:.3f} ms per busy layer "
          f"({out['machine']['cpu']}, {out['machine']['cpu_capability']}, {args.threads} threads)")
    print("the schedule's own floor under diagonal / ideal (schedule.ramps_over_ideal):")
    for S, r in out["ramps_over_ideal"].items():
        print(f"  {S:8s} {r['measured']:.3f} from these step costs, {r['launches_only']:.3f} "
              "if only the launches were fixed")
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
