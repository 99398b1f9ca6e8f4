"""Ingest benchmark: samples/s delivered to a train worker's iterator (empty train step).

For stored images of 32 px (PNG, CIFAR-like) and 256 px (JPEG, ImageNet-like), on local disk and on
an S3 endpoint (a moto server this benchmark starts in a subprocess), it compares:

* ``ray``        - the project path: ``build_dataset`` -> ``streaming_split`` (what Ray Train does)
                   -> ``iter_torch_batches`` in a separate consumer process (the "train worker");
                   decode tasks get 1 logical CPU each, so at most P run at once;
* ``dataloader`` - plain webdataset + ``torch.utils.data.DataLoader`` with P worker processes, the
                   same decode function (:func:`pipeline.data.format.decode_image`) and batch size;
* ``decode``     - the raw decode limit: the encoded images preloaded in memory, one tight decode
                   loop per process, P processes (sum of their rates).

P = the number of CPU cores (at most 4). Each path runs a warm-up epoch first; the figure is the
next epoch. ``run(quick)`` returns two dicts per (size, storage): ray vs dataloader, and ray vs the
decode limit. Quick mode stays under a minute on 2 cores; numbers on a shared machine are noisy.
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

BATCH = 256


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto() -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, endpoint
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto server did not start")


def _synthetic(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth random images with mild noise: compress like natural images, not like white noise."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8), "RGB")
        img = np.asarray(small.resize((size, size), Image.BICUBIC), dtype=np.int16)
        img = img + rng.normal(0, 6, img.shape).astype(np.int16)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def _make_shards(url: str, storage, n: int, size: int, fmt: str) -> dict[str, Any]:
    from pipeline.data.sources import Source
    from pipeline.data.write import prepare
    px = _synthetic(n, size)
    labels = np.arange(n, dtype=np.int64) % 10
    src = Source(f"synthetic{size}", labels, [str(i) for i in range(10)], size, arrays=px)
    return prepare(src, url, storage=storage, fmt=fmt, shard_size=max(1, n // 8), val_fraction=0.0,
                   parallel="local", progress=False, echo=lambda m: None)


# --- Ray Data path -------------------------------------------------------------------------------

def _consume_remote():
    import ray

    @ray.remote(num_cpus=1)
    def consume(it, epochs: int) -> list[tuple[int, float]]:
        out = []
        for _ in range(epochs):
            t0, n = time.perf_counter(), 0
            for batch in it.iter_torch_batches(batch_size=BATCH):
                n += int(batch["label"].shape[0])  # empty train step
            out.append((n, time.perf_counter() - t0))
        return out
    return consume


def _ray_rate(url: str, storage, size: int, epochs: int) -> tuple[float, int]:
    import ray

    from pipeline.config import DataConfig
    from pipeline.data import build_dataset
    data = DataConfig(url=url, image_size=size, decode_num_cpus=1.0)
    ds = build_dataset(url, "train", data=data, storage=storage, seed=0, num_workers=1)
    it = ds.streaming_split(1, equal=True)[0]
    res = ray.get(_consume_remote().remote(it, epochs))
    n, dt = res[-1]
    return n / dt, n


# --- webdataset + DataLoader baseline ------------------------------------------------------------

def _open_streams(src, storage=None):
    from pipeline.storage import fsspec_fs
    for s in src:
        fs, path = fsspec_fs(s["url"], storage)
        yield {"url": s["url"], "stream": fs.open(path, "rb", block_size=4 << 20)}


class _Decode:
    def __init__(self, size: int):
        self.size = size

    def __call__(self, sample: dict) -> tuple[np.ndarray, int]:
        from pipeline.data.format import decode_image
        data = sample.get("png") or sample.get("jpg")
        img = decode_image(data, self.size)
        return (img if img is not None else np.zeros((self.size, self.size, 3), np.uint8),
                int(sample.get("cls", b"-1")))


def _dataloader_rate(urls: list[str], storage, size: int, procs: int, epochs: int) -> tuple[float, int]:
    import functools

    import torch
    import webdataset as wds
    from webdataset.tariterators import group_by_keys, tar_file_expander
    pipe = wds.DataPipeline(
        wds.SimpleShardList(urls), wds.split_by_worker, functools.partial(_open_streams, storage=storage),
        tar_file_expander, group_by_keys, wds.map(_Decode(size)), wds.batched(BATCH, partial=True))
    loader = torch.utils.data.DataLoader(pipe, batch_size=None, num_workers=procs, persistent_workers=True,
                                         multiprocessing_context="fork")
    rates = []
    for _ in range(epochs):
        t0, n = time.perf_counter(), 0
        for images, labels in loader:
            n += int(labels.shape[0])
        rates.append((n, time.perf_counter() - t0))
    del loader
    n, dt = rates[-1]
    return n / dt, n


# --- raw decode limit ----------------------------------------------------------------------------

def _decode_loop(args) -> tuple[int, float]:
    blobs, size = args
    from pipeline.data.format import decode_image
    t0 = time.perf_counter()
    for b in blobs:
        decode_image(b, size)
    return len(blobs), time.perf_counter() - t0


def _decode_limit(local_dir: str, size: int, procs: int) -> float:
    import tarfile
    blobs = []
    for name in sorted(os.listdir(local_dir)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(local_dir, name)) as tf:
                blobs += [tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith((".png", ".jpg"))]
    _decode_loop((blobs[:16], size))  # warm imports
    chunks = [(blobs[i::procs], size) for i in range(procs)]
    with mp.get_context("fork").Pool(procs) as pool:
        res = pool.map(_decode_loop, chunks)
    return sum(n / dt for n, dt in res if dt > 0)


# -------------------------------------------------------------------------------------------------

def run(quick: bool = True) -> list[dict[str, Any]]:
    import ray

    from pipeline.config import StorageConfig
    from pipeline.storage import fsspec_fs, join_url

    procs = max(1, min(4, os.cpu_count() or 1))
    configs = [(32, "png", 2000 if quick else 20000), (256, "jpg", 240 if quick else 2400)]
    epochs = 2
    tmp = tempfile.mkdtemp(prefix="bench-ingest-")
    moto, endpoint = _start_moto()
    s3 = StorageConfig(endpoint_url=endpoint)
    # dummy credentials for the local moto server, inherited by the Ray workers started below
    dummy = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    saved_env = {k: os.environ.get(k) for k in dummy}
    os.environ.update(dummy)
    started_ray = False
    results: list[dict[str, Any]] = []
    try:
        fs, _ = fsspec_fs("s3://bench", s3)
        fs.call_s3("create_bucket", Bucket="bench")
        if not ray.is_initialized():
            ray.init(num_cpus=procs + 1, include_dashboard=False, logging_level=logging.ERROR,
                     log_to_driver=False)
            started_ray = True
        from ray.data import DataContext
        DataContext.get_current().enable_progress_bars = False
        DataContext.get_current().print_on_execution_start = False
        for size, fmt, n in configs:
            local = os.path.join(tmp, f"{size}px")
            idx = _make_shards(local, None, n, size, fmt)
            remote = f"s3://bench/{size}px"
            for name in sorted(os.listdir(local)):
                if name.endswith(".tar") or name == "index.json":
                    fs.put_file(os.path.join(local, name), f"bench/{size}px/{name}")
            decode = _decode_limit(local, size, procs)
            shard_names = [s["name"] for s in idx["splits"]["train"]["shards"]]
            for where, url, storage in (("local", local, None), ("s3", remote, s3)):
                urls = [join_url(url, s) for s in shard_names]
                ray_rate, n_ray = _ray_rate(url, storage, size, epochs)
                dl_rate, n_dl = _dataloader_rate(urls, storage, size, procs, epochs)
                common = {"unit": "samples/s", "higher_is_better": True, "image_size": size, "format": fmt,
                          "storage": where, "samples": n_ray, "processes": procs, "batch_size": BATCH,
                          "quick": quick}
                results.append({"name": f"ingest/ray_vs_dataloader/{size}px/{where}", "value": round(ray_rate, 1),
                                "baseline": round(dl_rate, 1), "ratio": round(ray_rate / dl_rate, 3),
                                "baseline_name": f"webdataset+DataLoader({procs} workers)",
                                "baseline_samples": n_dl, **common})
                results.append({"name": f"ingest/ray_vs_decode_limit/{size}px/{where}", "value": round(ray_rate, 1),
                                "baseline": round(decode, 1), "ratio": round(ray_rate / decode, 3),
                                "baseline_name": f"decode only, {procs} processes", **common})
    finally:
        if started_ray:
            ray.shutdown()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        moto.terminate()
        try:
            moto.wait(10)
        except subprocess.TimeoutExpired:
            moto.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    return results


if __name__ == "__main__":
    quick = "--full" not in sys.argv[1:]
    for r in run(quick=quick):
        print(json.dumps(r), flush=True)
