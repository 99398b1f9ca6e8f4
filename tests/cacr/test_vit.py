"""cacr.vit: timm ViT backbones with a fixed 2-D sin-cos position embedding, multi-size inputs,
frozen patch projection; and the optimiser's view of their parameters."""
import math

import pytest
import torch

from cacr.model import ARCHS, VIT_ARCHS, build_backbone
from cacr.optim import LARS, build_optimizer, is_no_decay, param_groups
from cacr.vit import sincos_2d


def ref_sincos(h, w, dim):
    """Loop reference: [sin(xω), cos(xω), sin(yω), cos(yω)], ω_c = 10000^(−c/q)."""
    q = dim // 4
    out = torch.zeros(h * w, dim, dtype=torch.float64)
    for y in range(h):
        for x in range(w):
            for c in range(q):
                om = 10000.0 ** (-c / q)
                out[y * w + x, c] = math.sin(x * om)
                out[y * w + x, q + c] = math.cos(x * om)
                out[y * w + x, 2 * q + c] = math.sin(y * om)
                out[y * w + x, 3 * q + c] = math.cos(y * om)
    return out.float()


def test_sincos_matches_loop_reference_and_is_translation_invariant():
    e = sincos_2d(3, 4, 8)
    torch.testing.assert_close(e, ref_sincos(3, 4, 8))
    big = sincos_2d(5, 5, 16).double()
    # inner product depends only on the offset: (0,0)·(1,2) == (2,1)·(3,3)
    assert float(big[0] @ big[1 * 5 + 2]) == pytest.approx(float(big[2 * 5 + 1] @ big[3 * 5 + 3]), abs=1e-5)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(2, 2, 6)


def test_vit_registered_and_features_are_cls_token_at_two_sizes():
    assert set(VIT_ARCHS) <= set(ARCHS)
    torch.manual_seed(0)
    net = build_backbone("vit_small", depth=1).eval()
    assert net.feature_dim == 384 and net.num_classes == 0
    with torch.no_grad():
        f224 = net(torch.randn(2, 3, 224, 224))
        f96 = net(torch.randn(2, 3, 96, 96))                      # local crops: 6x6 tokens
        tokens = net.forward_features(torch.randn(1, 3, 96, 96))
    assert f224.shape == (2, 384) and f96.shape == (2, 384) and tokens.shape == (1, 37, 384)
    # the table is the fixed sin-cos of the 14x14 grid with a zero CLS row, and is frozen
    torch.testing.assert_close(net.pos_embed[0, 1:], ref_sincos(14, 14, 384))
    assert float(net.pos_embed[0, 0].abs().max()) == 0.0 and not net.pos_embed.requires_grad


def test_freeze_patch_embed_and_optimizer_groups():
    net = build_backbone("vit_base", depth=1, freeze_patch_embed=True)
    assert net.feature_dim == 768
    assert not net.patch_embed.proj.weight.requires_grad and not net.patch_embed.proj.bias.requires_grad
    named = dict(net.named_parameters())
    decay, no_decay = param_groups(net, 0.1)
    ids = {id(p) for p in no_decay["params"]}
    assert id(named["cls_token"]) in ids and is_no_decay("cls_token", named["cls_token"])
    assert id(named["pos_embed"]) not in ids and id(named["pos_embed"]) not in {id(p) for p in decay["params"]}
    assert id(named["blocks.0.norm1.weight"]) in ids and id(named["blocks.0.attn.qkv.bias"]) in ids
    assert id(named["blocks.0.attn.qkv.weight"]) in {id(p) for p in decay["params"]}
    assert decay["lars_adapt"] and not no_decay["lars_adapt"] and no_decay["weight_decay"] == 0.0
    # unfrozen pos_embed (by name, 3-D) is excluded from decay too
    net2 = build_backbone("vit_small", depth=1)
    net2.pos_embed.requires_grad_(True)
    assert any(p is net2.pos_embed for p in param_groups(net2, 0.1)[1]["params"])


def test_lars_does_not_scale_or_decay_the_cls_token():
    """LARS on a 3-D cls_token: plain SGD step (−lr·g), not trust-scaled, not decayed."""
    net = build_backbone("vit_small", depth=1)
    opt = build_optimizer("lars", net, lr=0.5, momentum=0.0, weight_decay=0.1)
    assert isinstance(opt, LARS)
    before = net.cls_token.detach().clone()
    for p in net.parameters():
        p.grad = torch.ones_like(p) if p.requires_grad else None
    opt.step()
    torch.testing.assert_close(net.cls_token.detach(), before - 0.5)
