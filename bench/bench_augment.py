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

Recipes of issue 13 / 15 (224-px inputs, MoCo v3 / BYOL-style colour ops: scale 0.08-1, jitter
p 0.8 with 0.4/0.4/0.2/0.1, grayscale 0.2, blur sigma 0.1-2 (23-px kernel at 224, 9 at 96),
solarize at 0.5, ImageNet mean/std; asymmetric per-view blur p [1.0, 0.1], solarize p [0.0, 0.2]):
  augment.vs_per_image.twocrop_asym.224px   augment.vs_kornia.twocrop_asym.224px
             two 224-px views (MoCo v3's asymmetric two crops), ours = view_groups in one call;
             torchvision / Kornia need one pipeline per distinct view recipe (blur / solarize p).
  augment.vs_per_image.multicrop_2x224_6x96.224px   augment.vs_kornia.multicrop_2x224_6x96.224px
             multi-crop: 2 global 224-px views + 6 local 96-px views (local scale 0.05-0.4; the
             per-view lists cycle over all 8 views), views/s counted over all 8 views.
  augment.canvas_vs_square.V2.{S}px_crop{c}
             full-image crops on an S x S canvas with `valid_hw` (aspect-preserving shard set:
             longer side S, shorter side ~ U[S/2, S], random orientation) vs the same tensor as
             plain square images (valid_hw=None), same output size: the cost of valid_hw. At crop
             32 from 224 the antialias prefilter runs, with the canvas edge replication.

Usage: ``python bench/bench_augment.py [--full]`` prints one JSON line per figure.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import warnings

import dataclasses

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


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def moco_recipe(**kw) -> AugmentConfig:
    """MoCo v3's asymmetric two-crop recipe at 224 px (+ multi-crop fields when given)."""
    base = dict(crop_size=224, scale=(0.08, 1.0), jitter_p=0.8, brightness=0.4, contrast=0.4,
                saturation=0.2, hue=0.1, grayscale_p=0.2, blur_p=(1.0, 0.1), solarize_p=(0.0, 0.2),
                mean=IMAGENET_MEAN, std=IMAGENET_STD)
    base.update(kw)
    return AugmentConfig(**base)


def _view_recipes(aug: MultiViewAugment) -> list[AugmentConfig]:
    """One single-view config per view of a step (global then local), scalar probabilities."""
    out = []
    for group in aug.groups:
        cfg = group.cfg
        for v in range(group.num_views):
            out.append(dataclasses.replace(cfg, local_crops=0, blur_p=cfg.per_view("blur_p", 1, v)[0],
                                           solarize_p=cfg.per_view("solarize_p", 1, v)[0]))
    return out


def _torchvision_view(cfg: AugmentConfig):
    """Per-image torchvision.v2 pipeline of one view recipe, blur and solarize included."""
    import torchvision.transforms.v2 as T

    k = cfg.kernel_size()
    return T.Compose([
        T.RandomResizedCrop(cfg.crop_size, scale=cfg.scale, ratio=cfg.ratio, antialias=True),
        T.RandomHorizontalFlip(cfg.flip_p),
        T.RandomApply([T.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)],
                      p=cfg.jitter_p),
        T.RandomGrayscale(cfg.grayscale_p),
        T.RandomApply([T.GaussianBlur(k, cfg.blur_sigma)], p=cfg.blur_p),
        T.RandomSolarize(round(cfg.solarize_threshold * 255), p=cfg.solarize_p),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(cfg.mean, cfg.std),
    ])


def _kornia_view(cfg: AugmentConfig, device):
    import kornia.augmentation as K

    c, k = cfg.crop_size, cfg.kernel_size()
    return K.AugmentationSequential(
        K.RandomResizedCrop((c, c), scale=cfg.scale, ratio=cfg.ratio, cropping_mode="resample"),
        K.RandomHorizontalFlip(p=cfg.flip_p),
        K.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, p=cfg.jitter_p),
        K.RandomGrayscale(p=cfg.grayscale_p),
        K.RandomGaussianBlur((k, k), cfg.blur_sigma, p=cfg.blur_p),
        K.RandomSolarize(thresholds=0.0, additions=0.0, p=cfg.solarize_p),  # fixed threshold 0.5
        K.Normalize(torch.tensor(cfg.mean), torch.tensor(cfg.std)),
    ).to(device)


def _measure_groups(cfg, V, H, B, n_per_image, rounds, device, with_per_image=True):
    """Views/s (all V + L views of a step) for ours (view_groups), kornia, per-image torchvision.

    The baselines run one pipeline per distinct view recipe: Kornia on the float batch repeated
    once per view of that recipe, torchvision per image and per view.
    """
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (B, H, H, 3), dtype=torch.uint8, generator=g).to(device)
    ours = MultiViewAugment(cfg, V)
    recipes = _view_recipes(ours)
    n_views = len(recipes)
    distinct: dict[str, list] = {}
    for r in recipes:
        distinct.setdefault(repr(r), [r, 0])[1] += 1
    gen = torch.Generator(device=device).manual_seed(1)
    kor = [(_kornia_view(r, device), count) for r, count in distinct.values()]
    tv = [_torchvision_view(r) for r in recipes]
    chw = images.permute(0, 3, 1, 2)

    def run_ours():
        ours.view_groups(images, generator=gen)

    def run_kornia():
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        for pipe, count in kor:
            pipe(x.repeat(count, 1, 1, 1))

    def run_per_image():
        done = 0
        while done < n_per_image:
            for b in range(B):
                for t in tv:
                    t(chw[b])
                done += n_views
                if done >= n_per_image:
                    return

    jobs = {"ours": (run_ours, n_views * B), "kornia": (run_kornia, n_views * B)}
    if with_per_image:
        jobs["per_image"] = (run_per_image, -(-n_per_image // n_views) * n_views)
    return _interleave(jobs, rounds, device)


def _interleave(jobs, rounds, device):
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


def canvas_sizes(B: int, S: int, seed: int = 0) -> torch.Tensor:
    """(B, 2) valid (height, width): longer side S, shorter ~ U[S/2, S], random orientation."""
    g = torch.Generator().manual_seed(seed)
    short = torch.randint(S // 2, S + 1, (B,), generator=g)
    tall = torch.rand(B, generator=g) < 0.5
    full = torch.full((B,), S)
    return torch.stack([torch.where(tall, full, short), torch.where(tall, short, full)], 1)


def _measure_canvas(cfg, V, S, B, rounds, device):
    """Views/s of the same (B, S, S, 3) tensor as a canvas (valid_hw) and as square images."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (B, S, S, 3), dtype=torch.uint8, generator=g).to(device)
    hw = canvas_sizes(B, S).to(device)
    aug = MultiViewAugment(cfg, V)
    gen = torch.Generator(device=device).manual_seed(1)
    jobs = {
        "canvas": (lambda: aug.view_groups(images, generator=gen, valid_hw=hw), V * B),
        "square": (lambda: aug.view_groups(images, generator=gen), V * B),
    }
    return _interleave(jobs, rounds, device)


def _recipe_lines(quick: bool, device) -> list[dict]:
    """The issue-13 recipes (two-crop asymmetric, multi-crop) and the issue-15 canvas lines."""
    out = []
    on_cpu = device.type == "cpu"
    where = "cpu" if on_cpu else torch.cuda.get_device_name(0)
    prefix = "augment" if on_cpu else "augment.cuda"
    cases = [("twocrop_asym", moco_recipe(), 2),
             ("multicrop_2x224_6x96", moco_recipe(local_crops=6, local_size=96, local_scale=(0.05, 0.4)), 2)]
    for tag, cfg, V in cases:
        if on_cpu:
            B, n_per_image, rounds = (8, 16, 3) if quick else (16, 48, 5)
        else:
            B, n_per_image, rounds = 128, 0, 5
        r = _measure_groups(cfg, V, 224, B, n_per_image, rounds, device, with_per_image=on_cpu)
        config = dict(V=V, local=cfg.local_crops, input_px=224, batch=B, device=where, rounds=rounds,
                      recipe="MoCo v3 asymmetric two-crop (blur [1.0, 0.1], solarize [0.0, 0.2])",
                      measure="median views/s (all views) over interleaved rounds")
        if on_cpu:
            config.update(threads=1, per_image_views=n_per_image)
            out.append(_line(f"{prefix}.vs_per_image.{tag}.224px", r["ours"], r["per_image"],
                             "torchvision.transforms.v2 per image per view", config))
        out.append(_line(f"{prefix}.vs_kornia.{tag}.224px", r["ours"], r["kornia"],
                         "kornia.augmentation batched, one pipeline per view recipe", config))
    for S, crop in [(256, 224), (224, 32)]:
        cfg = moco_recipe(crop_size=crop) if crop == 224 else AugmentConfig(crop_size=crop)
        B = (8 if quick else 16) if on_cpu and crop == 224 else (64 if on_cpu else 256)
        rounds = 3 if quick else 5
        r = _measure_canvas(cfg, 2, S, B, rounds, device)
        config = dict(V=2, canvas_px=S, crop=crop, batch=B, device=where, rounds=rounds,
                      valid_hw="longer side S, shorter ~ U[S/2, S]",
                      recipe="MoCo v3 asymmetric" if crop == 224 else "AugmentConfig() defaults")
        out.append(_line(f"{prefix}.canvas_vs_square.V2.{S}px_crop{crop}", r["canvas"], r["square"],
                         "same tensor as square images (valid_hw=None)", config))
    return out


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
        out += _recipe_lines(quick, cpu)
        if torch.cuda.is_available():
            torch.set_num_threads(prev_threads)
            out += cuda_lines(quick)
    finally:
        torch.set_num_threads(prev_threads)
    return out


def cuda_lines(quick: bool) -> list[dict]:
    """Ours vs Kornia, both batched on the same GPU (also run by bench/gpu.sh via bench_gpu)."""
    dev = torch.device("cuda")
    out = []
    for V, H, crop in [(5, 32, 32), (5, 224, 32), (2, 224, 224)]:
        cfg = AugmentConfig(crop_size=crop)
        B = 256 if crop == 32 else 64
        r = _measure(cfg, V, H, B, 0, 5, dev, with_per_image=False)
        tag = f"V{V}.{H}px" + ("" if crop == 32 else f"_crop{crop}")
        config = dict(V=V, input_px=H, crop=crop, batch=B, device=torch.cuda.get_device_name(0),
                      rounds=5, recipe="AugmentConfig() defaults")
        out.append(_line(f"augment.cuda.vs_kornia.{tag}", r["ours"], r["kornia"],
                         "kornia.augmentation batched on the same GPU", config))
    return out + _recipe_lines(quick, dev)


if __name__ == "__main__":
    for rec in run(quick="--full" not in sys.argv[1:]):
        print(json.dumps(rec), flush=True)
