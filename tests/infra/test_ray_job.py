"""`ray job submit -- cacr train ...` against a running Ray cluster (README / infra/README).

A real head started with ``ray start --head`` (its own process group and a private RAY_TMPDIR,
so nothing else on the machine finds or joins it), a job submitted through the dashboard's job
API with the ``ray`` CLI, exactly as on a cluster. The job's entrypoint gets ``RAY_ADDRESS`` from
Ray's job manager: ``cacr train`` must join that cluster (not start a local Ray of its own), train,
and print its summary JSON into the job's log. A plain ``cacr train`` run on the same machine
meanwhile must start its own instance instead of joining the ``ray start`` cluster (Ray's
default for ``ray.init()``, which would also refuse our CPU count).

Token authentication (Ray 2.60): a cluster started with ``ray start --head`` uses token auth when
``RAY_AUTH_MODE=token`` is set (or a token file already exists); it never generates a token
itself. So the test does what infra/README tells a user: on a FRESH, empty HOME, generate the
token with ``ray get-auth-token --generate`` (written to ~/.ray/auth_token), start the head with
``RAY_AUTH_MODE=token``, and give the job client ``RAY_AUTH_MODE=token`` + ``RAY_AUTH_TOKEN``
(what a user copies from the head node's ``ray get-auth-token``). Nothing from the machine's real
HOME is used, so the test passes on a fresh machine.
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
def ray_head(tmp_path):
    """(dashboard URL, env for clients) of a `ray start --head` cluster; torn down afterwards."""
    tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths live under it
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                        "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_TMPDIR=tmp, HOME=str(home))
    gen = subprocess.run([RAY, "get-auth-token", "--generate"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert gen.returncode == 0 and gen.stdout.strip(), gen.stderr
    assert (home / ".ray" / "auth_token").read_text().strip() == gen.stdout.strip()
    dash = _free_port()
    head = subprocess.Popen([RAY, "start", "--head", "--block", "--num-cpus", "6",
                             "--port", str(_free_port()), "--include-dashboard", "true",
                             "--dashboard-port", str(dash), "--disable-usage-stats",
                             # the job API needs this head's agent HTTP server; Ray's fixed default
                             # port (52365) is taken by any other Ray on the machine (the test
                             # session's), and the agent then runs without it: "No available agent"
                             "--dashboard-agent-listen-port", str(_free_port())],
                            env={**env, "RAY_AUTH_MODE": "token"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{dash}"
        _wait_http(url, 90)
        # the client: another user's shell, with only the mode and the token copied from the head
        client = {**env, "HOME": str(tmp_path), "RAY_AUTH_MODE": "token",
                  "RAY_AUTH_TOKEN": gen.stdout.strip()}
        yield url, client
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
    for _ in range(10):
        r = subprocess.run([RAY, "job", "submit", "--address", url, "--",
                            sys.executable, "-m", "pipeline.cli", "train", *TINY,
                            f"data.url={digits_shards}", f"storage_path={runs}", "name=job"],
                           env=env, capture_output=True, text=True, timeout=480)
        out = r.stdout + r.stderr
        # Ray's start-up race: the dashboard answers before the head's job agent registers
        # ("No available agent to submit job, please try again later"): retry, as a user would.
        if r.returncode == 0 or "No available agent to submit job" not in out:
            break
        time.sleep(5)
    assert r.returncode == 0, out[-4000:]
    assert "Started a local Ray instance" not in out  # it joined the cluster
    assert "Connected to Ray cluster" in out or "Connecting to existing Ray cluster" in out, out[-3000:]
    summaries = [json.loads(ln) for ln in out.splitlines() if ln.startswith('{"run_dir"')]
    assert len(summaries) == 1, out[-3000:]
    assert summaries[0]["epochs"] == 1 and Path(summaries[0]["backbone"]).exists()
    assert sum("[cacr] epoch 1/1" in ln for ln in out.splitlines()) == 1  # once, not echoed by Train's logger

    # Meanwhile a plain `cacr train` here starts its own Ray rather than joining that cluster.
    local_env = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", *TINY,
                        f"data.url={digits_shards}", f"storage_path={runs}", "name=local"],
                       env=local_env, capture_output=True, text=True, timeout=480)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "Started a local Ray instance" in out, out[-3000:]

    # So do the data commands that use Ray (`cacr inspect`; `cacr prepare --parallel ray` takes the
    # same pipeline.ray_start path): never a bare ray.init() that would join the `ray start` head.
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "inspect", digits_shards, "--log-level", "info"],
                       env=local_env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "Started a local Ray instance" in out and "existing Ray cluster" not in out, out[-3000:]
