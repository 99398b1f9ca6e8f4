"""cacr.loss.cacr_moco_loss against an independent float64 loop reference written from the formulas
of docs/METHOD.md ("Momentum-encoder CACR"), and against MoCo v3's two-crop loss (written here from
its definition, not imported)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cacr.loss import LossOutput, cacr_moco_loss

DT = torch.float64


def ref_moco(q, k, *, temperature):
    """Loops over targets a, query views v != a and images i; keys are constants (detached)."""
    V, N, _ = q.shape
    A = k.shape[0]
    k = k.detach()
    T = temperature
    att_a, rep_a, e_pos, e_neg = [], [], [], []
    for a in range(A):
        vs = [v for v in range(V) if v != a]
        att = rep = 0.0
        for i in range(N):
            d = [float(((q[v, i] - k[a, i]) ** 2).sum().detach()) / T for v in vs]
            m = max(d)
            w = [math.exp(x - m) for x in d]
            p = [x / sum(w) for x in w]                                       # detached weights
            e_pos.append(math.exp(-sum(x * math.log(x) for x in p if x > 0)))
            for pv, v in zip(p, vs):
                logits = torch.stack([torch.dot(q[v, i], k[a, j]) / T for j in range(N)])
                att = att + pv * (-logits[i]) / N
                rep = rep + pv * torch.logsumexp(logits, 0) / N
                neg = torch.softmax(torch.cat([logits[:i], logits[i + 1:]]).detach(), 0)
                e_neg.append(float(torch.exp(-(neg * neg.log()).sum())))
        att_a.append(2 * T * att)
        rep_a.append(2 * T * rep)
    att = sum(att_a) / A
    rep = sum(rep_a) / A
    return dict(loss=att + rep, attraction=att, repulsion=rep,
                eff_positives=sum(e_pos) / len(e_pos), eff_negatives=sum(e_neg) / len(e_neg))


def mocov3_ctr(q, k, T):
    """MoCo v3: cross-entropy of logits q·kᵀ/T with labels = own index, times 2T."""
    logits = q @ k.detach().T / T
    return F.cross_entropy(logits, torch.arange(q.shape[0])) * 2 * T


def _unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=DT), dim=-1)


def _f(x) -> float:
    return float(x.detach()) if torch.is_tensor(x) else float(x)


@pytest.mark.parametrize("V,A,n,D,T", [(2, 2, 5, 4, 1.0), (4, 2, 4, 3, 0.2), (3, 3, 3, 5, 0.5),
                                       (4, 1, 2, 3, 1.0)])
def test_matches_loop_reference_value_and_gradient(V, A, n, D, T):
    q = _unit(V, n, D, seed=V * 10 + A).requires_grad_()
    k = _unit(A, n, D, seed=99)
    out = cacr_moco_loss(q, k, temperature=T)
    q_ref = q.detach().clone().requires_grad_()
    ref = ref_moco(q_ref, k, temperature=T)
    for name in ("loss", "attraction", "repulsion", "eff_positives", "eff_negatives"):
        assert float(getattr(out, name).detach()) == pytest.approx(_f(ref[name]), rel=1e-10, abs=1e-10), name
    torch.testing.assert_close(out.loss, out.attraction + out.repulsion)
    out.loss.backward()
    ref["loss"].backward()
    torch.testing.assert_close(q.grad, q_ref.grad, rtol=1e-10, atol=1e-12)


def test_two_crops_is_half_of_mocov3_symmetric_loss():
    n, D, T = 6, 8, 0.2
    q = _unit(2, n, D, seed=1).requires_grad_()
    k = _unit(2, n, D, seed=2)
    out = cacr_moco_loss(q, k, temperature=T)
    q2 = q.detach().clone().requires_grad_()
    moco = mocov3_ctr(q2[0], k[1], T) + mocov3_ctr(q2[1], k[0], T)
    assert _f(out.loss) == pytest.approx(0.5 * _f(moco), rel=1e-12)
    assert float(out.eff_positives) == pytest.approx(1.0)          # p ≡ 1 with one query view
    out.loss.backward()
    (0.5 * moco).backward()
    torch.testing.assert_close(q.grad, q2.grad)


def test_keys_are_constants_and_weights_detached():
    """Gradient w.r.t. keys is none; gradient w.r.t. q equals the one with p held fixed at its value."""
    V, n, D, T = 4, 4, 3, 0.5
    q = _unit(V, n, D, seed=3).requires_grad_()
    k = _unit(2, n, D, seed=4).requires_grad_()
    out = cacr_moco_loss(q, k, temperature=T)
    out.loss.backward()
    assert k.grad is None
    # finite differences of the loss with p frozen: recompute with the reference at fixed weights
    q2 = q.detach().clone().requires_grad_()
    ref = ref_moco(q2, k.detach(), temperature=T)   # reference computes p from floats: frozen
    ref["loss"].backward()
    torch.testing.assert_close(q.grad, q2.grad, rtol=1e-10, atol=1e-12)


def test_far_positives_weigh_more():
    """A query view far from the key gets a larger weight (lowers eff_positives below V − 1)."""
    D, T = 3, 0.2
    k = F.normalize(torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]], dtype=DT), dim=-1)
    q = F.normalize(torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]], [[1.0, 0.1, 0.0]]],
                                 dtype=DT), dim=-1)
    qn = torch.cat([q, _unit(3, 1, D, seed=5)], 1)
    kn = torch.cat([k, _unit(2, 1, D, seed=6)], 1)
    out = cacr_moco_loss(qn, kn, temperature=T)
    assert 1.0 <= float(out.eff_positives) < 2.0 - 1e-3


def test_uniform_keys_give_n_minus_one_negatives_in_float32():
    q = torch.zeros(2, 5, 4)
    q[..., 0] = 1
    k = q[:2].clone()
    out = cacr_moco_loss(q.half().float(), k, temperature=1.0)
    assert float(out.eff_negatives) == pytest.approx(4.0)
    out16 = cacr_moco_loss(q.bfloat16(), k.bfloat16(), temperature=1.0)
    assert out16.loss.dtype == torch.float32 and torch.isfinite(out16.loss)


@pytest.mark.parametrize("q,k,t,match", [
    (torch.zeros(1, 3, 4), torch.zeros(1, 3, 4), 1.0, "V >= 2"),
    (torch.zeros(2, 3, 4), torch.zeros(3, 3, 4), 1.0, "1 <= A <= V"),
    (torch.zeros(2, 3, 4), torch.zeros(2, 2, 4), 1.0, "1 <= A <= V"),
    (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), 0.0, "temperature"),
    (torch.zeros(3, 4), torch.zeros(2, 3, 4), 1.0, r"\(V, n, D\)"),
    (torch.zeros(2, 1, 4), torch.zeros(2, 1, 4), 1.0, "N=1"),
])
def test_bad_inputs_raise(q, k, t, match):
    with pytest.raises(ValueError, match=match):
        cacr_moco_loss(q, k, temperature=t)


def test_returns_loss_output():
    out = cacr_moco_loss(_unit(2, 3, 4, seed=7), _unit(2, 3, 4, seed=8), temperature=1.0)
    assert isinstance(out, LossOutput) and set(out.metrics()) >= {"loss", "eff_positives"}


def test_interface_is_exactly_the_specified_one():
    """Issue 13 fixes the signature `cacr_moco_loss(q, k, *, temperature) -> LossOutput`: code
    written against it (other projects' wrappers, bench/) must not meet extra parameters."""
    import inspect

    sig = inspect.signature(cacr_moco_loss)
    assert [(p.name, p.kind, p.default) for p in sig.parameters.values()] == [
        ("q", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
        ("k", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
        ("temperature", inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.empty),
    ]
    assert sig.return_annotation in (LossOutput, "LossOutput")
