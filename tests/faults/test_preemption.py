"""Spot-style preemption: SIGTERM to a live Ray Train worker PROCESS (what a node being reclaimed
delivers), not an exception raised by our code. The worker group restarts from the last
checkpoint and the run completes with exactly epochs x steps_per_epoch steps."""
from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest

from pipeline.config import load_config

from .conftest import STEPS_PER_EPOCH, TINY, checkpoints

pytestmark = pytest.mark.slow


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _train_workers() -> list[int]:
    """Ray Train worker processes of THIS test session's Ray (children of our raylet)."""
    pids = []
    for pid in _descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"RayTrainWorker" in f.read():
                    pids.append(pid)
        except OSError:
            pass
    return pids


def test_sigterm_to_a_train_worker_restarts_group_from_checkpoint(ray_session, digits_shards, tmp_path):
    from pipeline.checkpoint import MANIFEST_FILE
    from pipeline.train import run_training

    name = f"p-{uuid.uuid4().hex[:8]}"
    cfg = load_config(None, [*TINY, "epochs=3", "max_failures=1", f"data.url={digits_shards}",
                             "data.source=null", f"storage_path={tmp_path / 'runs'}", f"name={name}"])
    killed: list[int] = []

    def preempt() -> None:  # after Ray REGISTERED the first complete checkpoint (its snapshot
        # file is written after registration; the checkpoint dir appears while it is uploaded)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            run = tmp_path / "runs" / name
            if ((run / "checkpoint_manager_snapshot.json").is_file()
                    and any((c / MANIFEST_FILE).is_file() for c in checkpoints(run))):
                workers = _train_workers()
                if workers:
                    os.kill(workers[-1], signal.SIGTERM)
                    killed.append(workers[-1])
                    return
            time.sleep(0.5)

    t = threading.Thread(target=preempt, daemon=True)
    t.start()
    out = run_training(cfg)
    t.join(timeout=5)
    assert killed, "no Ray Train worker process found to preempt"
    # the new worker group started from a checkpoint (epoch 1, or 2 if epoch 2 ended first)
    assert out["resumed_from_epoch"] in (1, 2)
    assert out["epochs"] == 3 and out["steps"] == 3 * STEPS_PER_EPOCH  # none lost, none twice
