"""Reading shards with Ray Data: ONE function, :func:`build_dataset`, for training, kNN and inspect
(plus :func:`build_train_dataset`, which caches the train set when it fits).

    scan_shards (pre-scan, threads, no Ray)       -> which shards, rows per shard, shard-level skips
    read_datasource(TarShardDatasource)           -> rows: key, id, image (encoded bytes), label, skip
       shard order per epoch                       (a run's streaming train set: epoch_shard_order(seed,
                                                    epoch), the epoch published by the train workers;
                                                    else FileShuffleConfig(seed), re-seeded by Ray
                                                    with the dataset's execution index)
    map_batches(decode, num_cpus, resources)      -> image uint8 (S, S, 3) [+ hw], label int64, skip int8,
                                                     id (decode=worker: image stays encoded bytes)
    build_train_dataset                           -> materialised once if it fits data.cache_budget_mb
    TorchTrainer(datasets={"train": ds})          -> cached: unsplit; else streaming_split(equal=True)
    worker: iter_train_batches(shard, epoch=e)    -> dict batches (decoded on the worker if asked)
            split_batch(batch)                    -> images, labels, {reason: count}

Why a FileBasedDatasource subclass rather than ``ray.data.read_webdataset``: read_webdataset raises on
the first damaged tar (stopping the whole dataset) and cannot stop a truncated shard at its last
complete sample; this reader shares Ray's file listing, retries, per-epoch file shuffle and
filesystem handling, reads the same webdataset layout (``<key>.<ext>`` members grouped by key), and
never raises on shard content: damaged content becomes counted skip codes. It emits Arrow blocks
directly (no pandas), and never decodes anything but images (PIL) and ASCII labels.

Aspect-preserving sets (``cacr prepare --max-size S``, index.json ``layout: aspect``): each image
(longer side <= S) is decoded onto a zero S x S canvas, top-left aligned, with ``hw`` (n, 2) = its
valid height and width. A fixed canvas keeps batches dense tensors, so augmentation stays batched
and samples its crop boxes against ``hw`` (the whole image, not a centre square); the zero padding
costs at most S^2 - h w pixels per image and is never inside a crop box.

Where decoding runs (``data.decode``): ``cpu_tasks`` = in the Ray Data map tasks above;
``worker`` = the rows keep the encoded bytes and :func:`pipeline.data.iter_train_batches` decodes them
on the train worker (torchvision; nvjpeg on a GPU), so that a GPU node's few CPUs are no ceiling.

No per-epoch stall (:func:`build_train_dataset`): a streaming dataset re-plans and restarts its
execution (tasks, actors, the first shard reads and decodes) at the start of every epoch. When the
train set fits ``data.cache_budget_mb`` (decoded canvases, or the encoded bytes with
``decode=worker``), it is instead read once, in index order, into the object store
(``materialize``) and handed *unsplit* to every Train worker; each epoch then reads all N rows in
a sample-level ``permutation(rng(seed, e))`` order and worker ``r`` of ``W`` takes its contiguous
``N / W`` positions of that sequence, each batch gathered from the cached blocks
(pipeline/data/batches.py). The order is a pure function of (seed, epoch): a restarted or resumed
run gives epoch ``e`` the order it would have had. Budget: the cached set lives in the object store (default 30 % of RAM per node; spilled
to disk beyond it), so keep ``cache_budget_mb`` well under that. Larger sets stream as before.

Exactly once per epoch: Ray Train splits with ``equal=True``, which drops the remainder rows when
the total does not divide by the number of workers. The reader therefore appends ``PAD`` rows
(code 6, filtered by :func:`split_batch`, never counted) to one shard so that the row count divides
by ``num_workers``; with that, every sample reaches exactly one worker once per epoch and every
worker gets the same number of rows (hence the same number of batches).
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Any, Iterator

import numpy as np

from pipeline.config import DataConfig, StorageConfig
from pipeline.data.format import (BAD_LABEL, FIRST_DROPPED, IMAGE_EXTS, JSON_EXT, LABEL_EXT,
                                  MISSING_IMAGE, MISSING_LABEL, NUM_CODES, OK, PAD, READ_ERROR,
                                  SKIP_REASONS, UNDECODABLE_IMAGE, decode_aspect, decode_image,
                                  parse_json_label, parse_label)
from pipeline.data.urls import store_url
from pipeline.data.validate import ShardScan, iter_samples, scan_shards
from pipeline.storage import arrow_fs

log = logging.getLogger(__name__)

# Custom-resource amount each decode task asks for when data.data_resource is set: tiny, so that
# the CPUs (decode_num_cpus) bound concurrency and the resource only pins placement.
DATA_RESOURCE_PER_TASK = 0.001
DECODE_MODES = ("cpu_tasks", "worker")
ENCODED_BLOCK_ROWS = 1024   # rows per block of encoded samples (decode=worker): ~1-100 MB of bytes


def _block_rows(image_size: int) -> int:
    """Rows per emitted block: ~8 MB of decoded pixels, between 16 and 512 rows."""
    return int(max(16, min(512, (8 << 20) // (image_size * image_size * 3))))


def _make_datasource_class():
    from ray.data.datasource import FileBasedDatasource

    class TarShardDatasource(FileBasedDatasource):
        """Webdataset tar shards -> rows of undecoded samples with skip codes. Never raises on content."""

        _FILE_EXTENSIONS = ["tar"]

        def __init__(self, paths: list[str], *, plans: dict[str, tuple[int, int | None, int]],
                     labeled: bool, block_rows: int, order: tuple[int, str] | None = None,
                     label_key: str | None = None, num_workers: int = 1, **kwargs):
            super().__init__(paths, **kwargs)
            self._num_workers = num_workers  # the row count must divide by it (equal split)
            self._plans = plans          # shard path -> (shard number, keep, pad rows, rows)
            self._labeled = labeled
            self._label_key = label_key  # labels from this JSON field, else the .cls member
            self._block_rows = block_rows
            self._order = order          # (seed, order key): shard order = f(seed, epoch)

        def get_name(self) -> str:
            return "TarShards"

        def get_read_tasks(self, *args, **kwargs):
            """Ray's read tasks (one per shard, index order), permuted for the epoch the train
            workers published (see :func:`publish_epoch`)."""
            tasks = super().get_read_tasks(*args, **kwargs)
            if self._order is None:
                return tasks
            tasks, epoch = _order_for_epoch(tasks, *self._order)
            consumed = published_exclusion(self._order[1], epoch)
            return _without_consumed(tasks, consumed, self._plans, self._num_workers) if len(consumed) else tasks

        def _read_stream(self, f, path: str) -> Iterator[Any]:
            # Keyed by path: shards of a URL list may share a file name in different folders.
            shard_no, keep, pad, rows = self._plans.get(path.strip("/"), (0xFFFF, None, 0, None))
            yield from _read_shard_blocks(f, os.path.basename(path), shard_no, keep, pad, self._labeled,
                                          self._block_rows, rows, self._label_key)

    return TarShardDatasource


# ---------------------------------------------------------------------------------------------
# Streaming shard order: a function of (seed, epoch), whatever restarted in between

EPOCH_KEY = "cacr:data-epoch:"
ORDER_KEY = "cacr:data-order:"


def publish_epoch(order_key: str, epoch: int) -> None:
    """Rank 0, before it reads epoch ``epoch``: the epoch the next execution of the streaming train
    set plans for. Ray Data's split coordinator starts an epoch's execution only once EVERY worker
    asked for it, so the value is in place when the read tasks are planned."""
    from pipeline import ray_compat

    ray_compat.kv_put((EPOCH_KEY + order_key).encode(), str(int(epoch)).encode())


EXCLUDE_KEY = "cacr:data-exclude:"
# Ordinal bit of the padding rows a mid-epoch resume adds (so that the remaining rows divide by the
# number of workers): never in a shard's own ordinals (< 2^31), never excluded, not counted as read.
EXTRA_PAD_BIT = 1 << 31


def publish_exclusion(order_key: str, epoch: int, consumed: np.ndarray | None) -> None:
    """Rank 0, before it reads epoch ``epoch`` (with :func:`publish_epoch`): the row ids that epoch
    already trained on before a mid-epoch checkpoint (a resume), or none. The read tasks planned
    for that epoch then leave those rows out (:func:`_without_consumed`)."""
    from pipeline import ray_compat

    data = b"" if consumed is None else np.asarray(consumed, np.int64).tobytes()
    ray_compat.kv_put(f"{EXCLUDE_KEY}{order_key}:{int(epoch)}".encode(), data)


def published_exclusion(order_key: str, epoch: int) -> np.ndarray:
    from pipeline import ray_compat

    raw = ray_compat.kv_get(f"{EXCLUDE_KEY}{order_key}:{int(epoch)}".encode())
    return np.frombuffer(raw, np.int64) if raw else np.zeros(0, np.int64)


def is_extra_pad(ids: np.ndarray) -> np.ndarray:
    return (np.asarray(ids, np.int64) & EXTRA_PAD_BIT) != 0


def _without_consumed(tasks: list, consumed: np.ndarray, plans: dict, world: int) -> list:
    """The read tasks of a resumed epoch: each shard's rows minus those already consumed, and as
    many PAD rows more (in the first shard's task) as make the remaining count divide by ``world``
    again, so that Ray's equal split still drops nothing."""
    from ray.data.datasource import ReadTask

    consumed = consumed[~is_extra_pad(consumed)]
    total = sum(int(rows or 0) + pad for _, _, pad, rows in plans.values())
    extra = (-(total - len(consumed))) % world
    by_shard: dict[int, np.ndarray] = {}
    shard_of = consumed >> 32
    for no in np.unique(shard_of):
        by_shard[int(no)] = consumed[shard_of == no] & 0xFFFFFFFF
    first = min(no for no, _, _, _ in plans.values())
    out = []
    for t in tasks:
        files = t.metadata.input_files or []
        no = plans.get(files[0].strip("/"), (None,))[0] if len(files) == 1 else None
        drop = by_shard.get(no) if no is not None else None
        pad = extra if no == first else 0
        if drop is None and not pad:
            out.append(t)
            continue
        out.append(ReadTask(_filtered_read(t.read_fn, drop, pad, no), t.metadata, schema=t.schema,
                            per_task_row_limit=t.per_task_row_limit))
    return out


def _filtered_read(read_fn, drop: np.ndarray | None, pad: int, shard_no: int):
    def read():
        import pyarrow as pa

        for block in read_fn():
            if drop is not None and len(drop):
                ordinals = block.column("id").to_numpy() & 0xFFFFFFFF
                block = block.filter(pa.array(~np.isin(ordinals, drop)))
            if block.num_rows:
                yield block
        if pad:
            yield pa.table({"key": pa.array([f"#resume-pad{i}" for i in range(pad)], pa.string()),
                            "id": pa.array([(shard_no << 32) | EXTRA_PAD_BIT | i for i in range(pad)], pa.int64()),
                            "image": pa.array([b""] * pad, pa.binary()),
                            "label": pa.array([-1] * pad, pa.int64()),
                            "skip": pa.array([PAD] * pad, pa.int8())})
    return read


def planned_order(order_key: str, epoch: int) -> dict[str, Any] | None:
    """What the streaming train set planned for ``epoch``: ``{"shards": [names in read order],
    "plans": how often Ray planned that epoch's read}`` (the driver plans the dataset too; a
    restart plans the epoch again)."""
    import json

    from pipeline import ray_compat

    raw = ray_compat.kv_get(f"{ORDER_KEY}{order_key}:{int(epoch)}".encode())
    return json.loads(raw) if raw else None


def epoch_shard_order(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch ``epoch`` reads the shards of a streaming train set (positions in
    index order): a pure function of (seed, epoch, number of shards)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), 0x5A4D]).permutation(num_shards)


def _order_for_epoch(tasks: list, seed: int, order_key: str) -> tuple[list, int]:
    """(Read tasks permuted by :func:`epoch_shard_order` for the published epoch, that epoch): 0
    when none was published (a dataset read outside a training run); the order is recorded."""
    import json

    from pipeline import ray_compat

    raw = ray_compat.kv_get((EPOCH_KEY + order_key).encode())
    epoch = int(raw) if raw else 0
    tasks = [tasks[i] for i in epoch_shard_order(len(tasks), seed, epoch)]
    before = planned_order(order_key, epoch) or {"plans": 0}
    names = [os.path.basename(f) for t in tasks for f in (t.metadata.input_files or [])]
    ray_compat.kv_put(f"{ORDER_KEY}{order_key}:{epoch}".encode(),
                      json.dumps({"shards": names, "plans": before["plans"] + 1}).encode())
    return tasks, epoch


def _read_shard_blocks(f, name: str, shard_no: int, keep: int | None, pad: int, labeled: bool,
                       block_rows: int, rows: int | None = None,
                       label_key: str | None = None) -> Iterator[Any]:
    """The rows of one shard. With ``rows`` (the pre-scan's count, what index.json says was
    written) exactly that many rows come out, whatever the bytes turned out to hold: a shard that
    fails or ends early after ``n`` samples (damage the size-trusting pre-scan could not see) adds
    ``rows - n`` READ_ERROR rows, one per sample it cannot deliver; a shard whose members are out
    of order (more key groups than samples written) stops at ``rows``. So every sample written is
    delivered or counted, and the row count the PAD rows were computed for holds (exactly once)."""
    import pyarrow as pa

    cols: dict[str, list] = {"key": [], "id": [], "image": [], "label": [], "skip": []}

    def add(key: str, ordinal: int, image: bytes, label: int, code: int):
        cols["key"].append(key)
        cols["id"].append((shard_no << 32) | ordinal)
        cols["image"].append(image)
        cols["label"].append(label)
        cols["skip"].append(code)

    def table():
        t = pa.table({"key": pa.array(cols["key"], pa.string()), "id": pa.array(cols["id"], pa.int64()),
                      "image": pa.array(cols["image"], pa.binary()),
                      "label": pa.array(cols["label"], pa.int64()), "skip": pa.array(cols["skip"], pa.int8())})
        for v in cols.values():
            v.clear()
        return t

    n = 0
    failed = None
    for key, members in iter_samples(f, keep):
        if rows is not None and n >= rows:
            break  # members out of order: more groups than samples written
        if members is None:  # tar error the pre-scan did not foresee: counted, never raised
            failed = key
            break
        image = next((members[e] for e in IMAGE_EXTS if e in members), None)
        label, code = (parse_json_label(members.get(JSON_EXT), label_key) if label_key
                       else parse_label(members.get(LABEL_EXT)))
        if code == MISSING_LABEL and not labeled:
            code = OK
        if image is None:
            code, image = MISSING_IMAGE, b""
        add(key, n, image, label, code)
        n += 1
        if len(cols["key"]) >= block_rows:
            yield table()
    lost = (rows - n) if rows is not None else (1 if failed else 0)
    if lost > 0:
        log.warning("shard %s: %d of its samples unreadable after %d (%s)", name, lost, n,
                    failed or "ended early")
    for i in range(max(0, lost)):
        add(f"{name}#read_error{i}", n, b"", -1, READ_ERROR)
        n += 1
        if len(cols["key"]) >= block_rows:
            yield table()
    for i in range(pad):
        add(f"{name}#pad{i}", n, b"", -1, PAD)
        n += 1
    if cols["key"]:
        yield table()


def _decode_batch(table, image_size: int, with_keys: bool, aspect: bool = False) -> dict[str, np.ndarray]:
    """Encoded rows -> fixed-size uint8 images. Runs in Ray Data CPU tasks.

    Square sets: (n, S, S, 3). Aspect sets: each image (longer side <= S, never upscaled) on a zero
    S x S canvas, top-left aligned, plus ``hw`` (n, 2) int32 = its valid height and width
    (0, 0 for dropped rows)."""
    n = table.num_rows
    skip = table.column("skip").to_numpy().astype(np.int8, copy=True)
    images = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    hw = np.zeros((n, 2), dtype=np.int32)
    raw = table.column("image").to_pylist()
    for i in range(n):
        if skip[i] < FIRST_DROPPED:
            arr = decode_aspect(raw[i], image_size) if aspect else decode_image(raw[i], image_size)
            if arr is None:
                skip[i] = UNDECODABLE_IMAGE
            else:
                h, w = arr.shape[:2]
                images[i, :h, :w] = arr
                hw[i] = (h, w)
    out = {"image": images, "label": table.column("label").to_numpy().astype(np.int64),
           "skip": skip, "id": table.column("id").to_numpy().astype(np.int64)}
    if aspect:
        out["hw"] = hw
    if with_keys:
        out["key"] = np.asarray(table.column("key").to_pylist(), dtype=object)
    return out


def _encoded_batch(table, image_size: int, with_keys: bool, aspect: bool = False):
    """``decode=worker``: rows keep the encoded bytes; two constant columns tell the train worker
    how to decode them (``decode_size`` = canvas side S, ``aspect``), so no config travels with them."""
    import pyarrow as pa
    n = table.num_rows
    cols = {"image": table.column("image"), "label": table.column("label"), "skip": table.column("skip"),
            "id": table.column("id"), "decode_size": pa.array(np.full(n, image_size, np.int32)),
            "aspect": pa.array(np.full(n, aspect, np.bool_))}
    if with_keys:
        cols["key"] = table.column("key")
    return pa.table(cols)


def is_aspect(scan: ShardScan) -> bool:
    """True for a set written by ``cacr prepare --max-size`` (index.json ``layout: aspect``) and
    for a set without an index.json (written by other tools, images of any shape): the whole image,
    aspect kept, on the canvas, so that random-resized crops see all of it, not a centre square
    (a square image fills the canvas either way)."""
    return scan.index is None or scan.index.get("layout") == "aspect"


def build_dataset(url: str, split: str = "train", *, data: DataConfig | None = None,
                  storage: StorageConfig | None = None, seed: int = 0, num_workers: int = 1,
                  image_size: int | None = None, scan: ShardScan | None = None, shuffle: bool = True,
                  with_keys: bool = False, decode: str = "cpu_tasks", order_key: str | None = None):
    """The Ray Dataset of ``split`` under ``url``: columns ``image`` uint8 (N, S, S, 3), ``label``
    int64 (-1 = none), ``skip`` int8 (:data:`~pipeline.data.format.SKIP_REASONS`), ``id`` int64
    (shard number << 32 | position, stable across epochs) [+ ``hw`` int32 (N, 2) for aspect sets]
    [+ ``key`` str with ``with_keys``].

    * ``data``: decode size (``data.image_size``), ``decode_num_cpus``, ``data_resource`` and
      ``decode``; without it images come out at the stored size and decode tasks take
      DataConfig's default ``decode_num_cpus`` (1 CPU).
    * ``decode``: ``cpu_tasks`` (default; kNN, inspect and export read this way) decodes in Ray Data
      tasks (above); ``worker`` (the train set under ``data.decode=worker``) leaves ``image`` as the encoded bytes (+ ``decode_size``, ``aspect`` columns) for
      :func:`pipeline.data.iter_train_batches` to decode on the train worker's device.
    * ``seed``: shard order is shuffled from it, differently for every execution (= epoch) of the
      same Dataset object; ``shuffle=False`` keeps index order. With ``order_key`` (the train set
      of a run) epoch ``e`` reads the shards in :func:`epoch_shard_order` (seed, e) order instead,
      ``e`` being what the train workers :func:`publish_epoch` under that key: the same order
      after a worker-group restart or a resumed run.
    * ``num_workers``: the number of Ray Train workers that will split it (PAD rows make the row count
      divisible by it so that ``equal=True`` splitting drops nothing).
    * ``scan``: a :func:`~pipeline.data.validate.scan_shards` result, to avoid scanning twice.

    Requires Ray to be initialised (it starts a local instance otherwise)."""
    import ray
    from ray.data import FileShuffleConfig

    data_given = data is not None
    data = data or DataConfig(url=url)
    if decode not in DECODE_MODES:
        raise ValueError(f"decode={decode!r}: use one of {DECODE_MODES}")
    if scan is None:
        scan = scan_shards(url, split, storage, label_key=data.label_key)
    size = int(image_size or (data.image_size if data_given else (scan.image_size or data.image_size)))
    if num_workers < 1:
        raise ValueError("num_workers must be >= 1")
    readable = scan.readable
    pad = (-scan.rows) % num_workers
    plans = {}
    for i, s in enumerate(scan.shards):
        if s.readable:
            plans[s.path.strip("/")] = (i, s.keep, 0, s.rows)
    first = readable[0].path.strip("/")
    plans[first] = (*plans[first][:2], pad, plans[first][3])

    remote: dict[str, Any] = {"num_cpus": data.decode_num_cpus}
    if data.data_resource:
        remote["resources"] = {data.data_resource: DATA_RESOURCE_PER_TASK}
    fs, _ = arrow_fs(store_url(url), storage)
    own_order = shuffle and order_key is not None
    source = _make_datasource_class()(
        [s.path for s in readable], filesystem=fs, plans=plans, labeled=scan.labeled,
        label_key=scan.label_key,
        block_rows=_block_rows(size) if decode == "cpu_tasks" else ENCODED_BLOCK_ROWS,
        order=(int(seed), order_key) if own_order else None, num_workers=num_workers,
        shuffle=FileShuffleConfig(seed=int(seed)) if shuffle and not own_order else None)
    ds = ray.data.read_datasource(source, override_num_blocks=len(readable), **remote)
    fn = _decode_batch if decode == "cpu_tasks" else _encoded_batch
    ds = ds.map_batches(fn, fn_kwargs={"image_size": size, "with_keys": with_keys, "aspect": is_aspect(scan)},
                        batch_format="pyarrow", batch_size=None, zero_copy_batch=True, **remote)
    return ds


def cache_bytes(scan: ShardScan, image_size: int, decode: str) -> int:
    """Object-store bytes the materialised train set takes: decoded canvases (rows * S * S * 3) for
    ``cpu_tasks``, the shards' encoded bytes for ``worker`` (tar headers included: an upper bound)."""
    if decode == "worker":
        return int(sum(s.size or 0 for s in scan.readable))
    return int(scan.rows) * image_size * image_size * 3


def build_train_dataset(url: str, *, data: DataConfig, storage: StorageConfig | None = None,
                        seed: int = 0, num_workers: int = 1, scan: ShardScan | None = None,
                        order_key: str | None = None):
    """The ``train`` dataset for Ray Train: materialised once (see the module docstring, "No
    per-epoch stall") when :func:`cache_bytes` fits ``data.cache_budget_mb``, else the streaming
    :func:`build_dataset`. Pass it to ``TorchTrainer`` with :func:`train_datasets_to_split` and read
    it with :func:`pipeline.data.iter_train_batches`. ``order_key``: see :func:`build_dataset`
    (streaming only; the train workers :func:`publish_epoch` under it)."""
    if scan is None:
        scan = scan_shards(url, "train", storage, label_key=data.label_key)
    decode = getattr(data, "decode", "cpu_tasks")
    budget = float(getattr(data, "cache_budget_mb", 0.0)) * (1 << 20)
    need = cache_bytes(scan, int(data.image_size), decode)
    if need > budget:
        log.info("train set needs %.0f MB > data.cache_budget_mb: streaming every epoch", need / 2**20)
        return build_dataset(url, "train", data=data, storage=storage, seed=seed, num_workers=num_workers,
                             scan=scan, decode=decode, order_key=order_key)
    # Index order (no file shuffle) and preserve_order: the cached block order is the same on every
    # run, so that the per-epoch permutation (seed, epoch) -> order is reproducible after a restart.
    ds = build_dataset(url, "train", data=data, storage=storage, seed=seed, num_workers=num_workers,
                       scan=scan, shuffle=False, decode=decode)
    ds.context.execution_options.preserve_order = True
    return ds.materialize()


def is_cached(ds) -> bool:
    """True for a dataset from :func:`build_train_dataset` that was materialised."""
    from ray.data.dataset import MaterializedDataset
    return isinstance(ds, MaterializedDataset)


def train_datasets_to_split(datasets: dict[str, Any]) -> list[str]:
    """``ray.train.DataConfig(datasets_to_split=...)`` for a datasets dict: ``train`` is split by Ray
    (streaming_split) only when it streams; a cached train set goes unsplit to every worker, and
    :func:`~pipeline.data.iter_train_batches` takes each worker's exact slice per epoch."""
    return [] if is_cached(datasets["train"]) else ["train"]


# ---------------------------------------------------------------------------------------------
# Train-worker side


def split_batch(batch: dict[str, Any]) -> tuple[Any, Any, dict[str, int]]:
    """``(images, labels, skipped)`` from one batch of :func:`build_dataset` rows (torch tensors from
    ``iter_torch_batches`` or numpy arrays from ``iter_batches``).

    Rows with a dropping code (missing/undecodable image, read error, padding) are removed; rows
    with a missing or bad label stay (label -1). ``skipped`` maps reason -> count for this batch
    (non-zero only; padding never counted). No copy when nothing is dropped (the common case)."""
    skip = batch["skip"]
    images, labels = batch["image"], batch["label"]
    if isinstance(skip, np.ndarray):
        counts = np.bincount(skip.astype(np.int64), minlength=NUM_CODES).tolist()
    else:
        import torch
        counts = torch.bincount(skip.to(torch.int64), minlength=NUM_CODES).tolist()
    skipped = {SKIP_REASONS[c]: counts[c] for c in SKIP_REASONS if counts[c]}
    if sum(counts[FIRST_DROPPED:]) == 0:
        return images, labels, skipped
    keep = skip < FIRST_DROPPED
    return images[keep], labels[keep], skipped


def merge_counts(*counts: dict[str, int]) -> dict[str, int]:
    """Sum reason -> count dicts (pre-scan + per batch + across workers)."""
    total: Counter = Counter()
    for c in counts:
        total.update({k: int(v) for k, v in (c or {}).items()})
    return {k: v for k, v in sorted(total.items()) if v}


__all__ = ["build_dataset", "build_train_dataset", "is_cached", "train_datasets_to_split", "cache_bytes",
           "publish_epoch", "publish_exclusion", "planned_order", "epoch_shard_order", "is_extra_pad",
           "is_aspect", "DECODE_MODES", "split_batch", "merge_counts", "DATA_RESOURCE_PER_TASK",
           "OK", "MISSING_LABEL", "BAD_LABEL", "MISSING_IMAGE", "UNDECODABLE_IMAGE", "READ_ERROR", "PAD"]
