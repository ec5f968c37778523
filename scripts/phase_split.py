"""Where a diagonal step's time goes on this machine: the shares of the associative read,
attention, MLP, the associative write and the rest of the steps (profiling.phase_breakdown),
for the models of the README's table. Writes data/bench/cpu_phases.json (or the path given).

    python scripts/phase_split.py [OUT.json]          # about 40 s on 2 CPU threads
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "6")   # keep torch.profiler's Kineto lines off stderr
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a plain checkout

import torch  # noqa: E402

import diaglab  # noqa: E402
from diaglab.bench import live_preset, random_tokens  # noqa: E402
from diaglab.paths import write_json  # noqa: E402
from diaglab.profiling import phase_breakdown  # noqa: E402

CASES = [("tiny", torch.float32, 128, {}), ("tiny", torch.bfloat16, 128, {}),
         ("llama_1b", torch.bfloat16, 4, {"layers": 2})]   # LLaMA-1B's widths, cut to 2 layers for a CPU


ROOT = Path(__file__).resolve().parents[1]


def main(out: str = str(ROOT / "data" / "bench" / "cpu_phases.json")) -> dict:
    torch.set_num_threads(2)
    shares = {}
    for preset, dtype, S, overrides in CASES:
        model = live_preset(preset, dtype, **overrides)
        ex = diaglab.DiagonalExecutor(model)
        ids = random_tokens(model, S * model.config.segment_size)
        with torch.no_grad():
            ex(ids, keep_logits="last_segment")                     # warm-up: stacks, first-touch memory
        ms = phase_breakdown(ex, ids, keep_logits="last_segment")
        key = " ".join([preset, *(f"{k}={v}" for k, v in overrides.items()), str(dtype).removeprefix("torch."), f"S={S}"])
        shares[key] = {k: round(v / ms["steps"], 3) for k, v in ms.items() if k != "steps"}
        print(key, shares[key], f"steps {ms['steps']:.0f} ms under the profiler", flush=True)
    record = {"command": "python scripts/phase_split.py", "threads": 2, "shares": shares}
    write_json(out, record)
    return record


if __name__ == "__main__":
    main(*sys.argv[1:])
