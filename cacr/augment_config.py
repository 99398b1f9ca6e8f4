"""The augmentation recipe as plain data (no torch import).

Kept apart from ``cacr.augment`` so that the config tree, and with it the Ray Data decode tasks
that import it, never pay for importing torch (~650 MB and 1.5-2 s per decode process).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any


def _f(default: Any, help: str) -> Any:
    """A config field with its `--help` line (read by the CLI from `field.metadata["help"]`)."""
    return field(default=default, metadata={"help": help})


#: Fields that take one probability for every view or a list of per-view probabilities.
PER_VIEW_FIELDS = ("blur_p", "solarize_p")


@dataclass
class AugmentConfig:
    """Augmentation recipe. Defaults: the paper's small-scale (CIFAR-size) recipe.

    Only plain ints / floats / bools / tuples, so a YAML config can fill it.

    Per-view probabilities (`blur_p`, `solarize_p`): a number applies to every view; a list gives
    one value per view, in the order of the step's views (global views 0..V-1, then the local views
    V..V+L-1), cycling when there are more views than values: view i uses ``p[i % len(p)]``. So
    MoCo v3's asymmetric two-crop recipe is ``blur_p=[1.0, 0.1], solarize_p=[0.0, 0.2]``.

    Multi-crop: ``local_crops=L > 0`` adds L views of ``local_size`` pixels cropped with their own
    area range ``local_scale`` (same aspect range, flip, colour ops and normalisation).
    """

    crop_size: int = _f(32, "output size (pixels, square) of the global views")
    scale: tuple[float, float] = _f((0.2, 1.0), "random-resized-crop area range of the global "
                                                "views, as a fraction of the whole image")
    ratio: tuple[float, float] = _f((3 / 4, 4 / 3), "crop aspect-ratio range (width / height), "
                                                    "sampled log-uniformly")
    flip_p: float = _f(0.5, "horizontal flip probability")
    # the CACR reference always applies colour jitter (SimCLR: 0.8)
    jitter_p: float = _f(1.0, "probability of colour jitter (brightness, contrast, saturation, hue)")
    brightness: float = _f(0.4, "jitter brightness strength b: factor ~ U(1 - b, 1 + b)")
    contrast: float = _f(0.4, "jitter contrast strength: factor ~ U(1 - c, 1 + c)")
    saturation: float = _f(0.4, "jitter saturation strength: factor ~ U(1 - s, 1 + s)")
    hue: float = _f(0.4, "jitter hue shift range [-h, h] (fraction of a turn, <= 0.5)")
    jitter_random_order: bool = _f(True, "apply the four jitter ops in a random order per view")
    grayscale_p: float = _f(0.2, "random grayscale probability")
    blur_p: float | tuple[float, ...] = _f(
        0.0, "Gaussian blur probability: a number, or a list with one value per view "
             "(global then local views, cycling), e.g. [1.0, 0.1]")
    blur_sigma: tuple[float, float] = _f((0.1, 2.0), "Gaussian blur sigma range (pixels)")
    blur_kernel_size: int = _f(0, "blur kernel size: 0 = auto (~10% of the view size, odd, >= 3; "
                                  "23 px at 224), else an odd int >= 3")
    solarize_p: float | tuple[float, ...] = _f(
        0.0, "solarize probability: a number, or a list with one value per view "
             "(global then local views, cycling), e.g. [0.0, 0.2]")
    solarize_threshold: float = _f(0.5, "solarize threshold: x >= t becomes 1 - x")
    antialias: bool = _f(True, "pre-shrink large inputs (antialiased) before cropping small views")
    mean: tuple[float, float, float] = _f((0.4914, 0.4822, 0.4465),
                                          "per-channel normalisation mean (R, G, B); CIFAR-10")
    std: tuple[float, float, float] = _f((0.2470, 0.2435, 0.2616),
                                         "per-channel normalisation std (R, G, B); CIFAR-10")
    local_crops: int = _f(0, "multi-crop: number L of extra small (local) views per image")
    local_size: int = _f(96, "multi-crop: output size (pixels, square) of the local views")
    local_scale: tuple[float, float] = _f((0.05, 0.4), "multi-crop: crop area range of the local "
                                                       "views, as a fraction of the whole image")

    def __post_init__(self) -> None:
        # YAML gives lists: store tuples so the config stays hashable and comparable.
        for name in ("scale", "ratio", "blur_sigma", "mean", "std", "local_scale") + PER_VIEW_FIELDS:
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))

    def validate(self) -> "AugmentConfig":
        """Raise ValueError naming the field for any impossible value; return self."""

        def bad(name: str, why: str) -> None:
            raise ValueError(f"AugmentConfig.{name}={getattr(self, name)!r}: {why}")

        def pair(name: str) -> tuple[float, float]:
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or len(value) != 2:
                bad(name, "must be a pair (low, high)")
            lo, hi = value
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                bad(name, "must hold numbers")
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
                bad(name, "must be finite with low <= high")
            return float(lo), float(hi)

        if not isinstance(self.crop_size, int) or isinstance(self.crop_size, bool) or self.crop_size < 1:
            bad("crop_size", "must be an int >= 1")
        lo, hi = pair("scale")
        if not (0.0 < lo and hi <= 1.0):
            bad("scale", "must lie in (0, 1]")
        lo, hi = pair("ratio")
        if lo <= 0.0:
            bad("ratio", "must be > 0")
        def probability(p: Any) -> bool:
            return isinstance(p, (int, float)) and not isinstance(p, bool) and 0.0 <= p <= 1.0

        for name in ("flip_p", "jitter_p", "grayscale_p"):
            if not probability(getattr(self, name)):
                bad(name, "probability must lie in [0, 1]")
        for name in PER_VIEW_FIELDS:
            p = getattr(self, name)
            if isinstance(p, (tuple, list)):
                if not p:
                    bad(name, "a per-view list needs at least one value")
                if not all(probability(v) for v in p):
                    bad(name, "every per-view probability must be a number in [0, 1]")
            elif not probability(p):
                bad(name, "probability must lie in [0, 1] (a number, or a list with one per view)")
        for name in ("brightness", "contrast", "saturation"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not (0.0 <= v < math.inf):
                bad(name, "must be a finite number >= 0")
        if not isinstance(self.hue, (int, float)) or isinstance(self.hue, bool) or not 0.0 <= self.hue <= 0.5:
            bad("hue", "must lie in [0, 0.5]")
        lo, hi = pair("blur_sigma")
        if lo <= 0.0:
            bad("blur_sigma", "must be > 0")
        k = self.blur_kernel_size
        if not isinstance(k, int) or isinstance(k, bool) or k < 0 or (k > 0 and (k % 2 == 0 or k < 3)):
            bad("blur_kernel_size", "must be 0 (auto) or an odd int >= 3")
        if k > 2 * self.crop_size - 1:
            bad("blur_kernel_size", f"must be <= 2 * crop_size - 1 = {2 * self.crop_size - 1}")
        t = self.solarize_threshold
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0.0 <= t <= 1.0:
            bad("solarize_threshold", "must lie in [0, 1]")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or len(value) != 3:
                bad(name, "must hold 3 numbers (R, G, B)")
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in value):
                bad(name, "must hold finite numbers")
        if any(s <= 0 for s in self.std):
            bad("std", "must be > 0")
        for name in ("jitter_random_order", "antialias"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be a bool")
        for name in ("local_crops", "local_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "local_crops" else 1):
                bad(name, "must be an int >= " + ("0" if name == "local_crops" else "1"))
        lo, hi = pair("local_scale")
        if not (0.0 < lo and hi <= 1.0):
            bad("local_scale", "must lie in (0, 1]")
        if self.local_crops and k > 2 * self.local_size - 1:
            bad("blur_kernel_size", f"must be <= 2 * local_size - 1 = {2 * self.local_size - 1}")
        return self

    # -- per-view values and the local group ------------------------------------------------------

    def per_view(self, name: str, num_views: int, offset: int = 0) -> tuple[float, ...]:
        """Probability `name` of views offset .. offset + num_views - 1 (view i: p[i % len(p)])."""
        if name not in PER_VIEW_FIELDS:
            raise ValueError(f"AugmentConfig.{name} is not a per-view field ({', '.join(PER_VIEW_FIELDS)})")
        p = getattr(self, name)
        if not isinstance(p, (tuple, list)):
            return (float(p),) * num_views
        return tuple(float(p[(offset + i) % len(p)]) for i in range(num_views))

    def check_views(self, num_views: int) -> None:
        """Raise ValueError if a per-view list names more views than the step has."""
        total = num_views + self.local_crops
        for name in PER_VIEW_FIELDS:
            p = getattr(self, name)
            if isinstance(p, (tuple, list)) and len(p) > total:
                raise ValueError(
                    f"AugmentConfig.{name}={p!r}: lists {len(p)} per-view values but a step has only "
                    f"{total} views ({num_views} global + {self.local_crops} local)")

    def local_config(self, num_global_views: int) -> "AugmentConfig":
        """The recipe of the local views as a plain (single-group) config.

        Same colour ops, flip, aspect range and normalisation; `local_size` pixels, `local_scale`
        areas; the per-view probabilities of views num_global_views .. + local_crops - 1.
        """
        L = self.local_crops
        return replace(
            self, crop_size=self.local_size, scale=self.local_scale, local_crops=0,
            blur_p=self.per_view("blur_p", L, num_global_views) if L else 0.0,
            solarize_p=self.per_view("solarize_p", L, num_global_views) if L else 0.0,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AugmentConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"AugmentConfig: unknown keys {unknown}")
        return cls(**d)

    def kernel_size(self) -> int:
        if self.blur_kernel_size:
            return self.blur_kernel_size
        k = int(0.1 * self.crop_size)
        k = k if k % 2 == 1 else k + 1
        return max(3, min(k, 2 * self.crop_size - 1)) if self.crop_size >= 2 else 1


