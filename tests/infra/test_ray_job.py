"""`ray job submit -- cacr train ...` against a running Ray cluster (README / infra/README).

A real head started with ``ray start --head`` (its own process group and a private RAY_TMPDIR,
so nothing else on the machine finds or joins it), a job submitted through the dashboard's job
API with the ``ray`` CLI, exactly as on a cluster. The job's entrypoint gets ``RAY_ADDRESS`` from
Ray's job manager: ``cacr train`` must join that cluster (not start a local Ray of its own), train,
and print its summary JSON into the job's log. A plain ``cacr train`` run on the same machine
meanwhile must start its own instance instead of joining the ``ray start`` cluster (Ray's
default for ``ray.init()``, which would also refuse our CPU count).

Token authentication (Ray 2.60's default for new clusters): the head reuses or writes
``~/.ray/auth_token``; the job client is told to send it with ``RAY_AUTH_MODE=token``.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.ray_start import free_port as _free_port

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))
TINY = ["batch_size=64", "num_workers=2", "cpus_per_worker=0.5", "data.image_size=16",
        "augment.crop_size=16", "model.width=8", "model.head_hidden=64", "model.head_out=32",
        "loss.num_positives=1", "optim.warmup_epochs=0.5", "epochs=1", "data.source=null"]


def _wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # the server answers (401 without a token is fine)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


@pytest.fixture
def ray_head():
    """(dashboard URL, env for clients) of a `ray start --head` cluster; torn down afterwards."""
    tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE")}
    env["RAY_TMPDIR"] = tmp
    dash = _free_port()
    head = subprocess.Popen([RAY, "start", "--head", "--block", "--num-cpus", "6",
                             "--port", str(_free_port()), "--include-dashboard", "true",
                             "--dashboard-port", str(dash), "--disable-usage-stats"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{dash}"
        _wait_http(url, 90)
        yield url, {**env, "RAY_AUTH_MODE": "token"}
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


def test_job_submit_runs_cacr_train_on_the_cluster(ray_head, digits_shards, tmp_path):
    url, env = ray_head
    runs = tmp_path / "runs"
    r = subprocess.run([RAY, "job", "submit", "--address", url, "--",
                        sys.executable, "-m", "pipeline.cli", "train", *TINY,
                        f"data.url={digits_shards}", f"storage_path={runs}", "name=job"],
                       env=env, capture_output=True, text=True, timeout=480)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "Started a local Ray instance" not in out  # it joined the cluster
    assert "Connected to Ray cluster" in out or "Connecting to existing Ray cluster" in out, out[-3000:]
    summaries = [json.loads(ln) for ln in out.splitlines() if ln.startswith('{"run_dir"')]
    assert len(summaries) == 1, out[-3000:]
    assert summaries[0]["epochs"] == 1 and Path(summaries[0]["backbone"]).exists()
    assert sum("[cacr] epoch 1/1" in ln for ln in out.splitlines()) == 1  # once, not echoed by Train's logger

    # Meanwhile a plain `cacr train` here starts its own Ray rather than joining that cluster.
    local_env = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", *TINY,
                        f"data.url={digits_shards}", f"storage_path={runs}", "name=local"],
                       env=local_env, capture_output=True, text=True, timeout=480)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "Started a local Ray instance" in out, out[-3000:]
