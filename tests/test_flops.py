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
@pytest.mark.parametrize("mode", ["sequential", "sequential_grouped", "diagonal", "full"])
def test_formula_matches_the_operator_count(mode, N):
    model = live_model(layers=3, heads=4, kv_heads=2)   # segment 8, GQA
    ids = random_ids(2, N)
    run = {"sequential": lambda: model(ids, keep_logits="last_segment"),
           "sequential_grouped": lambda: DiagonalExecutor(model, order="sequential")(ids, keep_logits="last_segment"),
           "diagonal": lambda: DiagonalExecutor(model)(ids, keep_logits="last_segment"),
           "full": lambda: model.base(ids, logits_to_keep=1)}[mode]
    predicted = flops.run_flops(model, N, batch=2, mode=mode)
    counted = _counted(run)
    # the counter also sees RoPE's tiny angle product (2 * hd/2 * T per table): within 0.2 %
    assert abs(predicted["total"] - counted) <= 2e-3 * counted, (predicted, counted)


def test_parts_and_modes_relate():
    model = live_model(layers=4)
    seq, diag = flops.run_flops(model, 64, mode="sequential"), flops.run_flops(model, 64, mode="diagonal")
    ideal = flops.run_flops(model, 64, mode="ideal")
    assert seq["mlp"] == diag["mlp"] == ideal["mlp"]                  # full segments: same cells
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
