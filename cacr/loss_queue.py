"""Queue CACR loss (the authors' MoCo-v2-based setup, used for their imbalanced experiments).

Inputs, all L2-normalised and LOCAL to this worker:

* ``q`` (V, n, D): queries, the online encoder's embeddings of the V = K + 1 views (with gradient);
* ``k`` (V, n, D): keys, the momentum encoder's embeddings of the same views (no gradient);
* ``queue`` (M, D): the last M keys of earlier steps (no gradient), identical on every worker.

With ``d(a, b) = ‖a − b‖² = 2 − 2 a·b``::

    attraction, query view x, image i, positives the keys of the other views j ≠ x:
        π⁺(j)   = softmax_{j≠x}( τ⁺ · d(q_x(i), k_j(i)) )              detached: a weight, not a path
        L_CA    = α · mean_x mean_i Σ_j π⁺(j) · d(q_x(i), k_j(i))

    repulsion, negatives = the M queue entries u  and  the other local images m ≠ i of the SAME view x:
        d_u     = d(q_x(i), u)              (queue detached)
        d_m     = d(q_x(i), q_x(m))         (with gradient through both queries)
        π⁻      = softmax over the M + n − 1 negatives of ( −τ⁻ · d )    close negatives weigh more
        L_CR    = β · mean_x mean_i Σ π⁻ · (−d)

    L = L_CA + L_CR

π⁻ carries gradient unless ``detach_weights`` (the same switch as the symmetric loss); π⁺ is always
detached, as specified. Each view uses its OWN query·queue product (the authors' code reuses the
first view's for every view; we implement the intended math).

Distributed: nothing is gathered here. Every worker's loss is the mean over its own queries, the
"other images of the same view" are the local batch only, and the queue (filled with the gathered
keys of one view per step by :class:`cacr.methods.queue.QueueCACR`) is the same on every worker;
DDP's gradient averaging then optimises the mean over workers of the per-worker losses.

Cost per worker: O(V · n · (M + n) · D) work, O(V · n · (M + n)) memory, one view at a time.
"""
from __future__ import annotations

import torch
from torch import Tensor

from cacr.loss import LossOutput

__all__ = ["cacr_queue_loss"]


def _weighted(logits: Tensor, cost: Tensor, detach: bool) -> tuple[Tensor, Tensor]:
    """Row sums ``Σ softmax(logits) · cost`` and the detached effective number exp(entropy)."""
    if detach:
        with torch.no_grad():
            w = torch.softmax(logits, dim=-1)
    else:
        w = torch.softmax(logits, dim=-1)
    with torch.no_grad():
        eff = (-torch.special.xlogy(w, w).sum(-1)).exp()
    return (w * cost).sum(-1), eff


def cacr_queue_loss(q: Tensor, k: Tensor, queue: Tensor, *, alpha: float = 1.0, beta: float = 1.0,
                    tau_pos: float = 1.0, tau_neg: float = 2.0, detach_weights: bool = False) -> LossOutput:
    """Queue CACR on local queries ``q`` / keys ``k`` (V, n, D) and the queue (M, D); see the module
    docstring for the math. ``k`` and ``queue`` are treated as constants (detached here)."""
    if q.dim() != 3 or k.shape != q.shape:
        raise ValueError(f"cacr_queue_loss: q and k must both be (V, n, D); got {tuple(q.shape)}, {tuple(k.shape)}")
    V, n, D = q.shape
    if V < 2:
        raise ValueError(f"cacr_queue_loss: needs V >= 2 views (positives are the other views); got V={V}")
    if queue.dim() != 2 or queue.shape[1] != D:
        raise ValueError(f"cacr_queue_loss: queue must be (M, {D}); got {tuple(queue.shape)}")
    if queue.shape[0] + n - 1 < 1:
        raise ValueError("cacr_queue_loss: no negatives (empty queue and a batch of one)")
    dtype = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
    with torch.autocast(device_type=q.device.type, enabled=False):
        q = q.to(dtype)
        k = k.detach().to(dtype)
        queue = queue.detach().to(dtype)

        # attraction: d⁺[i, x, j] = 2 − 2 q_x(i)·k_j(i), j ≠ x
        d_pos = 2.0 - 2.0 * torch.einsum("xnd,jnd->nxj", q, k)                  # (n, V, V)
        eye = torch.eye(V, dtype=torch.bool, device=q.device)
        ca_rows, eff_pos = _weighted((tau_pos * d_pos).masked_fill(eye, float("-inf")),
                                     d_pos, detach=True)                          # (n, V)
        attraction = alpha * ca_rows.mean()

        # repulsion, one query view at a time: negatives [queue | same-view local images]
        own = torch.eye(n, dtype=torch.bool, device=q.device)
        cr_sum = q.new_zeros(())
        eff_neg_sum = q.new_zeros(())
        for x in range(V):
            neg = torch.cat([q[x] @ queue.T, q[x] @ q[x].T], dim=1).mul(2.0).sub(2.0)  # (n, M + n) = −d
            logits = (tau_neg * neg).masked_fill(
                torch.cat([own.new_zeros(n, queue.shape[0]), own], dim=1), float("-inf"))
            rows, eff = _weighted(logits, neg, detach_weights)   # masked: weight exactly 0
            cr_sum = cr_sum + rows.sum()
            eff_neg_sum = eff_neg_sum + eff.sum()
        repulsion = beta * cr_sum / (V * n)

    return LossOutput(loss=attraction + repulsion, attraction=attraction, repulsion=repulsion,
                      eff_positives=eff_pos.mean(), eff_negatives=(eff_neg_sum / (V * n)).detach())
