"""DiagonalExecutor: run an ARMT's layer x segment grid anti-diagonal by anti-diagonal
(Diagonal Batching, arXiv 2506.05229), with the same numbers as the sequential model.

At step t the layers lo..hi are busy, layer l on segment t - l (SPEC §3); all of them
run as one grouped call (grouped.grouped_layer). The only cross-segment state —
(W_mem_l, z_l, is_first_l) — is handed from step to step per layer, so the L * S layer
calls collapse to L + S - 1 grouped calls. No retraining, no per-call weight copies at
inference (TiedStacks); under autograd the stacks are rebuilt in-graph each call so
gradients reach every parameter.

The executor can also follow the sequential order through the same grouped kernels
(`order="sequential"`), which separates the gain of the schedule from the kernels'.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import schedule as sched
from .armt import ARMT, ARMTOutput
from .generation import generate as _generate
from .grouped import LayerDims, TiedStacks, _param_groups, gather_stacks, grouped_layer
from .memory import MemoryState, first_after_write
from .segments import Segmented, SegmentOutputs, positions_and_mask

StepHook = Callable[[int, list], None]


class DiagonalExecutor:
    """Same call signature and outputs as ARMT.forward; built from any ARMT instance."""

    def __init__(self, model: ARMT, order: str = "diagonal", kernel: str = "bmm"):
        if not isinstance(model, ARMT):
            raise TypeError(f"DiagonalExecutor needs a diaglab.ARMT, got {type(model).__name__}")
        if order not in ("diagonal", "sequential"):
            raise ValueError(f"order must be 'diagonal' or 'sequential', got {order!r}")
        if kernel not in ("bmm", "grouped_mm") or (kernel == "grouped_mm" and not hasattr(torch, "_grouped_mm")):
            raise ValueError(f"kernel must be 'bmm' or 'grouped_mm' (needs torch._grouped_mm), got {kernel!r}")
        self.kernel = kernel
        _param_groups(model)  # raises a clear error when the layers cannot be stacked
        self.model = model
        self.order = order
        self._tied: TiedStacks | None = None

    # ---- weights ----------------------------------------------------------------------
    def _needs_autograd(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.model.parameters())

    def stacked_weights(self) -> dict[str, torch.Tensor]:
        """The (L, ...) stacks used by a call: tied views at inference, in-graph under autograd."""
        if self._needs_autograd():
            return gather_stacks(self.model)
        if self._tied is None or not self._tied.is_valid(self.model):
            self._tied = TiedStacks(self.model)
        return self._tied.tensors

    # ---- the run ----------------------------------------------------------------------
    def iter_steps(self, num_segments: int):
        """The steps of this executor's order, made one at a time."""
        order = sched.iter_diagonal if self.order == "diagonal" else sched.iter_sequential
        return order(self.model.num_layers, num_segments)

    def steps(self, num_segments: int) -> list[list[tuple[int, int]]]:
        return list(self.iter_steps(num_segments))

    def __call__(self, input_ids, attention_mask=None, labels=None, state: MemoryState | None = None,
                 keep_logits: str = "all", on_step: StepHook | None = None) -> ARMTOutput:
        """input_ids (B, N); attention_mask (B, N) right-padded; labels (B, N); see ARMT.forward.
        on_step(t, cells) is called after each grouped step (profiling hooks)."""
        model = self.model
        if model.training and model.base.config.attention_dropout > 0:
            raise ValueError("attention dropout is not supported by the executor; set "
                             "base.config.attention_dropout = 0 or call model.eval()")
        seg, state = model.prepare(input_ids, attention_mask, labels, state, keep_logits)
        W = self.stacked_weights()
        dims = LayerDims.of(model, self.kernel)
        L, S = model.num_layers, seg.num_segments
        n, M = model.config.segment_size, model.config.num_mem_tokens
        W_mem, z, first = state.layers()
        full = (seg.nreal == n).all(dim=1).tolist()                  # (S,) needs neither padding nor mask
        started = (~state.is_first).any(dim=1).tolist()              # (L,) host flags: layer has memory to read
        rope_full = model.base.model.rotary_emb(model.memory, torch.arange(n + M, device=model.device)[None])
        pending: dict[tuple[int, int], torch.Tensor] = {}            # (layer, segment) -> its input
        outputs = SegmentOutputs(seg, keep_logits, model.base.lm_head)
        for t, cells in enumerate(self.iter_steps(S)):
            lo, hi = cells[0][0], cells[-1][0]
            segs = [s for _, s in cells]
            with torch.profiler.record_function(f"diag_step {t} layers {lo}-{hi}"):
                X = torch.stack([self._embed(seg, s) if l == 0 else pending.pop((l, s))
                                 for l, s in cells])                 # (G, B, T, d)
                G, B, T, _ = X.shape
                if all(full[s] for s in segs):
                    (cos, sin), mask = rope_full, None
                else:
                    nreal = seg.nreal[segs]                                           # (G, B)
                    pos, allowed = positions_and_mask(n, nreal, M, X.device)          # (G, B, T), (G, B, T, T)
                    cos, sin = model.base.model.rotary_emb(X, pos.reshape(G * B, T))  # (G*B, T, hd)
                    mask = allowed.reshape(G * B, 1, T, T)
                wmask = (seg.nreal[segs] > 0) if seg.padded else None                 # (G, B)
                first_g = torch.stack(first[lo:hi + 1])                               # (G, B)
                Y, Wg, zg = grouped_layer(W, lo, hi, X, n, cos, sin, mask,
                                          torch.stack(W_mem[lo:hi + 1]), torch.stack(z[lo:hi + 1]),
                                          first_g, wmask, dims, read=any(started[lo:hi + 1]))
                W_mem[lo:hi + 1], z[lo:hi + 1] = list(Wg.unbind(0)), list(zg.unbind(0))
                first[lo:hi + 1] = list(first_after_write(first_g, wmask).unbind(0))
                for g, (l, s) in enumerate(cells):
                    started[l] = True
                    if l < L - 1:
                        pending[(l + 1, s)] = Y[g]
                        continue
                    # segment s leaves the last layer: final norm + LM head on its text rows only
                    if outputs.wanted(s):
                        a, e = seg.bounds[s]
                        outputs.add(s, model.base.model.norm(Y[g, :, :e - a]))
            if on_step is not None:
                on_step(t, cells)
        logits, loss = outputs.result()
        return ARMTOutput(logits, loss, MemoryState.from_layers(W_mem, z, first))

    forward = __call__

    def _embed(self, seg: Segmented, s: int) -> torch.Tensor:
        """Layer-0 input of segment s: [embed(tokens) ; memory], a short last segment padded to n."""
        model = self.model
        n = model.config.segment_size
        a, e = seg.bounds[s]
        ids = seg.ids[:, a:e]
        if e - a < n:  # padded rows are masked as keys and dropped from the output
            ids = torch.nn.functional.pad(ids, (0, n - (e - a)))
        h = model.base.model.embed_tokens(ids)                                        # (B, n, d)
        return torch.cat([h, model.memory.expand(h.shape[0], -1, -1)], dim=1)         # (B, T, d)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int = 16, **sampling) -> torch.Tensor:
        """Like ARMT.generate, with the prefill run by this executor (diagonally)."""
        return _generate(self.model, self, input_ids, max_new_tokens, **sampling)
