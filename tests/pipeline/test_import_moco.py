"""`cacr import`: checkpoints built here in the authors' MoCo-v3 layout (no download) become exports
that load back into the same online backbone; bad inputs end in one line."""
import json

import pytest
import torch

from cacr.heads import moco_predictor, moco_projector
from cacr.model import build_backbone
from pipeline.cli import main
from pipeline.export import load_backbone


def _moco_v3_checkpoint(path, arch, head_key):
    torch.manual_seed(0)
    online = build_backbone(arch, small_images=False)
    kind = "vit" if arch.startswith("vit") else "resnet"
    proj = moco_projector(kind, online.feature_dim, hidden=32, out_dim=8)
    sd = {}
    for prefix, net in (("base_encoder", online), ("momentum_encoder", build_backbone(arch, small_images=False))):
        sd.update({f"module.{prefix}.{k}": v for k, v in net.state_dict().items()})
        sd.update({f"module.{prefix}.{head_key}.{k}": v for k, v in proj.state_dict().items()})
    sd.update({f"module.predictor.{k}": v for k, v in moco_predictor(kind, 8, hidden=32).state_dict().items()})
    torch.save({"epoch": 300, "arch": arch, "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}, path)
    return online.eval()


@pytest.mark.parametrize("arch,head_key", [("resnet18", "fc"), ("vit_small", "head")])
def test_import_roundtrip(tmp_path, capsys, arch, head_key):
    online = _moco_v3_checkpoint(tmp_path / "ckpt.pth.tar", arch, head_key)
    assert main(["import", str(tmp_path / "ckpt.pth.tar"), str(tmp_path / "out")]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["arch"] == arch and line["encoder"].startswith("online")
    net, meta = load_backbone(tmp_path / "out")
    assert meta["backbone"]["arch"] == arch and meta["trained"]["epochs"] == 300
    assert meta["feature_dim"] == online.feature_dim
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x), online(x))          # the ONLINE encoder, not the momentum one


def test_bad_inputs_are_one_line(tmp_path, capsys):
    torch.save({"model": {"x": torch.zeros(1)}}, tmp_path / "ours.pt")
    assert main(["import", str(tmp_path / "ours.pt"), str(tmp_path / "o")]) == 2
    assert "not in the MoCo-v3 layout" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main(["import", str(tmp_path / "junk.pt"), str(tmp_path / "o")]) == 2
    assert "weights_only=True" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "missing.pt"), str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
