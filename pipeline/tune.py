"""`cacr tune`: hyperparameter search with Ray Tune, where every trial is a distributed training run.

Ray Train V2 under Tune: a function trainable (:func:`_trial`) builds a ``TorchTrainer`` for its
sampled config and fits it; ``TuneReportCallback`` forwards rank 0's per-epoch metrics to Tune, so
ASHA can stop a trial between epochs (time axis: ``epoch``).

Resources. The Tune trial itself reserves almost nothing (it only waits on its Train controller); the
Train workers reserve ``num_workers x cpus_per_worker`` CPUs (+ a GPU each with ``use_gpu``) in a
placement group. Before the first trial we check that one trial fits the cluster at all (a clear
:class:`ConfigError`, not a trial waiting forever) and lower the concurrency to what fits; a trial
whose workers still cannot start fails after ``trial_start_timeout_s`` instead of hanging.

A trial stopped by ASHA is killed together with its Train controller; the controller's placement
group is then removed by Train's detached ``PlacementGroupCleaner``, which finds out that the
controller died through Ray's State API - the dashboard (ray[default]). The State API client
resolves the cluster from ``RAY_API_SERVER_ADDRESS``/``RAY_ADDRESS`` or, failing both, by
looking for a local GCS process, which raises "Found multiple active Ray instances" when several
Ray instances run on one machine; the cleaner's monitor thread then dies and the stopped trial's
placement group leaks (ray#54305). So we pin ``RAY_API_SERVER_ADDRESS`` to OUR dashboard for
every process of the search: in the job's runtime_env when we start Ray, and through the trial
actors' runtime_env (which the Train controller and the cleaner inherit) when Ray was already up.

Search directory layout (local or s3://):
    <storage_path>/<name>/                   Tune's experiment state (re-run with the same name resumes)
    <storage_path>/<name>/search.yaml        the resolved search (a resume must match it)
    <storage_path>/<name>/trials/<trial>/    each trial's Train run: checkpoints + tensorboard/
    <storage_path>/<name>/best_config.yaml   runs as is with `cacr train --config`
    <storage_path>/<name>/summary.json       the final table + summary
``tensorboard --logdir <storage_path>/<name>/trials`` shows one run per trial + the HParams view.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from pipeline.config import (Config, ConfigError, _check_tree, apply_flat, from_dict, load_yaml,
                             parse_override, set_key, to_dict)
from pipeline.console import finite_or_none, json_line
from pipeline.ray_local import STATE_API_ENV, dashboard_url, init_local_ray, quiet_env

SPACE_TYPES = ("choice", "grid", "uniform", "loguniform", "randint")
METRICS = {"knn_top1": "max", "loss": "min", "samples_per_s": "max", "epoch_time_s": "min"}
# Keys a trial cannot vary: the run identity, the ASHA time axis, and the per-trial resources
# (the resource check and the concurrency are computed once for the whole search).
FIXED_KEYS = ("name", "storage_path", "epochs", "num_workers", "cpus_per_worker", "use_gpu")
# The Tune trial actor only waits on its Train controller; Tune refuses an empty request.
TRIAL_DRIVER_CPU = 0.01


@dataclass
class SchedulerConfig:
    name: str = field(default="asha", metadata={"choices": ("asha", "fifo")})
    grace_period: int = 1      # epochs every trial runs before ASHA may stop it
    reduction_factor: float = 2.0


@dataclass
class TuneConfig:
    name: str = "search"
    base_config: str | None = None   # training YAML, relative to this file (or cwd); null: defaults
    train: dict = field(default_factory=dict)          # overrides of the base training config
    search_space: dict = field(default_factory=dict)   # dotted key -> {type, values | low/high}
    metric: str = "knn_top1"
    mode: str | None = None          # max | min; default: max for knn_top1, min for loss
    num_samples: int = 4             # samples of the random part (x every grid combination)
    max_concurrent_trials: int = 2
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    storage_path: str = "./runs/tune"
    trial_start_timeout_s: int = 120   # a trial's workers must start within this, or the trial errors
    verbose: int = 1                   # Tune's progress output (0 silent, 1 status, 2 + results)


class TrialDiverged(RuntimeError):
    """A trial's loss became NaN/inf (reported as DIVERGED; the search goes on)."""


# ---------------------------------------------------------------------------------------------
# Config


def _space(key: str, spec: Any):
    from ray import tune

    if not isinstance(spec, dict) or spec.get("type") not in SPACE_TYPES:
        raise ConfigError(f"search_space '{key}': expected {{type: {' | '.join(SPACE_TYPES)}, ...}}, "
                          f"got {spec!r}")
    t = spec["type"]
    extra = set(spec) - ({"type", "values"} if t in ("choice", "grid") else {"type", "low", "high"})
    if extra:
        raise ConfigError(f"search_space '{key}': unknown field(s) {sorted(extra)} for type {t}")
    if t in ("choice", "grid"):
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"search_space '{key}': type {t} needs 'values', a non-empty list")
        return tune.choice(values) if t == "choice" else tune.grid_search(values)
    try:
        low, high = float(spec["low"]), float(spec["high"])
    except KeyError as e:
        raise ConfigError(f"search_space '{key}': type {t} needs {e.args[0]!r}") from None
    except (TypeError, ValueError):
        raise ConfigError(f"search_space '{key}': 'low' and 'high' must be numbers") from None
    if not low < high or (t == "loguniform" and low <= 0):
        raise ConfigError(f"search_space '{key}': need low < high (and low > 0 for loguniform), "
                          f"got [{low}, {high}]")
    if t == "uniform":
        return tune.uniform(low, high)
    if t == "loguniform":
        return tune.loguniform(low, high)
    return tune.randint(int(low), int(high))  # high exclusive, as in Ray Tune


def _candidates(spec: dict) -> list[Any]:
    """Values of a search-space entry worth validating before Ray starts (all listed, both ends)."""
    if spec["type"] in ("choice", "grid"):
        return list(spec["values"])
    if spec["type"] == "randint":
        return [int(spec["low"]), int(spec["high"]) - 1]
    return [float(spec["low"]), float(spec["high"])]


def _join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def _abs_local(url: str) -> str:
    return url if "://" in url else os.path.abspath(os.path.expanduser(url))


def load_tune_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> tuple[TuneConfig, Config]:
    """Tune YAML + overrides (``num_samples=8``, ``train.epochs=3``) -> (TuneConfig, base Config).

    Every search-space key and value is checked against the training config (name, type, range)
    before Ray starts, so a typo fails in a second rather than after the first trial.
    """
    if not path:
        raise ConfigError("cacr tune needs --config FILE (e.g. conf/tune/digits.yaml)")
    raw = load_yaml(path)
    tc = from_dict(TuneConfig, raw)
    for ov in overrides:
        k, v = parse_override(ov)
        if k.startswith("train."):
            tc.train[k[len("train."):]] = v
        else:
            set_key(tc, k, v)
    _check_tree(tc, "")
    if not tc.name or "/" in tc.name:
        raise ConfigError(f"tune config key 'name' = {tc.name!r}: a non-empty name without '/'")
    if tc.num_samples < 1 or tc.max_concurrent_trials < 1:
        raise ConfigError("tune config: num_samples and max_concurrent_trials must be >= 1")
    if tc.trial_start_timeout_s < 1:
        raise ConfigError("tune config key 'trial_start_timeout_s' must be >= 1")
    if tc.scheduler.grace_period < 1 or tc.scheduler.reduction_factor <= 1:
        raise ConfigError("tune config: scheduler.grace_period must be >= 1 and "
                          "scheduler.reduction_factor > 1")
    if tc.metric not in METRICS:
        raise ConfigError(f"tune config key 'metric' = {tc.metric!r}: one of {', '.join(METRICS)}")
    tc.mode = tc.mode or METRICS[tc.metric]
    if tc.mode not in ("max", "min"):
        raise ConfigError(f"tune config key 'mode' = {tc.mode!r}: max or min")
    if not isinstance(tc.search_space, dict) or not tc.search_space:
        raise ConfigError("tune config key 'search_space': give at least one key, e.g. "
                          "optim.base_lr: {type: loguniform, low: 0.01, high: 1.0}")

    base: dict[str, Any] = {}
    if tc.base_config:
        p = Path(tc.base_config)
        if not p.is_absolute() and not p.exists():
            p = Path(path).parent / tc.base_config
        if not p.exists():
            raise ConfigError(f"tune config key 'base_config': '{tc.base_config}' does not exist")
        base = load_yaml(p)
    cfg = from_dict(Config, base)
    for k, v in tc.train.items():
        try:
            set_key(cfg, k, v)
        except ConfigError as e:
            raise ConfigError(f"tune config 'train': {e}") from None
    cfg.validate()

    for key, spec in tc.search_space.items():
        if key in FIXED_KEYS:
            raise ConfigError(f"search_space '{key}': cannot vary per trial; set it for the whole "
                              f"search as train.{key}")
        _space(key, spec)
        for value in _candidates(spec):
            try:
                apply_flat(cfg, {key: value})
            except ConfigError as e:
                raise ConfigError(f"search_space '{key}' value {value!r}: {e}") from None
    if tc.scheduler.name == "asha" and tc.scheduler.grace_period > cfg.epochs:
        raise ConfigError(f"scheduler.grace_period ({tc.scheduler.grace_period}) > train epochs "
                          f"({cfg.epochs}): ASHA could never stop a trial")
    if tc.metric == "knn_top1" and not cfg.data.val_split:
        raise ConfigError("metric knn_top1 needs the kNN monitor: set train.data.val_split "
                          "(or use metric: loss)")
    return tc, cfg


# ---------------------------------------------------------------------------------------------
# Trial (runs in a Tune actor)


def _plain(v: Any) -> Any:
    """numpy scalars (Tune's randint/choice samples) -> Python values for the typed config."""
    return v.item() if hasattr(v, "item") and not isinstance(v, (list, dict, str)) else v


def _error_line(err: BaseException | str | None) -> str | None:
    """The most telling line of a (wrapped, multi-line) trial error."""
    if err is None:
        return None
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for needle in ("loss diverged", "Timeout", "timed out", "Error:"):
        hits = [ln for ln in lines if needle in ln]
        if hits:
            return hits[-1][:200]
    return (lines[-1] if lines else type(err).__name__)[:200]


def _trial(params: dict[str, Any], *, base: dict, trials_url: str, train_scan=None,
           val_scan=None) -> None:
    """One Tune trial: a full Ray Train run of the sampled config, named after the trial."""
    import ray.tune
    from ray.data import DataContext
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get, _internal_kv_put
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.train import DataPlan, build_trainer

    ctx = DataContext.get_current()  # N concurrent trials' progress bars would be noise
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    cfg = apply_flat(from_dict(Config, base), {k: _plain(v) for k, v in params.items()})
    cfg.name = ray.tune.get_context().get_trial_name()
    plan = None
    if train_scan is not None:  # the driver scanned the shards once; steps depend on the batch
        plan = DataPlan(train_scan, val_scan, max(1, train_scan.rows // cfg.global_batch))
        if train_scan.rows < cfg.global_batch:
            raise ConfigError(f"batch_size {cfg.batch_size} x {cfg.num_workers} workers exceeds the "
                              f"{train_scan.rows} training samples")
    class ForwardToTune(TuneReportCallback):
        """TuneReportCallback (runs in the Train controller) that also notes that it reported."""

        def __init__(self, key: bytes):
            super().__init__()
            self.key = key

        def after_report(self, run_context, metrics, checkpoint):
            super().after_report(run_context, metrics, checkpoint)
            _internal_kv_put(self.key, b"1")

    key = f"cacr:tune:reported:{cfg.name}:{uuid.uuid4().hex}".encode()
    trainer, _, _ = build_trainer(cfg, callbacks=[ForwardToTune(key)], storage_path=trials_url,
                                  plan=plan)
    try:
        result = trainer.fit()
    except Exception as e:  # noqa: BLE001 - classify, keep the cause
        line = _error_line(e) or ""
        if "loss diverged" in line or "FloatingPointError" in str(e):
            raise TrialDiverged(line) from None
        raise
    # A resumed trial whose Train run had already finished (killed after its last checkpoint,
    # before Tune saw the report) reports nothing: give Tune the final metrics once more.
    if not _internal_kv_get(key) and result.metrics:
        ray.tune.report({k: v for k, v in result.metrics.items() if k != "checkpoint_path"})
    _internal_kv_del(key)


# ---------------------------------------------------------------------------------------------
# Ray


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the search (the caller's process may run
    other Ray work afterwards: pytest, a notebook)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _propagate_to_trials(var: str) -> None:
    """Have Tune put ``var`` (from the driver's environment) into the trial actors' runtime_env;
    the Train controller and the detached cleaner inherit it from there. Tune only forwards a
    fixed set of variables (ray/tune/execution/class_cache.py), so ``var`` is added to it."""
    try:
        from ray.tune.execution import class_cache
    except ImportError:  # pragma: no cover - a Ray without it; the job runtime_env still applies
        return
    names = getattr(class_cache, "ENV_VARS_TO_PROPAGATE", None)
    if isinstance(names, set):
        names.add(var)


def _check_resources(base: Config, tc: TuneConfig, data_cpus: float) -> int:
    """Raise ConfigError if one trial can never be placed; return the concurrency that fits.

    Only on a fixed cluster (a local instance): behind ``RAY_ADDRESS`` an autoscaler may add the
    nodes, so there we only warn and rely on ``trial_start_timeout_s``."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    total_cpu = sum(r.get("CPU", 0) for r in nodes)
    total_gpu = sum(r.get("GPU", 0) for r in nodes)
    max_cpu = max((r.get("CPU", 0) for r in nodes), default=0)
    max_gpu = max((r.get("GPU", 0) for r in nodes), default=0)
    w, cpw = base.num_workers, base.cpus_per_worker
    trial_cpu, trial_gpu = w * cpw, (w if base.use_gpu else 0)
    problems = []
    if cpw > max_cpu:
        problems.append(f"a worker needs {cpw} CPU but the largest node has {max_cpu}")
    if base.use_gpu and max_gpu < 1:
        problems.append("use_gpu is set but the cluster has no GPU")
    if trial_cpu + data_cpus > total_cpu:
        problems.append(f"one trial needs {w} workers x {cpw} CPU + {data_cpus} CPU for data decoding "
                        f"but the cluster has {total_cpu:g} CPU")
    if trial_gpu > total_gpu:
        problems.append(f"one trial needs {trial_gpu} GPU but the cluster has {total_gpu:g}")
    autoscaling = bool(os.environ.get("RAY_ADDRESS"))
    if problems:
        msg = ("per-trial resources cannot be satisfied: " + "; ".join(problems)
               + ": lower train.num_workers / train.cpus_per_worker (or train.use_gpu=false)")
        if not autoscaling:
            raise ConfigError(msg)
        print(f"[cacr] warning: {msg} - waiting for the autoscaler (trials fail after "
              f"{tc.trial_start_timeout_s} s without workers)", flush=True)
        return tc.max_concurrent_trials
    fits = int((total_cpu - data_cpus) // trial_cpu) if trial_cpu > 0 else tc.max_concurrent_trials
    if trial_gpu:
        fits = min(fits, int(total_gpu // trial_gpu))
    if autoscaling or fits >= tc.max_concurrent_trials:
        return tc.max_concurrent_trials
    print(f"[cacr] the cluster fits {fits} trial(s) of {w} x {cpw} CPU"
          f"{f' + {trial_gpu} GPU' if trial_gpu else ''} at a time: max_concurrent_trials "
          f"{tc.max_concurrent_trials} -> {fits}", flush=True)
    return max(1, fits)


# ---------------------------------------------------------------------------------------------
# Search


def _search_record(tc: TuneConfig, base: Config) -> dict[str, Any]:
    return {"search_space": tc.search_space, "metric": tc.metric, "mode": tc.mode,
            "num_samples": tc.num_samples, "scheduler": to_dict(tc.scheduler),
            "train": to_dict(base)}


def run_tune(path: str, overrides: list[str] | tuple[str, ...] = (), *,
             callbacks: list | None = None) -> dict[str, Any]:
    """Run (or resume) a search; prints the trial table and, last, one JSON line. ``callbacks``:
    extra Ray Tune callbacks for a new search (tests use one to interrupt it)."""
    import ray
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from pipeline import storage
    from pipeline.train import plan_data

    t0 = time.perf_counter()
    tc, base = load_tune_config(path, overrides)
    # Trials chdir into their own directories: make local paths absolute first (the YAML we write
    # for the best trial keeps the paths as the user gave them).
    run_base = from_dict(Config, to_dict(base))
    run_base.data.url = _abs_local(run_base.data.url)
    run_base.storage_path = _abs_local(run_base.storage_path)
    storage_url = _abs_local(tc.storage_path)
    search_url = _join(storage_url, tc.name)
    trials_url = _join(search_url, "trials")
    remote = "://" in storage_url
    if remote:
        storage.check_location(storage_url, base.storage, must_exist=False)

    # Prepare the embedded default once here (not racing in every trial) and scan the shards once.
    plan = plan_data(run_base)
    if tc.metric == "knn_top1" and plan.val_scan is None:
        raise ConfigError(f"metric knn_top1 needs a labelled '{base.data.val_split}' split in "
                          f"{base.data.url} (or use metric: loss)")

    started_ray = not ray.is_initialized()
    if started_ray:
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=True)
        else:
            need = tc.max_concurrent_trials * (base.num_workers * base.cpus_per_worker + 1) + 1
            import torch

            init_local_ray(int(max(os.cpu_count() or 1, math.ceil(need))),
                           num_gpus=torch.cuda.device_count() if base.use_gpu else 0,
                           env=quiet_env(base.log_level), log_to_driver=True)
    concurrency = _check_resources(base, tc, data_cpus=base.data.decode_num_cpus + TRIAL_DRIVER_CPU)
    dashboard = os.environ.get(STATE_API_ENV) or dashboard_url()
    if dashboard is None:
        print("[cacr] warning: the Ray dashboard is not running: trials stopped early may not free "
              "their workers (Train's placement-group cleaner needs the State API, ray#54305)",
              flush=True)
    env = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S":
           os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S") or str(tc.trial_start_timeout_s)}
    if dashboard:
        env[STATE_API_ENV] = dashboard
        _propagate_to_trials(STATE_API_ENV)
    # Tune's automatic TensorBoard logger would write a second, metrics-only copy of every trial
    # into Tune's staging dir and print a `tensorboard --logdir /tmp/ray/...` line that is not the
    # one to use; the trials' own TensorBoard (with the HParams view) is under trials/. Tune's CSV
    # and JSON result files stay (its ExperimentAnalysis reads them).
    env["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"

    fs, fs_path = storage.arrow_fs(storage_url, base.storage) if remote else (None, storage_url)
    exp_path = fs_path.rstrip("/") + "/" + tc.name
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=to_dict(run_base), trials_url=trials_url,
                             train_scan=plan.train_scan, val_scan=plan.val_scan),
        {"CPU": TRIAL_DRIVER_CPU})
    record = _search_record(tc, base)
    resumed = tune.Tuner.can_restore(exp_path, storage_filesystem=fs)
    if resumed:
        stored = _read_text(_join(search_url, "search.yaml"), base)
        if stored is not None and yaml.safe_load(stored) != json.loads(json.dumps(record)):
            raise ConfigError(f"search '{tc.name}' exists at {search_url} with a different search space "
                              "or training config: re-run it unchanged to resume, or pick a new name=")
        print(f"[cacr] resuming search '{tc.name}' from {search_url}", flush=True)
        tuner = tune.Tuner.restore(exp_path, trainable, storage_filesystem=fs, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    else:
        _write_text(_join(search_url, "search.yaml"), yaml.safe_dump(record, sort_keys=False), base)
        scheduler = (ASHAScheduler(time_attr="epoch", max_t=base.epochs,
                                   grace_period=tc.scheduler.grace_period,
                                   reduction_factor=tc.scheduler.reduction_factor)
                     if tc.scheduler.name == "asha" else FIFOScheduler())
        tuner = tune.Tuner(
            trainable,
            param_space={k: _space(k, s) for k, s in tc.search_space.items()},
            tune_config=tune.TuneConfig(
                metric=tc.metric, mode=tc.mode, num_samples=tc.num_samples,
                max_concurrent_trials=concurrency, scheduler=scheduler,
                trial_name_creator=lambda t: f"trial_{t.trial_id}",
                trial_dirname_creator=lambda t: f"trial_{t.trial_id}"),
            run_config=tune.RunConfig(name=tc.name, storage_path=fs_path, storage_filesystem=fs,
                                      verbose=tc.verbose,
                                      callbacks=[CSVLoggerCallback(), JsonLoggerCallback(),
                                                 *(callbacks or [])]),
        )
        print(f"[cacr] search '{tc.name}': {len(tc.search_space)} keys, num_samples {tc.num_samples}, "
              f"{concurrency} trial(s) at a time, scheduler {tc.scheduler.name}, metric {tc.metric} "
              f"({tc.mode})", flush=True)
    print(f"[cacr] watch it: tensorboard --logdir {trials_url}", flush=True)
    with _env(env):
        grid = tuner.fit()
    summary = _summarise(grid, tc, base, search_url, trials_url, resumed=resumed,
                         saved=_saved_statuses(exp_path, fs), wall_s=time.perf_counter() - t0)
    if started_ray:
        ray.shutdown()  # no late worker log line after the JSON line
    summary = finite_or_none(summary)  # what is printed is what is returned: null, never NaN
    print(json_line(summary), flush=True)
    return summary


def _saved_statuses(exp_path: str, fs) -> dict[str, str]:
    """trial_id -> status in the experiment state Tune saved last. After an interruption (Ctrl-C,
    SIGUSR1) Tune saves the state BEFORE stopping the trials, so the interrupted ones are saved
    as RUNNING/PENDING (what a resume runs) while the live objects already read TERMINATED."""
    from ray.tune import ExperimentAnalysis

    try:
        return {t.trial_id: t.status for t in ExperimentAnalysis(exp_path, storage_filesystem=fs).trials}
    except Exception as e:  # noqa: BLE001 - the summary then relies on the live statuses
        print(f"[cacr] warning: cannot read the saved search state: {_error_line(e)}", flush=True)
        return {}


# ---------------------------------------------------------------------------------------------
# Summary


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _summarise(grid, tc: TuneConfig, base: Config, search_url: str, trials_url: str, *,
               resumed: bool, saved: dict[str, str], wall_s: float) -> dict[str, Any]:
    trials = getattr(getattr(grid, "_experiment_analysis", None), "trials", None) or []
    results = list(grid)
    rows: list[dict[str, Any]] = []
    for i, r in enumerate(results):
        trial = trials[i] if i < len(trials) else None
        m = r.metrics or {}
        params = {k: _plain(v) for k, v in (r.config or {}).items()}
        epochs = int(m.get("epoch") or 0)
        value, loss = m.get(tc.metric), m.get("loss")
        trial_id = getattr(trial, "trial_id", None)
        ray_status = saved.get(trial_id) or getattr(trial, "status", None)
        err = _error_line(r.error)
        if r.error is not None:
            diverged = "TrialDiverged" in repr(r.error) or "loss diverged" in str(r.error)
            status = "DIVERGED" if diverged else "ERROR"
        elif ray_status not in (None, "TERMINATED"):
            status = "UNFINISHED"  # the search was interrupted: a re-run resumes it
        elif loss is not None and not _finite(loss):
            status = "DIVERGED"
        elif epochs < base.epochs:
            status = "STOPPED"     # by the scheduler
        else:
            status = "DONE"
        name = f"trial_{trial_id}" if trial_id else (r.path or "?").rstrip("/").rsplit("/", 1)[-1]
        rows.append({"trial": name, "status": status, "epochs": epochs, "step": m.get("step"),
                     tc.metric: value if _finite(value) else None,
                     "loss": loss if _finite(loss) else None,
                     "resumed_from_epoch": m.get("resumed_from_epoch"), "params": params, "error": err})

    ok = [row for row in rows if row["status"] in ("DONE", "STOPPED") and row[tc.metric] is not None]
    best = (max if tc.mode == "max" else min)(ok, key=lambda row: row[tc.metric]) if ok else None

    keys = list(tc.search_space)
    header = ["trial", "status", "epochs", tc.metric, *keys]
    table = [header] + [[_fmt(row["trial"]), row["status"], _fmt(row["epochs"]), _fmt(row[tc.metric]),
                         *[_fmt(row["params"].get(k)) for k in keys]] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    print("\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table),
          flush=True)
    for row in rows:
        if row["error"]:
            print(f"[cacr] {row['trial']} {row['status']}: {row['error']}", flush=True)

    count = {s: sum(row["status"] == s for row in rows)
             for s in ("DONE", "STOPPED", "DIVERGED", "ERROR", "UNFINISHED")}
    best_config_url = None
    if best is not None:
        best_cfg = apply_flat(base, best["params"])
        best_cfg.name = None
        best_config_url = _join(search_url, "best_config.yaml")
        text = (f"# Best trial of search '{tc.name}': {best['trial']} ({tc.metric} = "
                f"{best[tc.metric]:.4f} after {best['epochs']} epochs; {best['params']}).\n"
                f"# Run it: cacr train --config best_config.yaml [key=value ...]\n"
                + yaml.safe_dump(to_dict(best_cfg), sort_keys=False))
        _write_text(best_config_url, text, base)
    if count["UNFINISHED"]:
        print(f"[cacr] search interrupted with {count['UNFINISHED']} unfinished trial(s): re-run the "
              "same command to resume it", flush=True)
    summary = {
        "best_config": best_config_url, "best_metric": best[tc.metric] if best else None,
        "best_params": best["params"] if best else None, "best_trial": best["trial"] if best else None,
        "metric": tc.metric, "mode": tc.mode, "trials": len(rows), "completed": count["DONE"],
        "stopped_early": count["STOPPED"], "errored": count["ERROR"] + count["DIVERGED"],
        "diverged": count["DIVERGED"], "unfinished": count["UNFINISHED"],
        "interrupted": bool(count["UNFINISHED"]), "resumed": resumed,
        "search_dir": search_url, "tensorboard_logdir": trials_url, "wall_s": round(wall_s, 1),
        "trial_table": [{k: v for k, v in row.items()} for row in rows],
    }
    _write_text(_join(search_url, "summary.json"),
                json.dumps(finite_or_none(summary), indent=1, default=str, allow_nan=False), base)
    return summary


def _read_text(url: str, cfg: Config) -> str | None:
    if "://" not in url:
        p = Path(url)
        return p.read_text() if p.is_file() else None
    from pipeline import storage

    fs, path = storage.fsspec_fs(url, cfg.storage)
    return fs.cat(path).decode() if fs.exists(path) else None


def _write_text(url: str, text: str, cfg: Config) -> None:
    if "://" not in url:
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        Path(url).write_text(text)
        return
    from pipeline import storage

    fs, path = storage.fsspec_fs(url, cfg.storage)
    with fs.open(path, "w") as f:
        f.write(text)
