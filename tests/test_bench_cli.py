"""`python -m diaglab.bench` and scripts/merge_reports.py reject every bad value before
any work, the argparse way: exit code 2 and one line on stderr that names the flag, no
traceback. Measuring is stubbed to fail, so a value that slips through fails the test
instead of starting a benchmark."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli_error, cli_error_in_a_process, load_script

from diaglab import bench

ROOT = Path(__file__).resolve().parents[1]


def merge_main(argv):
    return load_script("merge_reports").main(argv)


@pytest.fixture
def rejected(monkeypatch, capsys):
    """rejected(main, argv) -> the one stderr line, after checking exit code 2 and that
    nothing was built or measured."""
    def no_work(*args, **kwargs):
        raise AssertionError("work started before the flags were checked")

    monkeypatch.setattr(bench, "live_preset", no_work)
    monkeypatch.setattr(bench, "run_bench", no_work)
    monkeypatch.setattr(bench, "read_rows", no_work)

    return lambda main, argv: cli_error(main, argv, capsys)


@pytest.mark.parametrize("argv, says", [
    (["--segments", "0"], "--segments: expected a comma list of integers >= 1"),
    (["--segments", "4,-1"], "--segments: expected a comma list of integers >= 1"),
    (["--segments", ""], "--segments: expected a comma list"),
    (["--segments", "1,,2"], "--segments: expected a comma list"),
    (["--lengths", "0"], "--lengths: expected a comma list of integers >= 1"),
    (["--lengths", "32,x"], "--lengths: expected a comma list"),
    (["--batch", "0"], "--batch: expected a comma list of integers >= 1"),
    (["--repeats", "0"], "--repeats: expected an integer >= 1"),
    (["--layers", "0"], "--layers: expected an integer >= 1"),
    (["--threads", "0"], "--threads: expected an integer >= 1"),
    (["--threads", "-2"], "--threads: expected an integer >= 1"),
    (["--full-max-tokens", "0"], "--full-max-tokens: expected an integer >= 1"),
    (["--warmup", "-1"], "--warmup: expected an integer >= 0"),
    (["--dtype", "float8"], "--dtype: choose from float32,bfloat16,float16"),
    (["--dtype", ""], "--dtype: choose from"),
    (["--modes", "diagonal,warp"], "--modes: choose from full,sequential"),
    (["--modes", ","], "--modes: choose from"),
    (["--preset", "huge"], "--preset: invalid choice: 'huge'"),
    (["--device", "tpu"], "--device: invalid choice: 'tpu'"),
    (["--heads", "5"], "--heads/--kv-heads: hidden (128) must be divisible by heads (5)"),
    (["--heads", "8", "--kv-heads", "3"], "and heads by kv_heads (3)"),
    (["--segments", "1", "--lengths", "32"], "not allowed with argument"),
])
def test_bad_flag_is_one_line_and_exit_code_2(rejected, argv, says):
    assert says in rejected(bench.main, argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the missing-CUDA message cannot be shown")
def test_missing_cuda_is_one_line_that_says_what_to_do(rejected):
    err = rejected(bench.main, ["--device", "cuda", "--segments", "1"])
    assert "--device: device 'cuda' asked for, but CUDA is not available here" in err
    assert "use device 'cpu', or install a CUDA build of torch" in err


def test_unwritable_outputs_are_rejected_before_measuring(rejected, tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a directory")
    assert "--json: " in rejected(bench.main, ["--json", str(tmp_path)])                 # a directory
    assert "is a directory" in rejected(bench.main, ["--json", str(tmp_path)])
    assert "--json: an empty path: give a file path" in rejected(bench.main, ["--json", ""])
    err = rejected(bench.main, ["--csv", str(a_file / "sub" / "rows.csv")])             # under a file
    assert err.startswith("python -m diaglab.bench: error: --csv: cannot write") and "writable" in err
    if sys.platform == "linux":                                                       # no new dirs in /proc
        assert "--html: cannot write" in rejected(bench.main, ["--html", "/proc/diaglab_bench/figure.html"])
    assert not list(tmp_path.glob("*.json"))


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write into a read-only directory")
def test_read_only_directory_is_rejected(rejected, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert "--json: cannot write" in rejected(bench.main, ["--json", str(locked / "rows.json")])


def test_merge_reports_rejects_an_empty_or_missing_list(rejected, tmp_path):
    assert "the following arguments are required: REPORT.json" in rejected(merge_main, [])
    assert "no such file" in rejected(merge_main, [str(tmp_path / "nope.json")])
    assert "no such file ''" in rejected(merge_main, [""])
    (tmp_path / "a.json").write_text("[]")
    assert "--json: " in rejected(merge_main, [str(tmp_path / "a.json"), "--json", str(tmp_path)])


def test_merge_reports_rejects_files_that_are_not_bench_rows(tmp_path, capsys):
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "other.json").write_text('[{"mode": "diagonal"}]')
    for name, says in (("broken.json", "Expecting property name"), ("other.json", "not a diaglab.bench JSON")):
        assert says in cli_error(merge_main, [tmp_path / name], capsys)


def test_every_flag_has_help():
    """--help describes every flag: no option without a help text."""
    parser = bench.build_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help"
    text = parser.format_help()
    for flag in ("--segments", "--lengths", "--warmup", "--heads", "--kv-heads", "--json", "--html", "--no-progress"):
        assert flag in text


def test_the_command_itself_prints_one_line():
    """The real entry point: exit code 2, one stderr line, no traceback, nothing on stdout."""
    assert cli_error_in_a_process("diaglab.bench", ["--segments", "0"]) == (
        "python -m diaglab.bench: error: argument --segments: expected a comma list of integers >= 1 like 1,4,16; "
        "got '0' (--help lists every flag)")


@pytest.mark.parametrize("argv, says", [
    (["--widths", "100", "--segments", "1"], "--widths: the head size (hidden 100 / heads 4 = 25) is odd"),
    (["--heads", "128", "--kv-heads", "1"], "--heads/--kv-heads: the head size (hidden 128 / heads 128 = 1) is odd"),
    (["--seed", "9" * 20], "--seed: expected an integer from 0 to 9223372036854775807; got '9999"),
    (["--segments", "9" * 20], "--segments: expected a comma list of integers from 1 to 1000000"),
    (["--layers", "9" * 23], "--layers: expected an integer from 1 to 1000000"),   # it hung, building the config
    (["--threads", "100000"], "--threads: expected an integer from 1 to 4096"),
    (["--segments", "1,1"], "--segments: 1 comes twice in '1,1': give each value once"),
    (["--lengths", "64,32,64"], "--lengths: 64 comes twice"),
    (["--batch", "2,2"], "--batch: 2 comes twice"),
    (["--widths", "128,128"], "--widths: 128 comes twice"),
    (["--dtype", "float32,float32"], "--dtype: float32 comes twice in 'float32,float32': give each name once"),
    (["--modes", "diagonal,diagonal"], "--modes: diagonal comes twice"),
    (["--queue", "2", "--batch", "2"], "--queue measures one queue of requests in its own modes"),
    (["--queue", "2", "--full-max-tokens", "64"], "drop --full-max-tokens"),
    (["--queue", "2", "--modes", ",".join(bench.MODES)], "drop --modes"),     # even the default, when given
    (["--queue", "2", "--segments", "2", "--batch", "1"], "drop --segments, --batch"),
    (["--queue", "2", "--lengths", "64"], "drop --lengths"),
    (["--queue", "2", "--widths", "64,128"], "drop --widths"),                # rows of one queue, one width
    (["--queue", "2", "--dtype", "float32,bfloat16"], "--queue measures one queue in one dtype"),
    (["--queue-segments", "2,4"], "--queue-segments shapes the requests of --queue R: add --queue"),
])
def test_hostile_flag_is_one_line_and_exit_code_2(rejected, argv, says):
    """Values past any real run, repeated list items and flags the run would ignore: one line,
    before any work (no traceback from deep in transformers, no hang)."""
    assert says in rejected(bench.main, argv)


def test_queue_segments_may_repeat_and_fill_in_with_queue():
    assert bench.parse_args(["--queue", "2", "--queue-segments", "3,3"]).queue_segments == [3, 3]
    args = bench.parse_args(["--queue", "2"])
    assert args.queue_segments == [2, 8] and args.modes == bench.MODES and args.batch == [1]
    args = bench.parse_args([])
    assert args.queue_segments is None and args.modes == bench.MODES and args.batch == [1]


def test_two_outputs_on_one_file_are_rejected(rejected, tmp_path):
    rows = tmp_path / "rows.json"
    err = rejected(bench.main, ["--json", str(rows), "--csv", str(tmp_path / "sub" / ".." / "rows.json")])
    assert "--json and --csv name the same file" in err and "give each its own path" in err
    report = tmp_path / "a.json"
    report.write_text("[]")
    assert "--csv and --html name the same file" in rejected(
        merge_main, [str(report), "--csv", str(rows), "--html", str(rows)])
    assert not rows.exists()


def dist_main(argv):
    return load_script("dist_bench").main(argv)


def test_step_costs_script_writes_its_figures(tmp_path, threads_kept):
    """scripts/step_costs.py (the figures behind the README's account of a step's fixed cost)."""
    out = load_script("step_costs").main(["--repeats", "1", "--calls", "2", "--threads", "1",
                                          "--json", str(tmp_path / "c.json")])
    L = out["layers"]
    assert set(out["ms"]) >= {"G=1", f"G={L}", "full, minimal widths", "full, alone",
                              "full, back to back (even_load_run)", "full, no inference mode"}
    assert json.loads((tmp_path / "c.json").read_text())["ms"] == out["ms"] and out["machine"]["cpu_capability"]
    # the ramps' floor at S = L, 4L, 16L, from the same step costs (schedule.ramps_over_ideal)
    ramps = out["ramps_over_ideal"]
    assert list(ramps) == [f"S={L}", f"S={4 * L}", f"S={16 * L}"]
    ms = out["ms"]
    assert ramps[f"S={4 * L}"]["measured"] == pytest.approx(
        (2 * sum(ms[f"G={G}"] for G in range(1, L)) + (3 * L + 1) * ms[f"G={L}"]) / (4 * L * ms[f"G={L}"]))
    launches, full = min(ms["full, minimal widths"], ms[f"G={L}"]), ms[f"G={L}"]
    assert ramps[f"S={L}"]["launches_only"] == pytest.approx(1 + (L - 1) * launches / (L * full))


def test_step_costs_script_refuses_bad_flags(rejected, tmp_path):
    for argv in (["--repeats", "0"], ["--threads", "0"], ["--preset", "llama_1b"], ["--preset", "huge"],
                 ["--json", str(tmp_path)], ["--json", ""]):
        rejected(load_script("step_costs").main, argv)


def test_executor_overhead_script_splits_each_call(tmp_path, monkeypatch, threads_kept):
    """scripts/executor_overhead.py (the executor's share of diagonal / ideal): with a step made
    5 ms slower, that time lands inside the steps and not between them, for the executor and for
    the ring (whose steps still run in inference mode: the script swaps the ring's name for the
    step too), and the wrappers are taken off again."""
    import time as _time

    import diaglab.diagonal as diagonal
    import diaglab.ring as ring
    real = diagonal.grouped_layer
    seen = []

    def slow(*args, **kwargs):
        seen.append(torch.is_inference_mode_enabled())
        _time.sleep(0.005)
        return real(*args, **kwargs)
    monkeypatch.setattr(diagonal, "grouped_layer", slow)
    monkeypatch.setattr(ring, "grouped_layer", slow)
    out = load_script("executor_overhead").main(["--segments", "2,5", "--repeats", "2", "--threads", "1",
                                                 "--queue", "3", "--json", str(tmp_path / "o.json")])
    assert diagonal.grouped_layer is slow and ring.grouped_layer is slow and all(seen)
    L = out["layers"]
    assert [(p["code"], p.get("segments"), p.get("requests")) for p in out["points"]] == [
        ("this", 2, None), ("this", 5, None), ("this", None, 3)]
    for p in out["points"]:
        if "segments" in p:
            assert p["steps"] == L + p["segments"] - 1
        else:                                             # the ring: at least one grouped call per ring step
            assert p["steps"] >= L + sum(-(-ids.shape[1] // 32) for ids in
                                         bench.queue_requests(bench.live_preset("tiny"), 3)) - 1
        assert p["in_steps"] >= 5 * p["steps"] and p["between_steps"] < 5 * p["steps"]
        assert p["before_first_step"] > 0 and p["after_last_step"] > 0
        # between the steps = before the first + the gaps from one step's exit to the next one's entry + after the last
        assert p["between_two_steps"] < 5 * (p["steps"] - 1)
    assert json.loads((tmp_path / "o.json").read_text())["points"] == out["points"]


def test_executor_overhead_script_measures_another_checkout_alongside(tmp_path, threads_kept):
    """--against DIR: that checkout's executor (here this very one, imported a second time) runs in
    the same rounds on its own copy of the model; both sets of points come back, labelled."""
    import sys
    root = Path(__file__).resolve().parents[1]
    try:
        out = load_script("executor_overhead").main(["--segments", "3", "--repeats", "1", "--threads", "1",
                                                     "--against", str(root)])
    finally:
        for name in [m for m in sys.modules if m == "diaglab_against" or m.startswith("diaglab_against.")]:
            del sys.modules[name]
    assert [(p["code"], p["segments"]) for p in out["points"]] == [("against", 3), ("this", 3)]
    assert out["against"]["path"] == str(root) and all(p["steps"] == out["layers"] + 2 for p in out["points"])
    assert not any(m.startswith("diaglab_against") for m in sys.modules)   # dropped again after the run


def test_executor_overhead_second_against_loads_that_checkout(tmp_path, threads_kept):
    """Two --against runs in one process: the second measures its own checkout, not modules the
    first left behind (they were reused: the JSON named one checkout and timed another)."""
    import shutil
    import sys
    root = Path(__file__).resolve().parents[1]
    other = tmp_path / "other"
    shutil.copytree(root / "diaglab", other / "diaglab", ignore=shutil.ignore_patterns("__pycache__"))
    script = load_script("executor_overhead")
    for path in (other, root):
        package = script.load_checkout(str(path))
        assert Path(sys.modules["diaglab_against.diagonal"].__file__).parent == path / "diaglab"
        assert Path(package.__file__).parent == path / "diaglab"
    script.forget_checkout()
    assert script.load_checkout("") is None   # an empty --against names no checkout (not the working directory)


def test_executor_overhead_script_refuses_bad_flags(rejected, tmp_path):
    broken = tmp_path / "broken" / "diaglab"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('not this one')\n")
    for argv in (["--repeats", "0"], ["--segments", "0"], ["--segments", "4,4"], ["--preset", "huge"],
                 ["--against", str(tmp_path)], ["--queue", "0"], ["--json", str(tmp_path)],
                 ["--against", str(tmp_path / "broken")], ["--against", ""]):
        rejected(load_script("executor_overhead").main, argv)
    import sys
    assert not any(m.startswith("diaglab_against") for m in sys.modules)


@pytest.mark.parametrize("argv, says", [
    (["--rounds", "0"], "--rounds: expected an integer >= 1"),
    (["--repeats", "x"], "--repeats: expected an integer >= 1"),
    (["--tokens", "a"], "--tokens: expected a comma list of integers >= 1"),
    (["--tokens", "64,64"], "--tokens: 64 comes twice"),
    (["--preset", "huge"], "--preset: invalid choice: 'huge'"),
])
def test_dist_bench_bad_flag_is_one_line(rejected, argv, says):
    assert says in rejected(dist_main, argv)


def test_the_command_itself_refuses_a_huge_count_at_once():
    """Before the bound, --layers with 23 digits hung while transformers built the config."""
    done = subprocess.run([sys.executable, "-m", "diaglab.bench", "--layers", "9" * 23], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and done.stdout == "" and len(done.stderr.splitlines()) == 1, done.stderr
    assert "argument --layers: expected an integer from 1 to 1000000" in done.stderr


@pytest.mark.parametrize("argv, says", [
    (["--preset", "huge", "--device", "cpu"], "--preset: invalid choice: 'huge'"),
    (["--steps-tokens", "-5", "--device", "cpu"], "--steps-tokens: expected an integer >= 1"),
    (["--layers", "0", "--device", "cpu"], "--layers: expected an integer >= 1"),
    (["--exact-segments", "nan", "--device", "cpu"], "--exact-segments: expected a number of segments"),
    (["--device", "nope"], "--device: "),
])
def test_gpu_checks_bad_flag_is_one_line(rejected, tmp_path, argv, says):
    """scripts/gpu_checks.py answers a bad flag before building anything (a traceback, or a
    RuntimeError only after the exactness checks had run, before)."""
    assert says in rejected(load_script("gpu_checks").main, [str(tmp_path / "out"), *argv])
    assert not (tmp_path / "out").exists()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert "out: " in rejected(load_script("gpu_checks").main, [str(a_file), "--device", "cpu", "--layers", "2"])


def test_gpu_checks_cudagraph_check_reports_instead_of_raising():
    """scripts/gpu_checks.py's CUDA-graph check records a failure in its report (the other checks
    still run); on a CPU the executor refuses reduce-overhead, which is what the report says."""
    out = load_script("gpu_checks").cudagraph_check("cpu", segments=2)
    assert out["pass"] is False and "CUDA" in out["error"] and out["preset"] == "tiny"
