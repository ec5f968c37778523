"""BABILong-style QA1 (diaglab.stories, diaglab.babilong): the generator's answers checked by
re-reading the decoded text, the tokenizer, the shipped checkpoint, and argument errors."""

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from conftest import cli_error, cli_error_in_a_process, live_model, no_work

import diaglab
from diaglab import babilong, stories, tasks, train, viz
from diaglab.stories import LOCATIONS, MOVES, NAMES, VOCAB, qa1_single_fact

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "data" / "babilong"


def _reread(text: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Parse decoded words, not the generator's record: (moves as (name, place), questions as
    (name, answer)). Any sentence naming a person or a place must be a move or a question."""
    moves, questions = [], []
    words = text.replace(".", " .").replace("?", " ?").split()
    sentences, cur = [], []
    for w in words:
        cur.append(w)
        if w == ".":
            sentences.append(cur)
            cur = []
    assert not cur
    for s in sentences:
        if s[0] == "So":                                          # So where is NAME ANSWER .
            assert s[1:3] == ["where", "is"] and len(s) == 6
            questions.append((s[3], s[4]))
        elif s[0] in NAMES:                                       # NAME MOVED to the PLACE .
            assert s[1] in MOVES and s[2:4] == ["to", "the"] and len(s) == 6
            moves.append((s[0], s[4]))
        else:
            assert not {w.lower() for w in s} & ({n.lower() for n in NAMES} | set(LOCATIONS)), s
    return moves, questions


@pytest.mark.parametrize("S,K,F,P,Q,seed", [(2, 2, 1, 1, 1, 0), (6, 4, 4, 2, 2, 1), (9, 3, 8, 4, 3, 2),
                                            (40, 4, 4, 2, 1, 3)])
def test_answer_is_the_latest_location_by_rereading_the_text(S, K, F, P, Q, seed):
    b = qa1_single_fact(8, S, K, F, P, Q, seed)
    n = b.segment_size
    assert b.input_ids.shape == (8, S * n) and n == 6 * K
    overwrites = 0
    for i in range(8):
        segs = [VOCAB.decode(b.input_ids[i, s * n:(s + 1) * n].tolist()) for s in range(S)]
        body_moves = []
        for s, text in enumerate(segs[:-1]):
            moves, questions = _reread(text)
            assert not questions and len(moves) <= 1           # at most one fact per segment, no question
            body_moves += moves
        last_moves, questions = _reread(segs[-1])
        assert not last_moves and len(questions) == Q           # the question segment holds no fact
        assert len(body_moves) == F and len({m[0] for m in body_moves}) <= P
        place: dict[str, str] = {}
        for name, where in body_moves:
            assert place.get(name) != where                     # every move goes somewhere new
            place[name] = where
        for q, (name, answer) in enumerate(questions):
            assert answer == place[name]                        # the latest location, nothing earlier
            assert VOCAB.describe(int(b.answers[i, q])) == answer and VOCAB.describe(int(b.keys[i, q])) == name
            assert int(b.input_ids[i, b.answer_pos[i, q]]) == int(b.labels[i, b.answer_pos[i, q]]) == int(b.answers[i, q])
            overwrites += sum(m[0] == name for m in body_moves) > 1
        assert int((b.labels[i] != -100).sum()) == Q
    if F > P:
        assert overwrites > 0                                   # some answers needed an overwrite


def test_deterministic_in_the_seed():
    a, b, c = (qa1_single_fact(4, 5, seed=s) for s in (7, 7, 8))
    for f in ("input_ids", "labels", "answers", "answer_pos", "keys", "distance", "fact_pos"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    assert not torch.equal(a.input_ids, c.input_ids)


def test_distance_points_at_the_latest_move():
    b = qa1_single_fact(16, 12, facts=5, people=3, questions=2, seed=4)
    n, S = b.segment_size, b.num_segments
    for i in range(16):
        for q in range(2):
            seg = S - 1 - int(b.distance[i, q])
            moves, _ = _reread(VOCAB.decode(b.input_ids[i, seg * n:(seg + 1) * n].tolist()))
            assert moves == [(VOCAB.describe(int(b.keys[i, q])), VOCAB.describe(int(b.answers[i, q])))]


def test_tokenizer_round_trip_and_unknown_words():
    text = "Mary went to the kitchen. The old clock ticked slowly. So where is Mary kitchen. Where is John? Office."
    ids = VOCAB.encode(text)
    assert VOCAB.decode(ids) == text and len(ids) == 24
    assert [VOCAB.describe(i) for i in ids[:6]] == ["Mary", "went", "to", "the", "kitchen", "."]
    b = qa1_single_fact(2, 5, seed=0)
    assert VOCAB.encode(VOCAB.decode(b.input_ids[1].tolist())) == b.input_ids[1].tolist()
    with pytest.raises(ValueError, match=r"unknown word 'Bob'.*StoryVocab\(\)\.words"):
        VOCAB.encode("Bob went to the kitchen.")
    assert tasks.qa1_single_fact is qa1_single_fact and tasks.StoryVocab is stories.StoryVocab


@pytest.mark.parametrize("kw,match", [(dict(num_segments=1), "num_segments"),
                                      (dict(num_segments=4, facts=4), r"facts \(4\) must be at most num_segments - 1 = 3"),
                                      (dict(num_segments=4, sentences_per_segment=4, questions=5), r"questions must be an int in \[1, 4\]"),
                                      (dict(num_segments=4, people=9), "people"),
                                      (dict(num_segments=4, sentences_per_segment=0), "sentences_per_segment"),
                                      (dict(num_segments=4, batch_size=0), "batch_size")])
def test_generator_rejects_bad_arguments(kw, match):
    args = dict(batch_size=2, num_segments=4, facts=2)
    with pytest.raises(ValueError, match=match):
        qa1_single_fact(**{**args, **kw})


def _recorded():
    return json.loads((CKPT / "eval.json").read_text()), json.loads((CKPT / "train_log.json").read_text())


def test_checkpoint_is_small_and_its_accuracy_reproduces():
    assert (CKPT / "model.safetensors").stat().st_size < 10 * 2**20
    model = diaglab.ARMT.from_pretrained(CKPT)
    recorded, log = _recorded()
    cfg = log["config"]
    assert recorded["training_segments"] == cfg["max_segments"] and model.config.segment_size == 6 * cfg["sentences"]
    first = recorded["by_length"][0]
    fresh = babilong.accuracy(model, cfg, cfg["max_segments"], 64, seed=123_456_789)   # seeds no run used
    assert abs(fresh - first["accuracy"]) <= 0.12
    assert fresh > 3 * VOCAB.chance                              # the memory is doing the work
    zeroed = babilong.stories(cfg, 64, cfg["max_segments"], seed=123_456_789)
    acc0 = float((train.predict(model, zeroed, memory=False) == zeroed.answers).float().mean())
    assert acc0 < 0.4                                            # chance 1/6 within noise


def test_diagonal_equals_sequential_on_the_checkpoint():
    model = diaglab.ARMT.from_pretrained(CKPT)
    cfg = _recorded()[1]["config"]
    batch = babilong.stories(cfg, 16, 2 * cfg["max_segments"], seed=555, questions=2)
    ex = diaglab.DiagonalExecutor(model)
    with torch.no_grad():
        seq, diag = model(batch.input_ids, keep_logits="last_segment"), ex(batch.input_ids, keep_logits="last_segment")
    assert torch.equal(train.answer_logits(seq.logits, batch).argmax(-1), train.answer_logits(diag.logits, batch).argmax(-1))
    scale = float(seq.state.W_mem.abs().max())
    assert scale > 0 and torch.allclose(seq.state.W_mem, diag.state.W_mem, rtol=1e-4, atol=1e-4 * scale)
    assert torch.allclose(seq.state.z, diag.state.z, rtol=1e-4, atol=1e-4 * float(seq.state.z.abs().max()))


def test_recorded_eval_covers_16x_and_matches_between_orders():
    recorded, _ = _recorded()
    rows = recorded["by_length"]
    assert [r["segments"] for r in rows] == [f * recorded["training_segments"] for f in (1, 2, 4, 8, 16, 32)]
    assert recorded["diagonal_equals_sequential"] and all(r["diagonal_equals_sequential"] for r in rows)
    assert all(abs(r["accuracy_zeroed"] - recorded["chance"]) < 0.1 for r in rows)
    table = babilong.format_table(recorded)
    assert str(rows[-1]["tokens"]) in table and "memory zeroed" in table


def test_evaluate_layout_on_a_fresh_model():
    cfg = babilong.StoryTrainConfig(layers=1, hidden=32, max_segments=3, facts=2)
    res = babilong.evaluate(babilong.build_model(cfg), asdict(cfg), factors=(1, 2), samples=4, batch_size=3)
    assert [(r["segments"], r["tokens"]) for r in res["by_length"]] == [(3, 36), (6, 72)]   # 12 tokens a segment
    assert res["predictions_compared"] == 8 and res["training_tokens"] == 36
    assert list(viz.accuracy_by_length_figure(res).data[0].x) == [36, 72]
    assert [list(d.y) for d in viz.babilong_timing_figure(res).data] == [
        [r["sequential_seconds"] for r in res["by_length"]], [r["diagonal_seconds"] for r in res["by_length"]]]


@pytest.mark.parametrize("argv,match", [(["--facts", "0"], "facts must be an int in [1, 1000000], got 0"),
                                        (["--max-segments", "3", "--facts", "4"], "facts (4) must be at most"),
                                        (["--samples", "0", "--eval", "data/babilong"], "samples (--samples) must be an int in [1, 1000000], got 0"),
                                        (["--eval", "/nonexistent/dir"], "--eval /nonexistent/dir: no such directory; give a checkpoint directory written by diaglab.babilong, e.g. data/babilong"),
                                        (["--init-from", "data/babilong", "--sentences", "3"], "the model's shape comes from the checkpoint"),
                                        (["--eval-batch", "0", "--eval", "data/babilong"], "--eval-batch must be"),
                                        (["--layers", "two"], "invalid int value: 'two'"),
                                        (["--hidden", "30", "--heads", "4"], "hidden (30) must be divisible by heads"),
                                        (["--hidden", "6", "--heads", "2", "--kv-heads", "1"], "head size"),
                                        (["--d-mem", "1"], "the memory settings make no ARMTConfig"),
                                        (["--lr", "nan"], "lr (--lr) must be a finite number > 0"),
                                        (["--minutes", "-1"], "minutes (--minutes) must be a finite number >= 0"),
                                        (["--promote-at", "2"], "promote_at (--promote-at) is an accuracy"),
                                        (["--bogus"], "unrecognized arguments: --bogus")])
def test_cli_errors_are_one_line_with_exit_status_2(argv, match, capsys):
    assert match in cli_error(babilong.main, argv, capsys, "python -m diaglab.babilong")


def test_cli_error_has_no_traceback():
    assert cli_error_in_a_process("diaglab.babilong", ["--people", "-1"], "python -m diaglab.babilong") == \
        "python -m diaglab.babilong: error: people must be an int in [1, 1000000], got -1 (--help lists every flag)"


def test_abbreviated_flags_are_refused_as_in_diaglab_train():
    """allow_abbrev=False in both training command lines: '--hid 32' is a typo, not --hidden."""
    for module in (babilong, train):
        with pytest.raises(SystemExit):
            module.parse_args(["--hid", "32"])


def test_documented_commands_are_the_recorded_training_configs():
    doc = babilong.__doc__.replace("\\\n", " ")
    commands = [line.split("python -m diaglab.babilong", 1)[1].split() for line in doc.splitlines()
                if "python -m diaglab.babilong --out" in line]
    assert len(commands) == 2                                   # stage 1, stage 2
    log = train.read_log(CKPT)                                  # the shipped log says mem_tokens: read as num_mem_tokens
    paths = ("out", "init_from", "force_overwrite")             # where a run writes, and whether it may replace
    for argv, recorded in zip(commands, (log["init_from_log"]["config"], log["config"])):
        documented = asdict(babilong.StoryTrainConfig(**{k: v for k, v in vars(babilong.parse_args(argv)).items()
                                                         if k in babilong.StoryTrainConfig.__dataclass_fields__}))
        assert {k: v for k, v in documented.items() if k not in paths} == \
               {k: v for k, v in recorded.items() if k not in paths}


# ---- training, saving and the degenerate arguments -------------------------------------------

@pytest.fixture
def one_thread(threads_kept):
    """The tests below train: on one thread, and the session's thread count restored after."""
    torch.set_num_threads(1)


def _tiny(out, **kw) -> babilong.StoryTrainConfig:
    return babilong.StoryTrainConfig(**{**dict(out=str(out), layers=1, hidden=32, heads=2, kv_heads=1, sentences=1,
                                               num_mem_tokens=2, d_mem=8, facts=1, people=1, questions=1,
                                               max_segments=2, start_segments=2, steps=1, batch=2, warmup=1,
                                               eval_every=1, eval_samples=2, progress=False), **kw})


def test_continuing_into_the_same_directory_keeps_one_earlier_stage(tmp_path, one_thread):
    d = tmp_path / "run"
    babilong.train(_tiny(d))
    babilong.train(_tiny(d, init_from=str(d), steps=2, force_overwrite=True))
    record = json.loads((d / "train_log.json").read_text())
    assert [e["step"] for e in record["log"]] == [1, 2]                       # the current stage
    earlier = record["init_from_log"]
    assert [e["step"] for e in earlier["log"]] == [1] and earlier["config"]["steps"] == 1
    assert "init_from_log" not in earlier                                     # exactly one earlier stage


def test_training_never_replaces_the_shipped_checkpoint_by_default(tmp_path, monkeypatch, capsys):
    default = babilong.StoryTrainConfig().out
    assert default.startswith("runs/babilong-") and not Path(default).is_absolute()
    before = {p.name: p.stat().st_mtime_ns for p in CKPT.iterdir()}
    for name in ("build_model", "_train", "run_eval"):
        monkeypatch.setattr(babilong, name, no_work)
    err = cli_error(babilong.main, ["--out", CKPT, "--steps", "1"], capsys, "python -m diaglab.babilong")
    assert "already holds a checkpoint" in err and "--force-overwrite" in err
    with pytest.raises(FileExistsError, match="--force-overwrite"):
        babilong.train(_tiny(CKPT))
    babilong.preflight(_tiny(CKPT, force_overwrite=True))                    # explicit: allowed (not run here)
    ck = tmp_path / "ck"
    live_model().save_pretrained(ck)
    (ck / "sub").mkdir()
    monkeypatch.chdir(ck / "sub")   # replacing ck would strand the process: refused before training
    err = cli_error(babilong.main, ["--out", "..", "--force-overwrite", "--steps", "1"], capsys,
                    "python -m diaglab.babilong")
    assert "holds the working directory" in err
    assert {p.name: p.stat().st_mtime_ns for p in CKPT.iterdir()} == before
    assert babilong.parse_args(["--force-overwrite"]).force_overwrite is True


def test_init_from_records_the_checkpoints_shape(tmp_path, monkeypatch, one_thread):
    first = _tiny(tmp_path / "a")
    babilong.save(babilong.build_model(first), first, [])
    monkeypatch.setattr(babilong, "run_eval", lambda *a, **k: {})
    monkeypatch.setattr(babilong, "format_table", lambda res: "")
    babilong.main(["--init-from", first.out, "--out", str(tmp_path / "b"), "--steps", "1", "--batch", "2",
                   "--warmup", "1", "--eval-samples", "2", "--facts", "1", "--people", "1", "--questions", "1",
                   "--max-segments", "2", "--no-progress"])
    config = json.loads((tmp_path / "b" / "train_log.json").read_text())["config"]
    shape = {k: config[k] for k in babilong.SHAPE_FIELDS}
    assert shape == dict(layers=1, hidden=32, heads=2, kv_heads=1, sentences=1, num_mem_tokens=2, d_mem=8)
    assert "mem_tokens" not in config and babilong.parse_args(["--mem-tokens", "3"]).num_mem_tokens == 3
    with pytest.raises(ValueError, match=r"layers \(--layers\) is 2 but the checkpoint .* has 1"):
        babilong.train(_tiny(tmp_path / "c", init_from=first.out, layers=2))   # a library call: refused
    assert babilong.StoryTrainConfig.continuing(first.out, out=str(tmp_path / "c"), questions=1).hidden == 32
    assert babilong.checkpoint_config(CKPT)["num_mem_tokens"] == 8           # an old log, written with mem_tokens


def test_evaluate_refuses_degenerate_arguments_and_keeps_the_mode():
    cfg = babilong.StoryTrainConfig(layers=1, hidden=32, max_segments=3, facts=2)
    model = babilong.build_model(cfg).train()
    with pytest.raises(ValueError, match="factors must be a non-empty tuple"):
        babilong.evaluate(model, cfg, factors=())
    with pytest.raises(ValueError, match=r"factors\[1\] must be an int >= 1, got 0"):
        babilong.evaluate(model, cfg, factors=(1, 0))
    with pytest.raises(TypeError, match="cfg must be a StoryTrainConfig or a dict"):
        babilong.evaluate(model, "data/babilong")
    res = babilong.evaluate(model, cfg, factors=(1,), samples=2, batch_size=2)   # the config object itself
    assert res["training_segments"] == 3 and model.training                      # the caller's mode, restored
    assert babilong.evaluate(model.eval(), asdict(cfg), factors=(1,), samples=2)["by_length"] and not model.training


def test_train_restores_the_thread_count(tmp_path, one_thread):
    torch.set_num_threads(2)
    babilong.train(_tiny(tmp_path / "run", threads=1))
    assert torch.get_num_threads() == 2


def test_one_seed_and_one_vocabulary_index():
    assert stories.SAMPLES_SEED is tasks.SAMPLES_SEED and babilong.EVAL_SEED is train.EVAL_SEED
    assert VOCAB._index is VOCAB._index and VOCAB.ids(["Mary", "kitchen"]) == VOCAB.encode("Mary kitchen")
