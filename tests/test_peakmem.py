"""Peak memory is per block: a large allocation shows, and an earlier block's peak does not
leak into the next one."""

import sys

import pytest
import torch

from diaglab.peakmem import PeakMemory, peak_memory


@pytest.mark.skipif(sys.platform != "linux", reason="per-block CPU peaks need /proc/self/clear_refs")
def test_peak_memory_is_per_block_on_cpu():
    size = 64 * 2**20
    _, big = peak_memory(lambda: torch.ones(size // 4).sum())        # a 64 MiB float32 tensor, touched
    assert big >= 0.9 * size
    with PeakMemory("cpu") as pm:                                     # the earlier peak must not leak in
        torch.ones(1024).sum()
    assert pm.bytes < 0.5 * size
