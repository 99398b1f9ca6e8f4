"""Checkpoint files: what a training checkpoint holds and how it is read back safely.

A checkpoint is a directory with ``state.pt`` (model, optimiser, step, epoch, config, RNG) written
with ``torch.save`` and always read with ``weights_only=True``: only tensors and plain containers,
never arbitrary pickled objects. It lives wherever Ray Train persisted it (local or s3://).

Integrity. ``manifest.json`` lists every other file of the checkpoint with its size and SHA-256 and
is written LAST, atomically (temp file + rename). So a checkpoint whose writer died part-way (driver
killed with -9, node lost, a crash during the upload to S3) has no manifest, or files that do not
match it; the loader refuses it with one line, and a resume takes the newest checkpoint that is
complete, whether or not Ray Train had registered it (:func:`load_resume_state`). A bare
``state.pt`` passed by path is verified against the manifest beside it when there is one.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import CacrError

STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train's directory names: checkpoint_<timestamp>, sortable


class CheckpointError(CacrError, ValueError):
    """A path that is not a readable CACR checkpoint (user error: one-line message)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_manifest(directory: str | Path) -> Path:
    """Record size + SHA-256 of every file in ``directory`` (not the manifest itself). Call last."""
    directory = Path(directory)
    files = {}
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if p.is_file() and rel != MANIFEST_FILE and not rel.endswith(".tmp"):
            files[rel] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    path = directory / MANIFEST_FILE
    _write_atomic(path, json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1).encode())
    return path


def verify_checkpoint(directory: str | Path) -> dict[str, Any]:
    """Check a local checkpoint directory against its manifest; return the manifest.

    Raises :class:`CheckpointError` (one line, naming the first problem) if the manifest is missing
    or unreadable, or a listed file is missing, has another size, or another SHA-256."""
    directory = Path(directory)
    mpath = directory / MANIFEST_FILE
    if not mpath.is_file():
        raise CheckpointError(f"checkpoint '{directory}' is incomplete: no {MANIFEST_FILE} (written last, "
                              f"so its writer stopped part-way); a checkpoint from before manifests "
                              f"existed can still be read by passing its {STATE_FILE}")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        assert isinstance(files, dict) and STATE_FILE in files
    except Exception:  # noqa: BLE001 - any damage to the manifest means "not trustworthy"
        raise CheckpointError(f"checkpoint '{directory}' has a damaged {MANIFEST_FILE}") from None
    for rel, want in sorted(files.items()):
        p = directory / rel
        if not p.is_file():
            raise CheckpointError(f"checkpoint '{directory}' is incomplete: {rel} is missing")
        size = p.stat().st_size
        if size != want.get("size"):
            raise CheckpointError(f"checkpoint '{directory}' is incomplete or corrupt: {rel} has "
                                  f"{size} bytes, its manifest says {want.get('size')}")
        if _sha256(p) != want.get("sha256"):
            raise CheckpointError(f"checkpoint '{directory}' is corrupt: {rel} does not match the "
                                  "SHA-256 in its manifest")
    return manifest


def save_state(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state.pt`` + ``config.json``, then the manifest (last: its presence = complete)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST_FILE).unlink(missing_ok=True)  # rewriting: incomplete until the end
    path = directory / STATE_FILE
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written state.pt
    _write_atomic(directory / "config.json", json.dumps(state.get("config", {}), indent=2).encode())
    write_manifest(directory)
    return path


def _read_state(path: Path, map_location) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt file, wrong format, a pickle with code in it
        raise CheckpointError(f"checkpoint '{path}' is not a readable CACR checkpoint "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"checkpoint '{path}' lacks model weights/config: not written by cacr train")
    return state


def load_state_file(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint directory (verified against its manifest) or a ``state.pt`` file (verified
    when a manifest lies beside it)."""
    path = Path(path)
    if path.is_dir():
        if not (path / STATE_FILE).is_file() and not (path / MANIFEST_FILE).is_file():
            raise CheckpointError(f"checkpoint '{path}' does not exist: no {STATE_FILE} in that "
                                  f"directory (pass a …/checkpoint_*/ directory or its {STATE_FILE})")
        verify_checkpoint(path)
        return _read_state(path / STATE_FILE, map_location)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist: pass a checkpoint directory "
                              f"(…/checkpoint_*/) or its {STATE_FILE}")
    if path.name == STATE_FILE and (path.parent / MANIFEST_FILE).is_file():
        verify_checkpoint(path.parent)
    return _read_state(path, map_location)


def load_checkpoint(url: str, storage_cfg=None, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint from a local path or an ``s3://`` URL (directory or its state.pt)."""
    from pipeline import storage

    if not storage.is_remote(url):
        return load_state_file(storage.parse_url(url).path, map_location)

    fs, path = storage.fsspec_fs(url, storage_cfg)
    path = path.rstrip("/")
    try:
        if fs.isfile(path):  # a state.pt: fetch it with its manifest when there is one
            parent, name = path.rsplit("/", 1)
            with tempfile.TemporaryDirectory() as tmp:
                fs.get(path, str(Path(tmp) / name))
                if name == STATE_FILE and fs.isfile(f"{parent}/{MANIFEST_FILE}"):
                    return _load_remote_dir(fs, parent, url, map_location)
                return load_state_file(Path(tmp) / name, map_location)
        if fs.isdir(path) and (fs.isfile(f"{path}/{STATE_FILE}") or fs.isfile(f"{path}/{MANIFEST_FILE}")):
            return _load_remote_dir(fs, path, url, map_location)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"checkpoint '{url}' could not be read: {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}") from None
    raise CheckpointError(f"checkpoint '{url}' does not exist (no {STATE_FILE} there)")


def _load_remote_dir(fs, path: str, url: str, map_location) -> dict[str, Any]:
    """Download a checkpoint directory, verify it, load it; errors name the URL, not the temp dir."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "ckpt"
        fs.get(path.rstrip("/") + "/", str(local), recursive=True)
        try:
            return load_state_file(local, map_location)
        except CheckpointError as e:
            raise CheckpointError(str(e).replace(str(local / STATE_FILE), url)
                                  .replace(str(local), url)) from None


# ----------------------------------------------------------------------------------------------
# Resume: the newest COMPLETE checkpoint of a run


def load_resume_state(run_url: str, storage_cfg=None, *, registered: str | None = None,
                      map_location: str | torch.device = "cpu", say=print) -> tuple[str, dict[str, Any]] | None:
    """``(name, state)`` of the checkpoint a run resumes from: the NEWEST ``checkpoint_*`` of
    the run directory whose manifest verifies, registered by Ray Train or not; None when the run
    has no checkpoint yet (a fresh start).

    ``registered`` is the name of the checkpoint Ray Train hands back (``ray.train.
    get_checkpoint()``), the newest one its controller REGISTERED. A stop between rank 0's upload
    and that registration (kill -9 of the driver, a lost head node) leaves a newer checkpoint on
    storage that Ray does not know; it is complete when its manifest verifies (the manifest is
    written last and lists every file's size and SHA-256), so it is the one to resume from, and
    the epochs it holds are not trained twice. A newer one that does NOT verify is the one being
    written when the run died: skipped with one line, as is a damaged registered one. Every
    checkpoint present but none complete: :class:`CheckpointError` (never a silent restart from
    scratch)."""
    from pipeline import storage

    names = {n for n in storage.list_dirs(run_url, storage_cfg) if n.startswith(CHECKPOINT_PREFIX)}
    if registered:
        names.add(registered)
    first_error = None
    for name in sorted(names, reverse=True):  # checkpoint_<UTC timestamp>: name order = time order
        try:
            state = load_checkpoint(storage.join_url(run_url, name), storage_cfg, map_location)
        except CheckpointError as e:
            first_error = first_error or e
            say(f"[cacr] skipping checkpoint {name}: {str(e).split(': ', 1)[-1]}")
            continue
        if registered is None:
            say(f"[cacr] resuming from {name}: complete, written before the run was stopped "
                "(Ray had not registered it)")
        elif name > registered:
            say(f"[cacr] resuming from {name}: complete, newer than {registered}, the newest "
                "checkpoint Ray had registered when the run was stopped")
        elif name < registered:
            say(f"[cacr] resuming from {name}, the newest complete checkpoint")
        return name, state
    if names:
        raise CheckpointError(f"no complete checkpoint in '{run_url}' ({first_error}); remove the run "
                              "directory to start over")
    return None


STAGING_PREFIX = "cacr-ckpt-"
STAGING_KINDS = ("ckpt", "tb")  # checkpoint staging; TensorBoard's local mirror of a remote logdir


def _staging_prefix(run_name: str | None, kind: str = "ckpt") -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in (run_name or "run"))
    return f"cacr-{kind}-{safe}-"


def run_temp_dir(run_name: str | None, kind: str) -> str:
    """A temp dir of a run's process named after the run (``kind`` in :data:`STAGING_KINDS`), so
    that what a killed process leaves is found by :func:`remove_staging`; the caller removes it."""
    return tempfile.mkdtemp(prefix=_staging_prefix(run_name, kind))


def staging_dir(run_name: str | None) -> "tempfile.TemporaryDirectory[str]":
    """Where rank 0 writes a checkpoint before Ray Train persists it: a temp dir named after the
    run, so that what a killed worker could not remove (Ctrl-C, preemption mid-report) is found
    and removed by :func:`remove_staging` when the command ends."""
    return tempfile.TemporaryDirectory(prefix=_staging_prefix(run_name))


def remove_staging(run_name: str | None) -> int:
    """Remove this run's temp dirs (checkpoint staging, TensorBoard mirror) left in this node's
    temp dir by killed processes; returns how many."""
    import glob
    import shutil

    left = [d for kind in STAGING_KINDS
            for d in glob.glob(os.path.join(tempfile.gettempdir(), _staging_prefix(run_name, kind) + "*"))]
    for d in left:
        shutil.rmtree(d, ignore_errors=True)
    return len(left)
