"""Inputs to segments: validation, segmentation, per-row real lengths, the attention
mask and positions of one segment, and the streamed next-token loss.

Both execution orders (the sequential model and the diagonal executor) start here,
so they see identical segments, positions and masks (SPEC §1):
  - chunks of n tokens from the left; the last may be shorter;
  - rows of a segment = [text (n_s) ; memory (M)]; causal attention inside it;
  - positions restart at 0: text 0..n_s-1, memory rows n_real..n_real+M-1, where
    n_real counts a row's real (unpadded) tokens in that segment;
  - padding (attention_mask 0) must be on the right; padded keys are masked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Segmented:
    """A validated batch cut into segments.

    ids: (B, N) token ids; labels: (B, N) next-token targets already shifted left
    (targets[:, i] is what logits[:, i] must predict; -100 = ignore) or None;
    nreal: (S, B) real tokens of each row in each segment; bounds: [(start, end)] per segment.
    """

    ids: torch.Tensor
    targets: torch.Tensor | None
    nreal: torch.Tensor
    bounds: list[tuple[int, int]]
    padded: bool  # True when some row has padding (then masks are needed)

    @property
    def num_segments(self) -> int:
        return len(self.bounds)


def validate_ids(input_ids, vocab_size: int, device: torch.device) -> torch.Tensor:
    """Check token ids [B, N]: type, shape, emptiness, vocabulary range, device."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.LongTensor [B, N], got {type(input_ids).__name__}; "
                        "wrap it with torch.tensor(ids)[None]")
    if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}; use .long()")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D [B, N], got shape {tuple(input_ids.shape)}; "
                         "add a batch dimension with input_ids[None]")
    if input_ids.numel() == 0:
        raise ValueError(f"empty input: input_ids has shape {tuple(input_ids.shape)}; "
                         "give at least one row with at least one token")
    if input_ids.device != device:
        raise ValueError(f"input_ids is on {input_ids.device} but the model is on {device}; "
                         "move it with input_ids.to(model.device)")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size - 1}] (the vocabulary), "
                         f"got values in [{lo}, {hi}]")
    return input_ids.long()


def validate_mask(attention_mask, input_ids: torch.Tensor) -> torch.Tensor | None:
    """Check a [B, N] 0/1 right-padded mask; return it as bool, or None if it masks nothing."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor [B, N] of 0/1, got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids "
                         f"shape {tuple(input_ids.shape)}; they must be equal")
    if attention_mask.device != input_ids.device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but input_ids on {input_ids.device}; "
                         "put them on the same device")
    if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
        if not torch.all((attention_mask == 0) | (attention_mask == 1)):
            raise ValueError("attention_mask must contain only 0 (padding) and 1 (token)")
    elif attention_mask.dtype != torch.bool and not torch.all((attention_mask == 0) | (attention_mask == 1)):
        raise ValueError("attention_mask must contain only 0 (padding) and 1 (token)")
    mask = attention_mask.bool()
    lengths = mask.sum(1)
    if bool((lengths == 0).any()):
        rows = torch.nonzero(lengths == 0).flatten().tolist()
        raise ValueError(f"rows {rows} of attention_mask have no tokens; drop empty rows before the call")
    # Right padding: in each row, the ones form a prefix. Segments are cut from a row's first
    # token, so left padding would shift every segment boundary.
    prefix = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]
    if not torch.equal(prefix, mask):
        raise ValueError("attention_mask must be right-padded (each row: 1s, then 0s); ARMT cuts segments "
                         "from a row's first token, so pad on the right (tokenizer.padding_side = 'right')")
    return None if bool(mask.all()) else mask


def segment(input_ids: torch.Tensor, segment_size: int, mask: torch.Tensor | None = None,
            labels: torch.Tensor | None = None) -> Segmented:
    """Cut validated ids (and mask, labels) into segments of segment_size from the left."""
    B, N = input_ids.shape
    bounds = [(a, min(a + segment_size, N)) for a in range(0, N, segment_size)]
    if mask is None:
        nreal = torch.tensor([[e - a] * B for a, e in bounds], device=input_ids.device)   # (S, B)
    else:
        nreal = torch.stack([mask[:, a:e].sum(1) for a, e in bounds])                     # (S, B)
    targets = None
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape:
            shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"labels must be a tensor shaped like input_ids {tuple(input_ids.shape)}, got {shape}")
        if labels.device != input_ids.device:
            raise ValueError(f"labels is on {labels.device} but input_ids on {input_ids.device}")
        targets = torch.full_like(labels, -100, dtype=torch.long)
        targets[:, :-1] = labels[:, 1:]
        if mask is not None:  # a padded position is never a target
            targets[:, :-1][~mask[:, 1:]] = -100
    return Segmented(input_ids, targets, nreal, bounds, padded=mask is not None)


def positions_and_mask(n_text: int, nreal: torch.Tensor | None, num_mem: int,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Positions and attention pattern of one segment with n_text text rows and num_mem memory rows.

    nreal: (...) real tokens per row, or None when every row is full (then the mask is None:
    plain causal). Returns positions (..., T) or (1, T), and a bool mask (..., T, T) where
    True = may attend, or None.
    """
    T = n_text + num_mem
    idx = torch.arange(T, device=device)
    if nreal is None:
        return idx[None], None
    text_pos = idx[:n_text].expand(*nreal.shape, n_text)
    mem_pos = nreal[..., None] + torch.arange(num_mem, device=device)           # (..., M)
    pos = torch.cat([text_pos, mem_pos], dim=-1)                                # (..., T)
    key_real = torch.cat([idx[:n_text].expand(*nreal.shape, n_text) < nreal[..., None],
                          torch.ones(*nreal.shape, num_mem, dtype=torch.bool, device=device)], dim=-1)
    causal = idx[:, None] >= idx[None, :]                                        # (T, T)
    allowed = causal & key_real[..., None, :]
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=device)            # a padded row sees itself: no empty softmax
    return pos, allowed


def segment_loss_terms(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy over one segment and the number of counted targets.

    logits: (B, n_s, V); targets: (B, n_s) with -100 = ignore. Summing per segment and
    dividing once at the end streams the loss without keeping all logits alive.
    """
    loss_sum = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=-100, reduction="sum")
    return loss_sum, (targets != -100).sum()


def keeps(keep_logits: str, s: int, S: int) -> bool:
    """Whether segment s of S keeps its logits under keep_logits ('all' | 'last_segment' | 'none')."""
    return keep_logits == "all" or (keep_logits == "last_segment" and s == S - 1)


class SegmentOutputs:
    """Collects what segments leave behind as they come out of the last layer, in order:
    the kept logits and the streamed loss. Both execution orders use it, so they run the
    LM head on exactly the same segments and sum the loss in the same order."""

    def __init__(self, seg: Segmented, keep_logits: str, lm_head):
        self.seg, self.keep_logits, self.lm_head = seg, keep_logits, lm_head
        self.logits: list[torch.Tensor] = []
        self.loss_sum, self.count = 0.0, 0

    def wanted(self, s: int) -> bool:
        """Whether segment s needs the LM head at all (its logits are kept, or labels need them)."""
        return self.seg.targets is not None or keeps(self.keep_logits, s, self.seg.num_segments)

    def add(self, s: int, text: torch.Tensor) -> None:
        """text: (B, n_s, d) final-norm hidden states of segment s's text rows."""
        if not self.wanted(s):
            return
        a, e = self.seg.bounds[s]
        seg_logits = self.lm_head(text)                                         # (B, n_s, V)
        if self.seg.targets is not None:
            ls, c = segment_loss_terms(seg_logits, self.seg.targets[:, a:e])
            self.loss_sum, self.count = self.loss_sum + ls, self.count + c
        if keeps(self.keep_logits, s, self.seg.num_segments):
            self.logits.append(seg_logits)

    def result(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits (B, N or n_last, V) or None, mean loss or None)."""
        loss = self.loss_sum / self.count if self.seg.targets is not None else None
        return (torch.cat(self.logits, dim=1) if self.logits else None), loss
