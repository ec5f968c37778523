"""The synthetic memory tasks (diaglab.tasks): layout, determinism, metadata, persistence."""

import json
from pathlib import Path

import pytest
import torch

from diaglab import tasks
from diaglab.tasks import VOCAB

ROOT = Path(__file__).resolve().parents[1]


def _answers_are_where_they_say(b: tasks.TaskBatch) -> None:
    B, N = b.input_ids.shape
    n, S = b.segment_size, b.num_segments
    assert N == S * n and b.answers.shape == b.answer_pos.shape == b.keys.shape == b.distance.shape
    rows = torch.arange(B)[:, None]
    assert torch.equal(b.input_ids[rows, b.answer_pos], b.answers)
    assert torch.equal(b.input_ids[rows, b.answer_pos - 1], b.keys)
    assert bool((b.input_ids[rows, b.answer_pos - 2] == VOCAB.query).all())
    assert bool((b.answer_pos >= (S - 1) * n).all())                     # queries sit in the last segment
    # the only labels are the answers
    assert int((b.labels != -100).sum()) == b.answers.numel()
    assert torch.equal(b.labels[rows, b.answer_pos], b.answers)
    # the pair (key, answer) is stored `distance` segments before the last one, and nowhere else
    for i in range(B):
        for q in range(b.answers.shape[1]):
            seg = S - 1 - int(b.distance[i, q])
            body = b.input_ids[i, :(S - 1) * n]
            at = torch.nonzero(body == b.keys[i, q]).flatten()
            assert len(at) == 1 and int(at[0]) // n == seg
            assert int(body[at[0] + 1]) == int(b.answers[i, q])


@pytest.mark.parametrize("S,P,Q", [(2, 1, 1), (5, 2, 3), (9, 2, 1), (12, 2, 4)])
def test_associative_recall_layout(S, P, Q):
    b = tasks.associative_recall(6, S, 16, P, Q, seed=3)
    _answers_are_where_they_say(b)
    keys = b.input_ids[:, :(S - 1) * 16].reshape(6, S - 1, 16)[:, :, 0:2 * P:2].reshape(6, -1)
    assert all(len(set(row.tolist())) == row.numel() for row in keys)   # keys distinct within a sample
    assert bool(((b.distance >= 1) & (b.distance <= S - 1)).all())


@pytest.mark.parametrize("d", [1, 4, 8])
def test_distance_is_respected(d):
    b = tasks.associative_recall(8, 9, distance=d, seed=1)
    assert bool((b.distance == d).all())
    _answers_are_where_they_say(b)
    h = tasks.needle_in_a_haystack(8, 9, distance=d, seed=1)
    assert bool((h.distance == d).all())
    _answers_are_where_they_say(h)


def test_needle_is_alone_in_filler():
    h = tasks.needle_in_a_haystack(5, 6, seed=2)
    _answers_are_where_they_say(h)
    kinds = [[VOCAB.kind(t) for t in row.tolist()] for row in h.input_ids]
    for row in kinds:
        assert row.count("key") == 2 and row.count("value") == 2 and row.count("query") == 1


def test_deterministic_and_seeded():
    a, b = tasks.associative_recall(4, 6, seed=7), tasks.associative_recall(4, 6, seed=7)
    c = tasks.associative_recall(4, 6, seed=8)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.input_ids, c.input_ids)
    g = torch.get_rng_state()
    tasks.needle_in_a_haystack(4, 6, seed=7)
    assert torch.equal(g, torch.get_rng_state())                         # the global RNG is untouched


def test_tokens_fit_the_vocabulary():
    b = tasks.associative_recall(16, 12, pairs_per_segment=2, num_queries=4, seed=0)
    assert int(b.input_ids.min()) >= 1 and int(b.input_ids.max()) < VOCAB.size
    assert VOCAB.describe(VOCAB.query) == "Q" and VOCAB.describe(VOCAB.first_key + 3) == "K3"
    assert VOCAB.chance == 1 / 16


@pytest.mark.parametrize("kwargs,says", [
    (dict(num_segments=1), "num_segments must be an int >= 2"),
    (dict(pairs_per_segment=9), r"pairs_per_segment must be an int in \[1, 8\]"),
    (dict(num_queries=6), r"num_queries must be an int in \[1, 5\]"),
    (dict(distance=0), r"distance must be an int in \[1, 8\]"),
    (dict(distance=9), r"distance must be an int in \[1, 8\]"),
    (dict(num_segments=14), "need 26 distinct keys; the vocabulary has 24")])
def test_bad_arguments(kwargs, says):
    args = dict(batch_size=2, num_segments=9) | kwargs
    with pytest.raises(ValueError, match=says):
        tasks.associative_recall(**args)


def test_samples_round_trip(tmp_path):
    batches = tasks.fixed_samples()
    tasks.save_samples(batches, tmp_path / "s.json")
    back = tasks.load_samples(tmp_path / "s.json")
    for name, b in batches.items():
        for field in ("input_ids", "labels", "answers", "answer_pos", "keys", "distance"):
            assert torch.equal(getattr(b, field), getattr(back[name], field))
        assert back[name].render(0) == b.render(0)


def test_stored_samples_match_the_generators():
    cfg = json.loads((ROOT / "data" / "recall" / "train_log.json").read_text())["config"]
    stored = tasks.load_samples(ROOT / "data" / "recall" / "samples.json")
    fresh = tasks.fixed_samples(cfg["max_segments"], cfg["segment_size"], cfg["pairs"],
                                tasks.TaskVocab(num_fillers=cfg["fillers"]))
    assert set(stored) == set(fresh)
    for name in fresh:
        assert torch.equal(stored[name].input_ids, fresh[name].input_ids)
        _answers_are_where_they_say(stored[name])
