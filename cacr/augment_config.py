"""The augmentation recipe as plain data (no torch import).

Kept apart from ``cacr.augment`` so that the config tree, and with it the Ray Data decode tasks
that import it, never pay for importing torch (~650 MB and 1.5-2 s per decode process).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields


@dataclass
class AugmentConfig:
    """Augmentation recipe. Defaults: the paper's small-scale (CIFAR-size) recipe.

    Only plain ints / floats / bools / tuples, so a YAML config can fill it.
    """

    crop_size: int = 32
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 1.0  # the CACR reference always applies colour jitter (SimCLR: 0.8)
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.4
    jitter_random_order: bool = True
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_size: int = 0  # 0: auto, ~10% of crop_size, odd, >= 3 (23 for 224 px)
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5
    antialias: bool = True
    mean: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)  # CIFAR-10
    std: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

    def __post_init__(self) -> None:
        # YAML gives lists: store tuples so the config stays hashable and comparable.
        for name in ("scale", "ratio", "blur_sigma", "mean", "std"):
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
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            p = getattr(self, name)
            if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
                bad(name, "probability must lie in [0, 1]")
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
        return self

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


