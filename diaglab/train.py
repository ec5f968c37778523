"""Train a small ARMT to recall across segments, and measure that it does.

Training runs forward and backward through the DiagonalExecutor (design §6: gradients
equal the sequential model's), on CPU, with AdamW (warm-up + cosine), gradient clipping,
a curriculum over the number of segments S (start at 2; +1 whenever the accuracy at the
current S over the last 50 batches reaches --promote-at; half the batches at the current
S, half at a shorter one), tqdm progress and a held-out evaluation every --eval-every steps.

Evaluation measures, in one call and for both tasks of diaglab.tasks: accuracy by
distance (segments between the pair and its query) on held-out seeds; the same model
with its memory zeroed (the query segment alone, from an empty memory) — chance level
if the answer really comes from memory; and whether the sequential and the diagonal
order predict the same tokens.

Commands (from the repository root):

    # the shipped checkpoint data/recall/: two stages, ~7 min on one CPU thread. Stage 1 learns
    # associative recall from scratch (segment curriculum 2 -> 9), stage 2 mixes in the needle task
    # (its shape comes from stage 1; replacing the shipped checkpoint needs --force-overwrite)
    python -m diaglab.train --out /tmp/recall_stage1 --threads 1 --task recall --normalize-keys 1 \
        --num-mem-tokens 8 --queries 3 --minutes 10 --eval-every 250 --eval-samples 50
    python -m diaglab.train --out data/recall --force-overwrite --init-from /tmp/recall_stage1 --threads 1 \
        --task mix --start-segments 9 --steps 1000 --lr 3e-4 --warmup 50 --minutes 6 --eval-every 500 \
        --eval-samples 50
    # evaluate a checkpoint: prints the table, writes DIR/eval.json (200 samples per distance)
    python -m diaglab.train --eval data/recall --threads 1

Every TrainConfig field is a flag (--hidden 96, --task recall, --minutes 20, ...);
`python -m diaglab.train --help` lists them with their defaults. Every value and path is
checked before any work: a bad one exits with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import os
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import checkpoint
from ._checks import MAX_COUNT, MAX_SEED, MAX_THREADS, OneLineParser, check_int
from .armt import ARMT
from .config import ARMTConfig
from .paths import write_json
from .diagonal import DiagonalExecutor
from .presets import check_heads, tiny_armt
from .tables import format_table
from .tasks import TaskBatch, TaskVocab, associative_recall, fixed_samples, needle_in_a_haystack, save_samples

EVAL_SEED = 10_000_000   # held-out: training batches use seeds seed * 1_000_003 + step, far below this


def _default_out() -> str:
    """runs/recall-<date>-<time>: outside data/, so a run never replaces the shipped checkpoint."""
    return time.strftime("runs/recall-%Y%m%d-%H%M%S")


@dataclass
class TrainConfig:
    out: str = field(default_factory=_default_out)  # checkpoint directory + train_log.json + eval.json
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    segment_size: int = 16      # n
    num_mem_tokens: int = 4     # M
    d_mem: int = 16
    init_std: float = 0.15      # initializer_range of the LLaMA base (LLaMA uses 0.02; see build_model)
    embed_std: float = 1.0      # token embeddings start at this scale (see build_model)
    memory_std: float = 0.02    # memory tokens start at this scale
    task: str = "needle"        # training batches: 'needle', 'recall' or 'mix' (half each; curriculum on recall)
    init_from: str = ""         # start from this checkpoint directory instead of a fresh model
    max_segments: int = 9       # S at the end of the curriculum: distances 1..8
    pairs: int = 1              # pairs per segment (recall task)
    fillers: int = 16           # distinct filler tokens between pairs (1 = a constant filler)
    queries: int = 1            # queries per recall sample (more than 1 lets later answers exclude earlier ones)
    steps: int = 3000
    minutes: float | None = None  # wall-clock budget; training stops (and saves) when it is spent
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.01
    start_segments: int = 2     # curriculum: S starts here, +1 whenever accuracy at the current S
    promote_at: float = 0.9     # over the last 50 batches reaches promote_at
    eval_every: int = 500
    eval_samples: int = 100     # per distance
    seed: int = 0
    threads: int = 1
    progress: bool = True
    normalize_keys: bool = False  # unit-length DPFP queries and keys (ARMTConfig.normalize_keys)
    force_overwrite: bool = False  # allow `out` to be an existing checkpoint (it is replaced)

    def __post_init__(self):
        """Check every value here, so a bad one fails before any work (and names its flag)."""
        # counts bounded far above any real run: a typo's extra digits fail in one line here, not
        # as a hang or an allocator crash later
        for name in ("layers", "hidden", "heads", "kv_heads", "segment_size", "num_mem_tokens", "d_mem", "pairs",
                     "fillers", "queries", "steps", "batch", "eval_every", "eval_samples"):
            check_int(_name(name), getattr(self, name), 1, MAX_COUNT)
        check_int(_name("threads"), self.threads, 1, MAX_THREADS)
        for name in ("max_segments", "start_segments"):  # the curriculum needs a pair and its query
            check_int(_name(name), getattr(self, name), 2, MAX_COUNT)
        check_int(_name("warmup"), self.warmup, 0, MAX_COUNT)
        check_int(_name("seed"), self.seed, 0, MAX_SEED)
        for name in ("lr", "init_std", "embed_std", "memory_std"):
            _check_float(name, getattr(self, name), positive=True)
        _check_float("weight_decay", self.weight_decay, positive=False)
        if self.minutes is not None:
            _check_float("minutes", self.minutes, positive=True)
        _check_float("promote_at", self.promote_at, positive=True)
        if self.promote_at > 1:
            raise ValueError(f"{_name('promote_at')} is an accuracy in (0, 1], got {self.promote_at}")
        for name in ("progress", "normalize_keys", "force_overwrite"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{_name(name)} must be True or False, got {getattr(self, name)!r}")
        if self.task not in (*TASKS, "mix"):
            raise ValueError(f"{_name('task')} must be one of {(*TASKS, 'mix')}, got {self.task!r}")
        if not isinstance(self.out, str) or not self.out:
            raise ValueError(f"{_name('out')} must name a directory, got {self.out!r}")
        if not isinstance(self.init_from, str):
            raise ValueError(f"{_name('init_from')} must be a directory name or '', got {self.init_from!r}")
        check_model_shape(self.hidden, self.heads, self.kv_heads, self.segment_size, self.num_mem_tokens,
                          self.d_mem, self.normalize_keys, self.layers)

    @classmethod
    def continuing(cls, init_from: str, **fields) -> "TrainConfig":
        """A config that trains on from the checkpoint init_from: the model's shape (SHAPE_FIELDS)
        is read from it; a shape field given here must agree with it."""
        return continued(cls, checkpoint_shape, init_from, fields)


def continued(cls, shape_of, init_from: str, fields: dict):
    """cls (a training config) that trains on from the checkpoint init_from: the shape fields come
    from shape_of(init_from), and a shape field given in fields must agree with it. Both
    training configs' `continuing` are this."""
    shape = shape_of(init_from)
    _check_shape(init_from, {k: v for k, v in fields.items() if k in shape}, shape)
    return cls(**{**fields, **shape, "init_from": init_from})


# the fields that a checkpoint fixes: with init_from they must match it
SHAPE_FIELDS = ("layers", "hidden", "heads", "kv_heads", "segment_size", "num_mem_tokens", "d_mem", "normalize_keys")


def _name(field_name: str) -> str:
    """A field as the library and the CLI call it, e.g. 'segment_size (--segment-size)'."""
    return f"{field_name} (--{field_name.replace('_', '-')})"


def mlp_width(hidden: int) -> int:
    """The MLP width of the models both training commands build (build_model here and in babilong)."""
    return 2 * hidden


def layer_parameters(hidden: int, heads: int, kv_heads: int, d_mem: int) -> int:
    """About the parameters of one layer of the models both training commands build: attention
    (q, o and the grouped k, v), the SwiGLU MLP's three matrices, the memory's W_mq, W_mk, W_mv
    (the norms' and W_mb's few are left out)."""
    return round(hidden * hidden * (2 + 2 * kv_heads / heads) + 3 * hidden * mlp_width(hidden)
                 + hidden * (hidden + 2 * d_mem))


def check_model_shape(hidden: int, heads: int, kv_heads: int, segment_size: int, num_mem_tokens: int, d_mem: int,
                      normalize_keys: bool, layers: int | None = None) -> None:
    """Raise, naming the flags, unless these sizes make a model (presets.check_heads, and an
    ARMTConfig: e.g. d_mem too small for the DPFP order) that this machine can train (with
    layers: its fp32 weights, gradients and AdamW's two moments within the physical memory).
    Both training configs check with it, so a bad size stops a command line before any work."""
    try:
        check_heads(hidden, heads, kv_heads)
    except ValueError as e:
        raise ValueError(f"{e}: change --hidden, --heads or --kv-heads") from None
    try:
        ARMTConfig(segment_size=segment_size, num_mem_tokens=num_mem_tokens, d_mem=d_mem,
                   normalize_keys=normalize_keys)
    except ValueError as e:
        raise ValueError(f"the memory settings make no ARMTConfig: {e}") from None
    if layers is not None:
        per_layer = layer_parameters(hidden, heads, kv_heads, d_mem)
        need = 16 * layers * per_layer                  # 4 bytes each for weights, gradients and two AdamW moments
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
        if have and need > have:
            raise ValueError(f"--layers {layers} --hidden {hidden} make about {layers * per_layer / 1e9:.1f} G "
                             f"parameters, {need / 2**30:.0f} GiB to train, more than this machine's "
                             f"{have / 2**30:.0f} GiB: lower --layers or --hidden")


def _check_float(name: str, value, positive: bool) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise ValueError(f"{_name(name)} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")


def checkpoint_shape(path: str) -> dict:
    """The SHAPE_FIELDS of the checkpoint at path, read from its two config files."""
    armt, base = checkpoint.read_meta(path)["armt"], checkpoint.read_base_config(path)
    return {"layers": base.num_hidden_layers, "hidden": base.hidden_size, "heads": base.num_attention_heads,
            "kv_heads": base.num_key_value_heads, "segment_size": armt.segment_size,
            "num_mem_tokens": armt.num_mem_tokens, "d_mem": armt.d_mem, "normalize_keys": armt.normalize_keys}


def _check_shape(path: str, given: dict, shape: dict) -> None:
    for k, v in given.items():
        if v != shape[k]:
            raise ValueError(f"{_name(k)} is {v!r} but the checkpoint {path} (--init-from) has {shape[k]!r}: "
                             f"the model's shape comes from the checkpoint; give {shape[k]!r} or leave it out")


def read_log(path: str) -> dict:
    """The train_log.json of the checkpoint directory path. Logs written before the configs'
    mem_tokens became num_mem_tokens are read with the new name, in the continued runs' logs too."""
    log_file = Path(path) / "train_log.json"
    if not log_file.is_file():
        raise FileNotFoundError(f"{log_file} not found: {path} is not a checkpoint written by diaglab.train "
                                "(its training log says which task and lengths to evaluate or continue)")
    record = json.loads(log_file.read_text())
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise ValueError(f"{log_file} holds no training config (a JSON object with a 'config' object): "
                         "it is damaged or not a diaglab training log; train again or restore the file")
    stage = record
    while isinstance(stage, dict):   # this run's config and those of the runs it continued
        config = stage.get("config", {})
        if "mem_tokens" in config:
            config["num_mem_tokens"] = config.pop("mem_tokens")
        stage = stage.get("init_from_log")
    return record


def read_init_log(init_from: str) -> dict | None:
    """The train_log.json of the checkpoint a run continues, as written; None without init_from.
    Read it once, before the first save: with out == init_from that save replaces it."""
    if not init_from:
        return None
    with open(os.path.join(init_from, "train_log.json")) as f:
        return json.load(f)


def _check_writable_dir(path: str, flag: str) -> None:
    """Raise unless the directory path exists and is writable, or can be created."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise NotADirectoryError(f"{flag} {path} is a file, not a directory: choose another {flag}")
    existing = p if p.exists() else next(a for a in p.absolute().parents if a.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"{flag} {path} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path}: {existing} is not writable; choose another {flag}")


def check_out(out: str, force_overwrite: bool) -> None:
    """Raise unless the output directory out is writable (or can be made), and is new, empty or
    a checkpoint that force_overwrite allows to replace. Shared by diaglab.train and diaglab.babilong."""
    _check_writable_dir(out, "--out")
    path = checkpoint.check_target(out)   # what the save would refuse, refused before the training
    if (path / "armt_config.json").is_file() and not force_overwrite:
        raise FileExistsError(f"--out {out} already holds a checkpoint; choose another --out, or pass "
                              "--force-overwrite (force_overwrite=True) to replace it")


def preflight(cfg: TrainConfig) -> None:
    """Everything train() can check before it starts: the output directory is writable and
    replaces no checkpoint unless cfg.force_overwrite; init_from is a checkpoint with its log,
    of the shape cfg names; the task's tokens fit the model's vocabulary."""
    check_out(cfg.out, cfg.force_overwrite)
    if cfg.init_from:
        read_log(cfg.init_from)
        shape = checkpoint_shape(cfg.init_from)
        _check_shape(cfg.init_from, {k: getattr(cfg, k) for k in SHAPE_FIELDS}, shape)
        vocab = checkpoint.read_base_config(cfg.init_from).vocab_size
        if task_vocab(cfg).size > vocab:
            raise ValueError(f"the tasks need {task_vocab(cfg).size} tokens (--fillers {cfg.fillers}) but the "
                             f"checkpoint {cfg.init_from} has a vocabulary of {vocab}: lower --fillers")


def answer_logits(logits_last: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
    """Logits of the last segment (B, n, V) -> the logits that predict each answer (B, Q, V)."""
    B, n = batch.input_ids.shape[0], batch.segment_size
    if logits_last.dim() != 3 or tuple(logits_last.shape[:2]) != (B, n):
        raise ValueError(f"answer_logits takes the last segment's logits, (B, n, V) = ({B}, {n}, V), got "
                         f"{tuple(logits_last.shape)}: run the model with keep_logits=\"last_segment\"")
    start = (batch.num_segments - 1) * batch.segment_size
    idx = batch.answer_pos - 1 - start                                      # (B, Q) row inside the segment
    return logits_last.gather(1, idx[..., None].expand(-1, -1, logits_last.shape[-1]))


@torch.no_grad()
def predict(run, batch: TaskBatch, memory: bool = True) -> torch.Tensor:
    """Greedy answers (B, Q) of `run` (an ARMT or a DiagonalExecutor) over the full vocabulary.

    memory=False runs the query segment alone, with an empty (zeroed) memory: what the
    model can answer without anything carried over from earlier segments.
    """
    ids = batch.input_ids
    if not memory:
        n = batch.segment_size
        last = ids[:, -n:]
        out = run(last, keep_logits="last_segment")                        # no state: an empty memory
        shifted = TaskBatch(last, batch.labels[:, -n:], batch.answers, batch.answer_pos - (ids.shape[1] - n),
                            batch.keys, batch.distance, n, batch.task, batch.seed, batch.vocab)
        return answer_logits(out.logits, shifted).argmax(-1)
    out = run(ids, keep_logits="last_segment")
    return answer_logits(out.logits, batch).argmax(-1)


TASKS = ("needle", "recall")


def make_batch(task: str, batch_size: int, num_segments: int, segment_size: int, pairs: int = 1,
               queries: int = 1, distance: int | None = None, seed: int = 0,
               vocab: TaskVocab = TaskVocab()) -> TaskBatch:
    """One batch of the named task: 'needle' (needle_in_a_haystack) or 'recall' (associative_recall)."""
    if task == "needle":
        return needle_in_a_haystack(batch_size, num_segments, segment_size, distance, seed, vocab)
    if task == "recall":
        q = min(queries, pairs if distance is not None else pairs * (num_segments - 1))
        return associative_recall(batch_size, num_segments, segment_size, pairs, q, distance, seed, vocab)
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


@torch.no_grad()
def evaluate(model: ARMT, num_segments: int = 9, samples: int = 100, pairs: int = 1,
             distances: list[int] | None = None, seed: int = EVAL_SEED, tasks: tuple[str, ...] = TASKS,
             vocab: TaskVocab = TaskVocab()) -> dict:
    """Accuracy by distance on held-out seeds for each task: with memory, with memory zeroed
    (the query segment alone), and the diagonal order's agreement with the sequential one.
    Returns a JSON-ready dict; rows hold '<task>' and '<task>_zeroed' accuracies."""
    check_int("num_segments", num_segments, 2)   # a pair and its query: distance 1 at least
    check_int("samples", samples, 1)
    was_training = model.training
    model.eval()
    ex = DiagonalExecutor(model)
    n = model.config.segment_size
    distances = distances or list(range(1, num_segments))
    rows, same, total = [], 0, 0
    for d in distances:
        row = {"distance": d}
        for i, task in enumerate(tasks):
            batch = make_batch(task, samples, num_segments, n, pairs, 1, d, seed + 1000 * i + d, vocab)
            seq, diag = predict(model, batch), predict(ex, batch)
            zero = predict(model, batch, memory=False)
            same += int((seq == diag).sum())
            total += seq.numel()
            row[task] = float((diag == batch.answers).float().mean())
            row[task + "_zeroed"] = float((zero == batch.answers).float().mean())
        rows.append(row)
    model.train(was_training)
    summary = {}
    for task in tasks:
        far = [r[task] for r in rows if r["distance"] >= 4]
        summary[f"{task}_at_distance_ge_4"] = sum(far) / len(far) if far else None
        summary[f"{task}_zeroed_mean"] = sum(r[task + "_zeroed"] for r in rows) / len(rows)
    return {"num_segments": num_segments, "segment_size": n, "pairs_per_segment": pairs,
            "samples_per_distance": samples, "seed": seed, "chance": vocab.chance,
            "vocab": {k: getattr(vocab, k) for k in ("num_fillers", "num_keys", "num_values")},
            "tasks": list(tasks), "by_distance": rows, **summary,
            "diagonal_equals_sequential": same == total, "predictions_compared": total}


def eval_table(result: dict) -> str:
    """An evaluate() result as text: accuracy per distance and task, then a summary line per task."""
    cols = [c for t in result["tasks"] for c in (t, t + "_zeroed")]
    body = [[str(r["distance"])] + [f"{r[c]:.3f}" for c in cols] for r in result["by_distance"]]
    notes = []
    for t in result["tasks"]:
        far = result[t + "_at_distance_ge_4"]
        notes.append(f"{t}: accuracy at distance >= 4 {'n/a' if far is None else f'{far:.3f}'}, "
                     f"memory zeroed {result[t + '_zeroed_mean']:.3f} (chance {result['chance']:.3f})")
    notes.append(f"diagonal == sequential on {result['predictions_compared']} predictions: "
                 f"{result['diagonal_equals_sequential']}")
    return format_table(["distance", *cols], body, notes)


def task_vocab(cfg: TrainConfig) -> TaskVocab:
    return TaskVocab(num_fillers=cfg.fillers)


def build_model(cfg: TrainConfig) -> ARMT:
    """A fresh ARMT for the task: token embeddings at std embed_std (1), memory tokens at
    memory_std (0.02), the LLaMA weights at init_std (0.15).

    Why: with LLaMA's 0.02 everywhere the hidden states are ~0.02, the memory features
    phi(h W_mq^T) ~1e-4, and q . z sits below the 1e-5 stabiliser: every read is a vanishing,
    eps-dominated average. A pretrained model has O(1) hidden states; O(1) embeddings give
    the tiny model that regime. init_std 0.15 makes attention and MLP outputs comparable to
    those embeddings, so information reaches the memory rows from the first steps (the
    shipped run used it; its effect was not isolated). lr 2e-3 with it overflowed a read
    once (NaN loss at S = 6); 1e-3 did not, and non-finite batches are skipped anyway.
    """
    vocab = 8 * math.ceil(task_vocab(cfg).size / 8)
    model = tiny_armt(layers=cfg.layers, hidden=cfg.hidden, heads=cfg.heads, kv_heads=cfg.kv_heads, vocab=vocab,
                     segment_size=cfg.segment_size, num_mem_tokens=cfg.num_mem_tokens, d_mem=cfg.d_mem,
                     seed=cfg.seed, intermediate=mlp_width(cfg.hidden),
                     initializer_range=cfg.init_std, normalize_keys=cfg.normalize_keys)
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        for p, std in ((model.base.get_input_embeddings().weight, cfg.embed_std), (model.memory, cfg.memory_std)):
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def lr_factor(step: int, cfg) -> float:
    """Linear warm-up over cfg.warmup steps, then cosine decay to 10 % over cfg.steps."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    frac = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))


class Curriculum:
    """Segments per training sample: starts at `start` and moves up by one (to `maximum` at
    most) once the answer accuracy of the last `window` batches at the current length
    reaches `promote_at`."""

    def __init__(self, start: int, maximum: int, promote_at: float, window: int = 50):
        check_int("window", window, 1)
        self.current, self.maximum, self.promote_at = start, maximum, promote_at
        self.recent: deque[float] = deque(maxlen=window)

    def sample(self, rng: torch.Generator, low: int) -> int:
        """Segments of the next batch: the current length half the time, else uniform in
        [low, current] — practice at the frontier without forgetting the shorter lengths."""
        if bool(torch.rand((), generator=rng) < 0.5):
            return self.current
        return int(torch.randint(low, self.current + 1, (), generator=rng))

    def record(self, accuracy: float) -> None:
        """The answer accuracy of one batch at the current length."""
        self.recent.append(accuracy)
        full = len(self.recent) == self.recent.maxlen
        if self.current < self.maximum and full and sum(self.recent) / len(self.recent) >= self.promote_at:
            self.current += 1
            self.recent.clear()


def optimiser(model, cfg) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (cfg.lr, cfg.weight_decay) with lr_factor's warm-up and cosine schedule."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))


def guarded_step(loss: torch.Tensor, model, opt, sched) -> bool:
    """Backward, clip the gradient norm to 1 and step — unless the loss or the norm is not
    finite (a rare overflow in a read, q . z ~ eps): then the batch is dropped and the weights
    kept. The learning-rate schedule advances either way. Returns whether the weights moved."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    moved = bool(torch.isfinite(loss) and torch.isfinite(gnorm))
    if moved:
        opt.step()
    sched.step()
    return moved


@contextmanager
def _threads(n: int):
    """torch's global thread count set to n inside the block, restored after (errors included)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(cfg: TrainConfig) -> tuple[ARMT, list[dict]]:
    """Train, evaluate every cfg.eval_every steps, save to cfg.out; returns (model, log).
    Checks the paths first (preflight); the caller's torch thread count is restored."""
    preflight(cfg)
    with _threads(cfg.threads):
        return _train(cfg)


def _train(cfg: TrainConfig) -> tuple[ARMT, list[dict]]:
    from tqdm.auto import tqdm
    init_from_log = read_init_log(cfg.init_from)   # read once: with out == init_from the first save replaces it
    model = ARMT.from_pretrained(cfg.init_from) if cfg.init_from else build_model(cfg)
    model.train()
    ex = DiagonalExecutor(model)
    vocab = task_vocab(cfg)
    opt, sched = optimiser(model, cfg)
    rng = torch.Generator().manual_seed(cfg.seed)
    curriculum = Curriculum(min(cfg.start_segments, cfg.max_segments), cfg.max_segments, cfg.promote_at)
    log: list[dict] = []
    skipped = 0
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), disable=not cfg.progress, mininterval=2.0)
    for step in bar:
        # 1. curriculum: half the batches at the current (hardest) S, half at a shorter one
        current, S = curriculum.current, curriculum.sample(rng, low=2)
        task = cfg.task if cfg.task != "mix" else TASKS[step % 2]
        batch = make_batch(task, cfg.batch, S, cfg.segment_size, cfg.pairs, cfg.queries,
                           seed=cfg.seed * 1_000_003 + step, vocab=vocab)
        # 2. forward and backward through the diagonal executor
        out = ex(batch.input_ids, labels=batch.labels, keep_logits="last_segment")
        if not guarded_step(out.loss, model, opt, sched):
            skipped += 1
            continue
        acc = float((answer_logits(out.logits.detach(), batch).argmax(-1) == batch.answers).float().mean())
        if S == current and (cfg.task != "mix" or task == "recall"):   # mix: the harder task sets the pace
            curriculum.record(acc)
        current = curriculum.current
        bar.set_postfix(loss=f"{out.loss.item():.3f}", acc=f"{acc:.2f}", S=current, refresh=False)
        elapsed = time.perf_counter() - t0
        out_of_time = cfg.minutes is not None and elapsed > 60 * cfg.minutes
        last = step == cfg.steps - 1 or out_of_time
        if (step + 1) % cfg.eval_every == 0 or last:
            # 3. held-out evaluation at the full length; checkpoint after each
            res = evaluate(model, cfg.max_segments, cfg.eval_samples, cfg.pairs, tasks=TASKS, vocab=vocab)
            entry = {"step": step + 1, "seconds": round(elapsed, 1), "curriculum_segments": current,
                     "loss": round(out.loss.item(), 4), "skipped_batches": skipped,
                     **{f"{t}_by_distance": {r["distance"]: r[t] for r in res["by_distance"]} for t in TASKS}}
            log.append(entry)
            bar.write(f"step {step + 1} {elapsed / 60:.1f} min S={current} loss {out.loss.item():.3f} | "
                      + " | ".join(t + " " + " ".join(f"{d}:{a:.2f}" for d, a in entry[f"{t}_by_distance"].items())
                                   for t in TASKS))
            save(model, cfg, log, init_from_log)
        if out_of_time:
            break
    bar.close()
    model.eval()
    return model, log


def save(model: ARMT, cfg: TrainConfig, log: list[dict], init_from_log: dict | None = None) -> None:
    """save_pretrained + train_log.json + samples.json in cfg.out. The log holds this run's
    config and curve, the model's own ARMTConfig and, with --init-from, the log of the run
    it started from (init_from_log, read from cfg.init_from if not given), so a staged
    training keeps its whole history. Weights and both JSON files are replaced together
    (checkpoint.save's staging directory); an eval.json of the replaced weights is dropped."""
    samples = fixed_samples(cfg.max_segments, cfg.segment_size, cfg.pairs, task_vocab(cfg))
    checkpoint.save(model, cfg.out, drop=("eval.json",), extra={
        "samples.json": lambda path: save_samples(samples, str(path)),
        "train_log.json": lambda path: write_json(str(path), log_record(model, cfg, log, init_from_log))})


def log_record(model: ARMT, cfg, log: list[dict], init_from_log: dict | None = None) -> dict:
    """What train_log.json holds: cfg (a config dataclass), the model's ARMTConfig, the curve
    and, with cfg.init_from, init_from_log (read from cfg.init_from if not given). Shared by
    diaglab.train and diaglab.babilong."""
    record = {"config": asdict(cfg), "armt": model.config.to_dict(), "log": log}
    if cfg.init_from:
        record["init_from_log"] = init_from_log if init_from_log is not None else read_init_log(cfg.init_from)
    return record


def check_eval_dir(path: str, samples: int = 200, write: bool = True, made_by: str = "diaglab.train",
                   example: str = "data/recall") -> None:
    """Raise unless path holds a checkpoint with its train_log.json (and, with write, can take
    eval.json); made_by and example name the command that writes such checkpoints and one of them."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"--eval {path}: no such directory; give a checkpoint directory written by "
                                f"{made_by}, e.g. {example}")
    check_int("samples (--samples)", samples, 1, MAX_COUNT)
    checkpoint.read_meta(path)
    read_log(path)
    if write and not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"--eval {path} is not writable, so eval.json cannot be written: pass --no-write")


def run_eval(path: str, samples: int = 200, write: bool = True) -> dict:
    """Load the checkpoint at path, evaluate at the training length, optionally write path/eval.json."""
    check_eval_dir(path, samples, write)
    model = ARMT.from_pretrained(path)
    tcfg = read_log(path)["config"]
    t0 = time.perf_counter()
    res = evaluate(model, tcfg["max_segments"], samples, tcfg["pairs"], vocab=TaskVocab(num_fillers=tcfg["fillers"]))
    res["trained_on"] = tcfg["task"]
    res["eval_seconds"] = round(time.perf_counter() - t0, 1)
    if write:
        write_json(os.path.join(path, "eval.json"), res)
    return res


def _flag_bool(text: str) -> bool:
    """'1'/'true'/'yes' or '0'/'false'/'no' (argparse's type=bool would make any text True)."""
    value = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected 1/0, true/false or yes/no, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m diaglab.train", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval", metavar="DIR", help="evaluate the checkpoint in DIR instead of training")
    p.add_argument("--no-write", action="store_true", default=argparse.SUPPRESS,
                   help="with --eval: print only, do not write DIR/eval.json")
    p.add_argument("--samples", type=int, default=argparse.SUPPRESS,
                   help="with --eval: held-out samples per distance, default 200")
    p.add_argument("--minutes", type=float, dest="minutes", default=argparse.SUPPRESS,
                   help="stop training after this many minutes")
    add_config_flags(p, TrainConfig, SHAPE_FIELDS, "data/recall", "runs/recall-<date>-<time>",
                     "start from this checkpoint (its shape and its history) instead of a fresh model")
    return p


def add_config_flags(p: argparse.ArgumentParser, config_cls, shape_fields, shipped: str, out_default: str,
                     init_help: str) -> None:
    """One flag per field of a training config dataclass (train's TrainConfig, babilong's
    StoryTrainConfig), absent unless given (SUPPRESS), so --init-from can tell a shape flag the
    user set from one it should take from the checkpoint. Fields that already have a flag are
    skipped; num_mem_tokens also answers to the old --mem-tokens."""
    taken = {a.dest for a in p._actions}
    for f in config_cls.__dataclass_fields__.values():
        if f.name in taken:
            continue
        flag, common = "--" + f.name.replace("_", "-"), dict(dest=f.name, default=argparse.SUPPRESS)
        if f.name == "progress":
            p.add_argument("--no-progress", action="store_false", help="hide the tqdm bar", **common)
        elif f.name == "force_overwrite":
            p.add_argument(flag, action="store_true", help=f"allow --out to be an existing checkpoint "
                           f"(e.g. {shipped}), which is replaced", **common)
        elif f.name == "out":
            p.add_argument(flag, help=f"checkpoint directory, default {out_default}", **common)
        elif f.name == "init_from":
            p.add_argument(flag, metavar="DIR", help=init_help, **common)
        elif isinstance(f.default, bool):
            p.add_argument(flag, type=_flag_bool, help=f"default {f.default} (1/0, true/false)", **common)
        else:
            flags = (flag, "--mem-tokens") if f.name == "num_mem_tokens" else (flag,)
            extra = " (with --init-from: the checkpoint's)" if f.name in shape_fields else ""
            p.add_argument(*flags, type=type(f.default), help=f"default {f.default}{extra}", **common)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; TrainConfig flags that were not given are absent from the result."""
    return build_parser().parse_args(argv)


def config_from_args(args: argparse.Namespace, cls=TrainConfig):
    """The config (TrainConfig, or babilong's StoryTrainConfig) of a command line: defaults, or with
    --init-from the checkpoint's shape."""
    given = {k: v for k, v in vars(args).items() if k in cls.__dataclass_fields__}
    return cls.continuing(**given) if given.get("init_from") else cls(**given)


def check_eval_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, config_cls,
                     eval_flags: tuple[str, ...]) -> None:
    """Both training commands: --eval names a directory, and a flag that would be ignored is refused
    (the user meant it to do something): with --eval every training flag but --threads, without it
    the eval_flags (whose defaults are argparse.SUPPRESS, so a given one is an attribute)."""
    if args.eval == "":
        parser.error("--eval needs a checkpoint directory, got an empty string")
    evaluating = args.eval is not None
    ignored = ([k for k in vars(args) if k in config_cls.__dataclass_fields__ and k != "threads"] if evaluating
               else [k for k in eval_flags if hasattr(args, k)])
    if ignored:
        takes = ", ".join("--" + f.replace("_", "-") for f in eval_flags)
        parser.error(f"--{ignored[0].replace('_', '-')} does nothing {'with' if evaluating else 'without'} --eval "
                     f"(--eval takes {takes} and --threads): drop it")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_eval_flags(parser, args, TrainConfig, ("samples", "no_write"))
    threads = getattr(args, "threads", TrainConfig.threads)
    samples, write = getattr(args, "samples", 200), not getattr(args, "no_write", False)
    try:  # every check before any work; a failure is one line and exit status 2
        check_int("threads (--threads)", threads, 1, MAX_THREADS)
        if args.eval is not None:
            check_eval_dir(args.eval, samples, write)
        else:
            cfg = config_from_args(args)
            preflight(cfg)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    if args.eval is not None:
        with _threads(threads):
            res = run_eval(args.eval, samples=samples, write=write)
        print(eval_table(res))
        return
    t0 = time.perf_counter()
    model, _ = train(cfg)
    print(f"trained in {(time.perf_counter() - t0) / 60:.1f} min; saved in {cfg.out}; evaluating")
    with _threads(cfg.threads):
        res = run_eval(cfg.out)
    print(eval_table(res))


if __name__ == "__main__":
    main()
