"""Shards: write (`cacr prepare`), validate (pre-scan), read with Ray Data, inspect.

What the trainer calls, in order (driver, then each train worker)::

    from pipeline.data import scan_shards, build_dataset, split_batch, merge_counts

    scan = scan_shards(cfg.data.url, "train", cfg.storage)      # before ray.init: fast, clear errors
    log(scan.summary()); tb_skipped = dict(scan.skipped)         # pre-scan reason -> count
    ds = build_dataset(cfg.data.url, "train", data=cfg.data, storage=cfg.storage,
                       seed=cfg.seed, num_workers=cfg.num_workers, scan=scan)
    TorchTrainer(..., datasets={"train": ds})                    # default DataConfig is fine

    # in the worker, once per epoch:
    for batch in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=B):
        images, labels, skipped = split_batch(batch)             # uint8 (n, S, S, 3), int64 (n,)
        epoch_skips = merge_counts(epoch_skips, skipped)         # per-sample reason -> count

Skip reasons: pre-scan ``corrupt_shard``, ``empty_shard``, ``missing_shard``, ``truncated_shard``,
``lost_samples``; per sample ``missing_image``, ``undecodable_image`` (dropped), ``missing_label``,
``bad_label`` (kept, label -1), ``read_error`` (shard failed mid-read; dropped). See format.py.
"""
from pipeline.data.format import (ALL_REASONS, INDEX_NAME, SHARD_REASONS, SKIP_REASONS, DataError,
                                  decode_image)
from pipeline.data.read import build_dataset, merge_counts, split_batch
from pipeline.data.validate import ShardInfo, ShardScan, has_shards, read_index, scan_shards
from pipeline.data.write import prepare

__all__ = [
    "DataError", "prepare", "has_shards", "scan_shards", "ShardScan", "ShardInfo", "read_index", "build_dataset",
    "split_batch", "merge_counts", "decode_image", "SKIP_REASONS", "SHARD_REASONS", "ALL_REASONS",
    "INDEX_NAME",
]
