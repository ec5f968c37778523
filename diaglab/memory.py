"""The associative memory of ARMT (SPEC §2): the DPFP feature map, the read, the
delta-rule write, and the MemoryState that carries (W_mem, z, is_first) from one
segment to the next.

Every function here is shape-generic over leading dimensions, so the sequential
model (one layer: W_mem (B, dk, d)) and the diagonal executor (a group of layers:
W_mem (G, B, dk, d)) call the very same arithmetic. Shapes use the package alphabet:
B batch, T rows of a segment, M memory tokens, d model width, dk = 2 * nu * d_mem.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

EPS = 1e-5  # the paper's stabiliser in q.z + eps, k.z + eps and |k|^2 + eps


def dpfp(u: torch.Tensor, nu: int = 3) -> torch.Tensor:
    """Deterministic parameter-free projection: (..., d_mem) -> (..., 2 * nu * d_mem), >= 0.

    r = [relu(u); relu(-u)];  phi(u) = concat_{j=1..nu} r * roll(r, j)   (torch.roll semantics)
    """
    r = torch.cat([F.relu(u), F.relu(-u)], dim=-1)                        # (..., 2 d_mem)
    return torch.cat([r * torch.roll(r, shifts=j, dims=-1) for j in range(1, nu + 1)], dim=-1)  # (..., dk)


def features(u: torch.Tensor, nu: int = 3, normalize: bool = False) -> torch.Tensor:
    """dpfp(u), optionally L2-normalised along the feature axis (as the reference ARMT code does)."""
    f = dpfp(u, nu)
    return F.normalize(f, dim=-1, p=2.0) if normalize else f


def associative_read(q: torch.Tensor, W_mem: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """A(h) = (q W_mem) / (q . z + eps), in the memory's dtype.

    q: (..., T, dk) features phi(h W_mq^T); W_mem: (..., dk, d); z: (..., dk).
    Returns (..., T, d) in W_mem's dtype; the caller casts it back to the model dtype.
    """
    q = q.to(W_mem.dtype)
    num = q @ W_mem                                                        # (..., T, d)
    den = q @ z.unsqueeze(-1) + EPS                                        # (..., T, 1)
    return num / den


def first_after_write(is_first: torch.Tensor, write_mask: torch.Tensor | None) -> torch.Tensor:
    """is_first after a write: a row stays on its first segment only where the write was
    masked out (an all-padding row wrote nothing). Shapes (...) bool, as in associative_write."""
    return is_first & ~write_mask if write_mask is not None else torch.zeros_like(is_first)


def associative_write(k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                      W_mem: torch.Tensor, z: torch.Tensor, is_first: torch.Tensor,
                      correction: bool = True,
                      write_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One delta-rule update from the M memory rows of a layer's output.

    k: (..., M, dk) = phi(m W_mk^T); v: (..., M, d) = m W_mv^T; beta: (..., M, 1) = sigmoid(m W_mb^T + b).
    W_mem: (..., dk, d); z: (..., dk); is_first: (...) bool — this layer's first segment
    (then vbar = 0 and gamma = 1). write_mask: (...) bool or None — rows where it is False
    keep their old W_mem and z (a padded row with no tokens in this segment).
    Returns the new (W_mem, z); nothing is modified in place.
    """
    dt = W_mem.dtype
    k, v, beta = k.to(dt), v.to(dt), beta.to(dt)
    first = is_first[..., None]                                            # (..., 1)
    delta = (k @ z.unsqueeze(-1)).squeeze(-1) + EPS                        # (..., M)
    vbar = (k @ W_mem) / delta.unsqueeze(-1)                               # (..., M, d)
    vbar = torch.where(first[..., None], torch.zeros_like(vbar), vbar)
    if correction:
        knorm2 = (k * k).sum(-1)                                           # (..., M)
        gamma = torch.clamp(1 - delta / (knorm2 + EPS), 0.0, 1.0).detach()
        gamma = torch.where(first, torch.ones_like(gamma), gamma)
    else:
        gamma = torch.ones_like(delta)
    new_W = W_mem + k.transpose(-1, -2) @ (beta * (v - vbar))              # (..., dk, d)
    new_z = z + (gamma.unsqueeze(-1) * k).sum(-2)                          # (..., dk)
    if write_mask is not None:
        new_W = torch.where(write_mask[..., None, None], new_W, W_mem)
        new_z = torch.where(write_mask[..., None], new_z, z)
    return new_W, new_z


@dataclass
class MemoryState:
    """Per-layer associative memory after some segments: the only thing that crosses
    segment boundaries (SPEC §2). A value: functions take one and return a new one.

    W_mem: (L, B, dk, d) memory matrix, in memory_dtype
    z:     (L, B, dk)    normaliser, in memory_dtype
    is_first: (L, B) bool — True until the layer has written for that row
    """

    W_mem: torch.Tensor
    z: torch.Tensor
    is_first: torch.Tensor

    @classmethod
    def empty(cls, L: int, B: int, d_key: int, d: int, dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> "MemoryState":
        return cls(W_mem=torch.zeros(L, B, d_key, d, dtype=dtype, device=device),
                   z=torch.zeros(L, B, d_key, dtype=dtype, device=device),
                   is_first=torch.ones(L, B, dtype=torch.bool, device=device))

    @property
    def num_layers(self) -> int:
        return self.W_mem.shape[0]

    @property
    def batch_size(self) -> int:
        return self.W_mem.shape[1]

    def layers(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Unstack into per-layer lists (W_mem[l] (B, dk, d), z[l] (B, dk), is_first[l] (B,))."""
        return list(self.W_mem.unbind(0)), list(self.z.unbind(0)), list(self.is_first.unbind(0))

    @classmethod
    def from_layers(cls, W_mem: list[torch.Tensor], z: list[torch.Tensor],
                    is_first: list[torch.Tensor]) -> "MemoryState":
        return cls(torch.stack(W_mem), torch.stack(z), torch.stack(is_first))

    def detach(self) -> "MemoryState":
        return MemoryState(self.W_mem.detach(), self.z.detach(), self.is_first)

    def to(self, device) -> "MemoryState":
        return MemoryState(self.W_mem.to(device), self.z.to(device), self.is_first.to(device))

    def zeroed(self) -> "MemoryState":
        """A state with the same shapes and no memory (for 'memory off' baselines)."""
        return MemoryState(torch.zeros_like(self.W_mem), torch.zeros_like(self.z),
                           torch.ones_like(self.is_first))
