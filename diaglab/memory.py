"""The associative memory of ARMT (design §2): the DPFP feature map, the read, the
delta-rule write, and the MemoryState that carries (W_mem, z, is_first) from one
segment to the next.

Every function here is shape-generic over leading dimensions, so the sequential
model (one layer: W_mem (B, dk, d)) and the diagonal executor (a group of layers:
W_mem (G, B, dk, d)) call the very same arithmetic. Shapes use the package alphabet:
B batch, T rows of a segment, M memory tokens, d model width, dk = 2 * nu * d_mem.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-5  # the paper's stabiliser in q.z + eps, k.z + eps and |k|^2 + eps


def dpfp(u: torch.Tensor, nu: int = 3) -> torch.Tensor:
    """Deterministic parameter-free projection: (..., d_mem) -> (..., 2 * nu * d_mem), >= 0.

    r = [relu(u); relu(-u)];  phi(u) = concat_{j=1..nu} r * roll(r, j)   (torch.roll semantics)
    """
    r = torch.cat([F.relu(u), F.relu(-u)], dim=-1)                        # (..., 2 d_mem)
    return torch.cat([r * torch.roll(r, shifts=j, dims=-1) for j in range(1, nu + 1)], dim=-1)  # (..., dk)


def dpfp_fast(u: torch.Tensor, nu: int = 3) -> torch.Tensor:
    """dpfp's fast twin, bit for bit the same numbers: with rr = [r ; r], roll(r, j) is the
    view rr[..., 2 d_mem - j : 4 d_mem - j], so the nu rolls are slices of one tensor
    instead of nu copies (on the `small` shapes about 6x faster than torch.roll, and no
    slower on tiny ones). The grouped step uses it."""
    r = F.relu(torch.cat([u, -u], dim=-1))                                 # (..., 2 d_mem)
    n = r.shape[-1]
    rr = torch.cat([r, r], dim=-1)                                         # (..., 4 d_mem)
    return torch.cat([r * rr[..., n - j:2 * n - j] for j in range(1, nu + 1)], dim=-1)   # (..., dk)


def features(u: torch.Tensor, nu: int = 3, normalize: bool = False, fast: bool = False) -> torch.Tensor:
    """dpfp(u) (fast: dpfp_fast, the same numbers), optionally L2-normalised along the
    feature axis (as the reference ARMT code does)."""
    f = dpfp_fast(u, nu) if fast else dpfp(u, nu)
    return F.normalize(f, dim=-1, p=2.0) if normalize else f


def associative_read(q: torch.Tensor, W_mem: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """A(h) = (q W_mem) / (q . z + eps), in the memory's dtype.

    q: (..., T, dk) features phi(h W_mq^T); W_mem: (..., dk, d); z: (..., dk).
    Returns (..., T, d) in W_mem's dtype; the caller casts it back to the model dtype.
    """
    q = q if q.dtype == W_mem.dtype else q.to(W_mem.dtype)
    num = q @ W_mem                                                        # (..., T, d)
    den = q @ z.unsqueeze(-1) + EPS                                        # (..., T, 1)
    return num / den


def first_after_write(is_first: torch.Tensor, write_mask: torch.Tensor | None) -> torch.Tensor:
    """is_first after a write: a row stays on its first segment only where the write was
    masked out (an all-padding row wrote nothing). Shapes (...) bool, as in associative_write."""
    return is_first & ~write_mask if write_mask is not None else torch.zeros_like(is_first)


def associative_write(k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                      W_mem: torch.Tensor, z: torch.Tensor, is_first: torch.Tensor | None,
                      correction: bool = True,
                      write_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One delta-rule update from the M memory rows of a layer's output.

    k: (..., M, dk) = phi(m W_mk^T); v: (..., M, d) = m W_mv^T; beta: (..., M, 1) = sigmoid(m W_mb^T + b).
    W_mem: (..., dk, d); z: (..., dk); is_first: (...) bool — this layer's first segment: the
    row starts from an empty memory whatever W_mem and z hold there (so vbar = 0), and gamma = 1 —
    or None when the caller knows no row is on its first segment (the same numbers, fewer
    masks). write_mask: (...) bool or None — rows where it is False keep their memory (empty
    on a first segment; a padded row with no tokens in this segment).
    Returns the new (W_mem, z); nothing is modified in place.
    """
    dt = W_mem.dtype
    if k.dtype != dt or v.dtype != dt or beta.dtype != dt:   # (bf16 models keep a float32 memory)
        k, v, beta = k.to(dt), v.to(dt), beta.to(dt)
    first = None if is_first is None else is_first[..., None]              # (..., 1)
    if first is not None:   # a first segment writes into an empty memory (a reused slot may hold another's)
        W_mem, z = W_mem.masked_fill(first[..., None], 0.0), z.masked_fill(first, 0.0)
    delta = (k @ z.unsqueeze(-1)).squeeze(-1) + EPS                        # (..., M)
    vbar = (k @ W_mem) / delta.unsqueeze(-1)                               # (..., M, d): 0 on a first segment
    if correction:
        knorm2 = (k * k).sum(-1)                                           # (..., M)
        gamma = torch.clamp(1 - delta / (knorm2 + EPS), 0.0, 1.0).detach()
        if first is not None:
            gamma = gamma.masked_fill(first, 1.0)
    else:
        gamma = torch.ones_like(delta)
    new_W = W_mem + k.transpose(-1, -2) @ (beta * (v - vbar))              # (..., dk, d)
    new_z = z + (gamma.unsqueeze(-2) @ k).squeeze(-2)                      # (..., dk): sum_i gamma_i k_i
    if write_mask is not None:
        new_W = torch.where(write_mask[..., None, None], new_W, W_mem)
        new_z = torch.where(write_mask[..., None], new_z, z)
    return new_W, new_z


def _described(t) -> str:
    return f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__


class MemoryState:
    """Per-layer associative memory after some segments: the only thing that crosses segment
    boundaries (design §2). A value: nothing here is modified in place; `replace` returns a
    new state.

    W_mem:    (L, B, dk, d) memory matrix, in memory_dtype
    z:        (L, B, dk)    normaliser, in memory_dtype
    is_first: (L, B) bool — True until the layer has written for that row
    open_ids: (B, r) token ids of an open segment (0 < r < n: the input ended inside a
              segment, whose memory write waits until the segment is complete), or None

    One step of either execution order reads a range of layers and puts back their new
    memory: `layers(lo, hi)` and `replace(lo, hi, ...)`, with lo..hi inclusive — (l, l) in the
    sequential loop, the busy layers of an anti-diagonal in the executor. Internally the layers
    are kept as a few contiguous blocks, so a step that reads back exactly the layers the
    previous step wrote (the diagonal's plateau) gets views, not copies.
    """

    def __init__(self, W_mem: torch.Tensor, z: torch.Tensor, is_first: torch.Tensor,
                 open_ids: torch.Tensor | None = None):
        self._blocks = [(0, W_mem.shape[0] - 1, W_mem, z, is_first)]   # (lo, hi, W, z, first)
        self.open_ids = open_ids

    @classmethod
    def _of_blocks(cls, blocks: list, open_ids: torch.Tensor | None) -> "MemoryState":
        state = cls.__new__(cls)
        state._blocks, state.open_ids = blocks, open_ids
        return state

    @classmethod
    def empty(cls, L: int, B: int, d_key: int, d: int, dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> "MemoryState":
        return cls(W_mem=torch.zeros(L, B, d_key, d, dtype=dtype, device=device),
                   z=torch.zeros(L, B, d_key, dtype=dtype, device=device),
                   is_first=torch.ones(L, B, dtype=torch.bool, device=device))

    # ---- one step's range of layers ------------------------------------------------------
    def layers(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W_mem (G, B, dk, d), z (G, B, dk), is_first (G, B)) of layers lo..hi; views when
        one block holds them all, else one concatenation."""
        self._check_range(lo, hi)
        for blk in self._blocks:   # the common case: one block holds the whole range
            a, b = blk[0], blk[1]
            if a <= lo and hi <= b:
                return blk[2:] if (a, b) == (lo, hi) else tuple(t[lo - a:hi - a + 1] for t in blk[2:])
        parts = [(max(lo, a), min(hi, b), blk) for blk in self._blocks
                 for a, b in [blk[:2]] if a <= hi and b >= lo]
        pieces = [blk[2:] if (x, y) == blk[:2] else tuple(t[x - blk[0]:y - blk[0] + 1] for t in blk[2:])
                  for x, y, blk in parts]
        if len(pieces) == 1:
            return pieces[0]
        return tuple(torch.cat(ts) for ts in zip(*pieces))

    def replace(self, lo: int, hi: int, W_mem: torch.Tensor, z: torch.Tensor,
                is_first: torch.Tensor) -> "MemoryState":
        """A new state: layers lo..hi take (W_mem (G, B, dk, d), z (G, B, dk), is_first (G, B)),
        the other layers keep theirs (shared, not copied)."""
        self._check_range(lo, hi)
        _, _, W0, z0, f0 = self._blocks[0]
        G = hi - lo + 1
        for name, t, like in (("W_mem", W_mem, W0), ("z", z, z0), ("is_first", is_first, f0)):
            if not isinstance(t, torch.Tensor) or t.shape != (G, *like.shape[1:]) or t.dtype != like.dtype:
                raise ValueError(f"replace({lo}, {hi}): {name} must be {(G, *like.shape[1:])} {like.dtype} (one entry "
                                 f"per layer lo..hi), got {_described(t)}")
        if len(self._blocks) == 1 and self._blocks[0][0] == lo and self._blocks[0][1] == hi:   # all of it
            return MemoryState._of_blocks([(lo, hi, W_mem, z, is_first)], self.open_ids)
        blocks = []
        for blk in self._blocks:
            a, b, *ts = blk
            if b < lo or a > hi:   # untouched: kept as it is
                blocks.append(blk)
                continue
            if a < lo:    # the part of this block below the range
                e = min(b, lo - 1)
                blocks.append((a, e, *(t[:e - a + 1] for t in ts)))
            if b > hi:    # the part above it
                s = max(a, hi + 1)
                blocks.append((s, b, *(t[s - a:] for t in ts)))
        at = next((i for i, blk in enumerate(blocks) if blk[0] > hi), len(blocks))   # blocks stay in layer order
        blocks.insert(at, (lo, hi, W_mem, z, is_first))
        return MemoryState._of_blocks(blocks, self.open_ids)

    def _check_range(self, lo: int, hi: int) -> None:
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi < self.num_layers):
            raise ValueError(f"layer range ({lo!r}, {hi!r}) must satisfy 0 <= lo <= hi < {self.num_layers} "
                             "(inclusive, like schedule.active_layers)")

    def with_open(self, open_ids: torch.Tensor | None) -> "MemoryState":
        """The same memory with another open segment (None: the input ended on a boundary)."""
        return MemoryState._of_blocks(self._blocks, open_ids)

    # ---- the whole state ----------------------------------------------------------------
    def _whole(self, i: int) -> torch.Tensor:
        if len(self._blocks) > 1:  # join once; later reads see one block
            joined = tuple(torch.cat(ts) for ts in zip(*(blk[2:] for blk in self._blocks)))
            self._blocks = [(0, self._blocks[-1][1], *joined)]
        return self._blocks[0][2 + i]

    def _set_whole(self, i: int, t: torch.Tensor) -> None:
        parts = list(self._blocks[0][2:]) if len(self._blocks) == 1 else [self._whole(j) for j in range(3)]
        parts[i] = t
        self._blocks = [(0, t.shape[0] - 1, *parts)]

    W_mem = property(lambda self: self._whole(0), lambda self, t: self._set_whole(0, t),
                     doc="(L, B, dk, d) memory matrices of every layer")
    z = property(lambda self: self._whole(1), lambda self, t: self._set_whole(1, t),
                 doc="(L, B, dk) normalisers of every layer")
    is_first = property(lambda self: self._whole(2), lambda self, t: self._set_whole(2, t),
                        doc="(L, B) bool: the layer has not written for that row yet")

    @property
    def num_layers(self) -> int:
        return self._blocks[-1][1] + 1

    @property
    def batch_size(self) -> int:
        return self._blocks[0][2].shape[1]

    def written(self) -> tuple[list[bool], list[bool]]:
        """(L,) host flags, read with one device sync: which layers have written for some row (their
        read is not a no-op), and which for every row (their first-segment masks can be skipped)."""
        written = ~self.is_first
        return written.any(dim=1).tolist(), written.all(dim=1).tolist()

    def ordinary(self) -> "MemoryState":
        """This state with any tensor made under torch.inference_mode copied into an ordinary
        one (the executor runs its steps in inference mode under no_grad; what it returns must
        work under autograd later). Call it outside inference mode; other tensors are shared."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError("MemoryState.ordinary() inside torch.inference_mode would make inference tensors "
                               "again: call it outside (with torch.inference_mode(False): ...)")
        blocks = [tuple(t.clone() if isinstance(t, torch.Tensor) and t.is_inference() else t for t in blk)
                  for blk in self._blocks]
        return MemoryState._of_blocks(blocks, self.open_ids)

    def own_first(self) -> "MemoryState":
        """This state with is_first copied (W_mem and z shared). A step that knows no row is on its
        first segment keeps is_first as it is; the executor works on such a copy so that what it
        returns never aliases the caller's tensor."""
        return MemoryState._of_blocks([(a, b, W, z, f.clone()) for a, b, W, z, f in self._blocks], self.open_ids)

    def detach(self) -> "MemoryState":
        return MemoryState(self.W_mem.detach(), self.z.detach(), self.is_first, self.open_ids)

    def to(self, device) -> "MemoryState":
        return MemoryState(self.W_mem.to(device), self.z.to(device), self.is_first.to(device),
                           None if self.open_ids is None else self.open_ids.to(device))

    def zeroed(self) -> "MemoryState":
        """A state with the same shapes and no memory (for 'memory off' baselines)."""
        return MemoryState(torch.zeros_like(self.W_mem), torch.zeros_like(self.z),
                           torch.ones_like(self.is_first), self.open_ids)

    def __repr__(self) -> str:
        r = 0 if self.open_ids is None else self.open_ids.shape[1]
        return (f"MemoryState(L={self.num_layers}, B={self.batch_size}, W_mem={tuple(self.W_mem.shape)} "
                f"{self.W_mem.dtype}, open tokens={r})")
