"""`cacr export`: the pretrained backbone as safetensors + a JSON with architecture and preprocessing.

The weights are the state_dict of ``model.backbone``, a plain torchvision ResNet (``fc`` replaced
by ``nn.Identity``), so they load into ``cacr.model.build_torchvision_backbone(**spec)`` — or into
``torchvision.models.resnet18(weights=None)`` with the same stem edits — with ``strict=True``.
No pickle is involved on either side.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

WEIGHTS = "backbone.safetensors"
META = "backbone.json"


def backbone_state(state: dict[str, Any]) -> dict[str, Any]:
    prefix = "backbone."
    out = {k[len(prefix):]: v.detach().cpu().contiguous() for k, v in state["model"].items()
           if k.startswith(prefix)}
    if not out:
        from pipeline.checkpoint import CheckpointError
        raise CheckpointError("checkpoint has no backbone weights (keys 'backbone.*')")
    return out


def export_metadata(state: dict[str, Any]) -> dict[str, Any]:
    cfg = state["config"]
    m, a = cfg["model"], cfg["augment"]
    return {
        "format": "cacr-backbone/1",
        "backbone": {"arch": m["arch"], "small_images": m["small_images"], "width": m["width"],
                     "norm": m["norm"]},
        "preprocessing": {"image_size": cfg["data"]["image_size"], "crop_size": a["crop_size"],
                          "mean": list(a["mean"]), "std": list(a["std"]), "scale": "pixels / 255",
                          "layout": "NCHW float32, RGB"},
        "trained": {"epochs": state.get("epoch"), "steps": state.get("step"),
                    "loss": cfg["loss"]["name"], "metrics": state.get("metrics", {})},
        "load": "cacr.model.build_torchvision_backbone(**backbone).load_state_dict("
                "safetensors.torch.load_file('backbone.safetensors'))",
    }


def export_backbone(checkpoint: str | Path | dict[str, Any], out_url: str, storage_cfg=None) -> str:
    """Write ``backbone.safetensors`` + ``backbone.json`` under ``out_url``; returns the weights URL."""
    from safetensors.torch import save_file

    from pipeline.checkpoint import load_checkpoint

    state = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(str(checkpoint), storage_cfg)
    weights, meta = backbone_state(state), export_metadata(state)
    with tempfile.TemporaryDirectory() as tmp:
        save_file(weights, str(Path(tmp) / WEIGHTS), metadata={"arch": meta["backbone"]["arch"]})
        (Path(tmp) / META).write_text(json.dumps(meta, indent=2))
        if "://" in out_url:
            from pipeline import storage

            fs, path = storage.fsspec_fs(out_url, storage_cfg)
            fs.makedirs(path, exist_ok=True)
            for name in (WEIGHTS, META):
                fs.put(str(Path(tmp) / name), path.rstrip("/") + "/" + name)
        else:
            Path(out_url).mkdir(parents=True, exist_ok=True)
            for name in (WEIGHTS, META):
                (Path(out_url) / name).write_bytes((Path(tmp) / name).read_bytes())
    return out_url.rstrip("/") + "/" + WEIGHTS


def load_backbone(directory: str | Path):
    """Load an export into a plain torchvision ResNet (eval mode). The README shows the same lines."""
    from safetensors.torch import load_file

    from cacr.model import build_torchvision_backbone

    meta = json.loads((Path(directory) / META).read_text())
    net = build_torchvision_backbone(**meta["backbone"])
    net.load_state_dict(load_file(str(Path(directory) / WEIGHTS)), strict=True)
    return net.eval(), meta


def run_export(args: argparse.Namespace) -> int:
    from pipeline.config import StorageConfig

    storage_cfg = StorageConfig()
    path = export_backbone(args.checkpoint, args.out, storage_cfg)
    print(json.dumps({"backbone": path, "meta": args.out.rstrip("/") + "/" + META}))
    return 0
