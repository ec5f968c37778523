"""The diagonal as a pipeline across processes: contiguous blocks of layers on P ranks,
segments flowing from rank to rank, on torch.distributed (gloo on CPU, NCCL on GPUs).

The diagonal schedule is pipeline parallelism in time: at step t layer l works on segment
t - l (Diagonal Batching, arXiv 2506.05229). Give rank r the layers [a_r, b_r) and the same grid becomes a pipeline
in space. A rank keeps its own layers' memories (the horizontal edges never leave it) and
runs its layers diagonally, grouped (grouped.grouped_layer on its block); the vertical edge
between its top layer and the next rank's bottom layer is one hidden-state block
(B, T, d) per segment, sent point to point. Rank 0 embeds, the last rank applies the final
norm and the LM head. Every rank holds the token ids and mask and rebuilds the other
per-segment tables (RoPE positions, attention and write masks) itself, so only hidden
states travel. At the end the ranks' memory blocks and the last rank's logits and loss are
gathered on rank 0 into one ARMTOutput, equal to model(...).

Point to point (isend/irecv), not torch.distributed.pipelining: its stages are stateless
functions of one microbatch, and its schedules split a batch into independent microbatches
(with a backward per microbatch). ARMT's microbatches are segments, which depend on each
other through each stage's memory, and a stage holding k layers works on k segments at
once (its own diagonal). Two sends and two receives per segment and rank express that
directly; every wait has a timeout.

Run it as `pipeline_forward(model, ids, ...)` (spawns the ranks on this machine, 127.0.0.1,
and returns the output), or for real multi-process / multi-GPU runs:
    torchrun --nproc-per-node P -m diaglab.distributed --preset tiny --tokens 4096 --check
Sections: the split · one rank's block · the stage · the helper · cost model · figures ·
entry point.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from . import schedule as sched
from ._checks import OneLineParser, check_int
from .armt import ARMT, ARMTOutput
from .diagonal import DiagonalExecutor, check_no_dropout
from .grouped import grouped_cells, profiler_range, ungroupable
from .memory import MemoryState
from .paths import write_json
from .segments import Segmented, SegmentOutputs, SegmentRows, segment_rows

Span = tuple[int, int]   # a rank's layers [a, b)


# ---- the split ---------------------------------------------------------------------------
def split_layers(L: int, world_size: int, split: Sequence[int] | None = None) -> list[Span]:
    """The ranks' blocks of layers [(a, b), ...]: even by default (the first L % P ranks take
    one layer more), or `split`, the number of layers of each rank (e.g. [3, 5])."""
    check_int("L (layers)", L, 1)
    check_int("world_size", world_size, 1)
    if world_size > L:
        raise ValueError(f"world_size {world_size} > {L} layers: every rank needs at least one layer; "
                         f"use world_size <= {L}")
    q, r = divmod(L, world_size)
    even = [q + (i < r) for i in range(world_size)]
    split = even if split is None else list(split)
    if len(split) != world_size or sum(split) != L or \
            any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in split):
        raise ValueError(f"split {split} must give each of the {world_size} ranks an int >= 1 layers, "
                         f"{L} in all (e.g. {even})")
    bounds = [0]
    for k in split:
        bounds.append(bounds[-1] + k)
    return list(zip(bounds[:-1], bounds[1:]))


# ---- one rank's block of layers -------------------------------------------------------------
_LAYER_NAME = re.compile(r"^(base\.model\.layers|assoc)\.(\d+)\.")


def wanted_by(name: str, span: Span, L: int, tied: bool) -> bool:
    """Whether the rank owning `span` needs the full model's parameter `name`: its layers,
    the memory tokens, the embedding on rank 0, final norm and LM head on the last rank
    (with tied embeddings the LM head is the embedding)."""
    a, b = span
    m = _LAYER_NAME.match(name)
    if m:
        return a <= int(m.group(2)) < b
    if name.startswith("base.model.embed_tokens."):
        return a == 0 or (tied and b == L)
    if name.startswith(("base.model.norm.", "base.lm_head.")):
        return b == L
    return True


def block_model(base_config, armt_config, tensors: Mapping[str, torch.Tensor], span: Span, L: int,
                dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> ARMT:
    """An ARMT of only the layers [a, b) (renumbered 0..b-a-1), loaded from `tensors` (the full
    model's names, those wanted_by(span)). The embedding exists only on rank 0, the final norm
    and LM head only on the last rank; elsewhere they are None, so misuse fails loudly."""
    from transformers import LlamaForCausalLM
    a, b = span
    cfg = copy.deepcopy(base_config)
    cfg.num_hidden_layers = b - a
    with torch.random.fork_rng(devices=[]):   # the skeleton's init is overwritten; keep the caller's RNG
        block = ARMT(LlamaForCausalLM(cfg), armt_config).to(dtype)

    def local(name: str) -> str:
        m = _LAYER_NAME.match(name)
        return name if m is None else f"{m.group(1)}.{int(m.group(2)) - a}.{name[m.end():]}"

    missing, unexpected = block.load_state_dict({local(k): v for k, v in tensors.items()}, strict=False)
    allowed = {"base.lm_head.weight"} if cfg.tie_word_embeddings else set()   # a checkpoint stores it once
    allowed |= {"base.model.embed_tokens.weight"} if a > 0 else set()
    allowed |= {"base.model.norm.weight", "base.lm_head.weight"} if b < L else set()
    if unexpected or set(missing) - allowed:
        raise ValueError(f"the tensors for layers [{a}, {b}) do not fit the model: missing "
                         f"{sorted(set(missing) - allowed)[:5]}, unexpected {sorted(unexpected)[:5]}; "
                         "pass the full model's state_dict names (base.model.layers.<l>..., assoc.<l>...)")
    if a > 0:
        block.base.model.embed_tokens = None
    if b < L:
        block.base.model.norm, block.base.lm_head = None, None
    return block.to(device)


# ---- the stage: one rank's part of the grid -----------------------------------------------
@dataclass
class Link:
    """Point-to-point traffic of one rank, every wait bounded by `timeout` seconds."""
    rank: int
    timeout: float
    pending: list = field(default_factory=list)   # (work, tensor) of sends not yet known complete

    def send(self, t: torch.Tensor, dst: int, tag: int = 0) -> None:
        """Start sending t; it stays referenced until sent (finished sends are dropped here, so
        a rank far ahead of the next one holds only what is still in flight)."""
        self.pending = [(w, x) for w, x in self.pending if not w.is_completed()]
        t = t.contiguous()
        self.pending.append((dist.isend(t, dst, tag=tag), t))

    def recv(self, shape, dtype, device, src: int, tag: int = 0) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype, device=device)
        self.wait(dist.irecv(buf, src, tag=tag), f"receiving from rank {src}")
        return buf

    def flush(self) -> None:
        for work, _ in self.pending:
            self.wait(work, "sending")
        self.pending.clear()

    def wait(self, work, what: str) -> None:
        if not work.wait(timedelta(seconds=self.timeout)):
            raise TimeoutError(f"rank {self.rank}: {what} took longer than {self.timeout} s")


def run_stage(block: ARMT, span: Span, L: int, seg: Segmented, link: Link,
              fail_at: int | None = None) -> tuple[SegmentOutputs | None, MemoryState]:
    """Run this rank's layers [a, b) over every segment, diagonally inside the block: local step
    u holds layer j on segment u - j. A segment enters from the embedding (rank 0) or from the
    previous rank, and leaves to the next rank or to the LM head (last rank).
    Returns (the last rank's SegmentOutputs, else None; the block's MemoryState (b-a, B, ...))."""
    check_no_dropout(block)
    a, b = span
    B, T, d = seg.ids.shape[0], seg.segment_size + block.config.num_mem_tokens, block.hidden_size
    layers, step = DiagonalExecutor(block).layer_stack()
    state = block.empty_state(B)
    has_memory = [False] * (b - a)
    outputs = SegmentOutputs(seg, "all", block.base) if b == L else None
    hidden: dict[int, torch.Tensor] = {}   # segment -> its rows (B, T, d) between two of this block's layers
    tables: dict[int, SegmentRows] = {}    # segment -> positions and masks, while in the block
    for u, cells in enumerate(sched.iter_diagonal(b - a, seg.num_segments)):
        if u == fail_at:
            raise RuntimeError(f"rank {link.rank}: failure injected at local step {u} (fail_at)")
        lo, hi = cells[0][0], cells[-1][0]
        if lo == 0:        # 1. a segment enters the block
            s = cells[0][1]
            if a == 0:
                tables[s] = segment_rows(block, seg, s, pad=True)
            else:
                X = link.recv((B, T, d), block.dtype, block.device, src=link.rank - 1)
                tables[s] = segment_rows(block, seg, s, pad=True, X=X)   # the tables; rows from rank - 1
            hidden[s] = tables[s].X
        X = torch.stack([hidden[s] for _, s in cells])                         # (G, B, T, d)
        with profiler_range(f"pipe_step {a + u} layers {a + lo}-{a + hi}"):
            Y, state = grouped_cells(step, layers, X, [tables[s] for _, s in cells], state, lo, hi,
                                     seg.segment_size, any(has_memory[lo:hi + 1]))
        for g, (j, s) in enumerate(cells):   # 2. outputs move up one layer
            has_memory[j] = True
            hidden[s] = Y[g]
        if hi == b - a - 1:  # 3. the top layer's segment leaves the block
            s = cells[-1][1]
            out = hidden.pop(s)
            del tables[s]
            if outputs is None:
                link.send(out, dst=link.rank + 1)
            elif outputs.wanted(s):
                e0, e1 = seg.bounds[s]
                outputs.add(s, out[:, :e1 - e0])
    link.flush()
    return outputs, state


def gather_output(outputs: SegmentOutputs | None, state: MemoryState, spans: list[Span], seg: Segmented,
                  vocab: int, dtype: torch.dtype, link: Link) -> ARMTOutput | None:
    """Collect on rank 0 every rank's memory block and the last rank's logits and loss;
    returns the ARMTOutput on rank 0, None elsewhere."""
    P, r, last = len(spans), link.rank, len(spans) - 1
    tag = 1   # the gather's messages, apart from the pipeline's (tag 0)
    if r != 0:
        for t in (state.W_mem, state.z, state.is_first.to(torch.uint8)):
            link.send(t, dst=0, tag=tag)
        if outputs is not None:
            logits, loss = outputs.result()
            link.send(logits, dst=0, tag=tag)
            if loss is not None:
                link.send(loss.reshape(1).float(), dst=0, tag=tag)
        link.flush()
        return None
    blocks = [(state.W_mem, state.z, state.is_first)]
    for src in range(1, P):
        k = spans[src][1] - spans[src][0]
        W = link.recv((k, *state.W_mem.shape[1:]), state.W_mem.dtype, state.W_mem.device, src, tag=tag)
        z = link.recv((k, *state.z.shape[1:]), state.z.dtype, state.z.device, src, tag=tag)
        first = link.recv((k, *state.is_first.shape[1:]), torch.uint8, state.z.device, src, tag=tag).bool()
        blocks.append((W, z, first))
    if last == 0:
        logits, loss = outputs.result()
    else:
        logits = link.recv((*seg.ids.shape, vocab), dtype, seg.ids.device, last, tag=tag)           # (B, N, V)
        loss = None if seg.targets is None else link.recv((1,), torch.float32, seg.ids.device, last, tag=tag)[0]
    W_mem, z, first = (torch.cat(ts) for ts in zip(*blocks))
    return ARMTOutput(logits, loss, MemoryState(W_mem, z, first, seg.open_ids()))


def pipeline_rank(block: ARMT, spans: list[Span], input_ids, attention_mask=None, labels=None,
                  timeout: float = 60.0, fail_at: tuple[int, int] | None = None) -> ARMTOutput | None:
    """This rank's whole part of one forward pass (inside an initialised process group):
    the stage, then the gather. Returns the output on rank 0, None elsewhere."""
    rank = dist.get_rank()
    L = spans[-1][1]
    link = Link(rank, timeout)
    with torch.no_grad():
        seg, _ = block.prepare(input_ids, attention_mask, labels)
        outputs, state = run_stage(block, spans[rank], L, seg, link,
                                   fail_at[1] if fail_at is not None and fail_at[0] == rank else None)
        return gather_output(outputs, state, spans, seg, block.base.config.vocab_size, block.dtype, link)


# ---- the helper: spawn the ranks on this machine -------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loopback_interface() -> str | None:
    names = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    return names[0] if names else None


def _launch(job: Path, world_size: int, threads: int) -> list[subprocess.Popen]:
    """Start the ranks as `python -m diaglab.distributed --job DIR`, with the environment
    torchrun would give them, bound to 127.0.0.1."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world_size),
               LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS=str(threads))
    root = str(Path(__file__).resolve().parents[1])   # this diaglab, whatever the caller's working directory
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if _loopback_interface() is not None:
        env["GLOO_SOCKET_IFNAME"] = _loopback_interface()
    procs = []
    for r in range(world_size):
        log = open(job / f"rank{r}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "diaglab.distributed", "--job", str(job)],
                                      env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=log,
                                      stderr=subprocess.STDOUT))
        log.close()
    return procs


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()


def _first_failure(job: Path, procs: list[subprocess.Popen]) -> str:
    """The traceback of the rank that failed first (its error file is the oldest), or the
    tail of a failed rank's log when it died without writing one."""
    errors = sorted(job.glob("error*.txt"), key=lambda p: p.stat().st_mtime)
    if errors:
        return f"rank {errors[0].stem.removeprefix('error')} failed:\n{errors[0].read_text()}"
    r = next(i for i, p in enumerate(procs) if p.returncode not in (0, None))
    tail = (job / f"rank{r}.log").read_text()[-2000:]
    return f"rank {r} exited with code {procs[r].returncode}:\n{tail}"


def _wait(job: Path, procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]
        if any(c not in (0, None) for c in codes):
            _stop(procs)
            raise RuntimeError("pipeline_forward: " + _first_failure(job, procs))
        if all(c == 0 for c in codes):
            return
        if time.monotonic() > deadline:
            _stop(procs)
            logs = "".join(f"\n--- rank {r} ---\n" + (job / f"rank{r}.log").read_text()[-600:]
                           for r in range(len(procs)))
            raise TimeoutError(f"pipeline_forward did not finish within timeout={timeout} s and its {len(procs)} "
                               f"processes were stopped; pass a larger timeout for long inputs (the ranks' "
                               f"logs end with:{logs})")
        time.sleep(0.02)


def pipeline_forward(model: ARMT, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     labels: torch.Tensor | None = None, world_size: int = 2, backend: str = "gloo",
                     split: Sequence[int] | None = None, timeout: float = 120.0, threads: int = 1,
                     fail_at: tuple[int, int] | None = None) -> ARMTOutput:
    """model(input_ids, attention_mask, labels) as a pipeline of `world_size` processes on this
    machine; returns the same ARMTOutput (logits (B, N, V), loss, state) on the caller's side.

    Each rank gets only its block of layers (split_layers(L, world_size, split)), runs with
    `threads` threads, and talks to the others over 127.0.0.1 (backend "gloo"; "nccl" puts rank
    r on cuda:r). `timeout` (s) bounds the whole run — the ranks are killed past it — and every
    wait inside it. fail_at=(rank, step): that rank raises before its local step (to test
    failure handling). A rank that fails stops all ranks; its traceback is in the error.
    Forward only: the outputs carry no autograd graph (train in one process)."""
    return pipeline_map(model, [dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)],
                        world_size, backend, split, timeout, threads, fail_at)[0]


def pipeline_map(model: ARMT, calls: Sequence[Mapping], world_size: int = 2, backend: str = "gloo",
                 split: Sequence[int] | None = None, timeout: float = 120.0, threads: int = 1,
                 fail_at: tuple[int, int] | None = None) -> list[ARMTOutput]:
    """pipeline_forward for several independent calls through one set of ranks, so the start
    (a few seconds: each process imports torch and joins the group) is paid once.
    calls: [dict(input_ids=..., attention_mask=..., labels=...), ...] -> one ARMTOutput each."""
    if not isinstance(model, ARMT):
        raise TypeError(f"pipeline_forward needs a diaglab.ARMT, got {type(model).__name__}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' (CPU) or 'nccl' (one GPU per rank), got {backend!r}")
    spans = split_layers(model.num_layers, world_size, split)
    check_no_dropout(model)
    lost = ungroupable(model) + [f"{name} is parametrized" for name, m in model.named_modules()
                                 if torch.nn.utils.parametrize.is_parametrized(m)]
    if lost:
        raise ValueError(f"pipeline_forward rebuilds each rank's layers from the model's state_dict, which would "
                         f"drop what the model's own modules add: {'; '.join(lost[:3])} ({len(lost)} in all). "
                         "Remove the hooks, merge adapters and parametrizations into the weights "
                         "(torch.nn.utils.parametrize.remove_parametrizations), or run in one process")
    cpu = lambda t: None if t is None else t.detach().cpu()   # noqa: E731
    inputs = []
    for call in calls:
        unknown = set(call) - {"input_ids", "attention_mask", "labels"}
        if unknown:
            raise ValueError(f"a call may hold input_ids, attention_mask and labels, not {sorted(unknown)}")
        ids, mask, labels = call["input_ids"], call.get("attention_mask"), call.get("labels")
        model.prepare(ids, mask, labels)   # input errors here, before any process starts
        inputs.append((cpu(ids), cpu(mask), cpu(labels)))
    L, tied = model.num_layers, model.base.config.tie_word_embeddings
    params = model.state_dict()
    with tempfile.TemporaryDirectory(prefix="diaglab-pipeline-") as tmp:
        job = Path(tmp)
        torch.save({"calls": inputs, "spans": spans, "backend": backend, "timeout": timeout, "threads": threads,
                    "fail_at": fail_at, "training": model.training}, job / "job.pt")
        for r, span in enumerate(spans):
            torch.save({"base_config": model.base.config, "armt_config": model.config, "dtype": model.dtype,
                        "tensors": {k: v.detach().cpu().clone() for k, v in params.items()
                                    if wanted_by(k, span, L, tied)}}, job / f"block{r}.pt")
        procs = _launch(job, world_size, threads)
        try:
            _wait(job, procs, timeout)
        finally:
            _stop(procs)
        outs = [torch.load(job / f"out{i}.pt", weights_only=False) for i in range(len(inputs))]
    dev = model.device
    return [ARMTOutput(o.logits.to(dev), None if o.loss is None else o.loss.to(dev), o.state.to(dev)) for o in outs]


def _rank_device(backend: str) -> torch.device:
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _job_worker(job: Path) -> None:
    """One rank spawned by pipeline_forward: load its block, run, rank 0 writes out.pt. An error
    is written to error<rank>.txt before the process exits with it."""
    import traceback
    rank = int(os.environ["RANK"])
    try:
        spec = torch.load(job / "job.pt", weights_only=False)
        torch.set_num_threads(spec["threads"])
        device = _rank_device(spec["backend"])
        dist.init_process_group(spec["backend"], timeout=timedelta(seconds=spec["timeout"]))
        try:
            part = torch.load(job / f"block{rank}.pt", weights_only=False)
            block = block_model(part["base_config"], part["armt_config"], part["tensors"], spec["spans"][rank],
                                spec["spans"][-1][1], part["dtype"], device).train(spec["training"])
            to = lambda t: None if t is None else t.to(device)   # noqa: E731
            for i, (ids, mask, labels) in enumerate(spec["calls"]):
                out = pipeline_rank(block, spec["spans"], to(ids), to(mask), to(labels), spec["timeout"],
                                    spec["fail_at"])
                if rank == 0:
                    torch.save(ARMTOutput(out.logits.cpu(), None if out.loss is None else out.loss.cpu(),
                                          out.state.to("cpu")), job / f"out{i}.pt")
        finally:
            dist.destroy_process_group()
    except BaseException:
        (job / f"error{rank}.txt").write_text(traceback.format_exc())
        raise


# ---- cost model: what a pipeline of P devices costs, on paper ------------------------------
def rank_group_sizes(L: int, S: int, spans: Sequence[Span]) -> list[list[int]]:
    """(P, L + S - 1): how many of rank r's layers are busy at global step t (layer l holds
    segment t - l), with the ranks in lockstep; 0 = the rank idles (fill and drain)."""
    steps = L + S - 1
    return [[max(0, min(b - 1, t) - max(a, t - S + 1) + 1) for t in range(steps)] for a, b in spans]


def hop_steps(S: int, spans: Sequence[Span]) -> list[int]:
    """(L + S - 1,): segments crossing a rank boundary after each step (segment s leaves rank r's
    top layer b_r - 1 at step b_r - 1 + s)."""
    L = spans[-1][1]
    counts = [0] * (L + S - 1)
    for _, b in spans[:-1]:
        for s in range(S):
            counts[b - 1 + s] += 1
    return counts


@dataclass(frozen=True)
class PipelineCost:
    steps: int                  # global steps, L + S - 1 as on one device
    busy_steps: tuple[int, ...]  # per rank: steps with work, (b - a) + S - 1
    bubble: float               # idle share of the ranks' steps: 1 - sum(busy_steps) / (P * steps)
    hop_bytes: int              # one segment's hidden rows B * T * d * bytes: what crosses a boundary
    max_bytes_per_step: int     # the most bytes crossing boundaries after one step
    total_bytes: int            # (P - 1) * S * hop_bytes


def pipeline_cost(L: int, S: int, world_size: int, B: int, T: int, d: int, bytes_per_value: int = 4,
                  split: Sequence[int] | None = None) -> PipelineCost:
    """Steps, bubble and traffic of the pipeline of L layers on world_size ranks over S segments
    of T rows (n text + M memory) of width d. With an even split of k = L / P layers per rank,
    bubble = (L - k) / (L + S - 1): small when S >> L."""
    sched._check_sizes(L, S)
    for name, value in (("B", B), ("T", T), ("d", d), ("bytes_per_value", bytes_per_value)):
        check_int(name, value, 1)
    spans = split_layers(L, world_size, split)
    busy = tuple(sum(g > 0 for g in row) for row in rank_group_sizes(L, S, spans))
    hop = B * T * d * bytes_per_value
    return PipelineCost(steps=L + S - 1, busy_steps=busy, bubble=1 - sum(busy) / (world_size * (L + S - 1)),
                        hop_bytes=hop, max_bytes_per_step=max(hop_steps(S, spans)) * hop,
                        total_bytes=(world_size - 1) * S * hop)


def expected_latency(step_cost: Callable[[int], float] | Mapping[int, float], L: int, S: int,
                     world_size: int = 1, split: Sequence[int] | None = None, hop_seconds: float = 0.0) -> float:
    """Latency of one forward pass on world_size devices from per-step costs: step_cost(G) (or
    {G: seconds}) is one grouped call of G layers, as measured on one device. In lockstep, step
    t lasts as long as the slowest rank's call, plus hop_seconds when a segment crosses a
    boundary after it (the receiver needs it for the next step). world_size=1: the diagonal
    executor on one device."""
    cost = step_cost.__getitem__ if isinstance(step_cost, Mapping) else step_cost
    sched._check_sizes(L, S)
    spans = split_layers(L, world_size, split)
    sizes = rank_group_sizes(L, S, spans)
    hops = hop_steps(S, spans)
    return sum(max(cost(row[t]) for row in sizes if row[t] > 0) + (hop_seconds if hops[t] else 0.0)
               for t in range(L + S - 1))


def measure_step_costs(model: ARMT, input_ids: torch.Tensor, repeats: int = 3) -> dict[int, float]:
    """{G: median seconds of a diagonal step of G layers}, timed here through DiagonalExecutor's
    on_step hook after one warm-up call. A step's time includes its share of the executor's own
    work (embedding its segment, stacking); step 0, which also carries the call's input checks,
    is left out."""
    ex = DiagonalExecutor(model)
    times: dict[int, list[float]] = {}
    with torch.no_grad():
        ex(input_ids, keep_logits="none")
        for _ in range(repeats):
            last = [0.0]

            def on_step(t, cells):
                now = time.perf_counter()
                if t > 0:
                    times.setdefault(len(cells), []).append(now - last[0])
                last[0] = now
            ex(input_ids, keep_logits="none", on_step=on_step)
    return {g: statistics.median(ts) for g, ts in sorted(times.items())}


# ---- entry point: torchrun (real runs) and the helper's ranks ------------------------------
def _source(args, world_size: int):
    """(base config, ARMT config, dtype, spans, this rank's tensors, the full model or None).
    From a checkpoint each rank reads only its own tensors (safetensors opens the file lazily);
    from a preset each rank builds the whole random model once and keeps its block (the full
    model stays on rank 0 only for --check)."""
    rank = int(os.environ["RANK"])
    if args.checkpoint:
        from safetensors import safe_open
        from .checkpoint import read_base_config, read_meta
        path = Path(args.checkpoint)
        meta, base_cfg = read_meta(path), read_base_config(path)   # the checks from_pretrained makes
        L, dtype = base_cfg.num_hidden_layers, getattr(torch, meta["dtype"])
        spans = split_layers(L, world_size, args.split)
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()
                       if wanted_by(k, spans[rank], L, base_cfg.tie_word_embeddings)}
        full = ARMT.from_pretrained(path) if args.check and rank == 0 else None
        return base_cfg, meta["armt"], dtype, spans, tensors, full
    from .armt import randomize_memory_
    from .presets import from_preset
    dtype = getattr(torch, args.dtype)
    full = randomize_memory_(from_preset(args.preset, seed=args.seed, dtype=dtype), seed=args.seed + 1)
    L = full.num_layers
    spans = split_layers(L, world_size, args.split)
    tensors = {k: v for k, v in full.state_dict().items()
               if wanted_by(k, spans[rank], L, full.base.config.tie_word_embeddings)}
    return full.base.config, full.config, dtype, spans, tensors, (full if args.check and rank == 0 else None)


def _check(out: ARMTOutput, full: ARMT, ids: torch.Tensor, dtype: torch.dtype) -> dict[str, dict[str, float]]:
    """Relative errors ||pipeline - one process|| / ||one process|| of logits, loss, W_mem, z,
    against the diagonal executor (the same grouped kernels: only the grouping differs, so
    this is held to the dtype's tolerance) and against the sequential model (reported: on
    long inputs the executor itself is ~1e-5 from it in fp32, rounding that grows with S)."""
    rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))  # noqa: E731
    with torch.no_grad():
        refs = {"diagonal": DiagonalExecutor(full)(ids, labels=ids), "sequential": full(ids, labels=ids)}
    errors = {name: {"logits": rel(out.logits, ref.logits), "loss": rel(out.loss, ref.loss),
                     "W_mem": rel(out.state.W_mem, ref.state.W_mem), "z": rel(out.state.z, ref.state.z)}
              for name, ref in refs.items()}
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    if max(errors["diagonal"].values()) > tol or not torch.equal(out.state.is_first, refs["diagonal"].state.is_first):
        raise SystemExit(f"--check failed: relative errors {errors} (tolerance {tol} against the diagonal "
                         "executor in one process) or is_first differs")
    return errors


def _torchrun_worker(args) -> None:
    if "RANK" not in os.environ:
        raise SystemExit("python -m diaglab.distributed runs one rank of a pipeline; start it with torchrun: "
                         "torchrun --nproc-per-node 2 -m diaglab.distributed --preset tiny --tokens 1024 --check")
    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    torch.set_num_threads(args.threads)
    device = _rank_device(backend)
    dist.init_process_group(backend, timeout=timedelta(seconds=args.timeout))
    try:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        base_cfg, armt_cfg, dtype, spans, tensors, full = _source(args, world_size)
        block = block_model(base_cfg, armt_cfg, tensors, spans[rank], spans[-1][1], dtype, device).eval()
        del tensors
        ids = torch.randint(0, base_cfg.vocab_size, (args.batch, args.tokens),
                            generator=torch.Generator().manual_seed(args.seed)).to(device)
        times = []
        for _ in range(args.repeats):
            dist.barrier()
            start = time.perf_counter()
            out = pipeline_rank(block, spans, ids, labels=ids, timeout=args.timeout)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        if rank != 0:
            return
        report = {"world_size": world_size, "threads": args.threads, "backend": backend, "spans": spans,
                  "batch": args.batch, "tokens": args.tokens, "segments": -(-args.tokens // armt_cfg.segment_size),
                  "dtype": str(dtype).removeprefix("torch."), "times_s": times, "median_s": statistics.median(times)}
        if full is not None:
            report["relative_errors"] = _check(out, full.to(device).eval(), ids, dtype)
        print(json.dumps(report))
        if args.json:
            write_json(args.json, report)
    finally:
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> None:
    p = OneLineParser(prog="python -m diaglab.distributed",
                                description="One rank of an ARMT pipeline; start P of them with torchrun "
                                            "--nproc-per-node P. Rank 0 prints a JSON report.")
    p.add_argument("--job", help=argparse.SUPPRESS)   # a rank started by pipeline_forward
    p.add_argument("--preset", default="tiny", help="model size (diaglab.PRESETS), random weights, live memory; "
                                                     "each rank builds it once and keeps only its block")
    p.add_argument("--checkpoint", help="a directory written by ARMT.save_pretrained (instead of --preset); "
                                        "each rank reads only its own tensors")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per row (random ids)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", type=lambda s: [int(k) for k in s.split(",")], help="layers per rank, e.g. 3,5")
    p.add_argument("--backend", choices=["gloo", "nccl"], help="default: nccl with GPUs, else gloo")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="for --preset")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--repeats", type=int, default=1, help="forward passes timed (median reported)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds any wait may take")
    p.add_argument("--check", action="store_true", help="rank 0 also runs the model in one process (diagonal "
                                                         "and sequential) and asserts the pipeline's output equals it")
    p.add_argument("--json", help="write rank 0's report here")
    args = p.parse_args(argv)
    if args.job:
        _job_worker(Path(args.job))
    else:
        _torchrun_worker(args)


if __name__ == "__main__":
    main()
