"""Method ``cacr_queue`` (``loss.name=cacr_queue``): CACR with a momentum key encoder and a queue
of keys, the setup of the authors' imbalanced-data experiments (MoCo-v2 based).

Networks: the online encoder ``online`` (backbone + head, with gradient; its backbone is what is
exported and evaluated) and its momentum copy ``target`` (no gradient), both
:class:`cacr.model.CACRModel`. Every one of the V = K + 1 views goes through both.

One training step, in the trainer's order::

    out = method(views)          # queries q = online(views), keys k = target(views) (no grad),
                                 # loss = cacr_queue_loss(q, k, queue); keys of view 0 gathered
                                 # across workers (no grad) and stashed
    out.loss.backward(); optimizer.step()
    method.after_step(progress)  # θ' ← m θ' + (1 − m) θ  (m constant, loss.queue_momentum = 0.999),
                                 # then the stashed N = W·n keys enter the queue at `queue_ptr`

Why the queue is written in ``after_step``, not in ``forward``: the loss's backward still needs the
queue it was computed with (``q @ queue.T``), so writing into it before ``backward`` would corrupt
the gradient (autograd refuses the in-place change). The EMA happens in ``after_step`` as well; it
is the same sequence as MoCo's update at the start of the next forward. ``after_step`` is therefore
REQUIRED after every optimiser step, on every worker.

The queue (``queue`` (M, D), ``queue_ptr``) are registered buffers: they are part of
``state_dict()`` and so of every checkpoint, and a resumed run continues with the same negatives.
It starts as M random unit vectors (as MoCo does). It stays identical on all workers because every
worker writes the same gathered keys (rank order, global index r·n + i) at the same pointer.

Key-encoder BatchNorm: **per-worker shuffle-BN**. The key batch (all V·n views of the worker) is
permuted with a fresh random permutation each step, split into ``bn_splits`` sub-batches that go
through the key encoder separately (their own BatchNorm statistics), and un-permuted. A key is thus
normalised with the statistics of a random subset of the batch, never with the statistics the
query of the same image was normalised with (the query encoder sees the whole local batch), which
is what stops the two from "communicating" through batch statistics (MoCo's shuffle-BN, done
within a worker: no image all-gather across workers, which would cost V·n·3·H·W floats per step;
it is MoCo's single-device "split BN" variant). SyncBN would give every key the statistics of the
GLOBAL batch, which contains its own query's image, so it does not remove the leak on its own; it is
not used for the key encoder. With ``norm`` = group / none there are no batch statistics and the
key batch goes through in one piece.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cacr.distributed import gather_with_grad
from cacr.loss import LossOutput
from cacr.loss_queue import cacr_queue_loss
from cacr.methods.base import Method, Views, register, view_groups
from cacr.model import CACRModel

MODEL_KEYS = ("small_images", "width", "head_hidden", "head_out", "head_layers", "norm", "vit_depth")


@register("cacr_queue")
class QueueCACR(Method):
    """Online + momentum encoder, key queue, queue CACR loss (see the module docstring)."""

    exported_network = ("online backbone (the momentum key encoder, the projection head and the "
                        "queue are not exported)")

    def __init__(self, model: dict[str, Any] | None = None, *, queue_size: int = 65536,
                 momentum: float = 0.999, alpha: float = 1.0, beta: float = 1.0, tau_pos: float = 1.0,
                 tau_neg: float = 2.0, detach_weights: bool = False, bn_splits: int = 4):
        super().__init__()
        model = dict(model or {})
        if queue_size < 1:
            raise ValueError(f"cacr_queue: queue_size must be >= 1, got {queue_size}")
        if not 0 <= momentum < 1:
            raise ValueError(f"cacr_queue: momentum must be in [0, 1), got {momentum}")
        if bn_splits < 1:
            raise ValueError(f"cacr_queue: bn_splits must be >= 1, got {bn_splits}")
        self.online = CACRModel(model.get("arch", "narrow_resnet"),
                                **{k: model[k] for k in MODEL_KEYS if k in model})
        self.target = copy.deepcopy(self.online)
        for p in self.target.parameters():
            p.requires_grad_(False)
        self.momentum = float(momentum)
        self.loss_kw = dict(alpha=alpha, beta=beta, tau_pos=tau_pos, tau_neg=tau_neg,
                            detach_weights=detach_weights)
        self.bn_splits = int(bn_splits) if self.online.norm == "batch" else 1
        g = torch.Generator().manual_seed(0)  # same start on every worker without a broadcast
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, self.online.head_out, generator=g), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._pending: torch.Tensor | None = None
        self._last: torch.Tensor | None = None

    @classmethod
    def from_config(cls, model: dict[str, Any], loss: dict[str, Any], **extra: Any) -> "QueueCACR":
        """``model`` / ``loss`` = the config sections as dicts (``loss.queue_size``,
        ``loss.queue_momentum``, α, β, τ⁺, τ⁻, ``detach_weights``)."""
        return cls(model, queue_size=int(loss.get("queue_size", 65536)),
                   momentum=float(loss.get("queue_momentum", 0.999)),
                   alpha=loss.get("alpha", 1.0), beta=loss.get("beta", 1.0),
                   tau_pos=loss.get("tau_pos", 1.0), tau_neg=loss.get("tau_neg", 2.0),
                   detach_weights=bool(loss.get("detach_weights", False)),
                   bn_splits=int(loss.get("queue_bn_splits", 4)))

    # ---- the Method interface -----------------------------------------------------------------

    @property
    def backbone(self) -> nn.Module:
        return self.online.backbone

    def backbone_spec(self) -> dict[str, Any]:
        return dict(self.online.backbone_spec)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.online.parameters() if p.requires_grad]

    def convert_sync_batchnorm(self) -> "QueueCACR":
        """SyncBatchNorm for the online (query) encoder only: the key encoder keeps its plain
        BatchNorm, normalised per shuffle-BN sub-batch (module docstring). Synchronised key
        statistics would be those of the global batch, which holds each key's own query image:
        the leak shuffle-BN is there to stop."""
        self.online = nn.SyncBatchNorm.convert_sync_batchnorm(self.online)
        return self

    def last_embeddings(self) -> torch.Tensor | None:
        return self._last

    def forward(self, views: Views) -> LossOutput:
        groups = view_groups(views)
        n = groups[0].shape[1]
        q = torch.cat([self.online(g.flatten(0, 1)).view(g.shape[0], n, -1) for g in groups])
        with torch.no_grad():
            k = torch.cat([self.keys(g.flatten(0, 1)).view(g.shape[0], n, -1) for g in groups])
            # keys of ONE view (the first global crop) of every worker's images, rank order
            self._pending = gather_with_grad(k[0].contiguous(), dim=0)
        self._last = q.detach()
        return cacr_queue_loss(q, k, self.queue, **self.loss_kw)   # bf16 is up-cast inside

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """Momentum-encoder embeddings of the images ``x`` (B, C, H, W), row order kept; with
        BatchNorm, computed in ``bn_splits`` random sub-batches (per-worker shuffle-BN)."""
        splits = min(self.bn_splits, x.shape[0] // 2) if self.target.training else 1
        if splits <= 1:
            return self.target(x)
        perm = torch.randperm(x.shape[0], device=x.device)
        out = torch.cat([self.target(chunk) for chunk in x[perm].tensor_split(splits)])
        return out[torch.argsort(perm)]

    @torch.no_grad()
    def after_step(self, progress: float) -> dict[str, float]:
        """EMA of the key encoder, then the stashed keys enter the queue (FIFO, wrapping)."""
        for pt, po in zip(self.target.parameters(), self.online.parameters()):
            pt.mul_(self.momentum).add_(po.detach(), alpha=1.0 - self.momentum)
        if self._pending is not None:
            self.enqueue(self._pending)
            self._pending = None
        return {"momentum": self.momentum, "queue_ptr": float(self.queue_ptr)}

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` (N, D) at ``queue_ptr`` (wrapping at M) and advance the pointer by N."""
        M = self.queue.shape[0]
        keys = keys[-M:].to(self.queue.dtype)   # a batch larger than the queue keeps its newest M
        ptr, N = int(self.queue_ptr), keys.shape[0]
        first = min(N, M - ptr)
        self.queue[ptr:ptr + first] = keys[:first]
        if N > first:
            self.queue[:N - first] = keys[first:]
        self.queue_ptr.fill_((ptr + N) % M)

