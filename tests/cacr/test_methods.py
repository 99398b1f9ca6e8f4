"""cacr.methods: the registry and the two symmetric methods (cacr, infonce) as nn.Modules.

What the trainer relies on: a method built by name from the config dicts computes exactly the
loss of cacr/loss.py on its own network's embeddings (several crop sizes concatenated along V),
exports its backbone, and its state_dict - in today's layout and in the layout of checkpoints
written before methods existed - restores it.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from cacr.loss import cacr_loss, infonce_loss
from cacr.methods import METHODS, Method, build_method
from cacr.model import CACRModel, build_torchvision_backbone

MODEL = {"arch": "narrow_resnet", "small_images": True, "width": 4, "norm": "batch", "head_hidden": 16,
         "head_out": 8, "head_layers": 2, "sync_batchnorm": False}
LOSS = {"name": "cacr", "num_positives": 2, "alpha": 0.7, "beta": 1.3, "tau_pos": 2.0, "tau_neg": 0.5,
        "detach_weights": False, "same_view_negatives": True, "temperature": 0.3}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _method(name: str, seed: int = 0) -> Method:
    torch.manual_seed(seed)
    return build_method(name, model=MODEL, loss=LOSS, num_views=3, momentum={"unused": 1})


def _plain_model(seed: int = 0) -> CACRModel:
    torch.manual_seed(seed)
    return CACRModel("narrow_resnet", small_images=True, width=4, norm="batch", head_hidden=16,
                     head_out=8, head_layers=2)


def _views(*shapes) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(*s, generator=g) for s in shapes]


def test_registry_builds_both_methods_and_names_the_known_ones():
    assert {"cacr", "infonce"} <= set(METHODS)
    for name in ("cacr", "infonce"):
        m = _method(name)
        assert isinstance(m, Method) and m.name == name
    with pytest.raises(ValueError, match="cacr.*infonce"):
        build_method("triplet", model=MODEL, loss=LOSS)


@pytest.mark.parametrize("name", ["cacr", "infonce"])
def test_forward_is_the_loss_of_cacr_loss_on_its_embeddings(name):
    """Same seed -> same weights as a plain CACRModel; the method's loss is the loss function's
    value on that model's (V, n, D) embeddings with the config's loss parameters."""
    method, plain = _method(name).eval(), _plain_model().eval()
    (views,) = _views((3, 4, 3, 16, 16))
    out = method(views)
    z = plain(views.flatten(0, 1)).view(3, 4, -1)
    want = (cacr_loss(z, alpha=0.7, beta=1.3, tau_pos=2.0, tau_neg=0.5, same_view_negatives=True)
            if name == "cacr" else infonce_loss(z, temperature=0.3))
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.repulsion, want.repulsion, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(method.last_embeddings(), z.detach())
    assert not method.last_embeddings().requires_grad
    assert method.after_step(0.5) == {}


def test_several_crop_sizes_are_embedded_per_group_and_concatenated_along_v():
    method, plain = _method("cacr").eval(), _plain_model().eval()
    glob, loc = _views((2, 4, 3, 16, 16), (3, 4, 3, 8, 8))
    out = method([glob, loc])
    z = torch.cat([plain(glob.flatten(0, 1)).view(2, 4, -1), plain(loc.flatten(0, 1)).view(3, 4, -1)])
    assert method.last_embeddings().shape == (5, 4, 8)
    torch.testing.assert_close(method.last_embeddings(), z)
    want = cacr_loss(z, alpha=0.7, beta=1.3, tau_pos=2.0, tau_neg=0.5, same_view_negatives=True)
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-6, atol=1e-6)
    out.loss.backward()  # one graph through both groups
    assert all(p.grad is not None for p in method.trainable_parameters())


def test_views_of_different_batch_sizes_are_refused():
    with pytest.raises(ValueError, match="same batch"):
        _method("cacr")(_views((2, 4, 3, 16, 16), (2, 3, 3, 8, 8)))


def test_backbone_and_model_state_load_into_the_exported_architecture():
    from pipeline.export import backbone_state

    method = _method("cacr")
    spec = method.backbone_spec()
    assert spec == {"arch": "narrow_resnet", "small_images": True, "width": 4, "norm": "batch"}
    state = method.model_state()
    assert {k.split(".")[0] for k in state} == {"backbone", "head"}  # the checkpoint layout of old
    net = build_torchvision_backbone(**spec)
    net.load_state_dict(backbone_state({"model": state}), strict=True)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(net.eval()(x), method.backbone.eval()(x))


def test_state_dict_round_trip_and_the_pre_method_checkpoint_layout():
    """A resume restores every weight and buffer; a checkpoint written before methods existed
    (CACRModel state: backbone.* / head.*) loads too."""
    src = _method("cacr", seed=0)
    with torch.no_grad():  # non-trivial BatchNorm statistics
        src.train()(_views((3, 4, 3, 16, 16)))
    for state in (src.state_dict(), src.model.state_dict()):
        dst = _method("cacr", seed=1)
        dst.load_state_dict(state)
        for (k, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
            torch.testing.assert_close(a, b, msg=k)
    with pytest.raises(RuntimeError):  # strict: a foreign state is not silently half-loaded
        _method("cacr").load_state_dict({"backbone.nope": torch.zeros(1)})


def test_methods_package_imports_no_ray():
    code = "import sys, cacr.methods; sys.exit(1 if any(m.split('.')[0] == 'ray' for m in sys.modules) else 0)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
