"""Projector and predictor heads of the momentum-encoder setup, as the authors build them on MoCo v3.

``MLPHead(layers, in_dim, hidden, out_dim, last_bn)`` is the one building block::

    [Linear(no bias) -> BN -> ReLU] × (layers − 1)  ->  Linear(no bias)  [-> BN(affine=False)]

Biases are omitted because every Linear is followed by a BatchNorm that would cancel them (the
last one too when ``last_bn``).  The final BN without affine parameters standardises each output
dimension, which the authors found helps (MoCo v3 paper); without ``last_bn`` the last Linear
keeps no bias either, as theirs.

| kind     | projector g (on the backbone features)        | predictor h (on g's output)          |
|----------|-----------------------------------------------|--------------------------------------|
| "resnet" | 2 layers, 2048 -> 4096 -> 256, last BN         | 2 layers, 256 -> 4096 -> 256, no BN  |
| "vit"    | 3 layers, width -> 4096 -> 4096 -> 256, last BN | 2 layers, 256 -> 4096 -> 256, last BN |

(hidden / out widths are configurable: ``model.head_hidden`` / ``model.head_out`` /
``model.predictor_hidden``.)  ``norm="none"`` replaces every BN by the identity (for the
distributed-equality tests, where per-worker batch statistics would differ).
"""
from __future__ import annotations

from torch import nn

__all__ = ["HEAD_KINDS", "MLPHead", "moco_projector", "moco_predictor"]

HEAD_KINDS = ("resnet", "vit")


class MLPHead(nn.Sequential):
    """See the module docstring."""

    def __init__(self, layers: int, in_dim: int, hidden: int, out_dim: int, *, last_bn: bool = True,
                 norm: str = "batch"):
        if not isinstance(layers, int) or layers < 1:
            raise ValueError(f"MLPHead: layers must be an int >= 1, got {layers!r}")
        for name, v in (("in_dim", in_dim), ("hidden", hidden), ("out_dim", out_dim)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"MLPHead: {name} must be an int >= 1, got {v!r}")
        if norm not in ("batch", "none"):
            raise ValueError(f"MLPHead: norm must be 'batch' or 'none', got {norm!r}")
        bn = norm == "batch"
        mods: list[nn.Module] = []
        dim = in_dim
        for layer in range(layers):
            last = layer == layers - 1
            out = out_dim if last else hidden
            mods.append(nn.Linear(dim, out, bias=not bn))
            if not last:
                mods += [nn.BatchNorm1d(out) if bn else nn.Identity(), nn.ReLU(inplace=True)]
            elif last_bn and bn:
                mods.append(nn.BatchNorm1d(out, affine=False))
            dim = out
        super().__init__(*mods)


def moco_projector(kind: str, in_dim: int, *, hidden: int = 4096, out_dim: int = 256,
                   norm: str = "batch") -> MLPHead:
    """Projector g: 2 layers for ResNets, 3 for ViTs, both ending in BN(affine=False)."""
    if kind not in HEAD_KINDS:
        raise ValueError(f"head kind must be one of {HEAD_KINDS}, got {kind!r}")
    return MLPHead(2 if kind == "resnet" else 3, in_dim, hidden, out_dim, last_bn=True, norm=norm)


def moco_predictor(kind: str, dim: int, *, hidden: int = 4096, norm: str = "batch") -> MLPHead:
    """Predictor h (online branch only): 2 layers dim -> hidden -> dim; a final BN(affine=False)
    for ViTs only."""
    if kind not in HEAD_KINDS:
        raise ValueError(f"head kind must be one of {HEAD_KINDS}, got {kind!r}")
    return MLPHead(2, dim, hidden, dim, last_bn=kind == "vit", norm=norm)
