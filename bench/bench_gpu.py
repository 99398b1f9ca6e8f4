"""GPU figures of the ImageNet-grade path (issue: GPU decode, ResNet-50 / ViT steps, 32k negatives).

Run by ``bench/gpu.sh`` on a machine with one CUDA GPU (``python bench/run.py [--quick] gpu``);
every line is a figure next to the baseline measured in the same run:

* ``gpu.decode.nvjpeg_vs_cpu``: images/s of :func:`pipeline.data.batches.decode_batch` on the GPU
  (torchvision ``decode_jpeg`` batched, nvjpeg) vs the CPU decode the ``cpu_tasks`` path does
  (:func:`pipeline.data.format.decode_aspect`, PIL) in a process pool over every core of the
  machine. Data: 224-px real photos (scikit-image's bundled photos as JPEG random crops of varied
  aspect, ``skimage-photos:N``), stored aspect-kept (longer side 224).
* ``gpu.decode_augment.v2_224``: decode + V = 2 views at 224 px (full-image random-resized crops
  of the aspect-kept canvases, MoCo-v3 recipe) on the GPU, images/s, vs the same CPU decode pool
  alone (the ceiling of a CPU-decode pipeline on this machine, before any augmentation).
  Goal: >= 14,000 img/s.
* ``gpu.step.vit_small_vs_resnet50``: images/s of one ``cacr_moco`` training step (fwd + bwd +
  SGD, bf16 autocast, V = 2 at 224 px) with ViT-S/16 vs ResNet-50 (channels_last), same batch.
* ``gpu.loss_gather.fraction_32k``: the CACR loss forward + backward plus the all-gather of the
  embeddings at 32,768 global negatives (W = 64 simulated ranks x n = 256 images x V = 2 views, D =
  256), on one GPU: ranks are simulated, so the gather is a device-memory concatenation of the W
  slices (what NCCL's all-gather produces; its NVLink / network time is NOT included), as a
  fraction of the ResNet-50 V = 2 step at n = 256 (baseline). Goal: <= 5 %.

* ``augment.cuda.vs_kornia.*`` and the recipe lines on CUDA: ``bench_augment.cuda_lines``.

The pipeline-vs-bare-loop ResNet-50 step (``data.decode=worker``: nvjpeg in the train worker) is
``bench_step``'s CUDA pair; gpu.sh runs it after this module. Every function takes ``device`` and
sizes, so tests/bench/test_bench_gpu.py runs each at toy sizes on the CPU (the code path, not a
figure).
"""
from __future__ import annotations

import io
import os
import statistics
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(fn, items: int, device: torch.device, reps: int) -> float:
    """Median items/s of ``fn`` over ``reps`` timed calls after one warm-up call."""
    fn()
    _sync(device)
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        rates.append(items / (time.perf_counter() - t0))
    return statistics.median(rates)


def _line(name: str, value: float, baseline: float, unit: str, higher: bool, **ctx) -> dict:
    return dict(name=name, value=round(value, 3), baseline=round(baseline, 3),
                ratio=round(value / baseline, 4) if baseline else None, unit=unit,
                higher_is_better=higher, **ctx)


# ------------------------------------------------------------------------------------------------
# decode


def photo_jpegs(n: int, max_size: int = 224) -> list[bytes]:
    """``n`` encoded JPEGs of the ``skimage-photos`` source, as ``cacr prepare --max-size`` stores them."""
    from pipeline.data import prepare

    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        url = os.path.join(tmp, "photos")
        prepare(f"skimage-photos:{n}", url, max_size=max_size, fmt="jpg", val_fraction=0,
                parallel="local", progress=False, echo=lambda m: None)
        blobs = []
        for name in sorted(os.listdir(url)):
            if name.endswith(".tar"):
                with tarfile.open(os.path.join(url, name)) as tf:
                    blobs += [tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".jpg")]
    return blobs


def _cpu_decode_chunk(args: tuple[list[bytes], int]) -> int:
    from pipeline.data.format import decode_aspect

    blobs, size = args
    return sum(decode_aspect(b, size) is not None for b in blobs)


def cpu_decode_rate(blobs: list[bytes], size: int, workers: int, reps: int = 3) -> float:
    """Images/s of PIL decode (the cpu_tasks path) over a pool of ``workers`` processes."""
    chunks = [(blobs[i::workers], size) for i in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        return _rate(lambda: sum(pool.map(_cpu_decode_chunk, chunks)), len(blobs), torch.device("cpu"), reps)


def decode_lines(device: torch.device, blobs: list[bytes], *, size: int = 224, batch: int = 256,
                 views: int = 2, reps: int = 5, cpu_workers: int | None = None) -> list[dict]:
    from cacr.augment import MultiViewAugment
    from bench_augment import moco_recipe
    from pipeline.data.batches import decode_batch

    workers = cpu_workers or os.cpu_count() or 1
    base = cpu_decode_rate(blobs, size, workers)
    batches = [blobs[i:i + batch] for i in range(0, len(blobs) - batch + 1, batch)] or [blobs]
    n_images = sum(len(b) for b in batches)

    def decode_all():
        out = []
        for raw in batches:
            out.append(decode_batch(raw, np.zeros(len(raw), np.int8), size=size, aspect=True, device=device))
        return out
    aug = MultiViewAugment(moco_recipe(crop_size=size), views)
    gen = torch.Generator(device=device).manual_seed(0)

    def decode_and_augment():
        for canvas, hw in decode_all():
            aug.view_groups(canvas, generator=gen, valid_hw=hw)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    ctx = dict(images=len(blobs), batch=batch, stored="aspect-kept JPEG, longer side 224",
               device=where, cpu_decode_processes=workers)
    return [
        _line("gpu.decode.nvjpeg_vs_cpu", _rate(decode_all, n_images, device, reps), base, "img/s", True,
              baseline_name=f"PIL decode_aspect over {workers} processes", **ctx),
        _line(f"gpu.decode_augment.v{views}_{size}", _rate(decode_and_augment, n_images, device, reps), base,
              "img/s", True, baseline_name=f"CPU decode alone over {workers} processes", goal=14000, **ctx),
    ]


# ------------------------------------------------------------------------------------------------
# training steps


def _moco_method(arch: str, depth: int | None = None):
    from cacr.methods import build_method

    model = dict(arch=arch, small_images=False, head="moco", head_hidden=4096, head_out=256,
                 predictor_hidden=4096)
    if depth is not None:
        model["vit_depth"] = depth
    return build_method("cacr_moco", model=model, loss=dict(temperature=0.2, targets="light"),
                        momentum=dict(base=0.99))


def step_rate(arch: str, device: torch.device, *, n: int, size: int = 224, reps: int = 10,
              depth: int | None = None) -> float:
    """Images/s of one cacr_moco step (V = 2, fwd + bwd + SGD; bf16 autocast and channels_last on
    CUDA, as the worker runs it)."""
    torch.manual_seed(0)
    method = _moco_method(arch, depth).to(device)
    cuda = device.type == "cuda"
    fmt = torch.channels_last if cuda and not arch.startswith("vit") else torch.contiguous_format
    method = method.to(memory_format=fmt)
    views = [torch.randn(2, n, 3, size, size, device=device).contiguous(memory_format=torch.contiguous_format)]
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = method(views).loss
        loss.backward()
        opt.step()
        method.after_step(0.5)
    return _rate(step, n, device, reps)


def step_lines(device: torch.device, *, n: int = 128, size: int = 224, reps: int = 10,
               depth: int | None = None) -> list[dict]:
    vit = step_rate("vit_small", device, n=n, size=size, reps=reps, depth=depth)
    r50 = step_rate("resnet50", device, n=n, size=size, reps=reps)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return [_line("gpu.step.vit_small_vs_resnet50", vit, r50, "img/s", True, batch=n, views=2, px=size,
                  method="cacr_moco", bf16=device.type == "cuda", device=where,
                  baseline_name="ResNet-50 (channels_last)")]


# ------------------------------------------------------------------------------------------------
# loss + gather at 32k negatives


def loss_gather_ms(device: torch.device, *, ranks: int, n: int, views: int = 2, dim: int = 256,
                   reps: int = 10) -> float:
    """Median ms of: all-gather of (V, n, D) embeddings from ``ranks`` simulated ranks (a device
    concatenation) + the CACR loss forward + backward on this rank's queries against all keys."""
    from cacr.loss import _cacr_from_gathered

    g = torch.Generator(device="cpu").manual_seed(0)
    mine = torch.nn.functional.normalize(torch.randn(views, n, dim, generator=g), dim=-1).to(device)
    others = [torch.nn.functional.normalize(torch.randn(views, n, dim, generator=g), dim=-1).to(device)
              for _ in range(ranks - 1)]
    q = mine.clone().requires_grad_()

    def step():
        keys = torch.cat([q, *others], dim=1)                       # the gather's output, (V, W*n, D)
        out = _cacr_from_gathered(q, keys, 0, alpha=1.0, beta=1.0, tau_pos=1.0, tau_neg=0.9)
        out.loss.backward()
        q.grad = None
    return 1e3 / _rate(step, 1, device, reps)


def loss_gather_lines(device: torch.device, *, ranks: int = 64, n: int = 256, reps: int = 10,
                      step_n: int | None = None, step_size: int = 224) -> list[dict]:
    loss_ms = loss_gather_ms(device, ranks=ranks, n=n, reps=reps)
    sn = step_n or n
    step_ms = 1e3 * sn / step_rate("resnet50", device, n=sn, size=step_size, reps=reps)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return [_line(f"gpu.loss_gather.fraction_{ranks * n * 2 // 1024}k", loss_ms, step_ms, "ms", False,
                  negatives=ranks * n * 2, simulated_ranks=ranks, n_per_rank=n, views=2, dim=256,
                  goal_ratio=0.05, device=where, gather="device concatenation (no interconnect time)",
                  baseline_name=f"ResNet-50 cacr_moco step, n={sn}, V=2, {step_size} px, bf16 on CUDA")]


# ------------------------------------------------------------------------------------------------


def run(quick: bool) -> list[dict]:
    if not torch.cuda.is_available():
        raise RuntimeError("bench gpu needs a CUDA GPU (bench/gpu.sh runs it on one)")
    dev = torch.device("cuda", 0)
    torch.backends.cudnn.benchmark = True
    blobs = photo_jpegs(1024 if quick else 4096)
    out = decode_lines(dev, blobs)
    out += step_lines(dev, n=128 if quick else 256)
    out += loss_gather_lines(dev)
    import bench_augment

    return out + bench_augment.cuda_lines(quick)


if __name__ == "__main__":
    import json

    for rec in run(quick="--quick" in sys.argv[1:]):
        print(json.dumps(rec), flush=True)
