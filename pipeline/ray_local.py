"""Starting Ray on one machine for `cacr train` / `cacr tune` (no ``RAY_ADDRESS``).

Two things a laptop user would otherwise trip over:

* The dashboard is ON. Ray Train V2's detached ``PlacementGroupCleaner`` asks Ray's State API
  (served by the dashboard) whether the Train controller is still alive; without it the cleaner
  prints a warning every second and cannot free the workers of a controller that died (a Tune
  trial stopped by ASHA, a killed driver: ray#54305). The State API client finds the cluster from
  ``RAY_API_SERVER_ADDRESS`` or, failing that, by looking for a local GCS process, which fails
  with "Found multiple active Ray instances" when another Ray runs on the machine. So every
  process of our job gets ``RAY_API_SERVER_ADDRESS`` pointing at OUR dashboard (job runtime_env).
* The console is quiet by default: Ray Train logs every report and checkpoint at INFO, Ray Data
  every dataset execution, and Train's print patch sends each worker ``print`` to the console
  twice. ``quiet_env`` turns those off (Train's own INFO lines are filtered by the RunConfig's
  ``LoggingConfig``, see :func:`pipeline.train.build_trainer`); ``log_level=info`` brings them back.
"""
from __future__ import annotations

import socket
import time

STATE_API_ENV = "RAY_API_SERVER_ADDRESS"


def quiet_env(log_level: str) -> dict[str, str]:
    """Environment for every process of the job so that the console shows our lines, Ray's
    warnings and errors, and not Ray's per-step INFO chatter (at ``log_level`` warning/error)."""
    if log_level.upper() in ("DEBUG", "INFO"):
        return {}
    return {
        # Worker prints go to stdout as they are (Ray forwards them once), not through Train's
        # root logger, which reaches the console a second time.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        "RAY_DATA_LOG_LEVEL": log_level.upper(),
        # Raised inside Ray Train's own DatasetManager (Ray 2.60), nothing the user can change.
        "PYTHONWARNINGS": "ignore:`ExecutionOptions.exclude_resources` is deprecated",
    }


def quiet_driver(log_level: str) -> None:
    """The same for this process: Ray Data executions started by the driver (``cacr evaluate``'s
    feature extraction) log their plan and progress at INFO."""
    import logging

    level = log_level.upper()
    if level in ("DEBUG", "INFO"):
        return
    import ray.data  # noqa: F401 - configures its logger on import; set the level after that

    logging.getLogger("ray.data").setLevel(getattr(logging, level))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_local_ray(num_cpus: int, num_gpus: int = 0, *, env: dict[str, str] | None = None,
                   **kwargs) -> str | None:
    """Start a NEW local Ray WITH the dashboard on a free port, and pin every process of this job to
    it (plus ``env``). ``address="local"``: a cluster left by ``ray start`` on this machine is not
    joined by accident (Ray's default; it would also refuse our CPU count); RAY_ADDRESS joins one. Returns the dashboard URL, or None if the dashboard could not start (then a
    crashed controller's placement group may leak; said on the console)."""
    import os

    import ray

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env_vars = {**(env or {}), STATE_API_ENV: os.environ.get(STATE_API_ENV) or url}
    try:
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=True,
                 dashboard_port=port, runtime_env={"env_vars": env_vars}, **kwargs)
    except Exception as e:  # noqa: BLE001 - e.g. dashboard deps missing: run without, say so
        if ray.is_initialized():
            ray.shutdown()
        first = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
        print(f"[cacr] warning: Ray with dashboard failed to start ({first}); without it, workers "
              "of a crashed or stopped run may not be freed (ray#54305)", flush=True)
        env_vars.pop(STATE_API_ENV)
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 runtime_env={"env_vars": env_vars} if env_vars else None, **kwargs)
        return None
    actual = dashboard_url()
    if actual and actual != env_vars[STATE_API_ENV]:  # the dashboard moved to another port (taken)
        print(f"[cacr] note: the dashboard runs at {actual}, not {env_vars[STATE_API_ENV]}; our "
              "processes get the right address, other jobs' processes may not", flush=True)
    return actual


def dashboard_url(wait_s: float = 15.0) -> str | None:
    """The running dashboard's address as registered in the GCS (what the State API client
    looks up for an explicit cluster address), or None if there is no dashboard."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    deadline = time.monotonic() + wait_s
    while True:
        try:
            v = _internal_kv_get(ray_constants.DASHBOARD_ADDRESS,
                                 namespace=ray_constants.KV_NAMESPACE_DASHBOARD)
        except Exception:  # noqa: BLE001
            v = None
        if v:
            v = v.decode() if isinstance(v, bytes) else str(v)
            return v if "://" in v else f"http://{v}"
        if time.monotonic() > deadline:
            return None
        time.sleep(0.5)
