"""ARMT: a transformers LlamaForCausalLM turned into an Associative Recurrent Memory
Transformer, run in the plain sequential order (SPEC §1-2).

This file is the reference — the naive twin of the diagonal executor. For each segment
s = 0..S-1 and each layer l = 0..L-1 (S * L layer calls) it: reads layer l's memory
into the layer input, runs the base model's own decoder layer unchanged, and writes
the layer's memory rows back into layer l's memory. Only MemoryState crosses segments.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from . import checkpoint
from .config import ARMTConfig
from .generation import generate
from .memory import MemoryState, associative_read, associative_write, features, first_after_write
from .segments import (Segmented, SegmentOutputs, positions_and_mask, segment, validate_ids,
                       validate_mask)

_KEEP_LOGITS = ("all", "last_segment", "none")


@dataclass
class ARMTOutput:
    logits: torch.Tensor | None   # (B, N, V); (B, n_last, V) with keep_logits="last_segment"; None with "none"
    loss: torch.Tensor | None     # scalar mean next-token cross-entropy, or None without labels
    state: MemoryState            # per-layer memory after the last segment


class AssociativeLayer(nn.Module):
    """The per-layer associative block: W_mq, W_mk (d -> d_mem), W_mv (d -> d), W_mb (d -> 1);
    normalize: unit-length DPFP features (ARMTConfig.normalize_keys)."""

    def __init__(self, d: int, d_mem: int, nu: int, normalize: bool = False):
        super().__init__()
        self.nu = nu
        self.normalize = normalize
        self.W_mq = nn.Linear(d, d_mem, bias=False)
        self.W_mk = nn.Linear(d, d_mem, bias=False)
        self.W_mv = nn.Linear(d, d, bias=False)
        self.W_mb = nn.Linear(d, 1, bias=True)
        nn.init.zeros_(self.W_mv.weight)  # the paper's init: memory starts inert

    def read(self, h: torch.Tensor, W_mem: torch.Tensor, z: torch.Tensor, is_first: torch.Tensor) -> torch.Tensor:
        """h: (B, T, d) layer input -> h + A(h) for rows whose layer is past its first segment."""
        q = features(self.W_mq(h), self.nu, self.normalize)                     # (B, T, dk)
        A = associative_read(q, W_mem, z).to(h.dtype)                           # (B, T, d)
        return h + torch.where(is_first[:, None, None], torch.zeros_like(A), A)

    def write(self, m: torch.Tensor, W_mem, z, is_first, correction: bool, write_mask=None):
        """m: (B, M, d) memory rows of the layer output -> new (W_mem, z)."""
        k = features(self.W_mk(m), self.nu, self.normalize)                     # (B, M, dk)
        beta = torch.sigmoid(self.W_mb(m))                                      # (B, M, 1)
        return associative_write(k, self.W_mv(m), beta, W_mem, z, is_first, correction, write_mask)


def check_llama_like(base) -> None:
    """Raise a clear error unless base is a transformers LlamaForCausalLM."""
    from transformers import LlamaForCausalLM
    if not isinstance(base, LlamaForCausalLM):
        raise TypeError(f"unsupported base model {type(base).__name__}: diaglab.ARMT wraps a transformers "
                        "LlamaForCausalLM (LLaMA architecture: RMSNorm, RoPE, GQA, SwiGLU). Build one with "
                        "LlamaForCausalLM(LlamaConfig(...)) or load a local LLaMA checkpoint")
    cfg = base.config
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported base model: hidden_act={cfg.hidden_act!r}; diaglab supports LLaMA's 'silu'")


class ARMT(nn.Module):
    """Associative Recurrent Memory Transformer over a LLaMA base (weights used as is)."""

    def __init__(self, base, config: ARMTConfig):
        super().__init__()
        check_llama_like(base)
        if not isinstance(config, ARMTConfig):
            raise TypeError(f"config must be a diaglab.ARMTConfig, got {type(config).__name__}")
        self.base = base
        self.config = config
        emb = base.get_input_embeddings().weight
        d = emb.shape[1]
        std = float(emb.detach().float().std())
        self.memory = nn.Parameter(torch.randn(config.num_mem_tokens, d, device=emb.device).mul(std).to(emb.dtype))
        self.assoc = nn.ModuleList(AssociativeLayer(d, config.d_mem, config.nu, config.normalize_keys)
                                   for _ in range(base.config.num_hidden_layers)).to(emb.device, emb.dtype)

    # ---- small accessors -------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.memory.device

    @property
    def dtype(self) -> torch.dtype:
        return self.memory.dtype

    @property
    def num_layers(self) -> int:
        return len(self.assoc)

    @property
    def hidden_size(self) -> int:
        return self.memory.shape[1]

    def empty_state(self, batch_size: int) -> MemoryState:
        return MemoryState.empty(self.num_layers, batch_size, self.config.d_key, self.hidden_size,
                                 self.config.memory_dtype, self.device)

    # ---- inputs ----------------------------------------------------------------------
    def prepare(self, input_ids, attention_mask=None, labels=None, state=None,
                keep_logits: str = "all") -> tuple[Segmented, MemoryState]:
        """Validate a call's inputs (both execution orders use this) and cut them into segments."""
        if keep_logits not in _KEEP_LOGITS:
            raise ValueError(f"keep_logits must be one of {_KEEP_LOGITS}, got {keep_logits!r}")
        ids = validate_ids(input_ids, self.base.config.vocab_size, self.device)
        mask = validate_mask(attention_mask, ids)
        seg = segment(ids, self.config.segment_size, mask, labels)
        B = ids.shape[0]
        if state is None:
            state = self.empty_state(B)
        else:
            self.check_state(state, B)
        return seg, state

    def check_state(self, state: MemoryState, batch_size: int) -> None:
        want = (self.num_layers, batch_size, self.config.d_key, self.hidden_size)
        if not isinstance(state, MemoryState):
            raise TypeError(f"state must be a diaglab.MemoryState, got {type(state).__name__}")
        if tuple(state.W_mem.shape) != want or tuple(state.z.shape) != want[:3]:
            raise ValueError(f"state holds W_mem {tuple(state.W_mem.shape)} / z {tuple(state.z.shape)}, "
                             f"this model and batch need W_mem {want} / z {want[:3]}")
        if state.W_mem.device != self.device:
            raise ValueError(f"state is on {state.W_mem.device} but the model on {self.device}; use state.to(...)")
        if state.W_mem.dtype != self.config.memory_dtype:
            raise ValueError(f"state dtype {state.W_mem.dtype} differs from config.memory_dtype "
                             f"{self.config.memory_dtype}")

    # ---- one segment through all layers (SPEC §1-2) -----------------------------------
    def segment_step(self, ids: torch.Tensor, nreal: torch.Tensor | None, state: list,
                     write: bool = True, with_memory: bool = True, cache=None) -> torch.Tensor:
        """Run one segment through every layer; update the per-layer state lists in place.

        ids: (B, n_s); nreal: (B,) real tokens per row, or None when all n_s are real.
        state: [W_mem list, z list, is_first list] (per layer), replaced entry by entry.
        write=False, with_memory=False is the decoding mode of SPEC §5 (reads only, no memory
        rows); there a transformers DynamicCache may carry the open segment's keys and values,
        and ids are the tokens after those already cached (positions continue from the cache).
        Returns the final-norm text hidden states (B, n_s, d).
        """
        if write and not with_memory:
            raise ValueError("write=True needs with_memory=True: memory is written from the memory rows")
        if cache is not None and (with_memory or nreal is not None):
            raise ValueError("a KV cache is only for decoding: with_memory=False, write=False, no padding")
        B, n_s = ids.shape
        M = self.config.num_mem_tokens if with_memory else 0
        inner = self.base.model
        h = inner.embed_tokens(ids)                                             # (B, n_s, d)
        if with_memory:
            h = torch.cat([h, self.memory.expand(B, M, -1)], dim=1)             # (B, T, d)
        pos, allowed = positions_and_mask(n_s, nreal, M, ids.device)
        start = cache.get_seq_length() if cache is not None else 0
        if start > 0:  # new rows attend to every cached row and causally among themselves
            pos = pos + start
            allowed = torch.ones(n_s, start + n_s, dtype=torch.bool, device=ids.device).tril(start)[None]
        if allowed is not None:
            mask = torch.zeros(allowed.shape, dtype=h.dtype, device=h.device)
            mask = mask.masked_fill(~allowed, torch.finfo(h.dtype).min)[:, None]  # (B, 1, T, T) additive
        elif self.base.config._attn_implementation != "sdpa":
            T = n_s + M
            causal = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
            mask = torch.zeros(T, T, dtype=h.dtype, device=h.device).masked_fill(~causal, torch.finfo(h.dtype).min)
            mask = mask[None, None]                                             # (1, 1, T, T)
        else:
            mask = None  # plain causal inside the segment
        cos_sin = inner.rotary_emb(h, pos)
        W_mem, z, first = state
        wmask = None if nreal is None else nreal > 0
        reads = (~torch.stack(first)).any(dim=1).tolist()                       # (L,) one transfer per segment
        for l, layer in enumerate(inner.layers):
            if reads[l]:
                h = self.assoc[l].read(h, W_mem[l], z[l], first[l])
            h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin,
                      cache=cache, use_cache=cache is not None)
            if write:
                W_mem[l], z[l] = self.assoc[l].write(h[:, n_s:], W_mem[l], z[l], first[l],
                                                     self.config.correction, wmask)
                first[l] = first_after_write(first[l], wmask)
        return inner.norm(h[:, :n_s])

    def forward(self, input_ids, attention_mask=None, labels=None, state: MemoryState | None = None,
                keep_logits: str = "all") -> ARMTOutput:
        """Sequential ARMT. input_ids (B, N) any N >= 1; attention_mask (B, N) right-padded 0/1;
        labels (B, N) -> mean next-token loss (-100 ignored). state: continue from a MemoryState.
        keep_logits: 'all' | 'last_segment' | 'none' (the latter two keep peak memory flat in N)."""
        seg, state = self.prepare(input_ids, attention_mask, labels, state, keep_logits)
        lists = list(state.layers())
        outputs = SegmentOutputs(seg, keep_logits, self.base.lm_head)
        for s, (a, e) in enumerate(seg.bounds):
            nreal = seg.nreal[s] if seg.padded else None
            outputs.add(s, self.segment_step(seg.ids[:, a:e], nreal, lists))
        logits, loss = outputs.result()
        return ARMTOutput(logits, loss, MemoryState.from_layers(*lists))

    # ---- generation (SPEC §5) ---------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int = 16, **sampling) -> torch.Tensor:
        """Greedy (default) or sampled continuation; see diaglab.generation.generate."""
        return generate(self, self, input_ids, max_new_tokens, **sampling)

    # ---- persistence (diaglab.checkpoint) ----------------------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write armt_config.json, base_config.json and model.safetensors into the directory
        path, atomically: a failed save leaves the previous checkpoint there intact."""
        checkpoint.save(self, path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device=None) -> "ARMT":
        """Load a model written by save_pretrained (no network), each tensor in its saved
        dtype, in eval mode; refuses files it cannot read faithfully."""
        return checkpoint.load(cls, path, device)


@contextmanager
def _seeded(seed: int):
    """Seed torch's global RNG inside the block and restore the caller's RNG afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def randomize_memory_(model: ARMT, seed: int = 0, scale: float = 0.25) -> ARMT:
    """Give W_mv random non-zero weights (std scale / sqrt(d)) and each layer a distinct
    W_mb bias, in place.

    An untrained ARMT has W_mv = 0, so W_mem stays 0 and the memory path does nothing
    (SPEC §2, testing trap). Tests and demos call this to exercise it. The default scale
    keeps the memory clearly live (logits of later segments move by ~15-40 %) yet stable;
    at scale 1 a random ARMT is chaotic: a 1e-7 change in its inputs grows ~1e5-fold
    over 128 segments, even in float64, and any two roundings of it drift apart.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for l, a in enumerate(model.assoc):
            d = a.W_mv.weight.shape[1]
            w = torch.randn(a.W_mv.weight.shape, generator=g) * (scale / d ** 0.5)
            a.W_mv.weight.copy_(w.to(a.W_mv.weight.dtype))
            a.W_mb.bias.fill_(-1.0 + 2.0 * l / max(1, model.num_layers - 1))
    return model
