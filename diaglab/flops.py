"""How much arithmetic each mode does, and how fast this machine can do it.

FLOPs here are matmul FLOPs (2 per multiply-add) of the products each mode actually
computes — the ones that dominate, and the ones torch.utils.flop_counter counts;
elementwise work (norms, DPFP, softmax, SiLU) is left out. One cell (a layer on one
segment of T = n_text + M rows, batch B) costs:

    read       2 B T d d_mem  (q = h W_mq^T)  + 2 B T dk d  (q W_mem)  + 2 B T dk  (q . z)
    attention  2 B T d (H + 2 Hkv) hd  (q, k, v)  + 2 B T H hd d  (o)  + 4 B H T^2 hd  (QK^T, AV)
    mlp        2 B T d 2F  (gate, up)  + 2 B T F d  (down)
    write      2 B M d (d_mem + d + 1)  (W_mk, W_mv, W_mb)  + 4 B M dk d  (k W_mem, the update)  + 2 B M dk
    lm_head    2 B n_s d V per segment whose logits are computed

What differs between modes is which cells compute what (design §3-4):
  - sequential: a segment's real length (T = n_s + M); the read from a layer's second segment on;
  - sequential_grouped, diagonal: short segments padded to n; a grouped step computes the read
    for all of its layers once any of them has memory (masked where it has none);
  - ideal: S full groups of L cells, reads on, no LM head (the yardstick's unit of work);
    schedule (the bare diagonal schedule): the same L S cells in L + S - 1 groups, the same work;
  - full: the base model on all N tokens at once (attention N^2), logits of the last token only.

`mm_peak` measures the machine's anchor: torch.mm GFLOP/s at large square sizes, and
`gemm_rates` the plateau step's own GEMM shapes, so a mode's achieved GFLOP/s can be put
against what the hardware does (`machine()` names the hardware).
"""

from __future__ import annotations

import platform
import statistics

import torch

from . import heap
from ._checks import check_device, check_int
from .profiling import timed

PARTS = ("read", "attention", "mlp", "write", "lm_head")


def _sizes(model) -> dict:
    c = model.base.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return dict(d=c.hidden_size, H=c.num_attention_heads, Hkv=c.num_key_value_heads, hd=hd,
                F=c.intermediate_size, V=c.vocab_size, d_mem=model.config.d_mem, dk=model.config.d_key,
                M=model.config.num_mem_tokens, L=c.num_hidden_layers, n=model.config.segment_size)


def cell_flops(model, B: int, n_text: int, read: bool, memory_rows: bool = True) -> dict[str, int]:
    """Matmul FLOPs of one layer on one segment with n_text text rows (see the module doc)."""
    z = _sizes(model)
    d, H, Hkv, hd, F, dk, d_mem = z["d"], z["H"], z["Hkv"], z["hd"], z["F"], z["dk"], z["d_mem"]
    M = z["M"] if memory_rows else 0
    T = n_text + M
    return {
        "read": (2 * B * T * d * d_mem + 2 * B * T * dk * d + 2 * B * T * dk) if read else 0,
        "attention": 2 * B * T * d * (H + 2 * Hkv) * hd + 2 * B * T * H * hd * d + 4 * B * H * T * T * hd,
        "mlp": 2 * B * T * d * 2 * F + 2 * B * T * F * d,
        "write": (2 * B * M * d * (d_mem + d + 1) + 4 * B * M * dk * d + 2 * B * M * dk) if M else 0,
        "lm_head": 0,
    }


def _add(total: dict[str, int], part: dict[str, int], times: int = 1) -> None:
    for k, v in part.items():
        total[k] = total.get(k, 0) + times * v


def run_flops(model, tokens: int, batch: int = 1, mode: str = "diagonal",
              keep_logits: str = "last_segment") -> dict[str, int]:
    """Matmul FLOPs of one forward pass of `mode` over `tokens` tokens (batch rows, no padding):
    per part (PARTS) and 'total'. keep_logits: which segments the LM head runs on."""
    check_int("tokens", tokens, 1)
    check_int("batch", batch, 1)
    if keep_logits not in ("all", "last_segment", "none"):
        raise ValueError(f"keep_logits must be 'all', 'last_segment' or 'none', got {keep_logits!r}")
    z = _sizes(model)
    L, n, d, V, B = z["L"], z["n"], z["d"], z["V"], batch
    lengths = [min(n, tokens - a) for a in range(0, tokens, n)]               # n_s of each segment
    S = len(lengths)
    out = dict.fromkeys(PARTS, 0)
    if mode == "full":
        _add(out, cell_flops(model, B, tokens, read=False, memory_rows=False), L)
        out["lm_head"] = 2 * B * d * V                                        # logits_to_keep=1
    elif mode in ("ideal", "schedule"):   # the bare schedule reads in every cell, as the ideal's steps do
        _add(out, cell_flops(model, B, n, read=True), L * S)
    elif mode == "sequential":
        for s, n_s in enumerate(lengths):
            _add(out, cell_flops(model, B, n_s, read=s > 0), L)
    elif mode in ("diagonal", "sequential_grouped"):
        steps = ([[(l, t - l) for l in range(max(0, t - S + 1), min(t, L - 1) + 1)] for t in range(L + S - 1)]
                 if mode == "diagonal" else [[(l, s)] for s in range(S) for l in range(L)])
        for cells in steps:
            read = max(s for _, s in cells) > 0                                # some layer of the group has memory
            _add(out, cell_flops(model, B, n, read=read), len(cells))
    else:
        raise ValueError(f"unknown mode {mode!r}; choose full, sequential, sequential_grouped, diagonal, ideal or "
                         "schedule")
    if mode not in ("full", "ideal", "schedule"):
        kept = lengths if keep_logits == "all" else lengths[-1:] if keep_logits == "last_segment" else []
        out["lm_head"] = sum(2 * B * n_s * d * V for n_s in kept)
    out["total"] = sum(out[p] for p in PARTS)
    return out


# ---- the machine's own limit -------------------------------------------------------------
def _timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of fn() over repeats (profiling.timed), after one warm-up call."""
    check_int("repeats", repeats, 1)
    fn()
    return statistics.median(timed(fn, device)[1] for _ in range(repeats))


def _check_dtype(dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        got = f"{type(dtype).__name__} {dtype!r}" if not isinstance(dtype, torch.dtype) else dtype
        raise ValueError(f"dtype must be a floating-point torch.dtype such as torch.float32 or torch.bfloat16 "
                         f"(the peak of the model's matmuls), got {got}")


def mm_peak(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
            sizes: tuple[int, ...] = (512, 1024, 2048), repeats: int = 5) -> dict:
    """torch.mm GFLOP/s on square (s, s) @ (s, s) products; 'peak' is the best size."""
    _check_dtype(dtype)
    if not sizes:
        raise ValueError("sizes is empty: give at least one matrix size, such as (512, 1024)")
    for s in sizes:
        check_int("each of sizes", s, 16)
    dev = check_device(device)
    g = torch.Generator().manual_seed(0)
    rates = {}
    for s in sizes:
        a = torch.randn(s, s, generator=g).to(dev, dtype)
        b = torch.randn(s, s, generator=g).to(dev, dtype)
        rates[str(s)] = 2 * s ** 3 / _timed(lambda: torch.mm(a, b), dev, repeats) / 1e9   # str keys: JSON
    return {"dtype": str(dtype).removeprefix("torch."), "gflops_by_size": rates, "peak": max(rates.values())}


def step_gemms(model, batch: int = 1) -> dict[str, tuple[int, int, int, int]]:
    """The plateau step's batched GEMMs (all L layers busy): name -> (G, rows, in, out)."""
    z = _sizes(model)
    L, d, H, Hkv, hd, F, M, n = z["L"], z["d"], z["H"], z["Hkv"], z["hd"], z["F"], z["M"], z["n"]
    R = batch * (n + M)
    return {"W_mq": (L, R, d, z["d_mem"]), "qkv_proj": (L, R, d, (H + 2 * Hkv) * hd), "o_proj": (L, R, H * hd, d),
            "gate_up_proj": (L, R, d, 2 * F), "down_proj": (L, R, F, d), "W_mkvb": (L, batch * M, d, z["d_mem"] + d + 1)}


def gemm_rates(model, batch: int = 1, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of torch.bmm on each plateau GEMM shape, in the model's dtype and device."""
    check_int("batch", batch, 1)   # repeats: _timed checks it
    g = torch.Generator().manual_seed(0)
    rates = {}
    for name, (G, R, k, m) in step_gemms(model, batch).items():
        x = torch.randn(G, R, k, generator=g).to(model.device, model.dtype)
        w = torch.randn(G, k, m, generator=g).to(model.device, model.dtype)
        rates[name] = 2 * G * R * k * m / _timed(lambda: torch.bmm(x, w), model.device, repeats) / 1e9
    return rates


def machine(device: str | torch.device = "cpu") -> dict:
    """What the figures were measured on: CPU model and capability, threads, torch; GPU name on CUDA."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "malloc": heap.setting()}
    dev = torch.device(device)
    if dev.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(dev), cuda=torch.version.cuda)
    return info
