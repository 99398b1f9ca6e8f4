"""`cacr train` end to end: 2 real Ray Train workers (gloo), checkpoints, recovery, resume,
TensorBoard event files read back, S3 storage through the moto endpoint, CACR and InfoNCE."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pipeline.config import load_config

pytestmark = pytest.mark.slow

# Small enough for 2 cores: 16-px decode, a width-8 encoder, V = 2 views, 11 steps per epoch.
TINY = ["batch_size=64", "num_workers=2", "cpus_per_worker=0.5", "data.image_size=16",
        "augment.crop_size=16", "model.width=8", "model.head_hidden=64", "model.head_out=32",
        "loss.num_positives=1", "log_every_steps=1", "optim.warmup_epochs=0.5"]
STEPS_PER_EPOCH = 1438 // 128  # digits train split, global batch 2 x 64, drop the remainder


def _cfg(shards: str, storage: str, *extra: str):
    name = f"t-{uuid.uuid4().hex[:8]}"
    return load_config(None, [*TINY, f"data.url={shards}", "data.source=null",
                              f"storage_path={storage}", f"name={name}", *extra])


def _events(logdir: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(logdir, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea


def test_two_worker_run_logs_checkpoints_and_exports(ray_session, digits_shards, tmp_path):
    from pipeline.export import load_backbone
    from pipeline.train import run_training

    cfg = _cfg(digits_shards, str(tmp_path / "runs"), "epochs=2")
    out = run_training(cfg)
    assert out["epochs"] == 2 and out["steps"] == 2 * STEPS_PER_EPOCH
    assert out["resumed_from_epoch"] == 0
    assert math.isfinite(out["loss"]) and out["samples_per_s"] > 0
    assert 0.3 < out["knn_top1"] <= 1.0  # 10 classes: chance is 0.1
    assert out["skipped"] == {}

    run_dir = Path(out["run_dir"])
    ckpts = sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
    assert 1 <= len(ckpts) <= cfg.keep_checkpoints
    ea = _events(out["tensorboard_logdir"])
    scalars = set(ea.Tags()["scalars"])
    for tag in ["train/loss", "train/attraction", "train/repulsion", "train/lr", "train/alignment",
                "train/uniformity", "perf/samples_per_s", "perf/data_wait_fraction",
                "perf/collective_wait_fraction", "perf/epoch_collective_wait_fraction",
                "embedding/std_mean", "val/knn_top1", "epoch/loss"]:
        assert tag in scalars, (tag, sorted(scalars))
    assert any("eff_pos" in t for t in scalars) and any("eff_neg" in t for t in scalars)
    assert [e.step for e in ea.Scalars("val/knn_top1")] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert ea.Scalars("val/knn_top1")[-1].value == pytest.approx(out["knn_top1"], abs=1e-6)
    lrs = [e.value for e in ea.Scalars("train/lr")]
    assert max(lrs) > lrs[-1] and lrs[0] < max(lrs)  # warm-up then cosine decay
    assert "augment/views" in ea.Tags()["images"]
    assert ea.PluginTagToContent("hparams")  # HParams view present

    net, meta = load_backbone(Path(out["backbone"]).parent)
    assert meta["backbone"]["width"] == 8 and meta["preprocessing"]["crop_size"] == 16


def _trace(folder: Path) -> dict[tuple[int, int], list[int]]:
    """(rank, global step) -> the row keys that step trained on, the LAST session's write winning
    (the steps after a checkpoint are trained again after a restart), plus how often each step was
    written."""
    latest: dict[tuple[int, int], list[int]] = {}
    writes: dict[int, int] = {}
    for f in sorted(folder.glob("rank*.jsonl")):
        rank = int(f.stem[4:])
        for line in f.read_text().splitlines():
            row = json.loads(line)
            latest[(rank, row["step"])] = (row["epoch"], row["keys"])
            writes[row["step"]] = writes.get(row["step"], 0) + 1
    return latest, writes


@pytest.mark.parametrize("cache", ["cached", "streaming"])
def test_worker_failure_mid_epoch_resumes_at_the_exact_sample(ray_session, digits_shards, tmp_path, cache):
    """checkpoint.every_steps=4 and a worker failure 2 steps after the checkpoint at global step
    16 (epoch 2, 5 steps in): the group restarts from THAT checkpoint, not the epoch's start, and
    the epoch still trains on every sample at most once (the rows consumed before the checkpoint
    are left out of the resumed epoch; rows read ahead but not trained are trained after it), with
    the step count of an uninterrupted run."""
    from pipeline.train import run_training

    trace = tmp_path / "trace"
    cfg = _cfg(digits_shards, str(tmp_path / "runs"), "epochs=2", "checkpoint.every_steps=4",
               f"fail_at_step={STEPS_PER_EPOCH + 7}", "max_failures=1", "data.val_split=",
               f"trace_ids_dir={trace}", *(["data.cache_budget_mb=0"] if cache == "streaming" else []))
    out = run_training(cfg)
    assert out["epochs"] == 2 and out["steps"] == 2 * STEPS_PER_EPOCH
    assert out["resumed_from_epoch"] == 1  # the mid-epoch checkpoint: 1 epoch complete
    latest, writes = _trace(trace)
    # trained again after the restart: only step 17 (the one both workers finished before the
    # failure at 18) - a restart from the epoch's start would have redone 12..17
    assert sorted(s for s, n in writes.items() if n > 2) == [17], writes
    for epoch in (0, 1):
        keys = [k for (_, _), (e, ks) in latest.items() if e == epoch for k in ks]
        assert len(keys) == STEPS_PER_EPOCH * 128, (epoch, len(keys))
        assert len(set(keys)) == len(keys), f"epoch {epoch + 1}: a sample trained twice"
    # No val split, so no kNN: the summary says null, and stays strict JSON (no NaN for jq & co).
    assert out["knn_top1"] is None
    assert out["rows_read"] == 1438  # the epoch's rows: consumed before the checkpoint + after
    json.dumps(out, allow_nan=False)


def test_s3_storage_for_data_checkpoints_and_tensorboard(ray_session, s3_digits_shards, s3_bucket,
                                                         tmp_path):
    from pipeline.storage import fsspec_fs
    from pipeline.train import run_training

    cfg = _cfg(s3_digits_shards, f"{s3_bucket}/runs", "epochs=1", "loss.name=infonce")
    out = run_training(cfg)
    assert out["run_dir"].startswith("s3://") and out["epochs"] == 1
    assert math.isfinite(out["loss"]) and out["knn_top1"] > 0.3  # InfoNCE trains (chance: 0.1)
    fs, path = fsspec_fs(out["run_dir"])
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(path)]
    assert any(n.startswith("checkpoint_") for n in names), names
    ckpt = [p for p in fs.ls(path) if p.rsplit("/", 1)[-1].startswith("checkpoint_")][0]
    assert fs.isfile(ckpt + "/state.pt")
    assert out["backbone"].startswith("s3://") and fs.isfile(fsspec_fs(out["backbone"])[1])
    local = tmp_path / "tb"
    fs.get(fsspec_fs(out["tensorboard_logdir"])[1], str(local), recursive=True)
    ea = _events(str(local))
    assert "train/loss" in ea.Tags()["scalars"] and "val/knn_top1" in ea.Tags()["scalars"]
    # no credentials anywhere in what the run wrote
    for p in fs.find(path):
        if p.endswith((".json", ".yaml")):
            assert b"testing" not in fs.cat(p)


def _cacr(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("override, key", [("optim.base_lrr=1", "optim.base_lrr"),
                                           ("epochs=-1", "epochs"),
                                           ("loss.name=triplet", "loss.name")])
def test_cli_rejects_bad_config_before_ray_starts(override, key):
    r = _cacr("train", override)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert "Ray" not in r.stdout + r.stderr


def test_cli_train_help_lists_keys():
    r = _cacr("train", "--help")
    assert r.returncode == 0
    for key in ("loss.tau_neg", "optim.base_lr", "num_workers", "storage_path", "augment.scale"):
        assert key in r.stdout


def test_cli_missing_shards_is_one_clear_line(tmp_path):
    r = _cacr("train", f"data.url={tmp_path / 'nothing'}", "data.source=null")
    assert r.returncode == 2 and "nothing" in r.stderr and "cacr prepare" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def _photo_set_with_a_broken_jpeg(tmp_path) -> str:
    """scikit-image's photos as an aspect-kept JPEG set (longer side <= 64), one JPEG truncated."""
    import io
    import tarfile

    from pipeline.data import prepare

    url = str(tmp_path / "photos")
    prepare("skimage-photos:40", url, max_size=64, fmt="jpg", shard_size=10, val_fraction=0,
            progress=False, echo=lambda m: None)
    shard = os.path.join(url, "train-000001.tar")
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(shard, "w") as tf:
        broken = False
        for m, data in members:
            if not broken and m.name.endswith(".jpg"):
                data, broken = data[: len(data) // 3], True
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    return url


def test_worker_decode_trains_on_photos_from_the_whole_image(ray_session, tmp_path):
    """data.decode=worker end to end: JPEG bytes reach the train workers, which decode them in
    batches on their device (the CPU here; nvjpeg on a GPU: bench/gpu.sh's step pair runs this
    path there), aspect-kept canvases with their valid sizes feed full-image crops, and the broken JPEG
    is counted exactly once, as the CPU tasks would count it."""
    from pipeline.train import run_training

    url = _photo_set_with_a_broken_jpeg(tmp_path)
    out = run_training(_cfg(url, str(tmp_path / "runs"), "epochs=1", "batch_size=8",
                            "data.decode=worker", "data.image_size=64", "augment.crop_size=16",
                            "data.val_split="))
    assert out["skipped"] == {"undecodable_image": 1}
    # 39 good images over 2 workers, 8 per worker-step: the worker with fewer full batches sets it
    assert out["steps"] >= 2 and math.isfinite(out["loss"])
