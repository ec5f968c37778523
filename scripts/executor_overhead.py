"""Where a diagonal call's time goes: inside its grouped steps, or in the executor's own work
around them (validating and embedding the input, the bookkeeping between steps, the LM head
and copying the memory out). The figures behind the README's split of diagonal / ideal into
the executor's share and the ramps'. Prints a table, writes JSON.

    python scripts/executor_overhead.py --preset tiny --segments 32,128 --json out.json

Each call is timed whole, and the step function the executor calls is wrapped to stamp the
time at its entry and exit; "between steps" is everything else: before the first step, between
one step's exit and the next one's entry, and after the last. Medians over --repeats calls,
the segment counts alternating. The wrapper costs the same in every call and only needs
diaglab.diagonal.grouped_layer (and, with --queue, diaglab.ring), so --against DIR measures
another checkout's executor too, in the same process and the same rounds, on its own copy of the
model (built from the same seed; a preset of another shape is refused) and the same inputs:
before and after a change, side by side.

    python scripts/executor_overhead.py --segments 32,128 --against /tmp/old-checkout --json ab.json

--queue N adds the ring: RingExecutor serving bench.queue_requests(model, N) (its grouped calls
are stamped the same way; a point with "requests": N).
"""

from __future__ import annotations

import importlib.util
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import diaglab
from diaglab import bench, flops, heap
from diaglab._checks import MAX_THREADS
from diaglab.paths import write_json


def stamped(step, marks: list):
    """step, with its entry and exit times appended to marks."""
    def wrapped(*args, **kwargs):
        marks.append(time.perf_counter())
        out = step(*args, **kwargs)
        marks.append(time.perf_counter())
        return out
    return wrapped


def split(t0: float, t1: float, marks: list) -> dict:
    """One call's milliseconds: whole, inside the steps, and between them (set-up, gaps, end)."""
    ins, outs = marks[0::2], marks[1::2]
    inside = sum(b - a for a, b in zip(ins, outs))
    gaps = [b - a for a, b in zip(outs, ins[1:])]
    return {"total": (t1 - t0) * 1e3, "in_steps": inside * 1e3, "between_steps": (t1 - t0 - inside) * 1e3,
            "before_first_step": (ins[0] - t0) * 1e3, "after_last_step": (t1 - outs[-1]) * 1e3,
            "between_two_steps": sum(gaps) * 1e3, "steps": len(ins)}


def load_checkout(path: str, ring: bool = False):
    """The diaglab package of another checkout, imported as `diaglab_against` (its modules import
    one another relatively, so the two copies do not mix; an earlier checkout's are dropped first,
    or a second load would reuse them), with its bench and diagonal modules (and ring, if asked),
    or None when path holds none."""
    forget_checkout()
    root = Path(path) / "diaglab"
    if not path or not (root / "__init__.py").is_file():
        return None
    spec = importlib.util.spec_from_file_location("diaglab_against", root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["diaglab_against"] = package
    try:
        spec.loader.exec_module(package)
        for name in ("bench", "diagonal", *(["ring"] if ring else [])):
            importlib.import_module(f"diaglab_against.{name}")
    except Exception:
        forget_checkout()
        raise
    return package


def forget_checkout() -> None:
    """Drop the other checkout's modules from sys.modules."""
    for name in [m for m in sys.modules if m == "diaglab_against" or m.startswith("diaglab_against.")]:
        del sys.modules[name]


def commit_of(path: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def timed_call(run, marks: list, want: int, refuse):
    """A call of run that returns its split(); refuse(message) unless at least `want` steps were
    stamped (an executor that does not call the step by the stamped name cannot be timed apart)."""
    def call():
        marks.clear()
        t0 = time.perf_counter()
        run()
        t1 = time.perf_counter()
        if len(marks) // 2 < want:
            refuse(want, len(marks) // 2)
        return split(t0, t1, marks)
    return call


def serve(ring, requests):
    """A call that serves the whole queue through the ring (as bench's ring mode does)."""
    def run():
        for ids in requests:
            ring.submit(ids, keep_logits="last_segment")
        while ring.pending:
            ring.step()
    return run


def main(argv=None) -> dict:
    p = bench.OneLineParser(prog="python scripts/executor_overhead.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=("tiny", "small"), default="tiny")
    p.add_argument("--segments", type=bench._int_list(1), default=[32, 128])
    p.add_argument("--threads", type=bench._int(1, MAX_THREADS), default=2)
    p.add_argument("--repeats", type=bench._int(1), default=15)
    p.add_argument("--queue", type=bench._int(1, 1024), default=None, metavar="N",
                   help="also the ring serving a seeded queue of N requests (bench.queue_requests)")
    p.add_argument("--against", metavar="DIR", default=None,
                   help="another checkout's root: its executor is measured in the same rounds")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    bench.check_outputs(p, args)
    packages = {"this": diaglab}
    if args.against is not None:
        try:
            other = load_checkout(args.against, ring=args.queue is not None)
        except Exception as err:   # its code does not import here: say so in one line
            p.error(f"--against: importing {args.against}'s diaglab (diagonal, bench"
                    f"{', ring' if args.queue is not None else ''}) failed ({type(err).__name__}: {err})")
        if other is None:
            p.error(f"--against: {args.against!r} holds no diaglab package (give a checkout's root)")
        packages["against"] = other
    torch.set_num_threads(args.threads)
    heap.keep_freed_memory()
    marks: list = []

    def refusal(name: str):
        def refuse(want: int, got: int):
            p.error(f"{name}'s executor ran {got} stamped steps where the schedule has {want}: it does not call "
                    "diaglab.diagonal.grouped_layer by that name, so its steps cannot be timed apart")
        return refuse
    runs, reals, shapes = {}, {}, {}
    inputs = None   # built once, by this checkout: both executors get the same ids and queue
    try:
        for name, package in packages.items():
            mod = sys.modules[package.__name__ + ".diagonal"]
            ring_mod = importlib.import_module(package.__name__ + ".ring") if args.queue is not None else None
            reals[name] = mod.grouped_layer
            # what layer_stack hands out; the modules compare the step with their own name for it (the
            # executor and the ring run inference mode only for the real fast path), so both are swapped
            mod.grouped_layer = stamped(reals[name], marks)
            if ring_mod is not None:
                ring_mod.grouped_layer = mod.grouped_layer
            model = sys.modules[package.__name__ + ".bench"].live_preset(args.preset)   # its own copy, same seed
            shapes[name] = (model.num_layers, model.hidden_size, model.config.segment_size, model.config.num_mem_tokens)
            if shapes[name] != shapes["this"]:
                p.error(f"--against: its {args.preset!r} preset is (layers, hidden, segment, memory) = {shapes[name]}, "
                        f"this one's {shapes['this']}: the two would not run the same work")
            if inputs is None:
                inputs = {S: bench.random_tokens(model, S * model.config.segment_size) for S in args.segments}
                requests = bench.queue_requests(model, args.queue) if args.queue is not None else None
            ex = mod.DiagonalExecutor(model)
            for S, ids in inputs.items():
                runs[(name, S)] = timed_call((lambda ex, ids: lambda: ex(ids, keep_logits="last_segment"))(ex, ids),
                                             marks, model.num_layers + S - 1, refusal(name))
            if requests is not None:   # (the ring's module was imported with --queue)
                runs[(name, "ring")] = timed_call(serve(ring_mod.RingExecutor(model), requests), marks, 1,
                                                  refusal(name))
        with torch.no_grad():   # rounds over every key, the start rotating; the first round warms up
            calls = bench.interleaved(runs, warmup=1, repeats=args.repeats, call=lambda fn: fn())
    finally:
        for name, package in packages.items():
            if name in reals:
                sys.modules[package.__name__ + ".diagonal"].grouped_layer = reals[name]
                if package.__name__ + ".ring" in sys.modules:
                    sys.modules[package.__name__ + ".ring"].grouped_layer = reals[name]
        forget_checkout()
    out = {"preset": args.preset, "layers": model.num_layers, "repeats": args.repeats,
           "machine": flops.machine("cpu"), "points": []}
    if args.against is not None:
        out["against"] = {"path": str(Path(args.against).resolve()), "commit": commit_of(args.against)}
    print(f"{'code':>7} {'S':>6} {'steps':>5} {'total ms':>9} {'in steps':>9} {'between':>8} {'set-up':>7} "
          f"{'gaps':>7} {'end':>6}")
    order = [*args.segments, "ring"]
    for (name, S), rows in sorted(calls.items(), key=lambda kv: (order.index(kv[0][1]), kv[0][0] != "against")):
        med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}   # (each part its own median)
        where = {"segments": S} if S != "ring" else {"requests": args.queue}
        out["points"].append({"code": name, **where, **med})
        print(f"{name:>7} {S if S != 'ring' else f'ring {args.queue}':>6} {med['steps']:5.0f} {med['total']:9.2f} "
              f"{med['in_steps']:9.2f} {med['between_steps']:8.2f} {med['before_first_step']:7.2f} "
              f"{med['between_two_steps']:7.2f} {med['after_last_step']:6.2f}")
    print(f"({args.preset}, medians of {args.repeats} calls; {out['machine']['cpu']}, "
          f"{out['machine']['cpu_capability']}, {args.threads} threads)")
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
