"""Where the suite's data lives, found through the package rather than the working directory.

The notebooks and scripts read a trained checkpoint (`data/recall/`) and measured benchmark
results (`data/bench/`). Opening `../data/...` works only when the working directory is
`notebooks/`; `data_path("recall")` works from anywhere, because it starts from this file:
the repository's `data/` sits next to the `diaglab/` package. Set DIAGLAB_DATA to point at
another copy of that folder (an installed package, a moved checkout).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ENV_VAR = "DIAGLAB_DATA"


def write_json(path, obj) -> None:
    """obj as indented JSON at path (its folder made if missing), written to a sibling file and
    renamed over path: a failed write leaves the old file as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def data_root() -> Path:
    """The folder that holds `recall/`, `bench/`, ...: $DIAGLAB_DATA if set, else <repository>/data."""
    override = os.environ.get(ENV_VAR)
    return Path(override).expanduser().resolve() if override else Path(__file__).resolve().parents[1] / "data"


def data_path(name: str) -> Path:
    """The path of `name` inside the data folder (a file or a folder); it must exist.

    data_path("recall") -> .../data/recall; data_path("bench/cpu_tiny.json") -> that file.
    Raises FileNotFoundError naming the path looked at and how to fix it.
    """
    if not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(f"data_path({name!r}): give a path relative to the data folder, "
                         "such as 'recall' or 'bench/cpu_tiny.json'")
    root = data_root()
    path = root / name
    if not path.exists():
        where = f"${ENV_VAR} = {os.environ[ENV_VAR]}" if ENV_VAR in os.environ else "the repository's data/ folder"
        raise FileNotFoundError(
            f"diaglab data {name!r} not found at {path} (looked in {where}). diaglab reads its data from a "
            f"checkout of the repository: run from a clone with data/ next to diaglab/, or set {ENV_VAR} "
            "to the folder that holds recall/ and bench/.")
    return path
