"""CACR loss (Contrastive Attraction + Contrastive Repulsion), the multi-view InfoNCE baseline and
the alignment / uniformity diagnostics.  Specification: docs/METHOD.md (our notation).

Input convention (all losses): ``z`` of shape ``(V, n, D)``, ``z[v, i]`` = L2-normalised embedding of
view ``v`` of image ``i``, LOCAL to this process.  When torch.distributed is initialised with more
than one rank, the embeddings of all ranks are gathered WITH gradient (``cacr.distributed``) into
``Z`` of shape ``(V, N, D)``, ``N = W · n``, and rank ``r``'s image ``i`` has global index ``r·n + i``.
Each rank computes only its own query rows against all ``N`` columns.

Mean convention (the distributed contract)
------------------------------------------
Every per-rank loss is a MEAN over this rank's own query rows.  With the same ``n`` on every rank:
  * the mean over ranks of the per-rank loss values equals the one-process loss on all ``N`` images;
  * with DDP gradient AVERAGING and the gather's SUM backward, the parameter gradient equals the
    one-process gradient on all ``N`` images (derivation in ``cacr.distributed``).
tests/cacr/test_distributed.py checks both with two real gloo processes.

Squared distances are computed as ``d = 2 − 2·a·b`` (valid for unit vectors, docs/METHOD.md); the losses
do not re-normalise ``z``.  Half / bfloat16 inputs are up-cast to float32 and autocast is disabled
inside the losses: the softmaxes over thousands of negatives need float32.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from cacr.distributed import gather_no_grad, gather_with_grad, world_info

__all__ = ["LossOutput", "cacr_loss", "cacr_moco_loss", "infonce_loss", "alignment", "uniformity"]


@dataclass
class LossOutput:
    """Result of a loss.  ``loss == attraction + repulsion`` (scalars with autograd).

    ``eff_positives`` / ``eff_negatives`` are detached diagnostics: the effective number of
    positives / negatives, ``exp(entropy)`` of the weights over that group, averaged over this
    rank's queries (``V − 1`` resp. ``N − 1`` for uniform weights).
    """

    loss: Tensor
    attraction: Tensor
    repulsion: Tensor
    eff_positives: Tensor
    eff_negatives: Tensor

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """All fields as Python floats (one device sync); call only when logging."""
        names = [f.name for f in fields(self)]
        values = torch.stack([getattr(self, k).detach().float() for k in names]).tolist()
        return {prefix + k: v for k, v in zip(names, values)}


# ----------------------------------------------------------------------------------------------
# Input checks and cached index masks (built once per shape / offset / device, never per step).
# ----------------------------------------------------------------------------------------------

def _check_views(z: Tensor, what: str) -> None:
    if not isinstance(z, Tensor) or z.dim() != 3:
        shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise ValueError(f"{what}: z must have shape (V, n, D) = (views, images, dim); got {shape}")
    if not z.is_floating_point():
        raise ValueError(f"{what}: z must be a floating-point tensor; got {z.dtype}")
    V, n, D = z.shape
    if V < 2:
        raise ValueError(f"{what}: needs V >= 2 views per image (positives are the other views); got V={V}")
    if n < 1 or D < 1:
        raise ValueError(f"{what}: empty input of shape {tuple(z.shape)}")


def _check_global(N: int, what: str) -> None:
    if N < 2:
        raise ValueError(
            f"{what}: needs at least 2 images in the global batch (negatives are the other images); got N={N}"
        )


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


@functools.lru_cache(maxsize=64)
def _offdiag_mask(V: int, device: torch.device) -> Tensor:
    """(V, V) bool, True on the diagonal (u == v: not a positive of itself)."""
    return torch.eye(V, dtype=torch.bool, device=device)


@functools.lru_cache(maxsize=64)
def _own_column_mask(n: int, N: int, offset: int, device: torch.device, copies: int = 1) -> Tensor:
    """(n, 1, copies·N) bool, True at column ``c·N + offset + i`` of local row ``i`` (the image
    itself, in each of ``copies`` concatenated column blocks)."""
    mask = torch.zeros(n, N, dtype=torch.bool, device=device)
    idx = torch.arange(n, device=device)
    mask[idx, offset + idx] = True
    return mask.repeat(1, copies).unsqueeze(1)


@functools.lru_cache(maxsize=64)
def _infonce_masks(V: int, n: int, N: int, offset: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(V, n, V, N) bool masks: ``self_`` at (v, i, v, offset+i); ``pos`` at (v, i, u, offset+i), u != v."""
    own = torch.zeros(n, N, dtype=torch.bool, device=device)
    idx = torch.arange(n, device=device)
    own[idx, offset + idx] = True
    eye = torch.eye(V, dtype=torch.bool, device=device)
    same = eye[:, None, :, None] & own[None, :, None, :]
    pos = (~eye)[:, None, :, None] & own[None, :, None, :]
    return same, pos


def _weighted_group_mean(logits: Tensor, cost: Tensor, detach: bool) -> tuple[Tensor, Tensor]:
    """Per row: ``sum_j w_j · cost_j`` with ``w = softmax(logits)``, and the detached ``exp(entropy(w))``.

    Masked entries carry ``logits = −inf``: weight exactly 0, no gradient, and ``xlogy(0, 0) = 0``
    keeps the entropy finite.  ``detach`` stops the gradient through ``w`` (same forward value).
    """
    if detach:
        with torch.no_grad():                       # no graph node kept alive for a constant
            w = torch.softmax(logits, dim=-1)
    else:
        w = torch.softmax(logits, dim=-1)
    row = (w * cost).sum(-1)
    with torch.no_grad():
        ent = -torch.special.xlogy(w, w).sum(-1)
    return row, ent.exp()


# ----------------------------------------------------------------------------------------------
# CACR
# ----------------------------------------------------------------------------------------------

def _cacr_from_gathered(q: Tensor, keys: Tensor, offset: int, *, alpha: float = 1.0, beta: float = 1.0,
                        tau_pos: float = 1.0, tau_neg: float = 0.9, detach_weights: bool = False,
                        same_view_negatives: bool = False) -> LossOutput:
    """CACR on explicit local queries ``q`` (V, n, D) and pre-gathered columns ``keys`` (V, N, D).

    ``keys[:, offset + i]`` must be the same embedding as ``q[:, i]`` (masked as "own image").  This is
    the code path ``cacr_loss`` runs after the gather; it is separate so that benchmarks can time the
    n × N block without processes.  See ``cacr_loss`` for the math.
    """
    V, n, D = q.shape
    N = keys.shape[1]
    if keys.shape[0] != V or keys.shape[2] != D or not (0 <= offset and offset + n <= N):
        raise ValueError(f"cacr: keys {tuple(keys.shape)} / offset {offset} do not match queries {tuple(q.shape)}")
    _check_global(N, "cacr_loss")
    dtype = _compute_dtype(q.dtype)
    with torch.autocast(device_type=q.device.type, enabled=False):
        q = q.to(dtype)
        keys = keys.to(dtype)

        # ---- contrastive attraction: positives u != v of the same image, all local ------------
        # d⁺[i, v, u] = 2 − 2 z[v,i]·z[u,i];  w⁺ = softmax_{u≠v}(+τ⁺ d⁺);  L_CA(v,i) = Σ_u w⁺ d⁺
        d_pos = 2.0 - 2.0 * torch.einsum("vnd,und->nvu", q, q)             # (n, V, V)
        logits_pos = (tau_pos * d_pos).masked_fill(_offdiag_mask(V, q.device), float("-inf"))
        ca_rows, eff_pos = _weighted_group_mean(logits_pos, d_pos, detach_weights)  # (n, V)
        attraction = alpha * ca_rows.mean()

        # ---- contrastive repulsion: pairs v < u, negatives z[u, j], j != i, global ------------
        # c⁻ = −d = 2 z[v,i]·z[u,j] − 2;  w⁻ = softmax_{j≠i}(τ⁻ c⁻);  L_CR(v,u,i) = Σ_j w⁻ c⁻.
        # One GEMM per query view v against all views u > v at once (keys[v+1:] is a contiguous
        # view: no copy), so memory is O(P · n · N) for the P = V(V−1)/2 pairs, never O(V² N²).
        # (n, 1, N), or (n, 1, 2N) with the same-view block appended
        own = _own_column_mask(n, N, offset, q.device, 2 if same_view_negatives else 1)
        cr_sum = q.new_zeros(())
        eff_neg_sum = q.new_zeros(())
        for v in range(V - 1):
            k = V - 1 - v
            # In place on the GEMM output (its backward needs only the inputs): no extra buffer.
            neg = (q[v] @ keys[v + 1:].reshape(k * N, D).T).mul_(2.0).sub_(2.0)  # (n, k·N) = −d
            neg = neg.view(n, k, N)
            if same_view_negatives:
                same = (q[v] @ keys[v].T).mul_(2.0).sub_(2.0)              # (n, N): z[v, j]
                neg = torch.cat([neg, same.unsqueeze(1).expand(n, k, N)], dim=-1)
            logits_neg = (tau_neg * neg).masked_fill_(own, float("-inf"))
            cr_rows, eff = _weighted_group_mean(logits_neg, neg, detach_weights)  # (n, k)
            cr_sum = cr_sum + cr_rows.sum()
            eff_neg_sum = eff_neg_sum + eff.sum()
        num_pairs = V * (V - 1) // 2
        repulsion = beta * cr_sum / (num_pairs * n)

    return LossOutput(
        loss=attraction + repulsion,
        attraction=attraction,
        repulsion=repulsion,
        eff_positives=eff_pos.mean(),
        eff_negatives=(eff_neg_sum / (num_pairs * n)).detach(),
    )


def cacr_loss(z: Tensor, *, alpha: float = 1.0, beta: float = 1.0, tau_pos: float = 1.0,
              tau_neg: float = 0.9, detach_weights: bool = False, same_view_negatives: bool = False,
              group=None) -> LossOutput:
    r"""CACR loss of docs/METHOD.md on local embeddings ``z`` (V, n, D), unit norm, ``V >= 2``.

    Notation: ``d(a, b) = ‖a − b‖² = 2 − 2 a·b``; ``Z`` (V, N, D) = all ranks' ``z`` gathered with
    gradient (``Z = z`` in one process); rank ``r``'s image ``i`` is global image ``g = r·n + i``.

    Contrastive attraction, for every local query (v, i), over its ``V − 1`` positives::

        c⁺(u)     = d(z[v,i], z[u,i])                      u ≠ v
        w⁺(u)     = softmax_{u≠v}( +τ⁺ · c⁺(u) )            far positives weigh more
        L_CA(v,i) = Σ_u w⁺(u) c⁺(u)
        attraction = α · mean over the V·n local (v, i) of L_CA(v,i)

    Contrastive repulsion, for every unordered view pair v < u (P = V(V−1)/2 pairs; the query is
    always the lower view ``v``) and local image i, over the ``N − 1`` other images of the GLOBAL batch::

        c⁻(j)       = −d(z[v,i], Z[u,j])                   j ≠ g (own column masked)
        w⁻(j)       = softmax_{j≠g}( −τ⁻ · d(z[v,i], Z[u,j]) )   close negatives weigh more
        L_CR(v,u,i) = Σ_j w⁻(j) c⁻(j)
        repulsion   = β · mean over the P·n local (v<u, i) of L_CR(v,u,i)

    ``loss = attraction + repulsion``.  With ``same_view_negatives=True`` the negative set of the
    query (v, u, i) is ``{Z[u,j]} ∪ {Z[v,j]}`` over ``j ≠ g`` (2(N − 1) negatives, one softmax over
    both), i.e. the other images' embeddings of the query's own view are added; off by default.

    ``detach_weights=True`` stops gradients through w⁺ and w⁻ (same forward value): the gradient is
    then that of ``Σ w c`` with ``w`` held constant.  ``τ⁺ = τ⁻ = 0`` gives uniform weights.

    Distributed: each rank computes its own ``V·n`` CA rows and ``P·n`` CR rows against all N
    columns and averages over its own rows (module docstring: mean over ranks = one-process loss,
    DDP-averaged gradients = one-process gradients).  All ranks must hold the same ``n``.
    Cost per rank: O(P·n·N·D) work, O(P·n·N) memory (3 such buffers are kept for backward).

    Raises ``ValueError`` for a non-(V, n, D) input, ``V < 2`` or a global batch ``N < 2``.
    """
    _check_views(z, "cacr_loss")
    rank, _ = world_info(group)
    keys = gather_with_grad(z, dim=1, group=group)        # (V, N, D), global index r·n + i
    return _cacr_from_gathered(z, keys, rank * z.shape[1], alpha=alpha, beta=beta, tau_pos=tau_pos,
                               tau_neg=tau_neg, detach_weights=detach_weights,
                               same_view_negatives=same_view_negatives)


# ----------------------------------------------------------------------------------------------
# Multi-view InfoNCE / NT-Xent baseline
# ----------------------------------------------------------------------------------------------

def _infonce_from_gathered(q: Tensor, keys: Tensor, offset: int, *, temperature: float = 0.2) -> LossOutput:
    """InfoNCE on local queries ``q`` (V, n, D) against pre-gathered ``keys`` (V, N, D); see ``infonce_loss``."""
    V, n, D = q.shape
    N = keys.shape[1]
    if keys.shape[0] != V or keys.shape[2] != D or not (0 <= offset and offset + n <= N):
        raise ValueError(f"infonce: keys {tuple(keys.shape)} / offset {offset} do not match queries {tuple(q.shape)}")
    _check_global(N, "infonce_loss")
    if not temperature > 0:
        raise ValueError(f"infonce_loss: temperature must be > 0; got {temperature}")
    dtype = _compute_dtype(q.dtype)
    with torch.autocast(device_type=q.device.type, enabled=False):
        q = q.to(dtype)
        keys = keys.to(dtype)
        inv_t = 1.0 / temperature
        self_mask, pos_mask = _infonce_masks(V, n, N, offset, q.device)
        # logits[v, i, u, j] = z[v,i]·Z[u,j] / T, one GEMM of (V·n) × (V·N).
        # In place: neither the GEMM nor the scalar mul needs its output for backward.
        logits = (q.reshape(V * n, D) @ keys.reshape(V * N, D).T).mul_(inv_t).view(V, n, V, N)
        logits.masked_fill_(self_mask, float("-inf"))
        lse = torch.logsumexp(logits.flatten(2), dim=-1)                                # (V, n)
        # Positive logits from the local queries (the same numbers as the masked-in entries).
        pos = torch.einsum("vnd,und->vnu", q, q) * inv_t                                # (V, n, V)
        offdiag = ~_offdiag_mask(V, q.device)[:, None, :]                            # (V, 1, V)
        pos_mean = (pos * offdiag).sum(-1) / (V - 1)                                    # (V, n)
        attraction = -pos_mean.mean()
        repulsion = lse.mean()

        with torch.no_grad():
            # Effective numbers from the softmax restricted (renormalised) to each group.
            w_pos = torch.softmax(pos.masked_fill(~offdiag, float("-inf")), dim=-1)
            eff_pos = (-torch.special.xlogy(w_pos, w_pos).sum(-1)).exp().mean()
            # One anchor view at a time: temporaries of V·n·N, not V²·n·N.
            eff_neg = q.new_zeros(())
            for v in range(V):
                w_neg = torch.softmax(logits[v].masked_fill(pos_mask[v], float("-inf")).flatten(1), dim=-1)
                eff_neg += (-torch.special.xlogy(w_neg, w_neg).sum(-1)).exp().sum()
            eff_neg /= V * n

    return LossOutput(loss=attraction + repulsion, attraction=attraction, repulsion=repulsion,
                      eff_positives=eff_pos, eff_negatives=eff_neg)


def infonce_loss(z: Tensor, *, temperature: float = 0.2, group=None) -> LossOutput:
    r"""Multi-view NT-Xent (SimCLR loss generalised to V views, SupCon "L_out" form with the image
    as label) on local ``z`` (V, n, D), unit norm, gathered with gradient exactly like ``cacr_loss``.

    For every local anchor (v, i) (global image g = r·n + i), with ``s(a, b) = a·b / T``::

        A(v,i)   = all V·N gathered embeddings except the anchor itself, Z[v, g]
        ℓ(v,i)   = mean_{u≠v} [ −s(z[v,i], Z[u,g]) + log Σ_{a ∈ A(v,i)} exp s(z[v,i], a) ]
        loss     = mean over the V·n local anchors of ℓ(v,i)

    i.e. each of the ``V − 1`` other views of the same image is a positive, and the denominator holds
    the positives plus all views of all other images (``V·(N − 1)`` negatives).  For V = 2 this is
    exactly SimCLR's NT-Xent (2N − 1 terms in the denominator).

    ``attraction`` = −mean of the positive logits (mean over anchors and positives), ``repulsion`` =
    mean of the log-sum-exp; ``loss = attraction + repulsion``.  ``eff_positives`` /
    ``eff_negatives`` = exp(entropy) of the anchor's softmax restricted to (and renormalised over) its
    positives / its negatives, averaged over anchors.  Same mean convention and distributed contract
    as ``cacr_loss``; memory O(V²·n·N).
    """
    _check_views(z, "infonce_loss")
    rank, _ = world_info(group)
    keys = gather_with_grad(z, dim=1, group=group)
    return _infonce_from_gathered(z, keys, rank * z.shape[1], temperature=temperature)


# ----------------------------------------------------------------------------------------------
# Momentum-encoder CACR (the authors' ImageNet setup on MoCo v3)
# ----------------------------------------------------------------------------------------------

def _check_moco(q: Tensor, k: Tensor, temperature: float) -> None:
    if not isinstance(q, Tensor) or not isinstance(k, Tensor) or q.dim() != 3 or k.dim() != 3:
        raise ValueError("cacr_moco_loss: q must be (V, n, D) queries and k (A, n, D) keys; got "
                         f"{tuple(getattr(q, 'shape', ()))} and {tuple(getattr(k, 'shape', ()))}")
    if not (q.is_floating_point() and k.is_floating_point()):
        raise ValueError(f"cacr_moco_loss: q and k must be floating point; got {q.dtype}, {k.dtype}")
    V, n, D = q.shape
    A = k.shape[0]
    if V < 2 or n < 1 or D < 1:
        raise ValueError(f"cacr_moco_loss: needs V >= 2 query views and a non-empty batch; got q {tuple(q.shape)}")
    if not 1 <= A <= V or k.shape[1:] != (n, D):
        raise ValueError(f"cacr_moco_loss: keys {tuple(k.shape)} must be (A, n, D) with 1 <= A <= V "
                         f"for queries {tuple(q.shape)} (targets are views 0..A-1)")
    if not temperature > 0:
        raise ValueError(f"cacr_moco_loss: temperature must be > 0; got {temperature}")


def _moco_from_gathered(q: Tensor, keys: Tensor, offset: int, *, temperature: float) -> LossOutput:
    """``cacr_moco_loss`` on local queries ``q`` (V, n, D) and gathered constant ``keys`` (A, N, D),
    this rank's rows at columns ``offset .. offset + n − 1``.  Separate so that benchmarks can time
    the n × N blocks without processes; see ``cacr_moco_loss`` for the math."""
    V, n, D = q.shape
    A, N, _ = keys.shape
    if not 0 <= offset <= N - n:
        raise ValueError(f"cacr_moco: offset {offset} does not fit {n} rows in {N} key columns")
    _check_global(N, "cacr_moco_loss")
    dtype = _compute_dtype(q.dtype)
    inv_t = 1.0 / temperature
    idx = torch.arange(n, device=q.device)
    own = _own_column_mask(n, N, offset, q.device)[:, 0]                # (n, N): the positive column
    with torch.autocast(device_type=q.device.type, enabled=False):
        q = q.to(dtype)
        keys = keys.to(dtype)
        att_sum = q.new_zeros(())
        rep_sum = q.new_zeros(())
        eff_pos = q.new_zeros(())
        eff_neg = q.new_zeros(())
        for a in range(A):
            others = [v for v in range(V) if v != a]
            qa = q[others]                                              # (V−1, n, D)
            # logits[v, i, j] = q_v(i)·k_a(j) / T over the GLOBAL keys: one GEMM per target.
            logits = (qa @ keys[a].T).mul_(inv_t)                       # (V−1, n, N)
            pos = logits[:, idx, offset + idx]                          # (V−1, n): q_v(i)·k_a(i)/T
            lse = torch.logsumexp(logits, dim=-1)                       # (V−1, n)
            with torch.no_grad():
                # p_{a,v}(i) = softmax_{v≠a}( ‖q_v(i) − k_a(i)‖² / T ),  ‖·‖² = 2 − 2 q·k
                p = torch.softmax((2.0 - 2.0 * temperature * pos) * inv_t, dim=0)
                eff_pos += (-torch.special.xlogy(p, p).sum(0)).exp().sum()
                w_neg = torch.softmax(logits.masked_fill(own, float("-inf")), dim=-1)
                eff_neg += (-torch.special.xlogy(w_neg, w_neg).sum(-1)).exp().sum()
            # Σ_v mean_i p · CE, CE = −pos + lse, split into its two parts.
            att_sum = att_sum - (p * pos).sum() / n
            rep_sum = rep_sum + (p * lse).sum() / n
        scale = 2.0 * temperature / A                                   # factor 2T, mean over targets
        attraction = scale * att_sum
        repulsion = scale * rep_sum
    return LossOutput(loss=attraction + repulsion, attraction=attraction, repulsion=repulsion,
                      eff_positives=eff_pos / (A * n),
                      eff_negatives=eff_neg / (A * (V - 1) * n))


def cacr_moco_loss(q: Tensor, k: Tensor, *, temperature: float) -> LossOutput:
    r"""Momentum-encoder CACR (docs/METHOD.md, "Momentum-encoder CACR").

    ``q`` (V, n, D): L2-normalised predictor outputs of all V views, LOCAL rows.  ``k`` (A, n, D):
    L2-normalised momentum keys of the target views ``0 .. A−1`` (the first A query views), LOCAL
    rows.  Keys are constants: they are detached and, with several ranks, all-gathered WITHOUT
    gradient into ``K`` (A, N, D), rank ``r``'s image ``i`` at column ``g = r·n + i``.

    For target ``a`` the query views are ``v ≠ a``; with ``T`` the one temperature::

        p_{a,v}(i)  = softmax_{v≠a}( ‖q_v(i) − k_a(i)‖² / T )         detached; far positives weigh more
        CE_{a,v}(i) = − q_v(i)·K_a(g)/T + log Σ_j exp( q_v(i)·K_a(j)/T )   (InfoNCE, label g)
        L_a         = 2T · Σ_{v≠a} mean_i p_{a,v}(i) · CE_{a,v}(i)
        loss        = mean over the A targets of L_a

    ``attraction`` is the ``−q·k/T`` part, ``repulsion`` the log-partition part (same weights, same
    factor 2T); ``loss = attraction + repulsion``.  With V = A = 2, p ≡ 1 and the loss is half of
    MoCo v3's ``ctr(q₁, k₂) + ctr(q₂, k₁)`` (``ctr`` = 2T · cross-entropy).

    Diagnostics (detached): ``eff_positives`` = exp(entropy) of p over the V − 1 query views, mean
    over (a, i) (V − 1 when uniform); ``eff_negatives`` = exp(entropy) of the InfoNCE softmax
    restricted to (renormalised over) the N − 1 negative keys, mean over (a, v, i).

    Distributed: mean over this rank's rows; the mean over ranks of the values is the one-process
    loss and DDP-averaged gradients are the one-process gradients (no gradient crosses ranks: the
    keys are constants).  All ranks must hold the same ``n``.  Cost per rank: A GEMMs of
    ((V−1)·n) × N × D; memory O((V−1)·n·N) per target.  The interface is fixed by the spec (issue
    13); :func:`_cacr_moco_loss_in_group` is the same loss over a process group other than WORLD.
    """
    return _cacr_moco_loss_in_group(q, k, temperature=temperature, group=None)


def _cacr_moco_loss_in_group(q: Tensor, k: Tensor, *, temperature: float, group) -> LossOutput:
    """:func:`cacr_moco_loss` with the keys gathered over ``group`` (None: the default group)."""
    _check_moco(q, k, temperature)
    rank, _ = world_info(group)
    keys = gather_no_grad(k, dim=1, group=group)           # (A, N, D), detached
    return _moco_from_gathered(q, keys, rank * q.shape[1], temperature=temperature)


# ----------------------------------------------------------------------------------------------
# Wang & Isola (2020) diagnostics, local batch
# ----------------------------------------------------------------------------------------------

def alignment(z: Tensor, alpha: float = 2.0) -> Tensor:
    r"""Alignment (Wang & Isola 2020) of local ``z`` (V, n, D), unit norm; lower is better::

        align = mean over view pairs v < u and images i of ‖z[v,i] − z[u,i]‖₂^α
    """
    _check_views(z, "alignment")
    V = z.shape[0]
    iu = torch.triu_indices(V, V, offset=1, device=z.device)
    sq = (z[iu[0]] - z[iu[1]]).pow(2).sum(-1)                              # (P, n)
    return sq.pow(alpha / 2).mean()


def uniformity(z: Tensor, t: float = 2.0) -> Tensor:
    r"""Uniformity (Wang & Isola 2020) of local ``z`` (V, n, D), unit norm; lower is better::

        unif = mean over views v of  log mean_{i<j} exp(−t ‖z[v,i] − z[v,j]‖₂²)

    (per view, then averaged, as in the paper's two-view code).  Needs n >= 2.
    """
    if z.dim() != 3 or z.shape[1] < 2:
        raise ValueError(f"uniformity: z must have shape (V, n >= 2, D); got {tuple(z.shape)}")
    n = z.shape[1]
    # ‖a − b‖² = ‖a‖² + ‖b‖² − 2 a·b via one batched GEMM (no (n², D) difference tensor, and no
    # sqrt whose gradient is undefined at 0 as with cdist); clamp the rounding below 0.
    sqn = z.pow(2).sum(-1)
    sq = (sqn[:, :, None] + sqn[:, None, :] - 2.0 * z @ z.transpose(1, 2)).clamp_min(0)  # (V, n, n)
    iu = torch.triu_indices(n, n, offset=1, device=z.device)
    vals = -t * sq[:, iu[0], iu[1]]                                        # (V, n(n−1)/2)
    return (torch.logsumexp(vals, dim=-1) - math.log(vals.shape[-1])).mean()
