"""pipeline.worker without Ray: the optimisation step, the step agreement between two real gloo
processes when one runs out of batches first, what a checkpoint holds, TensorBoard's per-step
scalars (read back from the event files). The whole loop under Ray Train is tests/pipeline/
test_train.py's."""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[2]
TINY = ["data.source=null", "batch_size=8", "num_workers=1", "data.image_size=16", "augment.crop_size=16",
        "model.width=4", "model.head_hidden=16", "model.head_out=8", "loss.num_positives=1", "epochs=2"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _state(cfg, tmp_path: Path, tb=None):
    """A WorkerState as set_up builds it, for one worker without Ray."""
    from cacr.augment import MultiViewAugment
    from pipeline.worker import (WorkerState, build_optimizer_for, method_from_config,
                                 warmup_cosine_scheduler)

    torch.manual_seed(cfg.seed)
    method = method_from_config(cfg)
    opt = build_optimizer_for(method, cfg)
    gen = torch.Generator().manual_seed(5)
    return WorkerState(cfg=cfg, rank=0, world=1, device=torch.device("cpu"), method=method, model=method,
                       optimizer=opt, scheduler=warmup_cosine_scheduler(opt, cfg, 4),
                       augment=MultiViewAugment(cfg.augment, cfg.num_views), aug_gen=gen, group=None,
                       steps_per_epoch=4, scan_skipped={}, tb=tb)


def _images(n: int = 8) -> torch.Tensor:
    return torch.randint(0, 256, (n, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))


class _Recording(torch.nn.Module):
    """Stands in for an augmenter with view groups: records what it was asked for."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def view_groups(self, images, *, generator=None, channels_last=False, valid_hw=None):
        self.calls.append(valid_hw)
        v = self.inner(images, generator=generator, channels_last=channels_last)
        return [v, v[:, :, :, :8, :8]]


def test_train_step_updates_the_method_and_reports_after_step(tmp_path):
    from pipeline.worker import make_views, train_step

    cfg = load_config(None, TINY)
    st = _state(cfg, tmp_path)
    seen = []
    st.method.after_step = lambda progress: seen.append(progress) or {"momentum": 0.99}
    before = [p.detach().clone() for p in st.method.trainable_parameters()]
    views = make_views(st.augment, _images(), None, generator=st.aug_gen, channels_last=False)
    assert len(views) == 1 and views[0].shape == (2, 8, 3, 16, 16)  # the fallback: one group
    out, updates = train_step(st.model, views, st.optimizer, st.scheduler, progress=0.25)
    assert torch.isfinite(out.loss) and updates == {"momentum": 0.99} and seen == [0.25]
    assert st.scheduler.last_epoch == 1  # the schedule advanced with the step
    changed = [not torch.equal(a, b) for a, b in zip(before, st.method.trainable_parameters())]
    assert sum(changed) > len(changed) // 2


def test_view_groups_get_the_valid_sizes_and_feed_one_step(tmp_path):
    from pipeline.worker import make_views, train_step

    cfg = load_config(None, TINY)
    st = _state(cfg, tmp_path)
    aug = _Recording(st.augment)
    hw = torch.full((8, 2), 16)
    views = make_views(aug, _images(), hw, generator=st.aug_gen, channels_last=False)
    assert aug.calls[0] is hw and [v.shape[-1] for v in views] == [16, 8]
    out, _ = train_step(st.model, views, st.optimizer, st.scheduler, progress=0.5)
    assert st.method.last_embeddings().shape == (4, 8, 8)  # V = 2 + 2 concatenated
    assert torch.isfinite(out.loss)


def test_rebatch_keeps_each_images_valid_size_with_it():
    """Rows dropped as bad leave with their ``hw``; re-cut batches keep image i with its size and
    its row key. Dropped rows are consumed when read, good ones only once trained (a mid-epoch
    checkpoint must not record rows that were read ahead but never trained on)."""
    from pipeline.data.read import BAD_LABEL, OK, UNDECODABLE_IMAGE
    from pipeline.epoch_resume import Consumption
    from pipeline.worker import _rebatch

    def batch(first: int, bad: list[int]):
        ids = torch.arange(first, first + 4)
        skip = torch.full((4,), OK, dtype=torch.int8)
        skip[bad] = UNDECODABLE_IMAGE
        return {"image": ids.view(4, 1, 1, 1).expand(4, 2, 2, 3).to(torch.uint8), "label": ids,
                "skip": skip, "hw": torch.stack([ids, ids + 100], 1), "id": ids + 1000}
    skipped: dict[str, int] = {}
    consumed = Consumption()
    third = batch(8, [])
    third["skip"][0] = BAD_LABEL  # trains (label -1); counted when trained on
    out = list(_rebatch(iter([batch(0, [1]), batch(4, [0, 3]), third]), 2, skipped, consumed))
    assert skipped == {"undecodable_image": 3, "bad_label": 1} and len(out) == 4
    for images, labels, hw, keys, codes in out:
        assert torch.equal(images[:, 0, 0, 0].long(), labels) and torch.equal(hw[:, 0], labels)
        assert torch.equal(keys, labels + 1000) and codes.dtype == torch.int8
    assert torch.cat([o[1] for o in out]).tolist() == [0, 2, 3, 5, 6, 8, 9, 10]
    # read so far: only the dropped rows are consumed
    assert sorted(consumed.local()["keys"].tolist()) == [1001, 1004, 1007]
    assert consumed.local()["skipped"] == {"undecodable_image": 3}
    for _, _, _, keys, codes in out[2:]:  # the steps trained on batches 3 and 4
        consumed.add_trained(keys, codes)
    assert sorted(consumed.local()["keys"].tolist()) == [1001, 1004, 1006, 1007, 1008, 1009, 1010]
    assert consumed.local()["skipped"] == {"undecodable_image": 3, "bad_label": 1}


@pytest.mark.parametrize("loss,extra,online,target", [
    ("cacr_queue", [], "online", "target"),
    ("cacr_moco", ["model.head=moco", "model.predictor_hidden=16"], "online_backbone", "target_backbone"),
])
def test_sync_batchnorm_converts_what_the_method_allows(loss, extra, online, target):
    """model.sync_batchnorm=true with several workers: cacr_queue's KEY encoder keeps plain
    BatchNorm (its shuffle-BN is the design, docs/LONGTAIL.md: synchronised statistics would be
    the global batch's, which holds each key's own query image); cacr_moco converts its target too
    (MoCo v3 converts the whole model). One worker: nothing converted. The converted method still
    takes a step and checkpoints under the same keys."""
    from pipeline.worker import method_from_config, worker_method

    cfg = load_config(None, [*TINY, "model.sync_batchnorm=true", f"loss.name={loss}", "loss.queue_size=64",
                             *extra])

    def kinds(module):
        bn = [type(m) for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        return len(bn), sum(t is torch.nn.SyncBatchNorm for t in bn)

    torch.manual_seed(0)
    m = worker_method(cfg, world=2)
    n_on, sync_on = kinds(getattr(m, online))
    n_tg, sync_tg = kinds(getattr(m, target))
    assert n_on > 0 and sync_on == n_on  # the online (query) encoder: SyncBN throughout
    assert n_tg == n_on and sync_tg == (n_tg if loss == "cacr_moco" else 0)
    assert kinds(worker_method(cfg, world=1))[1] == 0
    torch.manual_seed(0)
    assert m.state_dict().keys() == method_from_config(cfg).state_dict().keys()
    x = torch.rand(2, 8, 3, 16, 16)  # no process group: SyncBatchNorm computes plain batch statistics
    out = m(x)
    out.loss.backward()
    m.after_step(0.5)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("width, use_gpu, expect", [(4, False, False), (8, False, True), (4, True, True)])
def test_channels_last_off_on_cpu_for_nets_torch_corrupts_memory_with(width, use_gpu, expect):
    """A width-4 ResNet has a 4 -> 8 channel strided 1x1 shortcut, whose channels-last weight
    gradient on one CPU thread corrupts the heap in torch 2.14.1 (an abort of the whole test
    process on an AVX2 CPU): on the CPU such a net stays NCHW, and so do its views."""
    from pipeline.worker import method_from_config, use_channels_last, worker_method

    cfg = load_config(None, [*TINY, f"model.width={width}", "channels_last=true"])
    cfg.use_gpu = use_gpu  # decided from the config: no GPU needed to check the rule
    m = worker_method(cfg, world=1) if not use_gpu else method_from_config(cfg)
    assert use_channels_last(cfg, m) is expect
    if not use_gpu:
        conv = next(x for x in m.modules() if isinstance(x, torch.nn.Conv2d) and x.kernel_size == (3, 3))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) is expect
    cfg.channels_last = False
    assert use_channels_last(cfg, m) is False


def test_optimizer_must_see_exactly_the_trainable_parameters(tmp_path):
    from pipeline.worker import build_optimizer_for

    cfg = load_config(None, TINY)
    st = _state(cfg, tmp_path)
    st.method.trainable_parameters = lambda: list(st.method.model.head.parameters())
    with pytest.raises(TypeError, match="trainable_parameters"):
        build_optimizer_for(st.method, cfg)


def test_checkpoint_holds_export_weights_and_the_full_method_once(tmp_path):
    from pipeline.checkpoint import load_state_file, save_state
    from pipeline.export import backbone_state
    from pipeline.worker import checkpoint_state, method_from_config

    cfg = load_config(None, TINY)
    st = _state(cfg, tmp_path)
    st.step = 7
    state = checkpoint_state(st, 1, {"loss": 1.0, "skipped": {}}, [st.aug_gen.get_state()])
    save_state(tmp_path / "a", state)
    save_state(tmp_path / "b", {k: v for k, v in state.items() if k != "model"})
    # "model" shares its tensors with "method": the file grows by key names, not by weights
    size = lambda d: (tmp_path / d / "state.pt").stat().st_size  # noqa: E731
    params = sum(p.numel() * p.element_size() for p in st.method.parameters())
    assert size("a") - size("b") < 0.2 * params, (size("a"), size("b"), params)
    back = load_state_file(tmp_path / "a")
    assert back["epoch"] == 2 and back["step"] == 7 and back["backbone_spec"]["width"] == 4
    assert backbone_state(back).keys() == st.method.backbone.state_dict().keys()
    other = method_from_config(cfg)
    other.load_state_dict(back["method"])
    for (k, a), b in zip(st.method.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k


def test_step_scalars_include_after_step_and_collective_wait(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeline.monitor import TensorBoard
    from pipeline.worker import EpochStats, _log_step, make_views, train_step

    cfg = load_config(None, TINY)
    tb = TensorBoard(str(tmp_path / "tb"))
    st = _state(cfg, tmp_path, tb=tb)
    st.method.after_step = lambda progress: {"momentum": 0.996}
    views = make_views(st.augment, _images(), None, generator=st.aug_gen, channels_last=False)
    out, updates = train_step(st.model, views, st.optimizer, st.scheduler, progress=0.1)
    stats = EpochStats(start=time.perf_counter() - 2.0, sum_loss=out.loss.detach(), steps=1,
                       data_wait_s=0.5, collective_wait_s=0.25)
    st.step = 1
    _log_step(st, stats, out, updates, 8)
    tb.close()
    ea = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for tag in ("train/loss", "train/momentum", "train/alignment", "perf/data_wait_fraction",
                "perf/collective_wait_fraction", "embedding/std_mean"):
        assert tag in tags, (tag, sorted(tags))
    assert ea.Scalars("train/momentum")[0].value == pytest.approx(0.996)
    wait = ea.Scalars("perf/collective_wait_fraction")[0].value
    assert 0.0 < wait < ea.Scalars("perf/data_wait_fraction")[0].value  # 0.25 s vs 0.5 s of ~2 s


# ---------------------------------------------------------------------------------------------
# The step agreement: two real gloo processes, one running out of batches first

# rank -> (batches of 4 rows, rows per batch dropped as undecodable). Rank 1 loses rows to
# skipped samples, so _rebatch re-cuts FEWER full batches from it: 6 batches of 4 rows minus
# 2 bad rows in each -> 12 good rows -> 3 steps; rank 0 has 5 clean batches -> 5 steps.
PLAN = {0: (5, 0), 1: (6, 2)}
AGREED_STEPS = 3


def _raw_batches(rank: int):
    from pipeline.data.read import OK, UNDECODABLE_IMAGE

    n, bad = PLAN[rank]
    for b in range(n):
        skip = torch.full((4,), OK, dtype=torch.int8)
        skip[:bad] = UNDECODABLE_IMAGE
        yield {"image": torch.full((4, 2, 2, 3), b, dtype=torch.uint8), "label": torch.arange(4),
               "skip": skip}


def _agreement_worker(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from pipeline.worker import EpochStats, StepAgreement, _rebatch, agreed_batches, cpu_group

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=45))
    group = cpu_group(2)
    stats = EpochStats(start=time.perf_counter(), sum_loss=torch.zeros(()))
    steps = 0
    for epoch in range(2):  # the agreement is fresh each epoch; nothing left pending across them
        batches = _rebatch(_raw_batches(rank), 4, stats.skipped)
        for images, _labels, _hw, _keys, _codes in agreed_batches(batches, StepAgreement(group), stats):
            t = torch.ones(1)
            dist.all_reduce(t)  # stands in for the step's gradient all-reduce: both must be here
            assert images.shape[0] == 4 and t.item() == 2
            steps += 1
    Path(out, f"rank{rank}.json").write_text(json.dumps({"steps": steps, "skipped": stats.skipped}))
    dist.destroy_process_group()


def test_workers_stop_after_the_same_step_when_one_runs_out_first(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, str(r), str(tmp_path / "rdzv"), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a worker hung in a collective: the step agreement deadlocked")
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-3000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [g["steps"] for g in got] == [2 * AGREED_STEPS] * 2
    assert got[0]["skipped"] == {} and got[1]["skipped"] == {"undecodable_image": 2 * 2 * 6}


if __name__ == "__main__":
    torch.set_num_threads(1)
    _agreement_worker(int(sys.argv[1]), sys.argv[2], sys.argv[3])
