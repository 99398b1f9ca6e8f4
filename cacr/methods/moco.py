"""``cacr_moco``: momentum-encoder CACR, the authors' ImageNet setup built on MoCo v3
(docs/METHOD.md, "Momentum-encoder CACR"; the loss is :func:`cacr.loss.cacr_moco_loss`).

Networks::

    online  : x -> backbone f -> projector g -> predictor h -> q = h / ‖h‖     (trained)
    target  : x -> f' -> g' -> k = g' / ‖g'‖                                   (EMA copy, no grad)

Heads come from :mod:`cacr.heads` (ResNet: 2-layer projector, predictor without a final BN; ViT:
3-layer projector, predictor ending in BN(affine=False)).

Momentum schedule and WHEN the EMA runs (the MoCo-v3 order)::

    m(t) = 1 − ½ (1 + cos(π t)) (1 − m₀)       t = progress in [0, 1]   (``momentum.cosine``)
    m(t) = m₀                                                          (cosine off)
    θ' ← m θ' + (1 − m) θ                      at the START of every training forward

``after_step(progress)`` only records ``t`` (the position at the end of the step just taken, i.e.
the start of the next one) in a buffer; the next ``forward`` first updates the target with
``m(t)`` and only then computes the keys -- so keys always come from the target updated with the
latest optimiser step, exactly as MoCo v3 (whose iteration computes m from the current position,
updates, then encodes).  The first step uses ``m(0) = m₀`` on a fresh copy (a no-op).  The
recorded position is a buffer: a resume restores it with the target network (``state_dict``).
Forwards in eval mode never update the target.

Views: ``forward(views)`` takes the view groups of ``cacr.methods.base`` (global crops first).
Every view goes through the online branch separately (BatchNorm statistics per view, as the
authors' two separate encoder calls).  Targets ``light``: the first 2 views (the global crops;
``A = 2``); ``full``: every view (``A = V``; local crops then also go through the target, which
costs one more no-grad forward per local crop).
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cacr.heads import moco_predictor, moco_projector
from cacr.loss import LossOutput, cacr_moco_loss
from cacr.methods.base import Method, Views, register, view_groups
from cacr.model import RESNET_ARCHS, backbone_spec, build_backbone

TARGETS = ("light", "full")


def momentum_at(progress: float, base: float, cosine: bool = True) -> float:
    """``m(t) = 1 − ½(1 + cos(π t))(1 − m₀)`` for t clamped to [0, 1] (``m₀`` when not cosine)."""
    if not cosine:
        return float(base)
    t = min(max(float(progress), 0.0), 1.0)
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * t)) * (1.0 - float(base))


@register("cacr_moco")
class MomentumCACR(Method):
    """See the module docstring.  Build with :meth:`from_config` or directly."""

    exported_network = ("online backbone (the momentum target network, the projector and the "
                        "predictor are not exported)")

    def __init__(self, *, spec: dict[str, Any], head_hidden: int = 4096, head_out: int = 256,
                 predictor_hidden: int = 4096, temperature: float = 1.0, targets: str = "light",
                 momentum_base: float = 0.99, momentum_cosine: bool = True,
                 freeze_patch_embed: bool = False, zero_init_residual: bool = True):
        super().__init__()
        if targets not in TARGETS:
            raise ValueError(f"cacr_moco: loss.targets must be one of {TARGETS}, got {targets!r}")
        if not 0 <= momentum_base <= 1:
            raise ValueError(f"cacr_moco: momentum.base must be in [0, 1], got {momentum_base}")
        if not temperature > 0:
            raise ValueError(f"cacr_moco: loss.temperature must be > 0, got {temperature}")
        self.spec = dict(spec)
        self.kind = "resnet" if spec["arch"] in RESNET_ARCHS else "vit"
        head_norm = "none" if spec.get("norm") == "none" else "batch"
        self.online_backbone = build_backbone(**self.spec, freeze_patch_embed=freeze_patch_embed,
                                              zero_init_residual=zero_init_residual)
        dim = self.online_backbone.feature_dim
        self.projector = moco_projector(self.kind, dim, hidden=head_hidden, out_dim=head_out, norm=head_norm)
        self.predictor = moco_predictor(self.kind, head_out, hidden=predictor_hidden, norm=head_norm)
        self.target_backbone = copy.deepcopy(self.online_backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.temperature = float(temperature)
        self.targets = targets
        self.momentum_base = float(momentum_base)
        self.momentum_cosine = bool(momentum_cosine)
        # Position in the run recorded by after_step: part of the state_dict (resume).
        self.register_buffer("progress", torch.zeros((), dtype=torch.float64))
        self._last_q: torch.Tensor | None = None
        self._last_m = momentum_at(0.0, self.momentum_base, self.momentum_cosine)
        self._last_align = float("nan")

    # ------------------------------------------------------------------ construction from config
    @classmethod
    def from_config(cls, model: dict, loss: dict, *, momentum: dict | None = None,
                    num_views: int | None = None, **_: Any) -> "MomentumCACR":
        """From ``to_dict`` of the config sections ``model``, ``loss``, ``momentum``."""
        momentum = momentum or {}
        if model.get("head", "moco") != "moco":
            raise ValueError("cacr_moco: needs model.head=moco (projector + predictor of the "
                             f"momentum setup); got model.head={model.get('head')!r}")
        targets = loss.get("targets", "light")
        if num_views is not None and num_views < 2:
            raise ValueError(f"cacr_moco: needs >= 2 views per image, got {num_views}")
        return cls(spec=backbone_spec(model), head_hidden=int(model.get("head_hidden", 4096)),
                   head_out=int(model.get("head_out", 256)),
                   predictor_hidden=int(model.get("predictor_hidden", 4096)),
                   temperature=float(loss.get("temperature", 1.0)), targets=targets,
                   momentum_base=float(momentum.get("base", 0.99)),
                   momentum_cosine=bool(momentum.get("cosine", True)),
                   freeze_patch_embed=bool(model.get("freeze_patch_embed", False)),
                   zero_init_residual=bool(model.get("zero_init_residual", True)))

    # ------------------------------------------------------------------ the Method interface
    @property
    def backbone(self) -> nn.Module:
        """The ONLINE backbone: what is exported and evaluated."""
        return self.online_backbone

    def backbone_spec(self) -> dict[str, Any]:
        return dict(self.spec)

    def last_embeddings(self) -> torch.Tensor | None:
        return self._last_q

    def momentum(self) -> float:
        """m at the recorded position (the value the next training forward uses)."""
        return momentum_at(float(self.progress), self.momentum_base, self.momentum_cosine)

    @torch.no_grad()
    def after_step(self, progress: float) -> dict[str, float]:
        """Record the run position for the next step's EMA; report this step's diagnostics."""
        self.progress.fill_(float(progress))
        return {"momentum": self._last_m, "key_query_alignment": self._last_align}

    def forward(self, views: Views) -> LossOutput:
        groups = view_groups(views)
        if self.training:
            self._last_m = self.momentum()
            self.update_target(self._last_m)
        flat = [g[v] for g in groups for v in range(g.shape[0])]      # V tensors (n, C, H, W)
        if self.targets == "light" and groups[0].shape[0] < 2:
            raise ValueError("cacr_moco: loss.targets=light needs 2 global crops in the first view group")
        A = 2 if self.targets == "light" else len(flat)
        q = torch.stack([F.normalize(self.predictor(self.projector(self.online_backbone(x))), dim=-1)
                         for x in flat])                              # (V, n, D)
        with torch.no_grad():
            k = torch.stack([F.normalize(self.target_projector(self.target_backbone(x)), dim=-1)
                             for x in flat[:A]])                       # (A, n, D)
            # key/query alignment: mean cosine of the loss's positive pairs q_v(i)·k_a(i), v ≠ a
            sims = torch.einsum("vnd,and->avn", q.detach().float(), k.float())
            off = ~torch.eye(A, len(flat), dtype=torch.bool, device=q.device)
            self._last_align = float(sims[off].mean())
        self._last_q = q.detach()
        return cacr_moco_loss(q, k, temperature=self.temperature)

    # ------------------------------------------------------------------ EMA
    def _ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        online = list(self.online_backbone.parameters()) + list(self.projector.parameters())
        target = list(self.target_backbone.parameters()) + list(self.target_projector.parameters())
        return target, online

    @torch.no_grad()
    def update_target(self, m: float) -> None:
        """θ' ← m θ' + (1 − m) θ over the backbone and projector parameters, as two fused
        multi-tensor ops (BN running statistics are the target's own, as in MoCo v3)."""
        target, online = self._ema_pairs()
        torch._foreach_mul_(target, m)
        torch._foreach_add_(target, online, alpha=1.0 - m)
