"""Generation from memory (SPEC §5), shared by the sequential model and the executor.

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


@torch.no_grad()
def generate(model, prefill_fn, input_ids, max_new_tokens: int = 16, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             generator: torch.Generator | None = None, attention_mask=None) -> torch.Tensor:
    """input_ids (B, N) -> (B, N + max_new_tokens). prefill_fn(ids, keep_logits=...) runs the
    full segments (model itself, or a DiagonalExecutor) and returns an ARMTOutput."""
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise ValueError("generate needs unpadded rows of equal length; call it per row for prompts "
                         "of different lengths")
    check_int("max_new_tokens", max_new_tokens, 0)
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if top_k is not None:
        check_int("top_k (or None)", top_k, 1)
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    ids = validate_ids(input_ids, model.base.config.vocab_size, model.device)
    n = model.config.segment_size
    B, N = ids.shape
    n_full = (N // n) * n                                                     # tokens in full segments
    state = model.empty_state(B)
    last_logits = None
    if n_full > 0:  # 1. prefill
        out = prefill_fn(ids[:, :n_full], keep_logits="last_segment")
        state, last_logits = out.state, out.logits[:, -1]
    lists = list(state.layers())
    open_seg = ids[:, n_full:]                                                # (B, r), r < n
    cache = DynamicCache(config=model.base.config)                            # the open segment's K, V
    new = []
    for i in range(max_new_tokens):
        todo = open_seg[:, cache.get_seq_length():]                           # rows not yet cached
        if todo.shape[1] > 0:  # 2. decode: reads on, writes off, no memory rows
            text = model.segment_step(todo, None, lists, write=False, with_memory=False, cache=cache)
            last_logits = model.base.lm_head(text[:, -1])
        tok = _pick(last_logits, do_sample, temperature, top_k, top_p, generator)
        new.append(tok)
        open_seg = torch.cat([open_seg, tok], dim=1)
        if open_seg.shape[1] == n and i < max_new_tokens - 1:  # 3. commit a full segment
            text = model.segment_step(open_seg, None, lists, write=True, with_memory=True)
            last_logits = model.base.lm_head(text[:, -1])
            open_seg = open_seg[:, :0]
            cache = DynamicCache(config=model.base.config)
    return torch.cat([ids] + new, dim=1)
