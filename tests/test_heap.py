"""diaglab.heap: the allocator setting the benchmarks use is applied where glibc exists,
reported in the machine identity, and changes no numbers."""

import ctypes.util
import subprocess
import sys

import pytest


def test_keep_freed_memory_in_a_fresh_process():
    code = ("import torch, resource\n"
            "from diaglab import heap, flops\n"
            "assert heap.setting().startswith('default')\n"
            "def faults(n=20):\n"
            "    x = torch.randn(64, 4096)\n"
            "    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "    for _ in range(n):\n"
            "        y = torch.empty(8 << 20 >> 2).fill_(1.0); del y   # 8 MB, freed at once\n"
            "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0\n"
            "import diaglab\n"
            "model = diaglab.randomize_memory_(diaglab.tiny_armt(layers=2, segment_size=8, num_mem_tokens=2))\n"
            "ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))\n"
            "with torch.no_grad():\n"
            "    plain = diaglab.DiagonalExecutor(model)(ids).logits\n"
            "before = faults()\n"
            "got = heap.keep_freed_memory()\n"
            "assert got and heap.keep_freed_memory() == got and 'mallopt' in got, got\n"
            "assert flops.machine()['malloc'] == got\n"
            "faults(2)\n"
            "after = faults()\n"
            "print(before, after)\n"
            "assert after < before / 4, (before, after)\n"
            "with torch.no_grad():\n"
            "    assert torch.equal(diaglab.DiagonalExecutor(model)(ids).logits, plain)   # no number changes\n")
    if not sys.platform.startswith("linux") or "libc" not in (ctypes.util.find_library("c") or ""):
        pytest.skip("glibc only")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_bench_flag_keeps_the_default_allocator():
    from diaglab.bench import parse_args
    assert parse_args(["--segments", "1"]).keep_heap is True
    assert parse_args(["--segments", "1", "--default-malloc"]).keep_heap is False
