"""2 processes x 1 thread (the pipeline, torchrun + gloo) against 1 process x 2 threads (the
diagonal executor) on the same cores, tiny preset; writes data/bench/cpu_pipeline.json and
prints a table.

    python scripts/dist_bench.py --tokens 1024,4096 --rounds 2 --repeats 5 \
        --json data/bench/cpu_pipeline.json

On one CPU this measures the pipeline's overheads, not a speed-up: the two ranks share the
cores the one process also has, and every segment's rows cross a socket. The one-process
runs use the model the ranks build (same preset, seed and live memory) and the same ids, so
the work is the same; the ranks' times run from a barrier to the output gathered on rank 0.
Rounds alternate the modes, so machine noise hits all of them.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import diaglab  # noqa: E402
from diaglab.bench import OneLineParser, _int, _int_list, check_outputs  # noqa: E402
from diaglab.paths import write_json  # noqa: E402


def one_process(model, ids, threads: int, repeats: int) -> list[float]:
    """Diagonal executor in this process with `threads` threads: seconds per forward pass."""
    torch.set_num_threads(threads)
    ex = diaglab.DiagonalExecutor(model)
    times = []
    with torch.no_grad():
        ex(ids, labels=ids)   # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            ex(ids, labels=ids)
            times.append(time.perf_counter() - start)
    return times


def pipeline(preset: str, tokens: int, processes: int, repeats: int) -> tuple[list[float], float, dict]:
    """torchrun with `processes` ranks x 1 thread: (seconds per forward pass after a warm-up,
    seconds of the whole command, start-up included; rank 0's --check errors)."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [torchrun, "--standalone", f"--nproc-per-node={processes}", "-m", "diaglab.distributed",
               "--preset", preset, "--tokens", str(tokens), "--threads", "1", "--repeats", str(repeats + 1),
               "--check", "--json", str(report)]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        start = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        data = json.loads(report.read_text())
    return data["times_s"][1:], wall, data["relative_errors"]


def parse_args(argv: list[str] | None = None):
    """The flags, checked before any work: a bad one exits with code 2 and one line (as diaglab.bench)."""
    p = OneLineParser(prog="python scripts/dist_bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", choices=sorted(diaglab.PRESETS), help="model size (default tiny)")
    p.add_argument("--tokens", type=_int_list(1), default=[1024, 4096],
                   help="comma list of token counts N, one record set each (default 1024,4096)")
    p.add_argument("--rounds", type=_int(1), default=2, help="rounds, each running every mode (default 2)")
    p.add_argument("--repeats", type=_int(1), default=5, help="timed forward passes per mode and round (default 5)")
    p.add_argument("--json", default="data/bench/cpu_pipeline.json", metavar="PATH",
                   help="where to write the records (default data/bench/cpu_pipeline.json)")
    args = p.parse_args(argv)
    check_outputs(p, args)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_before = os.getloadavg()   # this machine is shared: say how busy it was
    model = diaglab.randomize_memory_(diaglab.from_preset(args.preset, seed=0), seed=1).eval()
    n = model.config.segment_size
    records = []
    for tokens in args.tokens:
        ids = torch.randint(0, model.base.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
        runs = {"1 process x 1 thread": [], "1 process x 2 threads": [], "2 processes x 1 thread": []}
        walls, errors = [], {}
        for _ in range(args.rounds):
            runs["1 process x 1 thread"] += one_process(model, ids, 1, args.repeats)
            runs["1 process x 2 threads"] += one_process(model, ids, 2, args.repeats)
            times, wall, errors = pipeline(args.preset, tokens, 2, args.repeats)
            runs["2 processes x 1 thread"] += times
            walls.append(wall)
        for mode, times in runs.items():
            records.append({"tokens": tokens, "segments": -(-tokens // n), "mode": mode,
                            "median_s": statistics.median(times), "times_s": times})
        records[-1].update(command_wall_s=walls, relative_errors=errors)
    out = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
           "preset": args.preset, "layers": model.num_layers, "segment": f"{n} + {model.config.num_mem_tokens}",
           "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
           "cores": os.cpu_count(), "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]],
           "records": records}
    write_json(args.json, out)
    print(f"$ {out['command']}   (load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after, "
          f"{os.cpu_count()} cores)")
    print("| tokens | S | 1 proc x 1 thread | 1 proc x 2 threads | 2 procs x 1 thread (pipeline) "
          "| pipeline / (1 x 2) | torchrun command, start-up included |")
    print("|---|---|---|---|---|---|---|")
    for i in range(0, len(records), 3):
        one, two, pipe = records[i:i + 3]
        print(f"| {one['tokens']} | {one['segments']} | {one['median_s'] * 1e3:.0f} ms | {two['median_s'] * 1e3:.0f} ms "
              f"| {pipe['median_s'] * 1e3:.0f} ms | {pipe['median_s'] / two['median_s']:.2f}× "
              f"| {statistics.median(pipe['command_wall_s']):.1f} s |")


if __name__ == "__main__":
    main()
