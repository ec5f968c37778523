"""Keep freed memory in the process: a CPU allocator setting that the benchmarks use.

On Linux with glibc, a tensor of more than a few hundred kilobytes is mapped from the OS,
and when it is freed glibc hands the pages back (it unmaps the block, or trims the top of
the heap). The next step allocates the same sizes again, and every fresh 4 KiB page costs
a page fault on first touch. A grouped step on the `small` preset makes about 2,000 such
faults (its gate|up product alone is 5 MB), which is 15-25 % of the step on a 2-core CPU;
the sequential model pays the same tax per layer call. Serving stacks avoid it with
jemalloc or tcmalloc; glibc can be told the same with two settings (the same ones as the
environment variables MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_):

    M_MMAP_THRESHOLD = 32 MiB   blocks up to this size come from the heap, not from mmap
    M_TRIM_THRESHOLD = 1 GiB    free memory at the heap's top is kept up to this much

`keep_freed_memory()` applies them to this process (glibc's mallopt). It changes no
numbers, only where temporaries come from; the process keeps up to about 1 GiB of freed
memory for reuse. diaglab.bench applies it before measuring, to every mode alike, and
records that in each row's machine identity. It is not applied on import: a library
should not change a process's allocator behind its back.
"""

from __future__ import annotations

import ctypes
import sys

from .peakmem import _libc

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3     # glibc's mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD = 32 << 20    # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = 1 << 30

_applied: str | None = None


def keep_freed_memory() -> str | None:
    """Apply the two glibc settings to this process. Returns a one-line description of what
    was set, or None where there is no glibc (macOS, Windows, musl): nothing changes there.
    Calling it again is harmless."""
    global _applied
    if _applied is not None:
        return _applied
    libc = _libc() if sys.platform.startswith("linux") else None
    if libc is None or not hasattr(libc, "mallopt"):
        return None
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mmap_ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    trim_ok = bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not (mmap_ok or trim_ok):
        return None
    parts = ([f"mmap threshold {MMAP_THRESHOLD >> 20} MiB"] if mmap_ok else []) + \
        ([f"trim threshold {TRIM_THRESHOLD >> 30} GiB"] if trim_ok else [])
    _applied = "glibc mallopt: " + ", ".join(parts)   # says what took effect, also when only one did
    return _applied


def setting() -> str:
    """What this process runs with, for a benchmark's machine identity."""
    return _applied or "default (freed blocks go back to the OS)"
