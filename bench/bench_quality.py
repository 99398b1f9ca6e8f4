"""Quality benchmark: CACR vs the InfoNCE baseline at equal budget, momentum-encoder CACR
(``cacr_moco``) from its digits preset at the same budget, and a random-init encoder.

CACR and InfoNCE train the SAME encoder with the same epochs, batch, views (K + 1), augmentation,
optimiser, learning rate and seed list on the embedded digits set; only ``loss.name`` differs
(each loss keeps its project default: CACR tau+ = 1, tau- = 0.9; InfoNCE temperature 0.2).
``cacr_moco`` runs conf/digits-moco.yaml with the same overrides. "Same budget" for it means: the
same data, backbone (narrow_resnet, same width, same standard init), epochs, global batch (so the
same 60 optimiser steps), optimiser (SGD, momentum 0.9, wd 1e-4, warm-up + cosine) and seeds. What
each method's preset sets differs and is not equalised: the lr (0.5 per 256 for cacr_moco, 0.12
for the symmetric losses), m0 0.9, V = 2 crops (MoCo v3's two-crop design) instead of K + 1 = 5,
i.e. 2 forward+backward passes per image plus 2 no-grad target passes instead of 5
forward+backward, and a projector + predictor head (hidden 512, out 128). The training wall time
of every arm is reported beside its accuracy.
The random-init arm is the untrained network the CACR / InfoNCE runs start from (same seed, same
init). Every checkpoint is scored by :func:`pipeline.evaluate.evaluate` (frozen backbone features,
weighted kNN k = 20 / 200, linear probe). Real trainings through
:func:`pipeline.train.run_training` (Ray Train, 2 workers).

* full (default): the embedded default config that ``cacr train`` runs (32 px, narrow_resnet
  w = 16, K = 4, batch 2 x 128, SGD lr 0.12 N/256, the digits augmentation, 12 epochs) and
  conf/digits-moco.yaml (12 epochs, batch 2 x 128), seeds 0, 1, 2, probe 100 epochs: 9 trainings.
* quick: 16 px, w = 8, K = 4, batch 2 x 64, 3 epochs, seed 0, probe 100 epochs: 3.3 min measured
  on 2 shared CPU cores (load average ~18). One seed of 3 epochs: a smoke figure, not a verdict.

Lines (``value`` = the first arm's mean over seeds, ``baseline`` = the other arm's mean; ``std`` /
``baseline_std`` over seeds, ``values`` / ``baseline_values`` per seed):
``quality.{knn_top1,knn200_top1,linear_top1}.{cacr_vs_infonce,cacr_vs_random,cacr_moco_vs_cacr,
cacr_moco_vs_infonce,cacr_moco_vs_random}``.
A markdown table for the README goes to stderr (also all training / evaluation logs, so that
stdout stays one JSON object per line).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MOCO_PRESET = Path(__file__).resolve().parents[1] / "conf" / "digits-moco.yaml"
ARMS = ("cacr", "infonce", "cacr_moco")  # trained arms; "random" is evaluated untrained
COMPARE = [("cacr", "infonce"), ("cacr", "random"), ("cacr_moco", "cacr"), ("cacr_moco", "infonce"),
           ("cacr_moco", "random")]
COMMON = ["num_workers=2", "cpus_per_worker=0.5", "data.source=null", "data.val_split=",
          "log_every_steps=50", "keep_checkpoints=1", "max_failures=0"]
QUICK = ["epochs=3", "batch_size=64", "data.image_size=16", "augment.crop_size=16", "model.width=8",
         "model.head_hidden=128", "model.head_out=64", "loss.num_positives=4", "optim.warmup_epochs=0.5"]
FULL: list[str] = []  # exactly the embedded default `cacr train` runs (12 epochs)
METRICS = ("knn_top1", "knn200_top1", "linear_top1")
LABELS = {"knn_top1": "kNN@20", "knn200_top1": "kNN@200", "linear_top1": "linear probe"}


def arm_config(arm: str, overrides: list[str]):
    """The config of one trained arm: the embedded default with ``loss.name``, or the cacr_moco
    preset (a QUICK ``loss.num_positives`` is not applied to it: it keeps its 2 crops)."""
    from pipeline.config import load_config

    if arm == "cacr_moco":
        return load_config(MOCO_PRESET, [o for o in overrides if not o.startswith("loss.num_positives=")])
    return load_config(None, [*overrides, f"loss.name={arm}"])


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _ray(threads: int) -> bool:
    """Start a local Ray when none is running; True if this benchmark started it."""
    from pipeline.ray_start import start_ray

    started = start_ray(num_cpus=8, use_gpu=None, dashboard=False, log_to_driver=False,
                        logging_level=logging.WARNING)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return started


def run(quick: bool) -> list[dict[str, Any]]:
    import ray
    import torch

    from pipeline.checkpoint import save_state
    from pipeline.config import to_dict
    from pipeline.data import prepare
    from pipeline.evaluate import evaluate, parse_options
    from pipeline.train import run_training
    from pipeline.worker import method_from_config

    # BENCH_SEEDS=2: a subset of the seeds (re-running the ones a cut-off run lost)
    seeds = [int(x) for x in os.environ.get("BENCH_SEEDS", "").split(",") if x.strip()] or \
        ([0] if quick else [0, 1, 2])
    threads = max(1, (os.cpu_count() or 2) // 2)
    overrides = [*COMMON, *(QUICK if quick else FULL), f"torch_threads={threads}"]
    eval_opts = parse_options(["linear_epochs=100", "actors=1", f"threads={threads}"])
    scores: dict[str, dict[str, list[float]]] = {arm: {m: [] for m in METRICS}
                                                 for arm in (*ARMS, "random")}
    walls: dict[str, list[float]] = {arm: [] for arm in ARMS}
    cfgs: dict[str, Any] = {}
    started = _ray(threads)
    t_all = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="cacr-bench-quality-") as tmp, \
                contextlib.redirect_stdout(sys.stderr):
            shards = os.path.join(tmp, "digits")
            prepare("digits", shards, progress=False, echo=lambda m: None)
            for seed in seeds:
                for loss in ARMS:
                    cfgs[loss] = cfg = arm_config(loss, [*overrides, f"data.url={shards}", f"storage_path={tmp}/runs",
                                                         f"name={loss}-s{seed}", f"seed={seed}"])
                    t0 = time.perf_counter()
                    out = run_training(cfg)
                    walls[loss].append(time.perf_counter() - t0)
                    r = evaluate(out["checkpoint"], shards, eval_opts, echo=_log)
                    for m in METRICS:
                        scores[loss][m].append(r[m])
                    _log(f"[bench] {loss} seed {seed}: " + ", ".join(f"{m} {r[m]:.4f}" for m in METRICS)
                         + f" (train {walls[loss][-1]:.0f}s)")
                cfg = cfgs["cacr"]
                torch.manual_seed(seed)  # the init the cacr / infonce runs of this seed started from
                rand_dir = os.path.join(tmp, f"random-s{seed}")
                save_state(rand_dir, {"model": method_from_config(cfg).model_state(), "config": to_dict(cfg),
                                      "epoch": 0, "step": 0, "metrics": {}})
                r = evaluate(rand_dir, shards, eval_opts, echo=_log)
                for m in METRICS:
                    scores["random"][m].append(r[m])
                _log(f"[bench] random init seed {seed}: " + ", ".join(f"{m} {r[m]:.4f}" for m in METRICS))
    finally:
        if started:
            ray.shutdown()

    config = {"dataset": "digits (train 1438 / val 359)", "arch": cfg.model.arch, "width": cfg.model.width,
              "image_size": cfg.data.image_size, "views": cfg.num_views, "epochs": cfg.epochs,
              "global_batch": cfg.global_batch, "optim": f"{cfg.optim.name} base_lr {cfg.optim.base_lr}",
              "augment": {"scale": list(cfg.augment.scale), "flip_p": cfg.augment.flip_p,
                          "jitter_p": cfg.augment.jitter_p, "grayscale_p": cfg.augment.grayscale_p},
              "cacr": {"tau_pos": cfg.loss.tau_pos, "tau_neg": cfg.loss.tau_neg},
              "infonce": {"temperature": cfg.loss.temperature},
              "cacr_moco": {"preset": "conf/digits-moco.yaml", "views": cfgs["cacr_moco"].num_views,
                            "temperature": cfgs["cacr_moco"].loss.temperature,
                            "base_lr": cfgs["cacr_moco"].optim.base_lr,
                            "momentum_base": cfgs["cacr_moco"].momentum.base,
                            "epochs": cfgs["cacr_moco"].epochs, "global_batch": cfgs["cacr_moco"].global_batch},
              "eval": {"knn_k": [eval_opts.knn_k, eval_opts.knn_k_large],
                       "knn_temperature": eval_opts.knn_temperature,
                       "linear_epochs": eval_opts.linear_epochs}}
    lines = []
    for m in METRICS:
        for arm, other in COMPARE:
            v, vs = _mean_std(scores[arm][m])
            b, bs = _mean_std(scores[other][m])
            lines.append({
                "name": f"quality.{m}.{arm}_vs_{other}", "value": round(v, 4), "baseline": round(b, 4),
                "ratio": round(v / b, 4) if b else math.nan, "unit": "top-1 accuracy", "higher_is_better": True,
                "std": round(vs, 4), "baseline_std": round(bs, 4), "seeds": seeds,
                "values": [round(x, 4) for x in scores[arm][m]],
                "baseline_values": [round(x, 4) for x in scores[other][m]],
                "train_wall_s": {k: round(statistics.fmean(w), 1) for k, w in walls.items() if w},
                "config": config,
            })
    _log(markdown_table(scores, walls, config, seeds, time.perf_counter() - t_all))
    return lines


def markdown_table(scores: dict[str, dict[str, list[float]]], walls: dict[str, list[float]],
                   config: dict[str, Any], seeds: list[int], wall: float) -> str:
    def cell(xs: list[float]) -> str:
        m, s = _mean_std(xs)
        return f"{100 * m:.1f} ± {100 * s:.1f}" if len(xs) > 1 else f"{100 * m:.1f}"

    names = {"cacr_moco": "CACR, momentum encoder (`cacr_moco`, digits-moco preset)", "cacr": "CACR (symmetric)",
             "infonce": "InfoNCE (same budget)", "random": "random init (same encoder)"}
    rows = ["| encoder | " + " | ".join(f"{LABELS[m]} top-1 (%)" for m in METRICS) + " | train wall (s) |",
            "|---|" + "---:|" * (len(METRICS) + 1)]
    for arm, label in names.items():
        w = f"{statistics.fmean(walls[arm]):.0f}" if walls.get(arm) else "–"
        rows.append(f"| {label} | " + " | ".join(cell(scores[arm][m]) for m in METRICS) + f" | {w} |")
    rows.append("")
    rows.append(f"digits, {config['arch']} w={config['width']}, {config['image_size']} px, "
                f"V={config['views']} views (cacr_moco: {config['cacr_moco']['views']}), {config['epochs']} epochs, global batch {config['global_batch']}, "
                f"{config['optim']}; mean ± std over seeds {seeds}; bench wall {wall / 60:.1f} min")
    return "\n".join(rows)


if __name__ == "__main__":
    import json

    for line in run(quick="--quick" in sys.argv):
        print(json.dumps(line), flush=True)
