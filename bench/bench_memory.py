"""Memory while streaming: peak RSS of the driver and the train workers, and object-store bytes
spilled to disk, for a streamed train set 1x, 2x and 4x the size of the object store.

Each size runs in a fresh subprocess with its own local Ray whose object store is small
(``STORE_MB``), training 2 epochs (the TINY model, 2 workers) with the cache off
(``data.cache_budget_mb=0``: the set streams through the store every epoch). The shard set is
synthetic: 128 px noise PNGs (incompressible, so the shards' bytes on disk and the decoded bytes in
the store are alike), one shard prepared and then copied to reach the size.

Lines: ``memory_worker_peak_rss_<k>x`` and ``memory_driver_peak_rss_<k>x`` (MB; baseline: the
same at 1x; flat = bounded), ``memory_spilled_<k>x`` (MB spilled; baseline: the set's MB).
``peak_by_epoch_mb`` in each line gives each kind's peak RSS within epoch 1 and within epoch 2
(epoch 3 = after training; holding on to streamed data would show as growth from 1 to 2). tests/faults/test_bounded_memory.py runs the
4x child and asserts "no spill".

Child: ``python bench/bench_memory.py --child --scale K --store-mb M --work DIR`` prints one JSON
line tagged ``MEMORY_RESULT``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STORE_MB = 80                 # Ray's minimum object store is 75 MiB
IMAGE = 128                   # decoded canvas side: 48 KiB per sample
PER_SHARD = 128
RESULT_TAG = "MEMORY_RESULT "
TINY = ["batch_size=64", "num_workers=2", "cpus_per_worker=0.5", f"data.image_size={IMAGE}",
        "augment.crop_size=16", "model.width=8", "model.head_hidden=64", "model.head_out=32",
        "loss.num_positives=1", "log_every_steps=50", "optim.warmup_epochs=0.5", "data.val_split=",
        "data.source=null", "data.cache_budget_mb=0", "epochs=2", "max_failures=0"]


def make_set(out: Path, target_bytes: int) -> dict:
    """A shard set of at least ``target_bytes`` on disk: one prepared shard of noise PNGs, copied."""
    from PIL import Image

    from pipeline.data import prepare

    src = out.parent / "src"
    rng = np.random.default_rng(0)
    for i in range(PER_SHARD):
        d = src / f"c{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (IMAGE, IMAGE, 3), dtype=np.uint8)).save(d / f"{i:04d}.png")
    index = prepare(str(src), str(out), shard_size=PER_SHARD, image_size=IMAGE, val_fraction=0,
                    progress=False, echo=lambda m: None, parallel="local")
    shutil.rmtree(src)
    split = index["splits"]["train"]
    first = split["shards"][0]
    copies = max(1, -(-target_bytes // first["bytes"]))
    for k in range(1, copies):
        name = f"train-{k:06d}.tar"
        shutil.copyfile(out / first["name"], out / name)
        split["shards"].append({**first, "name": name})
    split["samples"] = sum(s["samples"] for s in split["shards"])
    (out / "index.json").write_text(json.dumps(index))
    return {"shards": copies, "samples": split["samples"], "bytes": copies * first["bytes"]}


class RssWatch:
    """Samples the peak RSS (VmHWM) of this process and of its descendants, by kind, per epoch."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.peak: dict[str, int] = {}
        self.by_epoch: dict[str, dict[int, int]] = {}   # kind -> epoch -> peak current RSS in it
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _epoch(self) -> int:
        return 1 + sum(1 for c in self.run_dir.glob("checkpoint_*") if (c / "manifest.json").is_file())

    def _loop(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            epoch = self._epoch()
            for pid in [me, *_descendants(me)]:
                kind, hwm, rss = _kind_and_rss(pid, me)
                if kind:
                    self.peak[kind] = max(self.peak.get(kind, 0), hwm)
                    per = self.by_epoch.setdefault(kind, {})
                    per[epoch] = max(per.get(epoch, 0), rss)
            time.sleep(0.25)

    def stop(self) -> None:
        self._stop.set()
        self._t.join()


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


def _kind_and_rss(pid: int, driver: int) -> tuple[str | None, int, int]:
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        status = open(f"/proc/{pid}/status").read()
    except OSError:
        return None, 0, 0
    kb = {ln.split(":")[0]: int(ln.split()[1]) for ln in status.splitlines()
          if ln.startswith(("VmHWM:", "VmRSS:"))}
    if pid == driver:
        kind = "driver"
    elif "RayTrainWorker" in cmd:
        kind = "train_worker"
    elif cmd.startswith("ray::"):
        kind = "ray_worker"          # data tasks, the split coordinator, the Train controller
    else:
        kind = None                  # raylet, GCS, object store: Ray's own daemons
    return kind, kb.get("VmHWM", 0) << 10, kb.get("VmRSS", 0) << 10


def child(scale: float, store_mb: int, work: Path) -> dict:
    import logging

    from pipeline import ray_compat
    from pipeline.config import load_config
    from pipeline.ray_start import start_ray
    from pipeline.train import run_training

    made = make_set(work / "shards", int(scale * store_mb * (1 << 20)))
    start_ray(num_cpus=6, dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
              object_store_memory=store_mb << 20)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    run_dir = work / "runs" / "mem"
    watch = RssWatch(run_dir)
    t0 = time.perf_counter()
    real_stdout, sys.stdout = sys.stdout, sys.stderr  # keep stdout for the result line
    try:
        out = run_training(load_config(None, [*TINY, f"data.url={work / 'shards'}", "name=mem",
                                              f"storage_path={work / 'runs'}"]))
    finally:
        sys.stdout = real_stdout
    wall = time.perf_counter() - t0
    watch.stop()
    stats = ray_compat.object_store_stats()
    return {"scale": scale, "store_mb": store_mb, "set": made, "steps": out["steps"],
            "rows_read": out["rows_read"], "spilled_bytes": stats["spilled"],
            "fallback_bytes": stats["fallback"], "capacity_bytes": stats["capacity"],
            "peak_rss": watch.peak, "peak_by_epoch": watch.by_epoch, "wall_s": round(wall, 1)}


def run_child(scale: float, store_mb: int = STORE_MB, timeout: float = 900) -> dict:
    """One measurement in a fresh process with its own small-store Ray."""
    work = Path(tempfile.mkdtemp(prefix="cacr-bench-mem-"))
    raytmp = tempfile.mkdtemp(prefix="rbm", dir="/tmp")  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_TMPDIR=raytmp, PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    try:
        r = subprocess.run([sys.executable, __file__, "--child", "--scale", str(scale), "--store-mb",
                            str(store_mb), "--work", str(work)], env=env, capture_output=True, text=True,
                           timeout=timeout, start_new_session=True)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith(RESULT_TAG)]
        if r.returncode != 0 or not lines:
            raise RuntimeError(f"memory child failed (rc {r.returncode}): {r.stderr[-3000:]}")
        return json.loads(lines[-1][len(RESULT_TAG):])
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(raytmp, ignore_errors=True)


def run(quick: bool = False) -> list[dict]:
    scales = (1, 2) if quick else (1, 2, 4)
    res = {k: run_child(k) for k in scales}
    base = res[1]
    lines = []
    mb = 1 << 20
    for k, r in res.items():
        ctx = {"scale": k, "store_mb": r["store_mb"], "set_mb": round(r["set"]["bytes"] / mb, 1),
               "samples": r["set"]["samples"],
               "peak_by_epoch_mb": {kind: {e: round(v / mb) for e, v in per.items()}
                                    for kind, per in r["peak_by_epoch"].items()},
               "wall_s": r["wall_s"], "fallback_mb": round(r["fallback_bytes"] / mb, 1)}
        lines.append({"name": f"memory_spilled_{k}x", "value": round(r["spilled_bytes"] / mb, 1),
                      "baseline": ctx["set_mb"], "ratio": round(r["spilled_bytes"] / r["set"]["bytes"], 4),
                      "unit": "MB", "higher_is_better": False, **ctx})
        if k == 1:
            continue
        for kind in ("train_worker", "driver"):
            v, b = r["peak_rss"].get(kind, 0) / mb, base["peak_rss"].get(kind, 0) / mb
            lines.append({"name": f"memory_{kind}_peak_rss_{k}x", "value": round(v), "baseline": round(b),
                          "ratio": round(v / b, 3) if b else None, "unit": "MB",
                          "higher_is_better": False, **ctx})
    return lines


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--scale", type=float, default=4)
    ap.add_argument("--store-mb", type=int, default=STORE_MB)
    ap.add_argument("--work")
    a = ap.parse_args()
    if a.child:
        print(RESULT_TAG + json.dumps(child(a.scale, a.store_mb, Path(a.work))), flush=True)
    else:
        for line in run():
            print(json.dumps(line))
