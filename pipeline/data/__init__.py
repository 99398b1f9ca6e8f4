"""Shards: write (`cacr prepare`), validate (pre-scan), read with Ray Data, inspect.

What the trainer calls, in order (driver, then each train worker)::

    from pipeline.data import (scan_shards, build_train_dataset, train_datasets_to_split,
                               iter_train_batches, split_batch, merge_counts)

    scan = scan_shards(cfg.data.url, "train", cfg.storage)      # before ray.init: fast, clear errors
    log(scan.summary()); tb_skipped = dict(scan.skipped)         # pre-scan reason -> count
    ds = build_train_dataset(cfg.data.url, data=cfg.data, storage=cfg.storage,
                             seed=cfg.seed, num_workers=cfg.num_workers, scan=scan)  # cached if it fits
    TorchTrainer(..., datasets={"train": ds},
                 dataset_config=ray.train.DataConfig(datasets_to_split=train_datasets_to_split({"train": ds})))

    # in the worker, once per epoch:
    shard = ray.train.get_dataset_shard("train")
    for batch in iter_train_batches(shard, batch_size=B, device=device, decode=cfg.data.decode,
                                    prefetch_batches=2, pin_memory=use_gpu, epoch=epoch, seed=cfg.seed):
        images, labels, skipped = split_batch(batch)             # uint8 (n, S, S, 3), int64 (n,)
        hw = batch.get("hw")                                     # aspect sets: valid (h, w) per image
        epoch_skips = merge_counts(epoch_skips, skipped)         # per-sample reason -> count

Skip reasons: pre-scan ``corrupt_shard``, ``empty_shard``, ``missing_shard``, ``truncated_shard``,
``lost_samples``; per sample ``missing_image``, ``undecodable_image`` (dropped), ``missing_label``,
``bad_label`` (kept, label -1), ``read_error`` (per sample of a shard that failed mid-read;
dropped). See format.py.
"""
from pipeline.data.format import (ALL_REASONS, INDEX_NAME, SHARD_REASONS, SKIP_REASONS, DataError,
                                  decode_image)
from pipeline.data.batches import decode_batch, epoch_row_order, iter_train_batches
from pipeline.data.read import (DECODE_MODES, build_dataset, build_train_dataset, is_cached, merge_counts,
                                split_batch, train_datasets_to_split)
from pipeline.data.validate import ShardInfo, ShardScan, has_shards, read_index, scan_shards
from pipeline.data.write import prepare

__all__ = [
    "DataError", "prepare", "has_shards", "scan_shards", "ShardScan", "ShardInfo", "read_index", "build_dataset",
    "split_batch", "merge_counts", "decode_image", "SKIP_REASONS", "SHARD_REASONS", "ALL_REASONS",
    "INDEX_NAME", "build_train_dataset", "is_cached", "train_datasets_to_split", "iter_train_batches",
    "decode_batch", "epoch_row_order", "DECODE_MODES",
]
