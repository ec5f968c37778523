"""ARMTConfig: the few numbers that turn a decoder into an Associative Recurrent Memory
Transformer (design §1-2). Frozen and validated on construction, so a bad value fails
where it is written, with the field's name and the range it must lie in."""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field

import torch

from ._checks import check_int

_MEMORY_DTYPES = {"float32": torch.float32, "float64": torch.float64,
                  "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ARMTConfig:
    segment_size: int = 64          # n: text tokens per segment (the last one may be shorter)
    num_mem_tokens: int = 8         # M: memory tokens appended to every segment
    d_mem: int = 16                 # key size of the associative memory (64 in the paper)
    nu: int = 3                     # DPFP order; d_key = 2 * nu * d_mem
    correction: bool = True         # delta-rule normaliser correction (gamma) on z
    memory_dtype: torch.dtype = field(default=torch.float32)  # dtype of W_mem and z, whatever the model's
    # L2-normalise the DPFP features of read queries and write keys. Not in design §2's equations
    # (default off, so the model is exactly those); the reference ARMT code does it, and without
    # it a write's weight grows with its key's size, so one segment's write can drown the rest.
    normalize_keys: bool = False

    def __post_init__(self):
        check_int("segment_size", self.segment_size, 1)
        check_int("num_mem_tokens", self.num_mem_tokens, 1)
        check_int("d_mem", self.d_mem, 1)
        check_int("nu", self.nu, 1)
        if self.nu > 2 * self.d_mem:
            raise ValueError(f"nu must be <= 2 * d_mem = {2 * self.d_mem} (DPFP rolls within 2*d_mem), got {self.nu}")
        if not isinstance(self.normalize_keys, bool):
            raise ValueError(f"normalize_keys must be True or False, got {self.normalize_keys!r}")
        if not isinstance(self.correction, bool):
            raise ValueError(f"correction must be True or False, got {self.correction!r}")
        dt = self.memory_dtype
        if isinstance(dt, str):
            if dt.removeprefix("torch.") not in _MEMORY_DTYPES:
                raise ValueError(f"memory_dtype must be one of {sorted(_MEMORY_DTYPES)}, got {dt!r}")
            object.__setattr__(self, "memory_dtype", _MEMORY_DTYPES[dt.removeprefix("torch.")])
        elif dt not in _MEMORY_DTYPES.values():
            raise ValueError(f"memory_dtype must be a floating torch dtype such as torch.float32, got {dt!r}")

    @property
    def d_key(self) -> int:
        """Length of a DPFP feature vector: 2 * nu * d_mem."""
        return 2 * self.nu * self.d_mem

    def to_dict(self) -> dict:
        d = asdict(self)
        d["memory_dtype"] = str(self.memory_dtype).removeprefix("torch.")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ARMTConfig":
        """The inverse of to_dict. Every field must be present and no other: a missing one
        would silently take its default, an unknown one (a typo) would be silently dropped."""
        fields = list(cls.__dataclass_fields__)
        missing = [k for k in fields if k not in d]
        if missing:
            raise ValueError(f"ARMTConfig field {missing[0]!r} is missing; give every field of {fields}")
        unknown = [k for k in d if k not in cls.__dataclass_fields__]
        if unknown:
            close = difflib.get_close_matches(unknown[0], fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown ARMTConfig field {unknown[0]!r}{hint}; the fields are {fields}")
        return cls(**d)
