"""`cacr tune`: config checks (fast) and real Ray Tune searches over tiny Ray Train runs (slow).

The searches use the TINY training settings (16 px, width-8 encoder, V = 2) with 1 worker x 0.5 CPU
per trial and 2 trials at a time, so they fit 2 cores. To make ASHA's decision deterministic they
tune ``loss.alpha`` with metric ``loss`` (min): alpha scales the attraction term, so alpha = 8
trials have a clearly higher loss than alpha = 0.1 ones after one epoch, whatever the noise.
"""
from __future__ import annotations

import json
import math
import time
import uuid
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]

TINY = {"batch_size": 128, "num_workers": 1, "cpus_per_worker": 0.5, "torch_threads": 1,
        "max_failures": 0, "log_every_steps": 5, "data.image_size": 16, "augment.crop_size": 16,
        "model.width": 8, "model.head_hidden": 64, "model.head_out": 32, "loss.num_positives": 1,
        "optim.warmup_epochs": 0.5, "data.source": None, "data.val_split": ""}  # kNN monitor off


def _tune_yaml(tmp_path: Path, shards: str, storage: str, **over) -> str:
    doc = {
        "name": f"s-{uuid.uuid4().hex[:8]}",
        "train": {**TINY, "data.url": shards, "storage_path": str(tmp_path / "runs"), "epochs": 2},
        "search_space": {"loss.alpha": {"type": "grid", "values": [0.1, 8.0]}},
        "metric": "loss", "mode": "min", "num_samples": 1, "max_concurrent_trials": 2,
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "storage_path": storage, "trial_start_timeout_s": 60, "verbose": 0,
    }
    doc.update(over)
    path = tmp_path / f"{doc['name']}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Fast: the tune config is checked before Ray starts


def test_embedded_default_loads_and_matches_the_rayjob():
    from pipeline.tune import load_tune_config

    tc, base = load_tune_config(str(ROOT / "conf/tune/digits.yaml"))
    assert tc.scheduler.name == "asha" and tc.metric == "knn_top1" and tc.mode == "max"
    assert base.data.source == "auto" and base.epochs > tc.scheduler.grace_period
    assert {"optim.base_lr", "loss.tau_pos", "loss.tau_neg"} <= set(tc.search_space)
    rayjob = (ROOT / "infra/k8s/rayjob-tune.yaml").read_text()
    assert "cacr tune --config conf/tune/digits.yaml" in rayjob


@pytest.mark.parametrize("over,match", [
    ({"search_space": {"optim.base_lrr": {"type": "choice", "values": [0.1]}}}, "did you mean 'optim.base_lr'"),
    ({"search_space": {"loss.tau_pos": {"type": "normal", "values": [1]}}}, "expected {type"),
    ({"search_space": {"loss.tau_pos": {"type": "uniform", "low": -1.0, "high": 1.0}}}, "loss.tau_pos"),
    ({"search_space": {"loss.tau_neg": {"type": "loguniform", "low": 0.0, "high": 1.0}}}, "low > 0"),
    ({"search_space": {"loss.num_positives": {"type": "choice", "values": [1, "two"]}}}, "integer"),
    ({"search_space": {"epochs": {"type": "choice", "values": [1, 2]}}}, "train.epochs"),
    ({"search_space": {}}, "at least one key"),
    ({"metric": "accuracy"}, "metric"),
    ({"scheduler": {"name": "hyperband"}}, "scheduler.name"),
    ({"train": {"optim.base_lrr": 0.1}}, "did you mean 'optim.base_lr'"),
])
def test_bad_tune_configs_fail_before_ray(tmp_path, over, match):
    from pipeline.tune import load_tune_config

    path = _tune_yaml(tmp_path, "/nonexistent", str(tmp_path / "tune"), **over)
    with pytest.raises(ConfigError, match=match):
        load_tune_config(path)


def test_overrides_reach_tune_and_train_keys(tmp_path):
    from pipeline.tune import load_tune_config

    path = _tune_yaml(tmp_path, "/x", str(tmp_path / "tune"))
    tc, base = load_tune_config(path, ["num_samples=3", "train.optim.base_lr=0.5", "metric=knn_top1",
                                       "mode=null", "train.data.val_split=val"])
    assert tc.num_samples == 3 and base.optim.base_lr == 0.5 and tc.mode == "max"
    with pytest.raises(ConfigError, match="knn_top1 needs"):
        load_tune_config(path, ["metric=knn_top1", "train.data.val_split="])


# ---------------------------------------------------------------------------------------------
# Slow: real searches


@pytest.mark.slow
def test_impossible_trial_resources_fail_fast(ray_session, digits_shards, tmp_path):
    from pipeline.tune import run_tune

    for over, match in ((["train.cpus_per_worker=64"], "per-trial resources.*64"),
                        (["train.use_gpu=true"], "no (CUDA )?GPU")):
        t0 = time.monotonic()
        with pytest.raises(ConfigError, match=match):
            run_tune(_tune_yaml(tmp_path, digits_shards, str(tmp_path / "tune")), over)
        assert time.monotonic() - t0 < 30


def _pg_states() -> dict[str, str]:
    import ray

    return {pg_id: info["state"] for pg_id, info in ray.util.placement_group_table().items()}


def _tb_has_hparams(logdir: Path) -> bool:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return bool(ea.PluginTagToContent("hparams"))


@pytest.mark.slow
def test_search_asha_divergence_best_config_and_rerun(ray_session, digits_shards, tmp_path, capsys):
    """4 trials, 2 at a time: ASHA stops an alpha = 8 trial after epoch 1 (the third trial is worse
    than the median of the first two there), the alpha = 1e39 trial diverges (inf loss) and is reported
    as such, every trial ends and frees its placement group, the best config holds the best
    trial's values, and re-running the search restores it instead of starting trials again."""
    from pipeline.tune import run_tune

    before = set(_pg_states())
    path = _tune_yaml(tmp_path, digits_shards, str(tmp_path / "tune"),
                      search_space={"loss.alpha": {"type": "grid", "values": [0.1, 8.0, 8.0, 1.0e39]}})
    out = run_tune(path)
    printed = capsys.readouterr().out
    assert _last_json(printed) == json.loads(json.dumps(out, default=str))
    rows = out["trial_table"]
    assert out["trials"] == 4 and len(rows) == 4
    by_alpha = {}
    for row in rows:
        by_alpha.setdefault(row["params"]["loss.alpha"], []).append(row)
    assert [r["status"] for r in by_alpha[1.0e39]] == ["DIVERGED"], rows
    assert "loss diverged" in by_alpha[1.0e39][0]["error"]
    assert out["diverged"] == 1 and out["errored"] == 1
    assert out["stopped_early"] >= 1 and any(r["status"] == "STOPPED" and r["epochs"] == 1
                                             for r in by_alpha[8.0]), rows
    assert out["unfinished"] == 0 and {r["status"] for r in rows} <= {"DONE", "STOPPED", "DIVERGED"}
    assert out["best_params"] == {"loss.alpha": 0.1} and math.isfinite(out["best_metric"])
    for line in ("DIVERGED", "STOPPED", "loss.alpha"):
        assert line in printed

    # Stopped and diverged trials gave their workers back (Train's cleaner via the State API).
    deadline = time.monotonic() + 60
    while True:
        left = {k: v for k, v in _pg_states().items() if k not in before and v != "REMOVED"}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not left, f"placement groups of the search still held: {left}"

    # TensorBoard: one run per started trial, each with an HParams record (stopped ones too).
    trials_dir = Path(out["tensorboard_logdir"])
    runs = sorted(p.parent.name for p in trials_dir.glob("*/tensorboard"))
    assert runs == sorted(r["trial"] for r in rows), (runs, rows)
    for row in rows:
        assert _tb_has_hparams(trials_dir / row["trial"] / "tensorboard"), row
    # ... and only there: no second, metrics-only copy from Tune's own TensorBoard logger, whose
    # `tensorboard --logdir /tmp/ray/...` hint would point users at the wrong place.
    search_dir = Path(out["search_dir"])
    stray = [p for p in search_dir.rglob("events.out.tfevents*") if trials_dir not in p.parents]
    assert not stray, stray
    assert "To visualize your results with TensorBoard" not in printed
    assert list(search_dir.glob("trial_*/result.json")), sorted(search_dir.iterdir())  # Tune's own logs kept

    # The best config is a training config with the best trial's values (that `cacr train` runs
    # it as is: README's tune block, tests/acceptance/test_readme_tune.py).
    best = load_config(out["best_config"])
    assert best.loss.alpha == 0.1 and best.name is None and best.epochs == 2

    # Re-running the same search restores it: no trial runs again, same results.
    again = run_tune(path)
    assert again["resumed"] and again["trials"] == 4
    assert {r["trial"]: r["status"] for r in again["trial_table"]} == {r["trial"]: r["status"] for r in rows}
    assert "resuming search" in capsys.readouterr().out
    # ... and a changed search under the same name is refused instead of silently mixed in.
    with pytest.raises(ConfigError, match="different search space"):
        run_tune(path, ["train.optim.base_lr=0.3"])
