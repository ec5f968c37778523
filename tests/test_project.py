"""The project's own files stay consistent: environment.yml mirrors pyproject, the README
opens with the two commands, and .ci/run runs exactly the README's test command."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ]", req.strip(), maxsplit=1)[0].lower()


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {r.strip() for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    env = (ROOT / "environment.yml").read_text()
    pip_section = env.split("- pip:", 1)[1]
    pip_lines = {m.strip() for m in re.findall(r"^\s+- (.+)$", pip_section, flags=re.M)}
    pip_lines.discard("-e .[dev]")
    assert "-e .[dev]" in env and "python=3.11" in env and "name: diaglab" in env
    torch_env = [p for p in pip_lines if _name(p) == "torch"]
    assert torch_env == ["torch==2.13.0"], "environment.yml pins the CPU torch build"
    assert {p for p in pip_lines if _name(p) != "torch"} == {w for w in wanted if _name(w) != "torch"}


def test_makefile_pins_the_same_torch():
    make = (ROOT / "Makefile").read_text()
    assert "TORCH_SPEC  ?= torch==2.13.0" in make
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(s.startswith("torch>=") and "<" in s for s in spec), "pyproject keeps a bounded torch range"


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, flags=re.S)
    first = blocks[0].strip().splitlines()
    commands = [line.split("#")[0].strip() for line in first if line and not line.startswith("#")]
    assert commands == ["make lab", "make test"]
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert [line for line in ci if line and not line.startswith(("#", "set ", "cd "))] == ["make test"]
