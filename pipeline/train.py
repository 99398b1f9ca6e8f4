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


def _join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def init_ray(cfg: Config) -> None:
    """Connect to ``RAY_ADDRESS`` when set (cluster / ``ray job submit``), else start Ray locally
    with enough logical CPUs for the workers plus the decode tasks (over-declared on small
    machines: Ray CPUs are scheduling slots, and starving decode of slots would deadlock), with
    the dashboard and a quiet console (:mod:`pipeline.ray_local`)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "120")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    from pipeline.ray_local import init_local_ray, quiet_env

    need = cfg.num_workers * cfg.cpus_per_worker + 4
    init_local_ray(int(max(os.cpu_count() or 1, math.ceil(need))),
                   num_gpus=torch.cuda.device_count() if cfg.use_gpu else 0,
                   env=quiet_env(cfg.log_level), log_to_driver=True)


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


def plan_data(cfg: Config) -> DataPlan:
    """Prepare the embedded default on first use, then pre-scan the shards (no Ray needed): an
    unreachable store, a URL without shards or an all-bad shard set fails here, before training."""
    from pipeline import data

    url = cfg.data.url
    if not data.has_shards(url, cfg.storage):
        if not cfg.data.source:
            raise data.DataError(f"no shards at '{url}': run `cacr prepare SOURCE {url}` first, or set "
                                 "data.source to prepare them automatically")
        print(f"[cacr] no shards at {url}: preparing them from '{cfg.data.source}'", flush=True)
        data.prepare(cfg.data.source, url, storage=cfg.storage, image_size=cfg.data.image_size)
    train_scan = data.scan_shards(url, "train", cfg.storage)
    if train_scan.rows < cfg.global_batch:
        raise data.DataError(f"'{url}' has {train_scan.rows} readable training samples, fewer than one "
                             f"global batch ({cfg.batch_size} x {cfg.num_workers} workers): lower batch_size")
    val_scan = None
    if cfg.data.val_split:
        try:
            val_scan = data.scan_shards(url, cfg.data.val_split, cfg.storage)
        except data.DataError:
            val_scan = None  # no labelled val split: the kNN monitor is off (said in the log)
        if val_scan is not None and (val_scan.rows == 0 or not val_scan.labeled):
            val_scan = None
    return DataPlan(train_scan, val_scan, max(1, train_scan.rows // cfg.global_batch))


def build_trainer(cfg: Config, *, callbacks: list | None = None, storage_path: str | None = None,
                  plan: DataPlan | None = None):
    """Everything up to ``TorchTrainer`` (also used by Tune for each trial)."""
    import ray.data
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline import data, storage

    plan = plan or plan_data(cfg)
    # Ray Data's per-epoch progress bars would drown the one line per epoch that matters.
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    datasets = {"train": data.build_dataset(cfg.data.url, "train", data=cfg.data, storage=cfg.storage,
                                            seed=cfg.seed, num_workers=cfg.num_workers,
                                            scan=plan.train_scan)}
    if plan.val_scan is not None:
        # Unsplit, unshuffled copies that only rank 0 reads, once, for the kNN monitor.
        datasets["knn_bank"] = data.build_dataset(cfg.data.url, "train", data=cfg.data, storage=cfg.storage,
                                                  scan=plan.train_scan, shuffle=False)
        datasets["knn_val"] = data.build_dataset(cfg.data.url, cfg.data.val_split, data=cfg.data,
                                                 storage=cfg.storage, scan=plan.val_scan, shuffle=False)
    storage_path = storage_path or cfg.storage_path
    run_url = _join(storage_path, cfg.name)
    remote = "://" in storage_path
    fs, fs_path = storage.arrow_fs(storage_path, cfg.storage) if remote else (None, None)
    loop_config = {
        "config": to_dict(cfg),
        "scan_skipped": plan.skipped,
        "steps_per_epoch": plan.steps_per_epoch,
        "tensorboard_url": _join(run_url, "tensorboard"),
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
            name=cfg.name, storage_path=fs_path if remote else os.path.abspath(storage_path),
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures, controller_failure_limit=3),
            logging_config=LoggingConfig(log_level=cfg.log_level.upper()),
            callbacks=callbacks or []),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    return trainer, run_url, plan


def run_training(cfg: Config) -> dict[str, Any]:
    """Run (or resume) one training run; prints per-epoch lines and a final JSON summary."""
    if not cfg.name:
        cfg.name = _default_name(cfg)
    plan = plan_data(cfg)
    init_ray(cfg)
    trainer, run_url, plan = build_trainer(cfg, plan=plan)
    print(f"[cacr] run '{cfg.name}': {plan.describe()}", flush=True)
    print(f"[cacr] watch it: tensorboard --logdir {_join(run_url, 'tensorboard')}", flush=True)
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
        error = result.error
    except Exception as e:  # Ray raises the workers' error once FailureConfig's retries are spent
        error = e
    wall = time.perf_counter() - t0
    if error is not None:
        first = next((ln.strip() for ln in reversed(str(error).strip().splitlines()) if ln.strip()),
                     type(error).__name__)
        raise TrainingFailed(f"training run '{cfg.name}' failed ({first}); fix the cause and re-run with "
                             f"name={cfg.name} to resume from its last checkpoint")
    metrics = result.metrics or {}
    from pipeline.export import export_backbone

    backbone = None
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            backbone = export_backbone(d, _join(run_url, "export"), cfg.storage)
    summary = {
        "run_dir": run_url, "tensorboard_logdir": _join(run_url, "tensorboard"),
        "epochs": metrics.get("epoch"), "steps": metrics.get("step"),
        "knn_top1": metrics.get("knn_top1"), "loss": metrics.get("loss"),
        "samples_per_s": metrics.get("samples_per_s"), "skipped": metrics.get("skipped", {}),
        "resumed_from_epoch": metrics.get("resumed_from_epoch"), "wall_s": round(wall, 1),
        "checkpoint": result.checkpoint.path if result.checkpoint else None, "backbone": backbone,
    }
    summary = finite_or_none(summary)  # what is printed is what is returned: null, never NaN
    print(json_line(summary), flush=True)
    return summary
