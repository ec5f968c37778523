"""Checkpoints: an ARMT as three files in one directory, written atomically, read strictly.

    armt_config.json   {"format": "diaglab-armt-1", "armt": ARMTConfig fields, "dtype": model.memory's dtype}
    base_config.json   the LLaMA base's transformers config
    model.safetensors  every tensor once (tied weights once), each in its own dtype

`save` writes into a fresh sibling directory and swaps it in with renames, so a failure
at any point leaves the previous checkpoint as it was. `load` refuses what it cannot
read faithfully (another format, a newer version, a missing or unknown field, a tensor
that does not fit) instead of filling gaps with defaults, and gives every tensor back
the dtype it was saved in. No network: transformers only supplies the config classes.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ARMTConfig

FORMAT = "diaglab-armt"
VERSION = 1                          # bump when a reader of the old version would misread the new files
FILES = ("armt_config.json", "base_config.json", "model.safetensors")
_META_FIELDS = ("format", "armt", "dtype")


# ---- save ------------------------------------------------------------------------------
def save(model, path: str | os.PathLike, extra: dict | None = None, drop: tuple[str, ...] = ()) -> None:
    """Write model (a diaglab.ARMT) to the directory path, replacing a checkpoint already there.

    Steps: 1. write the three files into a new sibling directory; 2. move an existing
    checkpoint aside, 3. move the new one into place, 4. delete the old one. rename(2)
    cannot replace a non-empty directory, hence steps 2-4; a failure in 2-3 moves the old
    one back. Other files in an existing checkpoint directory (a train_log.json, an
    eval.json) are carried over into the new one, except those named in `drop`.
    extra: file name -> writer(path) for files that belong with these weights (a training
    log): written in step 1, so they and the weights are replaced together or not at all.
    """
    for name in (extra or {}):   # a file beside the weights, not one of them nor anywhere else
        if not isinstance(name, str) or name in FILES or Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"extra file name {name!r} must be a plain file name other than {FILES}")
    path = check_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = _sibling(path, "saving")
    os.mkdir(new)  # not tempfile.mkdtemp: its mode 0700 would replace the directory's own
    try:
        _write(model, new)
        for name, writer in (extra or {}).items():
            writer(new / name)
        if path.exists():
            shutil.copymode(path, new)
            _carry_over(path, new, skip=set(extra or ()) | set(drop))
        _swap_in(new, path)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise


def check_target(path: str | os.PathLike) -> Path:
    """Refuse to replace anything but a missing path, an empty directory or a checkpoint:
    save_pretrained(a_project_dir) must not swap the user's files away. The training command
    lines call it before they train (train.check_out), so a refusal never comes after the work.
    Returns the path resolved ('.' gets a name; a symlinked checkpoint is replaced where it lives)."""
    path = Path(os.path.realpath(path))
    if Path(os.getcwd()).resolve().is_relative_to(path):
        raise ValueError(f"{path} is or holds the working directory; replacing it would leave this process in a "
                         "deleted directory: give a path outside it, e.g. from its parent")
    if path.is_file():
        raise FileExistsError(f"{path} is a file; save_pretrained writes a directory: choose another path")
    if path.is_dir() and any(path.iterdir()) and not (path / "armt_config.json").is_file():
        raise FileExistsError(f"{path} is a non-empty directory that holds no diaglab checkpoint "
                              "(no armt_config.json); save into a new or empty directory instead")
    return path


def _write(model, directory: Path) -> None:
    tensors, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if key in seen:  # tied weights (e.g. lm_head = embed_tokens) are stored once
            continue
        seen.add(key)
        tensors[name] = t.detach().to("cpu").contiguous().clone()
    save_file(tensors, str(directory / "model.safetensors"))
    meta = {"format": f"{FORMAT}-{VERSION}", "armt": model.config.to_dict(),
            "dtype": str(model.dtype).removeprefix("torch.")}
    with open(directory / "armt_config.json", "w") as f:
        json.dump(meta, f, indent=2)
    model.base.config.to_json_file(str(directory / "base_config.json"))


def _carry_over(old: Path, new: Path, skip: set[str] = frozenset()) -> None:
    """Hard-link (or copy) the old directory's other files (not FILES, not skip) into the new
    one; the old stays intact."""
    for entry in old.iterdir():
        if entry.name in FILES or entry.name in skip:
            continue
        if entry.is_dir():
            shutil.copytree(entry, new / entry.name, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / entry.name)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _sibling(path: Path, what: str) -> Path:
    return path.with_name(f".{path.name}.{what}-{uuid.uuid4().hex[:8]}")


def _swap_in(new: Path, path: Path) -> None:
    if not path.exists():
        os.rename(new, path)
        return
    old = _sibling(path, "old")
    os.rename(path, old)
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(old, path)
        raise
    try:
        shutil.rmtree(old)
    except OSError as e:  # the new checkpoint is in place; only the cleanup failed
        warnings.warn(f"saved {path}, but could not delete the previous version at {old} ({e}); delete it by hand")


# ---- load ------------------------------------------------------------------------------
def load(cls, path: str | os.PathLike, device=None):
    """Read a checkpoint written by `save` into a new cls (diaglab.ARMT), in eval mode.

    Each tensor keeps its saved dtype (a bfloat16 base with float32 memory comes back so),
    tied weights stay tied, and the caller's global RNG is left as it was.
    """
    from transformers import LlamaForCausalLM

    from ._checks import check_device
    from .armt import _seeded
    if device is not None:   # a dtype or a typo is refused before any work, not applied as a cast
        try:
            device = check_device(device)
        except (TypeError, RuntimeError) as e:
            raise ValueError(f"device must be a torch.device or a name such as 'cpu' or 'cuda:0', got {device!r} "
                             f"({e}); to change the dtype, call .to(dtype) on the loaded model") from None
    path = Path(path)
    meta = read_meta(path)
    base_cfg = read_base_config(path)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: the checkpoint at {path} is incomplete; "
                                "save the model again with save_pretrained")
    # ordinary tensors even when loaded under torch.inference_mode (buffers cast, a move to a device
    # included): the model stays trainable
    with torch.inference_mode(False):
        with _seeded(0):   # the skeleton's init is overwritten; keep the caller's RNG
            model = cls(LlamaForCausalLM(base_cfg), meta["armt"])
        try:
            tensors = load_file(str(weights))
        except Exception as e:  # safetensors raises its own error type for a truncated or foreign file
            raise ValueError(f"{weights} cannot be read ({e}): the file is damaged; save the model again") from None
        _assign(model, tensors, path)
        _match_unsaved_buffers(model)
        if str(model.dtype).removeprefix("torch.") != meta["dtype"]:
            raise ValueError(f"{path}: armt_config.json says dtype {meta['dtype']} but model.memory is stored "
                             f"as {model.dtype}; the files come from different saves: save the model again")
        model.eval()  # like transformers: a loaded model is for inference until .train() is called
        return model.to(device) if device is not None else model


def read_base_config(path: str | os.PathLike):
    """base_config.json of the checkpoint at path, as a transformers LlamaConfig, checked."""
    from transformers import LlamaConfig
    base_file = Path(path) / "base_config.json"
    if not base_file.is_file():
        raise FileNotFoundError(f"{base_file} is missing: the checkpoint at {path} is incomplete; "
                                "save the model again with save_pretrained")
    base_cfg = LlamaConfig.from_json_file(str(base_file))
    if base_cfg.model_type != "llama":
        raise ValueError(f"{base_file} describes a {base_cfg.model_type!r} model; diaglab checkpoints "
                         "hold a LLaMA base (model_type 'llama')")
    return base_cfg


def read_meta(path: str | os.PathLike) -> dict:
    """armt_config.json of the checkpoint at path, checked; 'armt' becomes an ARMTConfig."""
    path = Path(path)
    cfg_path = path / "armt_config.json"
    if not cfg_path.is_file():
        hint = ""
        aside = sorted(path.parent.glob(f".{path.name}.old-*")) if not path.exists() else []
        if aside:  # a save was killed between its two renames
            hint = f"; an interrupted save left the previous checkpoint at {aside[0]}: rename it to {path}"
        raise FileNotFoundError(f"{cfg_path} not found: {path} is not a directory written by "
                                f"ARMT.save_pretrained{hint}")
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e}); save the model again") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("format"), str) \
            or not meta["format"].startswith(FORMAT + "-"):
        got = meta.get("format") if isinstance(meta, dict) else meta
        raise ValueError(f"{cfg_path} is not a diaglab checkpoint (format {got!r}, expected "
                         f"'{FORMAT}-{VERSION}'); load other models with transformers, then wrap them in diaglab.ARMT")
    version = meta["format"].removeprefix(FORMAT + "-")
    if not version.isdigit():
        raise ValueError(f"{cfg_path}: unreadable format {meta['format']!r}, expected '{FORMAT}-{VERSION}'")
    if int(version) > VERSION:
        raise ValueError(f"{path} was written by a newer diaglab (checkpoint format version {version}); this "
                         f"one reads up to version {VERSION}: upgrade diaglab to load it")
    _check_fields(cfg_path.name, meta, _META_FIELDS)
    if not isinstance(meta["armt"], dict):
        raise ValueError(f"{cfg_path}: 'armt' must be an object of ARMTConfig fields, got {meta['armt']!r}")
    try:
        meta["armt"] = ARMTConfig.from_dict(meta["armt"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: {e}") from None
    return meta


def _check_fields(where: str, d: dict, required) -> None:
    missing = [k for k in required if k not in d]
    unknown = [k for k in d if k not in required]
    if missing:
        raise ValueError(f"{where} lacks the required field {missing[0]!r}; save the model again with save_pretrained")
    if unknown:
        raise ValueError(f"{where} has an unknown field {unknown[0]!r} (known: {', '.join(required)}); "
                         "it may come from a newer diaglab: upgrade, or remove the field")


def _match_unsaved_buffers(model) -> None:
    """Give the base's unsaved float buffers (RoPE's inv_freq) the embeddings' dtype.

    They are rebuilt, not stored; a base cast with .to(bfloat16) before saving had them in
    bfloat16 too, and RoPE's angles (hence every logit) depend on that rounding.
    """
    dtype = model.base.get_input_embeddings().weight.dtype
    saved = set(model.base.state_dict())
    for name, buf in model.base.named_buffers():
        if name not in saved and buf.is_floating_point():
            buf.data = buf.data.to(dtype)


def _assign(model, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Put each saved tensor into the model as is (its dtype included). Assigning .data of
    the shared Parameter keeps tied weights tied: both names hold that one object."""
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update(model.named_buffers(remove_duplicate=False))
    expected = set(model.state_dict())
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise ValueError(f"{path}/model.safetensors holds {unexpected[0]!r}, which this model lacks "
                         f"({len(unexpected)} such tensors): the weights and base_config.json do not match")
    filled = set()
    for name, t in tensors.items():
        target = targets[name]
        if tuple(t.shape) != tuple(target.shape):
            raise ValueError(f"{path}/model.safetensors: {name} has shape {tuple(t.shape)}, the configs "
                             f"say {tuple(target.shape)}: the weights and the configs come from different models")
        if id(target) in filled and not torch.equal(target.data, t):
            raise ValueError(f"{path}/model.safetensors: {name} differs from the weight it is tied to "
                             "(tie_word_embeddings in base_config.json): the files do not belong together")
        target.data = t
        filled.add(id(target))
    missing = sorted(n for n in expected if id(targets[n]) not in filled)
    if missing:
        raise ValueError(f"{path}/model.safetensors lacks {missing[0]!r} ({len(missing)} tensors missing): "
                         "the file is incomplete; save the model again")
