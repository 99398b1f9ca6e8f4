"""Train-worker side of the input path: :func:`iter_train_batches`, one epoch of batches.

    for batch in iter_train_batches(ray.train.get_dataset_shard("train"), batch_size=B, device=dev,
                                    decode=cfg.data.decode, prefetch_batches=2, pin_memory=use_gpu,
                                    epoch=epoch, seed=cfg.seed):
        images, labels, skipped = split_batch(batch)   # + batch["hw"] on aspect sets

Batches are dicts like Ray's ``iter_torch_batches`` gives: ``image`` uint8 (n, S, S, 3) and, for
aspect-preserving sets, ``hw`` int32 (n, 2) (valid height, width of each image on its top-left
aligned zero canvas) on ``device``; ``label`` int64, ``skip`` int8 (skip codes, see format.py) and
``id`` int64 on the CPU (so that counting skips never waits for the device).

Two kinds of shard (decided on the driver by :func:`pipeline.data.build_train_dataset`):

* **cached** (a materialised dataset, handed unsplit to every worker): the blocks stay in the object
  store; epoch ``e`` reads the N rows in the order ``permutation(rng(seed, e))`` of ALL rows (a
  sample-level shuffle, so batches are new mixtures every epoch, not the same neighbours in a new
  block order) - a pure function of (seed, epoch), so a restarted or resumed run gets the order it
  would have had - and worker ``r`` of ``W`` takes positions ``[r N / W, (r + 1) N / W)`` of that
  sequence (``N`` divides by ``W`` thanks to the reader's PAD rows): exactly once per epoch, equal
  batch counts, and no Ray Data execution per epoch. Each batch is gathered from the blocks its
  rows are in; a block is fetched (``ray.get``: a zero-copy view on the worker's node) the first
  time a batch needs it, by a background thread ``prefetch_batches`` batches ahead, and kept for
  the following epochs: the cached set is in memory by definition (``data.cache_budget_mb``).
* **streaming** (Ray Train's ``streaming_split``): one Ray Data execution per epoch, shard order
  re-shuffled by Ray per execution (not a function of ``epoch``); for sets above the cache budget.

``decode``: ``cpu_tasks`` = images arrive decoded; ``worker`` = rows carry the encoded bytes and are
decoded here in batches with ``torchvision.io.decode_jpeg`` (nvjpeg when ``device`` is CUDA, libjpeg
on the CPU) or ``decode_image`` (PNG, ...). Whatever torchvision rejects or warns about is decided
by the same PIL decode the CPU tasks use, so ``undecodable_image`` counts are the same in both modes.
"""
from __future__ import annotations

import concurrent.futures
import warnings
import weakref
from typing import Any, Iterator

import numpy as np

from pipeline.data.format import FIRST_DROPPED, UNDECODABLE_IMAGE, decode_aspect, decode_image

_JPEG_MAGIC = b"\xff\xd8"
_BLOCKS: "weakref.WeakKeyDictionary[Any, list]" = weakref.WeakKeyDictionary()
_COLUMNS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def worker_row_range(total: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of the epoch's row sequence that worker ``rank`` of ``world`` reads."""
    return total * rank // world, total * (rank + 1) // world


def iter_train_batches(shard, *, batch_size: int, device: Any = "cpu", decode: str | None = None,
                       prefetch_batches: int = 2, pin_memory: bool = False, epoch: int = 0,
                       seed: int = 0, rank: int | None = None, world_size: int | None = None,
                       exclude_rows: np.ndarray | None = None) -> Iterator[dict[str, Any]]:
    """One epoch of batches from ``shard`` (``ray.train.get_dataset_shard("train")``, or a Ray
    Dataset / DataIterator outside Train with explicit ``rank``/``world_size``). See the module
    docstring. ``decode``: ``None`` = whatever the rows hold; ``"cpu_tasks"``/``"worker"`` also check
    that the dataset was built that way (a mismatch is a ValueError, not a silent slow path).

    Cached shards add a ``row`` column (the row's number in the cached set: what a mid-epoch
    checkpoint records as consumed) and take ``exclude_rows``: those rows leave the epoch's order
    before it is cut into the workers' slices (a resume in the middle of the epoch). A streaming
    shard's reader leaves out the consumed rows itself (:func:`pipeline.data.read.publish_exclusion`)."""
    import torch
    device = torch.device(device)
    if _is_streaming(shard):
        rows = shard.iter_batches(batch_size=batch_size, batch_format="numpy",
                                  prefetch_batches=prefetch_batches)
    else:
        if rank is None or world_size is None:
            ctx = _train_context()
            rank = ctx.get_world_rank() if rank is None else rank
            world_size = ctx.get_world_size() if world_size is None else world_size
        rows = _cached_rows(shard, batch_size=batch_size, epoch=epoch, seed=seed, rank=rank,
                            world=world_size, prefetch=max(1, prefetch_batches), exclude=exclude_rows)
    for batch in rows:
        yield _to_torch(batch, device, decode, pin_memory)


def _train_context():
    import ray.train
    return ray.train.get_context()


def _is_streaming(shard) -> bool:
    from pipeline.ray_compat import is_stream_split_iterator

    return is_stream_split_iterator(shard)


def _cached_blocks(shard) -> list[tuple[Any, int]]:
    """(block ref, rows) of a cached shard, in the materialised (index) order; looked up once per
    worker process (``DataIterator.materialize`` of a materialised dataset copies nothing)."""
    if shard in _BLOCKS:
        return _BLOCKS[shard]
    from pipeline.ray_compat import block_refs

    blocks = block_refs(shard)
    _BLOCKS[shard] = blocks
    return blocks


def _cached_rows(shard, *, batch_size: int, epoch: int, seed: int, rank: int, world: int,
                 prefetch: int, exclude: np.ndarray | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Numpy batches of this worker's rows of epoch ``epoch`` (see the module docstring): the
    epoch's sample permutation of all rows, this worker's contiguous slice of it, gathered from
    the cached blocks batch by batch. Blocks are fetched when first needed (``prefetch`` batches
    ahead, in a background thread) and kept for the next epochs (zero-copy views of the object
    store on the worker's node)."""
    blocks = _cached_blocks(shard)
    starts = np.concatenate([[0], np.cumsum([n for _, n in blocks])]).astype(np.int64)
    order = epoch_row_order(int(starts[-1]), seed, epoch)
    if exclude is not None and len(exclude):
        order = order[~np.isin(order, exclude)]
    lo, hi = worker_row_range(len(order), rank, world)
    mine = order[lo:hi]
    plans = [_batch_plan(mine[i:i + batch_size], starts) for i in range(0, len(mine), batch_size)]
    cols = _block_columns(shard)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cacr-blocks") as pool:
        def fetch_for(plan):
            for b in np.unique(plan[0]):
                if int(b) not in cols:
                    cols[int(b)] = _fetch_block(blocks[int(b)][0])
            return plan
        futures = [pool.submit(fetch_for, p) for p in plans[:prefetch]]
        for i in range(len(plans)):
            which, rows = futures[i].result()
            futures[i] = None
            if i + prefetch < len(plans):
                futures.append(pool.submit(fetch_for, plans[i + prefetch]))
            batch = _gather(cols, which, rows)
            batch["row"] = mine[i * batch_size:(i + 1) * batch_size]
            yield batch


def epoch_row_order(total: int, seed: int, epoch: int) -> np.ndarray:
    """Epoch ``epoch``'s order of all rows of a cached set (sample-level shuffle): a pure function
    of (seed, epoch, row count), so a restarted or resumed run reads the order it would have had."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), 0xCAC3]).permutation(total)


def _batch_plan(rows: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Global row numbers -> (block of each row, row within that block)."""
    which = np.searchsorted(starts, rows, side="right") - 1
    return which, rows - starts[which]


def _block_columns(shard) -> dict[int, dict[str, np.ndarray]]:
    """This process's fetched blocks of a cached shard (block number -> numpy columns)."""
    if shard not in _COLUMNS:
        _COLUMNS[shard] = {}
    return _COLUMNS[shard]


def _fetch_block(ref) -> dict[str, np.ndarray]:
    import ray
    from ray.data.block import BlockAccessor

    return BlockAccessor.for_block(ray.get(ref)).to_numpy()


def _gather(cols: dict[int, dict[str, np.ndarray]], which: np.ndarray, rows: np.ndarray) -> dict[str, np.ndarray]:
    """One batch: row ``rows[i]`` of block ``which[i]``, for every column, in the batch's order."""
    first = cols[int(which[0])]
    out = {k: np.empty((len(rows),) + v.shape[1:], dtype=v.dtype) for k, v in first.items()}
    for b in np.unique(which):
        sel = np.flatnonzero(which == b)
        src = cols[int(b)]
        for k in out:
            out[k][sel] = src[k][rows[sel]]
    return out


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _to_torch(batch: dict[str, np.ndarray], device, decode: str | None, pin_memory: bool) -> dict[str, Any]:
    import torch
    encoded = "decode_size" in batch
    if decode is not None and decode != ("worker" if encoded else "cpu_tasks"):
        raise ValueError(f"iter_train_batches(decode={decode!r}) but the dataset was built with "
                         f"decode={'worker' if encoded else 'cpu_tasks'} (build_dataset(decode=...))")
    skip = np.array(batch["skip"], dtype=np.int8)
    out: dict[str, Any] = {"label": torch.from_numpy(np.asarray(batch["label"], np.int64).copy()),
                           "id": torch.from_numpy(np.asarray(batch["id"], np.int64).copy())}
    if "row" in batch:
        out["row"] = torch.from_numpy(np.asarray(batch["row"], np.int64).copy())
    if encoded:
        size = int(batch["decode_size"][0]) if len(skip) else 0
        aspect = bool(batch["aspect"][0]) if len(skip) else False
        image, hw = decode_batch(list(batch["image"]), skip, size=size, aspect=aspect, device=device)
        out["image"] = image
        if aspect:
            out["hw"] = hw
    else:
        for k in ("image", "hw"):
            if k in batch:
                with warnings.catch_warnings():
                    # zero-copy from the object store, as Ray's iter_torch_batches: read-only
                    # memory that the train step never writes to (augmentation makes new tensors)
                    warnings.simplefilter("ignore")
                    t = torch.as_tensor(np.ascontiguousarray(batch[k]))
                if pin_memory and torch.cuda.is_available():
                    t = t.pin_memory()  # as iter_torch_batches(pin_memory=True), also for device="cpu"
                if device.type != "cpu":
                    t = t.to(device, non_blocking=pin_memory)
                out[k] = t
    out["skip"] = torch.from_numpy(skip)
    return out


# ---------------------------------------------------------------------------------------------
# worker-side decode


def decode_batch(raw: list, skip: np.ndarray, *, size: int, aspect: bool, device: Any = "cpu"):
    """Encoded images -> (canvas uint8 (n, S, S, 3) on ``device``, hw int32 (n, 2) on ``device``).

    Rows whose code is already a dropping one stay zero; rows nothing can decode get
    ``UNDECODABLE_IMAGE`` in ``skip`` (modified in place). Geometry as on the CPU path
    (format.decode_image / decode_aspect): square sets resize the shorter side to S and centre-crop;
    aspect sets downscale only when the longer side exceeds S and sit top-left on the canvas."""
    import torch
    device = torch.device(device)
    n = len(raw)
    canvas = torch.zeros((n, size, size, 3), dtype=torch.uint8, device=device)
    hw = torch.zeros((n, 2), dtype=torch.int32)
    todo = [i for i in range(n) if skip[i] < FIRST_DROPPED]
    decoded = _decode_all([raw[i] for i in todo], device)
    for i, img in zip(todo, decoded):
        if img is None:  # torchvision refused or warned: PIL decides (the CPU tasks' verdict)
            arr = decode_aspect(raw[i], size) if aspect else decode_image(raw[i], size)
            if arr is None:
                skip[i] = UNDECODABLE_IMAGE
                continue
            img = torch.from_numpy(np.array(arr)).permute(2, 0, 1).to(device)
        else:
            img = _fit(img, size, aspect)
        h, w = img.shape[1:]
        canvas[i, :h, :w] = img.permute(1, 2, 0)
        hw[i, 0], hw[i, 1] = h, w
    return canvas, hw.to(device)


def _decode_all(blobs: list, device) -> list:
    """CHW uint8 tensors (JPEGs batched with decode_jpeg on ``device``, others with decode_image on
    the CPU), ``None`` where torchvision raised or warned (corrupt data it would half-decode)."""
    import torch
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    out: list = [None] * len(blobs)
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else None for b in blobs]
    jpeg = [i for i, b in enumerate(blobs) if b and bytes(b[:2]) == _JPEG_MAGIC]
    if jpeg:
        got = _quiet(lambda: decode_jpeg([tensors[i] for i in jpeg], mode=ImageReadMode.RGB, device=device))
        if got is None:  # one bad image fails the whole call: find it one by one
            got = [_quiet(lambda t=tensors[i]: decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
                   for i in jpeg]
        for i, img in zip(jpeg, got):
            out[i] = img
    jset = set(jpeg)
    for i, t in enumerate(tensors):
        if t is not None and i not in jset:
            img = _quiet(lambda t=t: decode_image(t, mode=ImageReadMode.RGB))
            out[i] = None if img is None else img.to(device)
    return out


def _quiet(fn):
    """fn() or None when it raises or warns (libjpeg reports corrupt data as a UserWarning)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = fn()
        except Exception:  # noqa: BLE001 - any decoder failure: PIL gets the last word
            return None
    # torchvision >= 0.29 announces the deprecation of its codecs on every call: not about the data
    corrupt = [w for w in caught if not issubclass(w.category, (DeprecationWarning, FutureWarning))]
    return None if corrupt else result


def _fit(img, size: int, aspect: bool):
    """CHW uint8 -> the stored geometry at ``size`` (bilinear with antialias, like PIL's resize)."""
    import torch.nn.functional as F
    h, w = img.shape[1:]
    if aspect:
        if max(h, w) <= size:
            return img
        scale = size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        return _resize(img, nh, nw, F)
    if (h, w) == (size, size):
        return img
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    img = _resize(img, nh, nw, F)
    top, left = (nh - size) // 2, (nw - size) // 2
    return img[:, top:top + size, left:left + size]


def _resize(img, nh: int, nw: int, F):
    x = img.unsqueeze(0).float()
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    return x.round_().clamp_(0, 255).to(img.dtype)[0]


__all__ = ["iter_train_batches", "decode_batch", "epoch_row_order", "worker_row_range"]
