"""Argument checks shared by the library (no torch: schedule.py stays torch-free)."""

from __future__ import annotations

import argparse

# Upper bounds of integer settings: far above any real run, so a typo's extra digits fail in one
# line, not later in a C int overflow or a config that builds 10^20 layers (it would hang)
MAX_COUNT = 10**6
MAX_THREADS = 4096     # each one an OS thread: more than any machine's cores
MAX_SEED = 2**32 - 1   # a seed as every generator takes it (train derives per-step seeds from it)


def check_int(name: str, value, low: int, high: int | None = None) -> None:
    """Raise a ValueError naming `name` unless value is an int (not a bool) in [low, high]."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        wanted = f">= {low}" if high is None else f"in [{low}, {high}]"
        got = f"{type(value).__name__} {value!r}" if not isinstance(value, int) or isinstance(value, bool) else value
        raise ValueError(f"{name} must be an int {wanted}, got {got}")


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit code 2), without the
    usage block: each names the flag and what it accepts, and --help has the rest. Every
    command line of the suite uses it. Abbreviated flags are refused unless allow_abbrev=True is
    passed (argparse would take --seg for --segments, and a later flag could change its meaning)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (--help lists every flag)\n")


def check_device(device):
    """torch.device(device), or a ValueError that says how to get CUDA when it is missing."""
    import torch   # here, not at the top: this module stays importable without torch
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        build = "a CPU build of torch" if torch.version.cuda is None else "no visible GPU"
        raise ValueError(f"device {str(dev)!r} asked for, but CUDA is not available here ({build}, torch "
                         f"{torch.__version__}): use device 'cpu', or install a CUDA build of torch "
                         "(README: GPU users)")
    return dev
