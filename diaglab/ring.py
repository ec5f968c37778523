"""RingExecutor: many requests through one ring of L layer slots (design §3, the serving
queue), exactly.

Slot k is always layer k. Every step moves each segment in flight one slot down and feeds
the next queued segment — of the request being fed, or the first segment of the next
request — into slot 0, so the ramps of the diagonal schedule are paid once per queue
instead of once per request (schedule.ring draws it).

Memory lives with the slots, as in the diagonal executor: slot l holds the layer-l memory
of the request passing through it (a request's segments enter on consecutive steps, so
its segment s meets the memory its segment s - 1 left there). A request's first segment
meets what the request before it left: it is marked as a first segment (is_first), so it
reads nothing and writes into an empty memory (memory.associative_write), and no slot is
ever emptied or changed in place — the same code with and without autograd. When a
request's last segment leaves a slot, that slot's memory (W_mem copied out of the step's
output, so the finished request does not keep the whole step's block alive) is the request's
final memory for the layer. A step reads its slots' memories as views of one
ring state (no per-request gather), so a ring step costs what a diagonal step costs, and
every request's numbers equal `model(ids_i)` run alone.

A step runs its busy slots as grouped calls (grouped.grouped_layer on stacked weights, or
its twin where the executor would be bypassed, as in DiagonalExecutor): one call per run
of consecutive busy slots, so empty slots — at the ends of the queue, or a gap left while
the queue was empty — are sliced away, never computed on zeros. Requests may join at any
time (`submit`), also while others run (continuous batching).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from .armt import ARMT, ARMTOutput
from .diagonal import DiagonalExecutor, check_no_dropout
from .grouped import grouped_cells, grouped_layer, profiler_range
from .generation import _decode, check_sampling
from .memory import MemoryState
from .schedule import adjacent_runs
from .segments import Segmented, SegmentOutputs, SegmentRows, segment_rows, validate_ids

RingStepHook = Callable[[int, list], None]   # on_step(t, cells): cells [(layer, request id, segment)]


@dataclass
class _Request:
    seg: Segmented
    outputs: SegmentOutputs
    rows: dict[int, SegmentRows] = field(default_factory=dict)   # segment -> rows, while in flight
    fed: int = 0                                                   # segments fed into slot 0 so far
    first_full: int = 0   # the first segment that fills the row (it writes); segments up to it start a memory
    final: dict[int, tuple] = field(default_factory=dict)         # layer -> its memory after the last segment


class RingExecutor:
    """runner.run([ids_a, ids_b, ...]) -> one ARMTOutput per request, in order, each equal to
    model(ids_i) alone; or submit(...) requests and call step() until they are done.
    Under autograd a grouped step computes several requests at once, so their graphs share
    nodes: call backward once, on the sum of the requests' losses (a request's own backward
    frees nodes the others still need; pass retain_graph=True to go request by request)."""

    def __init__(self, model: ARMT, kernel: str = "bmm"):
        self._diag = DiagonalExecutor(model, kernel=kernel)   # weights, fallback and checks: shared logic
        self.model = model
        self.step_count = 0
        self.history: list[list[tuple[int, int, int]]] = []  # per step: (layer, request id, segment)
        self._requests: dict[int, _Request] = {}
        self._queue: list[int] = []                           # request ids not fully fed, in order
        self._slots: list[tuple[int, int] | None] = [None] * model.num_layers   # slot -> (request, segment)
        self._outputs: list[tuple[int, torch.Tensor]] = []   # the last step's runs: (first slot, Y (G, 1, T, d))
        self._memory: MemoryState | None = None   # slot l: the layer-l memory of the request passing through it
        self._inference = False                    # that memory was made in inference mode (under no_grad)
        self._firsts: dict[tuple, torch.Tensor] = {}   # is_first patterns of a run, made once (never written to)
        self._rope: dict = {}                      # shared Segmented.rope of the requests in flight
        self._next_id = 0

    # ---- requests -------------------------------------------------------------------------
    def submit(self, input_ids, attention_mask=None, labels=None, keep_logits: str = "all") -> int:
        """Queue one request: input_ids [1, N] or [N] (any N >= 1), optional attention_mask and
        labels of the same shape. Returns its request id (0, 1, 2, ... in submission order)."""
        return self._enqueue(self._prepare(input_ids, attention_mask, labels, keep_logits))

    def _prepare(self, input_ids, attention_mask, labels, keep_logits: str) -> _Request:
        """A request checked and cut into segments, not yet queued."""
        ids = self._one_row(input_ids, "input_ids")
        mask = None if attention_mask is None else self._one_row(attention_mask, "attention_mask", like=ids)
        labels = None if labels is None else self._one_row(labels, "labels", like=ids)
        seg, _ = self.model.prepare(ids, mask, labels, None, keep_logits)
        return _Request(seg, SegmentOutputs(seg, keep_logits, self.model.base),
                        first_full=next((s for s, full in enumerate(seg.full) if full), seg.num_segments))

    def _enqueue(self, req: _Request) -> int:
        req.seg.rope = self._rope   # RoPE tables of unmasked segments depend only on the length: one set for all
        rid = self._next_id
        self._next_id += 1
        self._requests[rid] = req
        self._queue.append(rid)
        return rid

    @staticmethod
    def _one_row(t, name: str, like: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor [1, N] or [N], got {type(t).__name__}")
        if t.dim() == 1:
            t = t[None]
        if t.dim() != 2 or t.shape[0] != 1:
            raise ValueError(f"{name} must be [1, N] or [N] (one request; submit a batch row by row), "
                             f"got shape {tuple(t.shape)}")
        if like is not None and t.shape != like.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} does not match input_ids {tuple(like.shape)}")
        return t

    @property
    def pending(self) -> int:
        """Requests submitted and not finished."""
        return len(self._requests)

    # ---- the ring ---------------------------------------------------------------------------
    def step(self, on_step: RingStepHook | None = None) -> dict[int, ARMTOutput]:
        """One ring step: shift every segment one slot down, feed slot 0, run the busy slots.
        Returns {request id: output} for the requests whose last segment left the ring now."""
        model = self.model
        check_no_dropout(model)
        if self._memory is not None and self._inference and torch.is_grad_enabled():
            raise RuntimeError("this queue started under torch.no_grad (its memory lives in inference tensors) and "
                               "cannot continue under autograd; step it under torch.no_grad until runner.pending "
                               "== 0, then submit the requests that need gradients")
        finished: dict[int, ARMTOutput] = {}
        try:
            self._step(on_step, finished)
        except Exception as err:
            lost = sorted(set(self._requests) | set(finished))
            self._clear()
            raise RuntimeError(f"RingExecutor: a step failed ({type(err).__name__}: {err}); the ring was "
                               f"emptied and request(s) {lost} were dropped: submit them again") from err
        if not self._requests:
            self._clear()   # drained: the next request may meet another dtype, device or grad mode
        return finished

    def _step(self, on_step, finished: dict) -> None:
        """The body of step(): shift, feed, run the busy slots; finished requests go into `finished`."""
        model = self.model
        # 1. shift: slot k takes what slot k-1 held; slot 0 takes the next queued segment
        self._slots = [self._feed()] + self._slots[:-1]
        busy = [(l, *cell) for l, cell in enumerate(self._slots) if cell is not None]
        if not busy:
            return
        if self._memory is None:   # a queue starts: its grad mode decides for all its steps
            self._memory = model.empty_state(1)
            self._inference = torch.is_inference_mode_enabled() or not torch.is_grad_enabled()
        layers, grouped = self._diag.layer_stack()
        # A queue started under torch.no_grad runs its grouped steps in inference mode, as
        # DiagonalExecutor does (its memory then lives in inference tensors until the queue drains,
        # and what it returns is made outside inference mode). Steps through the model's own modules
        # (hooks, adapters) run outside it, so hooks never see inference tensors; a queue started
        # under autograd never uses it, even for a step taken under no_grad.
        infer = self._inference and grouped is grouped_layer and not torch.is_inference_mode_enabled()
        t = self.step_count
        prev, self._outputs = self._outputs, []
        with profiler_range(f"ring_step {t}"), torch.inference_mode() if infer else contextlib.nullcontext():
            for run in adjacent_runs(busy):   # 2. consecutive busy slots: one grouped call each
                finished.update(self._run(run, layers, grouped, prev, infer))
        self.step_count += 1
        self.history.append(busy)
        if on_step is not None:
            on_step(t, busy)

    def _clear(self) -> None:
        """Forget every request and the ring's state (slots, memory, last outputs, RoPE tables)."""
        self._requests.clear()
        self._queue.clear()
        self._slots = [None] * self.model.num_layers
        self._outputs, self._memory, self._rope, self._firsts = [], None, {}, {}

    def _feed(self) -> tuple[int, int] | None:
        """The next queued (request id, segment), or None when the queue is empty."""
        while self._queue:
            rid = self._queue[0]
            req = self._requests[rid]
            if req.fed < req.seg.num_segments:
                s = req.fed
                req.fed += 1
                # built when fed, not ahead: the model may change between two ring steps
                req.rows[s] = segment_rows(self.model, req.seg, s, pad=True)
                if req.fed == req.seg.num_segments:
                    self._queue.pop(0)
                return rid, s
            self._queue.pop(0)
        return None

    def _run(self, cells: list[tuple[int, int, int]], layers, grouped,
             prev: list[tuple[int, torch.Tensor]], infer: bool) -> dict[int, ARMTOutput]:
        """One grouped call for the consecutive layers of `cells` [(layer, rid, segment)];
        prev: the last step's outputs, (first slot, Y) per run."""
        model, L = self.model, self.model.num_layers
        lo, hi = cells[0][0], cells[-1][0]
        reqs = [self._requests[rid] for _, rid, _ in cells]
        # inputs: slot 0 takes a new segment's rows; slot l >= 1 what slot l - 1 gave at the last
        # step (the same request and segment, one slot on), as slices of those outputs
        parts = [reqs[0].rows[cells[0][2]].X[None]] if lo == 0 else []
        l = max(lo, 1)
        while l <= hi:
            a, Y = next((a, Y) for a, Y in prev if a <= l - 1 < a + Y.shape[0])
            e = min(hi, a + Y.shape[0])                      # layers l..e take slots l-1..e-1 of Y
            parts.append(Y[l - 1 - a:e - a])
            l = e + 1
        X = parts[0] if len(parts) == 1 else torch.cat(parts)                      # (G, 1, T, d)
        rows = [req.rows[s] for req, (_, _, s) in zip(reqs, cells)]
        # A slot holds whatever the request before left there; which rows start their memory is
        # known here: segment s of a request whose segments before s never filled their row (a
        # first segment, or a padded row's tail). Such a row reads nothing and writes into an
        # empty memory (associative_write), so a slot is never emptied. When no row of the run
        # starts one, the step skips those masks.
        starts = tuple(s <= req.first_full for req, (_, _, s) in zip(reqs, cells))
        settled, first = not any(starts), None
        if not settled:   # (G, 1) bool; a handful of patterns recur (one request's first segment moving down)
            first = self._firsts.get(starts)
            if first is None:
                first = self._firsts[starts] = torch.tensor(starts, device=X.device)[:, None]
        Y, self._memory = grouped_cells(grouped, layers, X, rows, self._memory, lo, hi, model.config.segment_size,
                                        read=any(s > 0 for _, _, s in cells), settled=settled, is_first=first)
        finished = {}
        ends = [g for g, (req, (_, _, s)) in enumerate(zip(reqs, cells)) if s == req.seg.num_segments - 1]
        if ends:   # a request's memory at these layers is final; W_mem copied so the step's (G, ...) block
            W_mem, z, first = self._memory.layers(lo, hi)   # can go (z and is_first are small: views)
            for g in ends:
                reqs[g].final[cells[g][0]] = (W_mem[g:g + 1].clone(), z[g:g + 1], first[g:g + 1])
        self._outputs.append((lo, Y))
        if hi == L - 1:   # a segment leaves the ring: final norm + LM head on its text rows
            req, (l, rid, s), g = reqs[-1], cells[-1], len(cells) - 1
            last = s == req.seg.num_segments - 1
            req.rows.pop(s)
            with torch.inference_mode(False) if infer else contextlib.nullcontext():   # ordinary outputs
                if req.outputs.wanted(s):
                    a, e = req.seg.bounds[s]
                    req.outputs.add(s, Y[g, :, :e - a])
                if last:
                    logits, loss = req.outputs.result()
                    W, zz, f = (torch.cat([req.final[k][i] for k in range(L)]) for i in range(3))   # (L, 1, ...)
                    finished[rid] = ARMTOutput(logits, loss, MemoryState(W, zz, f, req.seg.open_ids()))
                    del self._requests[rid]
        return finished

    def run(self, requests: list, attention_masks: list | None = None, labels: list | None = None,
            on_step: RingStepHook | None = None) -> list[ARMTOutput]:
        """Submit every request (with its mask and labels, if given), step until all are done,
        and return their outputs in order."""
        if self.pending:
            raise RuntimeError(f"{self.pending} request(s) submitted earlier are still running, and run() "
                               "would drop their outputs; drive them with step() until runner.pending == 0")
        if not isinstance(requests, (list, tuple)) or len(requests) == 0:
            raise ValueError("run needs a non-empty list of requests (each [1, N] or [N])")
        for name, extra in (("attention_masks", attention_masks), ("labels", labels)):
            if extra is not None and len(extra) != len(requests):
                raise ValueError(f"{name} has {len(extra)} entries for {len(requests)} requests")
        reqs = [self._prepare(ids, None if attention_masks is None else attention_masks[i],
                              None if labels is None else labels[i], "all") for i, ids in enumerate(requests)]
        rids = [self._enqueue(req) for req in reqs]   # queued only once every request passed its checks
        done: dict[int, ARMTOutput] = {}
        while any(r not in done for r in rids):
            done.update(self.step(on_step))
        return [done[r] for r in rids]


    @torch.no_grad()
    def generate(self, requests: list, max_new_tokens: int = 16, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Continue several prompts: each request [1, N_i] or [N_i] -> [1, N_i + max_new_tokens].
        The full segments of every prompt are prefilled together through the ring (one queue,
        ramps paid once); then each request decodes from its own memory state as ARMT.generate
        does (design §5: the open segment through a KV cache, a completed segment committed
        with its write, here by the diagonal executor). Greedy tokens equal model.generate(ids_i)
        for every request. With do_sample, requests draw from `generator` one after another."""
        if self.pending:
            raise RuntimeError(f"{self.pending} request(s) submitted earlier are still running; drive them with "
                               "step() until runner.pending == 0 before generate()")
        if not isinstance(requests, (list, tuple)) or len(requests) == 0:
            raise ValueError("generate needs a non-empty list of prompts (each [1, N] or [N])")
        check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p, generator)
        model, n = self.model, self.model.config.segment_size
        prompts = [validate_ids(self._one_row(ids, f"prompt {i}"), model.base.config.vocab_size, model.device)
                   for i, ids in enumerate(requests)]
        rids = {i: self.submit(ids[:, :ids.shape[1] // n * n], keep_logits="last_segment")
                for i, ids in enumerate(prompts) if ids.shape[1] >= n}          # 1. prefill, one queue
        done: dict[int, ARMTOutput] = {}
        while any(r not in done for r in rids.values()):
            done.update(self.step())
        results = []
        for i, ids in enumerate(prompts):                                        # 2-3. decode each
            state, last = ((done[rids[i]].state, done[rids[i]].logits[:, -1]) if i in rids
                           else (model.empty_state(1), None))
            results.append(_decode(model, self._diag, ids, state, last, max_new_tokens, do_sample, temperature,
                                   top_k, top_p, generator))
        return results
