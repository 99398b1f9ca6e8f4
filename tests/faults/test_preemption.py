"""Spot-style preemption: SIGTERM to a live Ray Train worker PROCESS (what a node being reclaimed
delivers), not an exception raised by our code. The worker group restarts from the last
checkpoint and the run completes with exactly epochs x steps_per_epoch steps.

The run streams its shards (data.cache_budget_mb=0), so the restart also shows that the data
order survives it: every epoch - the one re-read after the restart included - read the shards in
``epoch_shard_order(seed, epoch)`` order, the order it would have had without the failure (Ray's
own file shuffle is re-seeded per execution of a dataset, which restarts from 0 with the group)."""
from __future__ import annotations

import json
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
                             "data.source=null", f"storage_path={tmp_path / 'runs'}", f"name={name}",
                             "data.cache_budget_mb=0", "seed=5"])
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
    assert out["rows_read"] == 1438  # the last epoch read every sample exactly once

    # Each epoch's shard order is f(seed, epoch), before and after the restart alike.
    from pipeline import ray_compat
    from pipeline.data import scan_shards
    from pipeline.data.read import ORDER_KEY, epoch_shard_order

    names = [s.name for s in scan_shards(digits_shards, "train").readable]  # index order
    planned = {}
    for key in ray_compat.kv_keys(f"{ORDER_KEY}{name}:".encode()):
        planned[int(key.decode().rsplit(":", 1)[1])] = json.loads(ray_compat.kv_get(key))
    assert sorted(planned) == [0, 1, 2], planned
    for epoch, rec in planned.items():
        assert rec["shards"] == [names[i] for i in epoch_shard_order(len(names), 5, epoch)], (epoch, rec)
    assert len({tuple(r["shards"]) for r in planned.values()}) == 3  # a new order every epoch
