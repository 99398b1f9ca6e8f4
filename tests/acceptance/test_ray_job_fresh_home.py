"""``ray job submit -- cacr train`` on a freshly started machine (infra/README, section 3a).

A user with an empty HOME (no ``~/.ray`` yet) follows infra/README ("The cluster's auth token"):
``ray get-auth-token --generate`` on the head machine, ``RAY_AUTH_MODE=token ray start --head``,
then submits from a second shell that has only ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN`` (the
value ``ray get-auth-token`` prints on the head) and a HOME of its own, empty:
``ray job submit --address ... --working-dir . -- cacr train --config conf/digits.yaml ...``
(``--working-dir .`` ships the working directory: here conf/ only). The job trains 1 tiny epoch on a prepared digits set (absolute paths: the job's
working directory is Ray's copy of ``.``) and must print its summary JSON, whose paths exist,
having JOINED the cluster (the job's entrypoint gets ``RAY_ADDRESS`` from Ray's job manager).
Meanwhile a plain ``cacr train`` / ``cacr inspect`` on the same machine starts its own Ray.
(This also holds what tests/infra/test_ray_job.py used to check on a second head.)
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.acceptance]

RAY = str(Path(sys.executable).with_name("ray"))
TINY = ("batch_size=64 num_workers=2 cpus_per_worker=0.5 data.image_size=16 augment.crop_size=16 "
        "model.width=8 model.head_hidden=64 model.head_out=32 loss.num_positives=1 "
        "optim.warmup_epochs=0.5 epochs=1 data.source=null")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers (401 without a token is an answer)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


@pytest.fixture
def fresh_head(user):
    """A `ray start --head` started by the user (empty HOME, private RAY_TMPDIR); torn down after."""
    assert not (user.home / ".ray").exists()
    gen = user.run("ray get-auth-token --generate", timeout=180)
    assert gen.returncode == 0, gen.out[-3000:]
    token = user.run("ray get-auth-token | tail -n 1", timeout=180).stdout.strip()
    assert token and (user.home / ".ray/auth_token").read_text().strip() == token
    dash = free_port()
    head = subprocess.Popen([RAY, "start", "--head", "--block", "--num-cpus", "6",
                             "--port", str(free_port()), "--include-dashboard", "true",
                             "--dashboard-port", str(dash), "--disable-usage-stats",
                             # the job API needs this head's agent HTTP server; Ray's fixed default
                             # port (52365) is taken by any other Ray on the machine (the test
                             # session's), and the agent then runs without it: "No available agent"
                             "--dashboard-agent-listen-port", str(free_port())],
                            cwd=user.workdir, env=user.env(RAY_AUTH_MODE="token"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{dash}"
        _wait_http(url, 180)
        yield url, token
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(head.pid, signal.SIGKILL)
        user.cleanup_processes()


def test_job_submit_from_a_fresh_home(fresh_head, user, acc, digits_shards, tmp_path):
    url, token = fresh_head
    acc.copy_checkout_configs(user)
    runs = user.workdir / "runs"
    client_home = tmp_path / "client-home"  # the submitting shell: nothing in its ~/.ray
    client_home.mkdir()
    for _ in range(10):
        r = user.run(f"ray job submit --address {url} --working-dir . -- cacr train "
                     f"--config conf/digits.yaml {TINY} data.url={digits_shards} storage_path={runs} name=job",
                     timeout=900, HOME=str(client_home), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
        # Ray's start-up race: the dashboard answers before the head's job agent registers (the
        # server says "try again later"); a user retries, so does the test.
        if r.returncode == 0 or "No available agent to submit job" not in r.out:
            break
        time.sleep(5)
    assert r.returncode == 0, r.out[-6000:]
    assert "Started a local Ray instance" not in r.out  # the job joined the cluster
    s = acc.last_json(r.out, "run_dir")
    assert s["epochs"] == 1
    assert Path(s["run_dir"]).is_dir() and Path(s["backbone"]).is_file()
    tags = acc.scalar_tags(s["tensorboard_logdir"])
    assert tags.get("train/loss", 0) >= 1, f"no train/loss under {s['tensorboard_logdir']}: {sorted(tags)}"
    assert "Connected to Ray cluster" in r.out or "Connecting to existing Ray cluster" in r.out, r.out[-3000:]
    assert len(acc.json_lines(r.out, "run_dir")) == 1, r.out[-3000:]
    assert sum("[cacr] epoch 1/1" in ln for ln in r.out.splitlines()) == 1  # once, not echoed by Train's logger

    # Meanwhile a plain `cacr train` on this machine starts its own Ray rather than joining that
    # cluster (Ray's default for a bare ray.init(), which would also refuse our CPU count) ...
    r = user.run(f"cacr train {TINY} data.url={digits_shards} storage_path={runs} name=local",
                 timeout=900, HOME=str(client_home))
    assert r.returncode == 0, r.out[-4000:]
    assert "Started a local Ray instance" in r.out, r.out[-3000:]
    # ... and so do the data commands that use Ray (`cacr inspect`; `cacr prepare --parallel ray`
    # takes the same pipeline.ray_start path): never a bare ray.init() joining the head.
    r = user.run(f"cacr inspect {digits_shards} --log-level info", timeout=300, HOME=str(client_home))
    assert r.returncode == 0, r.out[-4000:]
    assert "Started a local Ray instance" in r.out and "existing Ray cluster" not in r.out, r.out[-3000:]
