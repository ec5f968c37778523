"""Argument checks shared by the library (no torch: schedule.py stays torch-free)."""

from __future__ import annotations


def check_int(name: str, value, low: int, high: int | None = None) -> None:
    """Raise a ValueError naming `name` unless value is an int (not a bool) in [low, high]."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        wanted = f">= {low}" if high is None else f"in [{low}, {high}]"
        got = f"{type(value).__name__} {value!r}" if not isinstance(value, int) or isinstance(value, bool) else value
        raise ValueError(f"{name} must be an int {wanted}, got {got}")
