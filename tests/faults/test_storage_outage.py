"""Object-storage outages, for real: the S3 endpoint a run uses (data, checkpoints, TensorBoard)
stops answering - connections refused, open ones reset - and comes back on the same port.

One run, streaming its shards from S3 every epoch (data.cache_budget_mb=0: reads happen all run
long, not once), max_failures=0 (so surviving can only mean the requests were retried, never a
restart of the worker group):

1. the endpoint goes away for 20 s after the first checkpoint: the run rides it out - a later
   checkpoint is written by the same worker group, and the retries are counted in TensorBoard
   (``storage/retries``) and in the checkpoint's metrics;
2. then it goes away for good: the run fails with ONE line naming the endpoint, after
   storage.retry_deadline_s (the bound is a hang guard here, not a timing assertion);
3. the endpoint comes back: re-running the same command resumes from the last complete
   checkpoint and ends with exactly epochs x steps_per_epoch steps.
"""
from __future__ import annotations

import threading
import time
import uuid

import pytest

from pipeline.config import load_config

from .conftest import STEPS_PER_EPOCH, TINY

pytestmark = pytest.mark.slow

OUTAGE_S = 20
DEADLINE_S = 30  # > the transient outage (with backoff slack), short enough for CI


def _checkpoint_states(run_url: str) -> list[dict]:
    """Every complete checkpoint's state, oldest first (read from moto directly, not the proxy)."""
    from pipeline.checkpoint import CheckpointError, load_checkpoint
    from pipeline.train import list_checkpoints

    states = []
    for url in list_checkpoints(run_url):
        try:
            states.append(load_checkpoint(url))
        except CheckpointError:
            pass
    return states


def _tb_scalar(fs, tb_path: str, tag: str, local) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fs.get(tb_path, str(local), recursive=True)
    ea = EventAccumulator(str(local), size_guidance={"scalars": 0})
    ea.Reload()
    return [e.value for e in ea.Scalars(tag)] if tag in ea.Tags()["scalars"] else []


def test_s3_outage_ridden_out_then_gone_for_good_then_resumed(ray_session, s3_digits_shards, s3_bucket,
                                                              s3_outage, tmp_path):
    from pipeline.storage import fsspec_fs, join_url
    from pipeline.train import TrainingFailed, run_training

    epochs = 5
    name = f"o-{uuid.uuid4().hex[:8]}"
    args = [*TINY, f"epochs={epochs}", f"keep_checkpoints={epochs}", "max_failures=0",
            "data.cache_budget_mb=0", f"data.url={s3_digits_shards}", "data.source=null",
            f"storage_path={s3_bucket}/runs", f"name={name}",
            f"storage.endpoint_url={s3_outage.endpoint}", f"storage.retry_deadline_s={DEADLINE_S}"]
    run_url = join_url(s3_bucket, "runs", name)
    events: dict[str, float | int] = {}

    fs, base = fsspec_fs(run_url)  # the session's endpoint (AWS_ENDPOINT_URL): never down

    def epochs_done() -> int:
        """Complete checkpoints (manifest written last), one per epoch (keep_checkpoints=epochs)."""
        try:
            dirs = [p for p in fs.ls(base, refresh=True) if p.rsplit("/", 1)[-1].startswith("checkpoint_")]
        except FileNotFoundError:
            return 0
        return sum(fs.exists(d + "/manifest.json") for d in dirs)

    def outages() -> None:
        deadline = time.monotonic() + 900  # hang guard
        while epochs_done() < 1 and time.monotonic() < deadline:
            time.sleep(0.3)
        events["before"] = epochs_done()
        s3_outage.stop()
        time.sleep(OUTAGE_S)
        s3_outage.start()  # same port; moto kept everything
        while epochs_done() <= events["before"] and time.monotonic() < deadline:
            time.sleep(0.2)
        events["after"] = epochs_done()
        s3_outage.stop()  # for good
        events["gone"] = time.monotonic()

    t = threading.Thread(target=outages, daemon=True)
    t.start()
    with pytest.raises(TrainingFailed) as ei:
        run_training(load_config(None, args))
    failed_after = time.monotonic() - events["gone"]
    t.join(timeout=5)

    # 1. The 20 s outage was ridden out by the same worker group (max_failures=0: no restart) ...
    assert events["after"] > events["before"] >= 1, events
    states = _checkpoint_states(run_url)
    last = states[-1]
    assert last["metrics"]["resumed_from_epoch"] == 0
    assert last["step"] == last["epoch"] * STEPS_PER_EPOCH
    # ... and its retries were counted: in the checkpoint's metrics and in TensorBoard.
    assert last["metrics"]["storage_retries"] > 0, last["metrics"]
    retries = _tb_scalar(fs, base + "/tensorboard", "storage/retries", tmp_path / "tb")
    assert retries and retries[0] == 0 and max(retries) > 0, retries

    # 2. Gone for good: one line naming the endpoint, after the retry deadline (hang guard only).
    msg = str(ei.value)
    assert "\n" not in msg and s3_outage.endpoint in msg and f"name={name}" in msg, msg
    assert "retry_deadline_s" in msg
    assert failed_after < DEADLINE_S + 240, failed_after

    # 3. Back again: the same command resumes from the last complete checkpoint, steps exact.
    s3_outage.start()
    out = run_training(load_config(None, args))
    # (the newest one Ray registered; the one before it when the endpoint vanished in between)
    assert out["resumed_from_epoch"] in (last["epoch"] - 1, last["epoch"]), (out, last["epoch"])
    assert last["epoch"] >= events["after"]
    assert out["epochs"] == epochs and out["steps"] == epochs * STEPS_PER_EPOCH
