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

<<<<<<< HEAD
from pipeline.config import Config, to_dict
=======
from pipeline.config import Config, ConfigError, from_dict, to_dict
>>>>>>> longtail
from pipeline.console import finite_or_none, json_line



class TrainingFailed(RuntimeError):
    """The run stopped after exhausting its restarts; its checkpoints remain for a resume."""


# ----------------------------------------------------------------------------------------------
<<<<<<< HEAD
=======
# Worker side


def _set_threads(cfg: Config) -> None:
    n = cfg.torch_threads or max(1, (os.cpu_count() or 1) // max(1, cfg.num_workers))
    torch.set_num_threads(n)


def _build_model(cfg: Config):
    from cacr.model import CACRModel

    m = cfg.model
    return CACRModel(m.arch, small_images=m.small_images, width=m.width, head_hidden=m.head_hidden,
                     head_out=m.head_out, head_layers=m.head_layers, norm=m.norm)


def _loss_fn(cfg: Config):
    from cacr.loss import cacr_loss, infonce_loss

    lc = cfg.loss
    if lc.name == "cacr":
        return lambda z: cacr_loss(z, alpha=lc.alpha, beta=lc.beta, tau_pos=lc.tau_pos,
                                   tau_neg=lc.tau_neg, detach_weights=lc.detach_weights,
                                   same_view_negatives=lc.same_view_negatives)
    if lc.name == "infonce":
        return lambda z: infonce_loss(z, temperature=lc.temperature)
    # e.g. cacr_queue: a cacr.methods Method (own networks, after_step), not a loss of one model
    raise ConfigError(f"config key 'loss.name' = {lc.name!r}: this trainer runs only cacr and infonce "
                      "(methods with their own networks need the cacr.methods trainer)")


def _rebatch(batches: Iterator[dict], batch_size: int, skipped: dict[str, int]) -> Iterator[tuple]:
    """Drop skipped samples (counting them by reason) and re-cut full batches of good ones.

    Every worker must take the same number of steps (the loss all-gathers), so partial batches are
    never yielded; the caller additionally agrees with the other workers before each step.
    """
    from pipeline.data import split_batch

    buf_x, buf_y, have = [], [], 0
    for batch in batches:
        x, y, counts = split_batch(batch)
        for k, v in counts.items():
            skipped[k] = skipped.get(k, 0) + int(v)
        if x.shape[0] == 0:
            continue
        buf_x.append(x)
        buf_y.append(y)
        have += x.shape[0]
        while have >= batch_size:
            xs, ys = torch.cat(buf_x), torch.cat(buf_y)
            yield xs[:batch_size], ys[:batch_size]
            buf_x, buf_y, have = [xs[batch_size:]], [ys[batch_size:]], have - batch_size


def _all_have_batch(has: bool, device: torch.device) -> bool:
    """True only if every worker has a batch for this step (so none waits forever in a collective)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return has
    t = torch.tensor([1 if has else 0], device=device, dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _load_eval_split(name: str, limit: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rank 0 reads a small labelled split once (kNN bank / queries) as uint8 images."""
    import ray.train

    from pipeline.data import split_batch

    try:
        ds = ray.train.get_dataset_shard(name)
    except Exception:
        return None
    if ds is None:
        return None
    xs, ys, n = [], [], 0
    for batch in ds.iter_torch_batches(batch_size=512):
        x, y, _ = split_batch(batch)
        xs.append(x)
        ys.append(y)
        n += x.shape[0]
        if n >= limit:
            break
    if not xs:
        return None
    return torch.cat(xs)[:limit], torch.cat(ys)[:limit].long()


def _inject_failure(cfg: Config, rank: int, world: int, step: int) -> None:
    """Debug option ``fail_at_step``: raise once in the last worker at that step (tests recovery)."""
    if cfg.fail_at_step is None or step != cfg.fail_at_step or rank != world - 1:
        return
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_put

    key = f"cacr:injected-failure:{cfg.name}".encode()
    if _internal_kv_get(key):
        return
    _internal_kv_put(key, b"1")
    raise RuntimeError(f"injected failure at step {step} (fail_at_step) in worker rank {rank}")


def _say(msg: str) -> None:
    """A console line from a worker. Straight to stdout, which Ray forwards to the driver once:
    Ray Train's patched ``print`` goes through its root logger, which reaches the console twice
    when the job's environment has not switched the patch off (``ray job submit`` on a cluster)."""
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def _quiet_worker_logs(log_level: str) -> None:
    """In this worker: Ray 2.60 logs every ``ray.train.report`` at INFO through a logger named
    after its source FILE, which escapes RunConfig's ``LoggingConfig`` filter (that matches
    ``ray.train.*`` names); Ray Data logs each execution of the kNN monitor's datasets."""
    import logging

    level = getattr(logging, log_level.upper())
    logging.getLogger("ray.data").setLevel(level)
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # pragma: no cover - another Ray layout: its own level rules apply
        return
    train_context.logger.setLevel(level)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from cacr.augment import MultiViewAugment
    from cacr.loss import alignment, uniformity
    from cacr.optim import build_optimizer, warmup_cosine
    from pipeline.checkpoint import load_resume_state, save_state
    from pipeline.data import merge_counts
    from pipeline.monitor import TensorBoard, denormalise_grid, embedding_stats, extract_features

    cfg: Config = from_dict(Config, loop_config["config"])
    scan_skipped: dict[str, int] = dict(loop_config.get("scan_skipped", {}))
    steps_per_epoch: int = loop_config["steps_per_epoch"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _set_threads(cfg)
    _quiet_worker_logs(cfg.log_level)
    device = ray.train.torch.get_device()
    use_bf16 = device.type == "cuda"  # bf16 autocast on CPU is ~10x slower: GPU only

    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts from rank 0)
    model = _build_model(cfg)
    if cfg.model.sync_batchnorm and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    lr = cfg.optim.base_lr * cfg.global_batch / 256
    optimizer = build_optimizer(cfg.optim.name, model, lr=lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(
        s, warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=cfg.optim.min_lr_ratio))

    start_epoch, step = 0, 0
    aug_gen = torch.Generator(device="cpu")
    aug_gen.manual_seed(cfg.seed * 1000 + rank)
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        state = load_resume_state(ckpt, say=_say)  # newest COMPLETE one (manifest verified)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
        gens = state.get("aug_rng", [])
        if rank < len(gens):
            aug_gen.set_state(gens[rank])
        torch.set_rng_state(state["torch_rng"])
        if rank == 0:
            _say(f"[cacr] resumed from checkpoint: epoch {start_epoch}, step {step}")

    model = ray.train.torch.prepare_model(model)  # moves to device, wraps in DDP when world > 1
    core = model.module if hasattr(model, "module") else model
    augment = MultiViewAugment(cfg.augment, cfg.num_views)
    loss_fn = _loss_fn(cfg)

    tb = knn_bank = knn_val = None
    if rank == 0:
        tb = TensorBoard(loop_config["tensorboard_url"], cfg.storage)
        # Written first, so runs stopped early (ASHA) appear in the HParams view as well; the
        # metric columns are read from these scalar tags as they are logged.
        tb.hparams(_hparams(cfg), ["val/knn_top1", "epoch/loss"])
        if cfg.data.val_split:
            knn_bank = _load_eval_split("knn_bank", loop_config["knn_bank_size"])
            knn_val = _load_eval_split("knn_val", loop_config["knn_val_size"])
            if knn_bank is None or knn_val is None or int((knn_bank[1] >= 0).sum()) == 0:
                _say("[cacr] kNN monitor off: no labelled train/val samples")
                knn_bank = knn_val = None

    from pipeline.data import iter_train_batches as data_batches  # cached train sets come unsplit

    train_shard = ray.train.get_dataset_shard("train")
    skipped_total: dict[str, int] = {}
    run_start = time.perf_counter()
    knn = float("nan")
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        epoch_start = time.perf_counter()
        wait_s = 0.0
        sum_loss = torch.zeros((), device=device)
        n_steps = 0
        epoch_skipped: dict[str, int] = {}
        # Batches arrive on the CPU (split_batch counts skips there without a device sync) and
        # move to the device once, pinned for an asynchronous copy when a GPU is used.
        batches = _rebatch(iter(data_batches(train_shard, batch_size=cfg.batch_size, device="cpu",
                                             decode=cfg.data.decode, prefetch_batches=2,
                                             pin_memory=cfg.use_gpu, epoch=epoch, seed=cfg.seed)),
                           cfg.batch_size, epoch_skipped)
        while True:
            t_wait = time.perf_counter()
            item = next(batches, None)
            if not _all_have_batch(item is not None, device):
                break  # some worker ran out: everyone ends the epoch together
            wait_s += time.perf_counter() - t_wait
            images, _labels = item
            images = images.to(device, non_blocking=True)
            views = augment(images, generator=aug_gen, channels_last=cfg.channels_last)  # (V, n, 3, H, W)
            if step == 0 and tb is not None:
                tb.image("augment/views", denormalise_grid(views, cfg.augment), 0)
            x = views.flatten(0, 1)  # view-major: row v*n + i is view v of image i
            step += 1
            _inject_failure(cfg, rank, world, step)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                z = model(x)
            z = z.float().view(cfg.num_views, images.shape[0], -1)
            out = loss_fn(z)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            sched.step()
            sum_loss += out.loss.detach()
            n_steps += 1
            if tb is not None and (step % cfg.log_every_steps == 0 or n_steps == 1):
                elapsed = time.perf_counter() - epoch_start
                m = {f"train/{k}": v for k, v in out.metrics().items()}
                m.update({"train/lr": optimizer.param_groups[0]["lr"],
                          "train/alignment": float(alignment(z.detach())),
                          "train/uniformity": float(uniformity(z.detach())),
                          "perf/samples_per_s": n_steps * images.shape[0] * world / max(elapsed, 1e-9),
                          "perf/data_wait_fraction": wait_s / max(elapsed, 1e-9)})
                m.update(embedding_stats(z))
                if not math.isfinite(m["train/loss"]):
                    _say(f"[cacr] loss is {m['train/loss']} at step {step}")
                tb.scalars(m, step)

        # ---- end of epoch: reduce metrics over workers, kNN monitor, checkpoint, report ----
        epoch_time = time.perf_counter() - epoch_start
        stats = torch.tensor([float(sum_loss), float(n_steps), wait_s, epoch_time], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            stats = stats.to(device)
            dist.all_reduce(stats)
            stats = stats.cpu()
            # every worker counts only the samples it saw; sum the per-reason counts
            gathered: list[dict] = [None] * world  # type: ignore[list-item]
            dist.all_gather_object(gathered, epoch_skipped)
        else:
            gathered = [epoch_skipped]
        skipped_total = merge_counts(skipped_total, *gathered)
        loss_mean = float(stats[0] / max(stats[1], 1))
        steps_this_epoch = n_steps
        samples_per_s = steps_this_epoch * cfg.global_batch / max(epoch_time, 1e-9)
        wait_fraction = float(stats[2] / max(stats[3], 1e-9))

        metrics: dict[str, Any] = {
            "epoch": epoch + 1, "step": step, "resumed_from_epoch": start_epoch,
            "loss": loss_mean, "samples_per_s": samples_per_s,
            "data_wait_fraction": wait_fraction, "epoch_time_s": epoch_time,
            "skipped": merge_counts(scan_skipped, skipped_total),
        }
        if rank == 0:
            if knn_bank is not None:
                from cacr.knn import knn_top1

                fb = extract_features(core, knn_bank[0], cfg.augment, device)
                fv = extract_features(core, knn_val[0], cfg.augment, device)
                knn = knn_top1(fb, knn_bank[1], fv, knn_val[1], k=cfg.data.knn_k)
                tb.scalars({"val/knn_top1": knn}, step)
            metrics["knn_top1"] = knn
            tb.scalars({"epoch/loss": loss_mean, "perf/epoch_samples_per_s": samples_per_s,
                        "perf/epoch_data_wait_fraction": wait_fraction}, step)
            tb.scalars({f"data/skipped/{k}": v for k, v in metrics["skipped"].items()}, step)
            done_epochs = epoch + 1 - start_epoch
            eta = (time.perf_counter() - run_start) / done_epochs * (cfg.epochs - epoch - 1)
            knn_text = f"knn {knn:.4f}  " if math.isfinite(knn) else ""  # monitor off: no val split
            _say(f"[cacr] epoch {epoch + 1}/{cfg.epochs}  loss {loss_mean:.4f}  {knn_text}"
                 f"{samples_per_s:.0f} samples/s  data-wait {wait_fraction:.0%}  ETA {eta:.0f}s")
            tb.sync()

        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            gen_states = [aug_gen.get_state()]
            if dist.is_available() and dist.is_initialized():
                all_gens: list = [None] * world
                dist.all_gather_object(all_gens, aug_gen.get_state())
                gen_states = all_gens
            if rank == 0:
                save_state(tmp, {
                    "model": core.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": sched.state_dict(), "epoch": epoch + 1, "step": step,
                    "config": to_dict(cfg), "torch_rng": torch.get_rng_state(),
                    "aug_rng": gen_states, "metrics": {k: v for k, v in metrics.items() if k != "skipped"},
                })
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)
        if not math.isfinite(loss_mean):
            raise FloatingPointError(f"loss diverged to {loss_mean} in epoch {epoch + 1}; "
                                     "lower optim.base_lr or check the data")
    if tb is not None:
        tb.close()


def _hparams(cfg: Config) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, prefix + k + ".")
            elif k not in ("name", "storage_path", "url", "source") and not prefix.startswith("storage."):
                flat[prefix + k] = v
    walk(to_dict(cfg), "")
    return flat


# ----------------------------------------------------------------------------------------------
>>>>>>> ingest
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
<<<<<<< HEAD
        source = source_to_prepare(cfg)
        if not source:
            raise data.DataError(f"no shards at '{url}': run `cacr prepare SOURCE {url}` first (or set "
                                 "data.source=SOURCE to prepare them automatically)")
        print(f"[cacr] no shards at {url}: preparing them from '{source}'", flush=True)
        data.prepare(source, url, storage=cfg.storage, image_size=cfg.data.image_size)
=======
        if not cfg.data.source:
            raise data.DataError(f"no shards at '{url}': run `cacr prepare SOURCE {url}` first, or set "
                                 "data.source to prepare them automatically")
        print(f"[cacr] no shards at {url}: preparing them from '{cfg.data.source}'", flush=True)
        data.prepare(cfg.data.source, url, storage=cfg.storage, image_size=cfg.data.image_size,
                     imbalance=cfg.data.imbalance)
>>>>>>> longtail
    train_scan = data.scan_shards(url, "train", cfg.storage)
    val_scan = None
    if cfg.data.val_split:
        try:
            val_scan = data.scan_shards(url, cfg.data.val_split, cfg.storage)
        except data.DataError:
            val_scan = None  # no labelled val split: the kNN monitor is off (said in the log)
        if val_scan is not None and (val_scan.rows == 0 or not val_scan.labeled):
            val_scan = None
    return plan_steps(cfg, train_scan, val_scan)


def prepare_run(cfg: Config) -> tuple[Config, DataPlan]:
    """Everything a run checks on the driver BEFORE Ray starts, in order: user paths resolved once
    (:func:`pipeline.storage.resolve_paths`), the run name, the storage_path writable/reachable,
    the data prepared/scanned. Returns the resolved config (what goes to Ray) and the data plan."""
    from pipeline import storage

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

    from pipeline import data, storage

    plan = plan or plan_data(cfg)
    # Ray Data's per-epoch progress bars would drown the one line per epoch that matters.
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    datasets = {"train": data.build_train_dataset(cfg.data.url, data=cfg.data, storage=cfg.storage,
                                                  seed=cfg.seed, num_workers=cfg.num_workers,
                                                  scan=plan.train_scan)}
    if plan.val_scan is not None:
        # Unsplit, unshuffled copies that only rank 0 reads, once, for the kNN monitor.
        datasets["knn_bank"] = data.build_dataset(cfg.data.url, "train", data=cfg.data, storage=cfg.storage,
                                                  scan=plan.train_scan, shuffle=False)
        datasets["knn_val"] = data.build_dataset(cfg.data.url, cfg.data.val_split, data=cfg.data,
                                                 storage=cfg.storage, scan=plan.val_scan, shuffle=False)
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
    """The one line for a failed run; "re-run to resume" only when a checkpoint exists to resume."""
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
<<<<<<< HEAD
    """Run (or resume) one training run; prints per-epoch lines and a final JSON summary. Every
    path printed is absolute (or an s3:// URL): usable from any directory."""
    from pipeline import storage

    cfg, plan = prepare_run(cfg)
=======
    """Run (or resume) one training run; prints per-epoch lines and a final JSON summary."""
    from pipeline import signals

    if not cfg.name:
        cfg.name = _default_name(cfg)
<<<<<<< HEAD
    _loss_fn(cfg)  # a loss this trainer cannot run fails here, before Ray starts
=======
    signals.set_resume(name=cfg.name)  # Ctrl-C's one line names the run to resume
>>>>>>> faults
    plan = plan_data(cfg)
>>>>>>> longtail
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
        "resumed_from_epoch": metrics.get("resumed_from_epoch"), "wall_s": round(wall, 1),
        "checkpoint": (storage.url_of(result.checkpoint.path, like=cfg.storage_path)
                       if result.checkpoint else None),
        "backbone": backbone,
    }
    summary = finite_or_none(summary)  # what is printed is what is returned: null, never NaN
    print(json_line(summary), flush=True)
    return summary
