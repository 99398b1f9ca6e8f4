"""cacr.loss against independent float64 references written with explicit Python loops, straight
from the formulas of docs/METHOD.md (they call nothing from cacr)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from cacr.loss import (LossOutput, _cacr_from_gathered, _infonce_from_gathered, _own_column_mask,
                       alignment, cacr_loss, infonce_loss, uniformity)

DT = torch.float64


# ------------------------------------------------------------------------------------------------
# References (explicit loops; d(a, b) = ‖a − b‖², softmax written out)
# ------------------------------------------------------------------------------------------------

def _d(a, b):
    return ((a - b) ** 2).sum()


def _softmax(xs):
    m = max(float(x.detach()) for x in xs)
    e = [torch.exp(x - m) for x in xs]
    s = sum(e)
    return [x / s for x in e]


def _eff(ws):
    """exp(entropy) of a list of weights."""
    ws = [float(w.detach()) for w in ws]
    return math.exp(-sum(w * math.log(w) for w in ws if w > 0))


def ref_cacr(z, *, alpha, beta, tau_pos, tau_neg, same_view=False, weights_z=None):
    """METHOD.md on the whole batch z (V, N, D).  weights_z: compute w⁺, w⁻ from this tensor instead
    (pass z.detach() for the detached-weights reference)."""
    V, N, _ = z.shape
    wz = z if weights_z is None else weights_z
    ca, ca_eff = [], []
    for v in range(V):
        for i in range(N):
            us = [u for u in range(V) if u != v]
            c = [_d(z[v, i], z[u, i]) for u in us]
            w = _softmax([tau_pos * _d(wz[v, i], wz[u, i]) for u in us])
            ca.append(sum(wk * ck for wk, ck in zip(w, c)))
            ca_eff.append(_eff(w))
    cr, cr_eff = [], []
    for v in range(V):
        for u in range(v + 1, V):
            for i in range(N):
                negs = [(u, j) for j in range(N) if j != i]
                if same_view:
                    negs += [(v, j) for j in range(N) if j != i]
                c = [-_d(z[v, i], z[a, j]) for a, j in negs]
                w = _softmax([-tau_neg * _d(wz[v, i], wz[a, j]) for a, j in negs])
                cr.append(sum(wk * ck for wk, ck in zip(w, c)))
                cr_eff.append(_eff(w))
    att = alpha * sum(ca) / len(ca)
    rep = beta * sum(cr) / len(cr)
    return dict(loss=att + rep, attraction=att, repulsion=rep,
                eff_positives=sum(ca_eff) / len(ca_eff), eff_negatives=sum(cr_eff) / len(cr_eff))


def ref_infonce(z, *, temperature):
    """Multi-view NT-Xent as documented in infonce_loss, with loops."""
    V, N, _ = z.shape
    terms, att, rep, e_pos, e_neg = [], [], [], [], []
    for v in range(V):
        for i in range(N):
            a = z[v, i]
            others = [(u, j) for u in range(V) for j in range(N) if (u, j) != (v, i)]
            logits = [torch.dot(a, z[u, j]) / temperature for u, j in others]
            lse = torch.logsumexp(torch.stack(logits), 0)
            pos = [torch.dot(a, z[u, i]) / temperature for u in range(V) if u != v]
            terms.append(sum(lse - p for p in pos) / len(pos))
            att.append(-sum(pos) / len(pos))
            rep.append(lse)
            e_pos.append(_eff(_softmax(pos)))
            e_neg.append(_eff(_softmax([l for (u, j), l in zip(others, logits) if j != i])))
    m = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return dict(loss=m(terms), attraction=m(att), repulsion=m(rep), eff_positives=m(e_pos),
                eff_negatives=m(e_neg))


def _x(V, n, D, seed, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, n, D, generator=g, dtype=dtype)


def _f(x) -> float:
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def _compare(out: LossOutput, ref: dict, tol=1e-10):
    for k in ("loss", "attraction", "repulsion", "eff_positives", "eff_negatives"):
        got, want = _f(getattr(out, k)), _f(ref[k])
        assert got == pytest.approx(want, rel=tol, abs=tol), (k, got, want)
    assert torch.allclose(out.loss, out.attraction + out.repulsion, rtol=0, atol=1e-12)


SHAPES = [(2, 2, 3), (2, 7, 16), (3, 4, 16), (5, 2, 3), (5, 7, 16)]
HPARAMS = [  # alpha, beta, tau_pos, tau_neg
    (1.0, 1.0, 1.0, 0.9),
    (0.5, 2.0, 0.0, 0.0),
    (1.3, 0.7, 2.0, 0.5),
    (1.0, 1.0, 0.5, 2.0),
]


# ------------------------------------------------------------------------------------------------
# CACR
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("hp", HPARAMS)
@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("same_view", [False, True])
def test_cacr_matches_loop_reference(shape, hp, detach, same_view):
    alpha, beta, tp, tn = hp
    seed = hash((shape, hp, detach, same_view)) % 2**31
    x1 = _x(*shape, seed).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    z1, z2 = F.normalize(x1, dim=-1), F.normalize(x2, dim=-1)
    out = cacr_loss(z1, alpha=alpha, beta=beta, tau_pos=tp, tau_neg=tn, detach_weights=detach,
                    same_view_negatives=same_view)
    ref = ref_cacr(z2, alpha=alpha, beta=beta, tau_pos=tp, tau_neg=tn, same_view=same_view,
                   weights_z=z2.detach() if detach else None)
    _compare(out, ref)
    # Gradients w.r.t. the un-normalised input: the library's 2 − 2a·b and the reference's ‖a − b‖²
    # agree on the sphere, so these must agree too.
    out.loss.backward()
    ref["loss"].backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("same_view", [False, True])
def test_detach_same_value_different_gradient(same_view):
    x = _x(3, 5, 8, 1)
    grads, values = [], []
    for detach in (False, True):
        xi = x.clone().requires_grad_()
        out = cacr_loss(F.normalize(xi, dim=-1), tau_pos=2.0, tau_neg=2.0, detach_weights=detach,
                        same_view_negatives=same_view)
        out.loss.backward()
        values.append(out.loss.detach())
        grads.append(xi.grad)
    torch.testing.assert_close(values[0], values[1], rtol=0, atol=1e-14)
    assert (grads[0] - grads[1]).abs().max() > 1e-3


@pytest.mark.parametrize("same_view", [False, True])
def test_cacr_gradcheck(same_view):
    x = _x(3, 3, 4, 2).requires_grad_()

    def f(x):
        out = cacr_loss(F.normalize(x, dim=-1), alpha=0.7, beta=1.3, tau_pos=1.5, tau_neg=2.0,
                        same_view_negatives=same_view)
        return out.loss, out.attraction

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("same_view", [False, True])
def test_cacr_detached_gradient_finite_differences(same_view):
    """detach_weights=True: the analytic gradient is NOT that of the loss as a function of x (gradcheck
    would rightly fail), but that of Σ w(x0) · c(x) with the weights frozen at x0.  Check it against
    central differences of the loop reference with frozen weights."""
    x0 = _x(3, 3, 4, 2)
    kw = dict(alpha=0.7, beta=1.3, tau_pos=1.5, tau_neg=2.0)
    x = x0.clone().requires_grad_()
    out = cacr_loss(F.normalize(x, dim=-1), detach_weights=True, same_view_negatives=same_view, **kw)
    out.loss.backward()
    frozen = F.normalize(x0, dim=-1)
    eps = 1e-6
    numeric = torch.zeros_like(x0)
    with torch.no_grad():
        for idx in itertools.product(*map(range, x0.shape)):
            vals = []
            for s in (eps, -eps):
                xp = x0.clone()
                xp[idx] += s
                vals.append(float(ref_cacr(F.normalize(xp, dim=-1), same_view=same_view,
                                           weights_z=frozen, **kw)["loss"]))
            numeric[idx] = (vals[0] - vals[1]) / (2 * eps)
    torch.testing.assert_close(x.grad, numeric, rtol=1e-6, atol=1e-8)
    # ... and it differs from the full gradient.
    xf = x0.clone().requires_grad_()
    cacr_loss(F.normalize(xf, dim=-1), same_view_negatives=same_view, **kw).loss.backward()
    assert (xf.grad - x.grad).abs().max() > 1e-4


def test_uniform_weights_when_tau_zero():
    V, n, D = 4, 6, 5
    z = F.normalize(_x(V, n, D, 3), dim=-1)
    out = cacr_loss(z, tau_pos=0.0, tau_neg=0.0)
    assert float(out.eff_positives) == pytest.approx(V - 1, abs=1e-10)
    assert float(out.eff_negatives) == pytest.approx(n - 1, abs=1e-10)
    # Uniform weights: plain means of the distances.
    d = torch.cdist(z.transpose(0, 1), z.transpose(0, 1)).pow(2)          # (n, V, V)
    ca = d.sum((1, 2)).sum() / (n * V * (V - 1))
    assert float(out.attraction) == pytest.approx(float(ca), abs=1e-10)
    out_sv = cacr_loss(z, tau_pos=0.0, tau_neg=0.0, same_view_negatives=True)
    assert float(out_sv.eff_negatives) == pytest.approx(2 * (n - 1), abs=1e-10)


def test_sharper_weights_with_larger_tau():
    z = F.normalize(_x(5, 8, 4, 4), dim=-1)
    effs = [cacr_loss(z, tau_pos=t, tau_neg=t) for t in (0.0, 1.0, 4.0)]
    assert effs[0].eff_positives > effs[1].eff_positives > effs[2].eff_positives
    assert effs[0].eff_negatives > effs[1].eff_negatives > effs[2].eff_negatives


def test_block_rows_average_to_whole_batch():
    """Rank r's n × N block (the path cacr_loss uses after the gather), averaged over r, is the whole
    loss and gradient — the single-process half of the distributed contract (offsets, own-column mask)."""
    W, V, n, D = 3, 3, 4, 6
    x = _x(V, W * n, D, 5).requires_grad_()
    z = F.normalize(x, dim=-1)
    for fn, kw in ((_cacr_from_gathered, dict(tau_pos=1.2, tau_neg=0.7, same_view_negatives=True)),
                   (_infonce_from_gathered, dict(temperature=0.3))):
        whole = cacr_loss(z, **kw) if fn is _cacr_from_gathered else infonce_loss(z, **kw)
        (g_whole,) = torch.autograd.grad(whole.loss, x, retain_graph=True)
        parts = [fn(z[:, r * n:(r + 1) * n], z, r * n, **kw) for r in range(W)]
        mean = sum(p.loss for p in parts) / W
        (g_parts,) = torch.autograd.grad(mean, x, retain_graph=True)
        torch.testing.assert_close(mean, whole.loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g_parts, g_whole, rtol=1e-10, atol=1e-12)
        # A wrong offset (mask on the wrong column) must change the value.
        wrong = fn(z[:, n:2 * n], z, 0, **kw).loss
        assert abs(float((wrong - parts[1].loss).detach())) > 1e-6


def test_masks_cached():
    z = F.normalize(_x(3, 5, 4, 6), dim=-1)
    cacr_loss(z)
    before = _own_column_mask.cache_info()
    cacr_loss(z)
    cacr_loss(z + 0.0)
    after = _own_column_mask.cache_info()
    assert after.misses == before.misses and after.hits >= before.hits + 2


def test_float32_and_bfloat16_inputs():
    x = _x(5, 6, 16, 7)
    z64 = F.normalize(x, dim=-1)
    ref = cacr_loss(z64)
    out32 = cacr_loss(z64.float())
    assert out32.loss.dtype == torch.float32
    assert float(out32.loss) == pytest.approx(float(ref.loss), abs=1e-5)
    outbf = cacr_loss(z64.bfloat16())          # computed in float32 internally
    assert outbf.loss.dtype == torch.float32
    assert float(outbf.loss) == pytest.approx(float(ref.loss), abs=5e-2)


@pytest.mark.parametrize("bad, match", [
    (torch.randn(4, 8), "shape"),
    (torch.randn(1, 4, 8), "V >= 2"),
    (torch.randn(3, 1, 8), "N=1"),
    (torch.ones(2, 3, 4, dtype=torch.int64), "floating"),
])
def test_bad_inputs_raise(bad, match):
    for fn in (cacr_loss, infonce_loss):
        with pytest.raises(ValueError, match=match):
            fn(bad)


def test_bad_temperature_raises():
    with pytest.raises(ValueError, match="temperature"):
        infonce_loss(F.normalize(torch.randn(2, 3, 4), dim=-1), temperature=0.0)


def test_metrics_are_floats():
    m = cacr_loss(F.normalize(_x(2, 3, 4, 8), dim=-1)).metrics(prefix="train/")
    assert set(m) == {f"train/{k}" for k in ("loss", "attraction", "repulsion", "eff_positives",
                                              "eff_negatives")}
    assert all(isinstance(v, float) for v in m.values())


# ------------------------------------------------------------------------------------------------
# InfoNCE
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", [0.1, 0.5, 2.0])
def test_infonce_matches_loop_reference(shape, temperature):
    x1 = _x(*shape, 11).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    out = infonce_loss(F.normalize(x1, dim=-1), temperature=temperature)
    ref = ref_infonce(F.normalize(x2, dim=-1), temperature=temperature)
    _compare(out, ref)
    out.loss.backward()
    ref["loss"].backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-11)


def test_infonce_two_views_is_simclr_nt_xent():
    n, T = 6, 0.3
    z = F.normalize(_x(2, n, 8, 12), dim=-1)
    flat = torch.cat([z[0], z[1]])                                   # (2n, D), SimCLR layout
    sim = flat @ flat.T / T
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    simclr = F.cross_entropy(sim, target)
    assert float(infonce_loss(z, temperature=T).loss) == pytest.approx(float(simclr), abs=1e-12)


def test_infonce_gradcheck():
    x = _x(3, 3, 4, 13).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: infonce_loss(F.normalize(x, dim=-1), temperature=0.5).loss, (x,), eps=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# Alignment / uniformity
# ------------------------------------------------------------------------------------------------

def test_alignment_uniformity_reference():
    V, n = 3, 5
    z = F.normalize(_x(V, n, 4, 14), dim=-1)
    for a in (1.0, 2.0):
        vals = [float(torch.linalg.norm(z[v, i] - z[u, i])) ** a
                for v, u in itertools.combinations(range(V), 2) for i in range(n)]
        assert float(alignment(z, alpha=a)) == pytest.approx(sum(vals) / len(vals), abs=1e-12)
    t = 2.0
    per_view = []
    for v in range(V):
        e = [math.exp(-t * float(_d(z[v, i], z[v, j]))) for i, j in itertools.combinations(range(n), 2)]
        per_view.append(math.log(sum(e) / len(e)))
    assert float(uniformity(z, t=t)) == pytest.approx(sum(per_view) / V, abs=1e-12)
    # Identical views: perfect alignment; collapsed batch: worst uniformity (0).
    assert float(alignment(z[:1].expand(2, -1, -1))) == 0.0
    assert float(uniformity(z[:, :1].expand(-1, 3, -1))) == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------------------------------------
# CUDA (the only test allowed to skip)
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("detach", [False, True])
def test_cuda_matches_cpu(detach):
    x = _x(5, 16, 32, 15)
    results = {}
    for dev in ("cpu", "cuda"):
        for dtype in (torch.float64, torch.float32):
            xi = x.to(dev, dtype).requires_grad_()
            z = F.normalize(xi, dim=-1)
            c = cacr_loss(z, detach_weights=detach, same_view_negatives=True)
            i = infonce_loss(z)
            (c.loss + i.loss).backward()
            results[dev, dtype] = (c.loss.item(), i.loss.item(), xi.grad.double().cpu())
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        a, b = results["cpu", dtype], results["cuda", dtype]
        assert a[0] == pytest.approx(b[0], abs=tol) and a[1] == pytest.approx(b[1], abs=tol)
        torch.testing.assert_close(a[2], b[2], rtol=tol, atol=tol)
