"""`cacr train`: distributed CACR pretraining with Ray Train (V2), monitored in TensorBoard.

Driver side (:func:`run_training`): validate the config, make sure the shards exist (the embedded
default prepares digits on first use), pre-scan them (bad shards counted, clear error if storage is
unreachable), connect to Ray (``RAY_ADDRESS`` or a local instance), and run a ``TorchTrainer`` whose
workers execute :func:`pipeline.worker.train_loop_per_worker`. Afterwards export the backbone and print, as the last
line, a JSON summary.

Worker side: :mod:`pipeline.worker` (the method from ``cacr/methods`` under DDP, one
``train_step`` per batch, a checkpoint per epoch through ``ray.train.report`` from which Ray
restarts failed workers and a re-run with the same name resumes, rank-0 TensorBoard logging).
"""
from __future__ import annotations

import math
import os
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import torch

from pipeline.config import Config, to_dict
from pipeline.console import finite_or_none, json_line



class TrainingFailed(RuntimeError):
    """The run stopped after exhausting its restarts; its checkpoints remain for a resume."""


# ----------------------------------------------------------------------------------------------
# Driver side


def _default_name(cfg: Config) -> str:
    return f"{cfg.loss.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def init_ray(cfg: Config) -> bool:
    """Join ``RAY_ADDRESS`` or start a local Ray sized for the workers plus the decode tasks
    (:func:`pipeline.ray_start.start_ray`: dashboard on, quiet console, GPU check before the
    start). Returns True if Ray was started here."""
    from pipeline.ray_start import start_ray

    return start_ray(num_cpus=math.ceil(cfg.num_workers * cfg.cpus_per_worker + 4),
                     use_gpu=cfg.use_gpu, log_level=cfg.log_level)


def check_cluster(cfg: Config) -> None:
    """The workers of this run fit the running cluster (the check ``cacr tune`` makes per trial)."""
    from pipeline.ray_start import check_resources

    check_resources(num_workers=cfg.num_workers, cpus_per_worker=cfg.cpus_per_worker,
                    use_gpu=cfg.use_gpu, data_cpus=cfg.data.decode_num_cpus, what="run")


@dataclass
class DataPlan:
    """What the driver learned about the shards before Ray Train starts."""

    train_scan: Any
    val_scan: Any | None
    steps_per_epoch: int

    @property
    def skipped(self) -> dict[str, int]:
        return dict(self.train_scan.skipped)

    def describe(self) -> str:
        val = f"; val: {self.val_scan.rows} samples" if self.val_scan is not None else ""
        return f"{self.train_scan.summary()}{val}; {self.steps_per_epoch} steps/epoch"


def plan_steps(cfg: Config, train_scan, val_scan=None) -> DataPlan:
    """The ONE step planning (train and every Tune trial): full global batches only, so every
    worker takes the same number of steps; fails if the set holds less than one global batch."""
    from pipeline.data import DataError

    if train_scan.rows < cfg.global_batch:
        raise DataError(f"'{train_scan.url}' has {train_scan.rows} readable training samples, fewer than "
                        f"one global batch ({cfg.batch_size} x {cfg.num_workers} workers): lower batch_size")
    return DataPlan(train_scan, val_scan, max(1, train_scan.rows // cfg.global_batch))


def source_to_prepare(cfg: Config) -> str | None:
    """What ``data.url`` is prepared from when it holds no shards. ``data.source=auto`` (default):
    only the default location (``./data/digits``) is prepared implicitly, from digits - a URL the
    user typed (``s3://bucket/digitz``) must hold shards; an explicit source always prepares."""
    from pipeline import storage
    from pipeline.config import DataConfig

    if cfg.data.source != "auto":
        return cfg.data.source or None
    default = storage.resolve_url(DataConfig().url)
    return "digits" if storage.resolve_url(cfg.data.url) == default else None


def plan_data(cfg: Config) -> DataPlan:
    """Prepare the embedded default on first use, then pre-scan the shards (no Ray needed): an
    unreachable store, a URL without shards or an all-bad shard set fails here, before training."""
    from pipeline import data

    url = cfg.data.url
    if not data.has_shards(url, cfg.storage):
        source = source_to_prepare(cfg)
        if not source:
            raise data.DataError(f"no shards at '{url}': run `cacr prepare SOURCE {url}` first (or set "
                                 "data.source=SOURCE to prepare them automatically)")
        print(f"[cacr] no shards at {url}: preparing them from '{source}'", flush=True)
        data.prepare(source, url, storage=cfg.storage, image_size=cfg.data.image_size,
                     imbalance=cfg.data.imbalance)
    label_key = cfg.data.label_key
    train_scan = data.scan_shards(url, "train", cfg.storage, label_key=label_key)
    val_scan = None
    if cfg.data.val_url:  # asked for by name: its problems are errors, not a silent "monitor off"
        val_scan = data.scan_shards(cfg.data.val_url, cfg.data.val_split or "val", cfg.storage,
                                    label_key=label_key, whole_set=True)
        if not val_scan.labeled:
            raise data.DataError(f"data.val_url '{cfg.data.val_url}' is unlabelled (no .cls members"
                                 + (", no data.label_key" if not label_key else "")
                                 + "): the kNN monitor needs labels; unset data.val_url")
    elif cfg.data.val_split:
        try:
            val_scan = data.scan_shards(url, cfg.data.val_split, cfg.storage, label_key=label_key)
        except data.DataError:
            val_scan = None  # no labelled val split: the kNN monitor is off (said in the log)
        if val_scan is not None and (val_scan.rows == 0 or not val_scan.labeled):
            val_scan = None
    if val_scan is not None and not train_scan.labeled:
        val_scan = None  # the kNN bank is the train set: without its labels there is no monitor
    return plan_steps(cfg, train_scan, val_scan)


def prepare_run(cfg: Config) -> tuple[Config, DataPlan]:
    """Everything a run checks on the driver BEFORE Ray starts, in order: user paths resolved once
    (:func:`pipeline.storage.resolve_paths`), the run name, the storage_path writable/reachable,
    the data prepared/scanned. Returns the resolved config (what goes to Ray) and the data plan."""
    from pipeline import storage
    from pipeline.ray_start import check_local_gpus

    check_local_gpus(cfg.use_gpu)
    cfg = storage.resolve_paths(cfg)
    if not cfg.name:
        cfg.name = _default_name(cfg)
    storage.check_writable(cfg.storage_path, cfg.storage)
    return cfg, plan_data(cfg)


def build_trainer(cfg: Config, *, callbacks: list | None = None, storage_path: str | None = None,
                  plan: DataPlan | None = None):
    """Everything up to ``TorchTrainer`` (also used by Tune for each trial). ``cfg``'s paths must
    be resolved already (:func:`prepare_run`)."""
    import ray.data
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline import data, storage, storage_retry

    storage_retry.set_tag(cfg.name)  # filesystems made from here on count S3 retries for this run
    plan = plan or plan_data(cfg)
    # Ray Data's per-epoch progress bars would drown the one line per epoch that matters.
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Streaming: epoch e's shard order = f(seed, e), e published by the workers under this key.
    order_key = f"{cfg.name}:{uuid.uuid4().hex[:8]}"
    datasets = {"train": data.build_train_dataset(cfg.data.url, data=cfg.data, storage=cfg.storage,
                                                  seed=cfg.seed, num_workers=cfg.num_workers,
                                                  scan=plan.train_scan, order_key=order_key)}
    if plan.val_scan is not None:
        # Unsplit, unshuffled copies that only rank 0 reads, once, for the kNN monitor.
        datasets["knn_bank"] = data.build_dataset(cfg.data.url, "train", data=cfg.data, storage=cfg.storage,
                                                  scan=plan.train_scan, shuffle=False)
        datasets["knn_val"] = data.build_dataset(cfg.data.val_url or cfg.data.url, plan.val_scan.split,
                                                 data=cfg.data, storage=cfg.storage, scan=plan.val_scan,
                                                 shuffle=False)
    storage_path = storage.resolve_url(storage_path or cfg.storage_path)
    run_url = storage.join_url(storage_path, cfg.name)
    if storage.is_remote(storage_path):
        fs, fs_path = storage.arrow_fs(storage_path, cfg.storage)
    else:
        fs, fs_path = None, storage_path
    loop_config = {
        "config": to_dict(cfg),
        "scan_skipped": plan.skipped,
        "steps_per_epoch": plan.steps_per_epoch,
        "run_url": run_url,
        "data_order_key": order_key,
        "data_mode": "row" if data.is_cached(datasets["train"]) else "id",  # what names a row
        "tensorboard_url": storage.join_url(run_url, "tensorboard"),
        "knn_bank_size": 10_000, "knn_val_size": 10_000,
    }
    from pipeline.worker import train_loop_per_worker

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker,
                                                           **({"GPU": 1} if cfg.use_gpu else {})}),
        run_config=RunConfig(
            name=cfg.name, storage_path=fs_path, storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures, controller_failure_limit=3),
            logging_config=LoggingConfig(log_level=cfg.log_level.upper()),
            callbacks=callbacks or []),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=data.train_datasets_to_split(datasets)),
    )
    return trainer, run_url, plan


CHECKPOINT_PREFIX = "checkpoint_"


def list_checkpoints(run_url: str, storage_cfg=None) -> list[str]:
    """URLs of the checkpoints Ray Train kept in a run directory, oldest first (Ray names them
    ``checkpoint_<UTC timestamp>``, so name order is time order)."""
    from pipeline import storage

    return [storage.join_url(run_url, n) for n in storage.list_dirs(run_url, storage_cfg)
            if n.startswith(CHECKPOINT_PREFIX)]


def training_failed(cfg: Config, run_url: str, error: BaseException) -> TrainingFailed:
    """The one line for a failed run; "re-run to resume" only when a checkpoint exists to resume.
    An S3 endpoint that stopped answering is named (and not asked again for the checkpoints)."""
    from pipeline import storage

    if storage.storage_unreachable(error):
        return TrainingFailed(
            f"training run '{cfg.name}' stopped: S3 {storage.describe_endpoint(cfg.storage)} did not "
            f"answer for storage.retry_deadline_s={cfg.storage.retry_deadline_s:g} s; once it is back, "
            f"re-run with name={cfg.name} to resume from the last checkpoint")
    first = next((ln.strip() for ln in reversed(str(error).strip().splitlines()) if ln.strip()),
                 type(error).__name__)
    try:
        resumable = bool(list_checkpoints(run_url, cfg.storage))
    except Exception:  # noqa: BLE001 - storage gone too: do not promise a resume
        resumable = False
    if resumable:
        return TrainingFailed(f"training run '{cfg.name}' failed ({first}); fix the cause and re-run "
                              f"with name={cfg.name} to resume from its last checkpoint")
    return TrainingFailed(f"training run '{cfg.name}' failed before its first checkpoint ({first}); "
                          "fix the cause and re-run")


def run_training(cfg: Config) -> dict[str, Any]:
    """Run (or resume) one training run; prints per-epoch lines and a final JSON summary. Every
    path printed is absolute (or an s3:// URL): usable from any directory."""
    from pipeline import signals, storage

    cfg, plan = prepare_run(cfg)
    signals.set_resume(name=cfg.name)  # Ctrl-C's one line names the run to resume
    init_ray(cfg)
    check_cluster(cfg)
    trainer, run_url, plan = build_trainer(cfg, plan=plan)
    tb_url = storage.join_url(run_url, "tensorboard")
    print(f"[cacr] run '{cfg.name}': {plan.describe()}", flush=True)
    print(f"[cacr] watch it: tensorboard --logdir {tb_url}", flush=True)
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
        error = result.error
    except Exception as e:  # Ray raises the workers' error once FailureConfig's retries are spent
        error = e
    wall = time.perf_counter() - t0
    if error is not None:
        raise training_failed(cfg, run_url, error)
    metrics = result.metrics or {}
    if (metrics.get("epoch") or 0) < cfg.epochs:  # Ray Train's SIGINT handler aborted the run
        raise signals.Interrupted()
    from pipeline.export import export_backbone

    backbone = None
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            backbone = export_backbone(d, storage.join_url(run_url, "export"), cfg.storage)
    summary = {
        "run_dir": run_url, "tensorboard_logdir": tb_url,
        "epochs": metrics.get("epoch"), "steps": metrics.get("step"),
        "knn_top1": metrics.get("knn_top1"), "loss": metrics.get("loss"),
        "samples_per_s": metrics.get("samples_per_s"), "skipped": metrics.get("skipped", {}),
        "storage_retries": metrics.get("storage_retries", 0), "rows_read": metrics.get("rows_read"),
        "resumed_from_epoch": metrics.get("resumed_from_epoch"), "wall_s": round(wall, 1),
        "checkpoint": (storage.url_of(result.checkpoint.path, like=cfg.storage_path)
                       if result.checkpoint else None),
        "backbone": backbone,
    }
    summary = finite_or_none(summary)  # what is printed is what is returned: null, never NaN
    print(json_line(summary), flush=True)
    return summary
