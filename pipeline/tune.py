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

Credentials never travel in a runtime_env: Ray logs every runtime_env it sets up under its temp
directory, and Tune would copy the AWS variables into each trial's by default. We take them out of
Tune's list (:func:`pipeline.ray_compat.tune_stop_forwarding_secrets`); trials and their workers
get credentials from the standard AWS chain on their node (the raylet's environment - for a local
Ray the driver's -, the shared credentials/config files, the instance role or IRSA).

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
import dataclasses
import json
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

import yaml

from pipeline import ray_compat, storage
from pipeline.config import (Config, ConfigError, _check_tree, apply_flat, from_dict, leaf_keys,
                             load_yaml, parse_override, set_key, suggest_key, to_dict)
from pipeline.console import finite_or_none, json_line
from pipeline.ray_start import STATE_API_ENV, check_resources, dashboard_url, start_ray

SPACE_TYPES = ("choice", "grid", "uniform", "loguniform", "randint")
METRICS = {"knn_top1": "max", "loss": "min", "samples_per_s": "max", "epoch_time_s": "min"}
# Keys a trial cannot vary: the run identity, the ASHA time axis, and the per-trial resources
# (the resource check and the concurrency are computed once for the whole search).
FIXED_KEYS = ("name", "storage_path", "epochs", "num_workers", "cpus_per_worker", "use_gpu")
# The Tune trial actor only waits on its Train controller; Tune refuses an empty request.
TRIAL_DRIVER_CPU = 0.01


def _h(default: Any, help: str, **meta: Any) -> Any:
    if isinstance(default, dict):
        return field(default_factory=dict, metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class SchedulerConfig:
    name: str = _h("asha", "trial scheduler: ASHA stops weak trials between epochs; fifo runs all",
                   choices=("asha", "fifo"))
    grace_period: int = _h(1, "epochs every trial runs before ASHA may stop it")
    reduction_factor: float = _h(2.0, "ASHA keeps 1/reduction_factor of the trials at each rung")


@dataclass
class TuneConfig:
    name: str = _h("search", "search name; re-running with the same name resumes it")
    base_config: str | None = _h(None, "training YAML the trials start from, relative to the tune "
                                       "file (or cwd); null: the training defaults")
    train: dict = _h({}, "overrides of the base training config, also train.<key>=value "
                         "(e.g. train.epochs=3)")
    search_space: dict = _h({}, "dotted training key -> {type: choice|grid|uniform|loguniform|"
                                "randint, values: [...] | low: .., high: ..}")
    metric: str = _h("knn_top1", "metric the search optimises", choices=tuple(METRICS))
    mode: str | None = _h(None, "max | min (default: max for knn_top1, min for loss)")
    num_samples: int = _h(4, "samples of the random part (x every grid combination)")
    max_concurrent_trials: int = _h(2, "trials at a time (lowered to what the cluster fits)")
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    storage_path: str = _h("./runs/tune", "where searches live (local or s3://; trials' runs under "
                                          "<storage_path>/<name>/trials)")
    trial_start_timeout_s: int = _h(120, "a trial's workers must start within this, or it errors")
    verbose: int = _h(1, "Tune's progress output (0 silent, 1 status, 2 + results)")


def tune_keys_epilog() -> str:
    """``cacr tune --help``: the tune keys, then how to reach the training keys."""
    from pipeline.config import keys_help

    lines = [keys_help(TuneConfig, "tune keys (set in the tune YAML or as key=value):")]
    lines.append("training keys: train.<key>=value, any key `cacr train --help` lists "
                 "(e.g. train.epochs=2, train.optim.base_lr=0.1)")
    return "\n".join(lines)


def _check_tune_key(key: str) -> None:
    """Unknown tune keys fail naming the closest tune key or train.<training key>."""
    known = leaf_keys(TuneConfig)
    top = {f.name for f in dataclasses.fields(TuneConfig)}
    if key in known or key.split(".", 1)[0] in ("train", "search_space") or key in top:
        return
    train_keys = leaf_keys(Config)
    close = ("train." + key if key in train_keys else
             suggest_key(key, known + ["train." + k for k in train_keys]))
    hint = f" (did you mean '{close}'?)" if close else ""
    raise ConfigError(f"unknown tune key '{key}'{hint}; `cacr tune --help` lists the keys")


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


def load_tune_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> tuple[TuneConfig, Config]:
    """Tune YAML + overrides (``num_samples=8``, ``train.epochs=3``) -> (TuneConfig, base Config).

    Every search-space key and value is checked against the training config (name, type, range)
    before Ray starts, so a typo fails in a second rather than after the first trial.
    """
    if not path:
        raise ConfigError("cacr tune needs --config FILE (e.g. conf/tune/digits.yaml)")
    raw = load_yaml(path)
    for k in raw:
        _check_tune_key(str(k))
    for k, v in (raw.get("scheduler") or {}).items() if isinstance(raw.get("scheduler"), dict) else ():
        _check_tune_key(f"scheduler.{k}")
    tc = from_dict(TuneConfig, raw)
    for ov in overrides:
        k, v = parse_override(ov)
        _check_tune_key(k)
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
        p = tc.base_config
        if not storage.is_remote(p) and not os.path.isabs(p) and not os.path.exists(p) \
                and not storage.is_remote(path):
            p = os.path.join(os.path.dirname(path), tc.base_config)
        if storage.read_text(p) is None:
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
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.train import build_trainer, plan_steps

    ctx = DataContext.get_current()  # N concurrent trials' progress bars would be noise
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    cfg = apply_flat(from_dict(Config, base), {k: _plain(v) for k, v in params.items()})
    cfg.name = ray.tune.get_context().get_trial_name()
    # the driver scanned the shards once; the steps depend on the sampled batch size
    plan = plan_steps(cfg, train_scan, val_scan) if train_scan is not None else None
    class ForwardToTune(TuneReportCallback):
        """TuneReportCallback (runs in the Train controller) that also notes that it reported."""

        def __init__(self, key: bytes):
            super().__init__()
            self.key = key

        def after_report(self, run_context, metrics, checkpoint):
            super().after_report(run_context, metrics, checkpoint)
            ray_compat.kv_put(self.key, b"1")

    key = f"cacr:tune:reported:{cfg.name}:{uuid.uuid4().hex}".encode()
    trainer, _, _ = build_trainer(cfg, callbacks=[ForwardToTune(key)], storage_path=trials_url,
                                  plan=plan)
    from pipeline.checkpoint import remove_staging

    try:
        result = trainer.fit()
    except Exception as e:  # noqa: BLE001 - classify, keep the cause
        line = _error_line(e) or ""
        if "loss diverged" in line or "FloatingPointError" in str(e):
            raise TrialDiverged(line) from None
        raise
    finally:
        remove_staging(cfg.name)  # what workers killed during the trial left on this node
    # A resumed trial whose Train run had already finished (killed after its last checkpoint,
    # before Tune saw the report) reports nothing: give Tune the final metrics once more.
    if not ray_compat.kv_get(key) and result.metrics:
        ray.tune.report({k: v for k, v in result.metrics.items() if k != "checkpoint_path"})
    ray_compat.kv_del(key)


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


# ---------------------------------------------------------------------------------------------
# Search


def _search_record(tc: TuneConfig, base: Config) -> dict[str, Any]:
    return {"search_space": tc.search_space, "metric": tc.metric, "mode": tc.mode,
            "num_samples": tc.num_samples, "scheduler": to_dict(tc.scheduler),
            "train": to_dict(base)}


def _trial_env(tc: TuneConfig) -> dict[str, str]:
    """Variables set for the duration of the search (and copied into the trial actors), never
    secrets: the AWS variables are taken out of Tune's forwarding list here."""
    ray_compat.tune_stop_forwarding_secrets()
    dashboard = os.environ.get(STATE_API_ENV) or dashboard_url()
    if dashboard is None:
        print("[cacr] warning: the Ray dashboard is not running: trials stopped early may not free "
              "their workers (Train's placement-group cleaner needs the State API, ray#54305)",
              flush=True)
    env = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S":
           os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S") or str(tc.trial_start_timeout_s)}
    if dashboard:
        env[STATE_API_ENV] = dashboard
        ray_compat.tune_propagate_env(STATE_API_ENV)
    # Tune's automatic TensorBoard logger would write a second, metrics-only copy of every trial
    # into Tune's staging dir and print a `tensorboard --logdir /tmp/ray/...` line that is not the
    # one to use; the trials' own TensorBoard (with the HParams view) is under trials/. Tune's CSV
    # and JSON result files stay (its ExperimentAnalysis reads them).
    env["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    return env


def run_tune(path: str, overrides: list[str] | tuple[str, ...] = (), *,
             callbacks: list | None = None) -> dict[str, Any]:
    """Run (or resume) a search; prints the trial table and, last, one JSON line. ``callbacks``:
    extra Ray Tune callbacks for a new search (tests use one to interrupt it)."""
    import ray
    from ray import tune

    from pipeline.ray_start import check_local_gpus
    from pipeline.train import plan_data

    t0 = time.perf_counter()
    tc, base = load_tune_config(path, overrides)
    # User paths resolved once, here on the driver: trials chdir into Ray's directories. (The
    # YAML we write for the best trial keeps the paths as the user gave them.)
    run_base = storage.resolve_paths(base)
    storage_url = storage.resolve_url(tc.storage_path)
    search_url = storage.join_url(storage_url, tc.name)
    trials_url = storage.join_url(search_url, "trials")
    storage.check_writable(storage_url, base.storage)

    check_local_gpus(base.use_gpu, "train.use_gpu")  # before any data is prepared
    # Prepare the embedded default once here (not racing in every trial) and scan the shards once.
    plan = plan_data(run_base)
    if tc.metric == "knn_top1" and plan.val_scan is None:
        raise ConfigError(f"metric knn_top1 needs a labelled '{base.data.val_split}' split in "
                          f"{base.data.url} (or use metric: loss)")

    started_ray = start_ray(
        num_cpus=math.ceil(tc.max_concurrent_trials * (base.num_workers * base.cpus_per_worker + 1) + 1),
        use_gpu=base.use_gpu, log_level=base.log_level, gpu_key="train.use_gpu")
    concurrency = check_resources(
        num_workers=base.num_workers, cpus_per_worker=base.cpus_per_worker, use_gpu=base.use_gpu,
        data_cpus=base.data.decode_num_cpus + TRIAL_DRIVER_CPU, concurrency=tc.max_concurrent_trials,
        key_prefix="train.", what="trial", timeout_s=tc.trial_start_timeout_s)
    env = _trial_env(tc)

    if storage.is_remote(storage_url):
        fs, fs_path = storage.arrow_fs(storage_url, base.storage)
    else:
        fs, fs_path = None, storage_url
    exp_path = fs_path.rstrip("/") + "/" + tc.name
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=to_dict(run_base), trials_url=trials_url,
                             train_scan=plan.train_scan, val_scan=plan.val_scan),
        {"CPU": TRIAL_DRIVER_CPU})
    resumed = tune.Tuner.can_restore(exp_path, storage_filesystem=fs)
    if resumed:
        tuner = _restore_tuner(tc, base, trainable, exp_path, fs, search_url)
    else:
        tuner = _new_tuner(tc, base, trainable, fs, fs_path, search_url, concurrency, callbacks)
    print(f"[cacr] watch it: tensorboard --logdir {trials_url}", flush=True)
    with _env(env), _no_tune_restore_hint():
        grid = tuner.fit()
    summary = _summarise(grid, tc, base, search_url, trials_url, resumed=resumed,
                         saved=_saved_statuses(exp_path, fs), wall_s=time.perf_counter() - t0)
    if started_ray:
        ray.shutdown()  # no late worker log line after the JSON line
    if summary["interrupted"]:  # Ctrl-C / SIGTERM: Tune saved the search; the CLI says how to resume
        from pipeline.checkpoint import remove_staging
        from pipeline.signals import Interrupted

        for row in summary["trial_table"]:  # temp dirs of the trials' killed workers (this node)
            remove_staging(row["trial"])
        raise Interrupted()
    summary = finite_or_none(summary)  # what is printed is what is returned: null, never NaN
    print(json_line(summary), flush=True)
    return summary


def _restore_tuner(tc: TuneConfig, base: Config, trainable, exp_path: str, fs, search_url: str):
    """The Tuner of an interrupted search, after checking that it is the same search (same
    space, same training config: search.yaml) rather than a new one under an old name."""
    from ray import tune

    record = _search_record(tc, base)
    stored = storage.read_text(storage.join_url(search_url, "search.yaml"), base.storage)
    if stored is not None and yaml.safe_load(stored) != json.loads(json.dumps(record)):
        raise ConfigError(f"search '{tc.name}' exists at {search_url} with a different search space "
                          "or training config: re-run it unchanged to resume, or pick a new name=")
    print(f"[cacr] resuming search '{tc.name}' from {search_url}", flush=True)
    return tune.Tuner.restore(exp_path, trainable, storage_filesystem=fs, resume_unfinished=True,
                              resume_errored=False, restart_errored=False)


def _new_tuner(tc: TuneConfig, base: Config, trainable, fs, fs_path: str, search_url: str,
               concurrency: int, callbacks: list | None):
    """A new search: search.yaml written first (what a resume compares against), then the Tuner
    with the scheduler, the trial names and Tune's CSV / JSON result loggers."""
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    record = _search_record(tc, base)
    storage.write_text(storage.join_url(search_url, "search.yaml"),
                       yaml.safe_dump(record, sort_keys=False), base.storage)
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
    return tuner


class _DropTuneRestoreHint(logging.Filter):
    """Tune's "Resume experiment with: Tuner.restore(...)" is not how a `cacr tune` user resumes
    (re-running the same command does; the CLI prints it): drop that one record."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "has been interrupted, but the most recent state was saved" not in record.getMessage()


@contextlib.contextmanager
def _no_tune_restore_hint() -> Iterator[None]:
    tune_log = logging.getLogger("ray.tune.tune")
    f = _DropTuneRestoreHint()
    tune_log.addFilter(f)
    try:
        yield
    finally:
        tune_log.removeFilter(f)


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
        best_config_url = storage.join_url(search_url, "best_config.yaml")
        text = (f"# Best trial of search '{tc.name}': {best['trial']} ({tc.metric} = "
                f"{best[tc.metric]:.4f} after {best['epochs']} epochs; {best['params']}).\n"
                f"# Run it: cacr train --config best_config.yaml [key=value ...]\n"
                + yaml.safe_dump(to_dict(best_cfg), sort_keys=False))
        storage.write_text(best_config_url, text, base.storage)
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
    storage.write_text(storage.join_url(search_url, "summary.json"),
                       json.dumps(finite_or_none(summary), indent=1, default=str, allow_nan=False),
                       base.storage)
    return summary
