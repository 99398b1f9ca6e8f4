"""`cacr prepare`: source images -> webdataset tar shards + index.json at a local dir or s3:// URL.

* Deterministic: the same source, seed and options give the same shards (sorted inputs, seeded
  split and order, fixed tar mtimes, PNG/JPEG via PIL). Samples are shuffled across shards at write
  time, since the reader only shuffles shard order (no local shuffle buffer on the hot path).
* Resumable: each finished shard gets a marker ``_parts/<name>.json`` (samples, members, bytes and a
  fingerprint of its planned content); a re-run skips shards whose marker fingerprint matches and
  whose size on storage equals the marker's. index.json is written last.
* Atomic shards: local files are written under a hidden temporary name and renamed; S3 objects are
  written through s3fs, whose multipart upload only completes on close.
* Parallel: above :data:`AUTO_RAY_SAMPLES` samples (or ``parallel="ray"``) one Ray task per shard.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import math
import sys
import time
from typing import Any, Callable

import numpy as np

from pipeline.config import StorageConfig
from pipeline.data.format import (FORMAT_VERSION, INDEX_NAME, PARTS_DIR, SHARD_RE, DataError,
                                  encode_image, load_index, shard_name)
from pipeline.data.sources import Source, load_images, open_source
from pipeline.storage import StorageError, classify_s3_error, ensure_location, fsspec_fs, is_remote, \
    join_url, list_files, open_atomic, parse_url, write_text

log = logging.getLogger(__name__)

AUTO_RAY_SAMPLES = 20_000       # larger sources are converted by Ray tasks, one shard each
AUTO_SHARDS_PER_SPLIT = 8       # auto shard size aims at >= 8 shards per split (>= 4 per reader)
AUTO_SHARD_MIN, AUTO_SHARD_MAX = 32, 1000


def default_val_fraction(source: str) -> float:
    return 0.2 if source == "digits" else 0.1


def auto_shard_size(n: int) -> int:
    return int(min(AUTO_SHARD_MAX, max(AUTO_SHARD_MIN, math.ceil(n / AUTO_SHARDS_PER_SPLIT))))


def _split_indices(src: Source, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if src.fixed_splits is not None:
        splits = {k: v for k, v in src.fixed_splits.items() if k == "train" or val_fraction > 0}
    elif src.labeled and val_fraction > 0:
        val = []
        for c in range(len(src.classes)):  # stratified: every class in val in proportion
            members = np.flatnonzero(src.labels == c)
            k = int(round(len(members) * val_fraction))
            val.extend(rng.permutation(members)[:k].tolist())
        val_arr = np.asarray(sorted(val), dtype=np.int64)
        mask = np.ones(len(src), bool)
        mask[val_arr] = False
        splits = {"train": np.flatnonzero(mask), "val": val_arr}
    else:
        splits = {"train": np.arange(len(src))}
    # shuffle across shards: readers shuffle shard order only
    return {k: rng.permutation(v) for k, v in splits.items() if len(v)}


class _Progress:
    """tqdm when installed, else a plain line on stderr every few seconds."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.desc, self.enabled, self.n = total, desc, enabled, 0
        self.t0 = self.last = time.monotonic()
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=desc, unit="shard", file=sys.stderr)
            except ImportError:
                pass

    def update(self, k: int = 1) -> None:
        self.n += k
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(k)
            return
        now = time.monotonic()
        if now - self.last >= 2.0 or self.n >= self.total:
            self.last = now
            print(f"{self.desc}: {self.n}/{self.total} shards ({100 * self.n / max(1, self.total):.0f}%), "
                  f"{now - self.t0:.1f} s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_shard(job: dict[str, Any], out_url: str, storage: StorageConfig | None) -> dict[str, Any]:
    """Write one shard (in-process or as a Ray task) and its marker; return its index entry."""
    import webdataset as wds

    name, size, fmt = job["name"], job["image_size"], job["format"]
    images = load_images(job["payload"], size, job.get("layout", "square"))
    samples = members = unreadable = 0
    with open_atomic(join_url(out_url, name), storage) as f:
        writer = wds.TarWriter(f, encoder=False, mtime=0.0, user="cacr", group="cacr")
        for key, label, img in zip(job["keys"], job["labels"], images):
            if img is None:
                unreadable += 1
                continue
            sample = {"__key__": key, fmt: encode_image(img, fmt, job["jpeg_quality"])}
            if label >= 0:
                sample["cls"] = str(int(label)).encode("ascii")
            writer.write(sample)
            samples += 1
            members += len(sample) - 1
        writer.close()
        nbytes = f.tell()
    entry = {"name": name, "samples": samples, "members": members, "bytes": int(nbytes),
             "fingerprint": job["fingerprint"], "unreadable": unreadable}
    write_text(join_url(out_url, PARTS_DIR, name + ".json"), json.dumps(entry), storage)
    return entry


def _read_json(url: str, storage: StorageConfig | None) -> Any:
    fs, path = fsspec_fs(url, storage)
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None
    except ValueError:
        return None


def _plan(src: Source, splits: dict[str, np.ndarray], *, image_size: int, fmt: str, jpeg_quality: int,
          shard_size: int | None, layout: str = "square") -> list[dict[str, Any]]:
    width = max(7, len(str(len(src))))
    digest = src.digest()
    jobs = []
    for split, idx in splits.items():
        ss = shard_size or auto_shard_size(len(idx))
        for num, start in enumerate(range(0, len(idx), ss)):
            chunk = idx[start:start + ss]
            keys = [f"{int(i):0{width}d}" for i in chunk]
            labels = [int(v) for v in src.labels[chunk]]
            plan = [FORMAT_VERSION, digest, image_size, fmt, jpeg_quality, keys, labels]
            if layout != "square":  # square fingerprints stay those of earlier versions (resume)
                plan.append(layout)
            fp = hashlib.sha1(json.dumps(plan).encode()).hexdigest()[:20]
            jobs.append({"name": shard_name(split, num), "split": split, "indices": chunk, "keys": keys,
                         "labels": labels, "image_size": image_size, "format": fmt,
                         "jpeg_quality": jpeg_quality, "fingerprint": fp, "layout": layout})
    return jobs


def prepare(source: str | Source, out_url: str, *, storage: StorageConfig | None = None,
            shard_size: int | None = None, image_size: int | None = None, fmt: str = "png",
            seed: int = 0, val_fraction: float | None = None, jpeg_quality: int = 90,
            parallel: str = "auto", progress: bool = True,
            echo: Callable[[str], None] | None = None, max_size: int | None = None,
            imbalance: str | None = None, allow_empty_classes: bool = False) -> dict[str, Any]:
    """Convert ``source`` (``digits`` | image folder | ``cifar10:PATH`` | ``cifar100:PATH`` |
    ``skimage-photos[:N]``, or a :class:`~pipeline.data.sources.Source` built in code) into shards at
    ``out_url``; returns the index (also written as ``index.json``). Re-running skips shards already
    complete.

    ``image_size=S`` (default layout ``square``): every image stored S x S (shorter side to S, centre
    crop). ``max_size=S`` (layout ``aspect``): aspect ratio kept, longer side <= S; larger images are
    downscaled, smaller ones kept as they are (never upscaled). index.json records ``layout`` and, for
    aspect sets, ``max_size`` (= ``image_size``, the canvas side the reader decodes onto). ``imbalance``: a long-tail
    profile applied to the training split only (:mod:`pipeline.data.imbalance`)."""
    from pipeline.data import imbalance as lt

    echo = echo or (lambda m: print(m, file=sys.stderr, flush=True))
    fmt, layout, vf = _check_options(source, fmt=fmt, shard_size=shard_size, image_size=image_size,
                                     max_size=max_size, parallel=parallel, val_fraction=val_fraction)
    loc = parse_url(out_url)
    ensure_location(out_url, storage)  # s3: endpoint, credentials, bucket checked: fail fast

    profile = lt.parse_profile(imbalance)  # bad profile: fail before reading the source
    src = open_source(source, storage) if isinstance(source, str) else source
    size = int(max_size or image_size or src.default_image_size)
    splits = _split_indices(src, vf, seed)
    C = len(src.classes)
    before = lt.class_counts(src.labels[splits["train"]], C) if "train" in splits and C else []
    if profile is not None and "train" in splits:
        splits["train"] = lt.subsample(splits["train"], src.labels, profile, seed=seed,
                                       class_names=src.classes, allow_empty_classes=allow_empty_classes)
    jobs = _plan(src, splits, image_size=size, fmt=fmt, jpeg_quality=jpeg_quality, shard_size=shard_size,
                 layout=layout)
    done, todo = _resume(jobs, out_url, storage, echo)

    use_ray = parallel == "ray" or (parallel == "auto" and len(src) >= AUTO_RAY_SAMPLES)
    echo(f"prepare: {src.name} -> {loc.url}: {len(src)} images, "
         f"{size}px {fmt}{' (aspect kept, longer side <= max size)' if layout == 'aspect' else ''}, "
         f"{', '.join(f'{k} {len(v)}' for k, v in splits.items())}; {len(jobs)} shards, "
         f"{len(done)} already done" + (", Ray tasks" if use_ray and todo else ""))
    if profile is not None:
        echo(f"prepare: --imbalance {profile.text} (train only): per-class train counts "
             f"{lt.class_counts(src.labels[splits['train']], C)} (of {before})")
    for j in todo:
        j["payload"] = src.payload(j.pop("indices"))
    written = _run_ray(todo, out_url, storage, progress, pin=_pin_to_driver(src, out_url),
                       echo=echo) if use_ray and todo else _run_local(todo, out_url, storage, progress)

    entries = {e["name"]: e for e in [*done, *written]}
    unreadable = sum(e.get("unreadable", 0) for e in entries.values())
    index = {
        "format_version": FORMAT_VERSION, "created_by": "cacr prepare", "source": src.name,
        "image_size": size, "layout": layout, **({"max_size": size} if layout == "aspect" else {}),
        "image_format": fmt, "channels": 3, "classes": src.classes,
        "labeled": src.labeled, "seed": seed, "val_fraction": vf,
        "shard_size": shard_size or "auto", "source_unreadable": unreadable,
        "splits": _index_splits(jobs, entries),
        "imbalance": lt.describe(profile, C, before, lt.class_counts(src.labels[splits["train"]], C)
                                 if "train" in splits and C else [], allow_empty_classes),
        "class_counts": {k: lt.class_counts(src.labels[v], C) for k, v in splits.items()} if C else {},
    }
    _write_index(index, out_url, storage)
    if unreadable:
        echo(f"prepare: WARNING {unreadable} source image(s) could not be read and were left out")
    echo(f"prepare: done, {sum(s['samples'] for s in index['splits'].values())} samples in "
         f"{len(jobs)} shards ({len(written)} written, {len(done)} skipped) at {loc.url}")
    return index


def _check_options(source: str | Source, *, fmt: str, shard_size: int | None, image_size: int | None,
                   max_size: int | None, parallel: str, val_fraction: float | None) -> tuple[str, str, float]:
    """The options of :func:`prepare`, checked before anything is read: (format, layout, val fraction)."""
    fmt = {"jpeg": "jpg"}.get(fmt, fmt)
    if fmt not in ("png", "jpg"):
        raise DataError(f"--format {fmt!r}: use png or jpg")
    if shard_size is not None and shard_size < 1:
        raise DataError("--shard-size must be >= 1")
    if image_size is not None and image_size < 8:
        raise DataError("--image-size must be >= 8")
    if max_size is not None and image_size is not None:
        raise DataError("--image-size (square) and --max-size (aspect kept) exclude each other: use one")
    if max_size is not None and max_size < 8:
        raise DataError("--max-size must be >= 8")
    if parallel not in ("auto", "ray", "local"):
        raise DataError(f"--parallel {parallel!r}: use auto, ray or local")
    vf = default_val_fraction(source if isinstance(source, str) else "") if val_fraction is None \
        else float(val_fraction)
    if not 0 <= vf < 1:
        raise DataError(f"--val-fraction {vf}: must be in [0, 1)")
    return fmt, "square" if max_size is None else "aspect", vf


def _known_entries(jobs: list[dict[str, Any]], existing: dict[str, int], out_url: str,
                   storage: StorageConfig | None) -> dict[str, dict]:
    """name -> what is known of a shard already on storage: the old index's entry, else (when that
    does not match the plan) its marker under ``_parts/``."""
    old_index = _read_json(join_url(out_url, INDEX_NAME), storage)
    known: dict[str, dict] = {}
    if isinstance(old_index, dict):
        try:
            for info in load_index(json.dumps(old_index))["splits"].values():
                known.update({e["name"]: e for e in info["shards"]})
        except ValueError:
            pass
    need_marker = [j["name"] for j in jobs if j["name"] in existing and
                   known.get(j["name"], {}).get("fingerprint") != j["fingerprint"]]
    if need_marker:
        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            markers = ex.map(lambda n: _read_json(join_url(out_url, PARTS_DIR, n + ".json"), storage), need_marker)
            for n, m in zip(need_marker, markers):
                if isinstance(m, dict):
                    known[n] = m
    return known


def _resume(jobs: list[dict[str, Any]], out_url: str, storage: StorageConfig | None,
            echo: Callable[[str], None]) -> tuple[list[dict], list[dict]]:
    """(index entries of the shards already complete, jobs still to write). Shards of an earlier
    plan that this one does not have are removed, and so is an index that no longer describes
    what is on storage."""
    existing = list_files(out_url, storage, suffix=".tar")
    known = _known_entries(jobs, existing, out_url, storage)
    done, todo = [], []
    for j in jobs:
        e = known.get(j["name"])
        if e and e.get("fingerprint") == j["fingerprint"] and existing.get(j["name"]) == e.get("bytes"):
            done.append(e)
        else:
            todo.append(j)
    planned = {j["name"] for j in jobs}
    stale = [n for n in existing if SHARD_RE.match(n) and n not in planned]
    fs, base = fsspec_fs(out_url, storage)
    if stale:
        for n in stale:
            fs.rm(f"{base.rstrip('/')}/{n}")
        echo(f"prepare: removed {len(stale)} stale shard(s) from an earlier run with other options")
    if todo:
        try:  # the old index no longer describes what is on storage
            fs.rm(f"{base.rstrip('/')}/{INDEX_NAME}")
        except FileNotFoundError:
            pass
    return done, todo


def _index_splits(jobs: list[dict[str, Any]], entries: dict[str, dict]) -> dict[str, dict]:
    """index.json's ``splits``: per split, its samples and its shards' entries in plan order."""
    splits: dict[str, dict] = {}
    for j in jobs:
        sp = splits.setdefault(j["split"], {"samples": 0, "shards": []})
        e = entries[j["name"]]
        sp["shards"].append({k: e[k] for k in ("name", "samples", "members", "bytes", "fingerprint")})
        sp["samples"] += e["samples"]
    return splits


def _write_index(index: dict[str, Any], out_url: str, storage: StorageConfig | None) -> None:
    """index.json, written last (local: atomically, under a hidden name then renamed)."""
    write_text(join_url(out_url, INDEX_NAME), json.dumps(index, indent=1), storage)


def _run_local(jobs, out_url, storage, progress) -> list[dict]:
    bar = _Progress(len(jobs), "prepare", progress and bool(jobs))
    out = []
    try:
        for j in jobs:
            out.append(_guard(write_shard, j, out_url, storage))
            bar.update()
    finally:
        bar.close()
    return out


def _guard(fn, job, out_url, storage):
    try:
        return fn(job, out_url, storage)
    except (StorageError, DataError):
        raise
    except OSError as e:
        if is_remote(out_url):
            raise classify_s3_error(e, out_url, storage) from None
        raise DataError(f"cannot write shard {job['name']} under {out_url}: {e}") from None


def _pin_to_driver(src: Source, out_url: str) -> str | None:
    """Why the shard tasks must run on the driver's node (None: any node of the cluster will do).
    A local folder or a local output exists on this machine's disk only; in-memory sources and
    S3 folders travel with the task or are read from S3 by whichever node runs it."""
    if src.local_files:
        return f"the source folder {src.name.split(':', 1)[-1]} is on this machine"
    if not is_remote(out_url):
        return f"the output {out_url} is on this machine"
    return None


def _run_ray(jobs, out_url, storage, progress, *, pin: str | None = None,
             echo: Callable[[str], None] = print) -> list[dict]:
    import ray

    from pipeline.ray_start import start_ray

    # RAY_ADDRESS joins a cluster, else a NEW local instance (never a `ray start` cluster by accident)
    started = start_ray(dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        options: dict[str, Any] = {}
        if pin is not None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            here = ray.get_runtime_context().get_node_id()
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=here, soft=False)
            if len([n for n in ray.nodes() if n.get("Alive")]) > 1:
                echo(f"prepare: shard tasks pinned to this node ({pin}); put the images and the "
                     "output on S3 to use every node")
        task = ray.remote(num_cpus=1, max_retries=2)(write_shard).options(**options)
        bar = _Progress(len(jobs), "prepare", progress)
        pending = [task.remote(j, out_url, storage) for j in jobs]
        out = []
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=min(len(pending), 8), timeout=2.0)
                for r in ready:
                    out.append(ray.get(r))
                    bar.update()
        except ray.exceptions.RayTaskError as e:
            cause = e.as_instanceof_cause()
            if isinstance(cause, (StorageError, DataError)):
                raise cause from None
            raise DataError(f"writing shards to {out_url} failed: {str(cause).splitlines()[-1]}") from None
        finally:
            bar.close()
        return out
    finally:
        if started:
            ray.shutdown()
