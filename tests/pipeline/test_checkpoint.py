"""Checkpoint integrity: the manifest written last, verification on load, and the fall-back to the
newest COMPLETE checkpoint on resume - local and on the moto S3 endpoint (no Ray cluster needed:
``ray.train.Checkpoint`` is a path + filesystem)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import (MANIFEST_FILE, STATE_FILE, CheckpointError, load_checkpoint,
                                 load_resume_state, load_state_file, save_state)


def _state(epoch: int) -> dict:
    return {"model": {"w": torch.full((64, 64), float(epoch))}, "config": {"epochs": 3},
            "epoch": epoch, "step": 11 * epoch}


def _run_dir(root: Path) -> Path:
    """A run directory as Ray Train lays it out: three checkpoints, names sortable by time."""
    for i, epoch in enumerate((1, 2, 3)):
        save_state(root / f"checkpoint_2026-12-02_10-0{i}-00.000000", _state(epoch))
    return root


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_manifest_is_written_with_sizes_and_hashes(tmp_path):
    save_state(tmp_path / "c", _state(1))
    m = json.loads((tmp_path / "c" / MANIFEST_FILE).read_text())
    assert set(m["files"]) == {STATE_FILE, "config.json"}
    assert m["files"][STATE_FILE]["size"] == (tmp_path / "c" / STATE_FILE).stat().st_size
    assert len(m["files"][STATE_FILE]["sha256"]) == 64
    assert load_state_file(tmp_path / "c")["epoch"] == 1


@pytest.mark.parametrize("damage, words", [
    ("truncate", "bytes, its manifest says"),
    ("flip", "does not match the SHA-256"),
    ("no_manifest", "incomplete: no manifest.json"),
    ("no_state", "state.pt is missing"),
    ("bad_manifest", "damaged manifest.json"),
])
def test_partial_or_corrupt_checkpoint_is_refused_with_one_line(tmp_path, damage, words):
    d = tmp_path / "c"
    save_state(d, _state(1))
    if damage == "truncate":
        _truncate(d / STATE_FILE)
    elif damage == "flip":  # same size, one byte different: only the hash can tell
        data = bytearray((d / STATE_FILE).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (d / STATE_FILE).write_bytes(bytes(data))
    elif damage == "no_manifest":
        (d / MANIFEST_FILE).unlink()
    elif damage == "no_state":
        (d / STATE_FILE).unlink()
    else:
        (d / MANIFEST_FILE).write_text("{not json")
    for target in (d, d / STATE_FILE):  # the directory, and its state.pt passed by path
        if damage == "no_state" and target.name == STATE_FILE:
            continue
        if damage == "no_manifest" and target.name == STATE_FILE:
            assert load_state_file(target)["epoch"] == 1  # pre-manifest checkpoints stay readable
            continue
        with pytest.raises(CheckpointError) as e:
            load_state_file(target)
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_resume_takes_the_newest_complete_checkpoint_registered_or_not(tmp_path):
    """kill -9 between the upload and Ray's registration leaves a COMPLETE checkpoint newer than
    the registered one: it is resumed from (its epochs are not trained twice), with one line; a
    damaged one is skipped, whichever it is; nothing complete is an error, never a fresh start."""
    run = _run_dir(tmp_path / "run")
    c1, c2, c3 = sorted(run.iterdir())
    said: list[str] = []
    name, state = load_resume_state(str(run), registered=c2.name, say=said.append)
    assert (name, state["epoch"], state["step"]) == (c3.name, 3, 33)
    assert len(said) == 1 and c3.name in said[0] and f"newer than {c2.name}" in said[0], said
    said.clear()  # the registered one is the newest: used as is, silently
    assert load_resume_state(str(run), registered=c3.name, say=said.append)[0] == c3.name and said == []
    _truncate(c3 / STATE_FILE)  # the one being written when the run died
    assert load_resume_state(str(run), registered=c2.name, say=said.append)[1]["epoch"] == 2
    assert len(said) == 1 and c3.name in said[0] and "skipping" in said[0], said
    said.clear()
    _truncate(c2 / STATE_FILE)  # the REGISTERED one is partial too: the newest complete is older
    assert load_resume_state(str(run), registered=c2.name, say=said.append)[1]["epoch"] == 1
    assert [c3.name in said[0], c2.name in said[1], "newest complete" in said[2]] == [True] * 3, said
    (c1 / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_resume_state(str(run), registered=c2.name, say=said.append)


def test_truncated_checkpoint_on_s3_is_refused_and_resume_falls_back(s3_bucket, upload_to_s3, tmp_path):
    from pipeline.storage import fsspec_fs
    run = _run_dir(tmp_path / "run")
    names = sorted(p.name for p in run.iterdir())
    url = upload_to_s3(str(run), f"{s3_bucket}/runs/r1")
    fs, base = fsspec_fs(url)
    newest = f"{base}/{names[2]}/{STATE_FILE}"
    fs.pipe_file(newest, fs.cat_file(newest)[:1000])  # a half-finished upload
    assert load_checkpoint(f"{url}/{names[1]}")["epoch"] == 2
    for target in (f"{url}/{names[2]}", f"{url}/{names[2]}/{STATE_FILE}"):
        with pytest.raises(CheckpointError, match="bytes, its manifest says") as e:
            load_checkpoint(target)
        assert url in str(e.value) and "/tmp" not in str(e.value)
    said: list[str] = []
    name, state = load_resume_state(url, registered=names[1], say=said.append)
    assert name == names[1] and state["epoch"] == 2 and any("skipping" in s for s in said)


def test_cli_evaluate_refuses_truncated_checkpoint_in_one_line(tmp_path):
    d = tmp_path / "checkpoint_x"
    save_state(d, _state(1))
    _truncate(d / STATE_FILE, 0.9)
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "evaluate", str(d)],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "manifest" in lines[0], r.stderr


def test_staging_dirs_of_a_killed_run_are_removed_by_name(tmp_path, monkeypatch):
    """A worker killed mid-report leaves its checkpoint staging dir; the command's end removes
    exactly that run's dirs (another run's stay)."""
    import tempfile

    from pipeline.checkpoint import remove_staging, staging_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    from pipeline.checkpoint import run_temp_dir

    killed, alive = staging_dir("run/a b"), staging_dir("other")  # the first is never cleaned up
    tb = run_temp_dir("run/a b", "tb")  # a killed rank 0's local TensorBoard mirror
    assert remove_staging("run/a b") == 2
    assert not os.path.exists(killed.name) and not os.path.exists(tb) and os.path.isdir(alive.name)
    alive.cleanup()


def test_newest_complete_checkpoint_when_ray_registered_none(tmp_path):
    """Stopped between writing a checkpoint and Ray registering it: the re-run resumes from the
    newest checkpoint whose manifest verifies; a run without checkpoints starts fresh."""
    assert load_resume_state(str(tmp_path / "nothing-yet"), say=lambda m: None) is None
    run = _run_dir(tmp_path / "run")
    c1, c2, c3 = sorted(run.iterdir())
    _truncate(c3 / STATE_FILE)  # the one being written when the run died
    said: list[str] = []
    assert load_resume_state(str(run), say=said.append)[1]["epoch"] == 2
    assert any(c3.name in s and "skipping" in s for s in said)
    assert any(c2.name in s and "had not registered" in s for s in said)
    for c in (c1, c2):
        (c / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_resume_state(str(run), say=said.append)
