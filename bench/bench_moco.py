"""Momentum-encoder CACR (``cacr_moco``) costs, each figure next to its baseline from the same run:

* ``moco_step_ms``: one fwd+bwd+SGD step of ``cacr_moco`` vs the symmetric CACR step (CACRModel +
  ``cacr_loss``) at the same V, n and backbone (narrow ResNet, 32 px) -- baseline = symmetric.
* ``moco_step_peak_mib``: peak RSS growth of that step, each in a fresh process (baseline = symmetric).
* ``moco_ema_ms``: the EMA update (``update_target``) alone vs the whole ``cacr_moco`` step.
* ``vit_small_step_ms``: one ``cacr_moco`` step with ViT-S/16 at 224 px vs ResNet-50 at 224 px
  (tiny batch; V = 2) -- baseline = ResNet-50.

Usage: ``python bench/run.py [--quick] moco``.  Timings: median of the repetitions after one warm-up.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _moco(arch: str, width: int = 16, small: bool = True, hidden: int = 512, out: int = 128):
    import cacr.methods.moco  # noqa: F401  (registers cacr_moco)
    from cacr.methods.base import METHODS

    return METHODS["cacr_moco"](dict(arch=arch, width=width, small_images=small, head="moco",
                                     head_hidden=hidden, head_out=out, predictor_hidden=hidden),
                                dict(temperature=0.2, targets="light"), momentum=dict(base=0.99))


def _symmetric(width: int = 16):
    from cacr.loss import cacr_loss
    from cacr.model import CACRModel

    model = CACRModel("narrow_resnet", width=width, head_hidden=512, head_out=128)

    def step(views):
        V, n = views.shape[:2]
        z = model(views.flatten(0, 1)).view(V, n, -1)
        return cacr_loss(z, tau_neg=0.9).loss
    return model, step


def _stepper(kind: str, arch: str, n: int, size: int):
    torch.manual_seed(0)
    views = torch.randn(2, n, 3, size, size)
    if kind == "symmetric":
        model, fwd = _symmetric()
    else:
        model = _moco(arch, small=size <= 64, hidden=512 if size <= 64 else 4096,
                      out=128 if size <= 64 else 256)
        fwd = lambda v: model([v]).loss  # noqa: E731
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        fwd(views).backward()
        opt.step()
    return model, step


def _median_ms(fn, reps: int) -> float:
    fn()                                                           # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _rss_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def peak_mib_here(kind: str, n: int) -> float:
    """Peak RSS growth (MiB) of building + one step, in THIS process (call in a fresh one)."""
    torch.set_num_threads(1)
    before = _rss_kib("VmRSS")
    _, step = _stepper(kind, "narrow_resnet", n, 32)
    step()
    return (_rss_kib("VmHWM") - before) / 1024


def _peak_mib(kind: str, n: int) -> float:
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from bench.bench_moco import peak_mib_here; "
            f"print(peak_mib_here({kind!r}, {n}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True)
    return float(res.stdout.strip().splitlines()[-1])


def _line(name, value, baseline, unit, higher_is_better=False, **extra) -> dict:
    return {"name": name, "value": round(value, 3), "baseline": round(baseline, 3),
            "ratio": round(value / baseline, 3) if baseline else None, "unit": unit,
            "higher_is_better": higher_is_better, **extra}


def run(quick: bool) -> list[dict]:
    torch.set_num_threads(1)
    n, reps = (32, 2) if quick else (128, 5)
    lines = []
    moco, moco_step = _stepper("moco", "narrow_resnet", n, 32)
    _, sym_step = _stepper("symmetric", "narrow_resnet", n, 32)
    t_moco, t_sym = _median_ms(moco_step, reps), _median_ms(sym_step, reps)
    ctx = dict(V=2, n=n, arch="narrow_resnet", width=16, px=32, threads=1)
    lines.append(_line("moco_step_ms", t_moco, t_sym, "ms", baseline_is="symmetric cacr step", **ctx))
    lines.append(_line("moco_step_peak_mib", _peak_mib("moco", n), _peak_mib("symmetric", n), "MiB",
                       baseline_is="symmetric cacr step", **ctx))
    t_ema = _median_ms(lambda: moco.update_target(0.99), max(reps, 5))
    lines.append(_line("moco_ema_ms", t_ema, t_moco, "ms", baseline_is="whole cacr_moco step", **ctx))
    nv, rv = (2, 1) if quick else (4, 2)               # BatchNorm needs n >= 2
    _, vit_step = _stepper("moco", "vit_small", nv, 224)
    _, r50_step = _stepper("moco", "resnet50", nv, 224)
    lines.append(_line("vit_small_step_ms", _median_ms(vit_step, rv), _median_ms(r50_step, rv), "ms",
                       baseline_is="resnet50 cacr_moco step", V=2, n=nv, px=224, threads=1))
    return lines


if __name__ == "__main__":
    for rec in run(quick="--quick" in sys.argv):
        print(json.dumps(rec), flush=True)
