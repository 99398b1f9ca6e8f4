"""THE contract of the distributed loss (METHOD.md, "Cross-worker negative gathering"):

W = 2 real gloo processes × n images, each computing the loss on its own slice with embeddings
gathered WITH gradient, DDP averaging the gradients, must give the same loss (averaged over ranks)
and the same parameter gradients as ONE process on all 2n images.

One launch of two worker processes (this file run as a script) runs every case; the tests here
compare what they wrote with a single-process computation.  A negative control runs the same
step with a no-grad gather (local slice put back) and must give DIFFERENT gradients: proof that
this test can see the bug it guards against.
"""

from __future__ import annotations

import datetime
import os
import sys

import pytest
import torch
import torch.nn.functional as F

W, V, N_LOCAL, D_IN, D = 2, 3, 4, 6, 5

# name -> (loss, kwargs, dtype, n per rank)
CASES = {
    "cacr": ("cacr", dict(tau_pos=1.0, tau_neg=0.9), torch.float64, N_LOCAL),
    "cacr_sharp": ("cacr", dict(alpha=0.7, beta=1.3, tau_pos=2.0, tau_neg=2.0), torch.float64, N_LOCAL),
    "cacr_detach": ("cacr", dict(tau_pos=2.0, tau_neg=2.0, detach_weights=True), torch.float64, N_LOCAL),
    "cacr_same_view": ("cacr", dict(tau_neg=2.0, same_view_negatives=True), torch.float64, N_LOCAL),
    "cacr_same_view_detach": ("cacr", dict(tau_neg=2.0, same_view_negatives=True, detach_weights=True),
                              torch.float64, N_LOCAL),
    "cacr_n1": ("cacr", dict(tau_neg=2.0), torch.float64, 1),          # N = 2: one negative each
    "cacr_float32": ("cacr", dict(tau_neg=2.0), torch.float32, N_LOCAL),
    "infonce": ("infonce", dict(temperature=0.2), torch.float64, N_LOCAL),
    "infonce_float32": ("infonce", dict(temperature=0.5), torch.float32, N_LOCAL),
}
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def make_model(dtype):
    """Tiny deterministic model without batch statistics: Linear → tanh → Linear (normalised later)."""
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(D_IN, 8), torch.nn.Tanh(), torch.nn.Linear(8, D))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model.to(dtype)


def make_data(n_total, dtype):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n_total, V, D_IN, generator=g, dtype=torch.float64).to(dtype)


def embed(model, x):
    """x (n, V, D_IN) -> z (V, n, D), unit norm."""
    return F.normalize(model(x), dim=-1).transpose(0, 1)


def loss_fn(name):
    from cacr.loss import cacr_loss, infonce_loss
    return cacr_loss if name == "cacr" else infonce_loss


# ------------------------------------------------------------------------------------------------
# Worker side (runs in the spawned processes)
# ------------------------------------------------------------------------------------------------

def _worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from cacr.distributed import check_equal_sizes, gather_with_grad, global_offset, world_info
    from cacr.loss import _cacr_from_gathered

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=W,
                            timeout=datetime.timedelta(seconds=60))
    res: dict = {"world_info": world_info(), "offset": global_offset(N_LOCAL, check=True)}

    def step(name, loss, kw, dtype, n, bad_gather=False):
        model = DDP(make_model(dtype))
        x = make_data(W * n, dtype)[rank * n:(rank + 1) * n]
        z = embed(model, x)
        if bad_gather:  # the bug: gather without grad, local slice put back
            with torch.no_grad():
                parts = [torch.empty_like(z) for _ in range(W)]
                dist.all_gather(parts, z.contiguous())
            parts[rank] = z
            out = _cacr_from_gathered(z, torch.cat(parts, dim=1), rank * n, **kw)
        else:
            out = loss_fn(loss)(z, **kw)
        out.loss.backward()
        vals = torch.stack([out.loss, out.attraction, out.repulsion]).detach()
        dist.all_reduce(vals)
        res[name] = {"values": (vals / W).tolist(),
                     "grads": [p.grad.detach().clone() for p in model.parameters()]}

    for name, (loss, kw, dtype, n) in CASES.items():
        step(name, loss, kw, dtype, n)
    step("bad_gather", "cacr", CASES["cacr"][1], torch.float64, N_LOCAL, bad_gather=True)

    # gather_with_grad itself: forward = rank-ordered concatenation; backward = SUM over ranks of
    # each rank's gradient on this rank's slice.
    x = torch.full((2, 3), float(rank + 1), dtype=torch.float64, requires_grad=True)
    y = gather_with_grad(x, dim=0)
    coef = torch.arange(y.numel(), dtype=torch.float64).view_as(y) * (rank + 1)
    (y * coef).sum().backward()
    res["gather_fwd"] = y.detach()
    res["gather_grad"] = x.grad.clone()
    # Same backward through the all-reduce fallback for backends without reduce-scatter.
    import cacr.distributed as cd
    orig = cd._reduce_scatter_fn

    def _unsupported(*a, **k):
        raise RuntimeError("reduce_scatter not supported (simulated)")

    cd._reduce_scatter_fn = lambda: _unsupported
    try:
        xf = x.detach().clone().requires_grad_()
        (gather_with_grad(xf, dim=0) * coef).sum().backward()
        res["gather_grad_fallback"] = xf.grad.clone()
    finally:
        cd._reduce_scatter_fn = orig
    x3 = torch.full((3, 2, 4), float(rank + 1), dtype=torch.float64)   # dim=1 layout of the losses
    res["gather_dim1"] = gather_with_grad(x3, dim=1).detach()

    # Unequal local sizes are reported clearly on every rank.
    try:
        check_equal_sizes(2 + rank)
        res["unequal"] = "no error"
    except ValueError as e:
        res["unequal"] = str(e)

    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# Test side
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ranks(tmp_path_factory, spawn_ranks):
    return spawn_ranks(__file__, W, tmp_path_factory.mktemp("dist"), "rank{rank}.pt")


def single_process(loss, kw, dtype, n):
    model = make_model(dtype)
    out = loss_fn(loss)(embed(model, make_data(W * n, dtype)), **kw)
    out.loss.backward()
    return (torch.stack([out.loss, out.attraction, out.repulsion]).detach().tolist(),
            [p.grad.detach().clone() for p in model.parameters()])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_equal_one_process(ranks, name):
    loss, kw, dtype, n = CASES[name]
    values, grads = single_process(loss, kw, dtype, n)
    tol = TOL[dtype]
    for r in range(W):
        got = ranks[r][name]
        assert got["values"] == pytest.approx(values, rel=tol, abs=tol), (r, got["values"], values)
        for g_dist, g_one in zip(got["grads"], grads):
            torch.testing.assert_close(g_dist, g_one, rtol=tol, atol=tol)


@pytest.mark.slow
def test_negative_control_no_grad_gather_is_detected(ranks):
    """Same step with a no-grad gather: same loss value, but gradients far from the one-process ones."""
    loss, kw, dtype, n = CASES["cacr"]
    values, grads = single_process(loss, kw, dtype, n)
    bad = ranks[0]["bad_gather"]
    assert bad["values"] == pytest.approx(values, abs=1e-10)      # forward is identical...
    diff = max(float((a - b).abs().max()) for a, b in zip(bad["grads"], grads))
    assert diff > 1e-3, diff                                       # ...the gradient is not
    with pytest.raises(AssertionError):
        for a, b in zip(bad["grads"], grads):
            torch.testing.assert_close(a, b, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.slow
def test_gather_primitives(ranks):
    for r in range(W):
        res = ranks[r]
        assert res["world_info"] == (r, W)
        assert res["offset"] == r * N_LOCAL
        expected = torch.cat([torch.full((2, 3), float(s + 1), dtype=torch.float64) for s in range(W)])
        torch.testing.assert_close(res["gather_fwd"], expected)
        # d/dx_r of Σ_s Σ (Y * coef_s), coef_s = arange · (s + 1): slice r of arange · Σ_s (s + 1).
        base = torch.arange(2 * W * 3, dtype=torch.float64).view(2 * W, 3)[2 * r:2 * r + 2]
        torch.testing.assert_close(res["gather_grad"], base * sum(s + 1 for s in range(W)))
        torch.testing.assert_close(res["gather_grad_fallback"], res["gather_grad"])
        exp_dim1 = torch.cat([torch.full((3, 2, 4), float(s + 1), dtype=torch.float64) for s in range(W)], 1)
        torch.testing.assert_close(res["gather_dim1"], exp_dim1)
        assert "same number of rows" in res["unequal"] and "[2, 3]" in res["unequal"]


def test_single_process_is_noop():
    from cacr.distributed import gather_with_grad, global_offset, world_info
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x
    assert world_info() == (0, 1)
    assert global_offset(5, check=True) == 0


if __name__ == "__main__":
    _worker(int(sys.argv[1]), sys.argv[2], sys.argv[3])
