"""Starting or joining Ray: the ONE way every command (and the test fixture) does it.

    started = start_ray(num_cpus=..., use_gpu=..., log_level=..., dashboard=True)
    ...
    if started: ray.shutdown()

Rules, the same for `cacr train`, `tune`, `evaluate`, `inspect` and `prepare --parallel ray`:

* ``RAY_ADDRESS`` set (a cluster, ``ray job submit``): join that cluster.
* Otherwise start a NEW local instance (``address="local"``), never a bare ``ray.init()``: that
  would join a cluster left by ``ray start`` on this machine by accident (and refuse our CPU
  count). Logical CPUs are over-declared on small machines on purpose: Ray CPUs are scheduling
  slots, and starving Ray Data's decode tasks of slots would deadlock training.
* ``use_gpu`` on a machine without a CUDA GPU fails in one line BEFORE Ray starts (a local
  instance); on a cluster :func:`check_resources` says so once Ray is up (:func:`check_resources`
  is shared by train and tune: the workers of one run must fit the cluster).

Two things a laptop user would otherwise trip over:

* The dashboard is ON for commands that run Ray Train. Train V2's detached
  ``PlacementGroupCleaner`` asks Ray's State API (served by the dashboard) whether the Train
  controller is still alive; without it the cleaner prints a warning every second and cannot free
  the workers of a controller that died (a Tune trial stopped by ASHA, a killed driver:
  ray#54305). The State API client finds the cluster from ``RAY_API_SERVER_ADDRESS`` or, failing
  that, by looking for a local GCS process, which fails with "Found multiple active Ray instances"
  when another Ray runs on the machine. So every process of our job gets ``RAY_API_SERVER_ADDRESS``
  pointing at OUR dashboard (job runtime_env).
* The console is quiet by default: Ray Train logs every report and checkpoint at INFO, Ray Data
  every dataset execution, and Train's print patch sends each worker ``print`` to the console
  twice. :func:`quiet_env` turns those off (Train's own INFO lines are filtered by the RunConfig's
  ``LoggingConfig``, see :func:`pipeline.train.build_trainer`); ``log_level=info`` brings them back.

Credentials never travel in a runtime_env (Ray logs runtime_envs to disk): Ray processes get them
from the standard AWS chain on their node (see pipeline/storage.py).
"""
from __future__ import annotations

import logging
import os
import socket
import time

from pipeline import failpoints
from pipeline.config import ConfigError

STATE_API_ENV = "RAY_API_SERVER_ADDRESS"
WORKER_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


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
    feature extraction, ``cacr inspect``) log their plan and progress at INFO."""
    level = log_level.upper()
    if level in ("DEBUG", "INFO"):
        return
    import ray.data  # noqa: F401 - configures its logger on import; set the level after that

    from pipeline.ray_compat import drop_progress_bar_notice

    logging.getLogger("ray.data").setLevel(getattr(logging, level))
    drop_progress_bar_notice()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def joining_cluster() -> bool:
    """Whether :func:`start_ray` joins an existing cluster (``RAY_ADDRESS``) rather than starting one."""
    return bool(os.environ.get("RAY_ADDRESS"))


def check_local_gpus(use_gpu: bool | None, gpu_key: str = "use_gpu") -> int:
    """GPUs a NEW local Ray gets; ``use_gpu`` on a machine without one is a user error, said
    before anything else happens (no data prepared, no Ray started). Behind ``RAY_ADDRESS`` the
    cluster's GPUs count instead (checked by :func:`check_resources`): returns 0 then."""
    if joining_cluster():
        return 0
    gpus = local_gpu_count() if use_gpu is not False else 0
    if use_gpu and gpus == 0:
        raise ConfigError(f"{gpu_key}=true but this machine has no CUDA GPU (torch sees none): set "
                          f"{gpu_key}=false, or run on a GPU machine / cluster (RAY_ADDRESS)")
    return gpus


def start_ray(*, num_cpus: int | None = None, use_gpu: bool | None = False, log_level: str = "warning",
              dashboard: bool = True, env: dict[str, str] | None = None,
              log_to_driver: bool = True, gpu_key: str = "use_gpu", **kwargs) -> bool:
    """Join ``RAY_ADDRESS`` or start a new local Ray (see the module docstring).

    ``num_cpus``: logical CPUs of a local instance (at least the machine's cores). ``use_gpu``:
    True = the machine's GPUs, and an error if it has none; None = its GPUs, if any. ``env``: extra
    variables for every process of the job (never secrets). ``gpu_key`` names the option in the
    "no GPU" error. Returns True if this call started Ray (the caller shuts it down), False if Ray
    was already initialised in this process or a cluster was joined."""
    import ray

    quiet_driver(log_level)
    if ray.is_initialized():
        return False
    os.environ.setdefault(WORKER_START_TIMEOUT_ENV, "120")
    if joining_cluster():
        ray.init(log_to_driver=log_to_driver, **kwargs)
        return False
    gpus = check_local_gpus(use_gpu, gpu_key)
    failpoints.note_driver()  # tests only: the process a fault-injection point kills
    cpus = max(os.cpu_count() or 1, int(num_cpus or 0))
    job_env = {**quiet_env(log_level), **(env or {})}
    if dashboard:
        _init_with_dashboard(cpus, gpus, job_env, log_to_driver=log_to_driver, **kwargs)
    else:
        _init(address="local", num_cpus=cpus, num_gpus=gpus, include_dashboard=False,
              log_to_driver=log_to_driver, runtime_env={"env_vars": job_env} if job_env else None,
              **kwargs)
    return True


START_ATTEMPTS = 3
_START_TIMEOUT = "timed out during startup"


def _init(**kwargs) -> None:
    """``ray.init`` that tries again when a NEW local node times out starting: Ray waits a fixed
    30 s for the raylet to register (ray/_private/node.py), which a busy laptop or CI machine can
    miss; another try usually succeeds. Anything else raises at once."""
    import ray
    import psutil  # vendored by Ray: importable once `import ray` put ray/thirdparty_files on sys.path

    for attempt in range(1, START_ATTEMPTS + 1):
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        try:
            ray.init(**kwargs)
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this case
            if _START_TIMEOUT not in str(e) or attempt == START_ATTEMPTS:
                raise
            if ray.is_initialized():
                ray.shutdown()
            _kill_new_children(before)  # the half-started node's GCS / raylet / agents
            print(f"[cacr] the local Ray node was slow to start (busy machine); trying again "
                  f"({attempt + 1}/{START_ATTEMPTS})", flush=True)


def _kill_new_children(before: set[int]) -> None:
    import ray  # noqa: F401 - puts Ray's vendored psutil on sys.path
    import psutil

    new = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    for p in new:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(new, timeout=10)


def _init_with_dashboard(num_cpus: int, num_gpus: int, env_vars: dict[str, str], **kwargs) -> str | None:
    """A new local Ray WITH the dashboard on a free port, every process of this job pinned to it.
    Returns the dashboard URL, or None if the dashboard could not start (then a crashed
    controller's placement group may leak; said on the console)."""
    import ray

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env_vars = {**env_vars, STATE_API_ENV: os.environ.get(STATE_API_ENV) or url}
    try:
        _init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=True,
              dashboard_port=port, runtime_env={"env_vars": env_vars}, **kwargs)
    except Exception as e:  # noqa: BLE001 - e.g. dashboard deps missing: run without, say so
        if ray.is_initialized():
            ray.shutdown()
        first = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
        print(f"[cacr] warning: Ray with dashboard failed to start ({first}); without it, workers "
              "of a crashed or stopped run may not be freed (ray#54305)", flush=True)
        env_vars.pop(STATE_API_ENV)
        _init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
              runtime_env={"env_vars": env_vars} if env_vars else None, **kwargs)
        return None
    actual = dashboard_url()
    if actual and actual != env_vars[STATE_API_ENV]:  # the dashboard moved to another port (taken)
        print(f"[cacr] note: the dashboard runs at {actual}, not {env_vars[STATE_API_ENV]}; our "
              "processes get the right address, other jobs' processes may not", flush=True)
    return actual


def dashboard_url(wait_s: float = 15.0) -> str | None:
    """The running dashboard's address (waits up to ``wait_s`` for it to register), or None."""
    from pipeline.ray_compat import dashboard_address

    deadline = time.monotonic() + wait_s
    while True:
        try:
            v = dashboard_address()
        except Exception:  # noqa: BLE001 - GCS not answering yet
            v = None
        if v or time.monotonic() > deadline:
            return v
        time.sleep(0.5)


def check_resources(*, num_workers: int, cpus_per_worker: float, use_gpu: bool, data_cpus: float,
                    concurrency: int = 1, key_prefix: str = "", what: str = "run",
                    timeout_s: float | None = None) -> int:
    """Raise ConfigError if the workers of one run (a train run, one Tune trial) can never be
    placed on the running cluster; return how many runs fit at a time (at most ``concurrency``).

    Only on a fixed cluster (a local instance): behind ``RAY_ADDRESS`` an autoscaler may add the
    nodes, so there we only warn and rely on the worker-group start timeout."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    total_cpu = sum(r.get("CPU", 0) for r in nodes)
    total_gpu = sum(r.get("GPU", 0) for r in nodes)
    max_cpu = max((r.get("CPU", 0) for r in nodes), default=0)
    max_gpu = max((r.get("GPU", 0) for r in nodes), default=0)
    w, cpw = num_workers, cpus_per_worker
    run_cpu, run_gpu = w * cpw, (w if use_gpu else 0)
    problems = []
    if cpw > max_cpu:
        problems.append(f"a worker needs {cpw} CPU but the largest node has {max_cpu}")
    if use_gpu and max_gpu < 1:
        problems.append(f"{key_prefix}use_gpu is set but the cluster has no GPU")
    if run_cpu + data_cpus > total_cpu:
        problems.append(f"one {what} needs {w} workers x {cpw} CPU + {data_cpus} CPU for data decoding "
                        f"but the cluster has {total_cpu:g} CPU")
    if run_gpu > total_gpu:
        problems.append(f"one {what} needs {run_gpu} GPU but the cluster has {total_gpu:g}")
    autoscaling = joining_cluster()
    if problems:
        msg = (f"per-{what} resources cannot be satisfied: " + "; ".join(problems)
               + f": lower {key_prefix}num_workers / {key_prefix}cpus_per_worker "
                 f"(or {key_prefix}use_gpu=false)")
        if not autoscaling:
            raise ConfigError(msg)
        wait = f"{timeout_s:g} s" if timeout_s else f"${WORKER_START_TIMEOUT_ENV} s"
        print(f"[cacr] warning: {msg} - waiting for the autoscaler (fails after {wait} without "
              "workers)", flush=True)
        return concurrency
    fits = int((total_cpu - data_cpus) // run_cpu) if run_cpu > 0 else concurrency
    if run_gpu:
        fits = min(fits, int(total_gpu // run_gpu))
    if autoscaling or fits >= concurrency:
        return concurrency
    print(f"[cacr] the cluster fits {fits} {what}(s) of {w} x {cpw} CPU"
          f"{f' + {run_gpu} GPU' if run_gpu else ''} at a time: max_concurrent_trials "
          f"{concurrency} -> {fits}", flush=True)
    return max(1, fits)
