"""Batched multi-view image augmentation on tensors (CPU or CUDA), no per-image Python loop.

`MultiViewAugment(cfg, V)(images)` turns a batch of uint8 images into V independently augmented
float views, shape (V, B, 3, crop, crop), following the SimCLR/CACR recipe:

    random-resized crop (+ horizontal flip)  ->  colour jitter (brightness, contrast, saturation,
    hue; per-sample random order)  ->  random grayscale  ->  [Gaussian blur]  ->  [solarize]
    ->  normalise with (mean, std)

How it is computed (all vectorised over images x views):
- Parameters are drawn for all V*B views at once by `sample_params` (torchvision's rules, see
  below); `apply` is deterministic given them, so the same generator seed gives the same output.
- Geometry: one bilinear `grid_sample` per chunk of images. The sampling grid of every view is
  stacked along the output height, so all V views of an image read the same input tensor (the
  input is converted to float once, not V times). Coordinates follow torchvision's
  `resized_crop(..., antialias=False)` exactly: integer crop box, half-pixel centres
  (align_corners=False) and clamping to the crop box at its borders. The flip is folded into the
  grid (x coordinates reversed).
- Anti-aliasing: when every possible crop is at least twice the output size (e.g. 224-px inputs
  cropped to 32 px), the input is first area-averaged by that integer factor (shared by all views),
  then bilinearly resampled. This is cheaper than torchvision's per-crop antialiased filter and close
  to it; with crop size equal to the input size (the usual recipes) it never triggers.
- Colour ops follow torchvision's float kernels: brightness = clamp(b*x), contrast = blend with the
  mean of the grayscale image, saturation = blend with the grayscale image, hue = exact HSV hue
  rotation computed in closed form on RGB (same result as torchvision's rgb->hsv->rgb round trip,
  without materialising HSV), grayscale weights (0.2989, 0.587, 0.114).
- Random order of the four jitter ops, per sample (as torchvision's ColorJitter draws a fresh
  permutation per image): views are sorted by their permutation so that each of the <= 24
  permutation groups is a contiguous slice, and the four ops run on those slices in place.
  `AugmentConfig.jitter_random_order=False` uses the fixed order brightness, contrast, saturation,
  hue (one group, slightly faster).
- On CPU the work runs in chunks of images sized to stay cache-resident (`chunk_elements`); on CUDA
  the whole batch is one chunk.

Devices and generators: parameters are drawn on the generator's device (or the images' device when
no generator is given) and then moved to the images' device. So a CPU generator with CUDA images
draws on CPU and gives the same parameters, hence (up to float rounding) the same views, as on CPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

__all__ = [
    "AugmentConfig",
    "AugmentParams",
    "MultiViewAugment",
    "sample_params",
    "JITTER_OPS",
]

#: Order codes used in `AugmentParams.jitter_order`.
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")

_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
_MAX_CROP_TRIES = 10  # torchvision RandomResizedCrop tries 10 candidates before the fallback


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


@dataclass
class AugmentParams:
    """Random parameters of V x B views; every tensor has leading shape (V, B).

    Crop boxes are integer pixel boxes in the input image (top, left, height, width), as in
    torchvision. Jitter factors are the effective ones: identity (1, 1, 1, 0) where `jitter` is False.
    """

    image_size: tuple[int, int]
    top: torch.Tensor
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    jitter_order: torch.Tensor  # (V, B, 4) int64, a permutation of range(4) (see JITTER_OPS)
    grayscale: torch.Tensor
    blur: torch.Tensor
    blur_sigma: torch.Tensor
    solarize: torch.Tensor

    _TENSORS = (
        "top", "left", "height", "width", "flip", "jitter", "brightness", "contrast", "saturation",
        "hue", "jitter_order", "grayscale", "blur", "blur_sigma", "solarize",
    )

    @property
    def num_views(self) -> int:
        return self.top.shape[0]

    @property
    def batch_size(self) -> int:
        return self.top.shape[1]

    @property
    def area_fraction(self) -> torch.Tensor:
        h, w = self.image_size
        return (self.height * self.width).double() / (h * w)

    @property
    def aspect_ratio(self) -> torch.Tensor:
        """width / height of each crop box."""
        return self.width.double() / self.height.double()

    def to(self, device: torch.device | str) -> "AugmentParams":
        moved = {n: getattr(self, n).to(device, non_blocking=True) for n in self._TENSORS}
        return AugmentParams(image_size=self.image_size, **moved)


def _uniform(lo: float, hi: float, shape, generator, device, dtype=torch.float32) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    return u.mul_(hi - lo).add_(lo)


def sample_params(
    cfg: AugmentConfig,
    num_views: int,
    batch_size: int,
    image_size: tuple[int, int],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> AugmentParams:
    """Draw the random parameters of `num_views` x `batch_size` views of (H, W) images.

    Drawn on `generator.device` if a generator is given, else on `device` (default CPU) with the
    global RNG. The sequence of draws does not depend on the probabilities, so changing e.g.
    `grayscale_p` does not reshuffle the crops of the same seed.

    Crop rule (torchvision RandomResizedCrop, vectorised): for each view, 10 candidates with area
    fraction ~ U(scale) and log aspect ratio ~ U(log ratio); w = round(sqrt(A * r)),
    h = round(sqrt(A / r)); the first candidate that fits is taken, with top/left uniform over the
    valid integer positions; if none fits, the centre crop with the ratio clamped to `ratio`.
    """
    if num_views < 1 or batch_size < 0:
        raise ValueError(f"need num_views >= 1 and batch_size >= 0, got {num_views}, {batch_size}")
    H, W = int(image_size[0]), int(image_size[1])
    if H < 1 or W < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if generator is not None:
        device = generator.device
    device = torch.device(device) if device is not None else torch.device("cpu")
    shape = (num_views, batch_size)
    T = _MAX_CROP_TRIES
    g = generator

    # --- random-resized crop (float64: exact integer boxes on every device) ---
    area = float(H * W)
    target = _uniform(cfg.scale[0], cfg.scale[1], shape + (T,), g, device, torch.float64).mul_(area)
    log_lo, log_hi = math.log(cfg.ratio[0]), math.log(cfg.ratio[1])
    aspect = _uniform(log_lo, log_hi, shape + (T,), g, device, torch.float64).exp_()
    cw = torch.sqrt(target * aspect).round_()
    ch = torch.sqrt(target / aspect).round_()
    fits = (cw > 0) & (cw <= W) & (ch > 0) & (ch <= H)
    first = fits.to(torch.uint8).argmax(dim=-1, keepdim=True)  # first True (0 if none)
    found = fits.any(dim=-1)
    in_ratio = W / H
    if in_ratio < min(cfg.ratio):
        fw, fh = W, int(round(W / min(cfg.ratio)))
    elif in_ratio > max(cfg.ratio):
        fw, fh = int(round(H * max(cfg.ratio))), H
    else:
        fw, fh = W, H
    width = torch.where(found, cw.gather(-1, first).squeeze(-1), float(fw))
    height = torch.where(found, ch.gather(-1, first).squeeze(-1), float(fh))
    u_top = torch.rand(shape, generator=g, device=device, dtype=torch.float64)
    u_left = torch.rand(shape, generator=g, device=device, dtype=torch.float64)
    top = torch.minimum(torch.floor(u_top * (H - height + 1)), H - height)
    left = torch.minimum(torch.floor(u_left * (W - width + 1)), W - width)
    top = torch.where(found, top, torch.div(H - height, 2, rounding_mode="floor"))
    left = torch.where(found, left, torch.div(W - width, 2, rounding_mode="floor"))

    # --- flip, colour jitter, grayscale, blur, solarize ---
    flip = torch.rand(shape, generator=g, device=device) < cfg.flip_p
    jitter = torch.rand(shape, generator=g, device=device) < cfg.jitter_p
    b = _uniform(max(0.0, 1 - cfg.brightness), 1 + cfg.brightness, shape, g, device)
    c = _uniform(max(0.0, 1 - cfg.contrast), 1 + cfg.contrast, shape, g, device)
    s = _uniform(max(0.0, 1 - cfg.saturation), 1 + cfg.saturation, shape, g, device)
    h = _uniform(-cfg.hue, cfg.hue, shape, g, device)
    order = torch.rand(shape + (4,), generator=g, device=device).argsort(dim=-1)
    if not cfg.jitter_random_order:
        order = torch.arange(4, device=device).expand(shape + (4,)).clone()
    gray = torch.rand(shape, generator=g, device=device) < cfg.grayscale_p
    blur = torch.rand(shape, generator=g, device=device) < cfg.blur_p
    sigma = _uniform(cfg.blur_sigma[0], cfg.blur_sigma[1], shape, g, device)
    solarize = torch.rand(shape, generator=g, device=device) < cfg.solarize_p

    one = torch.ones((), device=device)
    return AugmentParams(
        image_size=(H, W),
        top=top.long(), left=left.long(), height=height.long(), width=width.long(),
        flip=flip,
        jitter=jitter,
        brightness=torch.where(jitter, b, one),
        contrast=torch.where(jitter, c, one),
        saturation=torch.where(jitter, s, one),
        hue=torch.where(jitter, h, 0 * one),
        jitter_order=order,
        grayscale=gray,
        blur=blur,
        blur_sigma=sigma,
        solarize=solarize,
    )


# ----------------------------------------------------------------------------------------------
# colour kernels: in place on x of shape (n, 3, h, w) in [0, 1]; factors of shape (n,)
# ----------------------------------------------------------------------------------------------

def _gray(x: torch.Tensor) -> torch.Tensor:
    """(n, 3, h, w) -> (n, 1, h, w) luma with torchvision's weights."""
    wr, wg, wb = _GRAY_WEIGHTS
    return x[:, 0:1].mul(wr).add_(x[:, 1:2], alpha=wg).add_(x[:, 2:3], alpha=wb)


def _brightness_(x: torch.Tensor, f: torch.Tensor) -> None:
    x.mul_(f.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def _contrast_(x: torch.Tensor, f: torch.Tensor) -> None:
    # mean of the grayscale image = grayscale of the per-channel means (linear)
    w = x.new_tensor(_GRAY_WEIGHTS)
    m = x.mean(dim=(-2, -1)).matmul(w)  # (n,)
    f = f.view(-1, 1, 1, 1)
    x.mul_(f).add_((1.0 - f) * m.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def _saturation_(x: torch.Tensor, f: torch.Tensor) -> None:
    f = f.view(-1, 1, 1, 1)
    g = _gray(x).mul_(1.0 - f)
    x.mul_(f).add_(g).clamp_(0.0, 1.0)


def _hue_(x: torch.Tensor, shift: torch.Tensor, offsets: torch.Tensor) -> None:
    """Exact HSV hue rotation by `shift` (fraction of a turn), without building HSV.

    With v = max, C = max - min and hue H6 in [0, 6) (sextants), RGB = v - C * clamp(min(k, 4 - k),
    0, 1) with k = (H6 + n) mod 6 and n = 5, 3, 1 for R, G, B. Saturation and value are unchanged by
    a hue rotation, so only H6 moves: H6' = (H6 + 6 * shift) mod 6.
    """
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    minc, maxc = torch.aminmax(x, dim=1)
    cr = maxc - minc
    # hue numerator per the max channel (torchvision / PIL priority: r, then g, then b)
    num = torch.where(maxc == g, (b - r).add_(cr, alpha=2.0), (r - g).add_(cr, alpha=4.0))
    num = torch.where(maxc == r, g - b, num)
    h6 = num.div_(torch.where(cr > 0, cr, torch.ones((), device=x.device)))
    h6.add_(shift.view(-1, 1, 1), alpha=6.0)
    # k = (h6 + n) mod 6 for n = (5, 3, 1), all three channels in one op
    k = h6.unsqueeze(1).add(offsets).remainder_(6.0)
    t = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    torch.addcmul(maxc.unsqueeze(1), cr.unsqueeze(1), t, value=-1.0, out=x)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, ksize: int) -> torch.Tensor:
    """Per-sample Gaussian blur (torchvision's kernel, reflect padding), separable grouped conv."""
    n, c, h, w = x.shape
    half = (ksize - 1) * 0.5
    t = torch.linspace(-half, half, ksize, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2)
    k = k / k.sum(dim=1, keepdim=True)  # (n, ksize)
    k = k.repeat_interleave(c, dim=0)  # (n*c, ksize)
    pad = ksize // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k.view(n * c, 1, 1, ksize), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, ksize, 1), groups=n * c)
    return y.view(n, c, h, w)


class MultiViewAugment:
    """V augmented views per image, batched. See the module docstring for the exact semantics.

    Call: `aug(images, generator=None, *, layout="BHWC", channels_last=False)` with uint8 images
    (B, H, W, C) (or (B, C, H, W) with layout="BCHW"), C in {1, 3}; returns float32
    (V, B, 3, crop, crop), contiguous (or with channels-last strides per view if asked: then
    `out[v]` and `out.flatten(0, 1)` are channels_last 4-D tensors).
    """

    def __init__(self, cfg: AugmentConfig, num_views: int, *, chunk_elements: int = 1 << 20):
        cfg.validate()
        if not isinstance(num_views, int) or num_views < 1:
            raise ValueError(f"num_views must be an int >= 1, got {num_views!r}")
        self.cfg = cfg
        self.num_views = num_views
        self.chunk_elements = int(chunk_elements)
        self._ops_active = (
            cfg.jitter_p > 0 and cfg.brightness > 0,
            cfg.jitter_p > 0 and cfg.contrast > 0,
            cfg.jitter_p > 0 and cfg.saturation > 0,
            cfg.jitter_p > 0 and cfg.hue > 0,
        )

    def __repr__(self) -> str:
        return f"MultiViewAugment(num_views={self.num_views}, cfg={self.cfg})"

    # -- public API ----------------------------------------------------------------------------

    def sample_params(
        self,
        batch_size: int,
        image_size: tuple[int, int],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> AugmentParams:
        return sample_params(
            self.cfg, self.num_views, batch_size, image_size, generator=generator, device=device
        )

    def __call__(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        layout: str = "BHWC",
        channels_last: bool = False,
    ) -> torch.Tensor:
        B, _, H, W = self._check(images, layout)
        params = self.sample_params(
            B, (H, W), generator=generator, device=None if generator is not None else images.device
        )
        return self.apply(images, params, layout=layout, channels_last=channels_last)

    @torch.no_grad()
    def apply(
        self,
        images: torch.Tensor,
        params: AugmentParams,
        *,
        layout: str = "BHWC",
        channels_last: bool = False,
    ) -> torch.Tensor:
        """Deterministic part: augment `images` with the given parameters."""
        B, C, H, W = self._check(images, layout)
        V, c = self.num_views, self.cfg.crop_size
        if params.num_views != V or params.batch_size != B or tuple(params.image_size) != (H, W):
            raise ValueError(
                f"params are for V={params.num_views}, B={params.batch_size}, size={params.image_size}; "
                f"got V={V}, B={B}, size={(H, W)}"
            )
        device = images.device
        if params.top.device != device:
            params = params.to(device)
        if channels_last:
            out = torch.empty((V, B, c, c, 3), device=device).permute(0, 1, 4, 2, 3)
        else:
            out = torch.empty((V, B, 3, c, c), device=device)
        if B == 0:
            return out

        # images per chunk: all of them on accelerators, cache-sized chunks on CPU
        if device.type == "cpu":
            per_image = V * 3 * c * c + 3 * H * W
            step = max(1, self.chunk_elements // per_image)
        else:
            step = B
        prefilter = self._prefilter_factor(H, W)
        offsets = torch.tensor([5.0, 3.0, 1.0], device=device).view(1, 3, 1, 1)
        scale = torch.tensor([1.0 / s for s in self.cfg.std], device=device).view(1, 3, 1, 1)
        shift = torch.tensor([-m / s for m, s in zip(self.cfg.mean, self.cfg.std)], device=device)
        shift = shift.view(1, 3, 1, 1)
        for b0 in range(0, B, step):
            b1 = min(B, b0 + step)
            self._chunk(images[b0:b1], layout, C, params, b0, b1, prefilter, offsets, scale, shift, out)
        return out

    # -- internals -----------------------------------------------------------------------------

    @staticmethod
    def _check(images: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
        if layout not in ("BHWC", "BCHW"):
            raise ValueError(f"layout must be 'BHWC' or 'BCHW', got {layout!r}")
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(f"images must be a 4-D tensor ({layout}), got {getattr(images, 'shape', type(images))}")
        if images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8, got {images.dtype}")
        if layout == "BHWC":
            B, H, W, C = images.shape
        else:
            B, C, H, W = images.shape
        if C not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels, got {C} (layout {layout})")
        return B, C, H, W

    def _prefilter_factor(self, H: int, W: int) -> int:
        """Integer area-averaging factor applied before bilinear sampling (1 = none)."""
        cfg = self.cfg
        if not cfg.antialias:
            return 1
        # smallest crop side that sample_params can produce (candidates or the centre fallback)
        area = H * W * cfg.scale[0]
        min_w = min(math.sqrt(area * cfg.ratio[0]), W)
        min_h = min(math.sqrt(area / cfg.ratio[1]), H)
        k = int(min(min_w, min_h) // cfg.crop_size)
        return max(1, min(k, H, W))

    def _chunk(self, imgs, layout, C, p, b0, b1, prefilter, offsets, scale, shift, out) -> None:
        cfg = self.cfg
        V, c = self.num_views, cfg.crop_size
        Bc = b1 - b0
        H, W = p.image_size

        # 1. uint8 -> float in [0, 1], (Bc, C, H, W) contiguous, one pass
        src = imgs.permute(0, 3, 1, 2) if layout == "BHWC" else imgs
        x = torch.empty((Bc, C, H, W), device=imgs.device)
        torch.mul(src, 1.0 / 255.0, out=x)
        if prefilter > 1:
            hp, wp = H // prefilter, W // prefilter
            if H % prefilter == 0 and W % prefilter == 0:
                x = F.avg_pool2d(x, prefilter)
            else:
                x = F.adaptive_avg_pool2d(x, (hp, wp))
            sy, sx = H / hp, W / wp
        else:
            hp, wp, sy, sx = H, W, 1.0, 1.0

        # 2. geometry: all V views of an image stacked along the grid's height
        top, left = p.top[:, b0:b1].T, p.left[:, b0:b1].T  # (Bc, V)
        hh, ww = p.height[:, b0:b1].T, p.width[:, b0:b1].T
        flip = p.flip[:, b0:b1].T
        gx = self._axis_grid(left, ww, c, sx, wp, flip)  # (Bc, V, c)
        gy = self._axis_grid(top, hh, c, sy, hp, None)  # (Bc, V, c)
        grid = torch.stack(
            (gx.unsqueeze(2).expand(Bc, V, c, c), gy.unsqueeze(3).expand(Bc, V, c, c)), dim=-1
        ).view(Bc, V * c, c, 2)
        y = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        y = y.view(Bc, -1, V, c, c)  # (Bc, C, V, c, c)

        # 3. order views (v, b) so that each jitter permutation is a contiguous slice
        n = V * Bc
        v_idx = torch.arange(V, device=y.device).repeat_interleave(Bc)
        b_idx = torch.arange(Bc, device=y.device).repeat(V)
        order = p.jitter_order[:, b0:b1].reshape(n, 4)
        groups: list[tuple[int, int, tuple[int, ...]]]
        if cfg.jitter_random_order and any(self._ops_active):
            code = (order * order.new_tensor([64, 16, 4, 1])).sum(dim=1)
            code, sort = torch.sort(code, stable=True)
            v_idx, b_idx = v_idx[sort], b_idx[sort]
            uniq, counts = torch.unique_consecutive(code, return_counts=True)
            groups, start = [], 0
            for u, k in zip(uniq.tolist(), counts.tolist()):
                perm = (u // 64, (u // 16) % 4, (u // 4) % 4, u % 4)
                groups.append((start, start + k, perm))
                start += k
        else:
            sort = None
            groups = [(0, n, (0, 1, 2, 3))]
        xv = y[b_idx, :, v_idx]  # (n, C, c, c), copy
        if C == 1:
            xv = xv.expand(n, 3, c, c).contiguous()

        def take(t: torch.Tensor) -> torch.Tensor:
            t = t[:, b0:b1].reshape(n)
            return t if sort is None else t[sort]

        # 4. colour jitter, per group, in place on contiguous slices
        if any(self._ops_active):
            factors = (take(p.brightness), take(p.contrast), take(p.saturation), take(p.hue))
            for s0, s1, perm in groups:
                xs = xv[s0:s1]
                for op in perm:
                    if not self._ops_active[op]:
                        continue
                    f = factors[op][s0:s1]
                    if op == 0:
                        _brightness_(xs, f)
                    elif op == 1:
                        _contrast_(xs, f)
                    elif op == 2:
                        _saturation_(xs, f)
                    else:
                        _hue_(xs, f, offsets)

        # 5. grayscale / blur / solarize on the selected views only
        if cfg.grayscale_p > 0:
            sel = take(p.grayscale).nonzero().squeeze(1)
            if sel.numel():
                xv[sel] = _gray(xv[sel]).expand(-1, 3, c, c)
        if cfg.blur_p > 0:
            sel = take(p.blur).nonzero().squeeze(1)
            if sel.numel():
                xv[sel] = _gaussian_blur(xv[sel], take(p.blur_sigma)[sel], cfg.kernel_size())
        if cfg.solarize_p > 0:
            sel = take(p.solarize).nonzero().squeeze(1)
            if sel.numel():
                xs = xv[sel]
                xv[sel] = torch.where(xs >= cfg.solarize_threshold, 1.0 - xs, xs)

        # 6. normalise and scatter into out[v, b]
        xv.mul_(scale).add_(shift)
        out[v_idx, b_idx + b0] = xv

    @staticmethod
    def _axis_grid(start, length, c, s, size_p, flip):
        """Normalised sampling coordinates along one axis, (Bc, V, c).

        Output pixel o of a crop [start, start + length) samples the continuous source coordinate
        start + (o + 0.5) * length / c (torchvision resize, align_corners=False), clamped to the
        centres of the crop's first and last pixels; `s` maps source pixels to prefiltered ones.
        """
        o = torch.arange(c, device=start.device, dtype=torch.float32) + 0.5
        start = start.float().unsqueeze(-1)
        length = length.float().unsqueeze(-1)
        if flip is not None:
            o = torch.where(flip.unsqueeze(-1), c - o, o)
        u = (start + o * (length / c)) / s - 0.5  # index coordinate in the prefiltered image
        lo = start / s + 0.5 / s - 0.5
        hi = (start + length) / s - 0.5 / s - 0.5
        u = torch.minimum(torch.maximum(u, lo), hi)
        return u.mul_(2.0 / size_p).add_(1.0 / size_p - 1.0)
