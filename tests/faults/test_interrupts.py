"""Ctrl-C, SIGTERM and kill -9 on the ``cacr`` commands, sent for real to the CLI subprocess.

What a user relies on: the command stops (hang guard: it must have exited STOP_GUARD_S after the
signal), prints ONE line with the command that resumes, leaves no process of its own Ray (found
by session id and by its private RAY_TMPDIR) and no temp dir of its own; the last complete
checkpoint is intact, and re-running the printed command resumes from it with the exact step
count. kill -9 of the driver cannot print anything; its local Ray shares its fate; it is injected
at the exact point where it costs most (pipeline/failpoints.py: a checkpoint uploaded, not yet
registered) after the final epoch, and the re-run resumes from that newest complete checkpoint
anyway and ends as a finished run. A partial checkpoint (here: the newest one truncated on
purpose) is skipped for the newest complete one.
"""
from __future__ import annotations

import json
import shlex
import signal
import time
from pathlib import Path

import pytest

from pipeline.checkpoint import STATE_FILE, load_state_file
from pipeline.failpoints import ENV as FAILPOINT

from .conftest import STEPS_PER_EPOCH, STOP_GUARD_S, TINY, CliRun, checkpoints

pytestmark = pytest.mark.slow


def _one_interrupt_line(out: str) -> str:
    lines = [ln for ln in out.splitlines() if ln.startswith("cacr:")]
    # Ray's actors may log their own warnings (prefixed "(Actor pid=...)"); the driver must not.
    driver = [ln for ln in out.splitlines() if "pid=" not in ln.split(")", 1)[0]]
    assert len(lines) == 1 and not any("Traceback" in ln for ln in driver), out[-3000:]
    assert lines[0].startswith("cacr: interrupted; resume with: cacr train "), lines[0]
    return lines[0]


def _complete(run: Path) -> list[Path]:
    """The run's checkpoints that verify (manifest), each with step == epoch x steps/epoch."""
    out = []
    for c in checkpoints(run):
        try:
            st = load_state_file(c)
        except ValueError:
            continue
        assert st["step"] == st["epoch"] * STEPS_PER_EPOCH, (c, st["epoch"], st["step"])
        out.append(c)
    return out


def _epoch(ckpt: Path) -> int:
    return int(load_state_file(ckpt)["epoch"])


def _resumed_epoch(run: CliRun) -> int:
    got = run.wait_for("resumed from checkpoint: epoch ")
    epoch = int(got.split("epoch ")[1].split(",")[0])
    assert f"step {epoch * STEPS_PER_EPOCH}" in got, got
    return epoch


def _killed_by_the_failpoint(run: CliRun) -> None:
    """The driver died of the SIGKILL its rank 0 sent it, and its local Ray with it (except
    Ray's per-node agents, which Ray 2.60 can leave orphaned after a SIGKILL of the driver: they
    hold no resources; the next run starts its own Ray; the fixture kills them)."""
    assert run.finish(600) == -signal.SIGKILL, run.output[-3000:]
    assert run.wait_no_processes(ignore=("DashboardAgent", "RuntimeEnvAgent", "agent.py")) == [], \
        "a killed driver's local Ray must die with it"


def test_train_sigterm_partial_checkpoint_kill_9_then_resume_exactly(cacr_cli, digits_shards, tmp_path):
    """Every stop of a training run, one after the other on the same run, each resumed from the
    newest COMPLETE checkpoint with the exact step count. SIGTERM takes Ctrl-C's path (the current
    SIGINT handler: Ray Train's), so it stands for both here; Ctrl-C itself is sent to `cacr
    evaluate` below and to `cacr tune` in test_tune_faults.py. The kill -9 lands at an exact point
    (pipeline/failpoints.py): after rank 0 uploaded the FINAL epoch's checkpoint, before Ray
    registered it - the checkpoint Ray hands back is then one epoch older than the newest on
    storage; the re-run must resume from the newest (nothing trained twice) and, every epoch being
    done, still end as a finished run does. (A kill -9 after an earlier epoch takes the same resume
    path; the final epoch is the one where the report after it must also work.) One Train worker
    with twice the batch: the same steps per epoch as TINY, one process less per run."""
    runs = tmp_path / "runs"
    epochs = 6  # tiny epochs (~1 s); the SIGTERM lands after 2, well before the last
    args = ["train", *TINY, "num_workers=1", "batch_size=128", f"epochs={epochs}",
            f"keep_checkpoints={epochs}", f"data.url={digits_shards}", "data.source=null",
            f"storage_path={runs}"]  # no name=

    # 1. A new run, stopped by SIGTERM (what kill, Kubernetes, Slurm send) once it wrote two
    # complete checkpoints: one line with the command that resumes, exit 130, nothing of its Ray
    # left, no temp dir of its own.
    a = cacr_cli(*args)
    deadline = time.monotonic() + 600  # hang guard
    while time.monotonic() < deadline:
        done = [p for p in runs.iterdir() if p.is_dir() and len(_complete(p)) >= 2] \
            if runs.is_dir() else []
        if done:
            break
        time.sleep(0.2)
    (run,) = done
    a.proc.send_signal(signal.SIGTERM)
    assert a.finish(STOP_GUARD_S) == 130, a.output[-3000:]
    line = _one_interrupt_line(a.output)
    assert a.wait_no_processes() == [], "Ray processes left behind after SIGTERM"
    assert a.own_tmp_leftovers() == []
    resume = shlex.split(line.split("resume with: ", 1)[1])
    assert resume[:2] == ["cacr", "train"] and f"name={run.name}" in resume, line

    # 2. A crash while writing: the newest checkpoint truncated. The printed command skips it for
    # the newest complete one, and is killed -9 right after uploading the FINAL epoch's checkpoint.
    ckpts = _complete(run)
    fallback = _epoch(ckpts[-2])
    state = ckpts[-1] / STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    b = cacr_cli(*resume[1:], env={FAILPOINT: f"kill_driver_after_upload@{epochs}"})
    assert _resumed_epoch(b) == fallback, b.output[-3000:]
    assert "skipping checkpoint " + ckpts[-1].name in b.output
    _killed_by_the_failpoint(b)
    newest = _complete(run)[-1]
    assert _epoch(newest) == epochs

    # 3. The last re-run finds every epoch done in a checkpoint Ray never registered: it resumes
    # from that one, reports it, and the run ends as a finished run does - exactly epochs x
    # steps_per_epoch steps, the summary, the export.
    c = cacr_cli(*resume[1:])
    assert c.finish(900) == 0, c.output[-3000:]
    assert f"resuming from {newest.name}: complete" in c.output, c.output[-3000:]
    assert f"resumed from checkpoint: epoch {epochs}, step {epochs * STEPS_PER_EPOCH}" in c.output
    # the summary line (a late "(RayTrainWorker ...)" log line may follow it in this capture)
    summary = json.loads(next(ln for ln in reversed(c.lines) if ln.startswith("{")))
    assert summary["resumed_from_epoch"] == epochs and summary["epochs"] == epochs
    assert summary["steps"] == epochs * STEPS_PER_EPOCH  # nothing lost, nothing counted twice
    assert _epoch(Path(summary["checkpoint"])) == epochs and Path(summary["backbone"]).exists()
    assert c.own_tmp_leftovers() == []


def test_train_sigterm_after_a_mid_epoch_checkpoint_resumes_at_the_exact_sample(cacr_cli, digits_shards,
                                                                               tmp_path):
    """checkpoint.every_steps on a streaming set: SIGTERM lands right after the checkpoint 4 steps
    into epoch 2 (injected there: pipeline/failpoints.py, no step after it is trained); the
    printed command resumes at the next step, not the epoch's start, and the resumed epoch reads
    the rest of its samples once (the reader leaves out the rows trained before the stop): every
    step trained exactly once, every sample of each epoch once, the step count and rows_read of
    an uninterrupted run."""
    import json as _json

    runs, trace = tmp_path / "runs", tmp_path / "trace"
    stop = STEPS_PER_EPOCH + 4  # global step 15 = epoch 2, 4 steps in (every_steps 5: 5, 10, 15)
    args = ["train", *TINY, "num_workers=1", "batch_size=128", "epochs=2", "checkpoint.every_steps=5",
            "data.cache_budget_mb=0", f"trace_ids_dir={trace}", f"data.url={digits_shards}",
            "data.source=null", f"storage_path={runs}"]
    a = cacr_cli(*args, env={FAILPOINT: f"sigterm_driver_after_checkpoint@{stop}"})
    assert a.finish(600) == 130, a.output[-3000:]
    line = _one_interrupt_line(a.output)
    assert a.wait_no_processes() == [], "Ray processes left behind after SIGTERM"
    b = cacr_cli(*shlex.split(line.split("resume with: ", 1)[1])[1:])
    assert b.finish(900) == 0, b.output[-3000:]
    assert f"resumed from checkpoint: epoch 1, step {stop}, 4 steps into epoch 2" in b.output, b.output[-3000:]
    summary = _json.loads(next(ln for ln in reversed(b.lines) if ln.startswith("{")))
    assert summary["steps"] == 2 * STEPS_PER_EPOCH and summary["rows_read"] == 1438, summary
    steps, per_epoch = [], {0: [], 1: []}
    for ln in (trace / "rank0.jsonl").read_text().splitlines():
        row = _json.loads(ln)
        steps.append(row["step"])
        per_epoch[row["epoch"]] += row["keys"]
    assert steps == list(range(1, 2 * STEPS_PER_EPOCH + 1))  # each step once, none lost
    for epoch, keys in per_epoch.items():
        assert len(keys) == len(set(keys)) == STEPS_PER_EPOCH * 128, epoch


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl_c"])
def test_evaluate_signal_stops_with_one_line_and_no_ray_left(cacr_cli, digits_shards, tmp_path, sig):
    """Ctrl-C, and SIGTERM (a scheduler's stop) taking Ctrl-C's path: one line, Ray torn down,
    exit 130, the checkpoint untouched."""
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
    e.proc.send_signal(sig)
    assert e.finish(STOP_GUARD_S) == 130, e.output[-3000:]
    lines = [ln for ln in e.output.splitlines() if ln.startswith("cacr:")]
    assert lines == [f"cacr: interrupted; re-run with: cacr evaluate {ckpt} linear_epochs=100000 "
                     "actors=1 threads=1"], e.output[-3000:]
    assert e.wait_no_processes() == [], "Ray processes left behind"
    assert e.own_tmp_leftovers() == []
    assert (ckpt / STATE_FILE).read_bytes() == before and load_state_file(ckpt)["step"] == 0
