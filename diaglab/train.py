"""Train a small ARMT to recall across segments, and measure that it does.

Training runs forward and backward through the DiagonalExecutor (SPEC §6: gradients
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
    python -m diaglab.train --out /tmp/recall_stage1 --threads 1 --task recall --normalize-keys 1 \
        --mem-tokens 8 --queries 3 --minutes 10 --eval-every 250 --eval-samples 50
    python -m diaglab.train --out data/recall --init-from /tmp/recall_stage1 --threads 1 --task mix \
        --start-segments 9 --steps 1000 --lr 3e-4 --warmup 50 --minutes 6 --eval-every 500 --eval-samples 50
    # evaluate a checkpoint: prints the table, writes DIR/eval.json (200 samples per distance)
    python -m diaglab.train --eval data/recall --threads 1

Every TrainConfig field is a flag (--hidden 96, --task recall, --minutes 20, ...);
`python -m diaglab.train --help` lists them with their defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections import deque
from dataclasses import asdict, dataclass

import torch

from .armt import ARMT
from .diagonal import DiagonalExecutor
from .presets import tiny_armt
from .tables import format_table
from .tasks import TaskBatch, TaskVocab, associative_recall, fixed_samples, needle_in_a_haystack, save_samples

EVAL_SEED = 10_000_000   # held-out: training batches use seeds seed * 1_000_003 + step, far below this


@dataclass
class TrainConfig:
    out: str = "data/recall"    # checkpoint directory (save_pretrained) + train_log.json + eval.json
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    segment_size: int = 16      # n
    mem_tokens: int = 4         # M
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


def answer_logits(logits_last: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
    """Logits of the last segment (B, n, V) -> the logits that predict each answer (B, Q, V)."""
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
                     segment_size=cfg.segment_size, num_mem_tokens=cfg.mem_tokens, d_mem=cfg.d_mem,
                     seed=cfg.seed, intermediate=2 * cfg.hidden,
                     initializer_range=cfg.init_std, normalize_keys=cfg.normalize_keys)
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        for p, std in ((model.base.get_input_embeddings().weight, cfg.embed_std), (model.memory, cfg.memory_std)):
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10 % over cfg.steps."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    frac = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))


def train(cfg: TrainConfig) -> tuple[ARMT, list[dict]]:
    """Train, evaluate every cfg.eval_every steps, save to cfg.out; returns (model, log)."""
    from tqdm.auto import tqdm
    torch.set_num_threads(cfg.threads)
    model = ARMT.from_pretrained(cfg.init_from) if cfg.init_from else build_model(cfg)
    model.train()
    ex = DiagonalExecutor(model)
    vocab = task_vocab(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    rng = torch.Generator().manual_seed(cfg.seed)
    current = min(cfg.start_segments, cfg.max_segments)
    recent: deque[float] = deque(maxlen=50)     # answer accuracy of recent batches at S == current
    log: list[dict] = []
    skipped = 0
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), disable=not cfg.progress, mininterval=2.0)
    for step in bar:
        # 1. curriculum: half the batches at the current (hardest) S, half at a shorter one
        S = current if bool(torch.rand((), generator=rng) < 0.5) else int(torch.randint(2, current + 1, (), generator=rng))
        task = cfg.task if cfg.task != "mix" else TASKS[step % 2]
        batch = make_batch(task, cfg.batch, S, cfg.segment_size, cfg.pairs, cfg.queries,
                           seed=cfg.seed * 1_000_003 + step, vocab=vocab)
        # 2. forward and backward through the diagonal executor
        out = ex(batch.input_ids, labels=batch.labels, keep_logits="last_segment")
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if not (torch.isfinite(out.loss) and torch.isfinite(gnorm)):
            skipped += 1     # a rare overflow in a read (q . z ~ eps): drop this batch, keep the weights
            sched.step()
            continue
        opt.step()
        sched.step()
        acc = float((answer_logits(out.logits.detach(), batch).argmax(-1) == batch.answers).float().mean())
        if S == current and (cfg.task != "mix" or task == "recall"):   # mix: the harder task sets the pace
            recent.append(acc)
            if current < cfg.max_segments and len(recent) == recent.maxlen and sum(recent) / len(recent) >= cfg.promote_at:
                current += 1
                recent.clear()
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
            save(model, cfg, log)
        if out_of_time:
            break
    bar.close()
    model.eval()
    return model, log


def save(model: ARMT, cfg: TrainConfig, log: list[dict]) -> None:
    """save_pretrained + train_log.json + samples.json in cfg.out. The log holds this run's
    config and curve, the model's own ARMTConfig (with --init-from the model's shape comes
    from that checkpoint, not from the shape flags) and, with --init-from, the log of the
    run it started from, so a staged training keeps its whole history."""
    model.save_pretrained(cfg.out)
    save_samples(fixed_samples(cfg.max_segments, cfg.segment_size, cfg.pairs, task_vocab(cfg)),
                 os.path.join(cfg.out, "samples.json"))
    record = {"config": asdict(cfg), "armt": model.config.to_dict(), "log": log}
    if cfg.init_from:
        with open(os.path.join(cfg.init_from, "train_log.json")) as f:
            record["init_from_log"] = json.load(f)
    with open(os.path.join(cfg.out, "train_log.json"), "w") as f:
        json.dump(record, f, indent=1)


def run_eval(path: str, samples: int = 200, write: bool = True) -> dict:
    """Load the checkpoint at path, evaluate at the training length, optionally write path/eval.json."""
    model = ARMT.from_pretrained(path)
    with open(os.path.join(path, "train_log.json")) as f:
        tcfg = json.load(f)["config"]
    t0 = time.perf_counter()
    res = evaluate(model, tcfg["max_segments"], samples, tcfg["pairs"], vocab=TaskVocab(num_fillers=tcfg["fillers"]))
    res["trained_on"] = tcfg["task"]
    res["eval_seconds"] = round(time.perf_counter() - t0, 1)
    if write:
        with open(os.path.join(path, "eval.json"), "w") as f:
            json.dump(res, f, indent=1)
    return res


def _flag_bool(text: str) -> bool:
    """'1'/'true'/'yes' or '0'/'false'/'no' (argparse's type=bool would make any text True)."""
    value = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected 1/0, true/false or yes/no, got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m diaglab.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval", metavar="DIR", help="evaluate the checkpoint in DIR instead of training")
    p.add_argument("--no-write", action="store_true", help="with --eval: print only, do not write DIR/eval.json")
    p.add_argument("--samples", type=int, default=200, help="with --eval: held-out samples per distance")
    defaults = TrainConfig()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if name == "progress":
            p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the tqdm bar")
        elif name == "minutes":
            p.add_argument(flag, type=float, default=None, help="stop training after this many minutes")
        elif isinstance(value, bool):
            p.add_argument(flag, type=_flag_bool, default=value, help=f"default {value} (1/0, true/false)")
        else:
            p.add_argument(flag, type=type(value), default=value, help=f"default {value}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.eval:
        res = run_eval(args.eval, samples=args.samples, write=not args.no_write)
        print(eval_table(res))
        return
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__})
    t0 = time.perf_counter()
    model, _ = train(cfg)
    print(f"trained in {(time.perf_counter() - t0) / 60:.1f} min; evaluating")
    res = run_eval(cfg.out)
    print(eval_table(res))


if __name__ == "__main__":
    main()
