"""Tests for cacr.model: shapes, normalisation, norm options, torchvision-compatible export."""

import socket

import pytest
import torch
import torch.nn as nn
import torchvision

from cacr.model import RESNET_ARCHS, CACRModel, ProjectionHead, build_torchvision_backbone, model_info

_FEATURE_DIM = {"narrow_resnet": 128, "resnet18": 512, "resnet34": 512, "resnet50": 2048}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors on shared cores: one intra-op thread is faster and steadier."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a socket (e.g. a weight download) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


@pytest.mark.parametrize("arch", RESNET_ARCHS)  # ViTs: tests/cacr/test_vit.py
def test_shapes_every_arch(arch, no_network):
    torch.manual_seed(0)
    model = CACRModel(arch, small_images=True, head_hidden=64, head_out=32)
    model.train()  # BatchNorm in training mode needs > 1 sample: batch 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        f = model.features(x)
        z = model.embed(x)
        z2 = model(x)
    assert model.feature_dim == _FEATURE_DIM[arch]
    assert f.shape == (2, _FEATURE_DIM[arch])
    assert z.shape == (2, 32)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(z2.norm(dim=1), torch.ones(2), atol=1e-5, rtol=0)
    assert torch.isfinite(f).all() and torch.isfinite(z).all()


def test_small_image_stem():
    small = CACRModel("resnet18", small_images=True).backbone
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    big = CACRModel("resnet18", small_images=False).backbone
    assert big.conv1.kernel_size == (7, 7) and big.conv1.stride == (2, 2)
    assert isinstance(big.maxpool, nn.MaxPool2d)
    # the small stem keeps spatial resolution: 32 px -> 4x4 before pooling (3 stride-2 stages)
    seen = {}

    def hook(module, inputs, output):
        seen["shape"] = output.shape

    small.layer4.register_forward_hook(hook)
    small.eval()
    with torch.no_grad():
        small(torch.randn(1, 3, 32, 32))
    assert seen["shape"][-2:] == (4, 4)


def test_backbone_fc_removed_and_is_torchvision_resnet():
    for arch in ("narrow_resnet", "resnet18"):
        bb = CACRModel(arch).backbone
        assert isinstance(bb, torchvision.models.resnet.ResNet)
        assert isinstance(bb.fc, nn.Identity)


def test_narrow_resnet_widths_and_size():
    m = CACRModel("narrow_resnet", width=8, head_hidden=32, head_out=16)
    assert m.feature_dim == 64
    bb = m.backbone
    assert [len(getattr(bb, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    assert bb.layer1[0].conv1.out_channels == 8 and bb.layer4[0].conv2.out_channels == 64
    info = model_info(CACRModel("narrow_resnet"))
    assert info["arch"] == "narrow_resnet" and info["feature_dim"] == 128
    assert 200_000 < info["backbone_params"] < 400_000  # small enough for CPU training
    assert info["params"] == info["backbone_params"] + info["head_params"]


@pytest.mark.parametrize("norm", ["none", "group"])
def test_norm_options_have_no_batch_statistics(norm):
    m = CACRModel("narrow_resnet", norm=norm, head_hidden=32, head_out=16)
    bn = [mod for mod in m.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)]
    assert bn == []
    if norm == "none":
        assert not any(isinstance(mod, nn.GroupNorm) for mod in m.modules())
    else:
        assert any(isinstance(mod, nn.GroupNorm) for mod in m.modules())
    # without batch statistics, a sample's embedding does not depend on the rest of the batch
    m.train()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        full = m(x)
        alone = m(x[:1])
    torch.testing.assert_close(full[:1], alone, atol=1e-5, rtol=1e-4)


def test_batchnorm_default_depends_on_batch():
    m = CACRModel("narrow_resnet", head_hidden=32, head_out=16)
    assert any(isinstance(mod, nn.BatchNorm2d) for mod in m.backbone.modules())
    assert any(isinstance(mod, nn.BatchNorm1d) for mod in m.head.modules())


def test_head_layers():
    h1 = ProjectionHead(16, 32, 8, layers=1)
    assert [type(m) for m in h1] == [nn.Linear]
    h3 = ProjectionHead(16, 32, 8, layers=3)
    assert [type(m) for m in h3] == [
        nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear,
    ]
    assert h3[0].in_features == 16 and h3[-1].out_features == 8
    m = CACRModel("narrow_resnet", width=4, head_layers=1, head_out=8)
    assert m.embed(torch.randn(2, 3, 32, 32)).shape == (2, 8)
    with pytest.raises(ValueError, match="head_layers"):
        ProjectionHead(16, 32, 8, layers=0)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="arch"):
        CACRModel("vgg16")
    with pytest.raises(ValueError, match="norm"):
        CACRModel(norm="layer")
    with pytest.raises(ValueError, match="width"):
        build_torchvision_backbone("narrow_resnet", width=0)


@pytest.mark.parametrize("arch", ["resnet18", "narrow_resnet"])
def test_backbone_state_dict_loads_into_plain_torchvision(arch, no_network):
    torch.manual_seed(0)
    model = CACRModel(arch, small_images=True)
    model.train()
    with torch.no_grad():  # move BN running stats away from their init values
        model(torch.randn(4, 3, 32, 32))
    model.eval()
    plain = build_torchvision_backbone(**model.backbone_spec)
    assert type(plain) is torchvision.models.resnet.ResNet
    missing, unexpected = plain.load_state_dict(model.backbone.state_dict(), strict=True)
    assert not missing and not unexpected
    plain.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model.features(x), atol=0, rtol=0)


def test_resnet18_export_matches_stock_torchvision_builder():
    """The exported weights load into torchvision.models.resnet18 with only the stem edited."""
    model = CACRModel("resnet18", small_images=True).eval()
    stock = torchvision.models.resnet18(weights=None)
    stock.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    stock.maxpool = nn.Identity()
    stock.fc = nn.Identity()
    stock.load_state_dict(model.backbone.state_dict(), strict=True)
    stock.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(stock(x), model.features(x), atol=0, rtol=0)


def test_gradients_flow_to_backbone():
    m = CACRModel("narrow_resnet", width=4, head_hidden=16, head_out=8)
    z = m(torch.randn(4, 3, 32, 32))
    (z[:, 0].sum()).backward()
    assert m.backbone.conv1.weight.grad is not None
    assert m.backbone.conv1.weight.grad.abs().sum() > 0


def test_channels_last_same_output():
    m = CACRModel("narrow_resnet", width=8, head_hidden=32, head_out=16).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = m(x)
        m_cl = m.to(memory_format=torch.channels_last)
        b = m_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_every_method_builds_its_backbone_from_the_one_spec():
    """cacr.model.backbone_spec is the one source: every method's backbone and its recorded spec
    come from it, ViT depth included (model.vit_depth was once honoured by cacr_moco only)."""
    from cacr.methods import build_method
    from cacr.model import backbone_spec

    model = {"arch": "vit_small", "small_images": False, "width": 16, "norm": "batch", "vit_depth": 1,
             "head": "moco", "head_hidden": 8, "head_out": 4, "head_layers": 2, "predictor_hidden": 8}
    want = {"arch": "vit_small", "small_images": False, "width": 16, "norm": "batch", "depth": 1}
    assert backbone_spec(model) == want
    assert "depth" not in backbone_spec({**model, "vit_depth": 0})  # the arch's 12: the old 4 keys
    assert "depth" not in backbone_spec({**model, "arch": "resnet18"})
    for name in ("cacr", "infonce", "cacr_moco", "cacr_queue"):
        method = build_method(name, model=model, loss={"queue_size": 4}, num_views=2)
        assert method.backbone_spec() == want, name
        assert len(method.backbone.blocks) == 1, name
