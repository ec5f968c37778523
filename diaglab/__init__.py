"""diaglab: learn, run and measure Associative Recurrent Memory Transformers (ARMT) and
Diagonal Batching.

Shape alphabet, used in every docstring and shape comment:
  B batch · N tokens · S segments · L layers · n text tokens per segment ·
  M memory tokens · T = n + M rows of a segment · d model width ·
  dk = 2 * nu * d_mem key size · G group size (layers run together in one step) · V vocab

"design §n" in docstrings and comments is section n of docs/design.md (the equations, the
grid and schedule, grouped execution, generation, training, the papers' measurements).
"""

from . import schedule
from .armt import ARMT, ARMTOutput, AssociativeLayer, randomize_memory_
from .config import ARMTConfig
from .diagonal import DiagonalExecutor
from .memory import MemoryState, associative_read, associative_write, dpfp
from .presets import PRESETS, from_preset, tiny_armt
from .ring import RingExecutor
from . import presets

__all__ = ["ARMT", "ARMTConfig", "ARMTOutput", "AssociativeLayer", "DiagonalExecutor", "MemoryState",
           "PRESETS", "RingExecutor", "associative_read", "associative_write", "dpfp", "from_preset", "presets",
           "randomize_memory_", "schedule", "tiny_armt"]
