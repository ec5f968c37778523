"""Generation from memory (design §5), shared by the sequential model and the executor.

1. Prefill: every full segment of the prompt runs with memory writes (through the
   caller's execution order: sequential or diagonal) and leaves a MemoryState.
2. Decode: the open (partial) segment and each new token run with reads on, writes off
   and no memory rows — exactly what the full forward computes for those text rows,
   since text rows never see their own segment's memory rows. The reads depend only on
   the state, fixed while a segment is open, so a KV cache of the open segment is exact:
   each new token costs one token's forward.
3. When the open segment reaches segment_size tokens it is committed: it runs once as a
   full segment with memory rows and writes, and a new open segment starts. So greedy
   tokens equal the argmax of model(prompt + generated) at every step, for any length.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ._checks import check_int
from .grouped import hf_mask
from .memory import MemoryState
from .segments import validate_ids


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
          top_p: float | None, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B, 1)."""
    if not do_sample:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p   # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)


def decode_step(model, ids: torch.Tensor, state: MemoryState, cache: DynamicCache) -> torch.Tensor:
    """Tokens of the open segment through every layer: reads on, writes off, no memory rows.

    ids: (B, r) the tokens after those already in `cache` (the open segment's keys and
    values; positions continue from it). The state stays as it is: a segment writes only
    when it is complete. Returns the final-norm hidden states (B, r, d)."""
    inner = model.base.model
    start, r = cache.get_seq_length(), ids.shape[1]
    h = inner.embed_tokens(ids)                                                  # (B, r, d)
    pos = torch.arange(start, start + r, device=ids.device)[None]               # (1, r)
    rope = inner.rotary_emb(h, pos)
    # new rows see every cached row and, causally, each other
    allowed = None if start == 0 else torch.ones(r, start + r, dtype=torch.bool, device=ids.device).tril(start)[None]
    mask = hf_mask(allowed, h, model.base.config)
    for l, layer in enumerate(inner.layers):
        W_mem, z, first = state.layers(l, l)
        h = model.assoc[l].read(h, W_mem[0], z[0], first[0])
        h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=rope, cache=cache, use_cache=True)
    return inner.norm(h)


def check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p, generator) -> None:
    """Refuse a sampling argument of the wrong kind or range, naming it."""
    check_int("max_new_tokens", max_new_tokens, 0)
    if not isinstance(do_sample, bool):
        raise TypeError(f"do_sample must be True or False, got {do_sample!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if top_k is not None:
        check_int("top_k (or None)", top_k, 1)
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


@torch.no_grad()
def generate(model, prefill_fn, input_ids, max_new_tokens: int = 16, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             generator: torch.Generator | None = None, attention_mask=None) -> torch.Tensor:
    """input_ids (B, N) -> (B, N + max_new_tokens). prefill_fn(ids, state=..., keep_logits=...)
    runs full segments with writes (the model itself, or a DiagonalExecutor) and returns an
    ARMTOutput."""
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise ValueError("generate needs unpadded rows of equal length; call it per row for prompts "
                         "of different lengths")
    check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p, generator)
    ids = validate_ids(input_ids, model.base.config.vocab_size, model.device)
    n = model.config.segment_size
    n_full = (ids.shape[1] // n) * n                                          # tokens in full segments
    state, last_logits = model.empty_state(ids.shape[0]), None
    if n_full > 0:  # 1. prefill
        out = prefill_fn(ids[:, :n_full], state=state, keep_logits="last_segment")
        state, last_logits = out.state, out.logits[:, -1]
    return _decode(model, prefill_fn, ids, state, last_logits, max_new_tokens, do_sample, temperature, top_k,
                  top_p, generator)


@torch.no_grad()
def _decode(model, prefill_fn, ids: torch.Tensor, state: MemoryState, last_logits: torch.Tensor | None,
           max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Steps 2 and 3 for prompts ids (B, N) whose full segments are already in `state`
    (last_logits: the prefill's logits at its last token, or None when there was none).
    prefill_fn commits each segment that generation completes. Returns (B, N + max_new_tokens).
    Internal: the callers (generate, RingExecutor.generate) have checked ids, the sampling
    arguments and that state is this batch's, from the prefill of ids' full segments."""
    n = model.config.segment_size
    open_seg = ids[:, (ids.shape[1] // n) * n:]                               # (B, r), r < n
    cache = DynamicCache(config=model.base.config)                            # the open segment's K, V
    new = []
    for i in range(max_new_tokens):
        todo = open_seg[:, cache.get_seq_length():]                           # rows not yet cached
        if todo.shape[1] > 0:  # 2. decode
            last_logits = model.base.lm_head(decode_step(model, todo, state, cache)[:, -1])
        tok = _pick(last_logits, do_sample, temperature, top_k, top_p, generator)
        new.append(tok)
        open_seg = torch.cat([open_seg, tok], dim=1)
        if open_seg.shape[1] == n and i < max_new_tokens - 1:  # 3. commit the full segment: it writes
            out = prefill_fn(open_seg, state=state, keep_logits="last_segment")
            state, last_logits = out.state, out.logits[:, -1]
            open_seg = open_seg[:, :0]
            cache = DynamicCache(config=model.base.config)
    return torch.cat([ids] + new, dim=1)
