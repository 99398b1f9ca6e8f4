"""Ctrl-C and SIGTERM for the ``cacr`` commands: one stop path, one line, nothing of ours left.

SIGTERM (what ``kill``, Kubernetes, Slurm and spot reclaimers send) takes the SAME path as Ctrl-C:
it is handed to whatever handles SIGINT at that moment - Ray Train's ``fit`` (aborts the run: the
workers stop, the last reported checkpoint stays; it then leaves ``fit`` through ``sys.exit``,
which is why the CLI treats a ``SystemExit`` out of a command as an interruption), Ray Tune's ``fit`` (saves the search state,
then stops), or Python's default (``KeyboardInterrupt``). The CLI then shuts down the Ray it
started (its processes, placement groups and session are gone when the command returns) and
prints ONE line with the command that resumes. A second signal while stopping exits at once.

Checkpoints are written atomically with a manifest written last (:mod:`pipeline.checkpoint`), so
stopping at any moment leaves the last complete checkpoint intact.
"""
from __future__ import annotations

import os
import shlex
import signal
import sys
from typing import Sequence

INTERRUPTED_EXIT = 130  # 128 + SIGINT, what shells report for Ctrl-C

_resume: dict[str, str] = {}  # key=value overrides a re-run needs (e.g. the generated run name)
_stopping = False


class Interrupted(KeyboardInterrupt):
    """Raised where a run learns it was stopped by a signal without an exception of its own
    (e.g. Ray Train's SIGINT handler aborted the run and ``fit`` returned normally)."""


def set_resume(**overrides: str) -> None:
    """Record the overrides the resume command must carry (``run_training``: ``name=<run>``)."""
    _resume.update({k: str(v) for k, v in overrides.items()})


def resume_command(argv: Sequence[str]) -> str:
    """``cacr <argv>`` with the recorded overrides set (replacing the same keys in ``argv``)."""
    keep = [a for a in argv if a.split("=", 1)[0] not in _resume]
    return shlex.join(["cacr", *keep, *(f"{k}={v}" for k, v in _resume.items())])


def _sigterm(signum, frame) -> None:
    """SIGTERM = Ctrl-C: run the current SIGINT handler (Ray Train's / Tune's / Python's)."""
    global _stopping
    if _stopping:
        os._exit(INTERRUPTED_EXIT)
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler is not _sigterm:
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


def install(ray_driver: bool = True) -> None:
    """Called once by ``cacr``'s ``main`` (main thread), before Ray starts.

    ``ray_driver``: this command will start or join Ray. Ray's core then installs absl's failure
    signal handler in THIS process for SIGTERM as well, which prints a stack dump and aborts
    (exit -6, Ray's processes and the one line lost); switch it off for the driver only - Ray
    reads the flag when it creates the driver's core worker, and worker processes keep theirs."""
    signal.signal(signal.SIGTERM, _sigterm)
    if ray_driver:
        from pipeline.ray_compat import disable_driver_failure_signal_handler

        disable_driver_failure_signal_handler()


def on_interrupt(argv: Sequence[str]) -> int:
    """After the command was stopped: tear down our Ray, print the one line, return the exit code.

    A second Ctrl-C / SIGTERM during the teardown exits immediately (the processes of a local Ray
    share the command's fate and are killed with it)."""
    global _stopping
    _stopping = True
    signal.signal(signal.SIGINT, lambda s, f: os._exit(INTERRUPTED_EXIT))
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()  # local Ray: stops its processes; a cluster: drops our job's actors/PGs
    except Exception:  # noqa: BLE001 - stopping anyway; the line below still tells how to resume
        pass
    if "name" in _resume:  # checkpoint staging dirs of workers killed mid-report (this node)
        from pipeline.checkpoint import remove_staging

        remove_staging(_resume["name"])
    command = argv[0] if argv else ""
    verb = "resume" if command in ("train", "tune") else "re-run"
    sys.stdout.flush()
    print(f"cacr: interrupted; {verb} with: {resume_command(argv)}", file=sys.stderr, flush=True)
    return INTERRUPTED_EXIT
