"""pipeline/ray_start.py: the one way commands start or join Ray."""
from __future__ import annotations

import pytest


def test_a_local_ray_that_times_out_starting_is_tried_again(monkeypatch, capsys):
    """Ray waits a fixed 30 s for a new node's raylet (ray/_private/node.py); on a busy machine
    that fails with "timed out during startup". start_ray's init tries again, after killing what
    the failed attempt left running; any other error is raised at once."""
    import subprocess

    import ray

    from pipeline import ray_start

    calls, left = [], []

    def slow_then_fine(**kwargs):
        calls.append(kwargs)
        if len(calls) == 1:  # a half-started node: a child process stays behind, then the timeout
            left.append(subprocess.Popen(["sleep", "120"]))
            raise Exception("The current node timed out during startup. This could happen ...")

    monkeypatch.setattr(ray, "init", slow_then_fine)
    ray_start._init(address="local", num_cpus=2)
    assert len(calls) == 2 and left[0].wait(timeout=15) is not None  # killed, not left running
    assert "trying again (2/3)" in capsys.readouterr().out

    def broken(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("something else")

    monkeypatch.setattr(ray, "init", broken)
    calls.clear()
    with pytest.raises(RuntimeError, match="something else"):
        ray_start._init(address="local")
    assert len(calls) == 1
