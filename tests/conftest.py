"""Shared helpers: small models with the memory path switched on, error metrics, and the
check every command line's refusal must pass."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import diaglab  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error ||a - b|| / ||b|| (computed in float64)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def live_model(layers=3, segment_size=8, num_mem_tokens=4, seed=0, **kw) -> diaglab.ARMT:
    """A tiny ARMT whose memory path does something: random non-zero W_mv and distinct
    per-layer W_mb biases (with W_mv = 0 the memory is inert — design §2)."""
    return diaglab.randomize_memory_(inert_model(layers, segment_size, num_mem_tokens, seed, **kw), seed=seed + 1)


def inert_model(layers=3, segment_size=8, num_mem_tokens=4, seed=0, **kw) -> diaglab.ARMT:
    """The same tiny ARMT as live_model(seed=seed) before randomize_memory_: the paper's
    W_mv = 0, so W_mem stays 0 and the memory adds nothing."""
    return diaglab.tiny_armt(layers=layers, segment_size=segment_size, num_mem_tokens=num_mem_tokens,
                             seed=seed, **kw)


def random_ids(B, N, vocab=256, seed=0):
    return torch.randint(0, vocab, (B, N), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def model():
    return live_model()


@pytest.fixture
def threads_kept():
    """torch's thread count as it was before the test (training, the CLIs and the scripts set it)."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# ---- command lines: a bad value is one line and exit code 2 ---------------------------------
def assert_cli_error(code, err: str, prog: str | None = None, out: str | None = None) -> str:
    """A command line's refusal: exit code 2, exactly one line on stderr (starting with
    "<prog>: error: " when prog is given), no traceback, nothing on stdout when out is given.
    Returns that line."""
    assert code == 2, (code, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    if prog is not None:
        assert err.startswith(f"{prog}: error: "), err
    if out is not None:
        assert out == "", out
    return err.strip()


def cli_error(main, argv, capsys, prog: str | None = None) -> str:
    """main(argv) in this process must refuse argv (assert_cli_error); returns the line."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    captured = capsys.readouterr()
    return assert_cli_error(exit_info.value.code, captured.err, prog, captured.out)


def cli_error_in_a_process(module: str, argv, prog: str | None = None) -> str:
    """`python -m module argv` in a fresh process must refuse argv (assert_cli_error)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-m", module, *map(str, argv)], capture_output=True, text=True,
                          cwd=root, env=env, timeout=300)
    return assert_cli_error(done.returncode, done.stderr, prog, done.stdout)


def no_work(*args, **kwargs):
    """Patched over a command line's training, evaluation or model building: a bad argument must
    stop the command before any of them."""
    raise AssertionError("work started before the arguments were checked")


def load_script(name: str):
    """scripts/<name>.py as a module (scripts/ is not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
