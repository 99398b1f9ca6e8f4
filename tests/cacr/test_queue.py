"""Queue CACR (``cacr_queue``): the loss against a float64 loop over the specification (value and
gradient), the method's queue / momentum / shuffle-BN mechanics and checkpointing, and two real
gloo processes: the queue identical on both workers after every step, each worker's loss equal to
the specification on its local batch and the shared queue.

This file is also the worker script of the distributed test (``python test_queue.py RANK ...``).
"""
from __future__ import annotations

import datetime
import os
import sys

import pytest
import torch

from cacr.loss_queue import cacr_queue_loss

W, V, N_LOCAL, M, STEPS, SIZE = 2, 3, 3, 10, 3, 8   # M = 10 is not a multiple of N = 6: wraps unevenly
TINY = dict(arch="narrow_resnet", width=4, head_hidden=8, head_out=5, head_layers=2, norm="none")


def reference_loss(q, k, queue, alpha, beta, tau_pos, tau_neg):
    """METHOD.md "Queue CACR", literally: loops over views x, images i, positives j, negatives."""
    Vq, n, _ = q.shape
    d = lambda a, b: ((a - b) ** 2).sum()                        # noqa: E731  the squared distance
    ca, cr = 0.0, 0.0
    for x in range(Vq):
        for i in range(n):
            dp = torch.stack([d(q[x, i], k[j, i]) for j in range(Vq) if j != x])
            ca = ca + (torch.softmax(tau_pos * dp.detach(), 0) * dp).sum()
            dn = torch.stack([d(q[x, i], u) for u in queue.detach()] +
                             [d(q[x, i], q[x, m]) for m in range(n) if m != i])
            cr = cr + (torch.softmax(-tau_neg * dn, 0) * (-dn)).sum()
    return alpha * ca / (Vq * n) + beta * cr / (Vq * n), alpha * ca / (Vq * n), beta * cr / (Vq * n)


def _unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("kw", [dict(alpha=1.0, beta=1.0, tau_pos=1.0, tau_neg=2.0),
                                dict(alpha=0.7, beta=1.3, tau_pos=3.0, tau_neg=0.5)])
def test_loss_matches_the_loop_reference_value_and_gradient(kw):
    # gradients are compared w.r.t. the UNnormalised head output, as in training: the loss uses
    # d = 2 − 2 a·b (equal to ‖a − b‖² on unit vectors), whose radial gradient the normalisation removes
    raw = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64).requires_grad_()
    q = torch.nn.functional.normalize(raw, dim=-1)
    k, queue = _unit(4, 5, 6, seed=1), _unit(7, 6, seed=2)
    out = cacr_queue_loss(q, k, queue, **kw)
    ref, ref_ca, ref_cr = reference_loss(q, k, queue, **kw)
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.attraction, ref_ca, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.repulsion, ref_cr, rtol=1e-12, atol=1e-12)
    g, = torch.autograd.grad(out.loss, raw, retain_graph=True)
    g_ref, = torch.autograd.grad(ref, raw, retain_graph=True)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    # detached repulsion weights: same value, the gradient of Σ w·c with w held constant
    out_d = cacr_queue_loss(q, k, queue, detach_weights=True, **kw)
    torch.testing.assert_close(out_d.loss, ref, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(torch.autograd.grad(out_d.loss, raw)[0], g_ref)


def test_keys_and_queue_are_constants():
    """Only the queries carry gradient: keys and queue entries that require grad (a caller's
    tensors) get none, and the queries' gradient is that of the loss with both held fixed."""
    q = _unit(3, 4, 6, seed=6).requires_grad_()
    k, queue = _unit(3, 4, 6, seed=7).requires_grad_(), _unit(5, 6, seed=8).requires_grad_()
    cacr_queue_loss(q, k, queue).loss.backward()
    assert k.grad is None and queue.grad is None and q.grad is not None
    q2 = q.detach().clone().requires_grad_()
    cacr_queue_loss(q2, k.detach(), queue.detach()).loss.backward()
    torch.testing.assert_close(q.grad, q2.grad, rtol=0, atol=0)


def test_uniform_weights_and_effective_numbers():
    q, k, queue = _unit(3, 4, 6, seed=3), _unit(3, 4, 6, seed=4), _unit(5, 6, seed=5)
    out = cacr_queue_loss(q, k, queue, tau_pos=0.0, tau_neg=0.0)
    assert float(out.eff_positives) == pytest.approx(V - 1)          # V − 1 = 2 positives
    assert float(out.eff_negatives) == pytest.approx(5 + 4 - 1)      # M + n − 1 negatives
    with pytest.raises(ValueError, match="V >= 2"):
        cacr_queue_loss(q[:1], k[:1], queue)


def _method(**kw):
    from cacr.methods.queue import QueueCACR

    torch.manual_seed(0)
    return QueueCACR({**TINY, **kw.pop("model", {})}, queue_size=M, **kw)


def test_registered_from_config_and_queue_is_in_the_checkpoint():
    import cacr.methods.queue  # noqa: F401  (registers; cacr.methods' package import does it on main)
    from cacr.methods.base import METHODS
    from pipeline.config import Config, to_dict

    cfg = to_dict(Config())
    method = METHODS["cacr_queue"](cfg["model"], {**cfg["loss"], "queue_size": 40}, num_views=5)
    assert method.queue.shape == (40, cfg["model"]["head_out"]) and method.momentum == 0.999
    assert set(method.trainable_parameters()) == set(method.online.parameters())
    assert all(not p.requires_grad for p in method.target.parameters())
    m = _method()
    m.enqueue(_unit(7, 5, seed=6).float())
    m.enqueue(_unit(6, 5, seed=7).float())                 # wraps: ptr 7 -> 13 % 10 = 3
    state = m.state_dict()
    assert int(state["queue_ptr"]) == 3 and "queue" in state
    fresh = _method()
    assert not torch.equal(fresh.queue, m.queue)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.queue, m.queue) and int(fresh.queue_ptr) == 3
    a, b = _unit(7, 5, seed=6).float(), _unit(6, 5, seed=7).float()
    torch.testing.assert_close(m.queue, torch.cat([b[3:], a[3:], b[:3]]))   # FIFO ring


def test_after_step_is_ema_then_enqueue():
    m = _method(momentum=0.9)
    views = torch.rand(V, 4, 3, SIZE, SIZE)
    before_t = [p.clone() for p in m.target.parameters()]
    with torch.no_grad():
        for p in m.online.parameters():
            p.add_(1.0)
    out = m(views)
    queue0 = m.queue.clone()
    assert torch.equal(m.queue, queue0) and int(m.queue_ptr) == 0    # forward does not touch it
    keys = m.target(views[0])
    info = m.after_step(0.5)
    for pt, p0, po in zip(m.target.parameters(), before_t, m.online.parameters()):
        torch.testing.assert_close(pt, 0.9 * p0 + 0.1 * po)
    torch.testing.assert_close(m.queue[:4], keys)
    assert torch.equal(m.queue[4:], queue0[4:]) and int(m.queue_ptr) == 4 and info["momentum"] == 0.9
    assert torch.isfinite(out.loss)


def test_shuffle_bn_keys_keep_row_order_and_use_sub_batch_statistics():
    x = torch.rand(12, 3, SIZE, SIZE)
    plain = _method()
    assert plain.bn_splits == 1                             # no batch statistics: nothing to split
    plain.bn_splits = 3                                     # forced: permute, split, un-permute
    torch.testing.assert_close(plain.keys(x), plain.target(x), rtol=1e-6, atol=1e-6)
    bn = _method(model={"norm": "batch"}, bn_splits=3)
    one = _method(model={"norm": "batch"}, bn_splits=1)
    whole = one.keys(x)
    torch.testing.assert_close(whole, bn.target(x))         # same init; one split = plain BN
    assert not torch.allclose(bn.keys(x), whole, atol=1e-4)  # sub-batch statistics differ


# ------------------------------------------------------------------------------------------------
# Two real gloo processes
# ------------------------------------------------------------------------------------------------

def _data():
    g = torch.Generator().manual_seed(11)
    return torch.rand(STEPS, V, W * N_LOCAL, 3, SIZE, SIZE, generator=g, dtype=torch.float64)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=W,
                            timeout=datetime.timedelta(seconds=60))
    m = _method(momentum=0.5).double()
    with torch.no_grad():   # the initial random queue was normalised in float32: unit in float64 too
        m.queue.copy_(torch.nn.functional.normalize(m.queue, dim=1))
    data = _data()[:, :, rank * N_LOCAL:(rank + 1) * N_LOCAL]
    steps = []
    for t in range(STEPS):
        queue_before, ptr_before = m.queue.clone(), int(m.queue_ptr)
        out = m(data[t])
        keys = m.target(data[t].flatten(0, 1)).view(V, N_LOCAL, -1)   # norm=none: what forward used
        out.loss.backward()
        for p in m.trainable_parameters():                             # what DDP does: average
            dist.all_reduce(p.grad)
            p.grad /= W
        with torch.no_grad():
            for p in m.trainable_parameters():
                p -= 0.5 * p.grad
                p.grad = None
        m.after_step((t + 1) / STEPS)
        steps.append({"loss": float(out.loss), "q": m.last_embeddings().double(), "k": keys,
                      "queue_before": queue_before, "ptr_before": ptr_before,
                      "queue": m.queue.clone(), "ptr": int(m.queue_ptr)})
    torch.save(steps, os.path.join(out_dir, f"q{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, spawn_ranks):
    return spawn_ranks(__file__, W, tmp_path_factory.mktemp("qdist"), "q{rank}.pt")


@pytest.mark.slow
def test_two_workers_share_one_queue_of_gathered_keys(ranks):
    N = W * N_LOCAL
    for t in range(STEPS):
        a, b = ranks[0][t], ranks[1][t]
        assert torch.equal(a["queue"], b["queue"]) and a["ptr"] == b["ptr"] == ((t + 1) * N) % M
        # the step's view-0 keys of rank 0 then rank 1 (global index r·n + i), written at the pointer
        gathered = torch.cat([ranks[r][t]["k"][0] for r in range(W)])
        expected = a["queue_before"].clone()
        rows = [(a["ptr_before"] + i) % M for i in range(N)]
        expected[rows] = gathered
        torch.testing.assert_close(a["queue"], expected, rtol=0, atol=1e-12)


@pytest.mark.slow
def test_each_worker_loss_is_the_spec_on_its_batch_and_the_shared_queue(ranks):
    for r in range(W):
        for t in range(STEPS):
            s = ranks[r][t]
            ref, _, _ = reference_loss(s["q"], s["k"], s["queue_before"], 1.0, 1.0, 1.0, 2.0)
            assert s["loss"] == pytest.approx(float(ref), rel=1e-10)
    # the workers really saw different images, and the queue really changed what they optimise
    assert ranks[0][0]["loss"] != pytest.approx(ranks[1][0]["loss"])


if __name__ == "__main__":
    _worker(int(sys.argv[1]), sys.argv[2], sys.argv[3])
