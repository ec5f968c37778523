"""The benchmark runs end to end at tiny sizes: one row per (dtype, point, mode) with
the documented keys, JSON / CSV / HTML written, the table's ratios computed from the
rows, runs joined by scripts/merge_reports.py. No timing thresholds. (Bad flags:
test_bench_cli.py.)"""

import csv
import json
from pathlib import Path

import plotly.graph_objects as go
import pytest
import torch
from conftest import load_script

import diaglab
from diaglab import bench, schedule, viz

TINY = dict(layers=2)   # the tiny preset (segment 32) cut to 2 layers: a run takes well under a second
ROOT = Path(__file__).resolve().parents[1]


def tiny_model(dtype=torch.float32):
    return bench.live_preset("tiny", dtype, **TINY)


def run_tiny(segments=None, lengths=None, dtypes=(torch.float32,), **kw):
    """run_bench on the 2-layer tiny preset in each dtype, as the command line loops them."""
    rows = []
    for dtype in dtypes:
        model = tiny_model(dtype)
        rows += bench.run_bench(model, bench.make_inputs(model, segments, lengths), preset="tiny", **kw)
    return rows


def merge_reports():
    return load_script("merge_reports")
REQUIRED = {"mode", "dtype", "device", "preset", "layers", "segments", "tokens", "seconds", "seconds_min",
            "seconds_max", "tokens_per_s", "peak_mem_bytes"}


def test_run_bench_rows_per_point_and_mode():
    rows = run_tiny(segments=[1, 3], dtypes=(torch.float32, torch.bfloat16), warmup=0, repeats=2)
    assert len(rows) == 2 * 2 * len(bench.MODES)
    assert {(r["dtype"], r["segments"], r["mode"]) for r in rows} == {
        (d, S, m) for d in ("float32", "bfloat16") for S in (1, 3) for m in bench.MODES}
    for r in rows:
        assert REQUIRED <= set(r) == set(bench.ROW_KEYS) | set(bench.LIMIT_KEYS) | set(bench.PEAK_KEYS)
        assert r["tokens"] == 32 * r["segments"] and r["layers"] == 2 and r["preset"] == "tiny"
        assert r["device"] == "cpu" and r["repeats"] == 2
        assert 0 < r["seconds_min"] <= r["seconds"] <= r["seconds_max"]
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"])
        assert r["num_mem_tokens"] == 8 and r["segment_size"] == 32 and r["batch"] == 1


def test_progress_bar_counts_points(capsys):
    run_tiny(segments=[1, 2], modes=("sequential", "diagonal"), warmup=0, repeats=1, progress=True)
    err = capsys.readouterr().err
    assert "bench tiny" in err and "2/2" in err and "sequential/diagonal" in err
    run_tiny(segments=[1], modes=("diagonal",), warmup=0, repeats=1)
    assert capsys.readouterr().err == ""                          # quiet unless asked


def test_lengths_cut_into_segments_and_full_attention_can_be_capped():
    rows = run_tiny(lengths=[40, 100], modes=("full", "diagonal"), full_max_tokens=64, warmup=0, repeats=1)
    assert [(r["mode"], r["tokens"], r["segments"]) for r in rows] == [
        ("full", 40, 2), ("diagonal", 40, 2), ("diagonal", 100, 4)]


def test_one_even_load_step_shapes_and_speedups():
    model = diaglab.from_preset("tiny", **TINY).eval()
    ex = diaglab.DiagonalExecutor(model)
    with torch.no_grad():
        Y, W_mem, z = bench.even_load_run(model, ex, batch=2, steps=1)()
    assert Y.shape == (2, 2, 32 + 8, 128)                         # (G = L, B, T, d)
    assert W_mem.shape == (2, 2, model.config.d_key, 128) and z.shape == (2, 2, model.config.d_key)
    with pytest.raises(ValueError, match="unknown modes"):
        bench.mode_runners(model, torch.zeros(1, 32, dtype=torch.long), ("diagonal", "warp"))
    by_mode = {"diagonal": {"seconds": 1.5}, "sequential": {"seconds": 3.0},
               "sequential_grouped": {"seconds": 2.25}, "full": {"seconds": 6.0}, "ideal": {"seconds": 1.2}}
    assert bench.speedups(by_mode) == pytest.approx({"sequential/diagonal": 2.0, "sequential_grouped/diagonal": 1.5,
                                                     "full/diagonal": 4.0, "diagonal/ideal": 1.25})


def test_ideal_rows_are_the_measured_even_load_run(monkeypatch):
    """run_bench reports the ideal's own timed run (S full-group steps), not a scaled step."""
    step_seconds = [0.010, 0.012, 0.011]
    monkeypatch.setattr(bench, "measure", lambda fns, device, warmup, repeats: {m: (list(step_seconds), None)
                                                                               for m in fns})
    rows = run_tiny(segments=[1, 4, 16], modes=("diagonal", "ideal"))
    for r in rows:
        assert r["seconds"] == pytest.approx(0.011)
        assert (r["seconds_min"], r["seconds_max"]) == pytest.approx((0.010, 0.012))


def spy_steps(monkeypatch, ex) -> list[dict]:
    """Make ex.layer_stack hand out a step that records each call (inputs, output, layer range,
    mask, is_first, inference mode); returns the list the records go to."""
    with torch.no_grad():
        layers, real = ex.layer_stack()
    calls = []

    def spy(X, *, W_mem, z, lo, hi, is_first, mask, **kw):
        out = real(X, W_mem=W_mem, z=z, lo=lo, hi=hi, is_first=is_first, mask=mask, **kw)
        calls.append(dict(X=X, W_mem=W_mem, z=z, out=out, cells=(lo, hi), mask=mask, first=is_first,
                          inference=torch.is_inference_mode_enabled()))
        return out
    monkeypatch.setattr(ex, "layer_stack", lambda: (layers, spy))
    return calls


def test_even_load_run_chains_S_full_group_steps(monkeypatch):
    """The ideal runs S full steps; step t + 1 takes [new segment rows; Y_t[:-1]] and the memory step t
    wrote, in inference mode under no_grad (as the executor runs its steps)."""
    model = diaglab.from_preset("tiny", **TINY).eval()
    ex = diaglab.DiagonalExecutor(model)
    calls = spy_steps(monkeypatch, ex)
    with torch.no_grad():
        last = bench.even_load_run(model, ex, batch=2, steps=3)()
    assert len(calls) == 3 and all(a is b for a, b in zip(last, calls[-1]["out"]))
    for c in calls:
        assert (c["cells"], c["mask"], c["first"], c["inference"]) == ((0, model.num_layers - 1), None, None, True)
        assert c["X"].shape == (2, 2, 32 + 8, 128)                        # (G = L, B, T, d)
    for before, after in zip(calls, calls[1:]):
        Y, W_mem, z = before["out"]
        assert torch.equal(after["X"][0], calls[0]["X"][0])              # layer 0: a new segment's rows
        assert torch.equal(after["X"][1:], Y[:-1])                        # layer l: what layer l - 1 gave
        assert after["W_mem"] is W_mem and after["z"] is z                # the memory the last step wrote
    with pytest.raises(ValueError, match="steps"):
        bench.even_load_run(model, ex, batch=1, steps=0)
    for batch in (0, -1, 1.5):
        with pytest.raises(ValueError, match="batch"):
            bench.even_load_run(model, ex, batch=batch, steps=1)


@pytest.mark.parametrize("S", [1, 2, 5])                                 # fewer segments than layers, more
def test_schedule_run_is_the_bare_diagonal_schedule(monkeypatch, S):
    """The schedule mode runs the diagonal's own groups (1, 2, .., L, .., 2, 1 layers), each step fed
    by the last: layer 0 a new segment's rows, layer l what layer l - 1 gave; a busy layer keeps the
    memory it wrote, a layer starting now gets zeros; settled steps (no masks), in inference mode."""
    model = diaglab.from_preset("tiny", **{**TINY, "layers": 3}).eval()
    L = model.num_layers
    ex = diaglab.DiagonalExecutor(model)
    calls = spy_steps(monkeypatch, ex)
    with torch.no_grad():
        last = bench.schedule_run(model, ex, batch=2, segments=S)()
    want = [(cells[0][0], cells[-1][0]) for cells in schedule.diagonal(L, S)]
    assert [c["cells"] for c in calls] == want and all(a is b for a, b in zip(last, calls[-1]["out"]))
    for c in calls:
        assert (c["mask"], c["first"], c["inference"]) == (None, None, True)
        assert c["X"].shape == (c["cells"][1] - c["cells"][0] + 1, 2, 32 + 8, 128)
    for before, after in zip(calls, calls[1:]):
        (plo, phi), (lo, hi) = before["cells"], after["cells"]
        Y, W_mem, z = before["out"]
        for g, l in enumerate(range(lo, hi + 1)):
            if l == 0:
                assert torch.equal(after["X"][g], calls[0]["X"][0])       # a new segment's rows
            else:
                assert torch.equal(after["X"][g], Y[l - 1 - plo])         # what layer l - 1 gave
            if l <= phi:
                assert torch.equal(after["W_mem"][g], W_mem[l - plo]) and torch.equal(after["z"][g], z[l - plo])
            else:                                                         # the layer's first segment
                assert not after["W_mem"][g].any() and not after["z"][g].any()
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="segments"):
            bench.schedule_run(model, ex, batch=1, segments=bad)
        with pytest.raises(ValueError, match="batch"):
            bench.schedule_run(model, ex, batch=bad, segments=1)


def test_schedule_rows_split_diagonal_over_ideal(monkeypatch):
    seconds = {"diagonal": 1.5, "ideal": 1.2, "schedule": 1.32}
    monkeypatch.setattr(bench, "measure", lambda fns, device, warmup, repeats: {
        m: ([seconds.get(m, 0.1)], None) for m in fns})
    rows = run_tiny(segments=[4], modes=("diagonal", "ideal", "schedule"))
    assert [r["mode"] for r in rows] == ["diagonal", "ideal", "schedule"]
    ratios = bench.speedups({r["mode"]: r for r in rows})
    assert ratios == pytest.approx({"diagonal/ideal": 1.25, "diagonal/schedule": 1.5 / 1.32,
                                    "schedule/ideal": 1.1})
    assert "schedule" in bench.table(rows)
    assert ("float32, S = 4: diagonal/ideal 1.250 = diagonal/schedule 1.136 (executor) x schedule/ideal 1.100 "
            "(ramps)") in bench.table(rows).splitlines()   # the split the mode exists for


def test_cli_writes_json_csv_html_and_a_table(tmp_path, capsys):
    out = {k: tmp_path / "out" / f"bench.{k}" for k in ("json", "csv", "html")}
    rows = bench.main(["--preset", "tiny", "--layers", "2", "--segments", "1,2,4", "--device", "cpu",
                       "--modes", "sequential,diagonal,ideal", "--warmup", "0", "--repeats", "1",
                       "--json", str(out["json"]), "--csv", str(out["csv"]), "--html", str(out["html"])])
    saved = json.loads(out["json"].read_text())
    assert saved == rows and len(saved) == 3 * 3
    with open(out["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 9 and set(table[0]) == set(bench.ROW_KEYS) | set(bench.LIMIT_KEYS) | set(bench.PEAK_KEYS)
    assert [r["mode"] for r in table[:3]] == ["sequential", "diagonal", "ideal"]
    assert "plotly" in out["html"].read_text()[:20000].lower()
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["dtype", "S", "tokens", "mode", "median", "ms", "peak", "MiB", "speed-up",
                                  "GFLOP/s", "%", "peak"]
    assert len(printed) == 1 + 3 * 3 + 3                          # header + a line per point and mode + 3 notes
    assert printed[-3] == "a speed-up is x / diagonal; MiB is peak memory measured as process RSS growth"
    assert printed[-2].startswith("% peak: GFLOP/s over torch.mm's, timed in each point's own rounds (float32 ")
    for line, r in zip(printed[1:-3], rows):                      # each mode's time over diagonal's
        diag = next(d for d in rows if d["mode"] == "diagonal" and d["tokens"] == r["tokens"])
        assert line.split()[2:4] == [str(r["tokens"]), r["mode"]]
        assert line.split()[-3] == f"{r['seconds'] / diag['seconds']:.2f}x"
        assert line.split()[-2] == f"{r['gflops']:.1f}" and line.split()[-1] == f"{r['pct_of_peak']:.0f}"


def test_cli_rejects_unknown_modes_and_both_size_flags(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--modes", "diagonal,warp"])
    assert "choose from full,sequential" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--segments", "1", "--lengths", "32"])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(ValueError, match="exactly one of segments or lengths"):
        bench.make_inputs(tiny_model())
    assert bench.parse_args([]).segments == [1, 2, 4, 8, 16, 32, 64]


def test_bench_figure_lines_per_mode_and_speedups():
    rows = [dict(mode=m, dtype="float32", tokens=N, segments=N // 32, seconds=s * N, seconds_min=s * N,
                 seconds_max=s * N, device="cpu", preset="tiny")
            for N in (32, 64) for m, s in (("sequential", 2.0), ("diagonal", 1.0), ("full", 3.0))]
    fig = viz.bench_figure(rows)
    assert isinstance(fig, go.Figure)
    names = [t.name for t in fig.data]
    assert names == ["full (float32)", "sequential (float32)", "diagonal (float32)",
                     "vs sequential (float32)", "vs full (float32)"]
    assert list(fig.data[3].y) == [2.0, 2.0] and list(fig.data[4].y) == [3.0, 3.0]


def test_cli_saves_each_finished_point_and_merge_reports_joins_runs(tmp_path, capsys, monkeypatch):
    """A run stopped part-way keeps its finished points; scripts/merge_reports.py joins runs
    (e.g. the long length measured first) into one table ordered by tokens, measuring nothing."""
    saved_after_point = []
    real_write = bench.write_rows
    monkeypatch.setattr(bench, "write_rows",
                        lambda rows, j=None, c=None: (saved_after_point.append(len(rows)), real_write(rows, j, c)))
    common = ["--preset", "tiny", "--layers", "2", "--device", "cpu", "--modes", "sequential,diagonal",
              "--warmup", "0", "--repeats", "1"]
    bench.main(common + ["--lengths", "128", "--json", str(tmp_path / "long.json")])
    bench.main(common + ["--lengths", "32,64", "--json", str(tmp_path / "short.json")])
    assert saved_after_point == [2, 2, 2, 4, 4]                   # after each point, then at the end
    capsys.readouterr()
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("merging must not measure"))
    rows = merge_reports().main([str(tmp_path / "long.json"), str(tmp_path / "short.json"),
                                 "--json", str(tmp_path / "all.json")])
    assert [(r["tokens"], r["mode"]) for r in rows] == [(32, "sequential"), (32, "diagonal"), (64, "sequential"),
                                                        (64, "diagonal"), (128, "sequential"), (128, "diagonal")]
    assert json.loads((tmp_path / "all.json").read_text()) == rows
    printed = capsys.readouterr().out.splitlines()
    assert printed[-2].startswith("% peak") and printed[-1].startswith("on ")   # the anchor of the runs
    assert [line.split()[2] for line in printed[1:-3]] == ["32", "32", "64", "64", "128", "128"]
    (tmp_path / "bad.json").write_text('[{"mode": "diagonal"}]')
    with pytest.raises(ValueError, match="not a diaglab.bench JSON"):
        bench.read_rows([str(tmp_path / "bad.json")])


def test_bench_runs_without_plotly(tmp_path):
    """A bare GPU image has torch and transformers but no plotly: measuring must work there,
    and --html must say what is missing before measuring anything."""
    import subprocess
    import sys
    blocker = ("import sys, runpy; sys.modules['plotly'] = None; sys.modules['ipywidgets'] = None; "
               "sys.argv = ['bench'] + sys.argv[1:]; runpy.run_module('diaglab.bench', run_name='__main__')")
    args = ["--preset", "tiny", "--layers", "2", "--segments", "2", "--device", "cpu", "--warmup", "0",
            "--repeats", "1", "--json", str(tmp_path / "b.json")]
    done = subprocess.run([sys.executable, "-c", blocker, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(json.loads((tmp_path / "b.json").read_text())) == len(bench.MODES)
    assert "a speed-up is x / diagonal" in done.stdout
    done = subprocess.run([sys.executable, "-c", blocker, *args, "--html", str(tmp_path / "b.html")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "--html needs plotly" in done.stderr
    assert not (tmp_path / "b.html").exists()


def test_bad_device_and_missing_report_files_say_what_to_do(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the missing-CUDA message cannot be shown")
    with pytest.raises(ValueError, match="CUDA is not available here.*install a CUDA build"):
        bench.live_preset("tiny", device="cuda", **TINY)
    with pytest.raises(SystemExit):
        bench.main(["--device", "cuda", "--segments", "1", "--layers", "2"])
    assert "CUDA is not available here" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        merge_reports().main([str(tmp_path / "nope.json")])
    assert "no such file" in capsys.readouterr().err


def test_old_reports_that_say_mem_tokens_are_read(tmp_path):
    """Rows name ARMTConfig's num_mem_tokens; files from before (data/bench/) said mem_tokens."""
    old = json.loads((ROOT / "data" / "bench" / "cpu_tiny.json").read_text())
    assert "mem_tokens" in old[0] and "num_mem_tokens" not in old[0]
    rows = bench.read_rows([str(ROOT / "data" / "bench" / "cpu_tiny.json")])
    assert len(rows) == len(old) and {r["num_mem_tokens"] for r in rows} == {r["mem_tokens"] for r in old}
    assert all(set(r) == set(bench.ROW_KEYS) for r in rows)


def test_table_fits_100_columns_and_ends_with_its_legend():
    """Two dtypes, every mode, the longest inputs and slowest times of the GPU run joined with
    a CPU run: still under 100 columns. A row without a peak shows '-'."""
    rows = [dict(mode=m, dtype=d, device=device, preset="llama_1b", segments=128, tokens=131072,
                 seconds=123.456 * (k + 1), peak_mem_bytes=None if m == "ideal" else 75 * 2**30)
            for device in ("cuda:0", "cpu") for d in ("float32", "bfloat16") for k, m in enumerate(bench.MODES)]
    lines = bench.table(rows).splitlines()
    assert len(lines) == 1 + 2 * 2 * len(bench.MODES) + 1
    assert max(len(line) for line in lines) <= 100
    assert lines[-1] == ("a speed-up is x / diagonal; MiB is peak memory measured as CUDA allocations "
                         "or process RSS growth")
    assert bench.table(rows[:5]).splitlines()[-1].endswith("measured as CUDA allocations")
    ideal = next(line for line in lines if line.split()[3] == "ideal")
    assert ideal.split()[-4:] == ["-", f"{5 / 4:.2f}x", "-", "-"]   # no peak memory; no FLOP rate in these rows


def test_gpu_script_dry_run_on_cpu(tmp_path):
    """scripts/gpu_bench.sh, the one script a GPU session runs, end to end on the CPU at tiny
    sizes: every file it promises, exactness passed, the long point measured and joined."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PY=sys.executable, OUT=str(tmp_path), PRESET="tiny", DEVICE="cpu",
               LONG="256", SHORT="64,128", PROFILE="128")
    done = subprocess.run(["bash", str(root / "scripts" / "gpu_bench.sh")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gpu_exact.json", "gpu_llama1b.csv", "gpu_llama1b.json", "gpu_llama1b_131k.json",
        "gpu_llama1b_short.json", "gpu_profile.txt", "gpu_steps.json"]
    exact = json.loads((tmp_path / "gpu_exact.json").read_text())
    assert exact["float32"]["pass"] and exact["bfloat16"]["pass"] and exact["float32"]["logits"] <= 1e-5
    steps = json.loads((tmp_path / "gpu_steps.json").read_text())
    assert len(steps["records"]) == 8 + 256 // 32 - 1                   # L + S - 1 steps for the tiny preset
    rows = json.loads((tmp_path / "gpu_llama1b.json").read_text())
    assert sorted({r["tokens"] for r in rows}) == [64, 128, 256] and len(rows) == 3 * len(bench.MODES)
    assert "phase attention" in (tmp_path / "gpu_profile.txt").read_text()


def test_merge_reports_reads_queue_rows(tmp_path, capsys):
    """Queue rows (--queue) are told from the rows themselves: merge_reports has no --queue."""
    ring = ROOT / "data" / "bench" / "cpu_ring.json"
    rows = merge_reports().main([str(ring), "--json", str(tmp_path / "ring.json")])
    assert rows == json.loads(ring.read_text()) == json.loads((tmp_path / "ring.json").read_text())
    printed = capsys.readouterr().out
    assert "x / ring" in printed and "even load takes" in printed
    with pytest.raises(ValueError, match="cannot be joined"):
        bench.read_rows([str(ring), str(ROOT / "data" / "bench" / "cpu_tiny.json")])


def test_table_says_how_each_peak_was_timed():
    """Rows from before the per-point peak (no peak_gflops_at_start) were put against one
    torch.mm run at the start: the legend must not claim each point's own rounds for them."""
    old = bench.read_rows([str(ROOT / "data" / "bench" / "cpu_batch_sweep.json")])
    assert "peak_gflops" in old[0] and "peak_gflops_at_start" not in old[0]
    notes = bench.table(old).splitlines()
    assert notes[-2].startswith("% peak: GFLOP/s over torch.mm's, measured in the same run (float32 ")
    assert "own rounds" not in bench.table(old)
    new = [dict(r, peak_gflops_at_start=r["peak_gflops"], dtype="bfloat16") for r in old[:2]]
    mixed = bench.table(old + new).splitlines()[-2]
    assert "measured in the same run (float32 " in mixed and "timed in each point's own rounds (bfloat16 " in mixed


def test_run_bench_and_the_queue_refuse_bad_arguments_by_name():
    model = tiny_model()
    ids = bench.make_inputs(model, segments=[1])
    fast = dict(warmup=0, repeats=1, anchor_sizes=(64,))
    for kw, match in ((dict(modes=[]), "modes is empty"), (dict(modes="diagonal"), "got the str 'diagonal'"),
                      (dict(modes=("diagonal", "diagonal")), "more than once"),
                      (dict(warmup=1.5), "warmup must be an int >= 0, got float 1.5"),
                      (dict(repeats=True), "repeats must be an int >= 1, got bool True"),
                      (dict(full_max_tokens=0), "full_max_tokens must be an int >= 1")):
        with pytest.raises(ValueError, match=match):
            bench.run_bench(model, ids, **{**fast, **kw})
    with pytest.raises(ValueError, match=r"got one tensor of shape \(1, 32\): pass \[ids\]"):
        bench.run_bench(model, ids[0], **fast)
    with pytest.raises(ValueError, match=r"inputs mix batch sizes \[1, 2\]: one batch size per call"):
        bench.run_bench(model, ids + bench.make_inputs(model, segments=[1], batch=2), **fast)
    requests = bench.queue_requests(model, 2, (1, 2))
    with pytest.raises(ValueError, match="queue modes is empty"):
        bench.run_queue_bench(model, requests, modes=(), warmup=0, repeats=1)
    with pytest.raises(ValueError, match=r"requests\[0\] must be token ids \[1, N\] or \[N\]"):
        bench.run_queue_bench(model, [torch.zeros(2, 32, dtype=torch.long)], warmup=0, repeats=1)
    rows = bench.run_queue_bench(model, [r[0] for r in requests], ("ring", "back_to_back"), warmup=0, repeats=1)
    assert [r["request_segments"] for r in rows] == [[-(-r.shape[1] // 32) for r in requests]] * 2   # [N] as [1, N]


def spy_executors(monkeypatch):
    """(executors made, ids of those whose layer_stack() was built outside autograd) from now on."""
    made, primed = [], set()
    real_init, real_stack = diaglab.DiagonalExecutor.__init__, diaglab.DiagonalExecutor.layer_stack

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        made.append(self)

    def layer_stack(self):
        if not torch.is_grad_enabled():   # under autograd the stacks are in-graph copies, not the kept ones
            primed.add(id(self))
        return real_stack(self)
    monkeypatch.setattr(diaglab.DiagonalExecutor, "__init__", init)
    monkeypatch.setattr(diaglab.DiagonalExecutor, "layer_stack", layer_stack)
    return made, primed


def test_executors_are_primed_and_ideal_has_its_own(monkeypatch):
    """With --warmup 0 the first timed call must not build layer stacks, and the ideal step's
    RoPE tables must not evict the diagonal executor's cached ones: it gets its own executor."""
    model = tiny_model()
    made, primed = spy_executors(monkeypatch)
    execs = bench.executors(model)
    assert {id(ex) for ex in made} == primed and set(execs) == {"diagonal", "sequential_grouped", "ideal"}
    assert len({id(ex) for ex in execs.values()}) == 3
    primed.clear()
    bench.mode_runners(model, bench.make_inputs(model, segments=[1])[0], ("diagonal", "ideal"), execs)
    assert primed == {id(execs["ideal"])}
    made.clear(), primed.clear()
    bench.queue_runners(model, bench.queue_requests(model, 2, (1, 2)))
    assert len(made) == 3 and {id(ex) for ex in made} == primed   # the ring's, back to back's, the ideal step's


def test_pipeline_grid_is_labelled_like_the_schedule_grids():
    """viz.pipeline_figure drops its cell labels past the grids' limit (viz._labelled), not only
    past 600 cells: 30 columns of labels would not fit a notebook-wide figure."""
    assert viz.pipeline_figure(2, 24).data[0].texttemplate == "%{text}"
    assert viz.pipeline_figure(2, 30).data[0].texttemplate is None


@pytest.mark.parametrize("make", [bench.even_load_run, bench.schedule_run])
def test_bare_runs_follow_the_model_as_the_executor_does(make):
    """The ideal and schedule runs read the executor's layer stack each run: replaced weights are
    followed (not the stacks of when the run was built); with a hook on a module they run outside
    inference mode, as the executor does; an executor of another model is refused."""
    model = tiny_model()
    ex = diaglab.DiagonalExecutor(model)
    run = make(model, ex, 1, 3)
    with torch.no_grad():
        before = run()[0]
        mlp = model.base.model.layers[0].mlp
        mlp.up_proj.weight = torch.nn.Parameter(mlp.up_proj.weight.detach() * 2)
        after = run()[0]
        fresh = make(model, diaglab.DiagonalExecutor(model), 1, 3)()[0]
    assert not torch.equal(before, after) and torch.equal(after, fresh)
    seen = []
    model.base.model.layers[0].mlp.register_forward_hook(lambda m, i, o: seen.append(o.is_inference()))
    with torch.no_grad(), pytest.warns(UserWarning):
        run()
    assert seen and not any(seen)
    with pytest.raises(ValueError, match="another model"):
        make(tiny_model(), ex, 1, 3)


@pytest.mark.parametrize("S", [1, 4])
def test_mode_runners_ideal_and_schedule_run_their_step_counts(monkeypatch, S):
    model = tiny_model()
    execs = bench.executors(model)
    calls = spy_steps(monkeypatch, execs["ideal"])
    runs = bench.mode_runners(model, bench.make_inputs(model, segments=[S])[0], ("ideal", "schedule"), execs)
    with torch.no_grad():
        calls.clear()
        runs["ideal"]()
        assert len(calls) == S and all(c["cells"] == (0, model.num_layers - 1) for c in calls)
        calls.clear()
        runs["schedule"]()
        assert len(calls) == model.num_layers + S - 1
