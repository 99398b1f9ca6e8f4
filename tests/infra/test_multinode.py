"""Local multi-node simulation of the cluster layout in infra/ (issue 6).

Three Ray nodes on this machine (``ray.cluster_utils.Cluster``), shaped like
``infra/cluster/local.yaml``:

* head      - ``num_cpus=0``: drives the run, takes no training or decode work;
* trainer   - a GPU-less training node: CPUs plus the custom resource ``trainer``;
* data      - a CPU-only data node advertising ``{"data": 1000}``.

A short ``run_training`` (TINY config, 2 workers, 1 epoch, ``data.data_resource=data``) must put
every Ray Data read/decode task on the data node and every Ray Train worker on the trainer node,
both observed through the State API (``list_tasks`` / ``list_actors``, dashboard on the head).
Both checks can fail: the trainer node keeps a free CPU that unpinned decode tasks could take,
and the data node has the CPUs for unpinned train workers.

The config has no key for extra per-worker resources, so the child pins the train workers with a
thin wrapper around ``ray.train.ScalingConfig`` that adds ``{"trainer": 1}`` (nothing else changes).

Isolation: the cluster lives in a SUBPROCESS (this file run as a script), never in the pytest
process, whose session-scoped ``ray_session`` may be running. The child gets a private
``RAY_TMPDIR``: ``Cluster`` writes its address to ``$RAY_TMPDIR/ray/ray_current_cluster``, and in
the default ``/tmp/ray`` that file would make every plain ``ray.init()`` on the machine connect
to this test cluster, and would point other clusters' Ray Train ``PlacementGroupCleaner`` (which
resolves its cluster without an address) at the wrong State API. The child also sets
``RAY_ADDRESS`` to its own head before any node starts, so every process of its cluster (which
inherits it) resolves that cluster, whatever other instances run here; the driver connects with
the explicit address. The child always shuts the cluster down (``finally``); the test kills the
child's process group on timeout, and Ray's reaper removes whatever the child started.

Without ``RAY_ADDRESS``, with several Ray instances on one machine, the cleaner's monitor thread
dies with "Found multiple active Ray instances" (or, when a ``ray_current_cluster`` file names
another instance, asks that instance, finds no controller and exits): the run still succeeds,
it only loses the cleanup of its placement group should the controller die.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHILD_TIMEOUT_S = 480  # ~1.5 min on an idle 2-core machine; minutes more under heavy load
# Same TINY shape as tests/pipeline/test_train.py: 16-px decode, width-8 encoder, V = 2 views.
TINY = ["batch_size=64", "num_workers=2", "cpus_per_worker=0.5", "data.image_size=16",
        "augment.crop_size=16", "model.width=8", "model.head_hidden=64", "model.head_out=32",
        "loss.num_positives=1", "log_every_steps=5", "optim.warmup_epochs=0.5"]
STEPS_PER_EPOCH = 1438 // 128
RESULT_TAG = "MULTINODE_RESULT "


@pytest.mark.slow
def test_decode_on_data_node_and_train_workers_on_trainer_node(digits_shards, tmp_path):
    raytmp = tempfile.mkdtemp(prefix="rmn", dir="/tmp")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_TMPDIR")}
    env.update(RAY_TMPDIR=raytmp, RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="120", RAY_DEDUP_LOGS="0",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    cmd = [sys.executable, __file__, "--shards", digits_shards, "--storage", str(tmp_path / "runs")]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"multi-node child timed out after {CHILD_TIMEOUT_S}s\n{err[-4000:]}")
    finally:
        shutil.rmtree(raytmp, ignore_errors=True)
    wall = time.monotonic() - t0
    lines = [ln for ln in out.splitlines() if ln.startswith(RESULT_TAG)]
    assert proc.returncode == 0 and lines, f"child rc={proc.returncode}\n{out[-2000:]}\n{err[-6000:]}"
    res = json.loads(lines[-1][len(RESULT_TAG):])
    print(json.dumps({"wall_s": round(wall, 1),
                      **{k: v for k, v in res.items() if k not in ("task_names", "decode_tasks")}}))

    nodes = res["nodes"]
    assert len({nodes["head"], nodes["trainer"], nodes["data"]}) == 3
    summary = res["summary"]
    assert summary["epochs"] == 1 and summary["steps"] == STEPS_PER_EPOCH
    assert math.isfinite(summary["loss"])

    # Every read/decode task ran on the data node (and there were some).
    decode = res["decode_tasks"]
    assert decode, f"no read/decode tasks seen by the State API: {sorted(set(res['task_names']))}"
    assert {t["node_id"] for t in decode} == {nodes["data"]}, decode
    assert all(t["state"] == "FINISHED" for t in decode), decode
    # Both train workers ran on the GPU-less trainer node.
    workers = res["train_workers"]
    assert len(workers) == 2, workers
    assert {w["node_id"] for w in workers} == {nodes["trainer"]}, workers


@pytest.mark.slow
def test_data_node_lost_mid_epoch_run_completes_exactly(digits_shards, tmp_path):
    """The data node is killed (no graceful shutdown) while epoch 2 streams from it; a replacement
    data node joins a few seconds later (what an autoscaler does). The run finishes on its own -
    continuing, or restarting from its last checkpoint - with exactly epochs x steps_per_epoch
    steps, and decoding never leaves the data nodes."""
    res = _run_child(digits_shards, tmp_path, "--lose-data-node")
    summary, nodes = res["summary"], res["nodes"]
    assert res["removed_during_run"], res
    assert summary["epochs"] == 3 and summary["steps"] == 3 * STEPS_PER_EPOCH, summary
    # every epoch, the one in flight included, read each of the 1438 samples exactly once
    assert res["rows_read"] == [1438] * 3, res["rows_read"]
    decode_nodes = {t["node_id"] for t in res["decode_tasks"]}
    assert decode_nodes <= {nodes["data"], nodes["replacement"]} and nodes["replacement"] in decode_nodes, \
        (decode_nodes, nodes)


def _run_child(digits_shards: str, tmp_path, *extra: str) -> dict:
    raytmp = tempfile.mkdtemp(prefix="rmn", dir="/tmp")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_TMPDIR")}
    env.update(RAY_TMPDIR=raytmp, RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="120", RAY_DEDUP_LOGS="0",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    cmd = [sys.executable, __file__, "--shards", digits_shards, "--storage", str(tmp_path / "runs"), *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"multi-node child timed out after {CHILD_TIMEOUT_S}s\n{err[-4000:]}")
    finally:
        shutil.rmtree(raytmp, ignore_errors=True)
    lines = [ln for ln in out.splitlines() if ln.startswith(RESULT_TAG)]
    assert proc.returncode == 0 and lines, f"child rc={proc.returncode}\n{out[-2000:]}\n{err[-6000:]}"
    res = json.loads(lines[-1][len(RESULT_TAG):])
    print(json.dumps({k: v for k, v in res.items() if k not in ("task_names", "decode_tasks")}))
    return res


# ---------------------------------------------------------------------------------------------
# Child process: the cluster and the run.


def _pin_train_workers(resource: str) -> None:
    """Make every ScalingConfig built from now on ask for one unit of ``resource`` per worker."""
    import ray.train

    original = ray.train.ScalingConfig

    def scaling_config(*args, resources_per_worker=None, **kwargs):
        return original(*args, resources_per_worker={**(resources_per_worker or {}), resource: 1}, **kwargs)

    ray.train.ScalingConfig = scaling_config


def _wait_for_task_events(address: str, names: tuple[str, ...], timeout_s: float = 60) -> list:
    """All tasks whose name contains one of ``names``, once every one of them has finished and
    has a node id (task events reach the GCS asynchronously, about once a second)."""
    from ray.util.state import list_tasks

    deadline = time.monotonic() + timeout_s
    while True:
        tasks = list_tasks(address=address, limit=10_000, raise_on_missing_output=False)
        hits = [t for t in tasks if any(n in (t.name or "") for n in names)]
        if hits and all(t.node_id and t.state in ("FINISHED", "FAILED") for t in hits):
            return tasks
        if time.monotonic() > deadline:
            return tasks
        time.sleep(1.0)


def _phase(t0: float, what: str) -> None:
    print(f"[multinode] {time.monotonic() - t0:6.1f}s {what}", file=sys.stderr, flush=True)


def _lose_data_node(cluster, data, mem: dict, run_dir: Path, shared: dict, training) -> None:
    """Once the run has a complete checkpoint (epoch 2 is then streaming from the data node): kill
    the data node outright, and let a replacement join 5 s later. (Main thread: Ray starts a node's
    processes with signal handlers; the training runs in ``training``, a thread.)"""
    while training.is_alive():
        if any((c / "manifest.json").is_file() for c in run_dir.glob("checkpoint_*")):
            break
        time.sleep(0.2)
    if not training.is_alive():
        return
    cluster.remove_node(data, allow_graceful=False)
    shared["removed_at"] = time.monotonic()
    time.sleep(5)
    shared["replacement"] = cluster.add_node(**mem, num_cpus=2, resources={"data": 1000})


def child_main(shards: str, storage: str, lose_data_node: bool = False) -> dict:
    import logging

    import ray
    from ray.util import get_node_ip_address
    from ray.cluster_utils import Cluster

    t0 = time.monotonic()
    # RAY_ADDRESS = this cluster's head, set before any node starts so that every process of the
    # cluster inherits it: whatever resolves "the" cluster without an address (State API clients
    # such as Ray Train's PlacementGroupCleaner) finds this one, never another instance here.
    from pipeline.ray_start import free_port as _free_port

    port = _free_port()
    os.environ["RAY_ADDRESS"] = f"{get_node_ip_address()}:{port}"
    mem = {"object_store_memory": 200 << 20}
    cluster = Cluster(initialize_head=True, head_node_args={
        **mem, "gcs_server_port": port, "num_cpus": 0, "include_dashboard": True,
        "dashboard_port": _free_port()})
    try:
        trainer = cluster.add_node(**mem, num_cpus=2, resources={"trainer": 2})
        data = cluster.add_node(**mem, num_cpus=2, resources={"data": 1000})
        cluster.wait_for_nodes()
        assert cluster.address == os.environ["RAY_ADDRESS"], (cluster.address, os.environ["RAY_ADDRESS"])
        _phase(t0, f"cluster up at {cluster.address}")
        ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.WARNING)
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False

        from pipeline.config import load_config
        from pipeline.train import run_training

        _pin_train_workers("trainer")
        name = f"mn-{uuid.uuid4().hex[:8]}"
        run = (["epochs=3", "keep_checkpoints=3", "max_failures=2", "data.cache_budget_mb=0"]
               if lose_data_node else ["epochs=1", "max_failures=0"])
        cfg = load_config(None, [*TINY, f"data.url={shards}", "data.source=null", "data.val_split=",
                                 "data.data_resource=data", f"storage_path={storage}", f"name={name}", *run])
        shared: dict = {}
        with _stdout_to_stderr():
            if lose_data_node:
                import threading

                got: dict = {}

                def train() -> None:
                    try:
                        got["summary"] = run_training(cfg)
                    except BaseException as e:  # noqa: BLE001 - re-raised below
                        got["error"] = e

                training = threading.Thread(target=train)
                training.start()
                _lose_data_node(cluster, data, mem, Path(storage) / name, shared, training)
                training.join()
                if "error" in got:
                    raise got["error"]
                summary = got["summary"]
            else:
                summary = run_training(cfg)
        _phase(t0, "training done")

        from ray.util.state import list_actors

        decode_names = ("ReadTarShards", "_decode_batch")
        # (a killed node's tasks may never be reported finished: do not wait long for them)
        tasks = _wait_for_task_events(cluster.address, decode_names, 10 if lose_data_node else 60)
        actors = list_actors(address=cluster.address, limit=10_000, raise_on_missing_output=False)
        from pipeline.checkpoint import load_state_file

        rows_read = [load_state_file(c)["metrics"]["rows_read"]
                     for c in sorted((Path(storage) / name).glob("checkpoint_*")) if c.is_dir()]
        nodes = {"head": cluster.head_node.node_id, "trainer": trainer.node_id, "data": data.node_id}
        if "replacement" in shared:
            nodes["replacement"] = shared["replacement"].node_id
        return {
            "nodes": nodes, "removed_during_run": "removed_at" in shared, "rows_read": rows_read,
            "summary": {k: summary[k] for k in ("epochs", "steps", "loss", "samples_per_s", "wall_s",
                                                "resumed_from_epoch")},
            "decode_tasks": [{"name": t.name, "node_id": t.node_id, "state": t.state}
                             for t in tasks if any(n in (t.name or "") for n in decode_names)],
            "task_names": sorted({t.name for t in tasks if t.name}),
            "train_workers": [{"class": a.class_name, "node_id": a.node_id, "state": a.state}
                              for a in actors if "TrainWorker" in (a.class_name or "")],
            # Diagnostics: address auto-detection (warning: connected to the latest cluster;
            # error: refused), and the cleaner removing a placement group.
            "log_lines": _grep_session_logs(cluster, ("Connecting to latest cluster",
                                                      "Please specify the one to connect to",
                                                      "Failed to launch PlacementGroupCleaner",
                                                      "Cleaning up placement group")),
            "child_s": round(time.monotonic() - t0, 1),
        }
    finally:
        try:
            ray.shutdown()
        finally:
            cluster.shutdown()


class _stdout_to_stderr:
    """run_training prints its progress and summary: keep the child's stdout for the result line."""

    def __enter__(self):
        self._saved = sys.stdout
        sys.stdout = sys.stderr

    def __exit__(self, *exc):
        sys.stdout = self._saved


def _grep_session_logs(cluster, needles: tuple[str, ...]) -> dict[str, int]:
    """How often each needle appears in the session's log files (diagnostics only)."""
    counts = dict.fromkeys(needles, 0)
    logs = Path(cluster.head_node.get_session_dir_path()) / "logs"
    for p in logs.rglob("*"):
        if p.is_file() and p.suffix in (".err", ".out", ".log"):
            try:
                text = p.read_text(errors="replace")
            except OSError:
                continue
            for n in needles:
                counts[n] += text.count(n)
    return counts


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="child of test_multinode: run the 3-node simulation")
    ap.add_argument("--shards", required=True)
    ap.add_argument("--storage", required=True)
    ap.add_argument("--lose-data-node", action="store_true")
    a = ap.parse_args()
    result = child_main(a.shards, a.storage, a.lose_data_node)
    print(RESULT_TAG + json.dumps(result), flush=True)
