"""`cacr evaluate`: kNN and linear-probe accuracy of a checkpoint's frozen encoder.

    cacr evaluate CHECKPOINT [--data URL] [key=value ...]      # last stdout line: a JSON object

Flow (driver, then Ray):

    load_checkpoint (local or s3://, weights_only)  -> backbone weights + the run's Config
    scan_shards(data, split_train / split_val)      -> clear errors: no shards, no split, no labels
    build_dataset (decode to the run's data.image_size, CPU tasks, shard order kept)
      -> map_batches(FeatureExtractor, ActorPoolStrategy(size=actors), num_gpus=1 if GPUs)
         each actor holds the backbone once (weights shipped through the object store), applies the
         run's eval preprocessing (pipeline.monitor.eval_tensor: resize + center crop, mean/std)
         and returns backbone features (float32) per row
      -> driver collects features + labels, sorted by sample id (order-independent results)
    weighted kNN (cosine, T = 0.07) at k = knn_k (20) and knn_k_large (200): bank = train, queries = val
    linear probe: standardised features -> one nn.Linear, SGD (momentum 0.9, nesterov) with a
      cosine schedule and weight decay, cross-entropy, `linear_epochs` passes; deterministic from
      `seed` (init, batch order)

Features for both splits are held in driver memory (N x F float32: 1.28 M x 2048 is ~10 GB); the
extraction itself is what scales out (one actor per GPU, or CPU actors on any node).

The final JSON line holds ``knn_top1`` (k = knn_k), ``knn<K>_top1`` (k = knn_k_large, by default
``knn200_top1``), ``linear_top1``, ``linear_train_top1``, ``samples`` {train, val}, ``classes``,
``feature_dim``, ``skipped`` (reason -> count), the checkpoint's epoch / loss / arch and the options.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.config import ConfigError, StorageConfig
from pipeline.console import json_line
from pipeline.errors import CacrError


@dataclass
class EvalOptions:
    """``cacr evaluate`` options (``key=value``; nested ``storage.*``)."""

    split_train: str = field(default="train", metadata={"help": "split used as kNN bank / probe training set"})
    split_val: str | None = field(default=None, metadata={
        "help": "split evaluated (default: the checkpoint's data.val_split, else 'val')"})
    knn_k: int = field(default=20, metadata={"help": "neighbours for knn_top1"})
    knn_k_large: int = field(default=200, metadata={"help": "neighbours for the second kNN figure"})
    knn_temperature: float = field(default=0.07, metadata={"help": "kNN vote temperature"})
    linear_epochs: int = field(default=100, metadata={"help": "linear-probe epochs (0: skip the probe)"})
    linear_lr: float = field(default=0.1, metadata={"help": "linear-probe peak learning rate (SGD, cosine)"})
    linear_wd: float = field(default=5e-4, metadata={"help": "linear-probe weight decay"})
    linear_batch_size: int = field(default=256, metadata={"help": "linear-probe batch size"})
    batch_size: int = field(default=256, metadata={"help": "images per feature-extraction call"})
    actors: int = field(default=0, metadata={
        "help": "feature-extraction actors (0: one per GPU, else min(4, cores / 2))"})
    threads: int = field(default=0, metadata={"help": "torch threads per CPU actor (0: cores / actors)"})
    use_gpu: bool | None = field(default=None, metadata={"help": "GPU actors (null: when the cluster has GPUs)"})
    seed: int = field(default=0, metadata={"help": "seed of the linear probe (init, batch order)"})
    log_level: str = field(default="warning", metadata={
        "choices": ("debug", "info", "warning", "error"),
        "help": "console level of Ray Data's own logs (info: the plan and progress of extraction)"})
    storage: StorageConfig = field(default_factory=StorageConfig)

    def validate(self) -> "EvalOptions":
        from pipeline.config import _check_tree

        _check_tree(self, "")
        checks = [("knn_k", self.knn_k >= 1, "must be >= 1"),
                  ("knn_k_large", self.knn_k_large >= 1, "must be >= 1"),
                  ("knn_temperature", self.knn_temperature > 0, "must be > 0"),
                  ("linear_epochs", self.linear_epochs >= 0, "must be >= 0"),
                  ("linear_lr", self.linear_lr > 0, "must be > 0"),
                  ("linear_wd", self.linear_wd >= 0, "must be >= 0"),
                  ("linear_batch_size", self.linear_batch_size >= 1, "must be >= 1"),
                  ("batch_size", self.batch_size >= 1, "must be >= 1"),
                  ("actors", self.actors >= 0, "must be >= 0"),
                  ("threads", self.threads >= 0, "must be >= 0"),
                  ("split_train", bool(self.split_train), "must not be empty")]
        for key, ok, msg in checks:
            if not ok:
                raise ConfigError(f"evaluate option '{key}' = {getattr(self, key)!r}: {msg}")
        return self


class EvalError(CacrError, ValueError):
    """Data that cannot be evaluated on (e.g. unlabelled): a one-line user error."""


def parse_options(overrides: list[str] | tuple[str, ...] = ()) -> EvalOptions:
    """``key=value`` strings -> validated :class:`EvalOptions`; errors name the key."""
    from pipeline.config import describe_keys, parse_override, set_key

    opts = EvalOptions()
    known = [k for k, _, _ in describe_keys(EvalOptions)]
    for ov in overrides:
        key, value = parse_override(ov)
        if key not in known:
            import difflib
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown evaluate option '{key}'{hint}; options: {', '.join(known)}")
        try:
            set_key(opts, key, value)
        except ConfigError as e:
            raise ConfigError(str(e).replace("config key", "evaluate option", 1)) from None
    return opts.validate()


# ----------------------------------------------------------------------------------------------
# Feature extraction (Ray Data actor pool)


class FeatureExtractor:
    """Ray Data callable class: holds the backbone once per actor; uint8 rows -> float32 features.

    Dropped rows (skip code >= FIRST_DROPPED) get zero features and are filtered by the driver."""

    def __init__(self, weights: Any, spec: dict[str, Any], augment: dict[str, Any], threads: int,
                 use_gpu: bool):
        import ray
        import torch

        from cacr.augment_config import AugmentConfig
        from cacr.model import build_torchvision_backbone

        if isinstance(weights, ray.ObjectRef):
            weights = ray.get(weights)
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        net = build_torchvision_backbone(**spec)
        net.load_state_dict(weights, strict=True)
        self.net = net.to(self.device).eval().to(memory_format=torch.channels_last)
        self.aug = AugmentConfig(**augment)
        self.dim = int(net.feature_dim)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from pipeline.data.format import FIRST_DROPPED
        from pipeline.monitor import eval_tensor

        skip = batch["skip"]
        keep = skip < FIRST_DROPPED
        feats = np.zeros((len(skip), self.dim), dtype=np.float32)
        if keep.any():
            x = torch.from_numpy(np.ascontiguousarray(batch["image"][keep])).to(self.device)
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                        enabled=self.device.type == "cuda"):
                x = eval_tensor(x, self.aug).contiguous(memory_format=torch.channels_last)
                feats[keep] = self.net(x).float().cpu().numpy()
        out = {"feature": feats, "label": batch["label"], "skip": skip, "id": batch["id"]}
        if "part" in batch:
            out["part"] = batch["part"]
        return out


def _ray_init(opts: EvalOptions) -> None:
    """Join ``RAY_ADDRESS`` or start a local Ray (no dashboard: no Ray Train here)."""
    from pipeline.ray_start import start_ray

    start_ray(num_cpus=opts.actors + 2, use_gpu=opts.use_gpu, log_level=opts.log_level,
              dashboard=False, gpu_key="evaluate option use_gpu")


def _plan_actors(opts: EvalOptions) -> tuple[int, int, bool]:
    """(actors, torch threads per actor, GPU actors)."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = gpus > 0 if opts.use_gpu is None else opts.use_gpu
    if use_gpu and gpus == 0:
        raise EvalError("evaluate option 'use_gpu' = true but the Ray cluster has no GPU")
    cores = os.cpu_count() or 1
    actors = opts.actors or (gpus if use_gpu else max(1, min(4, cores // 2)))
    threads = opts.threads or max(1, cores // actors)
    return actors, threads, use_gpu


def _tag(batch: dict[str, np.ndarray], part: int) -> dict[str, np.ndarray]:
    batch["part"] = np.full(len(batch["id"]), part, dtype=np.int8)
    return batch


def extract_features(url: str | list[str], splits: list[str], *, weights_ref: Any, spec: dict[str, Any],
                     cfg, opts: EvalOptions, scans: list | None = None) -> list[dict[str, Any]]:
    """Backbone features of the ``splits`` of ``url``, in ONE Ray Data execution (one actor pool).
    ``url``: one location for every split, or one per split (a ``data.val_url`` set).

    Returns per split {"features" (N, F) float32, "labels" (N,) int64, "ids" (N,), "skipped"}: rows
    the reader dropped are removed, rows are ordered by sample id (so results never depend on the
    order in which blocks finish)."""
    import ray

    from pipeline.config import DataConfig, to_dict
    from pipeline.data import build_dataset, merge_counts, split_batch

    actors, threads, use_gpu = _plan_actors(opts)
    urls = list(url) if isinstance(url, (list, tuple)) else [url] * len(splits)
    scans = scans or [None] * len(splits)
    parts = []
    for i, (u, split, scan) in enumerate(zip(urls, splits, scans)):
        data = DataConfig(url=u, source=None, image_size=cfg.data.image_size, label_key=cfg.data.label_key,
                          decode_num_cpus=cfg.data.decode_num_cpus, data_resource=cfg.data.data_resource)
        parts.append(build_dataset(u, split, data=data, storage=opts.storage, scan=scan, shuffle=False)
                     .map_batches(_tag, fn_kwargs={"part": i}, batch_format="numpy", batch_size=None,
                                  num_cpus=data.decode_num_cpus))
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    ds = ds.map_batches(
        FeatureExtractor, batch_size=opts.batch_size, batch_format="numpy",
        fn_constructor_kwargs={"weights": weights_ref, "spec": spec, "augment": to_dict(cfg.augment),
                               "threads": 0 if use_gpu else threads, "use_gpu": use_gpu},
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1, num_gpus=1 if use_gpu else 0)
    acc: list[dict[str, list]] = [{"f": [], "y": [], "i": [], "s": []} for _ in splits]
    for b in ds.iter_batches(batch_size=4096, batch_format="numpy"):
        for p in np.unique(b["part"]):
            sel = b["part"] == p
            skip, label = b["skip"][sel], b["label"][sel]
            f, y, counts = split_batch({"image": b["feature"][sel], "label": label, "skip": skip})
            i, _, _ = split_batch({"image": b["id"][sel], "label": label, "skip": skip})
            a = acc[int(p)]
            a["f"].append(f), a["y"].append(y), a["i"].append(i), a["s"].append(counts)
    out = []
    for u, split, a in zip(urls, splits, acc):
        if not a["f"] or sum(len(x) for x in a["y"]) == 0:
            raise EvalError(f"no readable samples in split '{split}' of {u}")
        f, y, i = np.concatenate(a["f"]), np.concatenate(a["y"]).astype(np.int64), np.concatenate(a["i"])
        order = np.argsort(i, kind="stable")
        out.append({"features": f[order], "labels": y[order], "ids": i[order],
                    "skipped": merge_counts(*a["s"])})
    return out


# ----------------------------------------------------------------------------------------------
# Linear probe


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *,
                 num_classes: int, epochs: int = 100, lr: float = 0.1, weight_decay: float = 5e-4,
                 batch_size: int = 256, seed: int = 0, device: str | None = None,
                 return_predictions: bool = False) -> dict[str, Any]:
    """Logistic regression on frozen features (standardised with the train statistics): one
    ``nn.Linear``, SGD momentum 0.9 (nesterov), cosine lr by step, weight decay, cross-entropy.
    Deterministic for a given seed (init and batch order). Returns val and train top-1 (and, with
    ``return_predictions``, the validation predictions as ``val_predictions``, an int64 array)."""
    import torch
    import torch.nn.functional as F

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    xt = torch.as_tensor(train_x, dtype=torch.float32, device=dev)
    yt = torch.as_tensor(train_y, dtype=torch.long, device=dev)
    xv = torch.as_tensor(val_x, dtype=torch.float32, device=dev)
    yv = torch.as_tensor(val_y, dtype=torch.long, device=dev)
    mean = xt.mean(0, keepdim=True)
    std = xt.std(0, keepdim=True) if xt.shape[0] > 1 else torch.ones_like(mean)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant (e.g. dead) features: scale 1
    xt, xv = (xt - mean) / std, (xv - mean) / std
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    layer = torch.nn.Linear(xt.shape[1], num_classes)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.01)
        layer.bias.zero_()
    layer = layer.to(dev)
    opt = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    n = xt.shape[0]
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = max(1, epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(dev)
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            loss = F.cross_entropy(layer(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        train_acc = float((layer(xt).argmax(1) == yt).float().mean()) if n else float("nan")
        val_acc = float((layer(xv).argmax(1) == yv).float().mean()) if len(yv) else float("nan")
        out: dict[str, Any] = {"linear_top1": val_acc, "linear_train_top1": train_acc}
        if return_predictions:
            out["val_predictions"] = layer(xv).argmax(1).cpu().numpy().astype(np.int64)
    return out


# ----------------------------------------------------------------------------------------------
# Driver


def _checkpoint_config(state: dict[str, Any]):
    from pipeline.checkpoint import CheckpointError
    from pipeline.config import Config, from_dict

    try:
        return from_dict(Config, state["config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"checkpoint config is not readable by this version of cacr ({e})") from None


def _labelled_scan(url: str, split: str, storage: StorageConfig, label_key: str | None = None,
                   whole_set: bool = False):
    from pipeline.data import scan_shards

    scan = scan_shards(url, split, storage, label_key=label_key, whole_set=whole_set)
    if not scan.labeled:
        raise EvalError(f"split '{split}' of {scan.url} is unlabelled: evaluation needs labels "
                        "(`cacr prepare` a labelled source, e.g. an image folder with class subfolders)")
    return scan


def resolve_checkpoint(url: str, storage_cfg: StorageConfig | None = None, echo=None) -> str:
    """The checkpoint a user-given path means, checked before anything heavy runs: a checkpoint
    dir (or its state.pt) as is; a RUN dir (what ``cacr train`` printed as ``run_dir``) -> its
    newest checkpoint, said on the console. On S3 the endpoint / bucket is checked first (a
    one-line "cannot reach" in seconds, not "does not exist" after the data-path retries)."""
    from pipeline import storage
    from pipeline.checkpoint import STATE_FILE
    from pipeline.train import list_checkpoints

    echo = echo or (lambda m: print(m, flush=True))
    url = storage.resolve_url(url)
    if storage.is_remote(url):
        storage.check_location(url, storage_cfg, must_exist=True)
    if url.endswith(STATE_FILE) or STATE_FILE in storage.list_files(url, storage_cfg):
        return url
    found = list_checkpoints(url, storage_cfg)
    if not found:  # a file, or nothing there: load_checkpoint says which, in one line
        return url
    names = [c.rstrip("/").rsplit("/", 1)[-1] for c in found]
    echo(f"[cacr] {url} is a run directory: using its newest checkpoint {names[-1]}"
         + (f" (others: {', '.join(names[:-1])})" if len(names) > 1 else ""))
    return found[-1]


def evaluate(checkpoint: str | dict[str, Any], data_url: str | None = None,
             opts: EvalOptions | None = None, *, echo=None, tensorboard: str | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint (URL, or an already loaded state dict) on a labelled shard set.

    Per-class and many/medium/few-shot accuracy (:mod:`pipeline.eval_report`) are added to the
    result; its pictures and projector go to ``tensorboard`` (default: ``<run>/tensorboard`` next to
    a checkpoint given by path; ``"none"`` for none).

    Raises CheckpointError / DataError / StorageError / EvalError (one-line user errors) before
    Ray starts for a bad checkpoint, unreachable or unlabelled data."""
    import ray

    from pipeline.export import backbone_state, read_checkpoint, rebuild_backbone, stored_spec

    echo = echo or (lambda m: print(m, flush=True))
    opts = opts or EvalOptions()
    t0 = time.perf_counter()
    if not isinstance(checkpoint, dict):
        checkpoint = resolve_checkpoint(str(checkpoint), opts.storage, echo)
    state = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint, opts.storage)
    cfg = _checkpoint_config(state)
    weights = backbone_state(state)
    m = cfg.model
    spec = stored_spec(state)  # what the run built, ViT depth included
    rebuild_backbone(weights, spec)  # weights that do not fit: one line here, not in every actor
    url = data_url or cfg.data.url
    split_val = opts.split_val or cfg.data.val_split or "val"
    # The run's data.val_url is the held-out set, unless another data URL or split was asked for.
    val_url = cfg.data.val_url if (cfg.data.val_url and not data_url and not opts.split_val) else url
    train_scan = _labelled_scan(url, opts.split_train, opts.storage, cfg.data.label_key)
    val_scan = _labelled_scan(val_url, split_val, opts.storage, cfg.data.label_key, whole_set=val_url != url)
    ckpt_name = checkpoint if isinstance(checkpoint, str) else "<state>"
    echo(f"[cacr] evaluate {ckpt_name}: {m.arch} trained {state.get('epoch')} epochs with "
         f"{cfg.loss.name}; data {url} [{opts.split_train} {train_scan.rows} / {split_val} {val_scan.rows}]")

    _ray_init(opts)
    weights_ref = ray.put(weights)  # once in the object store, read by every actor
    t1 = time.perf_counter()
    tr, va = extract_features([url, val_url], [opts.split_train, split_val], weights_ref=weights_ref, spec=spec,
                              cfg=cfg, opts=opts, scans=[train_scan, val_scan])
    (xt, yt), (xv, yv, va_ids) = _labelled_features(tr, va, url, opts.split_train, split_val)
    num_classes = int(max(yt.max(), yv.max())) + 1
    echo(f"[cacr] features: {opts.split_train} {xt.shape}, {split_val} {xv.shape} in "
         f"{time.perf_counter() - t1:.1f}s")

    result = _accuracies(xt, yt, xv, yv, num_classes, opts)
    from pipeline import eval_report
    from pipeline.config import DataConfig
    tb_dir = tensorboard or (eval_report.default_logdir(ckpt_name) if isinstance(checkpoint, str) else None)
    result.update(eval_report.per_class_evaluation(
        result, train=(xt, yt), val=(xv, yv, va_ids), num_classes=num_classes,
        class_names=val_scan.classes, linear_pred=result.pop("val_predictions", None), knn_k=opts.knn_k,
        knn_temperature=opts.knn_temperature, logdir=None if tb_dir == "none" else tb_dir,
        step=int(state.get("epoch") or 0), url=url, split=split_val, storage=opts.storage,
        data=DataConfig(url=url, source=None, image_size=cfg.data.image_size), echo=echo))
    from pipeline.config import to_dict
    from pipeline.data import merge_counts
    result.update({
        "samples": {"train": int(len(yt)), "val": int(len(yv))},
        "classes": num_classes, "feature_dim": int(xt.shape[1]),
        "skipped": merge_counts(train_scan.skipped, val_scan.skipped, tr["skipped"], va["skipped"]),
        "checkpoint": ckpt_name, "data": url, "splits": [opts.split_train, split_val],
        "epoch": state.get("epoch"), "loss": cfg.loss.name, "arch": m.arch,
        "knn_k": [opts.knn_k, opts.knn_k_large],
        "options": {k: v for k, v in to_dict(opts).items() if k != "storage"},
        "wall_s": round(time.perf_counter() - t0, 1),
    })
    lin = result["linear_top1"]
    echo(f"[cacr] kNN top-1 {result['knn_top1']:.4f} (k={opts.knn_k}), "
         f"{result[f'knn{opts.knn_k_large}_top1']:.4f} (k={opts.knn_k_large}); linear top-1 "
         + (f"{lin:.4f}" if lin is not None else "skipped"))
    return result


def _labelled_features(tr: dict[str, Any], va: dict[str, Any], url: str, split_train: str, split_val: str):
    """((train features, labels), (val features, labels, ids)) of the labelled rows; a split
    without any labelled row is a user error."""
    tr_lab, va_lab = tr["labels"] >= 0, va["labels"] >= 0
    if not tr_lab.any() or not va_lab.any():
        which = split_train if not tr_lab.any() else split_val
        raise EvalError(f"split '{which}' of {url} has no labelled samples: evaluation needs labels")
    return ((tr["features"][tr_lab], tr["labels"][tr_lab]),
            (va["features"][va_lab], va["labels"][va_lab], va["ids"][va_lab]))


def _accuracies(xt: np.ndarray, yt: np.ndarray, xv: np.ndarray, yv: np.ndarray, num_classes: int,
                opts: EvalOptions) -> dict[str, Any]:
    """kNN top-1 at both k (bank = train, queries = val) and the linear probe (with its
    validation predictions under ``val_predictions``, for the per-class report)."""
    import torch

    from cacr.knn import knn_top1

    bank, bank_y = torch.from_numpy(xt), torch.from_numpy(yt)
    q, q_y = torch.from_numpy(xv), torch.from_numpy(yv)
    result: dict[str, Any] = {}
    for key, k in (("knn_top1", opts.knn_k), (f"knn{opts.knn_k_large}_top1", opts.knn_k_large)):
        result[key] = knn_top1(bank, bank_y, q, q_y, k=k, temperature=opts.knn_temperature,
                               num_classes=num_classes)
    if opts.linear_epochs > 0:
        result.update(linear_probe(xt, yt, xv, yv, num_classes=num_classes, epochs=opts.linear_epochs,
                                   lr=opts.linear_lr, weight_decay=opts.linear_wd,
                                   batch_size=opts.linear_batch_size, seed=opts.seed,
                                   return_predictions=True))
    else:
        result.update(linear_top1=None, linear_train_top1=None)
    return result


def run_evaluate(args: argparse.Namespace) -> int:
    """CLI entry: options are parsed (and rejected) before anything is loaded."""
    opts = parse_options(getattr(args, "overrides", None) or [])
    # --endpoint-url / --region / --profile / --anonymous (as for prepare/inspect/export) win
    for key in ("endpoint_url", "region", "profile"):
        if getattr(args, key, None):
            setattr(opts.storage, key, getattr(args, key))
    if getattr(args, "anonymous", False):
        opts.storage.anonymous = True
    result = evaluate(args.checkpoint, getattr(args, "data", None), opts,
                      tensorboard=getattr(args, "tensorboard", None))
    sys.stdout.flush()
    print(json_line(result), flush=True)
    return 0
