"""`cacr tune`: hyperparameter search with Ray Tune, where every trial is a distributed training run.

Ray Train V2 under Tune: a function trainable (:func:`_trial`) builds a ``TorchTrainer`` for its
sampled config and fits it; ``TuneReportCallback`` forwards the per-epoch metrics to Tune, so ASHA
can stop a trial between epochs. A stopped trial's Train placement group is freed by Train's
cleaner through Ray's State API, which needs the dashboard: Ray is started with it (ray[default]).

Search directory layout (local or s3://):
    <storage_path>/<name>/                Tune's experiment state (resume)
    <storage_path>/<name>/trials/<trial>/ each trial's Train run: checkpoints + tensorboard/
    <storage_path>/<name>/best_config.yaml  runs as is with `cacr train --config`
``tensorboard --logdir <storage_path>/<name>/trials`` shows one run per trial + the HParams view.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import (Config, ConfigError, apply_flat, from_dict, get_key, load_yaml,
                             parse_override, set_key, to_dict)

SPACE_TYPES = ("choice", "grid", "uniform", "loguniform", "randint")


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
    mode: str = field(default="max", metadata={"choices": ("max", "min")})
    num_samples: int = 4
    max_concurrent_trials: int = 2
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    storage_path: str = "./runs/tune"
    trial_start_timeout_s: int = 120   # a trial's workers must start within this, or it errors


def _space(key: str, spec: Any):
    from ray import tune

    if not isinstance(spec, dict) or spec.get("type") not in SPACE_TYPES:
        raise ConfigError(f"search_space '{key}': expected {{type: {' | '.join(SPACE_TYPES)}, ...}}, "
                          f"got {spec!r}")
    t = spec["type"]
    try:
        if t in ("choice", "grid"):
            values = spec["values"]
            if not isinstance(values, list) or not values:
                raise ConfigError(f"search_space '{key}': 'values' must be a non-empty list")
            return tune.choice(values) if t == "choice" else tune.grid_search(values)
        low, high = float(spec["low"]), float(spec["high"])
    except KeyError as e:
        raise ConfigError(f"search_space '{key}': type {t} needs {e.args[0]!r}") from None
    if not low < high or (t == "loguniform" and low <= 0):
        raise ConfigError(f"search_space '{key}': need 0 < low < high (loguniform) or low < high")
    if t == "uniform":
        return tune.uniform(low, high)
    if t == "loguniform":
        return tune.loguniform(low, high)
    return tune.randint(int(low), int(high))


def _representative(spec: dict) -> Any:
    """A value from a search-space entry, to validate the key/type before Ray starts."""
    if spec["type"] in ("choice", "grid"):
        return spec["values"][0]
    return int(spec["low"]) if spec["type"] == "randint" else float(spec["low"])


def load_tune_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> tuple[TuneConfig, Config]:
    """Tune YAML + overrides (``num_samples=8``, ``train.epochs=3``) -> (TuneConfig, base Config).

    Every search-space key is checked against the training config (name and type) before Ray
    starts, so a typo fails in a second rather than after the first trial.
    """
    from pipeline.config import _check_tree

    raw = load_yaml(path)
    tc = from_dict(TuneConfig, raw)
    for ov in overrides:
        k, v = parse_override(ov)
        if k.startswith("train."):
            tc.train[k[len("train."):]] = v
        else:
            set_key(tc, k, v)
    _check_tree(tc, "")
    if tc.num_samples < 1 or tc.max_concurrent_trials < 1:
        raise ConfigError("tune config: num_samples and max_concurrent_trials must be >= 1")
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
        set_key(cfg, k, v)
    cfg.validate()
    for key, spec in tc.search_space.items():
        _space(key, spec)
        try:
            apply_flat(cfg, {key: _representative(spec)})
        except ConfigError as e:
            raise ConfigError(f"search_space: {e}") from None
    if tc.metric not in ("knn_top1", "loss", "samples_per_s"):
        raise ConfigError(f"tune config key 'metric' = {tc.metric!r}: one of knn_top1, loss, samples_per_s")
    return tc, cfg


def _trial(params: dict[str, Any]) -> None:
    """One Tune trial: a full Ray Train run of the sampled config."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.train import build_trainer

    base = from_dict(Config, params["__base__"])
    sampled = {k: v for k, v in params.items() if not k.startswith("__")}
    cfg = apply_flat(base, sampled)
    cfg.name = ray.tune.get_context().get_trial_name()
    trainer, _, _ = build_trainer(cfg, callbacks=[TuneReportCallback()],
                                  storage_path=params["__trials_url__"])
    trainer.fit()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def run_tune(path: str, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from pipeline import storage
    from pipeline.train import _join

    tc, base = load_tune_config(path, overrides)
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(tc.trial_start_timeout_s))
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:
            need = tc.max_concurrent_trials * (base.num_workers * base.cpus_per_worker + 1) + 2
            ray.init(num_cpus=int(max(os.cpu_count() or 1, math.ceil(need))), include_dashboard=True)
    # Fail fast instead of waiting forever for a trial that can never be placed.
    total = ray.cluster_resources()
    per_trial = base.num_workers * base.cpus_per_worker
    if per_trial > total.get("CPU", 0) or (base.use_gpu and base.num_workers > total.get("GPU", 0)):
        raise ConfigError(f"one trial needs {base.num_workers} workers x {base.cpus_per_worker} CPU"
                          f"{' + 1 GPU' if base.use_gpu else ''} but the cluster has {total.get('CPU', 0)} "
                          f"CPU / {total.get('GPU', 0)} GPU: lower num_workers or cpus_per_worker")

    search_url = _join(tc.storage_path, tc.name)
    trials_url = _join(search_url, "trials")
    # The embedded default prepares its shards once here, not racing in every trial.
    from pipeline import data
    data.ensure_prepared(base.data.url, base.data.source, base.storage, image_size=base.data.image_size)

    param_space: dict[str, Any] = {k: _space(k, s) for k, s in tc.search_space.items()}
    param_space["__base__"] = to_dict(base)
    param_space["__trials_url__"] = trials_url
    scheduler = (ASHAScheduler(time_attr="epoch", max_t=base.epochs, grace_period=tc.scheduler.grace_period,
                               reduction_factor=tc.scheduler.reduction_factor)
                 if tc.scheduler.name == "asha" else FIFOScheduler())
    fs, fs_path = storage.arrow_fs(tc.storage_path, base.storage)
    remote = "://" in tc.storage_path
    storage_path = fs_path if remote else os.path.abspath(tc.storage_path)
    trainable = tune.with_resources(_trial, {"CPU": 0})
    exp_path = storage_path.rstrip("/") + "/" + tc.name
    if tune.Tuner.can_restore(exp_path, storage_filesystem=fs if remote else None):
        print(f"[cacr] resuming search '{tc.name}' from {search_url}", flush=True)
        tuner = tune.Tuner.restore(exp_path, trainable, storage_filesystem=fs if remote else None,
                                   resume_unfinished=True, resume_errored=False, restart_errored=False,
                                   param_space=param_space)
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric=tc.metric, mode=tc.mode, num_samples=tc.num_samples,
                                        max_concurrent_trials=tc.max_concurrent_trials, scheduler=scheduler),
            run_config=tune.RunConfig(name=tc.name, storage_path=storage_path,
                                      storage_filesystem=fs if remote else None, verbose=0),
        )
    print(f"[cacr] search '{tc.name}': {tc.num_samples} samples x {len(tc.search_space)} keys, "
          f"{tc.max_concurrent_trials} at a time, scheduler {tc.scheduler.name}", flush=True)
    print(f"[cacr] watch it: tensorboard --logdir {trials_url}", flush=True)
    grid = tuner.fit()
    return _summarise(grid, tc, base, search_url)


def _summarise(grid, tc: TuneConfig, base: Config, search_url: str) -> dict[str, Any]:
    rows, stopped_early, errored, diverged = [], 0, 0, 0
    best, best_metric = None, None
    for r in grid:
        m = r.metrics or {}
        params = {k: v for k, v in (r.config or {}).items() if not k.startswith("__")}
        epochs = m.get("epoch", 0) or 0
        value = m.get(tc.metric)
        loss = m.get("loss")
        if r.error is not None:
            status = "DIVERGED" if "diverged" in str(r.error) or "FloatingPointError" in str(r.error) \
                else "ERROR"
            if status == "DIVERGED":
                diverged += 1
            else:
                errored += 1
        elif epochs < base.epochs:
            status = "STOPPED"
            stopped_early += 1
        else:
            status = "DONE"
        ok = value is not None and isinstance(value, (int, float)) and math.isfinite(value) \
            and status != "DIVERGED" and (loss is None or math.isfinite(loss))
        if ok and (best_metric is None or (value > best_metric if tc.mode == "max" else value < best_metric)):
            best, best_metric = params, value
        rows.append({"trial": r.path.rstrip("/").split("/")[-1] if r.path else "?", "status": status,
                     "epochs": epochs, tc.metric: value, **params,
                     "error": str(r.error).splitlines()[0][:120] if r.error else None})
    keys = list(tc.search_space)
    header = ["trial", "status", "epochs", tc.metric, *keys]
    table = [header] + [[_fmt(row.get(h)) for h in header] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    print("\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in table), flush=True)
    for row in rows:
        if row["error"]:
            print(f"[cacr] trial {row['trial']} {row['status']}: {row['error']}", flush=True)

    best_config_url = None
    if best is not None:
        best_cfg = apply_flat(base, best)
        best_cfg.name = None
        best_config_url = _join(search_url, "best_config.yaml")
        text = (f"# Best trial of search '{tc.name}' ({tc.metric} = {best_metric:.4f}).\n"
                f"# Run it: cacr train --config <this file>\n"
                + yaml.safe_dump(to_dict(best_cfg), sort_keys=False))
        _write_text(best_config_url, text, base)
    summary = {"best_config": best_config_url, "best_metric": best_metric, "best_params": best,
               "metric": tc.metric, "trials": len(rows), "stopped_early": stopped_early,
               "errored": errored, "diverged": diverged, "search_dir": search_url,
               "tensorboard_logdir": _join(search_url, "trials")}
    print(json.dumps(summary), flush=True)
    return summary


def _write_text(url: str, text: str, cfg: Config) -> None:
    if "://" not in url:
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        Path(url).write_text(text)
        return
    from pipeline import storage

    fs, path = storage.fsspec_fs(url, cfg.storage)
    with fs.open(path, "w") as f:
        f.write(text)
