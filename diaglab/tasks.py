"""Synthetic long-context tasks that only a working memory can solve: deterministic,
seeded generators over a small vocabulary (no tokenizer, nothing downloaded).

Every sample is S segments of n tokens. Early segments hold (key, value) pairs; the
last segment ends with one or more queries `QUERY key value`. The answer is the value
stored with that key some segments earlier, so an ARMT must carry it across segment
boundaries in its associative memory: the text rows of a segment never see another
segment's tokens.

  associative_recall   every segment but the last holds pairs_per_segment pairs at fixed
                       slots (K V K V ... then filler); a query asks for one of them.
  needle_in_a_haystack one pair at a random place in a haystack of random filler tokens.

Both return a TaskBatch of plain tensors: input_ids and labels (B, N) with labels -100
everywhere except at the answer positions (HF convention: labels[i] is the token at i,
so the loss on it comes from the logits at i - 1), plus the answers, their positions,
the queried keys and the distance in segments between the pair and its query.

The BABILong-style QA1 stories (facts among distractor sentences, in words) live in
diaglab.stories and are re-exported here: qa1_single_fact, StoryBatch, StoryVocab.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from ._checks import check_int
from .stories import SAMPLES_SEED, StoryBatch, StoryVocab, qa1_single_fact   # BABILong-style QA (diaglab.stories)

__all__ = ["SAMPLES_SEED", "VOCAB", "StoryBatch", "StoryVocab", "TaskBatch", "TaskVocab", "associative_recall",
           "fixed_samples", "load_samples", "needle_in_a_haystack", "qa1_single_fact", "save_samples"]


@dataclass(frozen=True)
class TaskVocab:
    """Token layout: PAD, QUERY, then fillers, keys and values in consecutive blocks."""

    num_fillers: int = 16   # haystack tokens
    num_keys: int = 24      # keys of the stored pairs
    num_values: int = 16    # values (chance level = 1 / num_values)
    pad: int = 0            # never emitted by the generators; reserved
    query: int = 1          # marks a question: QUERY key -> value

    def __post_init__(self):
        for name in ("num_fillers", "num_keys", "num_values"):
            check_int(name, getattr(self, name), 1)

    @property
    def first_filler(self) -> int:
        return 2

    @property
    def first_key(self) -> int:
        return self.first_filler + self.num_fillers

    @property
    def first_value(self) -> int:
        return self.first_key + self.num_keys

    @property
    def size(self) -> int:
        """Smallest model vocabulary that holds every token of the task."""
        return self.first_value + self.num_values

    @property
    def chance(self) -> float:
        """Accuracy of a model that knows the answer is a value but not which one."""
        return 1.0 / self.num_values

    def kind(self, token: int) -> str:
        """'pad' | 'query' | 'filler' | 'key' | 'value' — for printing samples."""
        if token == self.pad:
            return "pad"
        if token == self.query:
            return "query"
        if token < self.first_key:
            return "filler"
        return "key" if token < self.first_value else "value"

    def describe(self, token: int) -> str:
        """A short readable name: 'Q', '.3' (filler 3), 'K7', 'V12'."""
        kind = self.kind(token)
        if kind in ("pad", "query"):
            return {"pad": "_", "query": "Q"}[kind]
        if kind == "filler":
            return f".{token - self.first_filler}"
        return f"K{token - self.first_key}" if kind == "key" else f"V{token - self.first_value}"


VOCAB = TaskVocab()
# SAMPLES_SEED, imported above: one seed for the fixed samples kept in data/ (see fixed_samples) and the stories


@dataclass
class TaskBatch:
    """A batch of samples. Shapes: B samples, N = S * n tokens, Q queries per sample."""

    input_ids: torch.Tensor     # (B, N) long
    labels: torch.Tensor        # (B, N) long, -100 except at answer positions
    answers: torch.Tensor       # (B, Q) the value token of each query
    answer_pos: torch.Tensor    # (B, Q) position of that value in input_ids (its logits sit at pos - 1)
    keys: torch.Tensor          # (B, Q) the queried key token
    distance: torch.Tensor      # (B, Q) segments between the pair's segment and the query's
    segment_size: int
    task: str
    seed: int
    vocab: TaskVocab = field(default=VOCAB)

    @property
    def num_segments(self) -> int:
        return self.input_ids.shape[1] // self.segment_size

    def prompt(self, i: int, q: int = 0) -> torch.Tensor:
        """Sample i cut just before the answer of query q: (1, answer_pos) — the generation prompt."""
        return self.input_ids[i:i + 1, :int(self.answer_pos[i, q])]

    def render(self, i: int) -> str:
        """Sample i as readable text, one segment per line."""
        n = self.segment_size
        toks = self.input_ids[i].tolist()
        return "\n".join(f"seg {s:2d} | " + " ".join(self.vocab.describe(t) for t in toks[s * n:(s + 1) * n])
                         for s in range(self.num_segments))

    def to_dict(self) -> dict:
        """JSON-ready dict (lists of ints) — data/recall/samples.json holds a few of these."""
        return {"task": self.task, "seed": self.seed, "segment_size": self.segment_size,
                "vocab": {k: getattr(self.vocab, k) for k in ("num_fillers", "num_keys", "num_values")},
                **{k: getattr(self, k).tolist()
                   for k in ("input_ids", "labels", "answers", "answer_pos", "keys", "distance")}}

    @classmethod
    def from_dict(cls, d: dict) -> "TaskBatch":
        tensors = {k: torch.tensor(d[k], dtype=torch.long)
                   for k in ("input_ids", "labels", "answers", "answer_pos", "keys", "distance")}
        return cls(**tensors, segment_size=d["segment_size"], task=d["task"], seed=d["seed"],
                   vocab=TaskVocab(**d["vocab"]))


def _queries(ids: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
             vocab: TaskVocab) -> tuple[torch.Tensor, torch.Tensor]:
    """Write `QUERY key value` triples at the end of the last segment, in place.

    ids: (B, N); keys, values: (B, Q). Returns labels (B, N) and answer positions (B, Q).
    """
    B, N = ids.shape
    Q = keys.shape[1]
    start = N - 3 * Q                                                     # last segment ends with the triples
    pos_q = start + 3 * torch.arange(Q)                                   # (Q,) positions of QUERY
    ids[:, pos_q] = vocab.query
    ids[:, pos_q + 1] = keys
    ids[:, pos_q + 2] = values
    labels = torch.full_like(ids, -100)
    labels[:, pos_q + 2] = values
    return labels, (pos_q + 2).expand(B, Q).clone()


def associative_recall(batch_size: int, num_segments: int, segment_size: int = 16,
                       pairs_per_segment: int = 2, num_queries: int = 1, distance: int | None = None,
                       seed: int = 0, vocab: TaskVocab = VOCAB) -> TaskBatch:
    """Key-value pairs in every segment but the last; the last segment asks for some of them.

    Segment s < S - 1 = [K V] * pairs_per_segment + filler; keys are distinct within a sample.
    Last segment = filler + [QUERY K V] * num_queries. distance: ask only for pairs stored
    exactly that many segments before the last (1 .. S-1), or None for any pair.
    """
    S, n, P, Q = num_segments, segment_size, pairs_per_segment, num_queries
    check_int("num_segments", S, 2)
    check_int("segment_size", n, 3)
    check_int("pairs_per_segment", P, 1, n // 2)
    check_int("num_queries", Q, 1, min(n // 3, P if distance is not None else P * (S - 1)))
    K = P * (S - 1)                                                       # pairs per sample
    if K > vocab.num_keys:
        raise ValueError(f"{S - 1} segments x {P} pairs need {K} distinct keys; the vocabulary has "
                         f"{vocab.num_keys} (lower num_segments or pairs_per_segment)")
    if distance is not None:
        check_int("distance", distance, 1, S - 1)
    g = torch.Generator().manual_seed(seed)
    B = batch_size
    ids = torch.randint(0, vocab.num_fillers, (B, S, n), generator=g) + vocab.first_filler   # (B, S, n)
    keys = torch.rand(B, vocab.num_keys, generator=g).argsort(-1)[:, :K] + vocab.first_key  # (B, K)
    values = torch.randint(0, vocab.num_values, (B, K), generator=g) + vocab.first_value     # (B, K)
    pairs = torch.stack([keys, values], -1).reshape(B, S - 1, 2 * P)                        # (B, S-1, 2P)
    ids[:, :S - 1, :2 * P] = pairs
    if distance is None:
        pick = torch.rand(B, K, generator=g).argsort(-1)[:, :Q]                              # (B, Q) pair index
    else:
        pick = torch.rand(B, P, generator=g).argsort(-1)[:, :Q] + (S - 1 - distance) * P
    ids = ids.reshape(B, S * n)                                                               # (B, N)
    qk, qv = keys.gather(1, pick), values.gather(1, pick)                                    # (B, Q)
    labels, answer_pos = _queries(ids, qk, qv, vocab)
    return TaskBatch(ids, labels, qv, answer_pos, qk, (S - 1) - pick // P, n, "associative_recall", seed, vocab)


def needle_in_a_haystack(batch_size: int, num_segments: int, segment_size: int = 16,
                         distance: int | None = None, seed: int = 0, vocab: TaskVocab = VOCAB) -> TaskBatch:
    """One key-value pair at a random place in a segment of filler; the last segment asks for it.

    distance: segments between the needle's segment and the last (1 .. S-1), random if None.
    """
    S, n = num_segments, segment_size
    check_int("num_segments", S, 2)
    check_int("segment_size", n, 3)
    if distance is not None:
        check_int("distance", distance, 1, S - 1)
    g = torch.Generator().manual_seed(seed)
    B = batch_size
    ids = torch.randint(0, vocab.num_fillers, (B, S * n), generator=g) + vocab.first_filler  # (B, N)
    key = torch.randint(0, vocab.num_keys, (B, 1), generator=g) + vocab.first_key            # (B, 1)
    value = torch.randint(0, vocab.num_values, (B, 1), generator=g) + vocab.first_value      # (B, 1)
    if distance is None:
        dist = torch.randint(1, S, (B, 1), generator=g)                                      # (B, 1)
    else:
        dist = torch.full((B, 1), distance)
    offset = torch.randint(0, n - 1, (B, 1), generator=g)                                    # needle fits in its segment
    at = (S - 1 - dist) * n + offset                                                          # (B, 1)
    ids.scatter_(1, at, key)
    ids.scatter_(1, at + 1, value)
    labels, answer_pos = _queries(ids, key, value, vocab)
    return TaskBatch(ids, labels, value, answer_pos, key, dist, n, "needle_in_a_haystack", seed, vocab)


def fixed_samples(num_segments: int = 9, segment_size: int = 16, pairs_per_segment: int = 2,
                  vocab: TaskVocab = VOCAB) -> dict[str, TaskBatch]:
    """The few samples kept in data/recall/samples.json: 4 of each task, from a seed that training
    (seeds below 10^7, one per step) and evaluation (10^7 + distance) never use."""
    return {"associative_recall": associative_recall(4, num_segments, segment_size, pairs_per_segment,
                                                     seed=SAMPLES_SEED, vocab=vocab),
            "needle_in_a_haystack": needle_in_a_haystack(4, num_segments, segment_size, seed=SAMPLES_SEED,
                                                         vocab=vocab)}


def save_samples(batches: dict[str, TaskBatch], path: str | os.PathLike) -> None:
    """Write named TaskBatches to a JSON file (a few fixed samples kept in data/)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({name: b.to_dict() for name, b in batches.items()}, f)


def load_samples(path: str | os.PathLike) -> dict[str, TaskBatch]:
    with open(path) as f:
        return {name: TaskBatch.from_dict(d) for name, d in json.load(f).items()}
