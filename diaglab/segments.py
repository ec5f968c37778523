"""Inputs to segments: validation, segmentation, per-row real lengths, the rows,
positions and attention mask of one segment, and the streamed next-token loss.

Both execution orders (the sequential model and the diagonal executor) start here and
build a segment's rows with the same function (`segment_rows`), so they see identical
segments, positions and masks (design §1):
  - chunks of n tokens from the left; the last may be shorter;
  - rows of a segment = [text (n_s) ; memory (M)]; causal attention inside it;
  - positions restart at 0: text 0..n_s-1, memory rows n_real..n_real+M-1, where
    n_real counts a row's real (unpadded) tokens in that segment;
  - padding (attention_mask 0) must be on the right; padded keys are masked;
  - a segment writes memory only for the rows that fill it. A segment the input ends
    inside is *open*: its tokens get their logits (reads need only the state before
    it), and its write waits until a later call completes it. So a call can stop
    anywhere and the next one continues exactly (MemoryState.open_ids).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class Segmented:
    """A validated batch cut into segments.

    ids: (B, N) token ids, an open segment carried over from a state included in front;
    targets: (B, N) next-token targets already shifted left (targets[:, i] is what
    logits[:, i] must predict; -100 = ignore) or None; nreal: (S, B) real tokens of each row
    in each segment; bounds: [(start, end)] per segment; skip: leading tokens carried over
    from the state's open segment (their logits were returned by the earlier call).
    """

    ids: torch.Tensor
    targets: torch.Tensor | None
    nreal: torch.Tensor
    bounds: list[tuple[int, int]]
    padded: bool              # True when some row has padding (then masks are needed)
    segment_size: int
    skip: int = 0
    full: list[bool] = field(default_factory=list)            # (S,) host flags: every row fills segment s
    rope: dict = field(default_factory=dict, repr=False)      # T -> RoPE tables of unmasked segments

    def __post_init__(self):
        if not self.full:   # (segment() passes them when there is no mask: known on the host)
            self.full = (self.nreal == self.segment_size).all(dim=1).tolist()

    @property
    def num_segments(self) -> int:
        return len(self.bounds)

    def write_mask(self, s: int) -> torch.Tensor | None:
        """(B,) bool: the rows that fill segment s and so write memory; None when all do."""
        return None if self.full[s] else self.nreal[s] == self.segment_size

    def open_ids(self) -> torch.Tensor | None:
        """(B, r) tokens of the segment each row ends inside (-1 where a row's open part is
        shorter than another's), or None when every row ends on a segment boundary."""
        if not self.padded:   # every row has all N tokens: known on the host
            r = self.ids.shape[1] % self.segment_size
            return self.ids[:, self.ids.shape[1] - r:].clone() if r else None   # (never the caller's ids)
        lengths = self.nreal.sum(0)                                             # (B,)
        r = lengths % self.segment_size
        if not bool(r.any()):
            return None
        cols = torch.arange(int(r.max()), device=r.device)
        idx = (lengths - r)[:, None] + cols                                     # (B, r_max)
        ids = self.ids.gather(1, idx.clamp_max(self.ids.shape[1] - 1))
        return ids.masked_fill(cols >= r[:, None], -1)


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
    lo, hi = (int(v) for v in torch.aminmax(input_ids))
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


def validate_labels(labels, input_ids: torch.Tensor) -> torch.Tensor | None:
    """Check next-token labels: an integer tensor shaped and placed like input_ids (-100 = ignore)."""
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a tensor shaped like input_ids {tuple(input_ids.shape)}, got {shape}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must hold integer token ids (-100 = ignore), got dtype {labels.dtype}; "
                        "use labels.long()")
    if labels.device != input_ids.device:
        raise ValueError(f"labels is on {labels.device} but input_ids on {input_ids.device}")
    return labels.long()


def segment(input_ids: torch.Tensor, segment_size: int, mask: torch.Tensor | None = None,
            labels: torch.Tensor | None = None, open_ids: torch.Tensor | None = None) -> Segmented:
    """Cut validated ids (and mask, labels) into segments of segment_size from the left.
    open_ids (B, r): an open segment carried over from a state; it goes in front, and its
    tokens neither return logits again nor count in the loss."""
    labels = validate_labels(labels, input_ids)
    skip = 0
    if open_ids is not None:
        skip = open_ids.shape[1]
        input_ids = torch.cat([open_ids, input_ids], dim=1)
        if mask is not None:
            mask = torch.cat([mask.new_ones(mask.shape[0], skip), mask], dim=1)
        if labels is not None:
            labels = torch.cat([labels.new_full((labels.shape[0], skip), -100), labels], dim=1)
    B, N = input_ids.shape
    bounds = [(a, min(a + segment_size, N)) for a in range(0, N, segment_size)]
    if mask is None:
        nreal = torch.tensor([[e - a] * B for a, e in bounds], device=input_ids.device)   # (S, B)
    else:
        nreal = torch.stack([mask[:, a:e].sum(1) for a, e in bounds])                     # (S, B)
    targets = None
    if labels is not None:
        targets = torch.full_like(labels, -100)
        targets[:, :-1] = labels[:, 1:]
        targets[:, :skip] = -100           # the earlier call's positions: not this call's loss
        if mask is not None:  # a padded position is never a target
            targets[:, :-1][~mask[:, 1:]] = -100
    full = [e - a == segment_size for a, e in bounds] if mask is None else []
    return Segmented(input_ids, targets, nreal, bounds, mask is not None, segment_size, skip, full)


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


@dataclass
class SegmentRows:
    """What one segment brings into layer 0, the same for both execution orders.

    X: (B, T, d) rows [embed(tokens) ; memory], T = n_text + M; n_text: text rows (the
    segment's tokens, or n when padded to the full size); cos, sin: (B or 1, T, hd) RoPE
    tables; mask: (B, T, T) bool, True = may attend, or None for plain causal attention;
    write_mask: (B,) bool rows that write memory, or None when all do.
    """

    X: torch.Tensor
    n_text: int
    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None
    write_mask: torch.Tensor | None


def segment_rows(model, seg: Segmented, s: int, pad: bool = False, X: torch.Tensor | None = None) -> SegmentRows:
    """Rows, positions and mask of segment s. pad=True pads a short segment to n text rows
    (the diagonal executor stacks segments of one shape; padded keys are masked). X: the
    segment's rows (B, T, d) when they come from elsewhere (a pipeline rank receives them
    from the one before); then only the tables are built here."""
    a, e = seg.bounds[s]
    ids = seg.ids[:, a:e]                                                       # (B, n_s)
    n_text = seg.segment_size if pad else e - a
    if n_text > e - a:
        ids = F.pad(ids, (0, n_text - (e - a)))                                 # (B, n)
    B, M = ids.shape[0], model.config.num_mem_tokens
    inner = model.base.model
    if X is None:
        X = torch.cat([inner.embed_tokens(ids), model.memory.expand(B, M, -1)], dim=1)   # (B, T, d)
    elif tuple(X.shape) != (B, n_text + M, model.hidden_size):
        raise ValueError(f"segment {s}'s rows X must be (B, n_text + M, d) = {(B, n_text + M, model.hidden_size)}, "
                         f"got {tuple(X.shape)}")
    plain = seg.full[s] and n_text == e - a   # every row fills it: positions 0.., causal (padded batch too)
    if plain:  # the same tables for every unmasked segment of this length, no mask
        if n_text not in seg.rope:
            pos, _ = positions_and_mask(n_text, None, M, ids.device)
            seg.rope[n_text] = inner.rotary_emb(X, pos)
        cos, sin = seg.rope[n_text]
        mask = None
    else:
        pos, mask = positions_and_mask(n_text, seg.nreal[s], M, ids.device)
        cos, sin = inner.rotary_emb(X, pos)
    return SegmentRows(X, n_text, cos, sin, mask, seg.write_mask(s))


class SegmentFeed:
    """segment_rows(model, seg, s, pad=True) for the segments of one call, asked in order, made
    a run of segments at a time: consecutive plain segments (every row full, so no mask) get
    their rows [embed(tokens) ; memory] from ONE embedding call and ONE concatenation, up to
    CHUNK_BYTES of rows; any other segment comes from segment_rows itself. The values are
    segment_rows' own (an embedding is a lookup, the concatenation a copy); an embedding with a
    hook, or not a bare nn.Embedding, is called segment by segment (_plain_embedding). The diagonal
    executor feeds its steps from it: between two grouped steps a CPU's caches hold the step's
    weights, not the interpreter's, so each call there costs several times what it costs in a
    loop of its own."""

    CHUNK_BYTES = 8 << 20   # rows made ahead at most (one segment alone if it is bigger)
    MAX_SEGMENTS = 64

    def __init__(self, model, seg: "Segmented"):
        self.model, self.seg = model, seg
        self._ready: dict[int, SegmentRows] = {}

    def rows(self, s: int) -> SegmentRows:
        """Segment s's SegmentRows (handed out once: the feed forgets it)."""
        got = self._ready.pop(s, None)
        if got is not None:
            return got
        seg, model = self.seg, self.model
        n, S = seg.segment_size, seg.num_segments
        if not self._plain(s) or not _plain_embedding(model.base.model.embed_tokens):
            return segment_rows(model, seg, s, pad=True)
        M, d = model.config.num_mem_tokens, model.hidden_size
        B = seg.ids.shape[0]
        per = B * (n + M) * d * model.memory.element_size()
        k = 1
        while s + k < S and k < self.MAX_SEGMENTS and (k + 1) * per <= self.CHUNK_BYTES and self._plain(s + k):
            k += 1
        if k == 1:
            return segment_rows(model, seg, s, pad=True)
        a = seg.bounds[s][0]
        emb = model.base.model.embed_tokens(seg.ids[:, a:a + k * n])                      # (B, k n, d)
        X = torch.cat([emb.view(B, k, n, d).transpose(0, 1),
                       model.memory.expand(k, B, M, d)], dim=2)                            # (k, B, T, d)
        first = segment_rows(model, seg, s, pad=True, X=X[0])   # the tables, made once as for any segment
        for j in range(1, k):
            self._ready[s + j] = SegmentRows(X[j], first.n_text, first.cos, first.sin, None, None)
        return first

    def _plain(self, s: int) -> bool:
        a, e = self.seg.bounds[s]
        return self.seg.full[s] and e - a == self.seg.segment_size


def _plain_embedding(emb) -> bool:
    """Whether one embedding call over several segments gives what one call per segment gives:
    a bare nn.Embedding (a lookup) with no hook of its own, no `forward` set on the instance and
    no global module hook. A hook may depend on the call's length (transformers' NEFTune noise is
    scaled by 1 / sqrt(length x d)), so anything else is called segment by segment, as the
    sequential model calls it."""
    m = torch.nn.modules.module
    return (type(emb) is torch.nn.Embedding and not (emb._forward_hooks or emb._forward_pre_hooks)
            and "forward" not in emb.__dict__ and not (m._global_forward_hooks or m._global_forward_pre_hooks))


_CAUSAL: dict[tuple, torch.Tensor] = {}   # (T, device) -> (T, T) lower-triangular bool, never written to


def _causal(T: int, device: torch.device) -> torch.Tensor:
    key = (T, str(device))
    if key not in _CAUSAL:
        with torch.inference_mode(False):   # kept for later calls, which may run under autograd
            _CAUSAL[key] = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    return _CAUSAL[key]


def stack_rows(rows: list[SegmentRows]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                  torch.Tensor | None]:
    """The per-segment tables of a group of G segments, for grouped_layer: cos, sin
    (1 or G*B, T, hd) — shared when no segment needs a mask, since positions restart at 0 —
    mask (G*B, T, T) or None, write_mask (G, B) or None."""
    if all(r.mask is None for r in rows):
        cos, sin, mask = rows[0].cos, rows[0].sin, None
    else:
        B, T = rows[0].X.shape[:2]
        causal = _causal(T, rows[0].X.device)
        cos = torch.cat([r.cos if r.cos.shape[0] == B else r.cos.expand(B, -1, -1) for r in rows])   # (G*B, T, hd)
        sin = torch.cat([r.sin if r.sin.shape[0] == B else r.sin.expand(B, -1, -1) for r in rows])
        mask = torch.cat([causal.expand(B, T, T) if r.mask is None else r.mask for r in rows])  # (G*B, T, T)
    if all(r.write_mask is None for r in rows):
        return cos, sin, mask, None
    everyone = torch.ones(rows[0].X.shape[0], dtype=torch.bool, device=rows[0].X.device)
    return cos, sin, mask, torch.stack([everyone if r.write_mask is None else r.write_mask for r in rows])


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
    final norm and the LM head on exactly the same rows, in the same chunks, and sum the
    loss in the same order.

    Segments are gathered and sent through norm + LM head together, a chunk at a time (up
    to FLUSH_LOGITS logits: on a small vocabulary many segments, on LLaMA's 128K vocabulary
    each segment alone), so a small model pays two kernels per chunk, not per segment, and
    a large one still never holds more than a segment's logits beyond those it keeps."""

    FLUSH_LOGITS = 1 << 22   # logits per chunk (16 MB in float32)

    def __init__(self, seg: Segmented, keep_logits: str, base):
        """base: the LlamaForCausalLM whose final norm and LM head make the logits."""
        self.seg, self.keep_logits = seg, keep_logits
        self.lm_head, self.norm, self.vocab = base.lm_head, base.model.norm, base.config.vocab_size
        self.logits: list[torch.Tensor] = []
        self.loss_sum, self.count = 0.0, 0
        self._pending: list[tuple[int, int, int, torch.Tensor]] = []   # (s, a, e, text rows) waiting
        self._pending_tokens = 0

    def wanted(self, s: int) -> bool:
        """Whether segment s needs the LM head at all (its logits are kept, or labels need them)."""
        return self.seg.targets is not None or keeps(self.keep_logits, s, self.seg.num_segments)

    def add(self, s: int, text: torch.Tensor) -> None:
        """text: (B, n_s, d) hidden states of segment s's text rows, before the final norm."""
        if not self.wanted(s):
            return
        a, e = self.seg.bounds[s]
        if a < self.seg.skip:  # tokens carried over from an open segment: logits already returned
            text, a = text[:, self.seg.skip - a:], self.seg.skip
        if text.untyped_storage().nbytes() > 2 * text.numel() * text.element_size():
            text = text.clone()   # a view into a whole group's output: keep only these rows alive
        self._pending.append((s, a, e, text))
        self._pending_tokens += text.shape[0] * text.shape[1]
        if (self._pending_tokens + text.shape[0] * text.shape[1]) * self.vocab > self.FLUSH_LOGITS:
            self.flush()   # the next segment of this size would overflow the chunk

    def flush(self) -> None:
        """Norm + LM head (+ loss terms) for the segments waiting: wanted segments arrive in
        order and are consecutive, so they form one token range [a, e)."""
        if not self._pending:
            return
        pending, self._pending, self._pending_tokens = self._pending, [], 0
        a, e = pending[0][1], pending[-1][2]
        text = pending[0][3] if len(pending) == 1 else torch.cat([t for *_, t in pending], dim=1)
        logits = self.lm_head(self.norm(text))                                  # (B, e - a, V)
        if self.seg.targets is not None:
            ls, c = segment_loss_terms(logits, self.seg.targets[:, a:e])
            self.loss_sum, self.count = self.loss_sum + ls, self.count + c
        S = self.seg.num_segments
        kept = [(sa - a, se - a) for s, sa, se, _ in pending if keeps(self.keep_logits, s, S)]
        if len(kept) == len(pending):
            self.logits.append(logits)
        elif kept:   # only some segments keep theirs (last_segment with labels): still one range
            self.logits.append(logits[:, kept[0][0]:kept[-1][1]])

    def result(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits (B, N or n_last, V) or None, mean loss or None)."""
        self.flush()
        loss = self.loss_sum / self.count if self.seg.targets is not None else None
        return (torch.cat(self.logits, dim=1) if self.logits else None), loss
