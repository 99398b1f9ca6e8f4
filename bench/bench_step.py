"""Step benchmark: training samples/s of the pipeline's worker loop vs a bare PyTorch loop.

Same model, batch, augmentation, loss, optimiser and torch threads on both sides, one worker:

* ``pipeline`` - a real :func:`pipeline.train.run_training` (``num_workers=1``) on digits shards in a
  temp dir: Ray Train V2 worker, Ray Data decode + ``iter_torch_batches``, TensorBoard logging every
  ``log_every_steps``, a checkpoint per epoch. Figure: the per-epoch ``samples_per_s`` the worker
  itself reports (read back from the run's TensorBoard events, ``perf/epoch_samples_per_s``), the
  first epoch excluded (warm-up: Ray Data start, kernel/allocator warm-up), median of the rest.
  ``data_wait_fraction`` is the share of epoch time the loop spent waiting for its next batch;
  ``pipeline_epochs_collective_wait`` the share spent waiting for the other workers' step vote
  (``pipeline.worker.StepAgreement``; ~0 with one worker).
* ``bare`` - a plain Python loop over the same images held in memory as one uint8 tensor (a
  fresh random permutation per epoch): ``MultiViewAugment`` -> ``CACRModel`` -> ``cacr_loss`` /
  ``infonce_loss`` -> backward -> optimiser and scheduler step, written out here with the plain
  ``cacr/`` building blocks and NOT through ``cacr.methods`` / ``pipeline.worker.train_step`` on
  purpose (it is the yardstick the method layer and the worker loop are measured against), timed
  per epoch the same way (first epoch excluded, median). It runs once
  before and once after the pipeline run and the epochs of both are pooled, so slow phases of a
  shared machine hit both sides alike.

``ratio`` = pipeline / bare (target >= 0.9). Diagnostics on the same line (Linux, when this
process started Ray): ``cpu_time_ratio`` = bare CPU-s per sample / the train worker process's
CPU-s per sample (sampled from /proc; ~1.0 means the worker loop itself adds no work, and a
lower wall ``ratio`` then comes from waiting or from losing the core to other processes),
``worker_cpu_share`` per epoch (worker CPU time / epoch wall time), ``decode_processes_started``
and ``ray_worker_processes_started`` (Ray worker processes started during the run: each one
imports the decode function's modules). ``load_avg_1m`` before/after: on a shared machine read
the figures with it. Threads: ``torch_threads = max(1, cores // 2)`` on
both sides, leaving the other cores to Ray Data's decode tasks and Ray itself (as ``cpus_per_worker``
would on a real node); on a 2-core machine that is 1 thread.

Configs: full - the digits default (narrow_resnet width 16, 32 px, V = 5, batch 128, SGD), 5 epochs
of 11 steps; quick - 16 px, width 8, V = 2, batch 64 (22 steps/epoch), 4 epochs (~1.5 min on an idle
2-core machine; quick epochs are short, so per-epoch fixed costs weigh more than in full mode).
With CUDA (full and quick) one more pair: ResNet-50 at 224 px, V = 2, batch 128, bf16 autocast,
channels_last, the ImageNet augmentation recipe of ``conf/imagenet-symmetric.yaml``, on synthetic 224-px JPEG
shards decoded by the train worker on the GPU (``data.decode=worker``, nvjpeg).

Starts Ray itself when it is not running (``num_cpus = max(4, cores)``). Data and runs live in temp
dirs that are removed afterwards. Usage: ``python bench/run.py [--quick] step`` or
``python bench/bench_step.py [--quick]``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TARGET = 0.9

# The digits default (conf/digits.yaml / Config defaults) with one worker.
FULL = {"overrides": [], "epochs": 5}
QUICK = {"overrides": ["batch_size=64", "data.image_size=16", "augment.crop_size=16", "model.width=8",
                       "model.head_hidden=64", "model.head_out=32", "loss.num_positives=1"],
         "epochs": 4}
# ResNet-50 / 224 px / V = 2 on the GPU: conf/imagenet-symmetric.yaml made single-worker and local.
# The ImageNet-grade input path: JPEG bytes cached once in the object store, decoded in the train
# worker on the GPU (nvjpeg), full-image crops there too; CPU decode tasks would cap the step at
# the host's PIL rate.
GPU_OVERRIDES = ["num_workers=1", "cpus_per_worker=1", "loss.num_positives=1", "data.data_resource=null",
                 "data.decode_num_cpus=1.0", "model.sync_batchnorm=false", "keep_checkpoints=1",
                 "max_failures=0", "optim.warmup_epochs=0.5", "data.decode=worker",
                 "data.cache_budget_mb=4096"]


def _threads() -> int:
    return max(1, (os.cpu_count() or 1) // 2)


def _ensure_ray() -> None:
    from pipeline.ray_start import start_ray

    # the commands' own start-up (RAY_ADDRESS joins a cluster, else a NEW local instance); no
    # dashboard: the benchmark stops no trial early, and the dashboard would share the cores
    start_ray(num_cpus=4, use_gpu=None, dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def _config(shards: str, runs: str, extra: list[str], epochs: int, path: str | None = None):
    from pipeline.config import load_config

    return load_config(path, [*extra, "num_workers=1", f"torch_threads={_threads()}", f"epochs={epochs}",
                              f"data.url={shards}", "data.source=null", "data.val_split=",
                              f"storage_path={runs}", f"name=bench-step-{uuid.uuid4().hex[:8]}",
                              "keep_checkpoints=1"])


def _load_images(cfg) -> torch.Tensor:
    """The training split decoded at ``data.image_size`` into one uint8 (N, S, S, 3) tensor."""
    from pipeline.data import build_dataset, split_batch

    ds = build_dataset(cfg.data.url, "train", data=cfg.data, storage=cfg.storage, shuffle=False)
    xs = [split_batch(b)[0] for b in ds.iter_torch_batches(batch_size=1024)]
    return torch.cat(xs).contiguous()


# ---------------------------------------------------------------------------------------------
# Bare loop


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(cfg, images: torch.Tensor, epochs: int, device: torch.device | None = None) -> list[dict]:
    """The worker's step without Ray: per-epoch ``samples_per_s`` and ``epoch_time_s``."""
    from cacr.augment import MultiViewAugment
    from cacr.loss import cacr_loss, infonce_loss
    from cacr.model import CACRModel
    from cacr.optim import build_optimizer, warmup_cosine

    device = device or torch.device("cpu")
    torch.set_num_threads(cfg.torch_threads or _threads())
    use_bf16 = device.type == "cuda"
    torch.manual_seed(cfg.seed)
    m, lc = cfg.model, cfg.loss
    model = CACRModel(m.arch, small_images=m.small_images, width=m.width, head_hidden=m.head_hidden,
                      head_out=m.head_out, head_layers=m.head_layers, norm=m.norm)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(device)
    B, V = cfg.batch_size, cfg.num_views
    steps = images.shape[0] // B
    optimizer = build_optimizer(cfg.optim.name, model, lr=cfg.optim.base_lr * B / 256,
                                momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
    warmup = int(round(cfg.optim.warmup_epochs * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(
        s, warmup_steps=warmup, total_steps=steps * epochs, min_ratio=cfg.optim.min_lr_ratio))
    augment = MultiViewAugment(cfg.augment, V)
    if lc.name == "cacr":
        def loss_fn(z):
            return cacr_loss(z, alpha=lc.alpha, beta=lc.beta, tau_pos=lc.tau_pos, tau_neg=lc.tau_neg,
                             detach_weights=lc.detach_weights, same_view_negatives=lc.same_view_negatives)
    else:
        def loss_fn(z):
            return infonce_loss(z, temperature=lc.temperature)
    aug_gen = torch.Generator(device="cpu")
    aug_gen.manual_seed(cfg.seed * 1000)
    order_gen = torch.Generator(device="cpu")
    order_gen.manual_seed(cfg.seed)
    out_epochs = []
    for _ in range(epochs):
        model.train()
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        sum_loss = torch.zeros((), device=device)
        perm = torch.randperm(images.shape[0], generator=order_gen)
        for i in range(steps):
            batch = images[perm[i * B:(i + 1) * B]].to(device, non_blocking=True)
            views = augment(batch, generator=aug_gen, channels_last=cfg.channels_last)
            x = views.flatten(0, 1)  # channels-last strides already when cfg.channels_last
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                z = model(x)
            z = z.float().view(V, batch.shape[0], -1)
            out = loss_fn(z)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            sched.step()
            sum_loss += out.loss.detach()
        loss = float(sum_loss) / steps  # one sync per epoch, as the worker's epoch-end reduce
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        out_epochs.append({"samples_per_s": steps * B / dt, "epoch_time_s": dt, "loss": loss,
                           "cpu_s": cpu})
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()  # leave the GPU memory to the pipeline's worker
    return out_epochs


# ---------------------------------------------------------------------------------------------
# Pipeline run


def _epoch_scalars(logdir: str) -> list[dict]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(logdir, size_guidance={"scalars": 0})
    ea.Reload()
    sps = ea.Scalars("perf/epoch_samples_per_s")
    wait = {e.step: e.value for e in ea.Scalars("perf/epoch_data_wait_fraction")}
    coll = {e.step: e.value for e in ea.Scalars("perf/epoch_collective_wait_fraction")}
    return [{"samples_per_s": e.value, "data_wait_fraction": wait.get(e.step, float("nan")),
             "collective_wait_fraction": coll.get(e.step, float("nan")), "step": e.step,
             "wall_time": e.wall_time} for e in sorted(sps, key=lambda e: e.step)]


def _raylet_pid() -> int | None:
    from pipeline.ray_compat import raylet_pid

    try:
        return raylet_pid()
    except Exception:  # noqa: BLE001 - no process view (tests/pipeline/test_ray_compat.py says why)
        return None


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user + system CPU seconds) of a live process, from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / tick


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class _RaySampler(threading.Thread):
    """Every ``period`` s: the CPU seconds of the Ray Train worker process, and which worker
    processes our raylet has started (a worker that imports torch costs ~2 CPU-s to start).

    Linux only (/proc); does nothing when the raylet is not ours."""

    def __init__(self, raylet: int | None, period: float = 0.2):
        super().__init__(daemon=True)
        self.raylet, self.period = raylet, period
        self.samples: list[tuple[float, float]] = []   # (wall time.time(), worker CPU s)
        self.children: dict[int, set[str]] = {}   # pid -> process titles seen
        self.baseline_children: set[int] = set()
        self._halt = threading.Event()
        self._worker: int | None = None

    def _scan(self) -> set[int]:
        kids = set()
        for d in os.listdir("/proc"):
            if d.isdigit():
                st = _proc_stat(int(d))
                if st and st[0] == self.raylet:
                    kids.add(int(d))
        return kids

    def run(self) -> None:
        if self.raylet is None or not os.path.isdir("/proc"):
            return
        self.baseline_children = self._scan()
        while not self._halt.is_set():
            for pid in self._scan():
                title = _cmdline(pid).strip()
                self.children.setdefault(pid, set()).add(title)
                if self._worker is None and "RayTrainWorker" in title:
                    self._worker = pid
            if self._worker is not None:
                st = _proc_stat(self._worker)
                if st:
                    self.samples.append((time.time(), st[1]))
            self._halt.wait(self.period)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)

    def worker_cpu(self, t0: float, t1: float) -> float | None:
        """Worker CPU seconds between wall times t0 and t1 (linear interpolation)."""
        s = self.samples
        if len(s) < 2 or t0 < s[0][0] or t1 > s[-1][0]:
            return None

        def at(t):
            for (ta, ca), (tb, cb) in zip(s, s[1:]):
                if ta <= t <= tb:
                    return ca if tb == ta else ca + (cb - ca) * (t - ta) / (tb - ta)
            return s[-1][1]
        return at(t1) - at(t0)

    def started(self) -> int:
        """Worker processes started by the raylet while sampling (decode tasks, Train actors)."""
        return len(set(self.children) - self.baseline_children)


def pipeline_run(cfg) -> tuple[list[dict], dict[str, Any], dict[str, Any]]:
    """A real ``run_training``; its per-epoch figures (from TensorBoard), the summary, and what
    the sampler saw (worker CPU seconds per epoch, worker processes started)."""
    from pipeline.train import run_training

    sampler = _RaySampler(_raylet_pid())
    sampler.start()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the JSON lines
            summary = run_training(cfg)
    finally:
        sampler.stop()
    epochs = _epoch_scalars(summary["tensorboard_logdir"])
    samples_per_epoch = (summary["steps"] // max(1, len(epochs))) * cfg.global_batch
    for e in epochs:
        end = e["wall_time"]
        cpu = sampler.worker_cpu(end - samples_per_epoch / e["samples_per_s"], end)
        e["worker_cpu_s"] = cpu
    procs = {"ray_worker_processes_started": sampler.started(),
             "decode_processes_started": sum(any("ReadTarShards" in t for t in titles)
                                             for p, titles in sampler.children.items()
                                             if p not in sampler.baseline_children)}
    return epochs, summary, procs


def _steady(epochs: list[dict], key: str = "samples_per_s") -> list[float]:
    vals = [e[key] for e in epochs[1:]] or [e[key] for e in epochs]
    return [v for v in vals if v == v]


def _compare(name: str, cfg, images: torch.Tensor, device: torch.device, context: dict) -> dict:
    epochs = cfg.epochs
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    bare_a = bare_loop(cfg, images, epochs, device)
    pipe, summary, procs = pipeline_run(cfg)
    bare_b = bare_loop(cfg, images, epochs, device)
    bare_vals = _steady(bare_a) + _steady(bare_b)
    pipe_vals = _steady(pipe)
    value, baseline = statistics.median(pipe_vals), statistics.median(bare_vals)
    wait = statistics.median(_steady(pipe, "data_wait_fraction") or [float("nan")])
    samples_per_epoch = (images.shape[0] // cfg.batch_size) * cfg.batch_size
    # CPU seconds per sample: the train worker process (pipeline) vs the bare loop's process.
    # Contention from other jobs inflates wall time, much less CPU time: this separates "the
    # loop does more work" from "the machine was busy".
    pipe_cpu = [e["worker_cpu_s"] / samples_per_epoch for e in pipe[1:] if e.get("worker_cpu_s")]
    bare_cpu = [e["cpu_s"] / samples_per_epoch for e in bare_a[1:] + bare_b[1:]]
    cpu = {}
    if pipe_cpu and bare_cpu:
        pc, bc = statistics.median(pipe_cpu), statistics.median(bare_cpu)
        cpu = {"worker_cpu_ms_per_sample": round(pc * 1e3, 3), "bare_cpu_ms_per_sample": round(bc * 1e3, 3),
               "cpu_time_ratio": round(bc / pc, 3),
               "worker_cpu_share": [round(e["worker_cpu_s"] * e["samples_per_s"] / samples_per_epoch, 2)
                                    if e.get("worker_cpu_s") else None for e in pipe]}
    return {
        "name": name, "value": round(value, 1), "baseline": round(baseline, 1),
        "ratio": round(value / baseline, 3), "unit": "samples/s", "higher_is_better": True,
        "target_ratio": TARGET, "meets_target": value / baseline >= TARGET,
        "data_wait_fraction": round(wait, 3), **cpu, **procs,
        "pipeline_epochs_samples_per_s": [round(e["samples_per_s"], 1) for e in pipe],
        "pipeline_epochs_data_wait": [round(e["data_wait_fraction"], 3) for e in pipe],
        "pipeline_epochs_collective_wait": [round(e["collective_wait_fraction"], 3) for e in pipe],
        "bare_epochs_samples_per_s": [round(e["samples_per_s"], 1) for e in bare_a + bare_b],
        "best_epoch_ratio": round(max(pipe_vals) / max(bare_vals), 3),
        "pipeline_wall_s": summary.get("wall_s"), "steps_per_epoch": images.shape[0] // cfg.batch_size,
        "epochs": epochs, "batch_size": cfg.batch_size, "views": cfg.num_views, "arch": cfg.model.arch,
        "width": cfg.model.width, "image_size": cfg.data.image_size, "crop_size": cfg.augment.crop_size,
        "torch_threads": cfg.torch_threads, "device": str(device), "bf16": device.type == "cuda",
        "channels_last": cfg.channels_last,
        "load_avg_1m": [load0, os.getloadavg()[0] if hasattr(os, "getloadavg") else None], **context,
    }


def _synthetic_shards(url: str, n: int, size: int) -> None:
    """``n`` smooth random ``size``-px RGB images (JPEG q90), 10 labels, one train split."""
    from PIL import Image

    from pipeline.data.sources import Source
    from pipeline.data.write import prepare

    rng = np.random.default_rng(0)
    px = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 255, (7, 7, 3), dtype=np.uint8), "RGB")
        img = np.asarray(small.resize((size, size), Image.BICUBIC), dtype=np.int16)
        px[i] = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    labels = np.arange(n, dtype=np.int64) % 10
    src = Source(f"synthetic{size}", labels, [str(i) for i in range(10)], size, arrays=px)
    prepare(src, url, fmt="jpg", shard_size=max(1, n // 16), val_fraction=0.0, parallel="local",
            progress=False, echo=lambda m: None)


def run(quick: bool) -> list[dict]:
    from pipeline.data import prepare

    _ensure_ray()
    results = []
    tmp = tempfile.mkdtemp(prefix="bench-step-")
    try:
        shards = os.path.join(tmp, "digits")
        prepare("digits", shards, progress=False, echo=lambda m: None)
        spec = QUICK if quick else FULL
        cfg = _config(shards, os.path.join(tmp, "runs"), spec["overrides"], spec["epochs"])
        images = _load_images(cfg)
        name = "step.cpu.quick" if quick else "step.cpu.digits_default"
        results.append(_compare(name, cfg, images, torch.device("cpu"), {"data": "digits"}))
        if torch.cuda.is_available():
            results.append(_gpu_resnet50(tmp, quick))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def _gpu_resnet50(tmp: str, quick: bool) -> dict:
    n = 2048 if quick else 8192
    shards = os.path.join(tmp, "synthetic224")
    _synthetic_shards(shards, n, 224)
    cfg = _config(shards, os.path.join(tmp, "runs"), [*GPU_OVERRIDES, "use_gpu=true"], 3 if quick else 4,
                  path=str(REPO / "conf" / "imagenet-symmetric.yaml"))
    images = _load_images(cfg)
    return _compare("step.cuda.resnet50_224_v2_bf16", cfg, images, torch.device("cuda", 0),
                    {"data": f"synthetic224 jpeg x{n}", "gpu": torch.cuda.get_device_name(0)})


if __name__ == "__main__":
    for line in run(quick="--quick" in sys.argv[1:]):
        print(json.dumps(line), flush=True)
