"""The FLOP formula (diaglab.flops) against torch's operator count, and the peak probes."""

import pytest
import torch
from conftest import live_model, random_ids
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from diaglab import DiagonalExecutor, flops


def _counted(fn) -> int:
    # the math backend decomposes attention into matmuls, which the counter sees (it has no
    # entry for the CPU flash kernel)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("N", [8, 21, 40])            # one segment, partial last segment, S > L
@pytest.mark.parametrize("mode", ["sequential", "sequential_grouped", "diagonal", "full", "ideal", "schedule"])
def test_formula_matches_the_operator_count(mode, N):
    from diaglab import bench
    model = live_model(layers=3, heads=4, kv_heads=2)   # segment 8, GQA
    ids = random_ids(2, N)
    S = -(-N // 8)
    run = {"sequential": lambda: model(ids, keep_logits="last_segment"),
           "sequential_grouped": lambda: DiagonalExecutor(model, order="sequential")(ids, keep_logits="last_segment"),
           "diagonal": lambda: DiagonalExecutor(model)(ids, keep_logits="last_segment"),
           "full": lambda: model.base(ids, logits_to_keep=1),
           "ideal": lambda: bench.even_load_run(model, DiagonalExecutor(model), 2, S)(),
           "schedule": lambda: bench.schedule_run(model, DiagonalExecutor(model), 2, S)()}[mode]
    predicted = flops.run_flops(model, N, batch=2, mode=mode)
    counted = _counted(run)
    # the counter also sees RoPE's tiny angle product (2 * hd/2 * T per table): within 0.2 %
    assert abs(predicted["total"] - counted) <= 2e-3 * counted, (predicted, counted)


def test_parts_and_modes_relate():
    model = live_model(layers=4)
    seq, diag = flops.run_flops(model, 64, mode="sequential"), flops.run_flops(model, 64, mode="diagonal")
    ideal = flops.run_flops(model, 64, mode="ideal")
    assert seq["mlp"] == diag["mlp"] == ideal["mlp"]                  # full segments: same cells
    assert flops.run_flops(model, 64, mode="schedule") == ideal       # the same cells, in other groups
    assert diag["read"] > seq["read"]                                 # a group reads once any layer has memory
    assert ideal["lm_head"] == 0 and seq["lm_head"] == diag["lm_head"] > 0
    assert sum(seq[p] for p in flops.PARTS) == seq["total"]
    with pytest.raises(ValueError, match="unknown mode"):
        flops.run_flops(model, 64, mode="paralel")


def test_peak_probes_and_machine():
    peak = flops.mm_peak(sizes=(64, 128), repeats=2)
    assert peak["peak"] == max(peak["gflops_by_size"].values()) > 0
    rates = flops.gemm_rates(live_model(layers=2), repeats=2)
    assert set(rates) == set(flops.step_gemms(live_model(layers=2))) and min(rates.values()) > 0
    info = flops.machine()
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and info["torch"] == torch.__version__


def test_bench_rows_carry_flops_peak_and_machine():
    from diaglab import bench
    model = live_model(layers=2)
    rows = bench.run_bench(model, bench.make_inputs(model, segments=[1, 3]), ("sequential", "diagonal", "ideal"),
                           warmup=0, repeats=1, anchor_sizes=(64,))
    for r in rows:
        assert r["gflop"] * 1e9 == flops.run_flops(model, r["tokens"], 1, r["mode"])["total"]
        assert r["gflops"] == r["gflop"] / r["seconds"]
        assert abs(r["pct_of_peak"] - 100 * r["gflops"] / r["peak_gflops"]) < 1e-9
        assert r["peak_mm_size"] == 64 and r["peak_gflops_at_start"] > 0 and r["peak_gflops"] > 0
        assert r["mode"] != bench.PEAK_MODE                     # the mm round is the peak, not a row
        assert r["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
        assert set(r["plateau_gemm_gflops"]) == set(flops.step_gemms(model))
    assert "% peak" in bench.table(rows) and "torch.mm" in bench.table(rows)
    by_point = {}
    for r in rows:
        by_point.setdefault(r["segments"], set()).add(r["peak_gflops"])
    assert all(len(peaks) == 1 for peaks in by_point.values())    # one peak per point, shared by its modes
    from diaglab import viz
    assert len(viz.roofline_figure(rows).data) == 3


def test_width_and_batch_sweeps_produce_their_rows(tmp_path):
    from diaglab import bench, viz
    out = tmp_path / "sweep.json"
    rows = bench.main(["--widths", "32,64", "--batch", "1,2", "--segments", "2", "--layers", "2",
                       "--modes", "sequential,diagonal", "--warmup", "0", "--repeats", "1", "--no-progress",
                       "--json", str(out)])
    got = {(r["hidden"], r["batch"], r["mode"]) for r in rows}
    assert got == {(d, b, m) for d in (32, 64) for b in (1, 2) for m in ("sequential", "diagonal")}
    assert all("gflops" in r and "pct_of_peak" in r for r in rows)
    text = bench.table(rows)
    assert max(len(line) for line in text.splitlines()) <= 100 and " B " in text.splitlines()[0] + " "
    assert len(viz.roofline_figure(rows, x="hidden").data) == 2 * 2   # a line per mode and batch
    assert len(viz.roofline_figure(rows, x="batch").data) == 2 * 2    # a line per mode and width


def test_bad_width_is_refused_before_any_work(capsys):
    from diaglab import bench
    with pytest.raises(SystemExit) as e:
        bench.main(["--widths", "64,30", "--segments", "1"])
    assert e.value.code == 2 and "--widths: hidden (30) must be divisible by heads (4)" in capsys.readouterr().err


def test_bad_arguments_are_refused_by_name():
    model = live_model(layers=2)
    for kw, match in ((dict(tokens=0), "tokens"), (dict(tokens=8, batch=-1), "batch"),
                      (dict(tokens=8, keep_logits="last"), "keep_logits")):
        with pytest.raises(ValueError, match=match):
            flops.run_flops(model, **kw)
    for sizes in ((), (0,)):
        with pytest.raises(ValueError, match="sizes"):
            flops.mm_peak(sizes=sizes)
    from diaglab import bench
    with pytest.raises(ValueError, match="requests is empty"):
        bench.run_queue_bench(model, [], warmup=0, repeats=1)


def test_timed_is_the_median_and_needs_a_repeat(monkeypatch):
    """An even count of repeats takes the mean of the two middle times (statistics.median),
    as the benchmark does, not the upper one."""
    import time
    ticks = iter([0.0, 1.0, 10.0, 12.0, 20.0, 23.0, 30.0, 34.0])   # calls of 1, 2, 3 and 4 s
    monkeypatch.setattr(time, "perf_counter", lambda: next(ticks))
    assert flops._timed(lambda: None, torch.device("cpu"), 4) == 2.5
    monkeypatch.undo()
    with pytest.raises(ValueError, match="repeats must be an int >= 1, got 0"):
        flops._timed(lambda: None, torch.device("cpu"), 0)


def test_peak_probes_refuse_bad_arguments_by_name():
    from diaglab import _checks, bench
    model = live_model(layers=2)
    for kw, match in ((dict(batch=0), "batch must be an int >= 1"), (dict(repeats=0), "repeats must be an int >= 1")):
        with pytest.raises(ValueError, match=match):
            flops.gemm_rates(model, **kw)
    with pytest.raises(ValueError, match="floating-point torch.dtype .* got str 'float32'"):
        flops.mm_peak("float32", sizes=(16,))
    for dtype in (torch.int32, torch.bool):
        with pytest.raises(ValueError, match="dtype must be a floating-point torch.dtype"):
            flops.mm_peak(dtype, sizes=(16,))
    with pytest.raises(ValueError, match="repeats"):
        flops.mm_peak(sizes=(16,), repeats=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available here"):
            flops.mm_peak(device="cuda", sizes=(16,))
    assert bench.check_device is _checks.check_device                 # the benchmark's name still works
