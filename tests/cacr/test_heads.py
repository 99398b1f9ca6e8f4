"""cacr.heads: the authors' MoCo-v3 projector / predictor layouts."""
import pytest
import torch
from torch import nn

from cacr.heads import MLPHead, moco_predictor, moco_projector


def _layout(head):
    return [(type(m).__name__, getattr(m, "in_features", None), getattr(m, "out_features", None),
             getattr(m, "affine", None), getattr(m, "bias", None) is not None) for m in head]


def test_resnet_projector_and_predictor_layout():
    g = moco_projector("resnet", 2048, hidden=4096, out_dim=256)
    assert [t[0] for t in _layout(g)] == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert (g[0].in_features, g[0].out_features, g[3].out_features) == (2048, 4096, 256)
    assert g[0].bias is None and g[3].bias is None and g[1].affine and not g[4].affine
    h = moco_predictor("resnet", 256, hidden=4096)
    assert [t[0] for t in _layout(h)] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]   # no final BN
    assert (h[0].in_features, h[0].out_features, h[3].out_features) == (256, 4096, 256)


def test_vit_projector_three_layers_predictor_ends_in_bn():
    g = moco_projector("vit", 768, hidden=64, out_dim=16)
    assert [type(m).__name__ for m in g] == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]
    assert not g[-1].affine
    h = moco_predictor("vit", 16, hidden=64)
    assert [type(m).__name__ for m in h] == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert not h[-1].affine


def test_final_bn_standardises_outputs():
    g = moco_projector("resnet", 8, hidden=16, out_dim=4).train()
    y = g(torch.randn(64, 8))
    torch.testing.assert_close(y.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(0, unbiased=False), torch.ones(4), atol=1e-3, rtol=0)


def test_norm_none_has_no_batch_statistics_and_bad_args_raise():
    h = MLPHead(2, 4, 8, 3, norm="none")
    assert not any(isinstance(m, nn.BatchNorm1d) for m in h.modules())
    assert h[0].bias is not None                                   # no BN to cancel it
    with pytest.raises(ValueError, match="kind"):
        moco_projector("vgg", 4)
    with pytest.raises(ValueError, match="layers"):
        MLPHead(0, 4, 8, 3)
