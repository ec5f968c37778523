"""Peak memory of a block of code: how many bytes it needed above what was in use when it
began (weights and inputs excluded), so sizes and devices compare.

  - CUDA: torch.cuda.max_memory_allocated (peak stats reset at the start) minus
    memory_allocated at the start — the tensors torch allocated, not the caching
    allocator's reserve.
  - CPU (Linux): growth of the process's resident set. The kernel's peak (VmHWM in
    /proc/self/status) is reset through /proc/self/clear_refs at the start, so the peak
    belongs to this block and not to everything the process did before (ru_maxrss only
    ever grows). glibc keeps freed memory for reuse, and reusing it would not show in
    RSS, so the start also hands free heap pages back (malloc_trim): whatever the block
    touches then shows up. RSS counts whole 4 KiB pages and everything in them (Python
    objects, allocator bookkeeping), so it bounds the tensor bytes from above and is
    coarse — a MiB or two — for blocks of small tensors. Trimming makes the next
    allocations fault their pages in again: time and measure memory in separate calls
    (bench does).
  - anywhere else: None; no per-block peak is available without a fresh process.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import torch

_KIB = 1024


def _proc_status_bytes(field: str) -> int | None:
    """A 'kB' field of /proc/self/status (VmRSS, VmHWM) in bytes, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * _KIB
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    """Set the kernel's peak RSS (VmHWM) to the current RSS; False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _release_free_heap() -> None:
    """Give glibc's free heap pages back to the OS (malloc_trim), so that using them again
    shows up in RSS. A no-op off glibc (then CPU peaks are lower bounds)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _finish_queued_work(device: torch.device) -> None:
    # CUDA allocations of queued kernels count only once those kernels have run
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak bytes in use during a block above those in use when it began (module docstring
    says what that means per device). `with PeakMemory(device) as pm: ...` then pm.bytes;
    pm.bytes is None where the platform cannot measure it.

    For per-step peaks: start() once, then read() and reset_peak() after every step. On
    CPU the heap is trimmed only at start(), so within a run freed memory is reused
    unseen and each step reads the resident growth of the run so far.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.bytes: int | None = None
        self._base: int | None = None

    def start(self) -> None:
        _finish_queued_work(self.device)
        if self.device.type == "cuda":
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _release_free_heap()
            self._base = _proc_status_bytes("VmRSS")
        self.reset_peak()

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif not _reset_rss_peak():
            self._base = None  # a peak that cannot be reset would be the whole process's

    def read(self) -> int | None:
        """Peak bytes above the start since the last reset_peak()."""
        _finish_queued_work(self.device)
        if self._base is None:
            return None
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _proc_status_bytes("VmHWM")
        return None if peak is None else max(0, peak - self._base)

    def __enter__(self) -> "PeakMemory":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bytes = self.read()


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[object, int | None]:
    """Run fn() once; return (its result, peak bytes above those in use before the call)."""
    with PeakMemory(device) as pm:
        result = fn()
    return result, pm.bytes
