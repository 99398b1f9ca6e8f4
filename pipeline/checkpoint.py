"""Checkpoint files: what a training checkpoint holds and how it is read back safely.

A checkpoint is a directory with ``state.pt`` (model, optimiser, step, epoch, config, RNG) written
with ``torch.save`` and always read with ``weights_only=True``: only tensors and plain containers,
never arbitrary pickled objects. It lives wherever Ray Train persisted it (local or s3://).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import CacrError

STATE_FILE = "state.pt"


class CheckpointError(CacrError, ValueError):
    """A path that is not a readable CACR checkpoint (user error: one-line message)."""


def save_state(directory: str | Path, state: dict[str, Any]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / STATE_FILE
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written state.pt
    (directory / "config.json").write_text(json.dumps(state.get("config", {}), indent=2))
    return path


def load_state_file(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist: pass a checkpoint directory "
                              f"(…/checkpoint_*/) or its {STATE_FILE}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt file, wrong format, a pickle with code in it
        raise CheckpointError(f"checkpoint '{path}' is not a readable CACR checkpoint "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"checkpoint '{path}' lacks model weights/config: not written by cacr train")
    return state


def load_checkpoint(url: str, storage_cfg=None, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint from a local path or an ``s3://`` URL (directory or its state.pt)."""
    if "://" not in url:
        return load_state_file(url, map_location)
    from pipeline import storage

    fs, path = storage.fsspec_fs(url, storage_cfg)
    candidates = [path.rstrip("/") + "/" + STATE_FILE, path]
    for cand in candidates:
        try:
            if fs.isfile(cand):
                with tempfile.TemporaryDirectory() as tmp:
                    local = Path(tmp) / STATE_FILE
                    fs.get(cand, str(local))
                    return load_state_file(local, map_location)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"checkpoint '{url}' could not be read: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200]}") from None
    raise CheckpointError(f"checkpoint '{url}' does not exist (no {STATE_FILE} there)")
