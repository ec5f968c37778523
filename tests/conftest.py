"""Shared helpers: small models with the memory path switched on, and error metrics."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import diaglab  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error ||a - b|| / ||b|| (computed in float64)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def live_model(layers=3, segment_size=8, num_mem_tokens=4, seed=0, **kw) -> diaglab.ARMT:
    """A tiny ARMT whose memory path does something: random non-zero W_mv and distinct
    per-layer W_mb biases (with W_mv = 0 the memory is inert — design §2)."""
    return diaglab.randomize_memory_(inert_model(layers, segment_size, num_mem_tokens, seed, **kw), seed=seed + 1)


def inert_model(layers=3, segment_size=8, num_mem_tokens=4, seed=0, **kw) -> diaglab.ARMT:
    """The same tiny ARMT as live_model(seed=seed) before randomize_memory_: the paper's
    W_mv = 0, so W_mem stays 0 and the memory adds nothing."""
    return diaglab.tiny_armt(layers=layers, segment_size=segment_size, num_mem_tokens=num_mem_tokens,
                             seed=seed, **kw)


def random_ids(B, N, vocab=256, seed=0):
    return torch.randint(0, vocab, (B, N), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def model():
    return live_model()
