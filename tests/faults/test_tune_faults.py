"""`cacr tune` under faults, with real signals to a real `cacr tune` subprocess (its own Ray),
trials on the moto S3 endpoint:

1. a trial's Ray Train worker is killed (SIGKILL) once every trial has a registered checkpoint:
   that trial's worker group restarts from ITS OWN checkpoint (train.max_failures=1) and the search
   goes on;
2. Ctrl-C (SIGINT) on the command: it stops within the hang guard, prints ONE line with the resume
   command, exit 130, leaves no process of its Ray and no temp dir of its own;
3. re-running the printed command restores the search: every trial is accounted for, each DONE
   with exactly epochs x steps_per_epoch steps (nothing lost, nothing counted twice).

Both commands run with AWS keys in the environment (a distinctive secret key; moto accepts any):
the secret ends up in no file the search wrote - the working directory, Ray's temp dirs (Ray logs
every runtime_env it sets up: Tune used to put the AWS variables into each trial's), the bucket.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import time
import uuid
from pathlib import Path

import pytest
import yaml

from .conftest import STOP_GUARD_S

pytestmark = pytest.mark.slow

STEPS = 1438 // 128  # one worker x batch 128 per trial
TRIAL = {"batch_size": 128, "num_workers": 1, "cpus_per_worker": 0.5, "torch_threads": 1,
         "max_failures": 1, "log_every_steps": 5, "data.image_size": 16, "augment.crop_size": 16,
         "model.width": 8, "model.head_hidden": 64, "model.head_out": 32, "loss.num_positives": 1,
         "optim.warmup_epochs": 0.5, "data.source": None, "data.val_split": ""}


def _registered_checkpoint(fs, trial_dir: str) -> bool:
    """Ray registered a complete checkpoint of this trial's Train run (its snapshot file is
    written after registration; the manifest is the checkpoint's last file)."""
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(trial_dir, refresh=True)]
    return "checkpoint_manager_snapshot.json" in names and any(
        fs.exists(f"{trial_dir}/{n}/manifest.json") for n in names if n.startswith("checkpoint_"))


def _train_workers(run) -> list[int]:
    return [int(p.split()[0]) for p in run.own_processes() if "RayTrainWorker" in p]


def test_tune_worker_killed_then_ctrl_c_then_resumed(cacr_cli, digits_shards, s3_bucket, tmp_path,
                                                    find_secret):
    from pipeline.storage import fsspec_fs

    secret = f"cacrSECRET{uuid.uuid4().hex}"
    keys = {"AWS_ACCESS_KEY_ID": "AKIACACRTESTKEY", "AWS_SECRET_ACCESS_KEY": secret}
    epochs = 8
    name = f"tf-{uuid.uuid4().hex[:8]}"
    doc = {"name": name, "train": {**TRIAL, "data.url": digits_shards, "epochs": epochs},
           "search_space": {"loss.tau_neg": {"type": "grid", "values": [2.0, 3.0]}},
           "metric": "loss", "mode": "min", "num_samples": 1, "max_concurrent_trials": 2,
           "scheduler": {"name": "fifo"}, "storage_path": f"{s3_bucket}/tune",
           "trial_start_timeout_s": 120, "verbose": 0}
    conf = tmp_path / "tune.yaml"
    conf.write_text(yaml.safe_dump(doc))
    fs, search = fsspec_fs(f"{s3_bucket}/tune/{name}")

    # 1. Kill a Train worker once both trials have a registered checkpoint.
    a = cacr_cli("tune", "--config", str(conf), env=keys)
    a.wait_for("[cacr] epoch 1/")
    deadline = time.monotonic() + 600  # hang guard
    while time.monotonic() < deadline:
        trials = fs.ls(f"{search}/trials", refresh=True) if fs.exists(f"{search}/trials") else []
        if len(trials) == 2 and all(_registered_checkpoint(fs, t) for t in trials):
            break
        time.sleep(0.5)
    victims = _train_workers(a)
    assert victims, "no Ray Train worker process of the search found"
    os.kill(victims[0], signal.SIGKILL)
    resumed = a.wait_for("resumed from checkpoint: epoch ")  # the killed trial, from its own
    assert int(resumed.split("epoch ")[1].split(",")[0]) >= 1, resumed

    # 2. Ctrl-C on the command.
    a.proc.send_signal(signal.SIGINT)
    assert a.finish(STOP_GUARD_S * 2) == 130, a.output[-3000:]
    lines = [ln for ln in a.output.splitlines() if ln.startswith("cacr:")]
    assert lines == [f"cacr: interrupted; resume with: cacr tune --config {conf}"], a.output[-3000:]
    assert "Tuner.restore" not in a.output  # Tune's own hint is not how a cacr user resumes
    assert a.wait_no_processes() == [], "Ray processes left behind"
    assert a.own_tmp_leftovers() == []

    # 3. The printed command restores the search; every trial ends with the exact step count.
    b = cacr_cli(*shlex.split(lines[0].split("resume with: ", 1)[1])[1:], env=keys)
    assert b.finish(900) == 0, b.output[-3000:]
    assert "resuming search" in b.output
    out = json.loads(next(ln for ln in reversed(b.lines) if ln.startswith("{")))
    errors = [(row["trial"], row["status"], row["error"]) for row in out["trial_table"]]
    assert out["resumed"] and out["trials"] == 2 and out["completed"] == 2, \
        (errors, a.output[-4000:], b.output[-8000:])
    for row in out["trial_table"]:
        assert row["status"] == "DONE" and row["epochs"] == epochs, row
        assert row["step"] == epochs * STEPS, row  # none lost, none twice
    assert out["search_dir"].startswith("s3://") and out["best_config"].startswith("s3://")
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(search, refresh=True)}
    assert {"search.yaml", "best_config.yaml", "summary.json", "trials"} <= names, names
    for row in out["trial_table"]:
        assert fs.find(f"{search}/trials/{row['trial']}/tensorboard"), row
    best = yaml.safe_load(fs.cat(f"{search}/best_config.yaml"))
    assert best["loss"]["tau_neg"] == out["best_params"]["loss.tau_neg"]

    # 4. No file of the search holds the secret key (and the grep had Ray's logs to read).
    ray_tmps = [a.ray_tmp, b.ray_tmp]
    assert any(next(Path(d).rglob("runtime_env*.log"), None) for d in ray_tmps), \
        "Ray wrote no runtime_env log under the commands' RAY_TMPDIRs: the grep would prove nothing"
    assert find_secret(secret, [tmp_path, *ray_tmps], [s3_bucket]) == []
    assert secret not in a.output + b.output
