"""What every self-supervised method in ``cacr/`` is: an ``nn.Module`` that owns its networks,
computes its own loss and performs its own after-step update (the moco-v3 pattern).

The trainer (``pipeline/``) only knows this interface:

* ``forward(views) -> LossOutput``. ``views`` is a sequence of view groups, one tensor per crop
  size, each of shape ``(V_g, n, C, H_g, W_g)`` (view-major; the global crops first, then the local
  crops of multi-crop); a single 5-D tensor is accepted as one group. ``n`` is this worker's LOCAL
  batch; methods gather what they need across workers themselves (``cacr.distributed``).
* ``after_step(progress)`` after ``optimizer.step()``: EMA / queue updates; ``progress`` in [0, 1] is
  the position in the whole run (step / total steps), used by schedules such as the cosine momentum.
  Returns scalars worth logging (e.g. ``{"momentum": m}``); the default does nothing.
* ``backbone``: the network whose pooled features are exported and evaluated (the ONLINE backbone
  for momentum methods; ``exported_network`` says which in words, for ``backbone.json``);
  ``backbone_spec()``: the keyword arguments that rebuild it (made by
  :func:`cacr.model.backbone_spec`, see :func:`cacr.model.build_backbone`), recorded in
  checkpoints and ``backbone.json``.
* ``state_dict()`` covers everything a resume needs (momentum networks, queues as buffers); the
  optimiser only sees ``trainable_parameters()``.
* ``convert_sync_batchnorm()``: what ``model.sync_batchnorm=true`` turns into SyncBatchNorm (the
  trainer calls it with several workers). Default: every BatchNorm of the method; a method whose
  design forbids it for one network (the queue method's shuffle-BN key encoder) keeps it out.

No Ray import anywhere in ``cacr/``.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from cacr.loss import LossOutput

Views = Sequence[torch.Tensor] | torch.Tensor


def view_groups(views: Views) -> list[torch.Tensor]:
    """``views`` as a list of 5-D groups ``(V_g, n, C, H, W)`` with the same ``n``."""
    groups = [views] if isinstance(views, torch.Tensor) else list(views)
    if not groups or any(g.dim() != 5 for g in groups):
        raise ValueError("views: expected (V, n, C, H, W) tensors, one per crop size")
    if len({g.shape[1] for g in groups}) != 1:
        raise ValueError(f"views: every group needs the same batch n; got {[g.shape[1] for g in groups]}")
    return groups


class Method(nn.Module):
    """Base class of the methods in :data:`METHODS` (see the module docstring for the contract)."""

    #: registry name (``loss.name`` in the config)
    name: str = ""
    #: which of the method's networks ``backbone`` is, in words (``network`` in backbone.json)
    exported_network: str = "backbone"

    def forward(self, views: Views) -> LossOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, progress: float) -> dict[str, float]:
        return {}

    @property
    def backbone(self) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def backbone_spec(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def convert_sync_batchnorm(self) -> "Method":
        """Replace the BatchNorm layers that should share statistics across workers by
        SyncBatchNorm, in place; returns ``self``. Default: all of them (for ``cacr_moco`` the
        momentum target as well, as MoCo v3 converts its whole model)."""
        return nn.SyncBatchNorm.convert_sync_batchnorm(self)  # converts the children in place

    def model_state(self) -> dict[str, torch.Tensor]:
        """A checkpoint's ``"model"`` entry: the exported network's weights under ``backbone.*``
        (the keys pipeline/export.py and pipeline/evaluate.py read). The full ``state_dict()``,
        for a resume, is stored beside it; both share tensors, so nothing is written twice."""
        return {f"backbone.{k}": v for k, v in self.backbone.state_dict().items()}

    def last_embeddings(self) -> torch.Tensor | None:
        """The detached, L2-normalised (V, n, D) embeddings of the last forward (diagnostics:
        alignment, uniformity, per-dimension std), or None."""
        return None


#: name -> factory ``(model: dict, loss: dict, **extra) -> Method``; filled by ``register``.
METHODS: dict[str, Callable[..., Method]] = {}
#: name -> the registered class (what export reads ``exported_network`` from)
METHOD_CLASSES: dict[str, type[Method]] = {}


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    def deco(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        METHODS[name] = cls.from_config  # type: ignore[attr-defined]
        METHOD_CLASSES[name] = cls
        return cls
    return deco
