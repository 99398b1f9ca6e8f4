"""CACR and the multi-view InfoNCE baseline: one network for every view ("symmetric" methods).

Every view ``x[v, i]`` (view ``v`` of image ``i``) goes through the same encoder ``f`` and
projection head ``g`` (:class:`cacr.model.CACRModel`):

    z[v, i] = g(f(x[v, i])) / ||g(f(x[v, i]))||

With several crop sizes (multi-crop) each view group ``(V_g, n, C, H_g, W_g)`` is one batch of its
own resolution, embedded separately; the groups' embeddings are concatenated along ``V`` (global
crops first), so the loss sees ``z`` of shape ``(V = sum V_g, n, D)`` exactly as with one crop
size. The loss then is ``cacr_loss(z)`` or ``infonce_loss(z)`` (cacr/loss.py, which also gathers
the other workers' embeddings as negatives). Nothing is updated after the optimiser step (no
momentum network, no queue), so ``after_step`` is the base class's no-op.

State: the method's only sub-module is ``model`` (the CACRModel), so its ``state_dict`` keys are
``model.backbone.*`` / ``model.head.*``. Checkpoints written before methods existed stored the
CACRModel's own state (``backbone.*`` / ``head.*``); :meth:`SymmetricMethod.load_state_dict`
accepts that layout too, so such runs still resume.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from cacr.loss import LossOutput, cacr_loss, infonce_loss
from cacr.methods.base import Method, Views, register, view_groups
from cacr.model import CACRModel

#: the ``model`` config keys a CACRModel is built from (other keys, e.g. ``sync_batchnorm``, are
#: the trainer's business)
MODEL_KEYS = ("arch", "small_images", "width", "head_hidden", "head_out", "head_layers", "norm",
              "vit_depth")


def cacr_model(model: Mapping[str, Any]) -> CACRModel:
    """The encoder + head of the ``model`` config section (a dict)."""
    kw = {k: model[k] for k in MODEL_KEYS if k in model}
    arch = kw.pop("arch", "narrow_resnet")
    return CACRModel(arch, **kw)


class SymmetricMethod(Method):
    """One :class:`CACRModel` for all views + a loss on the ``(V, n, D)`` embeddings."""

    exported_network = "encoder f, shared by every view (the projection head g is not exported)"

    def __init__(self, model: CACRModel):
        super().__init__()
        self.model = model
        self._last_z: Tensor | None = None

    def loss(self, z: Tensor) -> LossOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def embed(self, views: Views) -> Tensor:
        """``z`` of shape ``(sum V_g, n, D)``, float32, L2-normalised; row ``v`` is view ``v``."""
        groups = view_groups(views)
        n = groups[0].shape[1]
        # flatten(0, 1) is view-major: row v*n + i of a group's batch is its view v of image i
        zs = [self.model(g.flatten(0, 1)).float().view(g.shape[0], n, -1) for g in groups]
        return zs[0] if len(zs) == 1 else torch.cat(zs)

    def forward(self, views: Views) -> LossOutput:
        z = self.embed(views)
        self._last_z = z.detach()
        return self.loss(z)

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone

    def backbone_spec(self) -> dict[str, Any]:
        return dict(self.model.backbone_spec)

    def last_embeddings(self) -> Tensor | None:
        return self._last_z

    def model_state(self) -> dict[str, Tensor]:
        """The CACRModel's own state (``backbone.*`` + ``head.*``), as checkpoints always held."""
        return self.model.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any], *args: Any, **kwargs: Any):
        """Also accepts a bare CACRModel state (``backbone.*`` / ``head.*``): the layout of
        checkpoints written before methods existed."""
        if state_dict and all(k.startswith(("backbone.", "head.")) for k in state_dict):
            state_dict = {f"model.{k}": v for k, v in state_dict.items()}
        return super().load_state_dict(state_dict, *args, **kwargs)


@register("cacr")
class CACR(SymmetricMethod):
    """Contrastive attraction + contrastive repulsion (:func:`cacr.loss.cacr_loss`)."""

    LOSS_KEYS = ("alpha", "beta", "tau_pos", "tau_neg", "detach_weights", "same_view_negatives")

    def __init__(self, model: CACRModel, **loss_kwargs: Any):
        super().__init__(model)
        unknown = set(loss_kwargs) - set(self.LOSS_KEYS)
        if unknown:
            raise TypeError(f"cacr: unknown loss arguments {sorted(unknown)}")
        self.loss_kwargs = loss_kwargs

    @classmethod
    def from_config(cls, model: dict[str, Any], loss: dict[str, Any], **extra: Any) -> "CACR":
        return cls(cacr_model(model), **{k: loss[k] for k in cls.LOSS_KEYS if k in loss})

    def loss(self, z: Tensor) -> LossOutput:
        return cacr_loss(z, **self.loss_kwargs)


@register("infonce")
class InfoNCE(SymmetricMethod):
    """Multi-view InfoNCE with temperature τ (:func:`cacr.loss.infonce_loss`)."""

    def __init__(self, model: CACRModel, *, temperature: float = 0.2):
        super().__init__(model)
        self.temperature = float(temperature)

    @classmethod
    def from_config(cls, model: dict[str, Any], loss: dict[str, Any], **extra: Any) -> "InfoNCE":
        return cls(cacr_model(model), **({"temperature": loss["temperature"]} if "temperature" in loss else {}))

    def loss(self, z: Tensor) -> LossOutput:
        return infonce_loss(z, temperature=self.temperature)
