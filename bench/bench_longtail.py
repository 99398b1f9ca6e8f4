"""Long-tail robustness benchmark: does CACR hold up better than InfoNCE on imbalanced data?

The paper's robustness claim at small scale. Digits is prepared three times with the same seed
(so the validation split is the SAME balanced 359 images everywhere): balanced, ``exp:10`` and
``exp:100`` (training split only). On each, CACR, InfoNCE and — when the trainer runs it —
``cacr_queue`` train the same encoder at equal budget (same epochs, batch, views, augmentation,
optimiser, lr, seeds; only ``loss.name`` differs), then ``cacr evaluate`` scores the frozen backbone
on the balanced validation split: overall kNN@20 and linear-probe top-1, and per many / medium /
few-shot group (groups from the long-tailed training counts, see pipeline/eval_report.py).

Everything goes through the CLI, in subprocesses, as a user would run it (each command starts its
own local Ray, or joins ``RAY_ADDRESS`` when set)::

    cacr prepare digits DIR [--imbalance exp:R] --seed 0
    cacr train data.url=DIR loss.name=... seed=S name=...       # last stdout line: JSON summary
    cacr evaluate CKPT --data DIR --tensorboard none ...        # last stdout line: JSON result

Lines (value = CACR mean over seeds, baseline = InfoNCE mean):

* ``longtail.<set>.<metric>.cacr_vs_infonce`` for set in balanced / exp10 / exp100 and metric in
  knn_top1, linear_top1, knn_{many,medium,few}, linear_{many,medium,few};
* ``longtail.drop.<set>.<metric>.cacr_vs_infonce``: balanced minus long-tailed accuracy of the same
  method and seed (groups of the balanced run regrouped by the long-tailed set's classes), lower is
  better; ``...cacr_queue_vs_infonce`` lines as well when cacr_queue trained.

A markdown table goes to stderr. Full: 3 sets x 3 seeds x 3 methods = 27 trainings of 8 epochs
each, the same for every arm. 8, not the embedded default's 12: one 12-epoch cacr_queue training on
the balanced set took 12.4 min on the 2 shared cores (load average 30-55), which puts the full
grid at about 3 h; 8 epochs keeps it near 2 h. ``--quick``: balanced + exp:100, seed 0, 2 epochs,
a smoke run of the machinery. ``BENCH_SEEDS=1,2`` / ``BENCH_SETS=exp100`` run a subset of the grid
(drop lines need the balanced set of the same seeds).
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
COMMON = ["num_workers=2", "cpus_per_worker=0.5", "data.source=null", "log_every_steps=50",
          "keep_checkpoints=1", "max_failures=0", "batch_size=32", "data.image_size=16",
          "augment.crop_size=16", "model.width=8", "model.head_hidden=128", "model.head_out=64",
          "loss.num_positives=4", "optim.warmup_epochs=1", "loss.queue_size=1024"]
FULL = ["epochs=8"]  # every arm alike; see the module docstring
QUICK = ["epochs=2", "optim.warmup_epochs=0.5"]
SETS = {"balanced": None, "exp10": "exp:10", "exp100": "exp:100"}
METHODS = ("cacr", "infonce", "cacr_queue")
GROUPS = ("many", "medium", "few")
METRICS = ("knn_top1", "linear_top1", *(f"{m}_{g}" for m in ("knn", "linear") for g in GROUPS))


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _cli(args: list[str], timeout: float) -> tuple[int, dict[str, Any] | None, str]:
    """Run ``python -m pipeline.cli ARGS``; (rc, last stdout line as JSON or None, stderr tail)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    for attempt in range(6):
        r = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                           env=env, cwd=REPO, timeout=timeout)
        # Ray gives a new local instance 30 s to start; on an overloaded machine that can run out
        # before anything of ours ran: try again (set RAY_ADDRESS to share one instance instead).
        if r.returncode == 0 or "timed out during startup" not in r.stderr:
            break
        _log(f"[bench] Ray start-up timed out (attempt {attempt + 1}); retrying: {' '.join(args[:2])}")
        time.sleep(30)
    last = None
    for line in reversed(r.stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                last = json.loads(line)
            except ValueError:
                pass
            break
    return r.returncode, last, r.stderr.strip()[-600:]


def _scores(r: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"knn_top1": r["knn_top1"], "linear_top1": r["linear_top1"],
                           "per_class": r["per_class"], "classes": r["groups"]["classes"]}
    for m in ("knn", "linear"):
        for g in GROUPS:
            out[f"{m}_{g}"] = (r["groups"].get(f"{m}_top1") or {}).get(g)
    return out


def _regroup(per_class: dict[str, Any], method: str, classes: list[int]) -> float | None:
    """Accuracy of ``method`` over the validation images of ``classes`` from per-class figures."""
    acc, n = per_class.get(f"{method}_top1"), per_class["val_counts"]
    if not acc or not classes:
        return None
    tot = sum(n[c] for c in classes)
    return sum(acc[c] * n[c] for c in classes if acc[c] is not None) / tot if tot else None


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _env_list(name: str, kind: type) -> list:
    """A comma list from the environment: re-running a subset of the grid (e.g. seeds a run lost)."""
    return [kind(x) for x in os.environ.get(name, "").split(",") if x.strip()]


def run(quick: bool) -> list[dict[str, Any]]:
    seeds = _env_list("BENCH_SEEDS", int) or ([0] if quick else [0, 1, 2])
    only = _env_list("BENCH_SETS", str)
    sets = {k: v for k, v in SETS.items()
            if (k in only if only else (not quick or k in ("balanced", "exp100")))}
    threads = max(1, (os.cpu_count() or 2) // 2)
    train_over = [*COMMON, *(QUICK if quick else FULL), f"torch_threads={threads}"]
    eval_over = ["actors=1", f"threads={threads}", f"linear_epochs={30 if quick else 100}"]
    methods = list(METHODS)
    res: dict[tuple[str, str, int], dict[str, Any]] = {}
    notes: dict[str, str] = {}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cacr-bench-longtail-") as tmp:
        for name, profile in sets.items():
            url = os.path.join(tmp, f"digits-{name}")
            rc, _, err = _cli(["prepare", "digits", url, "--seed", "0", "--no-progress",
                               *(["--imbalance", profile] if profile else [])], 600)
            if rc != 0:
                raise RuntimeError(f"prepare {name} failed: {err}")
            counts = json.loads(Path(url, "index.json").read_text())["class_counts"]["train"]
            _log(f"[bench] {name}: train per-class counts {counts}")
            for seed in seeds:
                for method in list(methods):
                    t0 = time.perf_counter()
                    rc, summary, err = _cli(["train", *train_over, f"data.url={url}", f"loss.name={method}",
                                             f"seed={seed}", f"storage_path={tmp}/runs",
                                             f"name={method}-{name}-s{seed}"], 7200)
                    if rc != 0 or not summary or not summary.get("checkpoint"):
                        if method == "cacr_queue":   # not run by this trainer (yet): say so, go on
                            notes["cacr_queue"] = err.splitlines()[-1] if err else f"rc {rc}"
                            methods.remove(method)
                            _log(f"[bench] cacr_queue skipped: {notes['cacr_queue']}")
                            continue
                        raise RuntimeError(f"train {method} on {name} seed {seed} failed: {err}")
                    rc, r, err = _cli(["evaluate", summary["checkpoint"], "--data", url, "--tensorboard",
                                       "none", *eval_over], 3600)
                    if rc != 0 or not r:
                        raise RuntimeError(f"evaluate {method} on {name} seed {seed} failed: {err}")
                    res[(name, method, seed)] = {**_scores(r), "train_s": time.perf_counter() - t0}
                    s = res[(name, method, seed)]
                    _log(f"[bench] {name} {method} seed {seed}: kNN {s['knn_top1']:.4f} linear "
                         f"{s['linear_top1']:.4f}; few-shot kNN {s['knn_few']} ({s['train_s']:.0f}s)")
    return _lines(res, sets, methods, seeds, notes, train_over, time.perf_counter() - t_all)


def _lines(res, sets, methods, seeds, notes, train_over, wall) -> list[dict[str, Any]]:
    # drops: balanced minus long-tailed, per method and seed; groups regrouped by the LT set's classes
    for (name, method, seed), s in list(res.items()):
        bal = res.get(("balanced", method, seed))
        if name == "balanced" or bal is None:
            continue
        for m in ("knn", "linear"):
            s[f"drop_{m}_top1"] = bal[f"{m}_top1"] - s[f"{m}_top1"]
            for g in GROUPS:
                b = _regroup(bal["per_class"], m, s["classes"][g])
                s[f"drop_{m}_{g}"] = None if b is None or s[f"{m}_{g}"] is None else b - s[f"{m}_{g}"]

    def values(name, method, key):
        return [res[(name, method, sd)][key] for sd in seeds
                if (name, method, sd) in res and res[(name, method, sd)].get(key) is not None]

    lines = []
    config = {"train": train_over, "seeds": seeds, "sets": {k: v or "balanced" for k, v in sets.items()},
              "eval": "balanced val split (359 images), kNN@20 + linear probe", "notes": notes,
              "bench_wall_min": round(wall / 60, 1)}
    for method in [m for m in methods if m != "infonce"]:
        for name in sets:
            keys = [*METRICS] + ([f"drop_{k}" for k in METRICS] if name != "balanced" else [])
            for key in keys:
                v, b = values(name, method, key), values(name, "infonce", key)
                if not v or not b:
                    continue
                (vm, vs), (bm, bs) = _mean_std(v), _mean_std(b)
                drop = key.startswith("drop_")
                lines.append({
                    "name": f"longtail.{'drop.' if drop else ''}{name}.{key.removeprefix('drop_')}."
                            f"{method}_vs_infonce",
                    "value": round(vm, 4), "baseline": round(bm, 4),
                    "ratio": round(vm / bm, 4) if bm else math.nan,
                    "unit": "accuracy drop (balanced - long-tailed)" if drop else "top-1 accuracy",
                    "higher_is_better": not drop, "std": round(vs, 4), "baseline_std": round(bs, 4),
                    "values": [round(x, 4) for x in v], "baseline_values": [round(x, 4) for x in b],
                    "config": config})
    _log(markdown_table(res, sets, methods, seeds, wall))
    return lines


def markdown_table(res, sets, methods, seeds, wall) -> str:
    def cell(name, method, key):
        xs = [res[(name, method, s)][key] for s in seeds
              if (name, method, s) in res and res[(name, method, s)].get(key) is not None]
        if not xs:
            return "–"
        m, sd = _mean_std(xs)
        return f"{100 * m:.1f} ± {100 * sd:.1f}" if len(xs) > 1 else f"{100 * m:.1f}"

    cols = [("knn_top1", "kNN all"), ("knn_many", "kNN many"), ("knn_medium", "kNN med"),
            ("knn_few", "kNN few"), ("linear_top1", "linear all"), ("linear_many", "linear many"),
            ("linear_medium", "linear med"), ("linear_few", "linear few"),
            ("drop_knn_top1", "kNN drop"), ("drop_linear_top1", "linear drop")]
    rows = ["| train set | method | " + " | ".join(c for _, c in cols) + " |",
            "|---|---|" + "---:|" * len(cols)]
    for name in sets:
        for method in methods:
            rows.append(f"| {name} | {method} | " + " | ".join(cell(name, method, k) for k, _ in cols) + " |")
    rows.append("")
    rows.append(f"digits (val: the same balanced 359 images), top-1 % mean ± std over seeds {seeds}; "
                f"drop = balanced − long-tailed, same method and seed; bench wall {wall / 60:.1f} min")
    return "\n".join(rows)


if __name__ == "__main__":
    for line in run(quick="--quick" in sys.argv):
        print(json.dumps(line), flush=True)
