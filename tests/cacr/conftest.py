"""Fixtures shared by the tests of cacr/.

* ``spawn_ranks``: run a test module as W real gloo processes (``python MODULE RANK RDZV OUT``) and
  load what each rank saved; a rank that fails shows its own log.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _spawn_ranks(script: str, world: int, tmp: Path, result: str) -> list:
    """Start ``world`` processes of ``script`` (rank, rendezvous file, output dir), wait for all
    (180 s each), then load ``tmp / result.format(rank=r)`` of every rank."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, script, str(r), str(tmp / "rdzv"), str(tmp)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=180)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r][-4000:]}"
    return [torch.load(tmp / result.format(rank=r)) for r in range(world)]


@pytest.fixture(scope="session")
def spawn_ranks():
    return _spawn_ranks
