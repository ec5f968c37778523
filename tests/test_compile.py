"""The opt-in compiled full-group step (DiagonalExecutor(compile=True)) gives the sequential
numbers (fp32 <= 1e-5, live memory) and reports its compile time. About 20-40 s of compile
on a 2-core CPU, so one small model, one test."""

import time

import pytest
import torch
from conftest import live_model, random_ids
from test_diagonal import assert_same

from diaglab import DiagonalExecutor


def test_compiled_executor_equals_sequential():
    model = live_model(layers=2, hidden=64, heads=2, kv_heads=1, intermediate=96)   # segment 8
    ex = DiagonalExecutor(model, compile=True)
    ids = random_ids(2, 8 * 6 + 3)                      # a plateau of full groups, ramps, an open segment
    with torch.no_grad():
        first = ex(ids, labels=ids)
        assert ex.compile_seconds is not None and ex.compile_seconds > 0
        seconds = ex.compile_seconds
        t0 = time.perf_counter()
        again = ex(ids, labels=ids)                     # reuses the compiled step
        call = time.perf_counter() - t0
    assert seconds > call    # the first compiled step traced and compiled: more than a whole later call
    with torch.no_grad():
        seq = model(ids, labels=ids)
    assert ex.compile_seconds == seconds
    assert_same(seq, first, 1e-5)
    assert_same(seq, again, 1e-5)


def test_compile_arguments_are_checked(model):
    with pytest.raises(TypeError, match="compile must be True or False"):
        DiagonalExecutor(model, compile="yes")
    with pytest.raises(ValueError, match="compile_mode"):
        DiagonalExecutor(model, compile=True, compile_mode="fast")
    with pytest.raises(ValueError, match="compile=True as well"):
        DiagonalExecutor(model, compile_mode="default")
    with pytest.raises(ValueError, match="CUDA"), torch.no_grad():
        DiagonalExecutor(model, compile=True, compile_mode="reduce-overhead")(random_ids(1, 30))


def test_bench_compiled_mode_row():
    from diaglab import bench
    model = live_model(layers=2, hidden=64, heads=2, kv_heads=1, intermediate=96)
    rows = bench.run_bench(model, bench.make_inputs(model, segments=[4]), ("diagonal", "diagonal_compiled"),
                           warmup=1, repeats=1, anchor_sizes=(64,))
    compiled = next(r for r in rows if r["mode"] == "diagonal_compiled")
    assert compiled["compile_seconds"] > 0 and compiled["gflop"] == next(
        r["gflop"] for r in rows if r["mode"] == "diagonal")
    assert "diagonal_compiled" in bench.table(rows)
