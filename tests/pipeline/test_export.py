"""`cacr export`: safetensors + JSON that load into plain torchvision and give the checkpoint's
features; local and s3:// checkpoints and outputs; one-line errors for bad checkpoints."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config, to_dict

torch.set_num_threads(1)


def _checkpoint(directory: Path, *overrides: str) -> tuple[Path, torch.nn.Module]:
    """An untrained checkpoint written like `cacr train` writes one, with non-trivial BatchNorm
    running statistics (a few train-mode forwards) so that eval-mode features test them too."""
    from pipeline.checkpoint import save_state
    from pipeline.worker import method_from_config

    cfg = load_config(None, ["data.source=null", *overrides])
    torch.manual_seed(0)
    method = method_from_config(cfg)
    model = method.backbone  # its forward gives the pooled features
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, cfg.augment.crop_size, cfg.augment.crop_size) * 2 + 0.5)
    save_state(directory, {"model": method.model_state(), "method": method.state_dict(),
                           "config": to_dict(cfg), "epoch": 3, "step": 30, "metrics": {"knn_top1": 0.5}})
    return directory, model.eval()


def _readme_snippet() -> str:
    """The loading lines of pipeline/export.py's docstring (the README shows the same lines)."""
    import pipeline.export

    doc = pipeline.export.__doc__
    block = doc.split("Loading an export into stock torchvision", 1)[1].split("::\n", 1)[1]
    lines = []
    for line in block.splitlines():
        if line.strip() and not line.startswith("    "):
            break
        lines.append(line)
    return textwrap.dedent("\n".join(lines))


def test_resnet18_export_loads_into_stock_torchvision_with_the_readme_lines(tmp_path):
    from pipeline.export import load_backbone, run_export

    ckpt, model = _checkpoint(tmp_path / "ckpt", "model.arch=resnet18")
    out = tmp_path / "export"
    import argparse
    run_export(argparse.Namespace(checkpoint=str(ckpt), out=str(out)))
    meta = json.loads((out / "backbone.json").read_text())
    assert meta["backbone"] == {"arch": "resnet18", "small_images": True, "width": 16, "norm": "batch"}
    assert meta["feature_dim"] == 512 and meta["trained"]["epochs"] == 3
    assert meta["preprocessing"]["crop_size"] == 32 and len(meta["preprocessing"]["mean"]) == 3
    import hashlib
    assert meta["weights_sha256"] == hashlib.sha256((out / "backbone.safetensors").read_bytes()).hexdigest()

    code = _readme_snippet().replace("export/", f"{out}/")
    assert "torchvision.models.resnet18(weights=None)" in code and "cacr" not in code
    scope: dict = {}
    exec(compile(code, "README-snippet", "exec"), scope)  # noqa: S102 - our own docstring
    net = scope["net"]
    import torchvision
    assert type(net) is torchvision.models.ResNet and not net.training

    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        assert want.shape == (4, 512)
        torch.testing.assert_close(net(x), want, rtol=1e-5, atol=1e-5)
        net2, meta2 = load_backbone(out)
        torch.testing.assert_close(net2(x), want, rtol=1e-5, atol=1e-5)
    assert meta2 == meta


@pytest.mark.slow
def test_export_from_s3_checkpoint_to_s3(s3_bucket, upload_to_s3, tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.export import load_backbone
    from pipeline.storage import fsspec_fs

    ckpt, model = _checkpoint(tmp_path / "ckpt", "model.width=8", "model.norm=group")
    remote_ckpt = upload_to_s3(str(ckpt), f"{s3_bucket}/runs/r1/checkpoint_000002")
    out = f"{s3_bucket}/exports/r1"
    assert main(["export", remote_ckpt, out]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == {"backbone": f"{out}/backbone.safetensors", "meta": f"{out}/backbone.json"}
    fs, path = fsspec_fs(out)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path)) == ["backbone.json", "backbone.safetensors"]
    net, meta = load_backbone(out)
    assert meta["backbone"]["norm"] == "group" and meta["feature_dim"] == 64
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x), rtol=1e-5, atol=1e-5)
    # and an s3 export downloaded to a local directory is the same export
    assert main(["export", remote_ckpt, str(tmp_path / "local")]) == 0
    assert json.loads((tmp_path / "local" / "backbone.json").read_text()) == meta


def _cacr(*args: str):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _one_line_error(r, *words: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cacr: error:"), r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert re.search(w, lines[0]), (w, lines[0])
    return lines[0]


def test_cli_export_bad_checkpoint_and_bad_target(tmp_path):
    no_model = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, no_model)
    _one_line_error(_cacr("export", str(no_model), str(tmp_path / "out")), "lacks model weights")
    assert not (tmp_path / "out").exists()

    ckpt, _ = _checkpoint(tmp_path / "ckpt", "model.width=4")
    (tmp_path / "afile").write_text("x")
    _one_line_error(_cacr("export", str(ckpt), str(tmp_path / "afile")), "is a file")


def _fresh_method(*overrides: str):
    from pipeline.worker import method_from_config

    cfg = load_config(None, ["data.source=null", *overrides])
    torch.manual_seed(0)
    return cfg, method_from_config(cfg).eval()


def _save_run_checkpoint(directory: Path, cfg, method) -> Path:
    """A checkpoint as the worker writes it (pipeline.worker.checkpoint_state's keys, with the
    method's own ``backbone_spec``)."""
    from pipeline.checkpoint import save_state

    save_state(directory, {"model": method.model_state(), "method": method.state_dict(),
                           "backbone_spec": method.backbone_spec(), "config": to_dict(cfg),
                           "epoch": 1, "step": 5, "metrics": {}})
    return directory


def test_vit_export_keeps_depth_and_says_how_to_load_it(tmp_path):
    """A ViT run with model.vit_depth: the export is rebuilt from the checkpoint's stored spec
    (depth included: a 12-block rebuild cannot take 2 blocks' weights), states its feature
    width, and its load lines give the trained network's features."""
    from pipeline.export import export_backbone, load_backbone

    cfg, method = _fresh_method("model.arch=vit_small", "model.vit_depth=2", "model.small_images=false",
                                "model.head_hidden=16", "model.head_out=8")
    ckpt = _save_run_checkpoint(tmp_path / "ckpt", cfg, method)
    out = tmp_path / "export"
    export_backbone(str(ckpt), str(out))
    meta = json.loads((out / "backbone.json").read_text())
    assert meta["backbone"] == {"arch": "vit_small", "small_images": False, "width": 16, "norm": "batch",
                                "depth": 2}
    assert meta["feature_dim"] == 384
    assert meta["network"].startswith("encoder f") and "not exported" in meta["network"]
    assert not any("torchvision.models" in line for line in meta["load"])
    scope: dict = {"meta": meta}
    exec(compile("\n".join(meta["load"]).replace("load_file('backbone.safetensors')",  # noqa: S102
                                                 f"load_file('{out}/backbone.safetensors')"),
                 "backbone.json load", "exec"), scope)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = method.backbone(x)
        torch.testing.assert_close(scope["net"](x), want)
        torch.testing.assert_close(load_backbone(out)[0](x), want)


@pytest.mark.parametrize("name,overrides", [
    ("cacr_moco", ["model.head=moco", "model.predictor_hidden=16"]),
    ("cacr_queue", ["loss.queue_size=16"]),
])
def test_momentum_method_export_is_the_online_backbone_and_says_so(tmp_path, name, overrides):
    from pipeline.export import export_backbone, load_backbone

    cfg, method = _fresh_method(f"loss.name={name}", "model.width=4", "model.head_hidden=16",
                                "model.head_out=8", *overrides)
    # make the momentum copy differ from the online network (after training they always do)
    target = method.target_backbone if name == "cacr_moco" else method.target.backbone
    with torch.no_grad():
        for p in target.parameters():
            p.add_(1.0)
    export_backbone(str(_save_run_checkpoint(tmp_path / "ckpt", cfg, method)), str(tmp_path / "export"))
    net, meta = load_backbone(tmp_path / "export")
    assert meta["network"].startswith("online backbone") and meta["trained"]["loss"] == name
    assert meta["feature_dim"] == 32
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), method.backbone.eval()(x))
        assert not torch.allclose(net(x), target.eval()(x))


def test_stored_spec_wins_and_old_checkpoints_fall_back_to_their_config():
    from cacr.model import backbone_spec
    from pipeline.export import stored_spec

    cfg = to_dict(load_config(None, ["data.source=null", "model.arch=vit_small", "model.vit_depth=3"]))
    # before runs stored their spec: the config's, through the same function the run used
    assert stored_spec({"config": cfg}) == backbone_spec(cfg["model"]) == {
        "arch": "vit_small", "small_images": True, "width": 16, "norm": "batch", "depth": 3}
    stored = {"arch": "vit_small", "small_images": False, "width": 16, "norm": "batch", "depth": 2}
    assert stored_spec({"config": cfg, "backbone_spec": stored}) == stored
