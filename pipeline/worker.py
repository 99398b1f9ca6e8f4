"""The Ray Train worker of `cacr train`: what every training process runs, top to bottom.

    train_loop_per_worker(loop_config)
      set_up      config, threads, the method (cacr.methods) + optimiser + schedule, the CPU group
      resume      the run's newest complete checkpoint, if any (method, optimiser, schedule, RNGs);
                  the final one that Ray never registered is reported again (finish_unreported)
      prepare     DDP around the method; rank 0: TensorBoard, the kNN monitor's two splits
      per epoch:
        run_epoch      agreed_batches -> view groups -> train_step (steps agreed one step ahead);
                       every checkpoint.every_steps: mid_epoch_checkpoint (pipeline.epoch_resume)
        end_of_epoch   loss / timings / skip counts reduced over workers; rank 0: kNN, TB, console
        checkpoint     state (rank 0) + metrics through ray.train.report; then the divergence check

Everything that is the METHOD (networks, loss, after-step update, what is exported) lives in
``cacr/methods/``; this file only drives it: :func:`train_step` is the whole optimisation step,
also what the step benchmark's pipeline side runs (through this loop).

The driver half (planning the data, building the ``TorchTrainer``) is :mod:`pipeline.train`.
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from cacr.loss import LossOutput
from cacr.methods import Method, build_method
from pipeline.config import Config, from_dict, to_dict

# ----------------------------------------------------------------------------------------------
# The method and its step


def method_from_config(cfg: Config) -> Method:
    """The method ``cfg.loss.name`` built from the config's ``model`` / ``loss`` sections (seed
    the torch RNG first: every worker must start from the same weights)."""
    extra: dict[str, Any] = {"num_views": cfg.num_views}
    if getattr(cfg, "momentum", None) is not None:  # the momentum-encoder methods' own section
        extra["momentum"] = to_dict(cfg.momentum)
    return build_method(cfg.loss.name, model=to_dict(cfg.model), loss=to_dict(cfg.loss), **extra)


def worker_method(cfg: Config, world: int) -> Method:
    """The method as a worker of a ``world``-worker run trains it: built from the config, with
    SyncBatchNorm where ``model.sync_batchnorm`` asks for it and the method allows it (the queue
    method keeps its shuffle-BN key encoder out), channels-last when configured and safe
    (:func:`use_channels_last`)."""
    method = method_from_config(cfg)
    if cfg.model.sync_batchnorm and world > 1:
        method = method.convert_sync_batchnorm()
    if use_channels_last(cfg, method):
        method = method.to(memory_format=torch.channels_last)
    return method


# Below this many input channels, torch's CPU (oneDNN) weight gradient of a strided 1x1
# convolution in channels-last layout writes past its buffer when it runs on one intra-op thread
# (torch 2.14.1, seen on an AVX2 CPU without AVX-512: "free(): invalid next size", "double free
# or corruption" and segfaults in backward; 8+ channels, 2 threads or NCHW are fine). A ResNet
# narrower than 8 has such a shortcut (4 -> 8 channels, stride 2): tests' and benches' tiny nets.
_CL_MIN_STRIDED_1X1_CHANNELS = 8


def use_channels_last(cfg: Config, method: nn.Module) -> bool:
    """``cfg.channels_last``, unless the run is on the CPU and the network has a strided 1x1
    convolution with fewer than 8 input channels (see above): memory corruption is not a speed-up.
    The views follow the network's layout (:func:`make_views`)."""
    if not cfg.channels_last:
        return False
    if cfg.use_gpu:
        return True
    return not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1
                   and m.in_channels < _CL_MIN_STRIDED_1X1_CHANNELS for m in method.modules())


def train_step(model: nn.Module, views: list[torch.Tensor], optimizer: torch.optim.Optimizer,
               scheduler: Any, *, progress: float, bf16: bool = False) -> tuple[LossOutput, dict[str, float]]:
    """One optimisation step of a method: its loss on ``views`` (a list of ``(V_g, n, C, H, W)``
    groups), backward, optimiser and schedule step, then the method's after-step update (EMA /
    queue) at ``progress`` = step / total steps. ``model`` is the method or its DDP wrapper.

    Returns the loss output (tensors, still on the device) and what ``after_step`` reported. No
    host sync happens here: reading the loss is left to whoever logs it. bf16 autocast covers the
    networks; the losses compute in float32 regardless (cacr/loss.py)."""
    method = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    with torch.autocast(views[0].device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(views)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    optimizer.step()
    scheduler.step()
    return out, method.after_step(min(1.0, progress))


def build_optimizer_for(method: Method, cfg: Config) -> torch.optim.Optimizer:
    """``cfg.optim`` over the method's trainable parameters, peak lr scaled by global batch / 256.

    :func:`cacr.optim.build_optimizer` is given the method module (its parameter-group rules may
    look at names); it takes the parameters that require grad, which must be exactly
    ``method.trainable_parameters()`` (checked: a momentum network stepped by the optimiser would
    train silently wrong)."""
    from cacr.optim import build_optimizer

    o = cfg.optim
    opt = build_optimizer(o.name, method, lr=o.base_lr * cfg.global_batch / 256, momentum=o.momentum,
                          weight_decay=o.weight_decay)
    seen = {id(p) for g in opt.param_groups for p in g["params"]}
    if seen != {id(p) for p in method.trainable_parameters()}:
        raise TypeError(f"method {method.name!r}: the optimiser's parameters differ from "
                        "trainable_parameters(); mark the others requires_grad=False")
    return opt


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int):
    from cacr.optim import warmup_cosine

    total = steps_per_epoch * cfg.epochs
    warmup = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(
        s, warmup_steps=warmup, total_steps=total, min_ratio=cfg.optim.min_lr_ratio))


def make_views(augment: Any, images: torch.Tensor, hw: torch.Tensor | None, *,
               generator: torch.Generator, channels_last: bool) -> list[torch.Tensor]:
    """The view groups of a batch: ``augment.view_groups`` (multi-crop: one group per crop size),
    or the one ``(V, n, 3, H, W)`` group of an augmenter without it."""
    if hasattr(augment, "view_groups"):
        return list(augment.view_groups(images, generator=generator, channels_last=channels_last,
                                        valid_hw=hw))
    return [augment(images, generator=generator, channels_last=channels_last)]


# ----------------------------------------------------------------------------------------------
# Agreeing on the number of steps


class StepAgreement:
    """Does every worker have a batch for the next step? Asked one step ahead, never blocking.

    All workers must take the same number of steps per epoch (the loss all-gathers, DDP
    all-reduces), yet how many full batches a worker gets is known only as it reads them: samples
    found bad at decode are dropped (:func:`_rebatch`) and the workers' splits need not hold the
    same number of good rows. A count agreed up front would need those numbers before decoding,
    so it cannot be exact; this asks instead.

    Each worker votes ``has a batch for step k+1`` into an asynchronous MIN all-reduce as soon as
    it has fetched that batch, BEFORE it computes step k, and reads the result only before step
    k+1: the round trip overlaps step k's compute, and whatever wait is left (a slower worker) is
    measured apart from the data wait. The vote is a CPU tensor on a gloo group created once, so
    nothing waits for the GPU. Every worker casts exactly one vote per step, the final "no"
    included, so all see the same minimum and stop after the same step; the one that ran out
    first is not left waiting in a collective. Without a process group (one worker) the vote is
    its own answer.
    """

    def __init__(self, group: Any | None):
        self.group = group
        self._flag = torch.zeros(1, dtype=torch.int32)
        self._work: Any = None

    def post(self, has_batch: bool) -> None:
        import torch.distributed as dist

        self._flag = torch.tensor([1 if has_batch else 0], dtype=torch.int32)
        if self.group is not None:
            self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MIN, group=self.group, async_op=True)

    def result(self) -> bool:
        if self._work is not None:
            self._work.wait()
            self._work = None
        return bool(self._flag[0])


def cpu_group(world: int) -> Any | None:
    """A gloo process group over all workers for small CPU-side collectives (the step vote, the
    end-of-epoch reductions), so they never touch the device or queue behind DDP's traffic.
    Collective: every worker calls it once, at set-up."""
    import torch.distributed as dist

    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.new_group(backend="gloo")


# ----------------------------------------------------------------------------------------------
# Worker state and set-up


@dataclass
class WorkerState:
    """Everything the loop carries from one function to the next."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    method: Method                 # the method itself: after_step, backbone, state_dict
    model: nn.Module               # what the step runs: the method, or DDP around it
    optimizer: torch.optim.Optimizer
    scheduler: Any
    augment: Any
    aug_gen: torch.Generator
    group: Any | None              # gloo group of cpu_group(), None with one worker
    steps_per_epoch: int
    scan_skipped: dict[str, int]
    run_url: str = ""              # the run directory (local or s3://), where checkpoints live
    data_order_key: str = ""       # rank 0 publishes each epoch under it (streaming shard order)
    start_epoch: int = 0
    step: int = 0
    tb: Any = None                 # rank 0: pipeline.monitor.TensorBoard
    knn: tuple | None = None       # rank 0: (bank images, bank labels, val images, val labels)
    knn_top1: float = float("nan")
    skipped_total: dict[str, int] = field(default_factory=dict)
    unreported_final: dict | None = None  # resumed final checkpoint Ray never registered
    channels_last: bool = False    # the network's (and so the views') layout: use_channels_last
    data_mode: str = "row"         # what names a train row: "row" (cached set) or "id" (streaming)
    partial: dict | None = None    # resumed mid-epoch checkpoint's "partial_epoch" (epoch_resume)
    epoch_now: int = 0             # the epoch being trained (0-based)
    run_start: float = field(default_factory=time.perf_counter)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.epochs

    @property
    def bf16(self) -> bool:
        return self.device.type == "cuda"  # bf16 autocast on CPU is ~10x slower: GPU only


def set_up(loop_config: dict[str, Any]) -> WorkerState:
    import ray.train
    import ray.train.torch

    from cacr.augment import MultiViewAugment

    from pipeline import storage_retry

    cfg: Config = from_dict(Config, loop_config["config"])
    storage_retry.set_tag(cfg.name)  # S3 retries of this process count for this run
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _set_threads(cfg)
    _quiet_worker_logs(cfg.log_level)
    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts from rank 0)
    method = worker_method(cfg, world)
    optimizer = build_optimizer_for(method, cfg)
    scheduler = warmup_cosine_scheduler(optimizer, cfg, loop_config["steps_per_epoch"])
    aug_gen = torch.Generator(device="cpu")
    aug_gen.manual_seed(cfg.seed * 1000 + rank)
    return WorkerState(cfg=cfg, rank=rank, world=world, device=ray.train.torch.get_device(),
                       method=method, model=method, optimizer=optimizer, scheduler=scheduler,
                       augment=MultiViewAugment(cfg.augment, cfg.num_views), aug_gen=aug_gen,
                       group=cpu_group(world), steps_per_epoch=loop_config["steps_per_epoch"],
                       scan_skipped=dict(loop_config.get("scan_skipped", {})),
                       run_url=loop_config["run_url"],
                       data_order_key=loop_config.get("data_order_key", ""),
                       data_mode=loop_config.get("data_mode", "row"),
                       channels_last=use_channels_last(cfg, method))


def resume(st: WorkerState) -> None:
    """Continue from the newest COMPLETE checkpoint of the run (a restart after a failure, or a
    re-run with the same name): the one Ray Train hands over, or a newer one on storage that Ray
    never registered (a stop between the upload and the registration; see
    :func:`pipeline.checkpoint.load_resume_state`). Rank 0 chooses, every rank loads the same one.
    Checkpoints of earlier versions hold no ``"method"`` entry: their ``"model"`` is the whole
    network state then, and the method loads it."""
    import ray.train

    from pipeline import storage
    from pipeline.checkpoint import CheckpointError, load_checkpoint, load_resume_state

    ckpt = ray.train.get_checkpoint()
    registered = ckpt.path.rstrip("/").rsplit("/", 1)[-1] if ckpt is not None else None
    found, error = None, None
    if st.rank == 0:
        try:
            found = load_resume_state(st.run_url, st.cfg.storage, registered=registered, say=_say)
        except CheckpointError as e:
            error = str(e)
    name, error = _from_rank0(st, (found[0] if found else None, error))
    if error:
        raise CheckpointError(error)
    if name is None:
        return
    state = found[1] if found else load_checkpoint(storage.join_url(st.run_url, name), st.cfg.storage)
    st.method.load_state_dict(state["method"] if "method" in state else state["model"])
    st.optimizer.load_state_dict(state["optimizer"])
    st.scheduler.load_state_dict(state["scheduler"])
    st.start_epoch, st.step = int(state["epoch"]), int(state["step"])
    gens = state.get("aug_rng", [])
    if st.rank < len(gens):
        st.aug_gen.set_state(gens[st.rank])
    torch.set_rng_state(state["torch_rng"])
    if name != registered and st.start_epoch >= st.cfg.epochs:
        st.unreported_final = state  # nothing left to train: report it (finish_unreported)
    st.partial = _resumable_partial(st, state.get("partial_epoch"))
    if st.rank == 0:
        inside = (f", {st.partial['worker_steps']} steps into epoch {st.start_epoch + 1}"
                  if st.partial is not None else "")
        _say(f"[cacr] resumed from checkpoint: epoch {st.start_epoch}, step {st.step}{inside}")


def _resumable_partial(st: WorkerState, partial: dict | None) -> dict | None:
    """A mid-epoch checkpoint's consumption, if this run's train set names rows the same way (a
    cached set by row number, a streaming one by id): after ``data.cache_budget_mb`` changed in
    between, the epoch restarts at its first sample instead (said once)."""
    if partial is None or partial.get("mode") == st.data_mode:
        return partial
    if st.rank == 0:
        _say(f"[cacr] warning: the checkpoint was taken inside epoch {int(partial['epoch']) + 1} of a "
             f"{'cached' if partial.get('mode') == 'row' else 'streaming'} train set and this run's "
             "is not: that epoch restarts from its first sample")
    return None


def finish_unreported(st: WorkerState) -> None:
    """The run resumed from its FINAL checkpoint, which Ray never registered (the stop came
    between its upload and its registration): no epoch is left to report, so report that one
    again. Ray registers the copy, and the run ends as it would have: its result carries the
    final epoch's metrics and checkpoint (the summary, the export, a Tune trial TERMINATED)."""
    import ray.train

    from pipeline.checkpoint import save_state, staging_dir

    state, st.unreported_final = st.unreported_final, None
    metrics = {**state.get("metrics", {}), "epoch": int(state["epoch"]), "step": int(state["step"]),
               "skipped": state.get("skipped", {}), "resumed_from_epoch": st.start_epoch}
    if st.rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with staging_dir(st.cfg.name) as tmp:
        save_state(tmp, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _from_rank0(st: WorkerState, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (collective over the CPU group)."""
    import torch.distributed as dist

    if st.group is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=st.group)
    return box[0]


def prepare(st: WorkerState, loop_config: dict[str, Any]) -> None:
    """DDP around the method (moves it to the device); rank 0 opens TensorBoard and reads the kNN
    monitor's splits once."""
    import ray.train.torch

    from pipeline.monitor import TensorBoard

    st.model = ray.train.torch.prepare_model(st.method)  # DDP when world > 1
    st.method = st.model.module if isinstance(st.model, nn.parallel.DistributedDataParallel) else st.model
    if st.rank != 0:
        return
    st.tb = TensorBoard(loop_config["tensorboard_url"], st.cfg.storage, run_name=st.cfg.name)
    # Written first, so runs stopped early (ASHA) appear in the HParams view as well; the metric
    # columns are read from these scalar tags as they are logged.
    st.tb.hparams(_hparams(st.cfg), ["val/knn_top1", "epoch/loss"])
    if st.cfg.data.val_split or st.cfg.data.val_url:
        bank = _load_eval_split("knn_bank", loop_config["knn_bank_size"])
        val = _load_eval_split("knn_val", loop_config["knn_val_size"])
        if bank is None or val is None or int((bank[1] >= 0).sum()) == 0:
            _say("[cacr] kNN monitor off: no labelled train/val samples")
        else:
            st.knn = (*bank, *val)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker (see the module docstring for the flow)."""
    st = set_up(loop_config)
    resume(st)
    prepare(st, loop_config)
    if st.unreported_final is not None:
        finish_unreported(st)
    for epoch in range(st.start_epoch, st.cfg.epochs):
        stats = run_epoch(st, epoch)
        metrics = end_of_epoch(st, epoch, stats)
        checkpoint(st, epoch, metrics)
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"loss diverged to {metrics['loss']} in epoch {epoch + 1}; "
                                     "lower optim.base_lr or check the data")
    if st.tb is not None:
        st.tb.close()


# ----------------------------------------------------------------------------------------------
# One epoch


@dataclass
class EpochStats:
    """One worker's running totals for the epoch (the loss stays on the device until its end)."""

    start: float
    sum_loss: torch.Tensor
    steps: int = 0
    data_wait_s: float = 0.0
    collective_wait_s: float = 0.0
    skipped: dict[str, int] = field(default_factory=dict)
    rows: int = 0                  # rows of the train set read (samples, bad or good, + padding)
    consumed: Any = None           # pipeline.epoch_resume.Consumption of this session
    carried: dict | None = None    # a resumed mid-epoch checkpoint's totals for this epoch


def _rebatch(batches: Iterator[dict], batch_size: int, skipped: dict[str, int],
             consumed: Any = None) -> Iterator[tuple]:
    """Drop skipped samples (counting them by reason) and re-cut full batches of good ones:
    ``(images, labels, hw or None, keys or None, skip codes)``; ``keys`` name the rows (cached
    ``row`` / streaming ``id``) for the mid-epoch checkpoints, whose ``consumed``
    (:class:`~pipeline.epoch_resume.Consumption`) takes the dropped rows as they are read.

    Every worker must take the same number of steps (the loss all-gathers), so partial batches are
    never yielded; :class:`StepAgreement` settles when the epoch ends for everyone."""
    from pipeline.data import split_batch
    from pipeline.data.format import FIRST_DROPPED

    bufs: list[list[torch.Tensor]] = [[], [], [], [], []]
    have = 0
    for batch in batches:
        x, y, counts = split_batch(batch)
        for k, v in counts.items():
            skipped[k] = skipped.get(k, 0) + int(v)
        keys, codes = batch.get("row", batch.get("id")), batch["skip"]
        keep = codes < FIRST_DROPPED if x.shape[0] != codes.shape[0] else None
        if keep is not None:
            if consumed is not None and keys is not None:
                consumed.add_dropped(keys[~keep], codes[~keep])
            keys, codes = (keys[keep] if keys is not None else None), codes[keep]
        if x.shape[0] == 0:
            continue
        hw = batch.get("hw")
        if hw is not None and hw.shape[0] != x.shape[0]:  # the same rows dropped as for the images
            hw = split_batch({"image": hw, "label": batch["label"], "skip": batch["skip"]})[0]
        for buf, t in zip(bufs, (x, y, hw, keys, codes)):
            if t is not None:
                buf.append(t)
        have += x.shape[0]
        while have >= batch_size:
            cut = [torch.cat(b) if b else None for b in bufs]
            yield tuple(t[:batch_size] if t is not None else None for t in cut)
            bufs = [[t[batch_size:]] if t is not None else [] for t in cut]
            have -= batch_size


def _counted(batches: Iterator[dict], stats: EpochStats) -> Iterator[dict]:
    from pipeline.data.read import EXTRA_PAD_BIT

    for batch in batches:  # a resumed epoch's extra padding is no row of the train set
        stats.rows += len(batch["skip"]) - int(((batch["id"] & EXTRA_PAD_BIT) != 0).sum())
        yield batch


def _epoch_batches(st: WorkerState, stats: EpochStats, epoch: int,
                   exclude: Any = None) -> Iterator[tuple]:
    import ray.train

    from pipeline.data import iter_train_batches

    # Decoded batches arrive on the CPU and move to the device once, pinned for an asynchronous
    # copy when a GPU is used. With data.decode=worker the JPEG bytes are decoded straight on the
    # worker's device (nvjpeg on a GPU). Either way the skip codes stay on the CPU, so split_batch
    # counts skipped samples without a device sync.
    shard = ray.train.get_dataset_shard("train")
    if st.rank == 0 and st.data_order_key:  # a streaming set plans epoch e's shard order from it
        from pipeline.data.read import publish_epoch, publish_exclusion

        publish_exclusion(st.data_order_key, epoch, exclude if st.data_mode == "id" else None)
        publish_epoch(st.data_order_key, epoch)
    decode_device = st.device if st.cfg.data.decode == "worker" else "cpu"
    # A cached train set comes unsplit: iter_train_batches takes this worker's rows of epoch
    # ``epoch``'s sample order, a pure function of (seed, epoch) (same order after a restart).
    raw = iter_train_batches(shard, batch_size=st.cfg.batch_size, device=decode_device,
                             decode=st.cfg.data.decode, prefetch_batches=2,
                             pin_memory=st.cfg.use_gpu, epoch=epoch, seed=st.cfg.seed,
                             exclude_rows=exclude if st.data_mode == "row" else None)
    return _rebatch(_counted(iter(raw), stats), st.cfg.batch_size, stats.skipped, stats.consumed)


def _next_batch(batches: Iterator[tuple], stats: EpochStats) -> tuple | None:
    t = time.perf_counter()
    item = next(batches, None)
    stats.data_wait_s += time.perf_counter() - t  # data wait: the iterator only
    return item


def agreed_batches(batches: Iterator[tuple], agree: StepAgreement, stats: EpochStats) -> Iterator[tuple]:
    """The batches of ``batches`` for which EVERY worker has one (see :class:`StepAgreement`).

    The vote for step k+1 is cast before step k is handed out, so its round trip runs while the
    caller computes step k; ``stats`` books the iterator's time as data wait and the vote's
    remaining wait as collective wait."""
    item = _next_batch(batches, stats)
    agree.post(item is not None)
    while True:
        t = time.perf_counter()
        go = agree.result()
        stats.collective_wait_s += time.perf_counter() - t
        if not go:
            return  # some worker ran out: everyone ends the epoch after the same step
        current, item = item, _next_batch(batches, stats)
        agree.post(item is not None)
        yield current


def run_epoch(st: WorkerState, epoch: int) -> EpochStats:
    from pipeline.epoch_resume import Consumption

    st.model.train()
    st.epoch_now = epoch
    carried = st.partial if st.partial is not None and int(st.partial["epoch"]) == epoch else None
    st.partial = None
    stats = EpochStats(start=time.perf_counter(), sum_loss=torch.zeros((), device=st.device),
                       consumed=Consumption(), carried=carried)
    batches = _epoch_batches(st, stats, epoch, carried["consumed"].numpy() if carried else None)
    every = st.cfg.checkpoint.every_steps
    steps_before = int(carried["worker_steps"]) if carried else 0
    for batch in agreed_batches(batches, StepAgreement(st.group), stats):
        _step(st, stats, batch)
        # every worker is at the same step here (agreed); the epoch's last step gets its own checkpoint
        if every and st.step % every == 0 and steps_before + stats.steps < st.steps_per_epoch:
            mid_epoch_checkpoint(st, epoch, stats)
    for _ in batches:  # another worker ran out first: this one's remaining rows still count
        pass           # their skip reasons (a sample is trained on, left over, or counted)
    return stats


def _step(st: WorkerState, stats: EpochStats, batch: tuple) -> None:
    cfg = st.cfg
    images, _labels, hw, keys, codes = batch
    images = images.to(st.device, non_blocking=True)
    views = make_views(st.augment, images, hw, generator=st.aug_gen, channels_last=st.channels_last)
    if st.step == 0 and st.tb is not None:
        from pipeline.monitor import denormalise_grid

        st.tb.image("augment/views", denormalise_grid(views[0], cfg.augment), 0)
    st.step += 1
    _inject_failure(cfg, st.rank, st.world, st.step)
    out, updates = train_step(st.model, views, st.optimizer, st.scheduler,
                              progress=st.step / max(1, st.total_steps), bf16=st.bf16)
    stats.sum_loss += out.loss.detach()
    stats.steps += 1
    if keys is not None:
        stats.consumed.add_trained(keys, codes)
        if cfg.trace_ids_dir:
            _trace(cfg.trace_ids_dir, st, keys)
    if st.tb is not None and (st.step % cfg.log_every_steps == 0 or stats.steps == 1):
        _log_step(st, stats, out, updates, images.shape[0])


def _log_step(st: WorkerState, stats: EpochStats, out: LossOutput, updates: dict[str, float],
              n: int) -> None:
    """Rank 0, every ``log_every_steps``: the only per-step host syncs (reading the loss)."""
    from cacr.loss import alignment, uniformity
    from pipeline.monitor import embedding_stats

    elapsed = max(time.perf_counter() - stats.start, 1e-9)
    m = {f"train/{k}": v for k, v in out.metrics().items()}
    m.update({f"train/{k}": float(v) for k, v in updates.items()})
    m.update({"train/lr": st.optimizer.param_groups[0]["lr"],
              "perf/samples_per_s": stats.steps * n * st.world / elapsed,
              "perf/data_wait_fraction": stats.data_wait_s / elapsed,
              "perf/collective_wait_fraction": stats.collective_wait_s / elapsed})
    z = st.method.last_embeddings()
    if z is not None:
        m.update({"train/alignment": float(alignment(z)), "train/uniformity": float(uniformity(z))})
        m.update(embedding_stats(z))
    if not math.isfinite(m["train/loss"]):
        _say(f"[cacr] loss is {m['train/loss']} at step {st.step}")
    st.tb.scalars(m, st.step)


# ----------------------------------------------------------------------------------------------
# End of epoch and checkpoint


def _reduce(st: WorkerState, stats: EpochStats, epoch_time: float) -> tuple[list[float], list[dict]]:
    """Sums over workers of (loss, steps, data wait, collective wait, epoch time, rows read), and
    every worker's skip counts (each counts only the samples it saw)."""
    import torch.distributed as dist

    t = torch.tensor([float(stats.sum_loss), float(stats.steps), stats.data_wait_s,
                      stats.collective_wait_s, epoch_time, float(stats.rows)], dtype=torch.float64)
    gathered: list[dict] = [stats.skipped]
    if st.group is not None:
        dist.all_reduce(t, group=st.group)
        gathered = [None] * st.world  # type: ignore[list-item]
        dist.all_gather_object(gathered, stats.skipped, group=st.group)
    c = stats.carried  # the same on every rank: the epoch's totals before a mid-epoch resume
    if c is not None:
        t[0] += c["sum_loss"]
        t[1] += c["steps"]
        t[5] += c["rows"]
        gathered.append(dict(c["skipped"]))
    return t.tolist(), gathered


def end_of_epoch(st: WorkerState, epoch: int, stats: EpochStats) -> dict[str, Any]:
    """The epoch's metrics (what ``ray.train.report`` gets); rank 0 also runs the kNN monitor and
    writes TensorBoard and the console line."""
    from pipeline.data import merge_counts

    epoch_time = time.perf_counter() - stats.start
    (loss, steps, wait, coll, time_sum, rows), gathered = _reduce(st, stats, epoch_time)
    st.skipped_total = merge_counts(st.skipped_total, *gathered)
    metrics: dict[str, Any] = {
        "epoch": epoch + 1, "step": st.step, "resumed_from_epoch": st.start_epoch,
        "loss": loss / max(steps, 1), "samples_per_s": stats.steps * st.cfg.global_batch / max(epoch_time, 1e-9),
        "data_wait_fraction": wait / max(time_sum, 1e-9), "epoch_time_s": epoch_time,
        "skipped": merge_counts(st.scan_skipped, st.skipped_total),
        # every row of the train set (samples + padding) read exactly once this epoch = its planned
        # row count: what shows that a lost node or a restart lost or repeated nothing
        "rows_read": int(rows),
    }
    if st.rank == 0:
        _monitor_epoch(st, epoch, metrics, coll / max(time_sum, 1e-9))
    return metrics


def _monitor_epoch(st: WorkerState, epoch: int, metrics: dict[str, Any], collective_wait: float) -> None:
    from pipeline.monitor import extract_features

    cfg, tb = st.cfg, st.tb
    if st.knn is not None:
        from cacr.knn import knn_top1

        xb, yb, xv, yv = st.knn
        fb = extract_features(st.method.backbone, xb, cfg.augment, st.device)
        fv = extract_features(st.method.backbone, xv, cfg.augment, st.device)
        st.knn_top1 = knn_top1(fb, yb, fv, yv, k=cfg.data.knn_k)
        tb.scalars({"val/knn_top1": st.knn_top1}, st.step)
    from pipeline.storage_retry import cluster_counts

    knn, loss, sps, wait = st.knn_top1, metrics["loss"], metrics["samples_per_s"], metrics["data_wait_fraction"]
    metrics["knn_top1"] = knn
    # S3 requests of this run retried so far (every process: data tasks, workers, controller)
    retries = metrics["storage_retries"] = int(cluster_counts(cfg.name)["retries"])
    tb.scalars({"epoch/loss": loss, "perf/epoch_samples_per_s": sps, "perf/epoch_data_wait_fraction": wait,
                "perf/epoch_collective_wait_fraction": collective_wait, "storage/retries": retries}, st.step)
    tb.scalars({f"data/skipped/{k}": v for k, v in metrics["skipped"].items()}, st.step)
    done = epoch + 1 - st.start_epoch
    eta = (time.perf_counter() - st.run_start) / done * (cfg.epochs - epoch - 1)
    knn_text = f"knn {knn:.4f}  " if math.isfinite(knn) else ""  # monitor off: no val split
    retry_text = f"  storage retries {retries}" if retries else ""
    _say(f"[cacr] epoch {epoch + 1}/{cfg.epochs}  loss {loss:.4f}  {knn_text}"
         f"{sps:.0f} samples/s  data-wait {wait:.0%}  ETA {eta:.0f}s{retry_text}")
    tb.sync()


def checkpoint_state(st: WorkerState, epoch: int, metrics: dict[str, Any], aug_rng: list) -> dict[str, Any]:
    """What a checkpoint holds. ``"model"``: the exported network's weights in the layout
    export / evaluate read (``backbone.*``; + ``head.*`` for the CACRModel methods); ``"method"``:
    the method's whole ``state_dict`` (momentum networks and queues included), what a resume
    loads. The two share tensors, so torch.save writes each weight once."""
    m = st.method
    return {"model": m.model_state(), "method": m.state_dict(), "backbone_spec": m.backbone_spec(),
            "optimizer": st.optimizer.state_dict(), "scheduler": st.scheduler.state_dict(),
            "epoch": epoch + 1, "step": st.step, "config": to_dict(st.cfg),
            "torch_rng": torch.get_rng_state(), "aug_rng": aug_rng,
            "metrics": {k: v for k, v in metrics.items() if k != "skipped"},
            "skipped": dict(metrics.get("skipped", {}))}


def checkpoint(st: WorkerState, epoch: int, metrics: dict[str, Any]) -> None:
    """Rank 0 writes the checkpoint (every worker's augmentation RNG gathered into it); every
    worker reports the metrics (Ray Train needs the report from all of them)."""
    import ray.train
    import torch.distributed as dist

    from pipeline import failpoints
    from pipeline.checkpoint import save_state, staging_dir

    aug_rng = [st.aug_gen.get_state()]
    if st.group is not None:
        aug_rng = [None] * st.world
        dist.all_gather_object(aug_rng, st.aug_gen.get_state(), group=st.group)
    if st.rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with staging_dir(st.cfg.name) as tmp:  # a killed run's leftovers are removed by name
        save_state(tmp, checkpoint_state(st, epoch, metrics, aug_rng))
        upload = failpoints.checkpoint_upload_fn(epoch + 1)  # None: Ray's own upload
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         **({"checkpoint_upload_fn": upload} if upload else {}))


def mid_epoch_checkpoint(st: WorkerState, epoch: int, stats: EpochStats) -> None:
    """``checkpoint.every_steps``: a checkpoint inside epoch ``epoch`` (0-based) that also records
    what the epoch consumed so far (:mod:`pipeline.epoch_resume`), so that a resume continues at
    the exact sample. Every worker takes part (the consumption and RNGs are gathered); rank 0
    writes it. The report says ``epoch`` = epochs completed and ``mid_epoch`` = True."""
    import ray.train
    import torch.distributed as dist

    from pipeline import failpoints
    from pipeline.checkpoint import save_state, staging_dir
    from pipeline.data import merge_counts
    from pipeline.data.read import is_extra_pad
    from pipeline.epoch_resume import merge_partial

    local = {**stats.consumed.local(), "loss": float(stats.sum_loss), "steps": stats.steps}
    gathered, aug_rng = [local], [st.aug_gen.get_state()]
    if st.group is not None:
        gathered, aug_rng = [None] * st.world, [None] * st.world
        dist.all_gather_object(gathered, local, group=st.group)
        dist.all_gather_object(aug_rng, st.aug_gen.get_state(), group=st.group)
    steps_before = int(stats.carried["worker_steps"]) if stats.carried else 0
    partial = merge_partial(stats.carried, gathered, epoch=epoch, mode=st.data_mode,
                            worker_steps=steps_before + stats.steps,
                            rows_of=lambda keys: int((~is_extra_pad(keys)).sum()) if st.data_mode == "id" else len(keys))
    metrics = {"epoch": epoch, "step": st.step, "mid_epoch": True, "resumed_from_epoch": st.start_epoch,
               "loss": partial["sum_loss"] / max(partial["steps"], 1), "knn_top1": st.knn_top1,
               "rows_read": partial["rows"],
               "skipped": merge_counts(st.scan_skipped, st.skipped_total, partial["skipped"])}
    if st.rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    state = checkpoint_state(st, epoch - 1, metrics, aug_rng)  # "epoch": epochs completed
    state["partial_epoch"] = partial
    with staging_dir(st.cfg.name) as tmp:
        save_state(tmp, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    failpoints.after_mid_epoch_checkpoint(st.step)  # tests only: a stop right after it


def _trace(folder: str, st: WorkerState, keys: torch.Tensor) -> None:
    """Debug ``trace_ids_dir``: one JSON line per trained step (epoch, global step, row keys)."""
    import json

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"rank{st.rank}.jsonl"), "a") as f:
        f.write(json.dumps({"epoch": st.epoch_now, "step": st.step, "mode": st.data_mode,
                            "keys": keys.tolist()}) + "\n")


# ----------------------------------------------------------------------------------------------
# Small helpers


def _set_threads(cfg: Config) -> None:
    n = cfg.torch_threads or max(1, (os.cpu_count() or 1) // max(1, cfg.num_workers))
    torch.set_num_threads(n)


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
    from pipeline.ray_compat import kv_get, kv_put

    key = f"cacr:injected-failure:{cfg.name}".encode()
    if kv_get(key):
        return
    kv_put(key, b"1")
    raise RuntimeError(f"injected failure at step {step} (fail_at_step) in worker rank {rank}")


def _quiet(msg: str) -> None:
    """What ranks other than 0 do with a console line rank 0 already prints."""


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
    from pipeline.ray_compat import drop_progress_bar_notice, set_train_report_log_level

    set_train_report_log_level(log_level)
    if level > logging.INFO:
        drop_progress_bar_notice()


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
