"""Vision Transformer backbones ("vit_small", "vit_base", patch 16) for the momentum-encoder setup.

Why timm: it is the maintained library the authors' MoCo-v3 code builds its ViTs on, and its
``VisionTransformer`` (timm >= 0.9) already does what multi-crop needs: ``dynamic_img_size=True``
resamples the position embedding to the token grid of each input (bicubic, in
``timm.layers.resample_abs_pos_embed``), so one network takes 224-px global and 96-px local crops.
We only configure it; the fixed 2-D sin-cos position embedding is ours (below).

What is built (the authors' choices, facts from the MoCo-v3 paper):
* vit_small: width 384, 12 blocks, 12 heads; vit_base: width 768, 12 blocks, 12 heads; MLP ratio 4,
  patch 16, a class token, LayerNorm; no classifier (``num_classes=0``): ``forward`` returns the
  CLS token after the final norm, (B, width) -- the features kNN / linear evaluation use.
* Position embedding: fixed 2-D sin-cos (``sincos_2d``) of the nominal ``img_size / 16`` grid,
  a zero vector for the class token, frozen (``requires_grad=False``; still a parameter so it is
  saved and exported).
* Initialisation: timm's "moco" scheme (xavier-uniform linears, Q/K/V treated separately), plus
  the patch projection initialised xavier-uniform over its flattened (out, 3·16·16) weight.
* ``freeze_patch_embed=True``: the patch projection is frozen ("stop-grad conv1", which the
  authors found stabilises training).
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["VIT_SPECS", "build_vit", "sincos_2d"]

#: arch -> (width, heads); depth 12 and patch 16 for both
VIT_SPECS = {"vit_small": (384, 12), "vit_base": (768, 12)}
PATCH = 16


def sincos_2d(grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    r"""Fixed 2-D sin-cos position embedding, (grid_h·grid_w, dim), row-major over the grid.

    ``dim`` is split in four quarters of ``q = dim / 4`` channels.  With frequencies
    ``ω_c = temperature^(−c/q)``, c = 0..q−1, the token at row y, column x gets::

        [ sin(x·ω), cos(x·ω), sin(y·ω), cos(y·ω) ]

    so the inner product of two embeddings depends only on their offset in x and in y.
    """
    if dim % 4:
        raise ValueError(f"sincos_2d: dim must be divisible by 4, got {dim}")
    q = dim // 4
    omega = temperature ** (-torch.arange(q, dtype=torch.float64) / q)
    ys, xs = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                            torch.arange(grid_w, dtype=torch.float64), indexing="ij")
    ax = xs.reshape(-1, 1) * omega                                        # (H·W, q)
    ay = ys.reshape(-1, 1) * omega
    return torch.cat([ax.sin(), ax.cos(), ay.sin(), ay.cos()], dim=1).float()


def build_vit(arch: str, *, img_size: int = 224, depth: int | None = None,
              freeze_patch_embed: bool = False) -> nn.Module:
    """A timm ``VisionTransformer`` as described in the module docstring.

    ``img_size``: the nominal input size (its 16-px grid defines the sin-cos table; other sizes
    are resampled per forward).  ``depth``: number of blocks (None: 12; smaller only for tests and
    benchmarks).  ``net.feature_dim`` is the width.
    """
    from timm.models.vision_transformer import VisionTransformer

    if arch not in VIT_SPECS:
        raise ValueError(f"arch must be one of {tuple(VIT_SPECS)}, got {arch!r}")
    if not isinstance(img_size, int) or img_size < PATCH or img_size % PATCH:
        raise ValueError(f"img_size must be a multiple of {PATCH}, got {img_size!r}")
    depth = 12 if depth is None else depth
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an int >= 1, got {depth!r}")
    width, heads = VIT_SPECS[arch]
    net = VisionTransformer(img_size=img_size, patch_size=PATCH, embed_dim=width, depth=depth,
                            num_heads=heads, mlp_ratio=4.0, qkv_bias=True, num_classes=0,
                            global_pool="token", class_token=True, dynamic_img_size=True,
                            weight_init="moco")
    grid = img_size // PATCH
    with torch.no_grad():
        table = torch.cat([torch.zeros(1, width), sincos_2d(grid, grid, width)], dim=0)
        net.pos_embed.copy_(table.unsqueeze(0))
        w = net.patch_embed.proj.weight
        bound = math.sqrt(6.0 / (w.shape[0] + w[0].numel()))           # xavier over (out, 3·p·p)
        nn.init.uniform_(w, -bound, bound)
        nn.init.zeros_(net.patch_embed.proj.bias)
    net.pos_embed.requires_grad_(False)
    if freeze_patch_embed:
        net.patch_embed.proj.requires_grad_(False)
    net.feature_dim = width
    return net
