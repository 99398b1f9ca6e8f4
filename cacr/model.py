"""Encoder f + projection head g for CACR: z = g(f(x)) / ||g(f(x))||, and the ONE backbone
registry (`ARCHS`) and builder (`build_backbone`).

ViT backbones ("vit_small", "vit_base", patch 16) live in `cacr.vit`; the momentum-encoder heads
in `cacr.heads`.  ResNet backbones are torchvision ResNets, always built with `weights=None`
(never a download):

| arch            | blocks               | widths            | feature_dim | backbone params* |
|-----------------|----------------------|-------------------|-------------|------------------|
| "narrow_resnet" | Basic [1, 1, 1, 1]   | w, 2w, 4w, 8w     | 8w (128)    | 0.31 M (w = 16)  |
| "resnet18"      | Basic [2, 2, 2, 2]   | 64 .. 512         | 512         | 11.2 M           |
| "resnet34"      | Basic [3, 4, 6, 3]   | 64 .. 512         | 512         | 21.3 M           |
| "resnet50"      | Bottleneck [3, 4, 6, 3] | 64 .. 512 (x4) | 2048        | 23.5 M           |
(* small_images=True, norm="batch"; the default head 128 -> 512 -> 128 adds 0.13 M for w = 16.)

"narrow_resnet" is a ResNet-10 layout with configurable width, small enough to train on 32-px
images on CPU in minutes: ~16 M multiply-adds per 32-px image at w = 16; forward + backward of
160 views takes ~0.6 s at w = 16 and ~0.18 s at w = 8 on one core (channels_last, fp32). It is
still an instance of `torchvision.models.resnet.ResNet` (same module names and forward; only the
layer widths differ), built by `build_torchvision_backbone`.

`small_images=True` (CIFAR-style stem): conv1 is a 3x3 stride-1 conv and the max-pool is removed
(`nn.Identity`), so 32-px inputs keep a 4x4 map before the global pool.

Export / loading story: `model.backbone` is the torchvision ResNet with `fc = nn.Identity()`. Its
`state_dict()` loads (strict) into `build_torchvision_backbone(**model.backbone_spec)`. For
resnet18/34/50 that is stock torchvision (`torchvision.models.resnet18(weights=None)` etc.) with
the stem edits above and `fc = nn.Identity()`, so the weights need nothing from this package
(tested). "narrow_resnet" has no stock torchvision builder: its loader is
`cacr.model.build_torchvision_backbone` (it returns a torchvision ResNet object). An export must
record the backbone spec next to the weights: `backbone_spec` is the ONE function that makes it
(arch, small_images, width, norm, and `depth` for a ViT of other than 12 blocks).

`norm`: "batch" (BatchNorm, default), "group" (GroupNorm, no batch statistics) or "none"
(Identity: no normalisation layers at all; used by the distributed-equality tests, where
per-worker batch statistics would break the W workers == 1 worker identity). The projection head
follows the same choice (BatchNorm1d / GroupNorm / nothing between its linear layers).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tvm
from torchvision.models.resnet import BasicBlock, ResNet

from cacr.archs import ARCHS, NORMS, RESNET_ARCHS, VIT_ARCHS  # the one registry (torch-free)

__all__ = [
    "ARCHS",
    "NORMS",
    "RESNET_ARCHS",
    "VIT_ARCHS",
    "build_backbone",
    "backbone_spec",
    "zero_init_residual_",
    "CACRModel",
    "ProjectionHead",
    "build_torchvision_backbone",
    "model_info",
]


_FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}


def _group_count(channels: int) -> int:
    """GroupNorm groups: 32 when possible, keeping >= 2 channels per group."""
    for g in (32, 16, 8, 4, 2):
        if channels % g == 0 and channels // g >= 2:
            return g
    return 1


def _norm_2d(norm: str) -> Callable[[int], nn.Module]:
    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "group":
        return lambda c: nn.GroupNorm(_group_count(c), c)
    if norm == "none":
        return lambda c: nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def _norm_1d(norm: str, dim: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm1d(dim)
    if norm == "group":
        return nn.GroupNorm(_group_count(dim), dim)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def _init_resnet_(model: nn.Module) -> None:
    """torchvision's ResNet initialisation (kaiming conv, unit norm weights)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def _build_resnet(arch: str, small_images: bool, width: int, norm: str, zero_init_residual: bool) -> ResNet:
    """A torchvision ResNet with ``fc = nn.Identity()`` (see the module docstring)."""
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise ValueError(f"width must be an int >= 1, got {width!r}")
    norm_layer = _norm_2d(norm)
    if arch == "narrow_resnet":
        # a torchvision ResNet with BasicBlocks [1, 1, 1, 1], re-made at widths w, 2w, 4w, 8w
        net = ResNet(BasicBlock, [1, 1, 1, 1], norm_layer=norm_layer)
        net.inplanes = width
        net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        net.bn1 = norm_layer(width)
        net.layer1 = net._make_layer(BasicBlock, width, 1)
        net.layer2 = net._make_layer(BasicBlock, 2 * width, 1, stride=2)
        net.layer3 = net._make_layer(BasicBlock, 4 * width, 1, stride=2)
        net.layer4 = net._make_layer(BasicBlock, 8 * width, 1, stride=2)
        feature_dim = 8 * width
    else:
        net = getattr(tvm, arch)(weights=None, norm_layer=norm_layer)
        feature_dim = _FEATURE_DIMS[arch]
    if small_images:
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    _init_resnet_(net)
    if zero_init_residual:
        zero_init_residual_(net)
    net.feature_dim = feature_dim  # plain attribute, not in the state_dict
    return net


def zero_init_residual_(net: nn.Module) -> int:
    """Zero the scale of the last norm layer of every residual block (Goyal et al. 2017; the
    authors' ResNet-50 setup), so each block starts as the identity.  Returns how many were zeroed
    (0 with ``norm="none"``: there is nothing to zero)."""
    from torchvision.models.resnet import Bottleneck

    count = 0
    for m in net.modules():
        last = m.bn3 if isinstance(m, Bottleneck) else m.bn2 if isinstance(m, BasicBlock) else None
        if last is not None and getattr(last, "weight", None) is not None:
            nn.init.zeros_(last.weight)
            count += 1
    return count


def build_backbone(
    arch: str = "narrow_resnet",
    small_images: bool = True,
    *,
    width: int = 16,
    norm: str = "batch",
    zero_init_residual: bool = False,
    img_size: int = 224,
    depth: int | None = None,
    freeze_patch_embed: bool = False,
) -> nn.Module:
    """THE backbone builder: every arch of :data:`ARCHS`, randomly initialised (never a download).

    ``forward(x)`` -> (B, feature_dim) pooled features; ``net.feature_dim`` says how many.
    ResNets (:data:`RESNET_ARCHS`) read ``small_images``, ``width`` (narrow_resnet only), ``norm``
    and ``zero_init_residual``.  ViTs (:data:`VIT_ARCHS`, ``cacr.vit``) read ``img_size``, ``depth``
    (None: the arch's 12) and ``freeze_patch_embed``; they accept and ignore the ResNet keys, so
    one ``backbone_spec`` dict (arch, small_images, width, norm, ...) rebuilds either kind.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if arch in VIT_ARCHS:
        from cacr.vit import build_vit

        return build_vit(arch, img_size=img_size, depth=depth, freeze_patch_embed=freeze_patch_embed)
    return _build_resnet(arch, small_images, width, norm, zero_init_residual)


#: The name export.py / evaluate.py and the README's loading snippet use; same function.
build_torchvision_backbone = build_backbone


def backbone_spec(model: Mapping[str, Any]) -> dict[str, Any]:
    """THE backbone spec: the :func:`build_backbone` keywords that rebuild a run's backbone, from
    its ``model`` config section (a dict: ``arch``, ``small_images``, ``width``, ``norm``,
    ``vit_depth``).  Every method records it (``Method.backbone_spec()``, stored in checkpoints
    as ``backbone_spec``); export and evaluate rebuild the network from the stored copy, so a
    backbone is always rebuilt with the keywords it was trained with.  A ViT's ``depth`` appears
    only when ``vit_depth`` asks for other than the arch's 12 blocks, so specs of full-depth
    ViTs and of every ResNet keep the four keys earlier versions wrote."""
    arch = model.get("arch", "narrow_resnet")
    spec = {"arch": arch, "small_images": bool(model.get("small_images", True)),
            "width": model.get("width", 16), "norm": model.get("norm", "batch")}
    if arch in VIT_ARCHS and model.get("vit_depth"):
        spec["depth"] = int(model["vit_depth"])
    return spec


class ProjectionHead(nn.Sequential):
    """MLP head: Linear -> [norm -> ReLU -> Linear] * (layers - 1). layers = 1: one Linear."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int = 2, norm: str = "batch"):
        if not isinstance(layers, int) or layers < 1:
            raise ValueError(f"head_layers must be an int >= 1, got {layers!r}")
        for name, v in (("in_dim", in_dim), ("head_hidden", hidden), ("head_out", out_dim)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        mods: list[nn.Module] = []
        dim = in_dim
        for _ in range(layers - 1):
            # no bias before a batch/group norm (it would be cancelled)
            mods += [
                nn.Linear(dim, hidden, bias=norm == "none"),
                _norm_1d(norm, hidden),
                nn.ReLU(inplace=True),
            ]
            dim = hidden
        mods.append(nn.Linear(dim, out_dim))
        super().__init__(*mods)


class CACRModel(nn.Module):
    """Backbone + projection head. `forward(x) == embed(x)`: L2-normalised (B, head_out)."""

    def __init__(
        self,
        arch: str = "narrow_resnet",
        *,
        small_images: bool = True,
        width: int = 16,
        head_hidden: int = 512,
        head_out: int = 128,
        head_layers: int = 2,
        norm: str = "batch",
        vit_depth: int = 0,
    ):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.arch = arch
        self.norm = norm
        self.backbone_spec = backbone_spec(dict(arch=arch, small_images=small_images, width=width,
                                                norm=norm, vit_depth=vit_depth))
        self.backbone = build_backbone(**self.backbone_spec)
        self.feature_dim: int = self.backbone.feature_dim
        self.head_out = head_out
        self.head = ProjectionHead(self.feature_dim, head_hidden, head_out, head_layers, norm)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features (B, feature_dim): what kNN / linear evaluation uses."""
        return self.backbone(x)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised head output g(f(x)), (B, head_out)."""
        return self.head(self.features(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """z = g(f(x)) / ||g(f(x))||, (B, head_out)."""
        return F.normalize(self.project(x), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)


def model_info(model: nn.Module) -> dict:
    """Small dict for logs: arch, parameter counts, feature / embedding dims, norm."""
    info: dict = {"params": sum(p.numel() for p in model.parameters())}
    if isinstance(model, CACRModel):
        info.update(
            arch=model.arch,
            backbone_params=sum(p.numel() for p in model.backbone.parameters()),
            head_params=sum(p.numel() for p in model.head.parameters()),
            feature_dim=model.feature_dim,
            head_out=model.head_out,
            norm=model.norm,
            small_images=model.backbone_spec["small_images"],
            width=model.backbone_spec["width"],
        )
    else:
        info.update(arch=type(model).__name__, feature_dim=getattr(model, "feature_dim", None))
    return info
