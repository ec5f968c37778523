"""DiagonalExecutor: run an ARMT's layer x segment grid anti-diagonal by anti-diagonal
(Diagonal Batching, arXiv 2506.05229), with the same numbers as the sequential model.

At step t the layers lo..hi are busy, layer l on segment t - l (design §3); all of them
run as one grouped call (grouped.grouped_layer). The only cross-segment state —
(W_mem_l, z_l, is_first_l) — goes from step to step as a MemoryState value, so the
L * S layer calls collapse to L + S - 1 grouped calls. No retraining, no per-call weight
copies at inference (grouped.TiedStacks); under autograd the stacks are rebuilt in-graph
each call so gradients reach every parameter.

What the executor will not do silently: run stale weights (it re-ties when a parameter
or submodule was replaced, or the model moved), skip what the model's own modules would
run (a hook, an adapter, a changed attribute: it warns once and runs those steps through
the modules themselves, grouped_layer_ref — exact, without the grouped speed-up), or
differ by dropout (refused in training mode with attention dropout).

Steps on plain segments (every row full, no mask) run lean: the busy layers' memory is held
as two tensors from step to step, as in the bare schedule (bench.schedule_run); a layer's
first segment is marked by an is_first mask on that layer alone. The other steps (padding, a layer where only some rows have written, the sequential order
with more than one layer) go through grouped_cells with the state's masks.
Both give the same numbers (tests/test_diagonal.py).

The executor can also follow the sequential order through the same grouped kernels
(`order="sequential"`), which separates the gain of the schedule from the kernels'.

compile=True (opt-in) runs the plateau's full-group step — all L layers busy, no mask:
fixed shapes — through torch.compile (on a CPU with inductor's C++ wrapper), and the ramps
eagerly (a dynamic-shape graph for the ramps took about a minute to compile and ran slower
than eager). The first such step pays
the compile (`compile_seconds` reports it: tens of seconds on a CPU); later calls reuse it.
On CUDA, compile_mode="reduce-overhead" adds CUDA graphs.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import Callable

import torch

from . import schedule as sched
from .armt import ARMT, ARMTOutput
from .generation import generate as _generate
from .grouped import (GroupingCheck, LayerDims, LayerStack, TiedStacks, _stack_members, gather_stacks,
                      grouped_cells, grouped_layer, grouped_layer_ref, profiler_range)
from .memory import MemoryState
from .segments import SegmentFeed, SegmentOutputs

StepHook = Callable[[int, list], None]


def check_no_dropout(model: ARMT) -> None:
    """Refuse attention dropout in training mode: the two orders would draw different random
    masks (and the grouped kernels apply none), so their numbers could not agree."""
    if not model.training:
        return
    rates = {f"base.model.layers.{l}.{name}".rstrip("."): getattr(m, "attention_dropout", 0.0)
             for l, b in enumerate(model.base.model.layers) for name, m in b.named_modules()}   # wrapped too
    live = {name: p for name, p in rates.items() if p > 0}
    if live:
        name, p = next(iter(live.items()))
        raise ValueError(f"attention dropout is on in training mode ({name}.attention_dropout = {p}, "
                         f"{len(live)} module(s)), and the executor cannot reproduce random masks; call "
                         "model.eval(), or turn it off on every attention module (the modules keep their own "
                         "copy: setting base.config.attention_dropout alone does not): "
                         "for b in model.base.model.layers: b.self_attn.attention_dropout = 0.0")


class DiagonalExecutor:
    """Same call signature and outputs as ARMT.forward; built from any ARMT instance."""

    def __init__(self, model: ARMT, order: str = "diagonal", kernel: str = "bmm", compile: bool = False,
                 compile_mode: str | None = None):
        if not isinstance(model, ARMT):
            raise TypeError(f"DiagonalExecutor needs a diaglab.ARMT, got {type(model).__name__}")
        if order not in ("diagonal", "sequential"):
            raise ValueError(f"order must be 'diagonal' or 'sequential', got {order!r}")
        if kernel not in ("bmm", "grouped_mm") or (kernel == "grouped_mm" and not hasattr(torch, "_grouped_mm")):
            raise ValueError(f"kernel must be 'bmm' or 'grouped_mm' (needs torch._grouped_mm), got {kernel!r}")
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be True or False, got {compile!r}")
        if compile_mode not in (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
            raise ValueError(f"compile_mode must be None or a torch.compile mode ('default', 'reduce-overhead', "
                             f"'max-autotune', 'max-autotune-no-cudagraphs'), got {compile_mode!r}")
        if compile_mode is not None and not compile:
            raise ValueError("compile_mode is given but compile=False: pass compile=True as well")
        self.model, self.order, self.kernel = model, order, kernel
        self.compile, self.compile_mode = compile, compile_mode
        self.compile_seconds: float | None = None   # wall time of the first compiled step (compile included)
        self._compiled: Callable | None = None
        self._tied: TiedStacks | None = None
        self._layers: LayerStack | None = None   # the last LayerStack on the tied stacks (its caches survive calls)
        self._warned: tuple[str, ...] = ()
        self._check = GroupingCheck(model)
        if not self._check.problems():
            _stack_members(model)  # a clear error now when the layers cannot be stacked

    # ---- weights ----------------------------------------------------------------------
    def _needs_autograd(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.model.parameters())

    def stacked_weights(self) -> dict[str, torch.Tensor]:
        """The (L, ...) stacks used by a call: tied views at inference (re-tied when the model's
        parameters were replaced or moved), in-graph under autograd."""
        if self._needs_autograd():
            return gather_stacks(self.model)
        if self._tied is None or not self._tied.is_valid(self.model):
            self._tied = TiedStacks(self.model)
        return self._tied.tensors

    def layer_stack(self) -> tuple[LayerStack, Callable]:
        """The layers and the step function for this call: grouped_layer on stacked weights, or,
        when some module would not be reproduced by it, grouped_layer_ref (said once)."""
        problems = tuple(self._check.problems())
        dims = LayerDims.of(self.model, self.kernel)
        if not problems:
            W = self.stacked_weights()
            kept = self._layers
            if kept is None or kept.W is not W or kept.dims != dims:   # the same stacks: keep its caches
                kept = LayerStack(self.model, W, dims)
                self._layers = kept if W is (self._tied and self._tied.tensors) else None
            return kept, grouped_layer
        if problems != self._warned:
            self._warned = problems
            warnings.warn("DiagonalExecutor: " + "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")
                          + f" ({len(problems)} in all). The grouped kernels would skip these, so every step runs "
                          "through the model's own modules (grouped_layer_ref): the same numbers, in the diagonal "
                          "order, without the grouped speed-up. Remove the hooks/adapters (or merge the adapter "
                          "into the weights) to get it back.", stacklevel=3)
        return LayerStack(self.model, None, dims), grouped_layer_ref

    def _full_step(self) -> Callable | None:
        """The compiled full-group step, built on first use; None when not compiling (or under
        autograd, which runs eagerly)."""
        if not self.compile or self._needs_autograd():
            return None
        if self.compile_mode in ("reduce-overhead", "max-autotune") and self.model.device.type != "cuda":
            raise ValueError(f"compile_mode={self.compile_mode!r} uses CUDA graphs, which need a CUDA model "
                             f"(this one is on {self.model.device}); use compile_mode=None on a CPU")
        if self._compiled is None:
            if self.compile_mode is None and self.model.device.type == "cpu":
                # inductor's C++ wrapper: the compiled step's ~30 kernels are launched from C++, not
                # Python (measured 5-8 % faster on `tiny`; the cold compile costs the same)
                compiled = torch.compile(grouped_layer, dynamic=False, options={"cpp_wrapper": True})
            else:
                compiled = torch.compile(grouped_layer, dynamic=False, mode=self.compile_mode)

            def first_call(*args, **kw):   # times the compile once; the next call's _full_step skips it
                t0 = time.perf_counter()
                out = compiled(*args, **kw)
                if self.compile_seconds is None:   # later steps of the same call come here too
                    self.compile_seconds = time.perf_counter() - t0
                self._compiled = compiled
                return out
            self._compiled = first_call
        return self._compiled

    # ---- the run ----------------------------------------------------------------------
    def iter_steps(self, num_segments: int):
        """The steps of this executor's order, made one at a time."""
        order = sched.iter_diagonal if self.order == "diagonal" else sched.iter_sequential
        return order(self.model.num_layers, num_segments)

    def steps(self, num_segments: int) -> list[list[tuple[int, int]]]:
        return list(self.iter_steps(num_segments))

    def __call__(self, input_ids, attention_mask=None, labels=None, state: MemoryState | None = None,
                 keep_logits: str = "all", on_step: StepHook | None = None) -> ARMTOutput:
        """input_ids (B, N); attention_mask (B, N) right-padded; labels (B, N); state; see
        ARMT.forward (the same rule for open segments). on_step(t, cells) is called after each
        grouped step (profiling hooks)."""
        model = self.model
        check_no_dropout(model)
        seg, state = model.prepare(input_ids, attention_mask, labels, state, keep_logits)
        state = state.own_first()   # settled steps pass is_first on: the result must not alias the caller's
        layers, step = self.layer_stack()
        full_step = self._full_step() if step is grouped_layer else None
        outputs = SegmentOutputs(seg, keep_logits, model.base)
        # Under torch.no_grad the grouped steps run in inference mode: the same kernels with less
        # dispatch per operation (a `tiny` step 1.65 -> 1.56 ms, scripts/step_costs.py). What the call returns is made
        # outside it — logits and loss by SegmentOutputs, the memory copied out at the end — so a
        # caller gets ordinary tensors, usable later under autograd.
        infer = step is grouped_layer and not torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        with torch.inference_mode() if infer else contextlib.nullcontext():
            state = self._run(seg, layers, step, full_step, state, outputs, infer, on_step)
        logits, loss = outputs.result()
        if infer:
            state = state.ordinary()
        return ARMTOutput(logits, loss, state.with_open(seg.open_ids()))

    def _run(self, seg, layers, step, full_step, state, outputs, infer, on_step):
        """The steps of one call; returns the final memory state.

        A step is lean when every segment in flight is plain (no mask, every row writes), every
        layer is settled (all rows past their first segment) or fresh (no row has written: all
        on their first segment): it calls the step directly on the busy layers' memory, held as
        two tensors the way bench.schedule_run runs the bare schedule. Under a profiler every
        step, lean or not, is one range 'diag_step t layers lo-hi' (its inputs, memory and
        kernels), so a profile times the steps a call runs without one. A fresh layer's first
        segment is the only row block with an is_first mask; `state` is brought up to date when a
        general step needs it and at the end, and a layer the ramp down is done with is copied out
        of its step's output then (a view would keep the whole group's block alive until the end).
        Every other step goes through grouped_cells with the state's is_first masks; one layer
        with only some rows written (a padded earlier call) keeps every step there until it has
        settled."""
        model = self.model
        L, n, S, B = model.num_layers, model.config.segment_size, seg.num_segments, seg.ids.shape[0]
        has_memory, settled = state.written()               # (L,) host flags, read once (one device sync)
        mixed = any(h and not s for h, s in zip(has_memory, settled))   # a layer with only some rows written
        lean_order = self.order == "diagonal" or L == 1     # (the sequential order's steps are lean only if L = 1)
        rows_of = {}                                        # segment -> its SegmentRows, while in flight
        wanted = [outputs.wanted(s) for s in range(S)]      # segments whose logits (or loss) are made
        feed = SegmentFeed(model, seg)                      # segments' rows, a run of them at a time
        profiling = torch.autograd._profiler_enabled()      # (the step ranges' names are made only then)
        unplain = 0                                         # segments in flight with a mask or a write mask
        held = None   # (lo, hi, W_mem, z): layers lo..hi's memory as the last lean step left it, not yet in `state`
        finished = []  # (lo, hi, W_mem, z) copies for layers the lean steps are done with (the ramp down)
        Y, prev_lo, r = None, 0, None
        for t, cells in enumerate(self.iter_steps(S)):
            lo, hi = cells[0][0], cells[-1][0]
            if lo == 0:                                     # layer 0 takes a new segment's rows
                r = rows_of[cells[0][1]] = feed.rows(cells[0][1])
                unplain += r.mask is not None or r.write_mask is not None
            # one labelled range per step while a profiler runs (its inputs, memory and kernels)
            with profiler_range(f"diag_step {t} layers {lo}-{hi}") if profiling else contextlib.nullcontext():
                # Inputs: layer l >= 1 takes what layer l - 1 gave at the previous step (in both orders
                # the cell before (l, s) is (l - 1, s)); layer 0 takes the new segment's rows.
                parts = [r.X[None]] if lo == 0 else []
                if hi >= 1:
                    parts.append(Y[max(lo - 1, 0) - prev_lo:hi - prev_lo])             # views of the last output
                X = parts[0] if len(parts) == 1 else torch.cat(parts)                  # (G, B, T, d)
                if lean_order and not unplain and not mixed:
                    if held is None:
                        W_mem, z, _ = state.layers(lo, hi)
                    else:   # the diagonal's next layers: drop a layer that finished, add one that starts
                        h_lo, h_hi, W_mem, z = held
                        if lo > h_lo:   # (its memory goes back into `state` with the held ones)
                            finished.append((h_lo, lo - 1, W_mem[:lo - h_lo].clone(), z[:lo - h_lo].clone()))
                            W_mem, z = W_mem[lo - h_lo:], z[lo - h_lo:]
                        if hi > h_hi:
                            W_in, z_in, _ = state.layers(h_hi + 1, hi)
                            W_mem, z = torch.cat([W_mem, W_in]), torch.cat([z, z_in])
                    # (every segment in flight is plain: all share one pair of RoPE tables, r's)
                    first = None
                    if not has_memory[hi]:   # fresh: only the top layer can start here (layer l starts at step l)
                        first = torch.zeros(hi - lo + 1, B, dtype=torch.bool, device=X.device)
                        first[-1] = True
                    run = full_step if first is None and hi - lo + 1 == L and full_step is not None else step
                    Y, W_mem, z = run(X, layers=layers, lo=lo, hi=hi, n_text=n, cos=r.cos, sin=r.sin, mask=None,
                                      W_mem=W_mem, z=z, is_first=first, write_mask=None,
                                      read=hi > lo or has_memory[hi])   # the layers below the top one are settled
                    held = (lo, hi, W_mem, z)
                    if first is not None:
                        has_memory[hi] = settled[hi] = True
                else:
                    if held is not None:
                        state, held = self._flush(state, finished + [held], B), None
                        finished = []
                    rows = [rows_of[s] for _, s in cells]
                    plain = all(x.mask is None and x.write_mask is None for x in rows)   # fixed shapes, no masks
                    done = all(settled[lo:hi + 1])   # no row on its first segment: the step skips those masks
                    # the compiled step: the plateau's plain, settled steps (one graph, fixed shapes)
                    run = full_step if full_step is not None and hi - lo + 1 == L and plain and done else step
                    Y, state = grouped_cells(run, layers, X, rows, state, lo, hi, n,
                                             read=any(has_memory[lo:hi + 1]), settled=done)
                    has_memory[lo:hi + 1] = [True] * (hi - lo + 1)
                    if plain and not done:   # every row wrote
                        settled[lo:hi + 1] = [True] * (hi - lo + 1)
                    mixed = any(h and not s for h, s in zip(has_memory, settled))
            prev_lo = lo
            if hi == L - 1:  # a segment leaves the last layer
                s = cells[-1][1]
                gone = rows_of.pop(s)
                unplain -= gone.mask is not None or gone.write_mask is not None
                if wanted[s]:
                    self._leave(s, outputs, seg, Y, infer)
            if on_step is not None:
                on_step(t, cells)
        return state if held is None else self._flush(state, finished + [held], B)

    @staticmethod
    def _flush(state: MemoryState, pieces: list[tuple], B: int) -> MemoryState:
        """`state` with the memory the lean steps hold put back: pieces (lo, hi, W_mem, z) of
        consecutive layers, in order (the ramp down's finished layers, then the busy ones), in
        one replace (every row of those layers has written: is_first False)."""
        lo, hi = pieces[0][0], pieces[-1][1]
        assert all(a[1] + 1 == b[0] for a, b in zip(pieces, pieces[1:])), "lean memory pieces must follow one another"
        W_mem, z = ((pieces[0][2], pieces[0][3]) if len(pieces) == 1 else
                    (torch.cat([p[2] for p in pieces]), torch.cat([p[3] for p in pieces])))
        return state.replace(lo, hi, W_mem, z, torch.zeros(hi - lo + 1, B, dtype=torch.bool, device=W_mem.device))

    @staticmethod
    def _leave(s: int, outputs: SegmentOutputs, seg, Y: torch.Tensor, infer: bool) -> None:
        """Segment s, whose logits or loss are wanted, left the last layer (Y[-1]): its text rows to
        the final norm and LM head, outside inference mode (the logits are returned)."""
        a, e = seg.bounds[s]
        with torch.inference_mode(False) if infer else contextlib.nullcontext():
            outputs.add(s, Y[-1, :, :e - a])

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int = 16, **sampling) -> torch.Tensor:
        """Like ARMT.generate, with the prefill run by this executor (diagonally)."""
        return _generate(self.model, self, input_ids, max_new_tokens, **sampling)
