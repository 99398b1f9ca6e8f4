"""Fault-injection points: where the fault tests stop a run at an exact place, not by timing.

A point is armed by the environment variable ``CACR_FAILPOINT=<point>@<N>`` in the command's
environment; every process of its local Ray inherits it (the raylet starts the workers with the
driver's environment). Unset, which is all a user ever has, every function here does nothing.

Points:

``kill_driver_after_upload@E``
    Rank 0, when the checkpoint of epoch E (1-based, as the console counts) has been uploaded
    COMPLETE to the run's storage (manifest included) and before the training report reaches
    Ray Train's controller: SIGKILL the driver, then wait to be torn down with its local Ray.
    That is a ``kill -9`` landing between "written" and "registered": the newest checkpoint on
    storage is one that Ray never registered (tests/faults/test_interrupts.py).

``sigterm_driver_after_checkpoint@S``
    Rank 0, once the mid-epoch checkpoint (``checkpoint.every_steps``) at global step S has been
    reported: SIGTERM the driver (Ctrl-C's path), then wait to be torn down. The run stops with
    that checkpoint as its newest, whatever the timing: a resume must continue at step S + 1.

Why a hook rather than a well-timed signal: the window between the upload and the controller's
next poll is a few milliseconds wide, so a test that aims a signal at it passes or fails by luck.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Any, Callable

ENV = "CACR_FAILPOINT"
DRIVER_ENV = "CACR_FAILPOINT_DRIVER_PID"  # set by the driver for its local Ray's processes
KILL_DRIVER_AFTER_UPLOAD = "kill_driver_after_upload"
SIGTERM_DRIVER_AFTER_CHECKPOINT = "sigterm_driver_after_checkpoint"
POINTS = (KILL_DRIVER_AFTER_UPLOAD, SIGTERM_DRIVER_AFTER_CHECKPOINT)


def armed(point: str) -> int | None:
    """The epoch (or step) at which ``point`` fires, or None when it is not armed."""
    spec = os.environ.get(ENV, "")
    if not spec:
        return None
    name, _, epoch = spec.partition("@")
    if name not in POINTS or not epoch.isdigit():
        raise ValueError(f"{ENV}={spec!r}: expected <point>@<epoch> with a point of {POINTS}")
    return int(epoch) if name == point else None


def note_driver() -> None:
    """Called by the process that starts a local Ray, before it starts: it is the driver a
    point kills. Nothing happens unless a point is armed."""
    if os.environ.get(ENV):
        os.environ[DRIVER_ENV] = str(os.getpid())


def checkpoint_upload_fn(epoch: int) -> Callable[[Any, str], Any] | None:
    """For ``ray.train.report(checkpoint_upload_fn=...)`` on rank 0 when epoch ``epoch``'s
    checkpoint is to be uploaded: None (Ray's own upload) unless ``kill_driver_after_upload``
    is armed for this epoch; then Ray's upload, followed by the kill."""
    if armed(KILL_DRIVER_AFTER_UPLOAD) != epoch:
        return None
    from pipeline.ray_compat import persist_checkpoint

    def upload_then_kill_driver(checkpoint, dir_name: str):
        persisted = persist_checkpoint(checkpoint, dir_name)
        os.kill(int(os.environ[DRIVER_ENV]), signal.SIGKILL)
        time.sleep(120)  # torn down with the driver's Ray long before this returns
        os._exit(1)
        return persisted  # pragma: no cover
    return upload_then_kill_driver


def after_mid_epoch_checkpoint(step: int) -> None:
    """Rank 0, after reporting the mid-epoch checkpoint of global step ``step``: nothing, unless
    ``sigterm_driver_after_checkpoint`` is armed for that step; then SIGTERM the driver and wait
    to be torn down with its Ray (no step after this checkpoint is ever trained)."""
    if armed(SIGTERM_DRIVER_AFTER_CHECKPOINT) != step:
        return
    os.kill(int(os.environ[DRIVER_ENV]), signal.SIGTERM)
    time.sleep(300)  # torn down with the run long before this returns
    os._exit(1)
