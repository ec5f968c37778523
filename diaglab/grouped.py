"""Grouped execution of one diagonal step (SPEC §4): G consecutive layers lo..hi, each
on its own segment, run as ONE call per operation.

Per-layer weights are stacked once along a leading layer axis — q|k|v fused as
(L, Dq + 2 Dkv, d), gate|up as (L, 2F, d), down, o, both norms, W_mq, W_mk|W_mv|W_mb —
and a step uses the slice W[lo:hi+1], a view. Every projection is then one batched
matmul X[g] @ W[lo + g]^T (torch.bmm / baddbmm); attention folds the group into the
batch, so each element attends only within its own segment; RoPE tables are shared
because positions restart at 0 in every segment.

The naive twin is a loop over layers calling each nn.Linear: `grouped_linear_ref`.
`torch._grouped_mm` (a grouped-GEMM kernel, CUTLASS on Hopper GPUs) sits behind the same
interface (kernel="grouped_mm"). Measured on this CPU (torch 2.13, G=8, 40 rows, 128x384):
bmm 329 us vs grouped_mm 377 us in fp32, 95 vs 117 us in bf16 — so "bmm" is the default;
with equal-shape groups a strided batched GEMM is already what a grouped GEMM would do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .memory import associative_read, associative_write, features


# ---- stacked weights -------------------------------------------------------------------
def _param_groups(model) -> dict[str, list[list[torch.Tensor]]]:
    """name -> per layer, the parameters concatenated (along dim 0) into that stack."""
    layers, assoc = model.base.model.layers, model.assoc
    groups = {
        "qkv": [[b.self_attn.q_proj.weight, b.self_attn.k_proj.weight, b.self_attn.v_proj.weight] for b in layers],
        "o": [[b.self_attn.o_proj.weight] for b in layers],
        "gate_up": [[b.mlp.gate_proj.weight, b.mlp.up_proj.weight] for b in layers],
        "down": [[b.mlp.down_proj.weight] for b in layers],
        "ln1": [[b.input_layernorm.weight] for b in layers],
        "ln2": [[b.post_attention_layernorm.weight] for b in layers],
        "mq": [[a.W_mq.weight] for a in assoc],
        "kvb": [[a.W_mk.weight, a.W_mv.weight, a.W_mb.weight] for a in assoc],
        "mb_bias": [[a.W_mb.bias] for a in assoc],
    }
    if layers[0].self_attn.q_proj.bias is not None:
        groups["qkv_b"] = [[b.self_attn.q_proj.bias, b.self_attn.k_proj.bias, b.self_attn.v_proj.bias]
                           for b in layers]
        groups["o_b"] = [[b.self_attn.o_proj.bias] for b in layers]
    if layers[0].mlp.gate_proj.bias is not None:
        groups["gate_up_b"] = [[b.mlp.gate_proj.bias, b.mlp.up_proj.bias] for b in layers]
        groups["down_b"] = [[b.mlp.down_proj.bias] for b in layers]
    for name, per_layer in groups.items():
        shapes = {tuple(tuple(p.shape) for p in ps) for ps in per_layer}
        if len(shapes) != 1 or any(p is None for ps in per_layer for p in ps):
            raise ValueError(f"cannot group layers of different shapes ({name}: {sorted(shapes)}); "
                             "the diagonal executor needs identical decoder layers — run the model sequentially")
    return groups


def gather_stacks(model) -> dict[str, torch.Tensor]:
    """Stack the current parameters with torch.stack/cat: differentiable, a copy per call.
    Used when autograd must reach the per-layer parameters (training)."""
    return {name: torch.stack([torch.cat(ps, 0) if len(ps) > 1 else ps[0] for ps in per_layer])
            for name, per_layer in _param_groups(model).items()}


class TiedStacks:
    """Stacks that OWN the layer weights: each per-layer parameter's storage is re-pointed
    to a view of its stack, so values stay the model's own (an optimiser step or
    load_state_dict updates both at once) and nothing is copied per call. If the model's
    parameters already live in such stacks (another executor tied them), those are
    adopted as they are, so several executors share one copy. If the model is moved or
    cast (new storages), `is_valid` turns False and the executor re-ties."""

    def __init__(self, model):
        self.tensors: dict[str, torch.Tensor] = {}
        self._views: list[tuple[torch.Tensor, int]] = []
        with torch.no_grad():
            for name, per_layer in _param_groups(model).items():
                stack = _existing_stack(per_layer)
                if stack is None:
                    first = per_layer[0]
                    rows = sum(p.shape[0] for p in first)
                    stack = torch.empty((len(per_layer), rows, *first[0].shape[1:]),
                                        dtype=first[0].dtype, device=first[0].device)
                for l, ps in enumerate(per_layer):
                    r = 0
                    for p in ps:
                        view = stack[l, r:r + p.shape[0]]
                        if p.data_ptr() != view.data_ptr():
                            view.copy_(p)
                            p.data = view
                        self._views.append((p, view.data_ptr()))
                        r += p.shape[0]
                self.tensors[name] = stack

    def is_valid(self, model) -> bool:
        return all(p.data_ptr() == ptr for p, ptr in self._views)


def _existing_stack(per_layer: list[list[torch.Tensor]]) -> torch.Tensor | None:
    """The (L, rows, ...) stack these parameters already are views of, laid out exactly as
    TiedStacks lays it out, or None."""
    first = per_layer[0][0]
    storage = first.untyped_storage()
    rows = sum(p.shape[0] for p in per_layer[0])
    shape = (len(per_layer), rows, *first.shape[1:])
    row_numel = first[0].numel() if first.dim() > 1 else 1
    start = first.storage_offset()
    if storage.nbytes() < (start + math.prod(shape)) * first.element_size():
        return None
    for l, ps in enumerate(per_layer):
        r = 0
        for p in ps:
            want = start + (l * rows + r) * row_numel
            if (p.untyped_storage().data_ptr() != storage.data_ptr() or p.storage_offset() != want
                    or not p.is_contiguous() or p.dtype != first.dtype):
                return None
            r += p.shape[0]
    return torch.empty(0, dtype=first.dtype, device=first.device).set_(storage, start, shape)


# ---- grouped operations (one call for the whole group) ----------------------------------
PHASES = ("read", "attention", "mlp", "write")  # the parts of a grouped step, as labelled for torch.profiler


def _phase(name: str) -> torch.profiler.record_function:
    """A torch.profiler range 'phase <name>' (about a microsecond when no profiler runs)."""
    return torch.profiler.record_function(f"phase {name}")


def grouped_linear(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None = None,
                   kernel: str = "bmm") -> torch.Tensor:
    """x: (G, R, in); W: (G, out, in) stacked nn.Linear weights; b: (G, out) -> (G, R, out)."""
    if kernel == "grouped_mm":
        y = torch._grouped_mm(x, W.transpose(1, 2))
        return y if b is None else y + b.unsqueeze(1)
    if b is None:
        return torch.bmm(x, W.transpose(1, 2))
    return torch.baddbmm(b.unsqueeze(1), x, W.transpose(1, 2))


def grouped_linear_ref(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """The naive twin of grouped_linear: one F.linear per layer, then stacked."""
    return torch.stack([F.linear(x[g], W[g], None if b is None else b[g]) for g in range(x.shape[0])])


def grouped_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x: (G, B, T, d); w: (G, d). LLaMA's RMSNorm (statistics in float32) per group element."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return w[:, None, None, :] * x32.to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE: x (..., T, hd) rotated by angle tables cos/sin (..., T, hd) (halves convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@dataclass(frozen=True)
class LayerDims:
    heads: int
    kv_heads: int
    head_dim: int
    eps: float       # RMSNorm epsilon
    d_mem: int
    nu: int
    correction: bool
    normalize: bool = False  # unit-length DPFP features (ARMTConfig.normalize_keys)
    kernel: str = "bmm"  # grouped matmul: "bmm" or "grouped_mm" (torch._grouped_mm)

    @classmethod
    def of(cls, model, kernel: str = "bmm") -> "LayerDims":
        c = model.base.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(c.num_attention_heads, c.num_key_value_heads, head_dim, c.rms_norm_eps,
                   model.config.d_mem, model.config.nu, model.config.correction,
                   model.config.normalize_keys, kernel)


def grouped_layer(W: dict[str, torch.Tensor], lo: int, hi: int, X: torch.Tensor, n_text: int,
                  cos: torch.Tensor, sin: torch.Tensor, attn_mask: torch.Tensor | None,
                  W_mem: torch.Tensor, z: torch.Tensor, is_first: torch.Tensor,
                  write_mask: torch.Tensor | None, dims: LayerDims, read: bool = True):
    """Read, decoder layer and write for the layers lo..hi at once (one diagonal step).

    X: (G, B, T, d) inputs, element g = layer lo + g on its own segment; T = n_text + M.
    cos, sin: (1 or G*B, T, hd); attn_mask: (G*B, 1, T, T) bool or None (plain causal).
    W_mem: (G, B, dk, d); z: (G, B, dk); is_first, write_mask: (G, B) bool.
    read: False when every element is on its layer's first segment (the caller knows it on
    the host, which spares a device sync per step).
    Returns Y (G, B, T, d) and the new W_mem, z.
    """
    G, B, T, d = X.shape
    H, Hkv, hd = dims.heads, dims.kv_heads, dims.head_dim
    w = {name: t[lo:hi + 1] for name, t in W.items()}                           # views, no copy
    # 1. associative read into every row of the layer input (not on a layer's first segment)
    if read:
        with _phase("read"):
            q = grouped_linear(X.reshape(G, B * T, d), w["mq"], kernel=dims.kernel)
            q = features(q, dims.nu, dims.normalize)                               # (G, B*T, dk)
            A = associative_read(q.view(G, B, T, -1), W_mem, z).to(X.dtype)       # (G, B, T, d)
            X = X + torch.where(is_first[:, :, None, None], torch.zeros_like(A), A)
    # 2. self-attention block (LLaMA), the group folded into the batch
    with _phase("attention"):
        h = grouped_rms_norm(X, w["ln1"], dims.eps).reshape(G, B * T, d)
        qkv = grouped_linear(h, w["qkv"], w.get("qkv_b"), kernel=dims.kernel)     # (G, B*T, (H+2Hkv) hd)
        q, k, v = qkv.split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
        q = q.reshape(G * B, T, H, hd).transpose(1, 2)                             # (G*B, H, T, hd)
        k = k.reshape(G * B, T, Hkv, hd).transpose(1, 2)                           # (G*B, Hkv, T, hd)
        v = v.reshape(G * B, T, Hkv, hd).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)                              # (., 1, T, hd)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                             scale=hd ** -0.5, enable_gqa=H != Hkv)  # (G*B, H, T, hd)
        att = att.transpose(1, 2).reshape(G, B * T, H * hd)
        X = X + grouped_linear(att, w["o"], w.get("o_b"), kernel=dims.kernel).view(G, B, T, d)
    # 3. SwiGLU MLP
    with _phase("mlp"):
        h = grouped_rms_norm(X, w["ln2"], dims.eps).reshape(G, B * T, d)
        gate_up = grouped_linear(h, w["gate_up"], w.get("gate_up_b"), kernel=dims.kernel)
        gate, up = gate_up.chunk(2, dim=-1)                                        # (G, B*T, F) each
        X = X + grouped_linear(F.silu(gate) * up, w["down"], w.get("down_b"), kernel=dims.kernel).view(G, B, T, d)
    # 4. associative write from the memory rows of the output
    with _phase("write"):
        m = X[:, :, n_text:].reshape(G, -1, d)                                     # (G, B*M, d)
        kvb = grouped_linear(m, w["kvb"], kernel=dims.kernel)                      # (G, B*M, d_mem + d + 1)
        k_raw, v_mem, b = kvb.split([dims.d_mem, d, 1], dim=-1)
        M = T - n_text
        k_feat = features(k_raw, dims.nu, dims.normalize).view(G, B, M, -1)        # (G, B, M, dk)
        beta = torch.sigmoid(b + w["mb_bias"][:, None, :]).view(G, B, M, 1)
        W_mem, z = associative_write(k_feat, v_mem.view(G, B, M, d), beta, W_mem, z, is_first,
                                     dims.correction, write_mask)
    return X, W_mem, z
