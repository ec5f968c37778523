"""Train and measure a tiny ARMT on BABILong-style QA1 stories (diaglab.stories), in the
layout of the BABILong tables: accuracy by context length, far past the training length.

Training runs forward and backward through the DiagonalExecutor on CPU, with a curriculum
over the number of segments S (start at --start-segments; +1 whenever the accuracy at the
current S over the last 50 batches reaches --promote-at; half the batches at the current S,
half at a shorter one). The number of facts stays fixed while S grows, as in BABILong, where
a longer context means more distractor text around the same story.

Evaluation, on held-out seeds, at S = the training length times 1, 2, 4, 8, 16, 32:
accuracy with memory; with memory zeroed (the question segment alone: chance = 1/6);
whether the diagonal order predicts exactly what the sequential order does; and the CPU
(and wall) time of each order over the whole evaluation, one story per call by default.

Commands (from the repository root):

    # the shipped checkpoint data/babilong/: two stages on one CPU thread, 24 + 5.5 minutes.
    # Stage 1 runs the curriculum 2 -> 8 segments from scratch; stage 2 trains at 8 segments
    # (its shape comes from stage 1; replacing the shipped checkpoint needs --force-overwrite)
    python -m diaglab.babilong --out /tmp/babilong_stage1 --threads 1 --minutes 24 \
        --eval-every 250 --eval-samples 64 --no-progress
    python -m diaglab.babilong --out data/babilong --force-overwrite --init-from /tmp/babilong_stage1 \
        --start-segments 8 --lr 1e-3 --warmup 50 --steps 2000 --threads 1 --minutes 5.5 --eval-every 250 \
        --eval-samples 64 --no-progress
    # re-measure it: prints the table, writes data/babilong/eval.json (100 stories per length)
    python -m diaglab.babilong --eval data/babilong --threads 1

Training writes to runs/babilong-<date>-<time> unless given --out, and refuses to replace an
existing checkpoint without --force-overwrite. With --init-from, the shape flags (--layers,
--hidden, --heads, --kv-heads, --sentences, --num-mem-tokens, --d-mem) come from that checkpoint.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch

from . import checkpoint
from ._checks import MAX_COUNT, MAX_SEED, MAX_THREADS, OneLineParser, check_int
from .armt import ARMT
from .diagonal import DiagonalExecutor
from .paths import write_json
from .presets import tiny_armt
from .stories import SENTENCE, VOCAB, StoryBatch, qa1_single_fact
from .train import (EVAL_SEED, Curriculum, _check_float, _check_shape, _threads,
                    add_config_flags, answer_logits, check_eval_dir, check_eval_flags, check_model_shape, check_out,
                    continued, guarded_step, log_record, mlp_width, optimiser, predict, read_init_log, read_log)
from .train import checkpoint_shape as _model_shape
from .train import config_from_args as train_config_from_args

LENGTH_FACTORS = (1, 2, 4, 8, 16, 32)
# the fields that a checkpoint fixes: with init_from they must match it
SHAPE_FIELDS = ("layers", "hidden", "heads", "kv_heads", "sentences", "num_mem_tokens", "d_mem")


def _default_out() -> str:
    """runs/babilong-<date>-<time>: outside data/, so a run never replaces the shipped checkpoint."""
    return time.strftime("runs/babilong-%Y%m%d-%H%M%S")


@dataclass(frozen=True)
class StoryTrainConfig:
    out: str = field(default_factory=_default_out)  # checkpoint directory: weights + train_log.json (+ eval.json)
    init_from: str = ""         # continue from this checkpoint, of the same shape (see continuing)
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    sentences: int = 2          # sentence slots per segment: n = 6 * sentences tokens
    num_mem_tokens: int = 8     # M
    d_mem: int = 16
    facts: int = 4              # moves per story, whatever its length
    people: int = 2             # people in a story (drawn from 8 names)
    questions: int = 2          # questions per training story (evaluation asks one)
    max_segments: int = 8       # the training length, in segments
    start_segments: int = 2     # curriculum start
    promote_at: float = 0.9     # curriculum: next S when the last 50 batches at S average this
    steps: int = 20000
    minutes: float = 0.0        # wall-clock budget; 0 = none. Training stops (and saves) when spent
    batch: int = 32
    lr: float = 2e-3
    warmup: int = 200
    weight_decay: float = 0.01
    eval_every: int = 500
    eval_samples: int = 100     # held-out stories per length in the periodic evaluation
    seed: int = 0
    threads: int = 1
    progress: bool = True
    force_overwrite: bool = False  # allow `out` to be an existing checkpoint (it is replaced)

    def __post_init__(self):
        # counts bounded far above any real run: a typo's extra digits fail in one line here, not
        # as a hang or an allocator crash later
        for name in ("layers", "hidden", "heads", "kv_heads", "num_mem_tokens", "d_mem", "facts", "people", "questions",
                     "steps", "batch", "warmup", "eval_every", "eval_samples", "sentences"):
            check_int(name, getattr(self, name), 1, MAX_COUNT)
        check_int("threads", self.threads, 1, MAX_THREADS)
        check_int("start_segments", self.start_segments, 2, MAX_COUNT)
        check_int("max_segments", self.max_segments, self.start_segments, MAX_COUNT)
        check_int("seed", self.seed, 0, MAX_SEED)
        check_int("questions", self.questions, 1, self.sentences)
        if self.facts > self.max_segments - 1:
            raise ValueError(f"facts ({self.facts}) must be at most max_segments - 1 = {self.max_segments - 1} "
                             f"(one fact per segment, none in the question's): raise --max-segments or lower --facts")
        for name in ("lr", "promote_at"):
            _check_float(name, getattr(self, name), positive=True)
        for name in ("minutes", "weight_decay"):
            _check_float(name, getattr(self, name), positive=False)
        if self.promote_at > 1:
            raise ValueError(f"promote_at (--promote-at) is an accuracy in (0, 1], got {self.promote_at}")
        check_model_shape(self.hidden, self.heads, self.kv_heads, self.segment_size, self.num_mem_tokens, self.d_mem,
                          normalize_keys=True, layers=self.layers)   # as build_model makes it
        if not isinstance(self.out, str) or not self.out:
            raise ValueError(f"out must name a directory, got {self.out!r}")
        if not isinstance(self.init_from, str):
            raise ValueError(f"init_from must be a directory name or '', got {self.init_from!r}")
        for name in ("progress", "force_overwrite"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @classmethod
    def continuing(cls, init_from: str, **fields) -> "StoryTrainConfig":
        """A config that trains on from the checkpoint init_from: the model's shape (SHAPE_FIELDS)
        is read from it, so the log records the model actually trained; a shape field given here
        must agree with it."""
        return continued(cls, checkpoint_shape, init_from, fields)

    @property
    def segment_size(self) -> int:
        return SENTENCE * self.sentences


def build_model(cfg: StoryTrainConfig) -> ARMT:
    """A fresh ARMT for stories, initialised as train.build_model explains (O(1) embeddings,
    LLaMA weights at std 0.15, memory tokens at 0.02) with unit-length DPFP keys."""
    model = tiny_armt(layers=cfg.layers, hidden=cfg.hidden, heads=cfg.heads, kv_heads=cfg.kv_heads,
                      vocab=8 * math.ceil(VOCAB.size / 8), segment_size=cfg.segment_size,
                      num_mem_tokens=cfg.num_mem_tokens, d_mem=cfg.d_mem, seed=cfg.seed, intermediate=mlp_width(cfg.hidden),
                      initializer_range=0.15, normalize_keys=True)
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        for p, std in ((model.base.get_input_embeddings().weight, 1.0), (model.memory, 0.02)):
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def checkpoint_shape(path: str) -> dict:
    """The SHAPE_FIELDS of the story checkpoint at path, read from its config files."""
    checkpoint_config(path)
    shape = _model_shape(path)
    vocab = checkpoint.read_base_config(path).vocab_size
    if shape["segment_size"] % SENTENCE or vocab < VOCAB.size:
        raise ValueError(f"{path} (segments of {shape['segment_size']} tokens, a vocabulary of {vocab}) is no story "
                         f"checkpoint: the stories need whole sentences of {SENTENCE} tokens and {VOCAB.size} "
                         f"words; pass one written by python -m diaglab.babilong")
    return {**{k: shape[k] for k in SHAPE_FIELDS if k in shape}, "sentences": shape["segment_size"] // SENTENCE}


def preflight(cfg: StoryTrainConfig) -> None:
    """Everything train() can check before it starts: the output directory is writable and
    replaces no checkpoint unless cfg.force_overwrite (train.check_out); init_from is a story
    checkpoint with its log, of the shape cfg names."""
    check_out(cfg.out, cfg.force_overwrite)
    if cfg.init_from:
        _check_shape(cfg.init_from, {k: getattr(cfg, k) for k in SHAPE_FIELDS}, checkpoint_shape(cfg.init_from))


def _config_dict(cfg: dict | StoryTrainConfig) -> dict:
    """A training config as a dict: a StoryTrainConfig, or the "config" of a train_log.json."""
    if isinstance(cfg, StoryTrainConfig):
        return asdict(cfg)
    if not isinstance(cfg, dict):
        raise TypeError(f"cfg must be a StoryTrainConfig or a dict (the \"config\" of a train_log.json, see "
                        f"checkpoint_config), got {type(cfg).__name__}")
    return cfg


def stories(cfg: dict | StoryTrainConfig, batch_size: int, num_segments: int, seed: int,
            questions: int = 1) -> StoryBatch:
    """QA1 stories with a training configuration's story shape (a dict: from train_log.json).
    A story shorter than facts + 1 segments gets one fact per segment before the question."""
    c = _config_dict(cfg)
    return qa1_single_fact(batch_size, num_segments, c["sentences"], min(c["facts"], num_segments - 1),
                           c["people"], questions, seed)


@torch.no_grad()
def accuracy(model: ARMT, cfg: dict | StoryTrainConfig, num_segments: int, samples: int, seed: int) -> float:
    """Held-out accuracy at one length, through the diagonal executor."""
    batch = stories(cfg, samples, num_segments, seed)
    return float((predict(DiagonalExecutor(model), batch) == batch.answers).float().mean())


def train(cfg: StoryTrainConfig) -> tuple[ARMT, list[dict]]:
    """Train with the curriculum, evaluate at the training length every cfg.eval_every steps,
    save to cfg.out after each evaluation; returns (model, log). Checks the paths first
    (preflight); the caller's torch thread count is restored."""
    preflight(cfg)
    init_from_log = read_init_log(cfg.init_from)   # read once: with out == init_from the first save replaces it
    with _threads(cfg.threads):
        return _train(cfg, init_from_log)


def _train(cfg: StoryTrainConfig, init_from_log: dict | None) -> tuple[ARMT, list[dict]]:
    from tqdm.auto import tqdm
    model = (ARMT.from_pretrained(cfg.init_from) if cfg.init_from else build_model(cfg)).train()
    ex = DiagonalExecutor(model)
    opt, sched = optimiser(model, cfg)
    rng = torch.Generator().manual_seed(cfg.seed)
    curriculum = Curriculum(cfg.start_segments, cfg.max_segments, cfg.promote_at)
    log: list[dict] = []
    skipped = 0
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), disable=not cfg.progress, mininterval=2.0)
    for step in bar:
        # 1. curriculum: half the batches at the current (longest) S, half at a shorter one
        current, S = curriculum.current, curriculum.sample(rng, low=cfg.start_segments)
        batch = stories(cfg, cfg.batch, S, cfg.seed * 1_000_003 + step, cfg.questions)
        # 2. forward and backward through the diagonal executor
        out = ex(batch.input_ids, labels=batch.labels, keep_logits="last_segment")
        if not guarded_step(out.loss, model, opt, sched):
            skipped += 1
            continue
        acc = float((answer_logits(out.logits.detach(), batch).argmax(-1) == batch.answers).float().mean())
        if S == current:
            curriculum.record(acc)
        current = curriculum.current
        bar.set_postfix(loss=f"{out.loss.item():.3f}", acc=f"{acc:.2f}", S=current, refresh=False)
        elapsed = time.perf_counter() - t0
        out_of_time = cfg.minutes > 0 and elapsed > 60 * cfg.minutes
        if (step + 1) % cfg.eval_every == 0 or step == cfg.steps - 1 or out_of_time:
            # 3. held-out accuracy at the training length and at twice it; checkpoint after each
            model.eval()
            entry = {"step": step + 1, "seconds": round(elapsed, 1), "curriculum_segments": current,
                     "loss": round(out.loss.item(), 4), "skipped_batches": skipped,
                     "accuracy": {S_: round(accuracy(model, cfg, S_, cfg.eval_samples, EVAL_SEED + S_), 3)
                                  for S_ in (cfg.max_segments, 2 * cfg.max_segments)}}
            model.train()
            log.append(entry)
            bar.write(f"step {step + 1} {elapsed / 60:.1f} min S={current} loss {out.loss.item():.3f} | accuracy "
                      + " ".join(f"S={s}: {a:.2f}" for s, a in entry["accuracy"].items()))
            save(model, cfg, log, init_from_log)
        if out_of_time:
            break
    bar.close()
    return model.eval(), log


def save(model: ARMT, cfg: StoryTrainConfig, log: list[dict], init_from_log: dict | None = None) -> None:
    """The weights and train_log.json (train.log_record: this run's config, the model's ARMTConfig,
    the curve; with init_from, init_from_log, read from cfg.init_from if not given, so a staged
    training keeps its history), replaced together; an eval.json of the old weights is dropped."""
    checkpoint.save(model, cfg.out, drop=("eval.json",), extra={
        "train_log.json": lambda path: write_json(str(path), log_record(model, cfg, log, init_from_log))})


def _timed(fn):
    """(fn(), wall seconds, CPU seconds of this process). On a shared machine the CPU time is
    the fair comparison: wall time also counts the time other processes held the cores."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


@torch.no_grad()
def evaluate(model: ARMT, cfg: dict | StoryTrainConfig, factors=LENGTH_FACTORS, samples: int = 100,
             seed: int = EVAL_SEED, batch_size: int = 1) -> dict:
    """Accuracy by context length (the training length times each factor) on held-out stories:
    memory on (sequential and diagonal, which must agree), memory zeroed, and each order's time.

    cfg: the training config (a StoryTrainConfig, or a dict as in train_log.json). batch_size: stories
    per call in the timed runs. 1 is the paper's latency setting; on one CPU thread a batch of 16
    or more already keeps the core busy, the grouped calls save nothing and the sequential order
    is as fast or faster (the README's BABILong-style section has the numbers). Returns a
    JSON-ready dict; the model is left in the train/eval mode it came in."""
    cfg = _config_dict(cfg)
    if not isinstance(factors, (tuple, list)) or not factors:
        raise ValueError(f"factors must be a non-empty tuple of length factors, e.g. (1, 2, 4), got {factors!r}")
    for i, f in enumerate(factors):
        check_int(f"factors[{i}]", f, 1)
    check_int("samples", samples, 1)
    check_int("batch_size", batch_size, 1)
    was_training = model.training
    model.eval()
    try:
        return _evaluate(model, cfg, factors, samples, seed, batch_size)
    finally:
        model.train(was_training)


def _evaluate(model: ARMT, cfg: dict, factors, samples: int, seed: int, batch_size: int) -> dict:
    ex = DiagonalExecutor(model)
    n, S0 = model.config.segment_size, cfg["max_segments"]
    predict(model, stories(cfg, 2, 2, seed))     # warm-up: first calls allocate, keep them out of the timing
    predict(ex, stories(cfg, 2, 2, seed))
    rows = []
    for f in factors:
        S = f * S0
        batch = stories(cfg, samples, S, seed + S)
        seq, wall_seq, cpu_seq = _timed(lambda: _predict_in_chunks(model, batch, batch_size))
        diag, wall_diag, cpu_diag = _timed(lambda: _predict_in_chunks(ex, batch, batch_size))
        zero = predict(model, batch, memory=False)
        rows.append({"factor": f, "segments": S, "tokens": S * n,
                     "accuracy": float((diag == batch.answers).float().mean()),
                     "accuracy_sequential": float((seq == batch.answers).float().mean()),
                     "accuracy_zeroed": float((zero == batch.answers).float().mean()),
                     "diagonal_equals_sequential": bool(torch.equal(seq, diag)),
                     "predictions_differing": int((seq != diag).sum()),
                     "sequential_seconds": round(cpu_seq, 3), "diagonal_seconds": round(cpu_diag, 3),
                     "sequential_wall_seconds": round(wall_seq, 3), "diagonal_wall_seconds": round(wall_diag, 3)})
    t_seq, t_diag = sum(r["sequential_seconds"] for r in rows), sum(r["diagonal_seconds"] for r in rows)
    w_seq, w_diag = (sum(r[k] for r in rows) for k in ("sequential_wall_seconds", "diagonal_wall_seconds"))
    return {"task": "qa1", "segment_size": n, "training_segments": S0, "training_tokens": S0 * n,
            "samples_per_length": samples, "batch_size": batch_size, "seed": seed, "chance": VOCAB.chance, "layers": model.num_layers,
            "threads": torch.get_num_threads(), "by_length": rows,
            "diagonal_equals_sequential": all(r["diagonal_equals_sequential"] for r in rows),
            "predictions_compared": samples * len(rows),
            "predictions_differing": sum(r["predictions_differing"] for r in rows),
            "sequential_seconds": round(t_seq, 2), "diagonal_seconds": round(t_diag, 2),
            "speedup": round(t_seq / t_diag, 2), "sequential_wall_seconds": round(w_seq, 2),
            "diagonal_wall_seconds": round(w_diag, 2), "timing": "CPU seconds of the process (wall seconds too)"}


def _predict_in_chunks(run, batch: StoryBatch, size: int) -> torch.Tensor:
    """predict() over the stories of batch, `size` at a time: (B, Q)."""
    parts = []
    for a in range(0, batch.input_ids.shape[0], size):
        part = StoryBatch(*(getattr(batch, f)[a:a + size] for f in ("input_ids", "labels", "answers", "answer_pos",
                                                                    "keys", "distance", "fact_pos")),
                          batch.segment_size, batch.task, batch.seed, batch.vocab)
        parts.append(predict(run, part))
    return torch.cat(parts)


def format_table(result: dict) -> str:
    """An evaluate() result as the BABILong tables lay it out: one column per context length."""
    rows = result["by_length"]
    head = f"{'context length (tokens)':<28}" + "".join(f"{r['tokens']:>8}" for r in rows)
    line = lambda name, key, fmt: f"{name:<28}" + "".join(f"{fmt(r[key]):>8}" for r in rows)   # noqa: E731
    return "\n".join([
        head,
        line("segments", "segments", str),
        line("QA1 accuracy, memory on", "accuracy", lambda v: f"{v:.2f}"),
        line(f"memory zeroed (chance {result['chance']:.2f})", "accuracy_zeroed", lambda v: f"{v:.2f}"),
        line("diagonal != sequential", "predictions_differing", str),
        line("sequential, CPU s", "sequential_seconds", lambda v: f"{v:.2f}"),
        line("diagonal, CPU s", "diagonal_seconds", lambda v: f"{v:.2f}"),
        f"{result['samples_per_length']} held-out stories per length, timed {result['batch_size']} per call; trained at {result['training_tokens']} "
        f"tokens; whole evaluation: sequential {result['sequential_seconds']:.2f} s, diagonal "
        f"{result['diagonal_seconds']:.2f} s of CPU ({result['speedup']:.2f}x; wall {result['sequential_wall_seconds']:.2f} "
        f"s and {result['diagonal_wall_seconds']:.2f} s), {result['threads']} thread(s)"])


def checkpoint_config(path: str) -> dict:
    """The training config recorded with the checkpoint at path (its train_log.json), a dict."""
    log_path = os.path.join(path, "train_log.json")
    if not os.path.isfile(log_path) or not os.path.isfile(os.path.join(path, "armt_config.json")):
        raise ValueError(f"{path!r} holds no BABILong checkpoint (no train_log.json + armt_config.json): train "
                         f"one with python -m diaglab.babilong --out DIR, or pass data/babilong")
    return read_log(path)["config"]    # an old log's mem_tokens read as num_mem_tokens


def run_eval(path: str, samples: int = 100, factors=LENGTH_FACTORS, write: bool = True, batch_size: int = 1) -> dict:
    """Load the checkpoint at path, evaluate it, optionally write path/eval.json."""
    res = evaluate(ARMT.from_pretrained(path), checkpoint_config(path), factors, samples, batch_size=batch_size)
    if write:
        write_json(os.path.join(path, "eval.json"), res)
    return res


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m diaglab.babilong", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval", metavar="DIR", help="evaluate the checkpoint in DIR instead of training")
    p.add_argument("--no-write", action="store_true", default=argparse.SUPPRESS,
                   help="with --eval: print only, do not write DIR/eval.json")
    p.add_argument("--samples", type=int, default=argparse.SUPPRESS,
                   help="with --eval: held-out stories per length, default 100")
    p.add_argument("--eval-batch", type=int, default=argparse.SUPPRESS,
                   help="with --eval: stories per call in the timed runs, default 1")
    add_config_flags(p, StoryTrainConfig, SHAPE_FIELDS, "data/babilong", "runs/babilong-<date>-<time>",
                     "continue from this checkpoint (its shape and its history)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; StoryTrainConfig flags that were not given are absent from the result."""
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_eval_flags(parser, args, StoryTrainConfig, ("samples", "no_write", "eval_batch"))
    samples, eval_batch = getattr(args, "samples", 100), getattr(args, "eval_batch", 1)
    write = not getattr(args, "no_write", False)
    try:   # every argument is checked here, so a bad one ends in one line and exit status 2
        cfg = train_config_from_args(args, StoryTrainConfig)
        if args.eval is not None:
            check_int("--eval-batch", eval_batch, 1, MAX_COUNT)
            check_eval_dir(args.eval, samples, write, "diaglab.babilong", "data/babilong")
            checkpoint_config(args.eval)
        else:
            preflight(cfg)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    if args.eval is not None:
        with _threads(cfg.threads):
            res = run_eval(args.eval, samples, write=write, batch_size=eval_batch)
        print(format_table(res))
        return
    t0 = time.perf_counter()
    train(cfg)
    print(f"trained in {(time.perf_counter() - t0) / 60:.1f} min on {cfg.threads} thread(s); saved in {cfg.out}; "
          "evaluating")
    with _threads(cfg.threads):
        res = run_eval(cfg.out)
    print(format_table(res))


if __name__ == "__main__":
    main()
