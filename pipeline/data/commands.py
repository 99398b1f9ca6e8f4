"""`cacr prepare` and `cacr inspect`: argparse wiring used by pipeline/cli.py.

    add_prepare_args(parser); rc = run_prepare(args)
    add_inspect_args(parser); rc = run_inspect(args)

Exit codes: 0 success; 2 a user/data problem (bad source, unreachable storage, no shards), with one
``error: ...`` line on stderr. ``inspect`` prints a human summary and, as its LAST stdout line, a
JSON object: url, split, shards, readable_shards, samples (delivered to training), skipped
(reason -> count, pre-scan + per-sample), classes (label -> count, "-1" = unlabelled), class_names,
image_size, image_format.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from typing import Any

import numpy as np

from pipeline.config import ConfigError, StorageConfig
from pipeline.data.format import SHARD_REASONS, SKIP_REASONS, DataError
from pipeline.storage import StorageError


def add_storage_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("object storage (else the standard AWS variables / profile)")
    g.add_argument("--endpoint-url", default=None, help="S3 endpoint, e.g. http://127.0.0.1:9000 (MinIO)")
    g.add_argument("--region", default=None, help="S3 region")
    g.add_argument("--profile", default=None, help="AWS profile from ~/.aws/config")
    g.add_argument("--anonymous", action="store_true", help="unsigned requests (public buckets)")


def storage_from_args(args: argparse.Namespace) -> StorageConfig:
    return StorageConfig(endpoint_url=getattr(args, "endpoint_url", None), region=getattr(args, "region", None),
                         profile=getattr(args, "profile", None), anonymous=bool(getattr(args, "anonymous", False)))


def add_prepare_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="digits | an image folder (one sub-folder per class, or flat), local or "
                                       "s3://bucket/prefix/ (read by the Ray tasks, on any node) | "
                                       "cifar10:PATH | cifar100:PATH (the python-pickle batches) | "
                                       "skimage-photos[:N] (crops of scikit-image's sample photos)")
    parser.add_argument("out", help="output: local directory or s3://bucket/prefix")
    parser.add_argument("--shard-size", type=int, default=None,
                        help="samples per shard (default: about 1/8 of each split, 32..1000)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="stored square size in px (default: 32 for digits/CIFAR, 64 for folders)")
    parser.add_argument("--max-size", type=int, default=None,
                        help="keep each image's aspect ratio, longer side <= this many px (never "
                             "upscaled); the reader hands out SxS canvases + valid sizes. Excludes --image-size")
    parser.add_argument("--format", choices=("png", "jpg"), default="png", help="stored image format")
    parser.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality for --format jpg")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split and sample order")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="held-out fraction when labels exist (default 0.2 for digits, 0.1 for "
                             "folders; CIFAR uses its own test batch, 0 drops it)")
    parser.add_argument("--parallel", choices=("auto", "ray", "local"), default="auto",
                        help="one Ray task per shard (auto: sources of 20000+ images)")
    parser.add_argument("--imbalance", default=None, metavar="PROFILE",
                        help="long-tailed TRAINING split (validation stays balanced): exp:R (class c "
                             "keeps R^(-c/(C-1))), linear:R (1/R .. 1, linear; plain 'linear' = the "
                             "authors' (c+1)/C), none; seeded by --seed")
    parser.add_argument("--allow-empty-classes", action="store_true",
                        help="accept an --imbalance profile that leaves a class with no training image")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar / lines")
    add_storage_args(parser)


def _fail(e: Exception) -> int:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2


def run_prepare(args: argparse.Namespace) -> int:
    from pipeline.data.write import prepare
    try:
        prepare(args.source, args.out, storage=storage_from_args(args), shard_size=args.shard_size,
                image_size=args.image_size, fmt=args.format, seed=args.seed,
                val_fraction=args.val_fraction, jpeg_quality=args.jpeg_quality,
                parallel=args.parallel, progress=not args.no_progress, max_size=args.max_size,
                imbalance=args.imbalance, allow_empty_classes=args.allow_empty_classes)
    except (DataError, StorageError, ConfigError) as e:
        return _fail(e)
    return 0


def add_inspect_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", help="shard set: local directory or s3://bucket/prefix")
    parser.add_argument("--split", default="train", help="split to read (train, val, ...)")
    parser.add_argument("--image-size", type=int, default=None, help="decode size (default: stored size)")
    parser.add_argument("--deep", action="store_true",
                        help="pre-scan every shard's tar headers, not only those whose size differs from index.json")
    parser.add_argument("--batch-size", type=int, default=512, help=argparse.SUPPRESS)
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="warning",
                        help="console level of Ray's and Ray Data's own logs (info: the read plan and "
                             "progress)")
    add_storage_args(parser)


def inspect_shards(url: str, split: str = "train", *, storage: StorageConfig | None = None,
                   image_size: int | None = None, deep: bool = False, batch_size: int = 512,
                   log_level: str = "warning") -> dict[str, Any]:
    """Read every sample of ``split`` through :func:`build_dataset`; return the inspect summary dict."""
    import ray

    from pipeline.data.read import build_dataset, merge_counts, split_batch
    from pipeline.data.validate import scan_shards
    from pipeline.ray_start import start_ray

    scan = scan_shards(url, split, storage, deep=deep)
    started = start_ray(log_level=log_level, dashboard=False, log_to_driver=False,
                        logging_level=getattr(logging, log_level.upper()))
    if log_level.upper() not in ("DEBUG", "INFO"):
        from ray.data import DataContext

        ctx = DataContext.get_current()  # no progress bars / plan lines on the console
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
    try:
        ds = build_dataset(url, split, storage=storage, scan=scan, image_size=image_size, shuffle=False)
        per_sample: Counter = Counter()
        classes: Counter = Counter()
        samples = 0
        shape = None
        for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
            images, labels, skipped = split_batch(batch)
            per_sample.update(skipped)
            samples += len(labels)
            shape = shape or (tuple(images.shape[1:]) if len(images) else None)
            vals, cnts = np.unique(labels, return_counts=True)
            classes.update({str(int(v)): int(c) for v, c in zip(vals, cnts)})
    finally:
        if started:
            ray.shutdown()
    return {
        "url": scan.url, "split": split, "shards": len(scan.shards), "readable_shards": len(scan.readable),
        "samples": samples, "skipped": merge_counts(scan.skipped, dict(per_sample)),
        "classes": dict(sorted(classes.items(), key=lambda kv: int(kv[0]))),
        "class_names": scan.classes, "image_size": scan.image_size or (shape[0] if shape else image_size),
        "decoded_shape": list(shape) if shape else None,
        "image_format": (scan.index or {}).get("image_format"),
        "splits": sorted((scan.index or {}).get("splits", {}) or [split]),
        "imbalance": (scan.index or {}).get("imbalance"),
    }


def format_summary(r: dict[str, Any]) -> str:
    lines = [f"{r['url']}  split={r['split']}  splits={','.join(r['splits'])}",
             f"  shards: {r['readable_shards']} readable of {r['shards']}",
             f"  samples: {r['samples']} delivered to training  (image {r['image_size']}px "
             f"{r['image_format'] or '?'}; decoded {r['decoded_shape']})"]
    names = r.get("class_names") or []
    if r["classes"]:
        parts = []
        for k, v in r["classes"].items():
            i = int(k)
            parts.append(f"{names[i] if 0 <= i < len(names) else ('unlabelled' if i < 0 else k)}={v}")
        lines.append("  classes: " + ", ".join(parts))
    lt = r.get("imbalance")
    if lt:
        lines.append(f"  imbalance: {lt['profile']} on the training split (ratio {lt['ratio']:g}); "
                     f"per-class train counts {lt['train_counts']}")
    if r["skipped"]:
        lines.append("  problems:")
        explain = {**SHARD_REASONS, "missing_label": "samples without a label: kept with label -1",
                   "bad_label": "labels that are not an ASCII integer: kept with label -1",
                   "missing_image": "samples without an image member: skipped",
                   "undecodable_image": "images PIL cannot decode: skipped",
                   "read_error": "samples of shards that failed mid-read (damage the pre-scan missed)"}
        for k, v in r["skipped"].items():
            lines.append(f"    {k}: {v}  ({explain.get(k, '')})")
    else:
        lines.append("  problems: none")
    return "\n".join(lines)


def run_inspect(args: argparse.Namespace) -> int:
    try:
        r = inspect_shards(args.url, args.split, storage=storage_from_args(args),
                           image_size=args.image_size, deep=args.deep, batch_size=args.batch_size,
                           log_level=args.log_level)
    except (DataError, StorageError, ConfigError) as e:
        return _fail(e)
    print(format_summary(r), flush=True)
    print(json.dumps(r, sort_keys=False), flush=True)
    return 0


__all__ = ["add_prepare_args", "run_prepare", "add_inspect_args", "run_inspect", "add_storage_args",
           "storage_from_args", "inspect_shards", "format_summary", "SKIP_REASONS"]
