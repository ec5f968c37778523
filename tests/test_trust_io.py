"""Issue 11, input/output: no silently wrong answer, no lost checkpoint.

Checkpoints survive a save that fails at any stage and load only what they can load
faithfully; misspelled or degenerate arguments are refused with the name of the
argument; the train CLI rejects bad values before any work (exit 2, one line)."""

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import assert_cli_error, cli_error, cli_error_in_a_process, live_model, no_work

import diaglab
from diaglab import checkpoint, schedule, train

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "data" / "recall"


def tensors_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_tensors(model, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype, k
        assert torch.equal(got[k], v), k


# ---- point 4: checkpoints ---------------------------------------------------------------

def _partial_write_then_fail():
    """A writer that leaves half a file behind, then fails (a full disk, a killed process)."""
    def fail(*args, **kwargs):
        target = next(a for a in (*args, *kwargs.values()) if isinstance(a, (str, os.PathLike)) or hasattr(a, "write"))
        if hasattr(target, "write"):
            target.write("{")
        else:
            Path(target).write_bytes(b"half a file")
        raise OSError("no space left on device (simulated)")
    return fail


def _fail_on_rename(n: int):
    """os.rename that fails on its n-th call (1-based) and works otherwise."""
    real, calls = os.rename, []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == n:
            raise OSError(f"rename {len(calls)} failed (simulated)")
        return real(src, dst)
    return rename


@pytest.mark.parametrize("stage", ["weights", "armt_config", "base_config", "move_old_aside", "move_new_in"])
def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, stage):
    """Save A, then fail while saving B over it: A loads unchanged, with the other files of
    its directory, and no temporary directory is left next to it."""
    path = tmp_path / "ckpt"
    a = live_model(seed=5)
    a.save_pretrained(path)
    (path / "train_log.json").write_text('{"log": []}')
    expected = tensors_of(a)
    b = live_model(seed=6)
    if stage == "weights":
        monkeypatch.setattr(checkpoint, "save_file", _partial_write_then_fail())
    elif stage == "armt_config":
        monkeypatch.setattr(json, "dump", _partial_write_then_fail())
    elif stage == "base_config":
        monkeypatch.setattr(type(b.base.config), "to_json_file", lambda self, p, *a, **k: _partial_write_then_fail()(p))
    else:
        monkeypatch.setattr(os, "rename", _fail_on_rename(1 if stage == "move_old_aside" else 2))
    with pytest.raises(OSError, match="simulated"):
        b.save_pretrained(path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert_same_tensors(diaglab.ARMT.from_pretrained(path), expected)
    assert (path / "train_log.json").read_text() == '{"log": []}'


def test_a_save_replaces_the_checkpoint_and_keeps_its_other_files(tmp_path):
    path = tmp_path / "ckpt"
    live_model(seed=5).save_pretrained(path)
    (path / "eval.json").write_text("{}")
    path.chmod(0o751)
    b = live_model(seed=6)
    b.save_pretrained(path)
    assert path.stat().st_mode & 0o777 == 0o751
    assert_same_tensors(diaglab.ARMT.from_pretrained(path), tensors_of(b))
    assert sorted(p.name for p in path.iterdir()) == ["armt_config.json", "base_config.json", "eval.json",
                                                     "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_save_refuses_to_replace_what_is_not_a_checkpoint(tmp_path):
    """save_pretrained(some_project_dir) must not swap the project away."""
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="no diaglab checkpoint"):
        live_model().save_pretrained(tmp_path)
    with pytest.raises(FileExistsError, match="is a file"):
        live_model().save_pretrained(tmp_path / "notes.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("name", ["armt_config.json", "model.safetensors", "../x.json", "sub/x.json", ""])
def test_save_refuses_an_extra_file_that_is_no_plain_name_beside_the_weights(tmp_path, name):
    """checkpoint.save(extra=...) writes files beside the weights: never over them, never elsewhere."""
    from diaglab import checkpoint
    with pytest.raises(ValueError, match="plain file name"):
        checkpoint.save(live_model(), tmp_path / "ck", extra={name: lambda p: p.write_text("{}")})
    assert not any(tmp_path.iterdir())


def test_save_through_a_symlink_and_not_over_the_working_directory(tmp_path, monkeypatch):
    live_model(seed=5).save_pretrained(tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    b = live_model(seed=6)
    b.save_pretrained(tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    assert_same_tensors(diaglab.ARMT.from_pretrained(tmp_path / "real"), tensors_of(b))
    monkeypatch.chdir(tmp_path / "real")
    with pytest.raises(ValueError, match="is or holds the working directory"):
        b.save_pretrained(".")
    (tmp_path / "real" / "notes").mkdir()
    monkeypatch.chdir(tmp_path / "real" / "notes")              # inside the checkpoint: refused too
    with pytest.raises(ValueError, match="is or holds the working directory"):
        b.save_pretrained(tmp_path / "real")


@pytest.mark.parametrize("device", [None, "meta", "cpu"])   # a move to a device happens inside load too
def test_a_model_loaded_under_inference_mode_can_be_trained(tmp_path, device):
    live_model(seed=5).save_pretrained(tmp_path / "ck")
    with torch.inference_mode():
        moved = diaglab.ARMT.from_pretrained(tmp_path / "ck", device=device)
    assert not any(t.is_inference() for t in [*moved.parameters(), *moved.buffers()])
    if device == "meta":
        return
    model = moved
    model(torch.randint(0, 256, (1, 12)), labels=torch.randint(0, 256, (1, 12))).loss.backward()
    assert all(p.grad is not None for p in model.base.model.layers[0].parameters())


def _edit_meta(path: Path, edit) -> None:
    meta = json.loads((path / "armt_config.json").read_text())
    edit(meta)
    (path / "armt_config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(format="diaglab-armt-2"), "newer diaglab.*version 2.*upgrade"),
    (lambda m: m.update(format="other-model-1"), "not a diaglab checkpoint"),
    (lambda m: m.pop("format"), "not a diaglab checkpoint"),
    (lambda m: m["armt"].pop("segment_size"), "'segment_size' is missing"),
    (lambda m: m["armt"].update(segment_sise=16), "unknown ARMTConfig field 'segment_sise'.*'segment_size'"),
    (lambda m: m.pop("dtype"), "required field 'dtype'"),
    (lambda m: m.update(quantized=True), "unknown field 'quantized'"),
])
def test_load_refuses_what_it_cannot_read(tmp_path, edit, match):
    path = tmp_path / "ckpt"
    live_model().save_pretrained(path)
    _edit_meta(path, edit)
    with pytest.raises(ValueError, match=match):
        diaglab.ARMT.from_pretrained(path)


def test_load_refuses_missing_files_and_mismatched_weights(tmp_path):
    path = tmp_path / "ckpt"
    live_model(layers=2).save_pretrained(path)
    (path / "base_config.json").rename(tmp_path / "base.json")
    with pytest.raises(FileNotFoundError, match="base_config.json is missing"):
        diaglab.ARMT.from_pretrained(path)
    (tmp_path / "base.json").rename(path / "base_config.json")
    tensors = safetensors.torch.load_file(path / "model.safetensors")
    del tensors["assoc.1.W_mq.weight"]
    safetensors.torch.save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match="lacks 'assoc.1.W_mq.weight'"):
        diaglab.ARMT.from_pretrained(path)
    (path / "model.safetensors").write_bytes(b"half a file")
    with pytest.raises(ValueError, match="cannot be read .* damaged"):
        diaglab.ARMT.from_pretrained(path)


def test_the_shipped_checkpoint_loads():
    model = diaglab.ARMT.from_pretrained(SHIPPED)
    assert model.config.segment_size == 16 and model.dtype == torch.float32


def test_each_part_comes_back_in_its_own_dtype(tmp_path):
    """A bfloat16 base with float32 memory tokens and associative layers, and tied embeddings
    (test_armt checks that a uniformly bfloat16 model gives the same logits after loading)."""
    model = live_model(seed=5, tie_word_embeddings=True)
    model.base.to(torch.bfloat16)
    assert model.memory.dtype == model.assoc[0].W_mq.weight.dtype == torch.float32
    expected = tensors_of(model)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = diaglab.ARMT.from_pretrained(tmp_path / "ckpt")
    assert_same_tensors(loaded, expected)
    assert loaded.base.lm_head.weight is loaded.base.model.embed_tokens.weight


def test_loading_gives_eval_mode_and_leaves_the_global_rng_alone(tmp_path):
    live_model(seed=5).save_pretrained(tmp_path / "ckpt")
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    loaded = diaglab.ARMT.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(torch.rand(4), expected)
    assert not loaded.training and not any(m.training for m in loaded.modules())


# ---- point 6: arguments -----------------------------------------------------------------

@pytest.mark.parametrize("build, match", [
    (lambda: diaglab.tiny_armt(num_mem_token=2), "'num_mem_token'.*did you mean 'num_mem_tokens'"),
    (lambda: diaglab.from_preset("tiny", segment_sise=16), "'segment_sise'.*did you mean 'segment_size'"),
    (lambda: diaglab.tiny_armt(initializer_rang=0.1), "'initializer_rang'.*did you mean 'initializer_range'"),
    (lambda: diaglab.tiny_armt(hidden_size=64), "hidden_size is set from the argument hidden"),
])
def test_misspelled_keywords_are_named(build, match):
    with pytest.raises(TypeError, match=match):
        build()


def test_real_llama_fields_and_preset_keywords_pass():
    model = diaglab.tiny_armt(layers=1, attention_bias=True, rms_norm_eps=1e-5, rope_theta=500000.0)
    assert model.base.config.attention_bias and model.base.config.rms_norm_eps == 1e-5


@pytest.mark.parametrize("kw, name", [
    (dict(layers=0), "layers"), (dict(heads=0), "heads"), (dict(kv_heads=0), "kv_heads"),
    (dict(hidden=0), "hidden"), (dict(vocab=-1), "vocab"), (dict(intermediate=0), "intermediate"),
    (dict(layers=True), "layers"), (dict(hidden=128.0), "hidden"),
    (dict(tie_word_embeddings=1), "tie_word_embeddings"), (dict(llama3_rope="yes"), "llama3_rope"),
    (dict(correction="no"), "correction"), (dict(normalize_keys=1), "normalize_keys"),
])
def test_degenerate_sizes_and_non_bool_flags_are_named(kw, name):
    with pytest.raises(ValueError, match=f"^{name} must be"):
        diaglab.tiny_armt(**kw)


def test_stats_refuses_a_schedule_of_another_grid():
    with pytest.raises(ValueError, match="layer 2, outside L = 2"):
        schedule.stats(schedule.diagonal(4, 8), 2)
    with pytest.raises(ValueError, match="uses 2 of L = 4 layers"):
        schedule.stats(schedule.diagonal(2, 8), 4)
    with pytest.raises(ValueError, match="ints >= 0"):
        schedule.stats([[(0, -1)]], 1)
    with pytest.raises(ValueError, match="runs twice"):
        schedule.stats([[(0, 0)], [(0, 0)]], 1)
    assert schedule.stats(schedule.ring(2, [2, 1]), 2).n_cells == 6


@pytest.mark.parametrize("t", [-1.0, math.nan, math.inf, "2 ms"])
def test_ideal_even_load_refuses_a_bad_time(t):
    with pytest.raises(ValueError, match="full_group_time must be a finite time >= 0"):
        schedule.ideal_even_load(t, 4, 8)


# ---- point 7: the train CLI ---------------------------------------------------------------

def _tiny(out, **kw) -> train.TrainConfig:
    return train.TrainConfig(**{**dict(out=str(out), layers=1, hidden=32, heads=2, kv_heads=1, segment_size=8,
                                       num_mem_tokens=2, d_mem=8, max_segments=3, steps=1, batch=2, warmup=1,
                                       eval_every=1, eval_samples=2, progress=False), **kw})


def run_cli(argv, monkeypatch, capsys) -> tuple[int, str]:
    """train.main(argv) with training, evaluation and model building replaced by a failure:
    a bad argument must stop the CLI before any of them."""
    for name in ("train", "run_eval", "build_model"):
        monkeypatch.setattr(train, name, no_work)
    with pytest.raises(SystemExit) as exit_:
        train.main([str(a) for a in argv])
    return exit_.value.code, capsys.readouterr().err


def assert_one_line_error(code, err, *needles):
    line = assert_cli_error(code, err, "python -m diaglab.train")
    for needle in needles:
        assert needle in line, (needle, line)


@pytest.mark.parametrize("argv, needle", [
    (["--max-segments", "0"], "max_segments (--max-segments) must be an int in [2, 1000000], got 0"),
    (["--start-segments", "1"], "--start-segments"),
    (["--segment-size", "0"], "--segment-size"),
    (["--batch", "0"], "--batch"),
    (["--layers", "0"], "--layers"),
    (["--threads", "0"], "--threads"),
    (["--eval-samples", "0"], "--eval-samples"),
    (["--steps", "-5"], "--steps"),
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--warmup", "-1"], "--warmup"),
    (["--minutes", "0"], "--minutes"),
    (["--task", "copy"], "--task"),
    (["--hidden", "30"], "hidden (30) must be divisible by heads (4)"),
    (["--heads", "4", "--kv-heads", "3"], "heads by kv_heads (3)"),
    (["--hidden", "6", "--heads", "2", "--kv-heads", "1"], "the head size (hidden 6 / heads 2 = 3) is odd"),
    (["--num-mem-tokens", "0"], "--num-mem-tokens"),
])
def test_cli_rejects_bad_values_before_any_work(tmp_path, monkeypatch, capsys, argv, needle):
    code, err = run_cli(["--out", tmp_path / "run", *argv], monkeypatch, capsys)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "run").exists()


def test_cli_eval_needs_a_checkpoint_with_its_log(tmp_path, monkeypatch, capsys):
    assert_one_line_error(*run_cli(["--eval", tmp_path / "missing"], monkeypatch, capsys), "no such directory")
    assert_one_line_error(*run_cli(["--eval", tmp_path], monkeypatch, capsys), "armt_config.json not found")
    live_model().save_pretrained(tmp_path / "bare")
    assert_one_line_error(*run_cli(["--eval", tmp_path / "bare"], monkeypatch, capsys), "train_log.json not found")
    assert_one_line_error(*run_cli(["--eval", SHIPPED, "--samples", "0"], monkeypatch, capsys), "--samples")
    assert_one_line_error(*run_cli(["--eval", SHIPPED, "--lr", "0.1"], monkeypatch, capsys),
                          "--lr does nothing with --eval")
    assert_one_line_error(*run_cli(["--out", tmp_path / "run", "--no-write"], monkeypatch, capsys),
                          "--no-write does nothing without --eval")


def test_cli_checks_the_output_path_before_training(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("x")
    assert_one_line_error(*run_cli(["--out", tmp_path / "file"], monkeypatch, capsys), "is a file")
    assert_one_line_error(*run_cli(["--out", tmp_path / "file" / "run"], monkeypatch, capsys), "is a file")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    assert_one_line_error(*run_cli(["--out", tmp_path / "notes"], monkeypatch, capsys), "non-empty directory")
    ck = tmp_path / "ck"
    live_model().save_pretrained(ck)
    (ck / "sub").mkdir()
    monkeypatch.chdir(ck / "sub")   # replacing ck would leave the process in a deleted directory: refused now,
    assert_one_line_error(*run_cli(["--out", "..", "--force-overwrite"], monkeypatch, capsys),   # not after training
                          "holds the working directory")
    monkeypatch.chdir(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked)   # root may write anywhere: simulate
    assert_one_line_error(*run_cli(["--out", locked / "run"], monkeypatch, capsys), "not writable")


def test_training_never_replaces_the_shipped_checkpoint_by_default(tmp_path, monkeypatch, capsys):
    assert not Path(train.TrainConfig().out).is_absolute() and train.TrainConfig().out.startswith("runs/recall-")
    assert_one_line_error(*run_cli(["--out", SHIPPED, "--steps", "1"], monkeypatch, capsys),
                          "already holds a checkpoint", "--force-overwrite")
    monkeypatch.undo()
    monkeypatch.setattr(train, "build_model", no_work)
    with pytest.raises(FileExistsError, match="--force-overwrite"):
        train.train(_tiny(SHIPPED))
    train.preflight(_tiny(SHIPPED, force_overwrite=True))   # explicit: allowed (not run here)


def test_init_from_must_match_the_checkpoint(tmp_path, monkeypatch, capsys):
    first = _tiny(tmp_path / "a")
    train.save(train.build_model(first), first, [])
    code, err = run_cli(["--init-from", first.out, "--segment-size", "16", "--out", tmp_path / "b"],
                        monkeypatch, capsys)
    assert_one_line_error(code, err, "segment_size (--segment-size) is 16 but the checkpoint", "has 8")
    monkeypatch.undo()
    monkeypatch.setattr(train, "make_batch", no_work)
    with pytest.raises(ValueError, match="segment_size .* is 16 but the checkpoint"):
        train.train(_tiny(tmp_path / "b", init_from=first.out, segment_size=16))
    (tmp_path / "a" / "train_log.json").unlink()
    with pytest.raises(FileNotFoundError, match="train_log.json not found"):
        train.train(_tiny(tmp_path / "b", init_from=first.out))
    # shape flags left out come from the checkpoint
    args = train.parse_args(["--init-from", str(tmp_path / "x"), "--task", "mix"])
    assert not hasattr(args, "segment_size") and args.task == "mix"


@pytest.mark.parametrize("fail", [False, True])
def test_train_restores_the_thread_count(tmp_path, monkeypatch, fail):
    before = torch.get_num_threads()
    cfg = _tiny(tmp_path / "run", threads=before + 1)
    if fail:
        monkeypatch.setattr(train, "make_batch", no_work)
    try:
        if fail:
            with pytest.raises(AssertionError, match="work started"):
                train.train(cfg)
        else:
            train.train(cfg)
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


def test_num_mem_tokens_everywhere_and_old_logs_still_read():
    assert train.TrainConfig(num_mem_tokens=3).num_mem_tokens == 3
    assert train.parse_args(["--num-mem-tokens", "8"]).num_mem_tokens == 8
    assert train.parse_args(["--mem-tokens", "8"]).num_mem_tokens == 8        # the old flag
    config = train.read_log(SHIPPED)["config"]                                # written with mem_tokens
    assert config["num_mem_tokens"] == 4 and "mem_tokens" not in config


def test_cli_error_in_a_real_process(tmp_path):
    line = cli_error_in_a_process("diaglab.train", ["--steps", "0", "--out", tmp_path / "r"], "python -m diaglab.train")
    assert "--steps" in line


def test_a_training_save_replaces_weights_and_logs_together(tmp_path, monkeypatch):
    """train.save writes the weights, samples.json and train_log.json into one staging
    directory: a failure while writing the samples leaves the previous weights AND logs; a
    successful save drops an eval.json that described the previous weights."""
    cfg = train.TrainConfig(layers=1, hidden=32, heads=2, kv_heads=1, segment_size=8, num_mem_tokens=2,
                            max_segments=3, out=str(tmp_path / "run"))
    first = train.build_model(cfg)
    train.save(first, cfg, [{"step": 1}])
    (tmp_path / "run" / "eval.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    second = train.build_model(dataclasses.replace(cfg, seed=5))

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(train, "save_samples", broken)
    with pytest.raises(OSError, match="disk full"):
        train.save(second, cfg, [{"step": 2}])
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before   # nothing replaced
    monkeypatch.undo()
    train.save(second, cfg, [{"step": 2}])
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert "eval.json" not in names and {"samples.json", "train_log.json", "model.safetensors"} <= names
    assert train.read_log(str(tmp_path / "run"))["log"] == [{"step": 2}]


@pytest.mark.parametrize("device", [torch.bfloat16, "bogus", 3.5])
def test_load_refuses_a_device_that_is_not_one(tmp_path, device):
    """checkpoint.load(device=...) takes a device only: a dtype was applied as a silent cast."""
    model = diaglab.tiny_armt(layers=1)
    model.save_pretrained(tmp_path / "ck")
    with pytest.raises(ValueError, match="device must be"):
        diaglab.ARMT.from_pretrained(tmp_path / "ck", device=device)


@pytest.mark.parametrize("args", [(6, 0, 1), (8, 2, 0), (8, 2, 1, 0), (8, 2, 1, -2), (8.0, 2, 1)])
def test_check_heads_names_a_bad_size(args):
    from diaglab.presets import check_heads
    with pytest.raises(ValueError, match="must be an int"):
        check_heads(*args)


@pytest.mark.parametrize("module, argv", [
    ("diaglab.train", ["--layers", "100000000000"]), ("diaglab.train", ["--threads", "100000000"]),
    ("diaglab.train", ["--layers", "100000", "--hidden", "4096", "--heads", "32", "--kv-heads", "8"]),
    ("diaglab.babilong", ["--hidden", "4000000000", "--heads", "2", "--kv-heads", "2"]),
])
def test_training_clis_refuse_sizes_no_machine_holds(module, argv):
    """In a fresh process (they hung or crashed the allocator): a count beyond MAX_COUNT or the
    threads beyond MAX_THREADS by its bound, a model too big for this machine by its memory."""
    err = cli_error_in_a_process(module, argv, f"python -m {module}")
    big_model = argv[:2] == ["--layers", "100000"]
    assert ("GiB to train" in err) if big_model else ("must be an int in [1, 1000000]" in err or
                                                      "must be an int in [1, 4096]" in err)


@pytest.mark.parametrize("module, argv, match", [
    ("train", ["--layers", "100000000000"], "layers (--layers) must be an int in [1, 1000000], got 100000000000"),
    ("train", ["--seed", "18446744073709551616"], "seed (--seed) must be an int in [0, 4294967295]"),
    ("train", ["--num-mem-tokens", "100000000000"], "num_mem_tokens (--num-mem-tokens) must be an int in [1, 1000000]"),
    ("train", ["--segment-size", "1000000000000"], "segment_size (--segment-size) must be an int in [1, 1000000]"),
    ("train", ["--fillers", "1000000000000"], "fillers (--fillers) must be an int in [1, 1000000]"),
    ("train", ["--eval", str(SHIPPED), "--no-write", "--threads", "3000000000"],
     "threads (--threads) must be an int in [1, 4096]"),
    ("train", ["--eval", str(SHIPPED), "--no-write", "--samples", "100000000000000"],
     "samples (--samples) must be an int in [1, 1000000]"),
    ("babilong", ["--sentences", "100000000000"], "sentences must be an int in [1, 1000000]"),
    ("babilong", ["--batch", "100000000000"], "batch must be an int in [1, 1000000]"),
    ("babilong", ["--seed", "18446744073709551616"], "seed must be an int in [0, 4294967295]"),
    ("babilong", ["--eval", str(ROOT / "data" / "babilong"), "--no-write", "--samples", "100000000000000"],
     "samples (--samples) must be an int in [1, 1000000]"),
])
def test_training_clis_bound_every_count_in_one_line(module, argv, match, monkeypatch, capsys):
    """A typo's extra digits in any count or the seed: one line, exit 2, before any work (they
    overflowed in torch or crashed the allocator, with --eval too)."""
    from diaglab import babilong
    mod = {"train": train, "babilong": babilong}[module]
    for name in ("train", "run_eval", "build_model"):
        monkeypatch.setattr(mod, name, no_work)
    assert match in cli_error(mod.main, argv, capsys, f"python -m diaglab.{module}")


def test_memory_estimate_counts_the_models_the_clis_build():
    """check_model_shape's per-layer parameter count is that of the models both training
    commands build (their MLP is mlp_width(hidden) wide, not 4 x hidden): within 1 % of the real
    count (norms and W_mb's bias are left out)."""
    from diaglab import babilong
    for hidden, heads, kv_heads, d_mem in ((64, 4, 2, 16), (128, 8, 2, 32)):
        shape = dict(hidden=hidden, heads=heads, kv_heads=kv_heads, d_mem=d_mem)
        for build, cfg in ((train.build_model, train.TrainConfig), (babilong.build_model, babilong.StoryTrainConfig)):
            count = [sum(p.numel() for p in build(cfg(layers=k, **shape)).parameters()) for k in (1, 2)]
            assert train.layer_parameters(hidden, heads, kv_heads, d_mem) == pytest.approx(count[1] - count[0], rel=0.01)


@pytest.mark.parametrize("module", ["train", "babilong"])
def test_training_clis_refuse_flags_eval_would_ignore_and_an_empty_eval(module, monkeypatch, capsys, tmp_path):
    """Both commands alike: with --eval a training flag is refused, without it an eval flag is,
    and --eval '' names no directory (it started a training run)."""
    from diaglab import babilong
    mod = {"train": train, "babilong": babilong}[module]
    for name in ("train", "run_eval", "build_model"):
        monkeypatch.setattr(mod, name, no_work)
    ck = SHIPPED if module == "train" else ROOT / "data" / "babilong"
    prog = f"python -m diaglab.{module}"
    assert "--steps does nothing with --eval" in cli_error(mod.main, ["--eval", ck, "--steps", "5"], capsys, prog)
    assert "--samples does nothing without --eval" in cli_error(mod.main, ["--samples", "3"], capsys, prog)
    assert "--no-write does nothing without --eval" in cli_error(mod.main, ["--no-write"], capsys, prog)
    assert "--eval needs a checkpoint directory" in cli_error(mod.main, ["--eval", ""], capsys, prog)


@pytest.mark.parametrize("module", ["train", "babilong"])
@pytest.mark.parametrize("log", ["{}", "[]", '{"config": 3}'])
def test_a_damaged_training_log_is_one_line(module, log, monkeypatch, capsys, tmp_path):
    """--eval and --init-from on a checkpoint whose train_log.json holds no config: one line
    naming the file (a KeyError or TypeError traceback before; train --init-from trained on)."""
    from diaglab import babilong
    mod = {"train": train, "babilong": babilong}[module]
    for name in ("train", "run_eval", "build_model"):
        monkeypatch.setattr(mod, name, no_work)
    ck = tmp_path / "ck"
    shutil.copytree(str(SHIPPED) if module == "train" else str(ROOT / "data" / "babilong"), ck)
    (ck / "train_log.json").write_text(log)
    prog = f"python -m diaglab.{module}"
    for argv in (["--eval", ck, "--no-write"], ["--init-from", ck, "--out", tmp_path / "run"]):
        assert "holds no training config" in cli_error(mod.main, argv, capsys, prog)


def test_babilong_eval_refuses_an_unwritable_checkpoint_before_evaluating(monkeypatch, capsys, tmp_path):
    """As diaglab.train --eval: eval.json could not be written, so the run is refused up front (it
    evaluated for minutes, then ended in an OSError traceback)."""
    from diaglab import babilong
    monkeypatch.setattr(babilong, "run_eval", no_work)
    ck = tmp_path / "ck"
    shutil.copytree(str(ROOT / "data" / "babilong"), ck)
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != ck)   # root may write anywhere: simulate
    assert "is not writable" in cli_error(babilong.main, ["--eval", ck], capsys, "python -m diaglab.babilong")


def test_every_command_line_refuses_abbreviated_flags(capsys):
    """OneLineParser refuses abbreviations (argparse took --pres for --preset), and the distributed
    worker answers a bad flag in one line too."""
    from diaglab import bench, distributed
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--pres", "small"])
    capsys.readouterr()
    assert "unrecognized arguments: --bogus" in cli_error(distributed.main, ["--bogus"], capsys,
                                                          "python -m diaglab.distributed")
