"""Batched multi-view image augmentation on tensors (CPU or CUDA), no per-image Python loop.

`MultiViewAugment(cfg, V)(images)` turns a batch of uint8 images into V independently augmented
float views, shape (V, B, 3, crop, crop), following the SimCLR/CACR recipe:

    random-resized crop (+ horizontal flip)  ->  colour jitter (brightness, contrast, saturation,
    hue; per-sample random order)  ->  random grayscale  ->  [Gaussian blur]  ->  [solarize]
    ->  normalise with (mean, std)

Input: uint8 (B, H, W, C) (the data pipeline's layout) or (B, C, H, W) with layout="BCHW";
C = 3, or C = 1 (replicated to RGB). Output: float32 (V, B, 3, crop, crop), contiguous; with
`channels_last=True` each view out[v] (and out.flatten(0, 1)) has channels-last strides.

Recipes beyond the symmetric one:
- Per-view probabilities: `blur_p` / `solarize_p` may be lists, view i using p[i % len(p)] (MoCo
  v3's asymmetric two crops: blur [1.0, 0.1], solarize [0.0, 0.2]); drawn as one (V, B) uniform
  compared with a (V, 1) column of probabilities, so still one draw for all views.
- Multi-crop: with `local_crops = L > 0`, `view_groups` also returns L local views of
  `local_size` px cropped with `local_scale` areas, [global (V, B, 3, S, S), local (L, B, 3, s, s)].
  The local views are a second single-group augmenter (`cfg.local_config(V)`, its per-view values
  continuing at view index V); both groups run in the same pass over chunks of images and share
  each chunk's float copy when their input preparation agrees.
- Canvases: `valid_hw` (B, 2) gives each image's real (height, width) inside a fixed-size canvas,
  top-left aligned (aspect-preserving shard sets). Crop boxes are then drawn per image against its
  own whole area and aspect (torchvision's RandomResizedCrop rule with per-image H_b, W_b, fallback
  included), so they never touch the padding; bilinear taps are clamped to the box, and before the
  antialias prefilter the image's last row / column are replicated over the padding band that the
  filter can reach (`_replicate_edges`). One prefilter
  factor serves the batch (from its smallest image), keeping it one batched resize.

How it is computed (vectorised over images x views; the only Python loops are over chunks of
images and over the 4 x 4 (jitter step, op) slots):
- Parameters are drawn for all V*B views at once by `sample_params` (torchvision's rules: see its
  docstring); `apply` is deterministic given them, so the same generator seed gives the same output.
- Geometry: one bilinear `grid_sample` per chunk of images. The V sampling grids of an image are
  stacked along the output height, so all V views read the same input tensor (the input is
  converted to float once, not V times). Coordinates follow torchvision's
  `resized_crop(..., antialias=False)` exactly: integer crop box, half-pixel centres
  (align_corners=False), clamped to the crop box at its borders. The horizontal flip is folded
  into the grid (x coordinates reversed).
- Anti-aliasing (`antialias=True`): when the smallest possible crop still spans >= 1.5x the output
  size (e.g. 224-px inputs cropped to 32 px), the whole image is first reduced once (shared by the
  V views) with torchvision's antialiased bilinear resize (on CPU on uint8, the fast AVX path),
  to the size where that smallest crop maps to `crop_size` pixels; then bilinear sampling. Close
  to torchvision's per-crop antialiased resize (tested), much cheaper. Never triggers when the
  crop size is about the input size (the CIFAR and ImageNet recipes).
- Colour ops follow torchvision's float kernels: brightness = clamp(b x), contrast = blend with
  the mean of the grayscale image, saturation = blend with the grayscale image, hue = exact HSV
  hue rotation in closed form on RGB (same values as torchvision's rgb -> hsv -> rgb round trip,
  without building HSV), grayscale weights (0.2989, 0.587, 0.114); blur = torchvision's Gaussian
  kernel with reflect padding (per-view sigma, grouped separable convolution); solarize = 1 - x
  where x >= threshold. Each view equals torchvision's functional ops applied to it with the same
  parameters to ~1e-5 (tested view by view).
- Jitter order: a fresh random permutation of the four ops per view (as torchvision's ColorJitter
  draws per image). At each of the 4 steps the views are regrouped (a stable sort + one gather) so
  that the views applying the same op form a contiguous slice; each op then runs once per step, in
  place. `jitter_random_order=False` uses the fixed order brightness, contrast, saturation, hue
  (no regrouping, a bit faster).
- Work runs in chunks of images: on CPU sized to stay cache-resident (`chunk_elements`), with
  scratch buffers reused across chunks; on accelerators in large chunks
  (`device_chunk_elements`, only to bound scratch memory).

Devices and generators: parameters are drawn on the generator's device (or the images' device when
no generator is given) and then moved to the images' device. So a CPU generator with CUDA images
draws on CPU and gives the same parameters, hence (up to float rounding) the same views, as on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


from cacr.augment_config import AugmentConfig  # noqa: E402  (re-exported)

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
    valid_hw: torch.Tensor | None = None  # (B, 2) int64: each image's (height, width) on the canvas

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
        """Crop area / area of its image (the image's valid region when `valid_hw` is set)."""
        if self.valid_hw is not None:
            hw = self.valid_hw.to(self.height.device).double()
            return (self.height * self.width).double() / (hw[:, 0] * hw[:, 1])
        h, w = self.image_size
        return (self.height * self.width).double() / (h * w)

    @property
    def aspect_ratio(self) -> torch.Tensor:
        """width / height of each crop box."""
        return self.width.double() / self.height.double()

    def to(self, device: torch.device | str) -> "AugmentParams":
        moved = {n: getattr(self, n).to(device, non_blocking=True) for n in self._TENSORS}
        hw = None if self.valid_hw is None else self.valid_hw.to(device, non_blocking=True)
        return AugmentParams(image_size=self.image_size, valid_hw=hw, **moved)


def check_valid_hw(valid_hw, batch_size: int, image_size: tuple[int, int]) -> torch.Tensor:
    """`valid_hw` as an (n, 2) int64 tensor on its device; ValueError for a malformed one.

    Row b = (height, width) of image b, which occupies the top-left corner of the (H, W) canvas.
    """
    H, W = int(image_size[0]), int(image_size[1])
    if not isinstance(valid_hw, torch.Tensor):
        valid_hw = torch.as_tensor(valid_hw)
    if valid_hw.shape != (batch_size, 2):
        raise ValueError(f"valid_hw must have shape (n, 2) = ({batch_size}, 2) (each image's height, "
                         f"width), got {tuple(valid_hw.shape)}")
    if valid_hw.dtype.is_floating_point or valid_hw.dtype.is_complex or valid_hw.dtype == torch.bool:
        raise ValueError(f"valid_hw must hold integers, got {valid_hw.dtype}")
    valid_hw = valid_hw.long()
    if batch_size:
        lo = valid_hw.amin(0).tolist()
        hi = valid_hw.amax(0).tolist()
        if min(lo) < 1 or hi[0] > H or hi[1] > W:
            raise ValueError(f"valid_hw must lie in [1, {H}] x [1, {W}] (the canvas), got heights "
                             f"{lo[0]}..{hi[0]} and widths {lo[1]}..{hi[1]}")
    return valid_hw


def _crop_boxes(cfg: AugmentConfig, u64: torch.Tensor, Hs: torch.Tensor, Ws: torch.Tensor):
    """RandomResizedCrop boxes (top, left, height, width), float64 integers, of shape (V, B).

    Vectorised torchvision rule, per image of size (Hs, Ws) (float64, broadcast against (V, B)):
    10 candidates with area A = U(scale) * Hs * Ws and aspect r = exp(U(log ratio));
    w = round(sqrt(A r)), h = round(sqrt(A / r)) (round half to even, as Python's round); the first
    candidate with 0 < w <= Ws and 0 < h <= Hs is taken, top ~ U{0..Hs-h}, left ~ U{0..Ws-w}; if
    none fits, the centre crop of the whole image with its aspect clamped to `ratio`.
    """
    T = _MAX_CROP_TRIES
    Ha, Wa = Hs.unsqueeze(-1), Ws.unsqueeze(-1)
    target = u64[..., :T].mul(cfg.scale[1] - cfg.scale[0]).add_(cfg.scale[0]).mul_(Ha * Wa)
    log_lo, log_hi = math.log(cfg.ratio[0]), math.log(cfg.ratio[1])
    aspect = u64[..., T : 2 * T].mul(log_hi - log_lo).add_(log_lo).exp_()
    cw = torch.sqrt(target * aspect).round_()
    ch = torch.sqrt(target / aspect).round_()
    fits = (cw > 0) & (cw <= Wa) & (ch > 0) & (ch <= Ha)
    first = fits.to(torch.uint8).argmax(dim=-1, keepdim=True)  # first True (0 if none)
    found = fits.any(dim=-1)
    # fallback: too narrow -> full width, too wide -> full height, else the whole image
    rmin, rmax = min(cfg.ratio), max(cfg.ratio)
    in_ratio = Ws / Hs
    fw = torch.where(in_ratio > rmax, torch.round(Hs * rmax), Ws)
    fh = torch.where(in_ratio < rmin, torch.round(Ws / rmin), Hs)
    width = torch.where(found, cw.gather(-1, first).squeeze(-1), fw)
    height = torch.where(found, ch.gather(-1, first).squeeze(-1), fh)
    top = torch.minimum(torch.floor(u64[..., 2 * T] * (Hs - height + 1)), Hs - height)
    left = torch.minimum(torch.floor(u64[..., 2 * T + 1] * (Ws - width + 1)), Ws - width)
    top = torch.where(found, top, torch.div(Hs - height, 2, rounding_mode="floor"))
    left = torch.where(found, left, torch.div(Ws - width, 2, rounding_mode="floor"))
    return top, left, height, width


def sample_params(
    cfg: AugmentConfig,
    num_views: int,
    batch_size: int,
    image_size: tuple[int, int],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    valid_hw: torch.Tensor | None = None,
) -> AugmentParams:
    """Draw the random parameters of `num_views` x `batch_size` views of (H, W) images.

    Drawn on `generator.device` if a generator is given, else on `device` (default CPU) with the
    global RNG. The sequence of draws does not depend on the probabilities, so changing e.g.
    `grayscale_p` does not reshuffle the crops of the same seed.

    Crop rule: torchvision's RandomResizedCrop, vectorised (see `_crop_boxes`), against the whole
    (H, W) image, or with `valid_hw` ((B, 2) ints) against each image's own (height, width) in the
    top-left corner of the (H, W) canvas: area fractions and aspect ratios are those of the image,
    not of the canvas. Per-view probabilities (`blur_p`, `solarize_p` lists) follow
    `cfg.per_view`: view v uses p[v % len(p)].
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
    if valid_hw is not None:
        valid_hw = check_valid_hw(valid_hw, batch_size, (H, W))
    Hs, Ws = _crop_areas(valid_hw, (H, W), device)

    # two draws in all: float64 for the crop geometry (exact integer boxes on every device), float32
    # for the rest; columns: [0, T) area, [T, 2T) log-ratio, 2T top, 2T + 1 left
    u64 = torch.rand(shape + (2 * T + 2,), generator=generator, device=device, dtype=torch.float64)
    u = torch.rand(shape + (15,), generator=generator, device=device)
    top, left, height, width = _crop_boxes(cfg, u64, Hs, Ws)
    return AugmentParams(
        image_size=(H, W),
        top=top.long(), left=left.long(), height=height.long(), width=width.long(),
        **_photometric_params(cfg, u, num_views),
        valid_hw=valid_hw,
    )


def _crop_areas(valid_hw: torch.Tensor | None, image_size: tuple[int, int],
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(heights, widths) the crop boxes are drawn against, float64: each image's own (B,) with a
    canvas, else the whole image's (1,) (both broadcast against (V, B))."""
    if valid_hw is not None:
        hw = valid_hw.to(device).double()
        return hw[:, 0], hw[:, 1]
    H, W = image_size
    return (torch.full((1,), float(H), dtype=torch.float64, device=device),
            torch.full((1,), float(W), dtype=torch.float64, device=device))


def _photometric_params(cfg: AugmentConfig, u: torch.Tensor, num_views: int) -> dict[str, torch.Tensor]:
    """Flip, colour jitter (factors, order), grayscale, blur and solarize of every view from the
    (V, B, 15) uniforms ``u`` (column 14 spare). Factors of views without jitter are the identity."""
    device = u.device

    def uniform(col: int, lo: float, hi: float) -> torch.Tensor:
        return u[..., col].mul(hi - lo).add_(lo)

    def per_view(name: str) -> torch.Tensor:  # (V, 1) probabilities, float32 like u
        return torch.tensor(cfg.per_view(name, num_views), device=device).view(num_views, 1)

    jitter = u[..., 1] < cfg.jitter_p
    b = uniform(2, max(0.0, 1 - cfg.brightness), 1 + cfg.brightness)
    c = uniform(3, max(0.0, 1 - cfg.contrast), 1 + cfg.contrast)
    s = uniform(4, max(0.0, 1 - cfg.saturation), 1 + cfg.saturation)
    h = uniform(5, -cfg.hue, cfg.hue)
    if cfg.jitter_random_order:
        order = u[..., 6:10].argsort(dim=-1)
    else:
        order = torch.arange(4, device=device).expand(u.shape[:2] + (4,)).clone()
    one = torch.ones((), device=device)
    return dict(
        flip=u[..., 0] < cfg.flip_p,
        jitter=jitter,
        brightness=torch.where(jitter, b, one),
        contrast=torch.where(jitter, c, one),
        saturation=torch.where(jitter, s, one),
        hue=torch.where(jitter, h, 0 * one),
        jitter_order=order,
        grayscale=u[..., 10] < cfg.grayscale_p,
        blur=u[..., 11] < per_view("blur_p"),
        blur_sigma=uniform(12, cfg.blur_sigma[0], cfg.blur_sigma[1]),
        solarize=u[..., 13] < per_view("solarize_p"),
    )


# ----------------------------------------------------------------------------------------------
# Colour kernels: in place on a contiguous x of shape (n, 3, h, w) with values in [0, 1], with
# per-sample factors of shape (n,). `ws` is a float scratch buffer of shape (>= 8, >= n, h, w):
# on CPU, fresh image-sized allocations and boolean masks cost more than the arithmetic, so the
# kernels write into scratch planes and select with float 0/1 masks through `lerp_` (exact at
# weights 0 and 1).
# ----------------------------------------------------------------------------------------------

def _gray_into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """(n, 3, h, w) -> out (n, h, w): luma with torchvision's weights."""
    wr, wg, wb = _GRAY_WEIGHTS
    torch.mul(x[:, 0], wr, out=out)
    out.add_(x[:, 1], alpha=wg)
    return out.add_(x[:, 2], alpha=wb)


def _brightness_(x: torch.Tensor, f: torch.Tensor) -> None:
    # f >= 0 and x >= 0: only the upper clamp can act
    x.mul_(f.view(-1, 1, 1, 1)).clamp_max_(1.0)


def _contrast_(x: torch.Tensor, f: torch.Tensor, gray_mean_w: torch.Tensor) -> None:
    # mean of the grayscale image: one matrix-vector product with the luma weights / (h * w)
    m = torch.mv(x.view(x.shape[0], -1), gray_mean_w)  # (n,)
    x.mul_(f.view(-1, 1, 1, 1)).add_(((1.0 - f) * m).view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def _saturation_(x: torch.Tensor, f: torch.Tensor, ws: torch.Tensor) -> None:
    # f * x + (1 - f) * gray = lerp(x, gray, 1 - f)
    g = _gray_into(x, ws[0, : x.shape[0]]).unsqueeze(1)
    x.lerp_(g.expand_as(x), (1.0 - f).view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def _hue_(x: torch.Tensor, shift: torch.Tensor, ws: torch.Tensor, centers: torch.Tensor) -> None:
    """Exact HSV hue rotation by `shift` (a fraction of a turn) without building HSV.

    With v = max, m = min, C = v - m and the hue H in sextants [0, 6), a hue rotation keeps v and
    C and moves H to H' = (H + 6 * shift) mod 6; then
        R = m + C * clamp(|H' - 3| - 1, 0, 1),  G = v - C * clamp(|H' - 2| - 1, 0, 1),
        B = v - C * clamp(|H' - 4| - 1, 0, 1),
    which is the piecewise-linear HSV -> RGB map (torchvision's adjust_hue up to float rounding).
    """
    n = x.shape[0]
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    vmax, vmin, cr, h6, t1, t2, is_r, is_g = ws[:8, :n].unbind(0)
    torch.amax(x, dim=1, out=vmax)
    torch.amin(x, dim=1, out=vmin)
    torch.sub(vmax, vmin, out=cr)
    # hue numerator by the max channel (torchvision / PIL priority: r, then g, then b)
    torch.eq(vmax, r, out=is_r)
    torch.eq(vmax, g, out=is_g)
    torch.sub(g, b, out=h6)
    torch.sub(b, r, out=t1).add_(cr, alpha=2.0)
    torch.sub(r, g, out=t2).add_(cr, alpha=4.0)
    t2.lerp_(t1, is_g).lerp_(h6, is_r)
    # cr == 0 means r == g == b, where the numerator is exactly 0: any positive divisor works
    torch.div(t2, torch.clamp_min(cr, 1e-12, out=t1), out=h6)
    h6.add_(shift.view(-1, 1, 1), alpha=6.0)
    torch.mul(h6, 1.0 / 6.0, out=t1).floor_()
    h6.add_(t1, alpha=-6.0)  # h6 mod 6, in [0, 6)
    # the three channels at once: s = clamp(|H' - c| - 1, 0, 1) = clamp(|H' - c|, 1, 2) - 1
    torch.sub(h6.unsqueeze(1), centers, out=x)
    x.abs_().clamp_(1.0, 2.0).mul_(cr.unsqueeze(1))  # C * (s + 1)
    r.add_(torch.sub(vmin, cr, out=t1))  # R = (m - C) + C (s + 1)
    gb = x[:, 1:]
    torch.sub(torch.add(vmax, cr, out=t1).unsqueeze(1), gb, out=gb)  # G, B = (v + C) - C (s + 1)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, ksize: int) -> torch.Tensor:
    """Per-sample Gaussian blur (torchvision's kernel, reflect padding), separable grouped conv."""
    n, c, h, w = x.shape
    half = (ksize - 1) * 0.5
    t = torch.linspace(-half, half, ksize, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n * c, ksize)
    pad = ksize // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k.view(n * c, 1, 1, ksize), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, ksize, 1), groups=n * c)
    return y.view(n, c, h, w)


class MultiViewAugment:
    """V augmented views per image, batched. See the module docstring for the exact semantics.

    Call: `aug(images, generator=None, *, layout="BHWC", channels_last=False, valid_hw=None)` with
    uint8 images (B, H, W, C) (or (B, C, H, W) with layout="BCHW"), C in {1, 3}; returns float32
    (V, B, 3, crop, crop), contiguous (or with channels-last strides per view if asked: then
    `out[v]` and `out.flatten(0, 1)` are channels_last 4-D tensors): the global views only.

    `view_groups(images, ...)` returns every group of the step: [global (V, B, 3, crop, crop),
    local (L, B, 3, local_size, local_size)] with `cfg.local_crops = L > 0`, else [global]. Its
    global group equals `aug(images, generator)` for the same generator state (the local
    parameters are drawn after the global ones).

    `valid_hw`: None (each image fills the (H, W) input), or an (B, 2) int tensor of each image's
    real (height, width) on a fixed-size canvas, top-left aligned; crop boxes are then drawn against
    each image's own area and aspect, and never read outside it.

    `chunk_elements`: images are processed in chunks of about this many float view elements
    (CPU: cache-sized by default; other devices: `device_chunk_elements`, bounding scratch
    memory). Results do not depend on the chunking. An instance keeps no state between calls
    and can be shared by threads.
    """

    def __init__(
        self,
        cfg: AugmentConfig,
        num_views: int,
        *,
        chunk_elements: int = 1 << 19,
        device_chunk_elements: int = 1 << 24,
    ):
        cfg.validate()
        if not isinstance(num_views, int) or isinstance(num_views, bool) or num_views < 1:
            raise ValueError(f"num_views must be an int >= 1, got {num_views!r}")
        cfg.check_views(num_views)
        self.cfg = cfg
        self.num_views = num_views
        self.chunk_elements = max(1, int(chunk_elements))
        self.device_chunk_elements = max(1, int(device_chunk_elements))
        on = cfg.jitter_p > 0
        self._ops_active = (
            on and cfg.brightness > 0,
            on and cfg.contrast > 0,
            on and cfg.saturation > 0,
            on and cfg.hue > 0,
        )
        # the local views are a second, plain (single-group) augmenter sharing the input chunks
        self.local = (
            MultiViewAugment(cfg.local_config(num_views), cfg.local_crops,
                             chunk_elements=chunk_elements, device_chunk_elements=device_chunk_elements)
            if cfg.local_crops else None
        )

    def __repr__(self) -> str:
        return f"MultiViewAugment(num_views={self.num_views}, cfg={self.cfg})"

    @property
    def groups(self) -> list["MultiViewAugment"]:
        """The single-group augmenters of a step: [global] or [global, local]."""
        return [self] if self.local is None else [self, self.local]

    # -- public API ----------------------------------------------------------------------------

    def sample_params(
        self,
        batch_size: int,
        image_size: tuple[int, int],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        valid_hw: torch.Tensor | None = None,
    ) -> AugmentParams:
        """`sample_params(self.cfg, self.num_views, ...)`: the global views only."""
        return sample_params(
            self.cfg, self.num_views, batch_size, image_size, generator=generator, device=device,
            valid_hw=valid_hw,
        )

    def sample_groups(
        self,
        batch_size: int,
        image_size: tuple[int, int],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        valid_hw: torch.Tensor | None = None,
    ) -> list[AugmentParams]:
        """Parameters of every group, in `groups` order (global first, so its draws come first)."""
        return [
            a.sample_params(batch_size, image_size, generator=generator, device=device, valid_hw=valid_hw)
            for a in self.groups
        ]

    def __call__(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        layout: str = "BHWC",
        channels_last: bool = False,
        valid_hw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, _, H, W = self._check(images, layout)
        params = self.sample_params(
            B, (H, W), generator=generator, device=None if generator is not None else images.device,
            valid_hw=valid_hw,
        )
        return self.apply(images, params, layout=layout, channels_last=channels_last)

    def view_groups(
        self,
        images: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        channels_last: bool = False,
        valid_hw: torch.Tensor | None = None,
        layout: str = "BHWC",
    ) -> list[torch.Tensor]:
        """[global (V, B, 3, S, S), local (L, B, 3, s, s)] (just [global] when L = 0)."""
        B, _, H, W = self._check(images, layout)
        params = self.sample_groups(
            B, (H, W), generator=generator, device=None if generator is not None else images.device,
            valid_hw=valid_hw,
        )
        return self.apply_groups(images, params, layout=layout, channels_last=channels_last)

    def apply(
        self,
        images: torch.Tensor,
        params: AugmentParams,
        *,
        layout: str = "BHWC",
        channels_last: bool = False,
    ) -> torch.Tensor:
        """Deterministic part: augment `images` with the given parameters (moved to its device)."""
        return _apply([(self, params)], images, layout, channels_last)[0]

    def apply_groups(
        self,
        images: torch.Tensor,
        params: list[AugmentParams],
        *,
        layout: str = "BHWC",
        channels_last: bool = False,
    ) -> list[torch.Tensor]:
        """Deterministic part of `view_groups`: `params` as returned by `sample_groups`."""
        groups = self.groups
        if len(params) != len(groups):
            raise ValueError(f"params hold {len(params)} groups; this augmenter has {len(groups)}")
        return _apply(list(zip(groups, params)), images, layout, channels_last)

    # -- internals -----------------------------------------------------------------------------

    @staticmethod
    def _check(images: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
        if layout not in ("BHWC", "BCHW"):
            raise ValueError(f"layout must be 'BHWC' or 'BCHW', got {layout!r}")
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            shape = getattr(images, "shape", type(images))
            raise ValueError(f"images must be a 4-D uint8 tensor ({layout}), got {shape}")
        if images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8, got {images.dtype}")
        if layout == "BHWC":
            B, H, W, C = images.shape
        else:
            B, C, H, W = images.shape
        if C not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels, got {C} (layout {layout})")
        if H < 1 or W < 1:
            raise ValueError(f"images must be non-empty, got {tuple(images.shape)}")
        return B, C, H, W

    def prefilter_size(self, H: int, W: int, valid_hw: torch.Tensor | None = None) -> tuple[int, int] | None:
        """Size to which (H, W) inputs are reduced (antialiased) before bilinear sampling, or None.

        Chosen so that the smallest crop `sample_params` can draw still spans >= crop_size pixels
        of the reduced image; used only when that shrinks the image by >= 1.5x (antialias=True).
        With `valid_hw` the smallest crop is that of the batch's smallest image (one reduction
        factor for the whole canvas batch keeps it a single batched resize).
        """
        cfg = self.cfg
        if not cfg.antialias:
            return None
        if valid_hw is None:
            hs = torch.tensor([float(H)], dtype=torch.float64)
            ws = torch.tensor([float(W)], dtype=torch.float64)
        elif valid_hw.shape[0] == 0:
            return None
        else:
            hs, ws = valid_hw[:, 0].double(), valid_hw[:, 1].double()
        area = hs * ws * cfg.scale[0]
        min_w = torch.minimum(torch.sqrt(area * cfg.ratio[0]), ws)
        min_h = torch.minimum(torch.sqrt(area / cfg.ratio[1]), hs)
        k = float(torch.minimum(min_w, min_h).min()) / cfg.crop_size
        if k < 1.5:
            return None
        return max(1, math.ceil(H / k)), max(1, math.ceil(W / k))


def _apply(
    jobs: list[tuple[MultiViewAugment, AugmentParams]], images: torch.Tensor, layout: str,
    channels_last: bool,
) -> list[torch.Tensor]:
    """Augment `images` for every (augmenter, params) group; one pass over chunks of images.

    Groups whose input needs the same preparation (the same prefilter size) share one float copy
    of each chunk.
    """
    B, C, H, W = MultiViewAugment._check(images, layout)
    device = images.device
    for aug, params in jobs:
        V = aug.num_views
        if params.num_views != V or params.batch_size != B or tuple(params.image_size) != (H, W):
            raise ValueError(
                f"params are for V={params.num_views}, B={params.batch_size}, "
                f"size={tuple(params.image_size)}; got V={V}, B={B}, size={(H, W)}"
            )
    with torch.no_grad():  # not inference_mode: the views feed autograd
        outs = []
        for aug, _ in jobs:
            V, c = aug.num_views, aug.cfg.crop_size
            if channels_last:
                outs.append(torch.empty((V, B, c, c, 3), device=device).permute(0, 1, 4, 2, 3))
            else:
                outs.append(torch.empty((V, B, 3, c, c), device=device))
        if B == 0:
            return outs
        jobs = [(aug, p if p.top.device == device else p.to(device)) for aug, p in jobs]
        aug0 = jobs[0][0]
        budget = aug0.chunk_elements if device.type == "cpu" else aug0.device_chunk_elements
        per_image = sum(aug.num_views * 3 * aug.cfg.crop_size ** 2 for aug, _ in jobs)
        step = max(1, min(B, budget // per_image))
        runs = [_Run(aug, p, layout, C, H, W, step, device) for aug, p in jobs]
        for b0 in range(0, B, step):
            imgs = images[b0 : min(B, b0 + step)]
            inputs: dict = {}
            for run, out in zip(runs, outs):
                if run.size_p not in inputs:
                    inputs[run.size_p] = run.load(imgs, layout, b0)
                run.views(inputs[run.size_p], b0, out)
    return outs


def _axis_coords(start, length, c: int, s: float, size_p: int, flip) -> torch.Tensor:
    """Normalised grid_sample coordinates along one axis: (...,) boxes -> (..., c).

    Output pixel o of the crop [start, start + length) samples the continuous source coordinate
    start + (o + 0.5) * length / c (torchvision's resize, align_corners=False), clamped to the
    centres of the crop's first and last pixels (torchvision crops, then resizes); `s` maps
    source pixels to prefiltered ones.
    """
    # float64 (small tensors): the float32 grid then carries coordinates rounded only once
    o = torch.arange(c, device=start.device, dtype=torch.float64) + 0.5
    start = start.double().unsqueeze(-1)
    length = length.double().unsqueeze(-1)
    if flip is not None:
        o = torch.where(flip.unsqueeze(-1), c - o, o)
    u = (start + o * (length / c)) / s - 0.5  # index coordinate in the (prefiltered) image
    lo = (start + 0.5) / s - 0.5
    hi = (start + length - 0.5) / s - 0.5
    u = torch.minimum(torch.maximum(u, lo), hi)
    return u.mul_(2.0 / size_p).add_(1.0 / size_p - 1.0).float()


def _replicate_edges(src: torch.Tensor, valid_hw: torch.Tensor, size_p: tuple[int, int]) -> torch.Tensor:
    """Copy of a (Bc, C, H, W) canvas whose padding next to each image repeats its last row / column.

    Reducing by k = H / hp with the antialiased (triangle) filter, an output pixel reads input
    pixels within k of its centre; the bilinear taps of a crop reach output pixels whose centre is
    at most ~k past the image's last pixel, so only a band of ceil(2k) + 2 rows (columns) past the
    image can reach a view: only that band is filled (rows first, then columns, so the corner is
    filled too). Indices past the canvas are clamped to its last row / column, which then receive
    the same replicated value (or, for a full-size image, its own value).
    """
    Bc, _, H, W = src.shape
    dev = src.device
    hw = valid_hw.to(dev)
    h, w = hw[:, 0], hw[:, 1]
    band_h = min(H, math.ceil(2 * H / size_p[0]) + 2)
    band_w = min(W, math.ceil(2 * W / size_p[1]) + 2)
    y = src.permute(0, 2, 3, 1).clone(memory_format=torch.contiguous_format)  # (Bc, H, W, C)
    b = torch.arange(Bc, device=dev)
    rows = torch.clamp_max(h.unsqueeze(1) + torch.arange(band_h, device=dev), H - 1)  # (Bc, band)
    y[b.unsqueeze(1), rows] = y[b, h - 1].unsqueeze(1).expand(-1, band_h, -1, -1)
    cols = torch.clamp_max(w.unsqueeze(1) + torch.arange(band_w, device=dev), W - 1)
    last = y[b, :, w - 1]  # (Bc, H, C): advanced indices around a slice go first
    y[b.view(-1, 1, 1), torch.arange(H, device=dev).view(1, -1, 1), cols.unsqueeze(1)] = (
        last.unsqueeze(2).expand(-1, -1, band_w, -1))
    return y.permute(0, 3, 1, 2)


class _Run:
    """Per-call state: per-view tables for the whole batch, constants and scratch buffers."""

    def __init__(self, aug: MultiViewAugment, p: AugmentParams, layout, C, H, W, step, device):
        cfg = aug.cfg
        self.cfg, self.V, self.c, self.C, self.H, self.W = cfg, aug.num_views, cfg.crop_size, C, H, W
        self.active = aug._ops_active
        self.any_jitter = any(self.active)
        self.random_order = cfg.jitter_random_order and self.any_jitter
        V, c = self.V, self.c
        self.device = device

        # geometry, for the whole batch: (B, V, c) coordinates
        self.size_p = aug.prefilter_size(H, W, p.valid_hw)
        self.valid_hw = p.valid_hw
        hp, wp = self.size_p if self.size_p is not None else (H, W)
        self.hp, self.wp = hp, wp
        self.gx = _axis_coords(p.left.T, p.width.T, c, W / wp, wp, p.flip.T)
        self.gy = _axis_coords(p.top.T, p.height.T, c, H / hp, hp, None)

        # per-view tables, natural order (v, b): float factors and int flags
        self.factors = torch.stack((p.brightness, p.contrast, p.saturation, p.hue, p.blur_sigma), -1)
        self.flags = torch.stack((p.grayscale, p.blur, p.solarize), -1)
        self.use_gray = cfg.grayscale_p > 0
        self.use_blur = max(cfg.per_view("blur_p", V)) > 0
        self.use_solarize = max(cfg.per_view("solarize_p", V)) > 0
        self.order = p.jitter_order

        # constants
        self.gray_mean_w = (
            torch.tensor(_GRAY_WEIGHTS, device=device).repeat_interleave(c * c).div_(c * c)
        )
        self.hue_centers = torch.tensor([3.0, 2.0, 4.0], device=device).view(1, 3, 1, 1)
        self.arange4 = torch.arange(4, device=device)
        self.chan = torch.arange(3, device=device)
        self.scale = torch.tensor([1.0 / s for s in cfg.std], device=device).view(1, 3, 1, 1)
        self.shift = torch.tensor([-m / s for m, s in zip(cfg.mean, cfg.std)], device=device)
        self.shift = self.shift.view(1, 3, 1, 1)

        # scratch, sized for a full chunk and reused by every chunk
        nmax = V * step
        self.grid = torch.empty((step, V, c, c, 2), device=device)
        self.buf = torch.empty((2, nmax, 3, c, c), device=device)  # ping-pong view buffers
        self.ws = torch.empty((8, nmax, c, c), device=device) if self.any_jitter else None
        # input buffer in the memory order of the images' layout (BHWC -> channels_last)
        shape = (step, hp, wp, C) if layout == "BHWC" else (step, C, hp, wp)
        self.xin = torch.empty(shape, device=device)
        if layout == "BHWC":
            self.xin = self.xin.permute(0, 3, 1, 2)

    def load(self, imgs: torch.Tensor, layout: str, b0: int) -> torch.Tensor:
        """Step 1: uint8 chunk -> float in [0, 1], (Bc, C, hp, wp), optionally area-reduced.

        The reduction runs on CPU on uint8 (the vectorised antialiased resize, before the float
        cast). On a canvas (`valid_hw`) the image's last row / column are first replicated over the
        padding next to it, so that the filter does not blend padding into the image's border.
        """
        Bc = imgs.shape[0]
        src = imgs.permute(0, 3, 1, 2) if layout == "BHWC" else imgs
        x = self.xin[:Bc]
        if self.size_p is None:
            torch.mul(src, 1.0 / 255.0, out=x)  # channels_last buffer for BHWC input: no transpose
            return x
        if self.valid_hw is not None:
            src = _replicate_edges(src, self.valid_hw[b0 : b0 + Bc], self.size_p)
        if self.device.type == "cpu":
            small = F.interpolate(src.contiguous(memory_format=torch.channels_last), size=self.size_p,
                                  mode="bilinear", antialias=True, align_corners=False)
            torch.mul(small, 1.0 / 255.0, out=x)
            return x
        return F.interpolate(torch.mul(src, 1.0 / 255.0), size=self.size_p, mode="bilinear",
                             antialias=True, align_corners=False)

    def views(self, x: torch.Tensor, b0: int, out: torch.Tensor) -> None:
        """Steps 2-6 for the chunk of images b0 .. b0 + Bc (x from `load`), written into out.

        Working layout: ``xv`` (n = V * Bc, 3, c, c) in one of the two scratch planes ``buf``;
        ``rows[i]`` is the natural index v * Bc + b of the view held in row i (rows are regrouped
        by jitter op, so this map travels with them), ``fac`` their per-row factors."""
        V, c, C = self.V, self.c, self.C
        Bc = x.shape[0]
        n = V * Bc
        b1 = b0 + Bc

        # 2. geometry: one grid_sample; the V grids of an image are stacked along the height
        grid = self.grid[:Bc]
        grid[..., 0] = self.gx[b0:b1].unsqueeze(2)
        grid[..., 1] = self.gy[b0:b1].unsqueeze(3)
        y = F.grid_sample(x, grid.view(Bc, V * c, c, 2), mode="bilinear", padding_mode="border",
                          align_corners=False)

        # 3. row arrangement: rows sorted by their first jitter op
        order = self.order[:, b0:b1].reshape(n, 4)
        if self.random_order:
            counts = (order.unsqueeze(-1) == self.arange4).sum(0).tolist()  # [step][op]
            rows = torch.argsort(order[:, 0], stable=True)
        else:
            counts = [[n if op == t else 0 for op in range(4)] for t in range(4)]
            rows = torch.arange(n, device=self.device)
        # one gather of (c, c) planes: row i, channel ch <- y[b_i, ch (or 0 if C == 1), v_i]
        rv = torch.div(rows, Bc, rounding_mode="floor")
        ch = self.chan if C == 3 else self.chan * 0
        plane = ((rows - rv * Bc) * C).unsqueeze(1).add(ch).mul_(V).add_(rv.unsqueeze(1)).view(-1)
        xv = self.buf[1, :n]
        torch.index_select(y.view(Bc * C * V, c * c), 0, plane, out=xv.view(n * 3, c * c))
        fac = self.factors[:, b0:b1].reshape(n, 5)[rows]

        if self.any_jitter:
            xv, rows, fac = self._jitter(xv, rows, fac, order, counts)
        if self.use_gray or self.use_blur or self.use_solarize:
            self._gray_blur_solarize(xv, self.flags[:, b0:b1].reshape(n, 3)[rows], fac)

        # 6. normalise, then scatter row i to out[v, b0 + b]
        xv.mul_(self.scale).add_(self.shift)
        rv = torch.div(rows, Bc, rounding_mode="floor")
        dest = rv * out.shape[1] + (rows - rv * Bc) + b0
        out.flatten(0, 1).index_copy_(0, dest, xv)

    def _jitter(self, xv: torch.Tensor, rows: torch.Tensor, fac: torch.Tensor, order: torch.Tensor,
                counts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """4. colour jitter: at each of the 4 steps rows are grouped by their op (stable sort), so
        each op runs once per step, in place on a contiguous slice. Regrouping moves rows into the
        other scratch plane: returns (xv, rows, fac) as they now are."""
        n = xv.shape[0]
        cur = 1  # xv is buf[1]
        for t in range(4):
            if t > 0 and self.random_order:
                perm = torch.argsort(order[rows, t], stable=True)
                rows, fac = rows[perm], fac[perm]
                nxt = self.buf[1 - cur, :n]
                torch.index_select(xv.view(n, -1), 0, perm, out=nxt.view(n, -1))
                xv, cur = nxt, 1 - cur
            s0 = 0
            for op, cnt in enumerate(counts[t]):
                if cnt and self.active[op]:
                    xs, f = xv[s0 : s0 + cnt], fac[s0 : s0 + cnt, op]
                    if op == 0:
                        _brightness_(xs, f)
                    elif op == 1:
                        _contrast_(xs, f, self.gray_mean_w)
                    elif op == 2:
                        _saturation_(xs, f, self.ws)
                    else:
                        _hue_(xs, f, self.ws, self.hue_centers)
                s0 += cnt
        return xv, rows, fac

    def _gray_blur_solarize(self, xv: torch.Tensor, flags: torch.Tensor, fac: torch.Tensor) -> None:
        """5. grayscale / blur / solarize, in place, on the rows whose flag (columns 0 / 1 / 2 of
        ``flags``, in row order) is set; the blur sigma is column 4 of ``fac``."""
        n, c = xv.shape[0], self.c
        flat = xv.view(n, -1)
        if self.use_gray:
            sel = flags[:, 0].nonzero().squeeze(1)
            if sel.numel():
                xs = xv.index_select(0, sel)
                g = _gray_into(xs, torch.empty((sel.numel(), c, c), device=self.device))
                flat.index_copy_(0, sel, g.unsqueeze(1).expand(-1, 3, c, c).reshape(sel.numel(), -1))
        if self.use_blur:
            sel = flags[:, 1].nonzero().squeeze(1)
            if sel.numel():
                blurred = _gaussian_blur(xv.index_select(0, sel), fac[sel, 4], self.cfg.kernel_size())
                flat.index_copy_(0, sel, blurred.reshape(sel.numel(), -1))
        if self.use_solarize:
            sel = flags[:, 2].nonzero().squeeze(1)
            if sel.numel():
                xs = flat.index_select(0, sel)
                flat.index_copy_(0, sel, torch.where(xs >= self.cfg.solarize_threshold, 1.0 - xs, xs))
