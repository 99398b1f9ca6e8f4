"""Benchmark: batched multi-view augmentation (cacr.augment) vs per-image torchvision and Kornia.

Same recipe for all three (the CACR small-scale recipe, `AugmentConfig()` defaults): random-resized
crop to 32 px (scale 0.2-1, ratio 3/4-4/3), horizontal flip 0.5, colour jitter 0.4/0.4/0.4/0.4
always applied, grayscale 0.2, float32 output normalised with (mean, std). Input: a batch of uint8
(B, H, W, 3) images, as the data pipeline delivers them; H = 32 or 224 (224-px inputs cropped to
32 px; the full run adds 224-px inputs cropped to 224 px, the ImageNet-style setting).

  ours       MultiViewAugment(cfg, V)(images) -> (V, B, 3, 32, 32), all views in one call.
  per_image  torchvision.transforms.v2 Compose(RandomResizedCrop, RandomHorizontalFlip,
             RandomApply(ColorJitter), RandomGrayscale, ToDtype(float32, scale), Normalize)
             on each uint8 (3, H, W) image, once per view, in a Python loop (the classic
             Dataset.__getitem__ path).
  kornia     kornia.augmentation.AugmentationSequential(RandomResizedCrop (cropping_mode=
             "resample", its faster batched mode), RandomHorizontalFlip, ColorJitter,
             RandomGrayscale, Normalize) on the float batch repeated V times, one call; the
             uint8 -> float conversion and the repeat are timed too.

Figures (value = ours, baseline = the other, ratio = value / baseline, views per second):
  augment.vs_per_image.V{V}.{H}px    augment.vs_kornia.V{V}.{H}px       (V in 2, 5; H in 32, 224)
Measured on the CPU with torch.set_num_threads(1) for all three (views/s per core; with cores
shared by other jobs, multi-threaded small-tensor kernels measure contention, not the code),
methods interleaved round by round, median over rounds. On a CUDA machine, extra lines
augment.cuda.vs_kornia.* compare both batched implementations on the GPU.

Usage: ``python bench/bench_augment.py [--full]`` prints one JSON line per figure.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import warnings

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from cacr.augment import AugmentConfig, MultiViewAugment  # noqa: E402


def _torchvision_pipeline(cfg: AugmentConfig):
    import torchvision.transforms.v2 as T

    return T.Compose([
        T.RandomResizedCrop(cfg.crop_size, scale=cfg.scale, ratio=cfg.ratio, antialias=True),
        T.RandomHorizontalFlip(cfg.flip_p),
        T.RandomApply([T.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)],
                      p=cfg.jitter_p),
        T.RandomGrayscale(cfg.grayscale_p),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(cfg.mean, cfg.std),
    ])


def _kornia_pipeline(cfg: AugmentConfig, device):
    import kornia.augmentation as K

    c = cfg.crop_size
    return K.AugmentationSequential(
        K.RandomResizedCrop((c, c), scale=cfg.scale, ratio=cfg.ratio, cropping_mode="resample"),
        K.RandomHorizontalFlip(p=cfg.flip_p),
        K.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, p=cfg.jitter_p),
        K.RandomGrayscale(p=cfg.grayscale_p),
        K.Normalize(torch.tensor(cfg.mean), torch.tensor(cfg.std)),
    ).to(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _measure(cfg, V, H, B, n_per_image, rounds, device, with_per_image=True):
    """Views/s (median over interleaved rounds) for ours, kornia, per-image."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (B, H, H, 3), dtype=torch.uint8, generator=g).to(device)
    ours = MultiViewAugment(cfg, V)
    gen = torch.Generator(device=device).manual_seed(1)
    kor = _kornia_pipeline(cfg, device)
    tv = _torchvision_pipeline(cfg)
    chw = images.permute(0, 3, 1, 2)  # per-image inputs: (3, H, W) uint8 views

    def run_ours():
        ours(images, gen)

    def run_kornia():
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        kor(x.repeat(V, 1, 1, 1))

    def run_per_image():  # n_per_image views: images in turn, V views each
        done = 0
        while done < n_per_image:
            for b in range(B):
                for _ in range(V):
                    tv(chw[b])
                    done += 1
                if done >= n_per_image:
                    return

    jobs = {"ours": (run_ours, V * B), "kornia": (run_kornia, V * B)}
    if with_per_image:
        jobs["per_image"] = (run_per_image, n_per_image)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fn, _ in jobs.values():  # warm-up
            fn()
        _sync(device)
        rates = {k: [] for k in jobs}
        for _ in range(rounds):
            for k, (fn, views) in jobs.items():
                t0 = time.perf_counter()
                fn()
                _sync(device)
                rates[k].append(views / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in rates.items()}


def _line(name, value, baseline, baseline_name, config) -> dict:
    return dict(
        name=name,
        value=round(value, 1),
        baseline=round(baseline, 1),
        ratio=round(value / baseline, 2) if baseline else None,
        unit="views/s",
        higher_is_better=True,
        baseline_name=baseline_name,
        config=config,
    )


def run(quick: bool) -> list[dict]:
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out: list[dict] = []
    try:
        cpu = torch.device("cpu")
        cases = [(V, H, 32) for H in (32, 224) for V in (2, 5)]
        if not quick:
            cases += [(V, 224, 224) for V in (2, 5)]
        for V, H, crop in cases:
            cfg = AugmentConfig(crop_size=crop)
            if crop == 224:
                B, n_per_image, rounds = (16, 20, 3)
            elif H == 224:
                B, n_per_image, rounds = (64, 100, 5) if quick else (128, 400, 9)
            else:
                B, n_per_image, rounds = (128, 120, 5) if quick else (256, 500, 9)
            r = _measure(cfg, V, H, B, n_per_image, rounds, cpu)
            tag = f"V{V}.{H}px" + ("" if crop == 32 else f"_crop{crop}")
            config = dict(V=V, input_px=H, crop=crop, batch=B, device="cpu", threads=1, rounds=rounds,
                          per_image_views=n_per_image, recipe="AugmentConfig() defaults",
                          measure="median views/s over interleaved rounds")
            out.append(_line(f"augment.vs_per_image.{tag}", r["ours"], r["per_image"],
                             "torchvision.transforms.v2 per image per view", config))
            out.append(_line(f"augment.vs_kornia.{tag}", r["ours"], r["kornia"],
                             "kornia.augmentation batched (cropping_mode=resample)", config))
        if torch.cuda.is_available():
            torch.set_num_threads(prev_threads)
            dev = torch.device("cuda")
            for V, H, crop in [(5, 32, 32), (5, 224, 32), (2, 224, 224)]:
                cfg = AugmentConfig(crop_size=crop)
                B = 256 if crop == 32 else 64
                r = _measure(cfg, V, H, B, 0, 5, dev, with_per_image=False)
                tag = f"V{V}.{H}px" + ("" if crop == 32 else f"_crop{crop}")
                config = dict(V=V, input_px=H, crop=crop, batch=B, device=torch.cuda.get_device_name(0),
                              rounds=5, recipe="AugmentConfig() defaults")
                out.append(_line(f"augment.cuda.vs_kornia.{tag}", r["ours"], r["kornia"],
                                 "kornia.augmentation batched on the same GPU", config))
    finally:
        torch.set_num_threads(prev_threads)
    return out


if __name__ == "__main__":
    for rec in run(quick="--full" not in sys.argv[1:]):
        print(json.dumps(rec), flush=True)
