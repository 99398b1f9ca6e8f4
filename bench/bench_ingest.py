"""Ingest benchmark: samples/s and time to the first batch delivered to one train worker's iterator
(empty train step), per epoch, side by side with webdataset + DataLoader in the same run.

Sets: the 32 px digits (PNG, square) and a 224 px real-photo set (``skimage-photos``: JPEG random
crops of scikit-image's bundled photos, aspect kept, longer side 224, on zero canvases + ``hw``);
each on local disk and on an S3 endpoint (a moto server this benchmark starts in a subprocess).

* ``ray``        - the project path: ``build_train_dataset`` (materialised once when it fits
                   ``data.cache_budget_mb``) -> ``iter_train_batches`` in a separate consumer process
                   (the "train worker"), a new (seed, epoch) sample order every epoch;
* ``streaming``  - the same with the cache off: one Ray Data execution per epoch (the old path);
* ``worker_decode`` - cached encoded bytes, decoded in the consumer (torchvision, CPU here);
* ``dataloader`` - plain webdataset + ``torch.utils.data.DataLoader`` with P persistent worker
                   processes, the same decode (format.decode_image / decode_aspect + canvas);
* ``decode``     - the raw decode limit: encoded images preloaded, P processes (sum of rates).

P = the number of CPU cores (at most 4). Every path runs 3 epochs; lines: ``ray_vs_dataloader``
(whole epochs after the first), ``steady`` (after each epoch's first batch), ``first_batch`` (worst
epoch after the first, lower is better; per-epoch lists included), ``ray_vs_decode_limit``, and
``streaming``/``worker_decode`` vs DataLoader. Numbers on a shared machine are noisy.
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


# --- Ray Data path (the consumer = one "train worker" process) --------------------------------

def _consume_remote():
    import ray

    @ray.remote(num_cpus=1)
    def consume(shard, epochs: int, decode: str) -> list[tuple[int, float, float]]:
        from pipeline.data import iter_train_batches
        out = []
        for epoch in range(epochs):
            t0, n, first = time.perf_counter(), 0, None
            for batch in iter_train_batches(shard, batch_size=BATCH, device="cpu", decode=decode,
                                            prefetch_batches=2, epoch=epoch, rank=0, world_size=1):
                n += int(batch["label"].shape[0])  # empty train step
                if first is None:
                    first = time.perf_counter() - t0
            out.append((n, first or 0.0, time.perf_counter() - t0))
        return out
    return consume


def _ray_epochs(url: str, storage, size: int, epochs: int, *, decode: str = "cpu_tasks",
                cache: bool = True) -> list[tuple[int, float, float]]:
    """Per epoch (samples, first-batch s, epoch s). Epoch 0's first batch includes building (and,
    when cached, materialising) the dataset, as a training run pays it."""
    import ray

    from pipeline.config import DataConfig
    from pipeline.data import build_train_dataset, is_cached
    data = DataConfig(url=url, image_size=size, decode_num_cpus=1.0, decode=decode,
                      cache_budget_mb=1024.0 if cache else 0.0)
    t0 = time.perf_counter()
    ds = build_train_dataset(url, data=data, storage=storage, seed=0, num_workers=1)
    shard = ds if is_cached(ds) else ds.streaming_split(1, equal=True)[0]
    build = time.perf_counter() - t0
    res = ray.get(_consume_remote().remote(shard, epochs, decode))
    return [(n, first + (build if e == 0 else 0.0), dt + (build if e == 0 else 0.0))
            for e, (n, first, dt) in enumerate(res)]


# --- webdataset + DataLoader baseline ------------------------------------------------------------

def _open_streams(src, storage=None):
    from pipeline.storage import fsspec_fs
    for s in src:
        fs, path = fsspec_fs(s["url"], storage)
        yield {"url": s["url"], "stream": fs.open(path, "rb", block_size=4 << 20)}


class _Decode:
    """The same decode (and, for aspect sets, the same canvas + hw) the Ray path delivers."""

    def __init__(self, size: int, aspect: bool):
        self.size, self.aspect = size, aspect

    def __call__(self, sample: dict) -> tuple[np.ndarray, np.ndarray, int]:
        from pipeline.data.format import decode_aspect, decode_image
        data = sample.get("png") or sample.get("jpg")
        canvas = np.zeros((self.size, self.size, 3), np.uint8)
        img = decode_aspect(data, self.size) if self.aspect else decode_image(data, self.size)
        hw = np.zeros(2, np.int32)
        if img is not None:
            canvas[:img.shape[0], :img.shape[1]] = img
            hw[:] = img.shape[:2]
        return canvas, hw, int(sample.get("cls", b"-1"))


def _dataloader_epochs(urls: list[str], storage, size: int, aspect: bool, procs: int,
                       epochs: int) -> list[tuple[int, float, float]]:
    import functools

    import torch
    import webdataset as wds
    from webdataset.tariterators import group_by_keys, tar_file_expander
    pipe = wds.DataPipeline(
        wds.SimpleShardList(urls), wds.split_by_worker, functools.partial(_open_streams, storage=storage),
        tar_file_expander, group_by_keys, wds.map(_Decode(size, aspect)), wds.batched(BATCH, partial=True))
    t0 = time.perf_counter()
    loader = torch.utils.data.DataLoader(pipe, batch_size=None, num_workers=procs, persistent_workers=True,
                                         multiprocessing_context="fork")
    out = []
    for e in range(epochs):
        t_epoch = t0 if e == 0 else time.perf_counter()  # epoch 0 includes starting the workers
        n, first = 0, None
        for images, hw, labels in loader:
            n += int(labels.shape[0])
            if first is None:
                first = time.perf_counter() - t_epoch
        out.append((n, first or 0.0, time.perf_counter() - t_epoch))
    del loader
    return out


def _steady(epochs: list[tuple[int, float, float]]) -> float:
    """Samples/s after the first batch, over the epochs after the first (the steady state)."""
    n = sum(e[0] for e in epochs[1:])
    dt = sum(e[2] - e[1] for e in epochs[1:])
    first_batches = BATCH * len(epochs[1:])
    return max(0, n - first_batches) / max(dt, 1e-9)


def _epoch_rate(epochs: list[tuple[int, float, float]]) -> float:
    """Samples/s of whole epochs after the first (first batch included): what a run sees."""
    return sum(e[0] for e in epochs[1:]) / max(sum(e[2] for e in epochs[1:]), 1e-9)


# --- raw decode limit ----------------------------------------------------------------------------

def _decode_loop(args) -> tuple[int, float]:
    blobs, size, aspect = args
    from pipeline.data.format import decode_aspect, decode_image
    fn = decode_aspect if aspect else decode_image
    t0 = time.perf_counter()
    for b in blobs:
        fn(b, size)
    return len(blobs), time.perf_counter() - t0


def _decode_limit(local_dir: str, size: int, procs: int, aspect: bool) -> float:
    import tarfile
    blobs = []
    for name in sorted(os.listdir(local_dir)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(local_dir, name)) as tf:
                blobs += [tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith((".png", ".jpg"))]
    _decode_loop((blobs[:16], size, aspect))  # warm imports
    chunks = [(blobs[i::procs], size, aspect) for i in range(procs)]
    with mp.get_context("fork").Pool(procs) as pool:
        res = pool.map(_decode_loop, chunks)
    return sum(n / dt for n, dt in res if dt > 0)


# -------------------------------------------------------------------------------------------------

def _shards(kind: str, url: str, storage, n: int) -> dict[str, Any]:
    from pipeline.data.write import prepare
    quiet = {"progress": False, "echo": lambda m: None, "parallel": "local", "storage": storage}
    if kind == "digits":
        return prepare("digits", url, **quiet)
    return prepare(f"skimage-photos:{n}", url, fmt="jpg", max_size=224, val_fraction=0.0,
                   shard_size=max(1, n // 8), **quiet)


def _lines(cfg: dict, where: str, ray_ep, dl_ep, others: dict, decode: float) -> list[dict[str, Any]]:
    common = {"image_size": cfg["size"], "format": cfg["fmt"], "layout": cfg["layout"],
              "storage": where, "samples": ray_ep[-1][0], "processes": cfg["procs"], "batch_size": BATCH,
              "epochs": len(ray_ep), "baseline_name": f"webdataset+DataLoader({cfg['procs']} workers)"}
    tag = f"{cfg['name']}/{where}"
    first = [round(e[1], 4) for e in ray_ep]
    dl_first = [round(e[1], 4) for e in dl_ep]
    out = [
        {"name": f"ingest/ray_vs_dataloader/{tag}", "value": round(_epoch_rate(ray_ep), 1),
         "baseline": round(_epoch_rate(dl_ep), 1), "unit": "samples/s", "higher_is_better": True,
         "note": "whole epochs after the first, first batch included", **common},
        {"name": f"ingest/steady/{tag}", "value": round(_steady(ray_ep), 1),
         "baseline": round(_steady(dl_ep), 1), "unit": "samples/s", "higher_is_better": True,
         "note": "epochs after the first, after their first batch", **common},
        {"name": f"ingest/first_batch/{tag}", "value": max(first[1:]), "baseline": max(dl_first[1:]),
         "unit": "s", "higher_is_better": False, "per_epoch": first, "baseline_per_epoch": dl_first,
         "note": "worst time to the first batch over the epochs after the first; per_epoch[0] "
                 "includes building/materialising the dataset (Ray) or starting workers (DataLoader)",
         **common},
        {"name": f"ingest/ray_vs_decode_limit/{tag}", "value": round(_steady(ray_ep), 1),
         "baseline": round(decode, 1), "unit": "samples/s", "higher_is_better": True,
         **{**common, "baseline_name": f"decode only, {cfg['procs']} processes"}},
    ]
    for label, ep in others.items():
        out.append({"name": f"ingest/{label}_vs_dataloader/{tag}", "value": round(_epoch_rate(ep), 1),
                    "baseline": round(_epoch_rate(dl_ep), 1), "unit": "samples/s", "higher_is_better": True,
                    "first_batch_per_epoch": [round(e[1], 4) for e in ep], **common})
    for line in out:
        line["ratio"] = round(line["value"] / line["baseline"], 3) if line["baseline"] else None
    return out


def run(quick: bool = True) -> list[dict[str, Any]]:
    """Per (set, storage): the project path (cached train set, CPU-task decode), the streaming path
    (cache off: one Ray Data execution per epoch), worker-side decode (local only), and
    webdataset + DataLoader, each for ``epochs`` epochs in one process."""
    import ray

    from pipeline.config import StorageConfig
    from pipeline.storage import fsspec_fs, join_url

    procs = max(1, min(4, os.cpu_count() or 1))
    sets = [{"name": "32px", "kind": "digits", "size": 32, "fmt": "png", "layout": "square", "n": 0},
            {"name": "224px", "kind": "photos", "size": 224, "fmt": "jpg", "layout": "aspect",
             "n": 400 if quick else 4000}]
    epochs = 3
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
        from pipeline.ray_start import start_ray

        started_ray = start_ray(num_cpus=procs + 1, use_gpu=None, dashboard=False, log_to_driver=False,
                                logging_level=logging.ERROR)
        from ray.data import DataContext
        DataContext.get_current().enable_progress_bars = False
        DataContext.get_current().print_on_execution_start = False
        for cfg in sets:
            cfg["procs"] = procs
            local = os.path.join(tmp, cfg["name"])
            idx = _shards(cfg["kind"], local, None, cfg["n"])
            remote = f"s3://bench/{cfg['name']}"
            for name in sorted(os.listdir(local)):
                if name.endswith(".tar") or name == "index.json":
                    fs.put_file(os.path.join(local, name), f"bench/{cfg['name']}/{name}")
            decode = _decode_limit(local, cfg["size"], procs, cfg["layout"] == "aspect")
            shard_names = [s["name"] for s in idx["splits"]["train"]["shards"]]
            for where, url, storage in (("local", local, None), ("s3", remote, s3)):
                urls = [join_url(url, s) for s in shard_names]
                ray_ep = _ray_epochs(url, storage, cfg["size"], epochs)
                others = {"streaming": _ray_epochs(url, storage, cfg["size"], epochs, cache=False)}
                if where == "local":
                    others["worker_decode"] = _ray_epochs(url, storage, cfg["size"], epochs, decode="worker")
                dl_ep = _dataloader_epochs(urls, storage, cfg["size"], cfg["layout"] == "aspect", procs, epochs)
                results.extend(_lines(cfg, where, ray_ep, dl_ep, others, decode))
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
