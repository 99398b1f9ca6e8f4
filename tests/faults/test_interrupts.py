"""Ctrl-C, SIGTERM and kill -9 on the ``cacr`` commands, sent for real to the CLI subprocess.

What a user relies on: the command stops (hang guard: it must have exited STOP_GUARD_S after the
signal), prints ONE line with the command that resumes, leaves no process of its own Ray (found
by session id and by its private RAY_TMPDIR) and no temp dir of its own; the last complete
checkpoint is intact, and re-running the printed command resumes from it with the exact step
count. kill -9 of the driver cannot print anything; its local Ray shares its fate, and a partial
checkpoint (here: the newest one truncated on purpose) is skipped for the newest complete one.
"""
from __future__ import annotations

import json
import shlex
import signal
from pathlib import Path

import pytest

from pipeline.checkpoint import STATE_FILE, load_state_file

from .conftest import STEPS_PER_EPOCH, STOP_GUARD_S, TINY, checkpoints

pytestmark = pytest.mark.slow


def _one_interrupt_line(out: str) -> str:
    lines = [ln for ln in out.splitlines() if ln.startswith("cacr:")]
    # Ray's actors may log their own warnings (prefixed "(Actor pid=...)"); the driver must not.
    driver = [ln for ln in out.splitlines() if "pid=" not in ln.split(")", 1)[0]]
    assert len(lines) == 1 and not any("Traceback" in ln for ln in driver), out[-3000:]
    assert lines[0].startswith("cacr: interrupted; resume with: cacr train "), lines[0]
    return lines[0]


def test_train_ctrl_c_then_kill_9_then_partial_checkpoint_resume_exactly(cacr_cli, digits_shards, tmp_path):
    runs = tmp_path / "runs"
    args = ["train", *TINY, "epochs=3", "keep_checkpoints=3", f"data.url={digits_shards}",
            "data.source=null", f"storage_path={runs}"]  # no name=: the line must give it

    # 1. Ctrl-C after the first checkpoint, while epoch 2 runs.
    a = cacr_cli(*args)
    a.wait_for("[cacr] epoch 1/3")
    a.proc.send_signal(signal.SIGINT)
    assert a.finish(STOP_GUARD_S) == 130
    line = _one_interrupt_line(a.output)
    assert a.wait_no_processes() == [], "Ray processes left behind"
    assert a.own_tmp_leftovers() == []
    resume = shlex.split(line.split("resume with: ", 1)[1])
    name = next(x.split("=", 1)[1] for x in resume if x.startswith("name="))
    (ckpt1,) = checkpoints(runs / name)
    assert load_state_file(ckpt1)["step"] == STEPS_PER_EPOCH  # intact: manifest verifies

    # 2. The printed command resumes; kill -9 of the driver after its second checkpoint.
    assert resume[:2] == ["cacr", "train"]
    b = cacr_cli(*resume[1:])
    b.wait_for("resumed from checkpoint: epoch 1, step 11")
    b.wait_for("[cacr] epoch 2/3")
    b.proc.kill()
    b.finish(STOP_GUARD_S)
    assert b.wait_no_processes() == [], "a killed driver's local Ray must die with it"
    ckpts = checkpoints(runs / name)
    assert len(ckpts) == 2 and load_state_file(ckpts[-1])["step"] == 2 * STEPS_PER_EPOCH

    # 3. A crash while writing: the newest checkpoint truncated. The re-run skips it.
    state = ckpts[-1] / STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    c = cacr_cli(*resume[1:])
    assert c.finish(900) == 0, c.output[-3000:]
    assert "skipping checkpoint " + ckpts[-1].name in c.output
    summary = json.loads(c.lines[-1])
    assert summary["resumed_from_epoch"] == 1 and summary["epochs"] == 3
    assert summary["steps"] == 3 * STEPS_PER_EPOCH  # nothing lost, nothing counted twice
    assert c.own_tmp_leftovers() == []


def test_evaluate_sigterm_stops_with_one_line_and_no_ray_left(cacr_cli, digits_shards, tmp_path):
    """SIGTERM (a scheduler's stop) takes Ctrl-C's path: one line, Ray torn down, exit 130."""
    import torch

    from cacr.model import CACRModel
    from pipeline.checkpoint import save_state
    from pipeline.config import load_config, to_dict

    cfg = load_config(None, [*TINY, f"data.url={digits_shards}", "data.source=null"])
    m = cfg.model
    model = CACRModel(m.arch, small_images=m.small_images, width=m.width, head_hidden=m.head_hidden,
                      head_out=m.head_out, head_layers=m.head_layers, norm=m.norm)
    ckpt = tmp_path / "checkpoint_x"
    save_state(ckpt, {"model": model.state_dict(), "config": to_dict(cfg), "epoch": 0, "step": 0})
    before = (ckpt / STATE_FILE).read_bytes()
    # a long probe, so the signal lands while Ray is up and the command is busy
    e = cacr_cli("evaluate", str(ckpt), "linear_epochs=100000", "actors=1", "threads=1")
    e.wait_for("[cacr] features:")
    e.proc.send_signal(signal.SIGTERM)
    assert e.finish(STOP_GUARD_S) == 130, e.output[-3000:]
    lines = [ln for ln in e.output.splitlines() if ln.startswith("cacr:")]
    assert lines == [f"cacr: interrupted; re-run with: cacr evaluate {ckpt} linear_epochs=100000 "
                     "actors=1 threads=1"], e.output[-3000:]
    assert e.wait_no_processes() == [], "Ray processes left behind"
    assert e.own_tmp_leftovers() == []
    assert (ckpt / STATE_FILE).read_bytes() == before and load_state_file(ckpt)["step"] == 0
