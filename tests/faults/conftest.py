"""Helpers for the fault tests: a ``cacr`` subprocess with its own Ray temp dir, TMPDIR and
session (so what it leaves behind can be found), read line by line while it runs.

``TINY`` = the tests/pipeline/test_train.py settings (16 px, width-8 encoder, 2 workers x 0.5 CPU,
11 steps per epoch on the digits fixture), kNN monitor off."""
from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

TINY = ["batch_size=64", "num_workers=2", "cpus_per_worker=0.5", "data.image_size=16",
        "augment.crop_size=16", "model.width=8", "model.head_hidden=64", "model.head_out=32",
        "loss.num_positives=1", "log_every_steps=5", "optim.warmup_epochs=0.5", "data.val_split="]
STEPS_PER_EPOCH = 1438 // 128
STOP_GUARD_S = 60  # hang guard for "stops within 30 s" (not a timing assertion: 2 loaded cores)
# What libraries leave in TMPDIR on ANY exit (multiprocessing's forkserver dir, torch's compile
# cache); everything else there would be ours (e.g. a checkpoint staging dir).
LIBRARY_TMP = ("pymp-", "torchinductor_")


class CliRun:
    """``python -m pipeline.cli ARGS`` in a new session, stdout+stderr merged, lines queued."""

    def __init__(self, args: list[str], root: Path, env: dict[str, str] | None = None):
        self.args = args
        # Short paths: Ray puts Unix sockets under its temp dir (108-byte limit).
        self.ray_tmp = tempfile.mkdtemp(prefix="cr", dir="/tmp")
        self.tmpdir = root / f"tmp-{len(list(root.glob('tmp-*')))}"
        self.tmpdir.mkdir(parents=True)
        extra = env or {}
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        env.update(RAY_TMPDIR=self.ray_tmp, TMPDIR=str(self.tmpdir), **extra)
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for ln in self.proc.stdout:
            self._q.put(ln.rstrip("\n"))
        self._q.put(None)

    def wait_for(self, text: str, timeout: float = 600) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ln = self._q.get(timeout=1)
            except queue.Empty:
                continue
            if ln is None:
                raise AssertionError(f"exited before {text!r}:\n" + "\n".join(self.lines[-40:]))
            self.lines.append(ln)
            if text in ln:
                return ln
        raise AssertionError(f"no {text!r} within {timeout}s:\n" + "\n".join(self.lines[-40:]))

    def finish(self, timeout: float) -> int:
        """Wait (hang guard) for the exit, then drain the output."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(f"still running {timeout}s after the signal:\n" + self.output[-3000:])
        while (ln := self._q.get(timeout=30)) is not None:
            self.lines.append(ln)
        return rc

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def own_processes(self) -> list[str]:
        """Live processes of this command: its session, or anything using its Ray temp dir."""
        found = []
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
                with open(f"/proc/{d}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
                sid = os.getsid(int(d))
            except (OSError, IndexError):
                continue
            if state != "Z" and (sid == self.proc.pid or self.ray_tmp in cmd):
                found.append(f"{d} {cmd[:120]}")
        return found

    def wait_no_processes(self, timeout: float = STOP_GUARD_S, ignore: tuple[str, ...] = ()) -> list[str]:
        deadline = time.monotonic() + timeout
        while (left := [p for p in self.own_processes() if not any(i in p for i in ignore)]) \
                and time.monotonic() < deadline:
            time.sleep(1)
        return left

    def own_tmp_leftovers(self) -> list[str]:
        return sorted(p.name for p in self.tmpdir.iterdir() if not p.name.startswith(LIBRARY_TMP))

    def kill_all(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def cleanup(self) -> None:
        self.kill_all()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


@pytest.fixture
def cacr_cli(tmp_path):
    """``cacr_cli(*args, env={...}) -> CliRun``; every process started is killed at the end of
    the test. ``env``: variables added to the command's environment (a fault-injection point)."""
    runs: list[CliRun] = []

    def start(*args: str, env: dict[str, str] | None = None) -> CliRun:
        runs.append(CliRun(list(args), tmp_path, env))
        return runs[-1]
    yield start
    for r in runs:
        r.cleanup()


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
