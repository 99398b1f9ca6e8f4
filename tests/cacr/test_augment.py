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
