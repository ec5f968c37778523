"""ARMT: a transformers LlamaForCausalLM turned into an Associative Recurrent Memory
Transformer, run in the plain sequential order (design §1-2).

This file is the reference — the naive twin of the diagonal executor. For each segment
s = 0..S-1 and each layer l = 0..L-1 (S * L layer calls) it reads layer l's memory into
the layer input, runs the base model's own decoder layer unchanged, and writes the
layer's memory rows back into layer l's memory: `grouped.grouped_layer_ref` on the
one-layer range (l, l), where the executor runs `grouped.grouped_layer` on (lo, hi).
Only the MemoryState crosses segments.
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
from .grouped import LayerDims, LayerStack, grouped_cells, grouped_layer_ref
from .memory import MemoryState, associative_read, associative_write, features
from .segments import Segmented, SegmentOutputs, SegmentRows, segment, segment_rows, validate_ids, validate_mask

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
        """h: (B, T, d) layer input -> h + A(h) for rows whose layer is past its first segment
        (is_first (B,) bool, or None: no row is)."""
        q = features(self.W_mq(h), self.nu, self.normalize)                     # (B, T, dk)
        A = associative_read(q, W_mem, z).to(h.dtype)                           # (B, T, d)
        return h + (A if is_first is None else A.masked_fill(is_first[:, None, None], 0))

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
        """Validate a call's inputs (both execution orders use this) and cut them into
        segments; an open segment carried by `state` goes in front of input_ids."""
        if keep_logits not in _KEEP_LOGITS:
            raise ValueError(f"keep_logits must be one of {_KEEP_LOGITS}, got {keep_logits!r}")
        self.check_dtypes()
        ids = validate_ids(input_ids, self.base.config.vocab_size, self.device)
        mask = validate_mask(attention_mask, ids)
        B = ids.shape[0]
        if state is None:
            state = self.empty_state(B)
        self.check_state(state, B)
        seg = segment(ids, self.config.segment_size, mask, labels, state.open_ids)
        return seg, state.with_open(None)

    def check_dtypes(self) -> None:
        """Raise unless the weights share one dtype (W_mem and z keep config.memory_dtype)."""
        embed = self.base.model.embed_tokens   # None on a pipeline rank that does not embed
        parts = {"memory": self.memory.dtype, "assoc.0.W_mq": self.assoc[0].W_mq.weight.dtype,
                 **({} if embed is None else {"base.model.embed_tokens": embed.weight.dtype})}
        if len(set(parts.values())) > 1:
            found = ", ".join(f"{k} {str(v).removeprefix('torch.')}" for k, v in parts.items())
            raise TypeError(f"the model's weights have different dtypes ({found}); both execution orders run "
                            "one dtype (the memory's W_mem and z keep config.memory_dtype): cast the whole "
                            "model, e.g. model.to(torch.bfloat16) or model.float()")

    def check_state(self, state: MemoryState, batch_size: int) -> None:
        """Raise unless state fits this model and a batch of batch_size rows, naming the tensor."""
        if not isinstance(state, MemoryState):
            raise TypeError(f"state must be a diaglab.MemoryState (out.state of an earlier call), "
                            f"got {type(state).__name__}")
        L, dk, d = self.num_layers, self.config.d_key, self.hidden_size
        want = {"W_mem": ((L, batch_size, dk, d), self.config.memory_dtype),
                "z": ((L, batch_size, dk), self.config.memory_dtype),
                "is_first": ((L, batch_size), torch.bool)}
        for name, (shape, dtype) in want.items():
            t = getattr(state, name)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"state.{name} must be a tensor, got {type(t).__name__}")
            if tuple(t.shape) != shape:
                raise ValueError(f"state.{name} has shape {tuple(t.shape)}; this model (L={L}, dk={dk}, d={d}) "
                                 f"and a batch of {batch_size} need {shape}")
            if t.dtype != dtype:
                raise ValueError(f"state.{name} has dtype {t.dtype}, this model needs {dtype} "
                                 f"(config.memory_dtype for W_mem and z)")
            if t.device != self.device:
                raise ValueError(f"state.{name} is on {t.device} but the model on {self.device}; "
                                 f"use state.to({str(self.device)!r})")
        o = state.open_ids
        if o is not None:
            if not isinstance(o, torch.Tensor) or o.dim() != 2 or o.shape[0] != batch_size \
                    or o.dtype != torch.long or not 0 < o.shape[1] < self.config.segment_size:
                raise ValueError("state.open_ids must be a LongTensor (B, r) with 0 < r < segment_size "
                                 f"({self.config.segment_size}) and B = {batch_size}, or None")
            if o.device != self.device:
                raise ValueError(f"state.open_ids is on {o.device} but the model on {self.device}; "
                                 f"use state.to({str(self.device)!r})")
            if bool((o < 0).any()):
                raise ValueError("this state's rows ended at different points inside a segment (a right-padded "
                                 "batch), so there is no single place to continue from; continue each row "
                                 "from a call of its own, or pad the earlier call's rows to whole segments")

    def layer_stack(self) -> LayerStack:
        """The layers as grouped_layer_ref takes them (the reference needs no stacked weights)."""
        return LayerStack(self, None, LayerDims.of(self))

    # ---- one segment through all layers (design §1-2) ----------------------------------
    def segment_step(self, rows: SegmentRows, state: MemoryState, has_memory: list[bool],
                     layers: LayerStack | None = None,
                     settled: list[bool] | None = None) -> tuple[torch.Tensor, MemoryState]:
        """Segment rows (B, T, d) through layers 0..L-1 -> output rows (B, T, d), new state.
        has_memory: (L,) host flags (MemoryState.written()[0]); after the step every layer has written.
        layers: layer_stack(), when the caller runs several segments (built once per call).
        settled: (L,) host flags, every row of the layer has written (its first-segment masks are
        skipped, as the executor skips them), or None."""
        layers = self.layer_stack() if layers is None else layers
        h = rows.X[None]                                                        # (1, B, T, d): G = 1
        for l in range(self.num_layers):
            h, state = grouped_cells(grouped_layer_ref, layers, h, [rows], state, l, l, rows.n_text,
                                     has_memory[l], settled=bool(settled and settled[l]))   # the executor's step
        return h[0], state

    def forward(self, input_ids, attention_mask=None, labels=None, state: MemoryState | None = None,
                keep_logits: str = "all") -> ARMTOutput:
        """Sequential ARMT. input_ids (B, N) any N >= 1; attention_mask (B, N) right-padded 0/1;
        labels (B, N) integer -> mean next-token loss (-100 ignored). state: continue from an
        earlier call's out.state. keep_logits: 'all' | 'last_segment' | 'none' (the latter two
        keep peak memory flat in N).

        Continuing: model(ids[:, k:], state=model(ids[:, :k]).state) equals model(ids)[:, k:]
        for any k. A segment the input ends inside stays open: its tokens get logits, its
        memory write waits, and out.state carries its tokens (state.open_ids) to the next call."""
        seg, state = self.prepare(input_ids, attention_mask, labels, state, keep_logits)
        state = state.own_first()   # settled steps pass is_first on: the result must not alias the caller's
        has_memory, settled = state.written()                                   # host flags, read once
        outputs = SegmentOutputs(seg, keep_logits, self.base)
        layers = self.layer_stack()
        for s in range(seg.num_segments):
            rows = segment_rows(self, seg, s)                                   # [embed ; memory], positions, mask
            h, state = self.segment_step(rows, state, has_memory, layers, settled)
            has_memory = [True] * self.num_layers
            if rows.write_mask is None:                                         # every row wrote
                settled = [True] * self.num_layers
            outputs.add(s, h[:, :rows.n_text])            # text rows only
        logits, loss = outputs.result()
        return ARMTOutput(logits, loss, state.with_open(seg.open_ids()))

    # ---- generation (design §5) ---------------------------------------------------------
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
    (design §2, testing trap). Tests and demos call this to exercise it. The default scale
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
