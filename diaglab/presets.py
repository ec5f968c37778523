"""Named model sizes and the offline builders that use them.

`tiny` is the CPU teaching size (the benchmarks' default); `llama_1b` has the shape of
LLaMA-3.2-1B (random init: latency needs no trained weights) with the paper's segment
1024 + 128 memory tokens. Everything is built from configs: nothing is downloaded.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers

import torch

from ._checks import check_int
from .armt import ARMT, _seeded
from .config import ARMTConfig

PRESETS: dict[str, dict] = {
    "tiny": dict(layers=8, hidden=128, heads=4, kv_heads=2, vocab=256, intermediate=344,
                 segment_size=32, num_mem_tokens=8, d_mem=16),
    "small": dict(layers=12, hidden=256, heads=8, kv_heads=4, vocab=512, intermediate=688,
                  segment_size=64, num_mem_tokens=16, d_mem=32),
    "llama_1b": dict(layers=16, hidden=2048, heads=32, kv_heads=8, vocab=128256, intermediate=8192,
                     segment_size=1024, num_mem_tokens=128, d_mem=64, rope_theta=500000.0,
                     tie_word_embeddings=True, llama3_rope=True, max_positions=131072),
}


# LlamaConfig fields that llama_config fills from its own arguments
_SET_BY_ARGUMENT = {"vocab_size": "vocab", "hidden_size": "hidden", "intermediate_size": "intermediate",
                    "num_hidden_layers": "layers", "num_attention_heads": "heads",
                    "num_key_value_heads": "kv_heads", "max_position_embeddings": "max_positions",
                    "rope_parameters": "rope_theta and llama3_rope"}


def _check_llama_kw(extra: dict, own: list[str]) -> None:
    """Raise TypeError for a keyword that is no LlamaConfig field (LlamaConfig itself would
    keep any keyword as an attribute nobody reads, so a typo would silently do nothing).
    own: the names the caller passes on as they are (also offered as close matches)."""
    from transformers import LlamaConfig
    fields = [name for name, p in inspect.signature(LlamaConfig.__init__).parameters.items()
              if name != "self" and p.kind is not p.VAR_KEYWORD and name not in _SET_BY_ARGUMENT]
    for key in extra:
        if key in own:
            continue
        if key in _SET_BY_ARGUMENT:
            raise TypeError(f"{key} is set from the argument {_SET_BY_ARGUMENT[key]}: pass that instead")
        if key not in fields:
            close = difflib.get_close_matches(key, own + fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"unknown keyword argument {key!r}{hint} (the accepted keywords are this function's "
                            "parameters and transformers.LlamaConfig's fields)")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def check_heads(hidden: int, heads: int, kv_heads: int, head_dim: int | None = None) -> None:
    """Raise unless heads divides hidden, kv_heads divides heads, and the head size is even (RoPE
    rotates channel pairs). llama_config and the training configs check with it."""
    for name, value in (("hidden", hidden), ("heads", heads), ("kv_heads", kv_heads)):
        check_int(name, value, 1)
    if head_dim is not None:
        check_int("head_dim", head_dim, 1)
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads}), "
                         f"and heads by kv_heads ({kv_heads})")
    head_dim = hidden // heads if head_dim is None else head_dim
    if head_dim % 2:
        source = "head_dim" if head_dim != hidden // heads else f"hidden {hidden} / heads {heads}"
        raise ValueError(f"the head size ({source} = {head_dim}) is odd, and RoPE rotates channel pairs: "
                         "choose a width and heads whose quotient is even")


def llama_config(layers: int, hidden: int, heads: int, kv_heads: int, vocab: int,
                 intermediate: int | None = None, rope_theta: float = 10000.0,
                 tie_word_embeddings: bool = False, llama3_rope: bool = False, max_positions: int = 4096,
                 **extra):
    """A transformers LlamaConfig of the given shape (SDPA attention); extra: other LlamaConfig
    fields (e.g. attention_bias=True, mlp_bias=True). Unknown keywords raise TypeError."""
    from transformers import LlamaConfig
    _check_llama_kw(extra, list(inspect.signature(llama_config).parameters))
    for name, value in (("layers", layers), ("hidden", hidden), ("heads", heads), ("kv_heads", kv_heads),
                        ("vocab", vocab), ("max_positions", max_positions)):
        check_int(name, value, 1)
    if intermediate is not None:
        check_int("intermediate", intermediate, 1)
    if isinstance(rope_theta, bool) or not isinstance(rope_theta, numbers.Real) or not math.isfinite(rope_theta) \
            or rope_theta <= 0:
        raise ValueError(f"rope_theta must be a finite number > 0, got {rope_theta!r}")
    _check_bool("tie_word_embeddings", tie_word_embeddings)
    _check_bool("llama3_rope", llama3_rope)
    check_heads(hidden, heads, kv_heads, extra.get("head_dim"))
    rope = {"rope_type": "default", "rope_theta": rope_theta}
    if llama3_rope:  # LLaMA-3.2's frequency scaling
        rope = {"rope_type": "llama3", "rope_theta": rope_theta, "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    no_special_tokens = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 4 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_positions, rope_parameters=rope,
                      tie_word_embeddings=tie_word_embeddings, **{**no_special_tokens, **extra})
    cfg._attn_implementation = "sdpa"
    return cfg


def tiny_armt(layers: int = 4, hidden: int = 128, heads: int = 4, kv_heads: int = 2, vocab: int = 256,
              segment_size: int = 32, num_mem_tokens: int = 8, d_mem: int = 16, seed: int = 0,
              intermediate: int | None = None, correction: bool = True, dtype: torch.dtype = torch.float32,
              memory_dtype: torch.dtype = torch.float32, device=None, normalize_keys: bool = False,
              **llama_kw) -> ARMT:
    """A randomly initialised ARMT over a small LLaMA, built offline and reproducibly from seed.
    llama_kw: other LlamaConfig fields (e.g. initializer_range=0.1); unknown keywords raise TypeError."""
    _check_llama_kw(llama_kw, [*inspect.signature(tiny_armt).parameters, *inspect.signature(llama_config).parameters])
    check_int("seed", seed, 0)
    cfg = ARMTConfig(segment_size=segment_size, num_mem_tokens=num_mem_tokens, d_mem=d_mem,
                     correction=correction, normalize_keys=normalize_keys, memory_dtype=memory_dtype)
    from transformers import LlamaForCausalLM
    with _seeded(seed):
        base = LlamaForCausalLM(llama_config(layers, hidden, heads, kv_heads, vocab, intermediate, **llama_kw))
        model = ARMT(base, cfg)
    model = model.to(dtype=dtype)
    return model.to(device) if device is not None else model


def from_preset(name: str, seed: int = 0, **overrides) -> ARMT:
    """Build the named preset (see PRESETS), with any field overridden (tiny_armt's keywords)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return tiny_armt(**{**PRESETS[name], **overrides}, seed=seed)
