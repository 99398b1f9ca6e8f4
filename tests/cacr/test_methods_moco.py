"""cacr.methods.moco (``cacr_moco``): momentum schedule, EMA order, targets, state, config glue."""
import math

import pytest
import torch
import torch.nn.functional as F

from cacr.loss import cacr_moco_loss
from cacr.methods.base import METHODS
from cacr.methods.moco import MomentumCACR, momentum_at

MODEL = dict(arch="narrow_resnet", small_images=True, width=4, norm="batch", head="moco",
             head_hidden=16, head_out=8, predictor_hidden=16)


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def make(targets="light", base=0.9, cosine=True, **model):
    torch.manual_seed(0)
    return METHODS["cacr_moco"]({**MODEL, **model}, dict(temperature=0.5, targets=targets),
                                momentum=dict(base=base, cosine=cosine), num_views=2)


def views(n=4, local=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(2, n, 3, 16, 16, generator=g)]
    if local:
        out.append(torch.randn(local, n, 3, 8, 8, generator=g))
    return out


def test_cosine_schedule():
    assert momentum_at(0.0, 0.99) == pytest.approx(0.99)
    assert momentum_at(1.0, 0.99) == pytest.approx(1.0)
    assert momentum_at(0.5, 0.99) == pytest.approx(1 - 0.5 * 0.01)
    assert momentum_at(0.25, 0.996) == pytest.approx(1 - 0.5 * (1 + math.cos(math.pi / 4)) * 0.004)
    assert momentum_at(0.7, 0.99, cosine=False) == 0.99


def test_ema_runs_at_the_start_of_forward_with_the_recorded_progress():
    m = make(base=0.8)
    opt = torch.optim.SGD(m.trainable_parameters(), lr=0.5)
    m(views()).loss.backward()
    opt.step()
    m.after_step(0.5)                                          # next forward uses m(0.5) = 0.9
    old_t = [p.detach().clone() for p in m.target_backbone.parameters()]
    online = [p.detach().clone() for p in m.online_backbone.parameters()]
    assert m.momentum() == pytest.approx(0.9)
    m(views(seed=1))
    for t, t0, o in zip(m.target_backbone.parameters(), old_t, online):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * o)
    assert m.after_step(0.6)["momentum"] == pytest.approx(0.9)
    m.eval()
    before = [p.detach().clone() for p in m.target_projector.parameters()]
    with torch.no_grad():
        m(views(seed=2))                                       # eval forward: no EMA
    assert all(torch.equal(a, b) for a, b in zip(before, m.target_projector.parameters()))


def test_keys_have_no_gradient_and_target_is_not_trained():
    m = make()
    out = m(views())
    out.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in m.target_backbone.parameters())
    ids = {id(p) for p in m.trainable_parameters()}
    assert not ids & {id(p) for p in m.target_projector.parameters()}
    assert ids >= {id(p) for p in m.predictor.parameters()}
    assert m.online_backbone.layer1[0].conv1.weight.grad is not None
    assert m.backbone is m.online_backbone


@pytest.mark.parametrize("targets,local", [("light", 2), ("full", 2), ("full", 0)])
def test_loss_is_cacr_moco_on_online_queries_and_target_keys(targets, local):
    m = make(targets=targets)
    v = views(local=local)
    out = m(v)
    q = m.last_embeddings()
    V = 2 + local
    assert q.shape == (V, 4, 8) and not q.requires_grad
    A = 2 if targets == "light" else V
    flat = [g[i] for g in v for i in range(g.shape[0])][:A]
    with torch.no_grad():
        k = torch.stack([F.normalize(m.target_projector(m.target_backbone(x)), dim=-1) for x in flat])
    ref = cacr_moco_loss(q, k, temperature=0.5)
    torch.testing.assert_close(out.loss.detach(), ref.loss)
    assert -1 <= m.after_step(0.1)["key_query_alignment"] <= 1


def test_state_dict_restores_target_and_schedule_position():
    m = make()
    m(views()).loss.backward()
    m.after_step(0.37)
    fresh = make()
    fresh.load_state_dict(m.state_dict())
    assert fresh.momentum() == pytest.approx(m.momentum()) and fresh.momentum() != pytest.approx(0.9)
    for a, b in zip(fresh.target_backbone.parameters(), m.target_backbone.parameters()):
        assert torch.equal(a, b)


def test_zero_init_residual_and_spec():
    m = make(zero_init_residual=True)
    assert float(m.online_backbone.layer1[0].bn2.weight.detach().abs().sum()) == 0.0
    assert make(zero_init_residual=False).online_backbone.layer1[0].bn2.weight.abs().sum() > 0
    assert m.backbone_spec() == {"arch": "narrow_resnet", "small_images": True, "width": 4, "norm": "batch"}


def test_config_errors():
    with pytest.raises(ValueError, match="model.head=moco"):
        METHODS["cacr_moco"]({**MODEL, "head": "mlp"}, {})
    with pytest.raises(ValueError, match="targets"):
        MomentumCACR(spec=dict(arch="narrow_resnet", width=4), targets="all")
    m = make()
    with pytest.raises(ValueError, match="2 global crops"):
        m([torch.randn(1, 4, 3, 16, 16), torch.randn(2, 4, 3, 8, 8)])
