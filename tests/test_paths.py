"""diaglab.paths finds the suite's data through the package, from any working directory,
and a missing file is an error that names the path and the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diaglab.paths import ENV_VAR, data_path, data_root

REPO = Path(__file__).resolve().parents[1]


def test_finds_the_repository_data(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert data_root() == REPO / "data"
    assert data_path("recall") == REPO / "data" / "recall"
    assert json.loads(data_path("recall/armt_config.json").read_text())        # a real file, readable
    assert data_path("bench/cpu_tiny.json").is_file()


def test_independent_of_the_working_directory(tmp_path):
    """Run from an unrelated folder: the path still resolves into the repository."""
    code = "from diaglab.paths import data_path; print(data_path('recall/samples.json'))"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(ENV_VAR, None)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert Path(out) == REPO / "data" / "recall" / "samples.json"


def test_missing_data_names_the_path_and_the_fix(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(FileNotFoundError, match=r"bench/nothing_here\.json.*set DIAGLAB_DATA"):
        data_path("bench/nothing_here.json")
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=rf"DIAGLAB_DATA = {tmp_path}"):
        data_path("recall")


def test_env_var_points_elsewhere(monkeypatch, tmp_path):
    (tmp_path / "recall").mkdir()
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert data_path("recall") == tmp_path / "recall"


@pytest.mark.parametrize("bad", ["", "/etc/passwd", "../data/recall"])
def test_rejects_paths_outside_the_data_folder(bad):
    with pytest.raises(ValueError, match="relative to the data folder"):
        data_path(bad)


def test_write_json_makes_its_folder_and_a_failed_write_keeps_the_old_file(tmp_path):
    from diaglab.paths import write_json
    target = tmp_path / "new" / "out.json"
    write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    with pytest.raises(TypeError):
        write_json(target, {"a": object()})             # not serialisable: fails before writing
    assert json.loads(target.read_text()) == {"a": 1} and sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_write_json_failing_half_way_keeps_the_old_file(tmp_path, monkeypatch):
    """A disk that fills while the new text is written, or a rename that fails: the old file is
    as it was and no temporary file is left beside it."""
    import diaglab.paths as paths
    target = tmp_path / "out.json"
    paths.write_json(target, {"a": 1})
    real_write_text = Path.write_text

    def half_written(self, text, *a, **kw):
        real_write_text(self, text[:3], *a, **kw)
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(Path, "write_text", half_written)
        with pytest.raises(OSError, match="No space"):
            paths.write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["out.json"]
    with monkeypatch.context() as m:
        m.setattr(paths.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(5, "I/O error")))
        with pytest.raises(OSError, match="I/O error"):
            paths.write_json(target, {"a": 3})
    assert json.loads(target.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["out.json"]
