"""Tests for cacr.augment: geometry, colour ops against torchvision, statistics, determinism."""

import dataclasses
import math

import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from cacr.augment import AugmentConfig, AugmentParams, MultiViewAugment, sample_params

IDENTITY_MEAN = (0.0, 0.0, 0.0)
IDENTITY_STD = (1.0, 1.0, 1.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors on shared cores: one intra-op thread is faster and steadier."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _images(b, h, w=None, c=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, h, w or h, c), dtype=torch.uint8, generator=g)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _plain(**kw):
    """Geometry only: no flip / jitter / grayscale, identity normalisation."""
    base = dict(
        flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, mean=IDENTITY_MEAN, std=IDENTITY_STD
    )
    base.update(kw)
    return AugmentConfig(**base)


def _reference_view(img_hwc, p, v, b, cfg):
    """One view through torchvision's functional ops (float path), per image: the spec."""
    x = img_hwc.permute(2, 0, 1).float() / 255.0
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    box = [int(p.top[v, b]), int(p.left[v, b]), int(p.height[v, b]), int(p.width[v, b])]
    x = TF.resized_crop(x, *box, [cfg.crop_size, cfg.crop_size], antialias=False)
    if p.flip[v, b]:
        x = TF.horizontal_flip(x)
    for op in p.jitter_order[v, b].tolist():
        if op == 0 and cfg.brightness > 0:
            x = TF.adjust_brightness(x, float(p.brightness[v, b]))
        elif op == 1 and cfg.contrast > 0:
            x = TF.adjust_contrast(x, float(p.contrast[v, b]))
        elif op == 2 and cfg.saturation > 0:
            x = TF.adjust_saturation(x, float(p.saturation[v, b]))
        elif op == 3 and cfg.hue > 0:
            x = TF.adjust_hue(x, float(p.hue[v, b]))
    if p.grayscale[v, b]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if p.blur[v, b]:
        s = float(p.blur_sigma[v, b])
        k = cfg.kernel_size()
        x = TF.gaussian_blur(x, [k, k], [s, s])
    if p.solarize[v, b]:
        x = TF.solarize(x, cfg.solarize_threshold)
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    return (x - mean) / std


def _check_against_reference(cfg, V, B, H, W=None, seed=0, atol=2e-5):
    W = W or H
    aug = MultiViewAugment(cfg, V)
    imgs = _images(B, H, W, seed=seed + 1)
    params = aug.sample_params(B, (H, W), generator=_gen(seed))
    out = aug.apply(imgs, params)
    assert out.shape == (V, B, 3, cfg.crop_size, cfg.crop_size)
    for v in range(V):
        for b in range(B):
            ref = _reference_view(imgs[b], params, v, b, cfg)
            torch.testing.assert_close(out[v, b], ref, atol=atol, rtol=0, msg=f"view {v}, image {b}")
    return params


# ---------------------------------------------------------------------------------------------
# output format
# ---------------------------------------------------------------------------------------------

def test_output_shape_dtype_range():
    cfg = AugmentConfig()
    out = MultiViewAugment(cfg, 5)(_images(8, 32), _gen())
    assert out.shape == (5, 8, 3, 32, 32)
    assert out.dtype == torch.float32
    assert out.is_contiguous()
    mean = torch.tensor(cfg.mean).view(1, 1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 1, 3, 1, 1)
    raw = out * std + mean
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    assert raw.std() > 0.05  # not constant


def test_crop_size_differs_from_input():
    out = MultiViewAugment(AugmentConfig(crop_size=20), 2)(_images(3, 48, 40), _gen())
    assert out.shape == (2, 3, 3, 20, 20)


def test_channels_last_output():
    aug = MultiViewAugment(AugmentConfig(), 3)
    imgs = _images(4, 32)
    a = aug(imgs, _gen(5))
    b = aug(imgs, _gen(5), channels_last=True)
    assert b.shape == a.shape
    assert b[1].is_contiguous(memory_format=torch.channels_last)
    assert b.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_output_feeds_autograd():
    """Views are ordinary tensors (not inference tensors): a model can train on them."""
    out = MultiViewAugment(AugmentConfig(), 2)(_images(2, 32), _gen())
    assert not out.requires_grad and not out.is_inference()
    conv = torch.nn.Conv2d(3, 4, 3)
    conv(out.flatten(0, 1)).sum().backward()
    assert conv.weight.grad is not None


def test_empty_batch():
    out = MultiViewAugment(AugmentConfig(), 2)(_images(0, 32), _gen())
    assert out.shape == (2, 0, 3, 32, 32)


# ---------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------

def test_identity_settings_reproduce_input():
    cfg = _plain(scale=(1.0, 1.0), ratio=(1.0, 1.0), crop_size=24)
    imgs = _images(6, 24)
    out = MultiViewAugment(cfg, 3)(imgs, _gen())
    expected = (imgs.permute(0, 3, 1, 2).float() / 255.0).expand(3, -1, -1, -1, -1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_flip_only_mirrors():
    cfg = _plain(scale=(1.0, 1.0), ratio=(1.0, 1.0), crop_size=16, flip_p=1.0)
    imgs = _images(4, 16)
    out = MultiViewAugment(cfg, 2)(imgs, _gen())
    expected = (imgs.permute(0, 3, 1, 2).float() / 255.0).flip(-1)
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], expected, atol=1e-5, rtol=0)


def test_given_box_without_resize_is_exact_crop():
    """A box of the output size is copied pixel for pixel from the right place."""
    cfg = _plain(crop_size=8)
    aug = MultiViewAugment(cfg, 2)
    imgs = _images(3, 20, 24)
    p = aug.sample_params(3, (20, 24), generator=_gen())
    tops = torch.tensor([[0, 5, 12], [3, 7, 1]])
    lefts = torch.tensor([[0, 16, 9], [2, 4, 11]])
    p = dataclasses.replace(
        p, top=tops, left=lefts, height=torch.full((2, 3), 8), width=torch.full((2, 3), 8),
        flip=torch.tensor([[False, True, False], [True, False, False]]),
    )
    out = aug.apply(imgs, p)
    for v in range(2):
        for b in range(3):
            t, l = int(tops[v, b]), int(lefts[v, b])
            crop = imgs[b, t:t + 8, l:l + 8].permute(2, 0, 1).float() / 255.0
            if p.flip[v, b]:
                crop = crop.flip(-1)
            torch.testing.assert_close(out[v, b], crop, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(32, 32), (20, 28)])
def test_geometry_matches_torchvision_resized_crop(size):
    cfg = _plain(crop_size=16, flip_p=0.5)
    _check_against_reference(cfg, V=3, B=6, H=size[0], W=size[1])


def test_antialias_prefilter_for_large_inputs():
    """96 px -> 16 px crops: area prefilter close to torchvision's antialiased resize."""
    cfg = _plain(crop_size=16)
    aug = MultiViewAugment(cfg, 2)
    assert aug.prefilter_size(96, 96) is not None
    assert MultiViewAugment(_plain(crop_size=16, antialias=False), 2).prefilter_size(96, 96) is None
    assert MultiViewAugment(AugmentConfig(crop_size=32), 2).prefilter_size(32, 32) is None
    # smooth-ish image content (so that both resamplers are comparable) + fine-grained noise
    g = _gen(3)
    base = torch.rand(4, 3, 12, 12, generator=g)
    smooth = torch.nn.functional.interpolate(base, size=(96, 96), mode="bilinear", align_corners=False)
    noise = (torch.rand(4, 3, 96, 96, generator=g) - 0.5) * 0.5
    imgs = ((smooth + noise).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    p = aug.sample_params(4, (96, 96), generator=_gen(4))
    out = aug.apply(imgs, p)
    out_alias = MultiViewAugment(_plain(crop_size=16, antialias=False), 2).apply(imgs, p)
    err_aa, err_alias = [], []
    for v in range(2):
        for b in range(4):
            x = imgs[b].permute(2, 0, 1).float() / 255.0
            box = [int(p.top[v, b]), int(p.left[v, b]), int(p.height[v, b]), int(p.width[v, b])]
            ref = TF.resized_crop(x, *box, [16, 16], antialias=True)
            err_aa.append((out[v, b] - ref).abs().mean())
            err_alias.append((out_alias[v, b] - ref).abs().mean())
    err_aa, err_alias = torch.stack(err_aa), torch.stack(err_alias)
    assert err_aa.max() < 0.03
    assert err_aa.mean() < 0.6 * err_alias.mean()


# ---------------------------------------------------------------------------------------------
# colour ops and the whole pipeline against torchvision, view by view
# ---------------------------------------------------------------------------------------------

def test_full_recipe_matches_torchvision_per_view():
    params = _check_against_reference(AugmentConfig(), V=4, B=12, H=32)
    # the random order was exercised: several different permutations occurred
    assert len({tuple(o) for o in params.jitter_order.reshape(-1, 4).tolist()}) > 5


def test_fixed_order_matches_torchvision():
    cfg = AugmentConfig(jitter_random_order=False)
    params = _check_against_reference(cfg, V=2, B=6, H=32)
    assert (params.jitter_order == torch.arange(4)).all()


def test_blur_and_solarize_match_torchvision():
    cfg = AugmentConfig(blur_p=0.5, solarize_p=0.5, crop_size=24, blur_kernel_size=5, grayscale_p=0.3)
    params = _check_against_reference(cfg, V=3, B=6, H=32)
    assert params.blur.any() and params.solarize.any()


def test_hue_on_edge_values():
    """Ties between channels, grays, pure and saturated colours: torchvision's HSV hue."""
    vals = torch.tensor([0.0, 0.25, 0.5, 1.0])
    rgb = torch.cartesian_prod(vals, vals, vals)  # 64 colours, incl. ties and grays
    img = rgb.T.reshape(3, 8, 8)
    imgs = (img * 255).round().to(torch.uint8).permute(1, 2, 0).unsqueeze(0).expand(6, -1, -1, -1)
    cfg = _plain(scale=(1.0, 1.0), ratio=(1.0, 1.0), crop_size=8, jitter_p=1.0,
                 brightness=0.0, contrast=0.0, saturation=0.0, hue=0.5)
    aug = MultiViewAugment(cfg, 2)
    p = aug.sample_params(6, (8, 8), generator=_gen())
    hues = torch.tensor([[-0.5, -0.25, 0.0, 1 / 6, 0.3, 0.5], [-1 / 3, -0.1, 0.05, 0.25, 0.45, 1 / 12]])
    p = dataclasses.replace(p, hue=hues)
    out = aug.apply(imgs.contiguous(), p)
    x = imgs[0].permute(2, 0, 1).float() / 255.0
    for v in range(2):
        for b in range(6):
            ref = TF.adjust_hue(x, float(hues[v, b]))
            torch.testing.assert_close(out[v, b], ref, atol=2e-6, rtol=0)


def test_jitter_and_grayscale_disabled_keep_colours():
    cfg = _plain(scale=(1.0, 1.0), ratio=(1.0, 1.0), crop_size=16, jitter_p=0.0, grayscale_p=0.0)
    imgs = _images(3, 16)
    out = MultiViewAugment(cfg, 2)(imgs, _gen())
    torch.testing.assert_close(out[0], imgs.permute(0, 3, 1, 2).float() / 255.0, atol=1e-6, rtol=0)


def test_grayscale_always():
    cfg = AugmentConfig(grayscale_p=1.0)
    out = MultiViewAugment(cfg, 2)(_images(4, 32), _gen())
    mean = torch.tensor(cfg.mean).view(1, 1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 1, 3, 1, 1)
    raw = out * std + mean
    torch.testing.assert_close(raw[:, :, 0], raw[:, :, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(raw[:, :, 0], raw[:, :, 2], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# parameter statistics
# ---------------------------------------------------------------------------------------------

def test_crop_statistics_match_torchvision_rule():
    cfg = AugmentConfig()
    p = sample_params(cfg, 4, 5000, (32, 32), generator=_gen(11))
    frac = p.area_fraction.flatten()
    ar = p.aspect_ratio.flatten()
    # integer boxes: allow the rounding of w and h (one pixel each)
    assert frac.min() >= cfg.scale[0] * (1 - 2 / (32 * math.sqrt(0.2 * 0.75))) - 1e-9
    assert frac.max() <= 1.0
    assert (p.top >= 0).all() and (p.left >= 0).all()
    assert ((p.top + p.height) <= 32).all() and ((p.left + p.width) <= 32).all()
    assert ar.min() >= 0.75 * 0.9 and ar.max() <= (4 / 3) / 0.9
    # the accepted distribution equals torchvision's RandomResizedCrop.get_params (same rule)
    torch.manual_seed(12)
    img = torch.zeros(3, 32, 32)
    ref = torch.tensor(
        [
            [h * w / 1024.0, w / h]
            for _, _, h, w in (
                T.RandomResizedCrop.get_params(img, scale=list(cfg.scale), ratio=list(cfg.ratio))
                for _ in range(4000)
            )
        ],
        dtype=torch.float64,
    )
    assert abs(frac.mean() - ref[:, 0].mean()) < 0.012  # sd ~0.23 / sqrt(4000) = 0.004 each
    assert abs(ar.log().mean() - ref[:, 1].log().mean()) < 0.012
    for q in (0.1, 0.5, 0.9):
        assert abs(frac.quantile(q) - ref[:, 0].quantile(q)) < 0.03
    # positions are spread over the valid range
    slack = (32 - p.width).clamp_min(1).double()
    rel = (p.left.double() / slack)[p.width < 28]
    assert 0.4 < rel.mean() < 0.6


def test_crop_fallback_to_center():
    # impossible ratios for a very wide image: no candidate fits -> centre crop, ratio clamped
    cfg = AugmentConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0))
    p = sample_params(cfg, 2, 50, (10, 40), generator=_gen())
    assert (p.height == 10).all() and (p.width == 10).all()
    assert (p.left == 15).all() and (p.top == 0).all()


def _binomial_ok(k, n, prob, z=5.0):
    return abs(k - n * prob) <= z * math.sqrt(n * prob * (1 - prob)) + 1


def test_flip_grayscale_jitter_frequencies():
    cfg = AugmentConfig(flip_p=0.5, grayscale_p=0.2, jitter_p=0.8, blur_p=0.3, solarize_p=0.1)
    V, B = 4, 5000
    p = sample_params(cfg, V, B, (32, 32), generator=_gen(7))
    n = V * B
    for mask, prob in ((p.flip, 0.5), (p.grayscale, 0.2), (p.jitter, 0.8), (p.blur, 0.3), (p.solarize, 0.1)):
        assert _binomial_ok(int(mask.sum()), n, prob), (int(mask.sum()), n, prob)
    # jitter factors within their ranges; identity where not jittered
    j = p.jitter
    assert (p.brightness[j] >= 0.6).all() and (p.brightness[j] <= 1.4).all()
    assert (p.hue[j].abs() <= 0.4).all() and p.hue[j].abs().max() > 0.35
    assert (p.brightness[~j] == 1).all() and (p.hue[~j] == 0).all()
    # per-sample orders are permutations, roughly uniform over the 24
    assert (p.jitter_order.sort(-1).values == torch.arange(4)).all()
    codes = (p.jitter_order * torch.tensor([64, 16, 4, 1])).sum(-1).flatten()
    counts = torch.unique(codes, return_counts=True)[1]
    assert len(counts) == 24 and counts.min() > n / 24 * 0.8


def test_flip_frequency_in_output():
    """Flip realised in pixels: compare each view to its unflipped counterpart."""
    cfg = _plain(scale=(1.0, 1.0), ratio=(1.0, 1.0), crop_size=8, flip_p=0.3)
    imgs = _images(400, 8)
    out = MultiViewAugment(cfg, 2)(imgs, _gen(2))
    x = imgs.permute(0, 3, 1, 2).float() / 255.0
    flipped = (out - x.flip(-1)).abs().amax(dim=(2, 3, 4)) < 1e-5
    same = (out - x).abs().amax(dim=(2, 3, 4)) < 1e-5
    assert (flipped ^ same).all()
    assert _binomial_ok(int(flipped.sum()), 800, 0.3)


# ---------------------------------------------------------------------------------------------
# determinism, views, layouts, devices
# ---------------------------------------------------------------------------------------------

def test_determinism_from_seed():
    aug = MultiViewAugment(AugmentConfig(blur_p=0.5), 3)
    imgs = _images(8, 32)
    a = aug(imgs, _gen(42))
    b = aug(imgs, _gen(42))
    c = aug(imgs, _gen(43))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (a - c).abs().max() > 0.1


def test_global_rng_without_generator():
    aug = MultiViewAugment(AugmentConfig(), 2)
    imgs = _images(4, 32)
    torch.manual_seed(3)
    a = aug(imgs)
    torch.manual_seed(3)
    b = aug(imgs)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_views_of_one_image_differ():
    out = MultiViewAugment(AugmentConfig(), 5)(_images(4, 32), _gen())
    for b in range(4):
        for v in range(5):
            for u in range(v + 1, 5):
                assert (out[v, b] - out[u, b]).abs().max() > 0.05


def test_chunking_does_not_change_result():
    cfg = AugmentConfig(blur_p=0.3, solarize_p=0.3)
    imgs = _images(23, 32)
    p = sample_params(cfg, 3, 23, (32, 32), generator=_gen(9))
    big = MultiViewAugment(cfg, 3, chunk_elements=1 << 30).apply(imgs, p)
    small = MultiViewAugment(cfg, 3, chunk_elements=3 * 3 * 32 * 32 * 2).apply(imgs, p)  # 2 images
    one = MultiViewAugment(cfg, 3, chunk_elements=1).apply(imgs, p)
    torch.testing.assert_close(small, big, atol=1e-5, rtol=0)  # BLAS reductions per chunk
    torch.testing.assert_close(one, big, atol=1e-5, rtol=0)


def test_bhwc_and_bchw_layouts_agree():
    aug = MultiViewAugment(AugmentConfig(), 2)
    imgs = _images(5, 32, 28)
    a = aug(imgs, _gen(1))
    b = aug(imgs.permute(0, 3, 1, 2).contiguous(), _gen(1), layout="BCHW")
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # large inputs take the prefilter path: layouts agree there too
    aug = MultiViewAugment(AugmentConfig(crop_size=16), 2)
    imgs = _images(3, 96)
    a = aug(imgs, _gen(1))
    b = aug(imgs.permute(0, 3, 1, 2).contiguous(), _gen(1), layout="BCHW")
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_single_channel_input_is_replicated():
    aug = MultiViewAugment(AugmentConfig(), 3)
    gray = _images(4, 32, c=1)
    rgb = gray.expand(-1, -1, -1, 3).contiguous()
    a = aug(gray, _gen(6))
    b = aug(rgb, _gen(6))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    c = aug(gray.permute(0, 3, 1, 2).contiguous(), _gen(6), layout="BCHW")
    torch.testing.assert_close(a, c, atol=1e-5, rtol=0)


def test_input_validation():
    aug = MultiViewAugment(AugmentConfig(), 2)
    with pytest.raises(ValueError, match="uint8"):
        aug(torch.rand(2, 32, 32, 3))
    with pytest.raises(ValueError, match="channels"):
        aug(torch.zeros(2, 32, 32, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="layout"):
        aug(_images(2, 32), layout="HWC")
    with pytest.raises(ValueError, match="4-D"):
        aug(torch.zeros(32, 32, 3, dtype=torch.uint8))
    p = aug.sample_params(3, (32, 32))
    with pytest.raises(ValueError, match="params"):
        aug.apply(_images(2, 32), p)
    with pytest.raises(ValueError, match="num_views"):
        MultiViewAugment(AugmentConfig(), 0)


@pytest.mark.parametrize(
    "field,value",
    [
        ("crop_size", 0),
        ("scale", (0.0, 1.0)),
        ("scale", (0.5, 1.2)),
        ("scale", (0.8, 0.5)),
        ("ratio", (0.0, 1.0)),
        ("flip_p", 1.5),
        ("jitter_p", -0.1),
        ("grayscale_p", 2.0),
        ("blur_p", -1.0),
        ("solarize_p", 1.01),
        ("brightness", -0.1),
        ("contrast", float("inf")),
        ("saturation", -1.0),
        ("hue", 0.6),
        ("blur_sigma", (0.0, 1.0)),
        ("blur_kernel_size", 4),
        ("solarize_threshold", 1.5),
        ("mean", (0.5, 0.5)),
        ("std", (0.5, 0.0, 0.5)),
    ],
)
def test_validate_names_the_field(field, value):
    cfg = AugmentConfig(**{field: value})
    with pytest.raises(ValueError, match=field):
        cfg.validate()
    with pytest.raises(ValueError, match=field):
        MultiViewAugment(cfg, 2)


def test_config_plain_types_and_dict_roundtrip():
    cfg = AugmentConfig()
    assert cfg.validate() is cfg
    d = cfg.to_dict()
    assert all(isinstance(v, (int, float, bool, tuple)) for v in d.values())
    yaml_like = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
    assert AugmentConfig.from_dict(yaml_like) == cfg
    with pytest.raises(ValueError, match="unknown"):
        AugmentConfig.from_dict({"crop": 32})
    assert cfg.jitter_p == 1.0 and cfg.scale == (0.2, 1.0) and cfg.grayscale_p == 0.2


def test_params_on_generator_device_and_move():
    p = sample_params(AugmentConfig(), 2, 3, (32, 32), generator=_gen())
    assert isinstance(p, AugmentParams) and p.top.device.type == "cpu"
    q = p.to("cpu")
    assert torch.equal(q.top, p.top) and q.image_size == p.image_size


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    cfg = AugmentConfig(blur_p=0.5, solarize_p=0.2)
    aug = MultiViewAugment(cfg, 3)
    imgs = _images(16, 32)
    cpu = aug(imgs, _gen(5))
    # CPU generator, CUDA images: parameters drawn on CPU, then moved -> same views
    gpu = aug(imgs.cuda(), _gen(5))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)
    # a CUDA generator is reproducible on its own
    g1 = torch.Generator(device="cuda").manual_seed(1)
    g2 = torch.Generator(device="cuda").manual_seed(1)
    torch.testing.assert_close(aug(imgs.cuda(), g1), aug(imgs.cuda(), g2), atol=0, rtol=0)
    # the prefilter path (float on CUDA, uint8 on CPU): close, not identical
    aug = MultiViewAugment(AugmentConfig(crop_size=16), 2)
    big = _images(4, 96)
    torch.testing.assert_close(aug(big.cuda(), _gen(2)).cpu(), aug(big, _gen(2)), atol=0.05, rtol=0)
    # the new paths: per-view probabilities, local crops, canvases (valid_hw, on either device)
    cfg = AugmentConfig(crop_size=24, blur_p=[1.0, 0.1], solarize_p=[0.0, 0.2], local_crops=3,
                        local_size=12)
    aug = MultiViewAugment(cfg, 2)
    canvas = _images(16, 40, 48)
    g = _gen(7)
    hw = torch.stack([torch.randint(8, 41, (16,), generator=g), torch.randint(8, 49, (16,), generator=g)], 1)
    cpu = aug.view_groups(canvas, generator=_gen(5), valid_hw=hw)
    for dev_hw in (hw, hw.cuda()):
        gpu = aug.view_groups(canvas.cuda(), generator=_gen(5), valid_hw=dev_hw)
        assert [g.device.type for g in gpu] == ["cuda", "cuda"]
        for c, g in zip(cpu, gpu):
            torch.testing.assert_close(g.cpu(), c, atol=1e-4, rtol=0)
    # the canvas prefilter path (edge replication + resize on CUDA): close, not identical
    aug = MultiViewAugment(AugmentConfig(crop_size=8, local_crops=2, local_size=4), 2)
    big = _images(4, 96, 80)
    hw = torch.tensor([[96, 60], [50, 80], [96, 80], [70, 70]])
    for c, g in zip(aug.view_groups(big, generator=_gen(2), valid_hw=hw),
                    aug.view_groups(big.cuda(), generator=_gen(2), valid_hw=hw.cuda())):
        torch.testing.assert_close(g.cpu(), c, atol=0.05, rtol=0)


# ---------------------------------------------------------------------------------------------
# per-view probabilities (MoCo v3's asymmetric two-crop recipe)
# ---------------------------------------------------------------------------------------------

def test_per_view_probabilities_statistics_cycle_over_global_then_local_views():
    """blur_p=[1.0, 0.1], solarize_p=[0.0, 0.2]: view i uses p[i % 2], local views continue."""
    cfg = AugmentConfig(crop_size=16, blur_p=[1.0, 0.1], solarize_p=[0.0, 0.2], local_crops=3,
                        local_size=8)
    assert cfg.blur_p == (1.0, 0.1)  # lists are stored as tuples
    V, B = 3, 5000  # odd V: the local views' values depend on their offset V
    glob, loc = MultiViewAugment(cfg, V).sample_groups(B, (32, 32), generator=_gen(21))
    blur = torch.cat([glob.blur, loc.blur]).sum(1).tolist()  # per view, views 0..5
    sol = torch.cat([glob.solarize, loc.solarize]).sum(1).tolist()
    for i in range(V + 3):
        pb, ps = (1.0, 0.0) if i % 2 == 0 else (0.1, 0.2)
        assert _binomial_ok(blur[i], B, pb), (i, blur[i], pb)
        assert _binomial_ok(sol[i], B, ps), (i, sol[i], ps)
    assert blur[0] == B and sol[0] == 0  # probability 1 and 0 are exact


def test_per_view_probabilities_realised_in_pixels():
    """Only the views whose probability is > 0 are blurred / solarized, matching torchvision."""
    cfg = AugmentConfig(crop_size=24, blur_kernel_size=5, blur_p=[1.0, 0.0, 0.0],
                        solarize_p=[0.0, 0.0, 1.0])
    params = _check_against_reference(cfg, V=3, B=4, H=32)
    assert params.blur.tolist() == [[True] * 4, [False] * 4, [False] * 4]
    assert params.solarize.tolist() == [[False] * 4, [False] * 4, [True] * 4]


def test_per_view_scalar_and_list_agree():
    """A one-element list is the scalar; the draws do not depend on the probabilities."""
    imgs = _images(6, 32)
    a = MultiViewAugment(AugmentConfig(blur_p=0.5, solarize_p=0.3), 3)(imgs, _gen(4))
    b = MultiViewAugment(AugmentConfig(blur_p=[0.5], solarize_p=(0.3,)), 3)(imgs, _gen(4))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    p = sample_params(AugmentConfig(blur_p=[0.0, 1.0]), 2, 50, (32, 32), generator=_gen(1))
    q = sample_params(AugmentConfig(), 2, 50, (32, 32), generator=_gen(1))
    assert torch.equal(p.top, q.top) and torch.equal(p.blur_sigma, q.blur_sigma)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(blur_p=()), "blur_p.*at least one"),
        (dict(blur_p=(0.5, 1.5)), "blur_p.*per-view"),
        (dict(solarize_p="0.2"), "solarize_p"),
        (dict(solarize_p=(0.1, True)), "solarize_p"),
        (dict(local_crops=-1), "local_crops"),
        (dict(local_crops=1.5), "local_crops"),
        (dict(local_size=0), "local_size"),
        (dict(local_scale=(0.0, 0.4)), "local_scale"),
        (dict(local_scale=(0.5, 0.4)), "local_scale"),
        (dict(crop_size=224, blur_kernel_size=23, local_crops=2, local_size=8), "local_size"),
    ],
)
def test_validate_new_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AugmentConfig(**kwargs).validate()


def test_per_view_list_longer_than_the_views_is_an_error():
    with pytest.raises(ValueError, match=r"blur_p.*3 per-view values.*2 views"):
        MultiViewAugment(AugmentConfig(blur_p=[1.0, 0.1, 0.5]), 2)
    MultiViewAugment(AugmentConfig(blur_p=[1.0, 0.1, 0.5], local_crops=1, local_size=8), 2)  # 3 views


def test_every_config_field_has_help_and_config_imports_without_torch():
    import subprocess
    import sys

    missing = [f.name for f in dataclasses.fields(AugmentConfig) if not f.metadata.get("help")]
    assert not missing
    code = ("import sys; from cacr.augment_config import AugmentConfig as A; "
            "A(blur_p=[1.0, 0.1], local_crops=2).validate(); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------
# multi-crop: view groups
# ---------------------------------------------------------------------------------------------

def test_view_groups_shapes_seeds_and_back_compat():
    cfg = AugmentConfig(crop_size=24, local_crops=3, local_size=10)
    aug = MultiViewAugment(cfg, 2)
    imgs = _images(5, 32)
    groups = aug.view_groups(imgs, generator=_gen(3))
    assert [tuple(g.shape) for g in groups] == [(2, 5, 3, 24, 24), (3, 5, 3, 10, 10)]
    # __call__ keeps returning the global views; the local draws come after the global ones
    torch.testing.assert_close(aug(imgs, _gen(3)), groups[0], atol=0, rtol=0)
    again = aug.view_groups(imgs, generator=_gen(3))
    other = aug.view_groups(imgs, generator=_gen(4))
    for g, h, o in zip(groups, again, other):
        torch.testing.assert_close(g, h, atol=0, rtol=0)
        assert (g - o).abs().max() > 0.1
    cl = aug.view_groups(imgs, generator=_gen(3), channels_last=True)
    for g, h in zip(groups, cl):
        assert h.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(g, h, atol=0, rtol=0)
    # no local crops: one group, the same as __call__
    plain = MultiViewAugment(AugmentConfig(crop_size=24), 2)
    only = plain.view_groups(imgs, generator=_gen(3))
    assert len(only) == 1
    torch.testing.assert_close(only[0], plain(imgs, _gen(3)), atol=0, rtol=0)
    assert plain.view_groups(_images(0, 32))[0].shape == (2, 0, 3, 24, 24)


def test_local_views_match_torchvision_per_view():
    cfg = AugmentConfig(crop_size=16, local_crops=2, local_size=8, blur_p=[0.0, 0.0, 1.0, 0.0],
                        solarize_p=[0.0, 0.0, 0.0, 1.0], blur_kernel_size=3)
    aug = MultiViewAugment(cfg, 2)
    imgs = _images(6, 32, 28)
    params = aug.sample_groups(6, (32, 28), generator=_gen(8))
    outs = aug.apply_groups(imgs, params)
    lcfg = aug.local.cfg
    assert (lcfg.crop_size, lcfg.scale, lcfg.blur_p, lcfg.solarize_p) == (8, cfg.local_scale, (1.0, 0.0), (0.0, 1.0))
    for group, p, gcfg in zip(outs, params, (cfg, lcfg)):
        for v in range(p.num_views):
            for b in range(6):
                ref = _reference_view(imgs[b], p, v, b, gcfg)
                torch.testing.assert_close(group[v, b], ref, atol=2e-5, rtol=0)
    assert params[1].blur[0].all() and params[1].solarize[1].all()


def test_local_scale_statistics_match_torchvision_rule():
    cfg = AugmentConfig(local_crops=4, local_size=12, local_scale=(0.05, 0.4))
    glob, loc = MultiViewAugment(cfg, 2).sample_groups(2000, (32, 32), generator=_gen(13))
    frac = loc.area_fraction.flatten()
    assert frac.max() <= 0.4 * 1.15 and frac.min() >= 0.05 * 0.6  # integer rounding of w, h
    ref_l = _tv_boxes(32, 32, cfg.local_scale, cfg.ratio, 3000, seed=14)
    ref_g = _tv_boxes(32, 32, cfg.scale, cfg.ratio, 3000, seed=15)
    stats_l, stats_g = _box_stats(loc, 32, 32), _box_stats(glob, 32, 32)
    for name in ("area", "log_ratio"):
        assert _ks(stats_l[name], ref_l[name]) < _ks_limit(len(frac), 3000), name
        assert _ks(stats_g[name], ref_g[name]) < _ks_limit(stats_g[name].numel(), 3000), name
    # the two groups really differ (a local group using the global scale would not)
    assert _ks(stats_l["area"], ref_g["area"]) > 0.3


# ---------------------------------------------------------------------------------------------
# canvases: crops from each image's whole area (valid_hw)
# ---------------------------------------------------------------------------------------------

def _tv_boxes(h, w, scale, ratio, n, seed):
    """Box statistics of torchvision's RandomResizedCrop.get_params on an (h, w) image."""
    torch.manual_seed(seed)
    img = torch.zeros(1, h, w)
    boxes = torch.tensor(
        [T.RandomResizedCrop.get_params(img, scale=list(scale), ratio=list(ratio)) for _ in range(n)],
        dtype=torch.float64,
    )  # (n, 4): top, left, height, width
    return _stats(boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3], h, w)


def _stats(top, left, height, width, h, w):
    return {
        "area": height * width / (h * w),
        "log_ratio": (width / height).log(),
        "cy": (top + height / 2) / h,
        "cx": (left + width / 2) / w,
    }


def _box_stats(p, h, w, cols=slice(None)):
    d = lambda t: t[:, cols].double().flatten()  # noqa: E731
    return _stats(d(p.top), d(p.left), d(p.height), d(p.width), h, w)


def _ks(a, b):
    """Two-sample Kolmogorov-Smirnov statistic sup |F_a - F_b| (exact with ties)."""
    a, b = a.double().sort().values, b.double().sort().values
    grid = torch.cat([a, b]).unique()
    fa = torch.searchsorted(a, grid, right=True).double() / len(a)
    fb = torch.searchsorted(b, grid, right=True).double() / len(b)
    return float((fa - fb).abs().max())


def _ks_limit(n, m, c=1.95):
    """KS critical value at alpha = 0.001 (c(alpha) = sqrt(-ln(alpha / 2) / 2) = 1.95)."""
    return c * math.sqrt((n + m) / (n * m))


CANVAS = (64, 64)
SIZES = [(48, 64), (64, 24), (30, 30), (64, 64), (17, 40)]  # (height, width), top-left aligned


def test_canvas_crop_statistics_match_torchvision_on_the_whole_image():
    """Scale, aspect and position of the boxes w.r.t. each image, not the canvas or a centre square.

    Per image size, 3000 of our boxes against 3000 of torchvision's RandomResizedCrop.get_params on
    an image of that size: KS distance below the alpha = 0.001 critical value for area fraction,
    log aspect ratio and the box centre. The same check run on the two classic mistakes (boxes
    drawn against the canvas; boxes drawn in the centre square, as decode's resize + centre crop
    did) fails for every image that is not the full canvas / not square.
    """
    cfg = AugmentConfig(scale=(0.08, 1.0))
    per, V = 1500, 2
    hw = torch.tensor(SIZES).repeat_interleave(per, 0)
    p = sample_params(cfg, V, len(hw), CANVAS, generator=_gen(31), valid_hw=hw)
    assert torch.equal(p.valid_hw, hw)
    assert ((p.top + p.height) <= hw[:, 0]).all() and ((p.left + p.width) <= hw[:, 1]).all()
    assert (p.top >= 0).all() and (p.left >= 0).all()
    canvas = sample_params(cfg, V, len(hw), CANVAS, generator=_gen(31))  # mistake 1
    limit = _ks_limit(V * per, 3000)
    for i, (h, w) in enumerate(SIZES):
        cols = slice(i * per, (i + 1) * per)
        ref = _tv_boxes(h, w, cfg.scale, cfg.ratio, 3000, seed=40 + i)
        ours = _box_stats(p, h, w, cols)
        for name in ours:
            assert _ks(ours[name], ref[name]) < limit, (h, w, name, _ks(ours[name], ref[name]))
        torch.testing.assert_close(p.area_fraction[:, cols].flatten(), ours["area"])
        wrong_canvas = _ks(_box_stats(canvas, h, w, cols)["area"], ref["area"])
        assert ((h, w) == CANVAS) == (wrong_canvas < limit), (h, w, wrong_canvas)
        m = min(h, w)  # mistake 2: the box lives in the centre square of side m
        sq = sample_params(cfg, V, per, (m, m), generator=_gen(50 + i))
        oy, ox = (h - m) // 2, (w - m) // 2
        wrong = _stats(sq.top.double().flatten() + oy, sq.left.double().flatten() + ox,
                       sq.height.double().flatten(), sq.width.double().flatten(), h, w)
        wrong_sq = max(_ks(wrong[k], ref[k]) for k in ("area", "log_ratio"))
        assert (h == w) == (wrong_sq < limit), (h, w, wrong_sq)


def test_canvas_fallback_is_the_images_centre_crop():
    # ratio fixed at 1, whole-area crops: only the fallback can answer, per image
    cfg = AugmentConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0))
    hw = torch.tensor([[10, 40], [40, 10], [20, 20], [33, 64]])
    p = sample_params(cfg, 2, 4, (40, 64), generator=_gen(), valid_hw=hw)
    expect = [(0, 15, 10, 10), (15, 0, 10, 10), (0, 0, 20, 20), (0, 15, 33, 33)]
    for b, box in enumerate(expect):
        for v in range(2):
            got = (p.top[v, b], p.left[v, b], p.height[v, b], p.width[v, b])
            assert tuple(int(t) for t in got) == box, (b, v)


def test_canvas_crop_pixels_match_torchvision_resized_crop():
    """One crop per view on a padded canvas equals resized_crop of the unpadded image on that box.

    Float input: exact up to float rounding (2e-5), bilinear with antialias=False because ours
    resamples bilinearly from the box (torchvision's antialias only acts when shrinking, and ours
    replaces it by a shared prefilter when shrinking >= 1.5x). uint8 input to torchvision: its
    result is rounded to integers, hence <= 1/255 (at most half a level + float rounding).
    """
    cfg = _plain(crop_size=20, flip_p=0.5, scale=(0.05, 1.0))
    h, w = 37, 53
    canvas = _images(4, 64, 64, seed=5)  # random padding beyond the image
    hw = torch.tensor([[h, w], [h, w], [64, 20], [9, 64]])
    aug = MultiViewAugment(cfg, 3)
    p = aug.sample_params(4, (64, 64), generator=_gen(6), valid_hw=hw)
    out = aug.apply(canvas, p)
    assert aug.prefilter_size(64, 64, hw) is None
    for b in range(4):
        img = canvas[b, : hw[b, 0], : hw[b, 1]].permute(2, 0, 1)
        for v in range(3):
            box = [int(p.top[v, b]), int(p.left[v, b]), int(p.height[v, b]), int(p.width[v, b])]
            ref = TF.resized_crop(img.float() / 255.0, *box, [20, 20], antialias=False)
            ref8 = TF.resized_crop(img, *box, [20, 20], antialias=False).float() / 255.0
            if p.flip[v, b]:
                ref, ref8 = TF.horizontal_flip(ref), TF.horizontal_flip(ref8)
            torch.testing.assert_close(out[v, b], ref, atol=2e-5, rtol=0)
            assert (out[v, b] - ref8).abs().max() <= 1 / 255


@pytest.mark.parametrize("crop", [24, 6])  # 6 px from 64 px: the antialias prefilter path
def test_canvas_padding_never_reaches_the_views(crop):
    # enough images x views that crops touch every image's bottom / right edge: a replicated band
    # of 1 row or 2 columns (instead of ceil(2k) + 2 = 8 at k = 2.8) lets padding through
    cfg = AugmentConfig(crop_size=crop, local_crops=4, local_size=crop // 2, blur_p=0.5)
    aug = MultiViewAugment(cfg, 4)
    hw = torch.tensor([[64, 40], [30, 64], [50, 50], [64, 64], [40, 56]]).repeat(4, 1)
    imgs = _images(20, 64, 64, seed=9)
    garbage = _images(20, 64, 64, seed=10)
    mask = (torch.arange(64).view(1, 64, 1) < hw[:, :1, None]) & (torch.arange(64).view(1, 1, 64) < hw[:, 1:, None])
    mixed = torch.where(mask.unsqueeze(-1), imgs, garbage)
    zeros = torch.where(mask.unsqueeze(-1), imgs, torch.zeros_like(imgs))
    assert (aug.prefilter_size(64, 64, hw) is not None) == (crop == 6)
    a = aug.view_groups(mixed, generator=_gen(2), valid_hw=hw)
    b = aug.view_groups(zeros, generator=_gen(2), valid_hw=hw)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    # a full-size valid_hw is the same as no valid_hw
    full = torch.tensor([[64, 64]] * 20)
    for x, y in zip(aug.view_groups(imgs, generator=_gen(2), valid_hw=full),
                    aug.view_groups(imgs, generator=_gen(2))):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


def test_valid_hw_validation():
    aug = MultiViewAugment(AugmentConfig(), 2)
    imgs = _images(3, 32)
    for bad, match in [
        (torch.tensor([[32, 32]] * 2), r"shape \(n, 2\) = \(3, 2\)"),
        (torch.tensor([[32.0, 32.0]] * 3), "integers"),
        (torch.tensor([[33, 32]] * 3), "canvas"),
        (torch.tensor([[0, 32]] * 3), "canvas"),
    ]:
        with pytest.raises(ValueError, match=match):
            aug(imgs, _gen(), valid_hw=bad)
        with pytest.raises(ValueError, match=match):
            aug.view_groups(imgs, generator=_gen(), valid_hw=bad)
    out = aug(imgs, _gen(), valid_hw=[[32, 20], [10, 32], [32, 32]])  # any integer array-like
    assert out.shape == (2, 3, 3, 32, 32)
