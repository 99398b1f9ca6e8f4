"""The momentum-encoder presets: load and validate offline, fit the clusters they name, and run ONE
tiny training step (sizes overridden) through the method they configure -- at the cacr level."""
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import load_config, to_dict

ROOT = Path(__file__).resolve().parents[2]
TINY = ["data.image_size=32", "augment.crop_size=32", "model.head_hidden=16", "model.head_out=8",
        "model.predictor_hidden=16", "model.vit_depth=1", "batch_size=2"]


def _aws_gpus():
    nodes = yaml.safe_load((ROOT / "infra" / "cluster" / "aws.yaml").read_text())["available_node_types"]
    return sum(v["resources"].get("GPU", 0) * v.get("max_workers", 0) for v in nodes.values())


@pytest.mark.parametrize("name,arch,opt,m0,temp", [
    ("imagenet-r50-moco", "resnet50", "lars", 0.996, 1.0),
    ("imagenet-vitb-moco", "vit_base", "adamw", 0.99, 0.2),
])
def test_imagenet_preset_loads_and_runs_one_tiny_step(name, arch, opt, m0, temp):
    from cacr.methods.base import METHODS
    import cacr.methods.moco  # noqa: F401  (registers cacr_moco)
    from cacr.optim import build_optimizer

    cfg = load_config(ROOT / "conf" / f"{name}.yaml")
    assert (cfg.loss.name, cfg.model.arch, cfg.optim.name) == ("cacr_moco", arch, opt)
    assert (cfg.momentum.base, cfg.loss.temperature, cfg.global_batch, cfg.num_views) == (m0, temp, 4096, 2)
    assert cfg.use_gpu and cfg.num_workers <= _aws_gpus()
    cfg = load_config(ROOT / "conf" / f"{name}.yaml", TINY)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    method = METHODS["cacr_moco"](to_dict(cfg.model), to_dict(cfg.loss), momentum=to_dict(cfg.momentum),
                                  num_views=cfg.num_views)
    optimizer = build_optimizer(cfg.optim.name, method, lr=0.1, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay)
    out = method([torch.randn(2, 2, 3, 32, 32)])
    out.loss.backward()
    optimizer.step()
    logs = method.after_step(0.5)
    assert torch.isfinite(out.loss) and logs["momentum"] == pytest.approx(m0)
    assert method.momentum() > m0


def test_digits_moco_preset_loads():
    cfg = load_config(ROOT / "conf" / "digits-moco.yaml")
    assert cfg.loss.name == "cacr_moco" and cfg.model.head == "moco" and cfg.num_views == 2
    assert not cfg.use_gpu and cfg.data.source == "digits"


def test_cacr_moco_needs_moco_heads():
    from pipeline.config import ConfigError
    with pytest.raises(ConfigError, match="model.head=moco"):
        load_config(None, ["loss.name=cacr_moco"])
