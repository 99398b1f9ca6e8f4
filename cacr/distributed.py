"""Cross-worker gathering of embeddings WITH gradient, and global-index helpers.

Why a gather with gradient
--------------------------
Worker ``r`` holds the embeddings ``x_r`` of its ``n`` images and computes a loss ``L_r`` over its own
query rows against the columns of ALL workers (``X = [x_0; ...; x_{W-1}]``).  Its embeddings therefore
influence every worker's loss: ``dL_s/dx_r`` is non-zero for all ``s``.  The gradient that must reach
``x_r`` is ``sum_s dL_s/dX[slice r]`` — a sum over ranks of the slice ``r`` of each rank's gradient
w.r.t. the gathered tensor, i.e. a reduce-scatter (SUM) of the gathered gradient.

A gather done under ``no_grad`` with the local slice put back keeps only ``dL_r/dx_r`` and silently
drops what the other workers' queries send to ``x_r``: the gradients are wrong (see
tests/cacr/test_distributed.py, which shows this).

Why SUM in the backward and the mean convention of the losses
-------------------------------------------------------------
With DDP the parameter gradients are AVERAGED over the ``W`` workers.  If each worker's loss is the
mean over its own ``n`` query rows, the one-process loss on all ``N = W n`` images is
``L = (1/W) sum_s L_s``.  Worker ``r`` back-propagates ``g_r = sum_s dL_s/dx_r · dx_r/dθ`` (SUM in the
gather backward), and DDP averaging gives ``(1/W) sum_r g_r = d[(1/W) sum_s L_s]/dθ = dL/dθ``:
exactly the one-process gradient.  The loss value averaged over ranks is the one-process loss.

Equal local sizes
-----------------
All workers must hold the same number ``n`` of images (the train loop iterates with ``drop_last``),
so that image ``i`` of worker ``r`` has the global index ``r·n + i``.  gloo raises on unequal sizes in
the all-gather itself; NCCL may hang or return garbage.  ``check_equal_sizes`` (or
``gather_with_grad(..., check_sizes=True)``) verifies it with one tiny extra collective; it is off by
default on the hot path because on CUDA it forces a host synchronisation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "is_distributed",
    "world_info",
    "check_equal_sizes",
    "global_offset",
    "gather_with_grad",
    "gather_no_grad",
]


def is_distributed(group=None) -> bool:
    """True when torch.distributed is available, initialised and the group has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_info(group=None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process in ``group``; ``(0, 1)`` when not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def check_equal_sizes(n_local: int, *, device: torch.device | str = "cpu", group=None) -> None:
    """Raise ``ValueError`` (on every rank) unless all ranks hold ``n_local`` rows.

    One all-gather of one integer per rank.  ``device`` must be a device the backend supports
    (CPU for gloo, the rank's CUDA device for NCCL).  No-op when not distributed.
    """
    if not is_distributed(group):
        return
    world = dist.get_world_size(group)
    mine = torch.tensor([int(n_local)], dtype=torch.int64, device=device)
    sizes = torch.empty(world, dtype=torch.int64, device=device)
    _all_gather_single(sizes, mine, group)
    sizes_list = sizes.tolist()
    if any(s != sizes_list[0] for s in sizes_list):
        raise ValueError(
            f"cacr.distributed: every rank must hold the same number of rows (use drop_last=True); "
            f"got local sizes {sizes_list} across ranks"
        )


def global_offset(n_local: int, *, check: bool = False, device: torch.device | str = "cpu",
                  group=None) -> int:
    """Global index of this rank's first row, ``rank · n_local`` (equal local sizes assumed).

    ``check=True`` verifies the equal-size assumption with ``check_equal_sizes``.
    """
    if check:
        check_equal_sizes(n_local, device=device, group=group)
    rank, _ = world_info(group)
    return rank * int(n_local)


# Prefer the non-deprecated names of recent torch, fall back to the older ones.
def _all_gather_single(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


def _reduce_scatter_fn():
    return getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _reduce_scatter_sum(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    fn = _reduce_scatter_fn()
    try:
        fn(out, inp, op=dist.ReduceOp.SUM, group=group)
    except RuntimeError:
        # Backends without reduce-scatter: all-reduce the whole tensor and keep our slice.
        # Deterministic failure, so every rank takes this branch together.
        full = inp.clone()
        dist.all_reduce(full, op=dist.ReduceOp.SUM, group=group)
        out.copy_(full.view((-1,) + tuple(out.shape))[dist.get_rank(group)])


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along ``dim``; backward = reduce-scatter (SUM) of the incoming gradient.

    Forward: ``x`` (local) -> ``X`` with ``X.size(dim) = W · x.size(dim)``, rank ``r`` at rows
    ``[r·n, (r+1)·n)`` of ``dim``.  Backward: every rank holds ``G_s = dL_s/dX``; rank ``r`` receives
    ``sum_s G_s[slice r]`` (see the module docstring for why SUM is right under DDP averaging).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group) -> torch.Tensor:
        world = dist.get_world_size(group)
        ctx.dim, ctx.group, ctx.world = dim, group, world
        x = x.contiguous()
        # Concatenated form (W·x0, ...): the one every backend accepts; viewed rank-major below.
        flat = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
        _all_gather_single(flat, x, group)
        stacked = flat.view((world,) + tuple(x.shape))
        if dim == 0:
            return stacked.reshape((world * x.shape[0],) + tuple(x.shape[1:]))
        # (W, ..., n, ...) -> (..., W, n, ...) -> merge W and n: global index r·n + i.
        moved = stacked.movedim(0, dim)
        shape = list(x.shape)
        shape[dim] = world * x.shape[dim]
        return moved.reshape(shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dim, group, world = ctx.dim, ctx.group, ctx.world
        shape = list(grad.shape)
        n = shape[dim] // world
        split = shape[:dim] + [world, n] + shape[dim + 1:]
        stacked = grad.reshape(split).movedim(dim, 0).contiguous()  # (W, *local_shape)
        out = grad.new_empty(stacked.shape[1:])
        _reduce_scatter_sum(out, stacked.view((-1,) + tuple(stacked.shape[2:])), group)
        return out, None, None


def gather_with_grad(x: torch.Tensor, *, dim: int = 0, group=None,
                     check_sizes: bool = False) -> torch.Tensor:
    """All-gather ``x`` along ``dim`` across ``group`` (default: the default process group), with autograd.

    Returns the concatenation over ranks in rank order, so row ``i`` of rank ``r`` lands at global
    index ``r · n + i`` (``n = x.size(dim)``, equal on all ranks — see ``check_sizes``).  The backward
    sums, over all ranks, the gradients w.r.t. this rank's slice (reduce-scatter SUM), which is what
    makes the DDP-averaged gradient equal the one-process gradient when each rank's loss is a mean
    over its own rows.  Returns ``x`` unchanged when torch.distributed is not initialised or the
    world size is 1.  Works with gloo (CPU tensors) and NCCL (CUDA tensors).

    Every rank must call it (and back-propagate through it) the same number of times in the same order.
    """
    if not is_distributed(group):
        return x
    dim = dim % x.dim()
    if check_sizes:
        check_equal_sizes(x.shape[dim], device=x.device, group=group)
    return _GatherWithGrad.apply(x, dim, group)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor, *, dim: int = 0, group=None) -> torch.Tensor:
    """All-gather ``x`` (detached) along ``dim``, same layout as :func:`gather_with_grad` (row ``i``
    of rank ``r`` at ``r·n + i``) but with NO autograd edge: for tensors that are constants of the
    loss, such as a momentum encoder's keys.  Returns ``x.detach()`` when not distributed.
    """
    x = x.detach()
    if not is_distributed(group):
        return x
    dim = dim % x.dim()
    world = dist.get_world_size(group)
    moved = x.movedim(dim, 0).contiguous()
    flat = moved.new_empty((world * moved.shape[0],) + tuple(moved.shape[1:]))
    _all_gather_single(flat, moved, group)
    return flat.movedim(0, dim)
