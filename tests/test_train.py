"""Training and evaluation (diaglab.train): the shipped recall checkpoint does better than
chance only with its memory, a few training steps run end to end, and the CLI works.
The full training run (two stages, about 7 min) is not run here."""

import json
import math
from pathlib import Path

import pytest
import torch

import diaglab
from diaglab import train
from diaglab.tasks import VOCAB, TaskVocab, associative_recall

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "data" / "recall"


pytestmark = pytest.mark.usefixtures("threads_kept")   # train() and the CLI set torch's thread count


def test_checkpoint_is_small_and_complete():
    files = {p.name: p.stat().st_size for p in CKPT.iterdir()}
    assert {"model.safetensors", "armt_config.json", "base_config.json", "train_log.json",
            "eval.json", "samples.json"} <= set(files)
    assert sum(files.values()) <= 10 * 2**20


def test_checkpoint_recalls_with_memory_and_not_without():
    """Both tasks, on seeds no run has seen: a needle, and one of 8 key-value pairs stored one
    per segment, recalled 1, 4 and 8 segments later; with the memory zeroed, chance."""
    torch.set_num_threads(1)   # tiny model: 1 thread takes 0.3 s here; 2 threads on a busy 2-core CPU took 35 s
    model = diaglab.ARMT.from_pretrained(CKPT)
    assert model.config.normalize_keys                        # trained with unit-length queries and keys
    cfg = json.loads((CKPT / "train_log.json").read_text())["config"]
    S = cfg["max_segments"]
    res = train.evaluate(model, num_segments=S, samples=32, pairs=cfg["pairs"], distances=[1, 4, S - 1],
                         seed=123_456_789, tasks=("needle", "recall"), vocab=TaskVocab(num_fillers=cfg["fillers"]))
    for task in ("needle", "recall"):
        assert all(r[task] >= 0.8 for r in res["by_distance"]), (task, res)   # every distance; chance is 1/16
        assert res[task + "_zeroed_mean"] < 2.5 * VOCAB.chance, (task, res)   # memory off: chance within noise
    assert res["diagonal_equals_sequential"] and res["predictions_compared"] == 2 * 96


def test_stored_eval_json_is_consistent():
    res = json.loads((CKPT / "eval.json").read_text())
    rows = res["by_distance"]
    assert [r["distance"] for r in rows] == list(range(1, res["num_segments"]))
    for task in res["tasks"]:
        far = [r[task] for r in rows if r["distance"] >= 4]
        assert math.isclose(res[task + "_at_distance_ge_4"], sum(far) / len(far))
    assert res["trained_on"] in (*res["tasks"], "mix")
    assert res["diagonal_equals_sequential"] and res["chance"] == VOCAB.chance


def _tiny_config(out) -> train.TrainConfig:
    return train.TrainConfig(out=str(out), layers=1, hidden=32, heads=2, kv_heads=1, segment_size=8,
                             num_mem_tokens=2, d_mem=8, max_segments=3, steps=8, batch=4, warmup=2,
                             eval_every=4, eval_samples=4, progress=False)


def test_training_smoke(tmp_path):
    cfg = _tiny_config(tmp_path / "ckpt")
    before = train.build_model(cfg).assoc[0].W_mv.weight.detach().clone()
    model, log = train.train(cfg)
    assert [e["step"] for e in log] == [4, 8]
    assert all(math.isfinite(e["loss"]) for e in log)
    assert not torch.equal(model.assoc[0].W_mv.weight, before)          # the memory's value map learned
    loaded = diaglab.ARMT.from_pretrained(cfg.out)
    batch = associative_recall(4, 3, 8, seed=5)
    assert torch.equal(train.predict(model, batch), train.predict(loaded, batch))
    res = train.run_eval(cfg.out, samples=4)
    assert (Path(cfg.out) / "eval.json").exists() and len(res["by_distance"]) == 2
    assert res["diagonal_equals_sequential"]


def test_cli_eval_prints_the_table(tmp_path, capsys):
    cfg = _tiny_config(tmp_path / "ckpt")
    train.save(train.build_model(cfg), cfg, [])
    train.main(["--eval", cfg.out, "--samples", "4", "--no-write"])
    text = capsys.readouterr().out
    assert "distance" in text and "diagonal == sequential" in text
    assert not (Path(cfg.out) / "eval.json").exists()
    args = train.parse_args(["--hidden", "96", "--minutes", "2.5", "--no-progress"])
    assert (args.hidden, args.minutes, args.progress, args.eval) == (96, 2.5, False, None)


def test_init_from_keeps_the_history_and_bool_flags_parse(tmp_path, capsys):
    first = _tiny_config(tmp_path / "a")
    first = train.TrainConfig(**{**first.__dict__, "normalize_keys": True, "steps": 4})
    train.train(first)
    other_shape = train.TrainConfig(**{**first.__dict__, "out": str(tmp_path / "b"), "init_from": first.out,
                                       "normalize_keys": False})
    with pytest.raises(ValueError, match=r"normalize_keys \(--normalize-keys\) is False but the checkpoint"):
        train.train(other_shape)
    rest = {k: v for k, v in first.__dict__.items() if k not in (*train.SHAPE_FIELDS, "init_from")}
    second = train.TrainConfig.continuing(first.out, **{**rest, "out": str(tmp_path / "b"), "task": "mix"})
    model, _ = train.train(second)
    assert model.config.normalize_keys and second.normalize_keys     # the shape comes from the checkpoint
    record = json.loads((tmp_path / "b" / "train_log.json").read_text())
    assert record["armt"]["normalize_keys"] is True and record["config"]["normalize_keys"] is True
    assert record["config"]["task"] == "mix"
    assert record["init_from_log"]["config"]["out"] == first.out and record["init_from_log"]["log"]
    assert train.parse_args(["--normalize-keys", "1"]).normalize_keys is True
    assert train.parse_args(["--normalize-keys", "false"]).normalize_keys is False
    with pytest.raises(SystemExit):
        train.parse_args(["--normalize-keys", "maybe"])
    assert "expected 1/0, true/false or yes/no, got 'maybe'" in capsys.readouterr().err


def test_curriculum_and_guarded_step():
    from diaglab.train import Curriculum, guarded_step
    c = Curriculum(2, 3, promote_at=0.9, window=3)
    for acc in (1.0, 1.0):
        c.record(acc)
    assert c.current == 2                       # the window is not full yet
    c.record(0.8)
    assert c.current == 3 and len(c.recent) == 0  # mean 0.93 >= 0.9: one up, window cleared
    for _ in range(5):
        c.record(1.0)
    assert c.current == 3                       # never past the maximum
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    assert not guarded_step((w * float("inf")).sum(), torch.nn.ParameterList([w]), opt, sched)
    assert torch.equal(w.detach(), torch.ones(2)) and sched.last_epoch == 1   # dropped; the schedule moved on
    assert guarded_step((w * w).sum(), torch.nn.ParameterList([w]), opt, sched)
    assert torch.allclose(w.detach(), torch.full((2,), 1 - 0.1 / 2 ** 0.5))   # gradient (2, 2) clipped to norm 1


def test_answer_logits_refuses_full_length_logits():
    cfg = _tiny_config("unused")
    model = train.build_model(cfg).eval()
    batch = associative_recall(2, 3, 8, seed=5)
    with torch.no_grad():
        full, last = model(batch.input_ids).logits, model(batch.input_ids, keep_logits="last_segment").logits
    assert full.shape[1] == 24 and last.shape[1] == 8
    assert train.answer_logits(last, batch).shape == (2, 1, full.shape[-1])
    with pytest.raises(ValueError, match=r"\(B, n, V\) = \(2, 8, V\), got \(2, 24, .*keep_logits=\"last_segment\""):
        train.answer_logits(full, batch)


def test_degenerate_evaluation_and_curriculum_arguments_are_named():
    model = train.build_model(_tiny_config("unused"))
    with pytest.raises(ValueError, match="num_segments must be an int >= 2, got 1"):
        train.evaluate(model, num_segments=1, samples=2)
    with pytest.raises(ValueError, match="samples must be an int >= 1, got 0"):
        train.evaluate(model, num_segments=3, samples=0)
    with pytest.raises(ValueError, match="window must be an int >= 1, got 0"):
        train.Curriculum(2, 3, 0.9, window=0)
