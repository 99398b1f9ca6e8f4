"""`cacr import CHECKPOINT OUT`: the authors' released MoCo-v3-layout checkpoints (momentum-encoder
CACR / MoCo v3 on ImageNet) as a cacr export (``backbone.safetensors`` + ``backbone.json``, the
format of ``pipeline.export``, written by its ``export_backbone``).

The input is a ``torch.save``-d dict whose ``state_dict`` holds::

    module.base_encoder.*       online backbone (+ projector: ``fc.*`` for ResNets, ``head.*`` for ViTs)
    module.momentum_encoder.*   momentum copy (ignored: the export is the ONLINE backbone)
    module.predictor.*          predictor (ignored)

It is read with ``torch.load(weights_only=True)`` (no pickle code runs).  The architecture is
recognised from the tensors (ResNet-18/34/50 from the block layout; ViT-S/B from the width, 12
blocks), the weights are loaded STRICTLY into ``cacr.model.build_backbone`` (so a layout we do not
reproduce fails here with a clear message, never later), and the result records where it came from.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

PREFIX = "module.base_encoder."
HEAD_PREFIXES = ("fc.", "head.")
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _error(msg: str) -> Exception:
    from pipeline.checkpoint import CheckpointError
    return CheckpointError(msg)


def read_moco_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(online backbone tensors without the projector, the whole checkpoint dict)."""
    import pickle

    import torch

    p = Path(path)
    if not p.is_file():
        raise _error(f"checkpoint '{path}' does not exist")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise _error(f"'{path}' is not a torch checkpoint loadable with weights_only=True: "
                     f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    sd = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not any(k.startswith(PREFIX) for k in sd):
        raise _error(f"'{path}' is not in the MoCo-v3 layout (no 'state_dict' with '{PREFIX}*' keys)")
    backbone = {k[len(PREFIX):]: v for k, v in sd.items()
                if k.startswith(PREFIX) and not k[len(PREFIX):].startswith(HEAD_PREFIXES)}
    return backbone, ckpt


def detect_arch(weights: dict[str, Any]) -> str:
    """ResNet-18/34/50 or ViT-S/B (patch 16, 12 blocks) from tensor names and shapes."""
    if "patch_embed.proj.weight" in weights:
        width = int(weights["patch_embed.proj.weight"].shape[0])
        depth = len({m.group(1) for k in weights if (m := re.match(r"blocks\.(\d+)\.", k))})
        arch = {384: "vit_small", 768: "vit_base"}.get(width)
        if arch is None or depth != 12 or tuple(weights["patch_embed.proj.weight"].shape[2:]) != (16, 16):
            raise _error(f"unsupported ViT: width {width}, {depth} blocks (vit_small 384 / vit_base 768, "
                         "12 blocks, patch 16)")
        return arch
    if "conv1.weight" in weights and "layer4.0.conv1.weight" in weights:
        blocks = [len({m.group(1) for k in weights if (m := re.match(rf"layer{i}\.(\d+)\.", k))})
                  for i in range(1, 5)]
        bottleneck = "layer1.0.conv3.weight" in weights
        arch = {(True, (3, 4, 6, 3)): "resnet50", (False, (3, 4, 6, 3)): "resnet34",
                (False, (2, 2, 2, 2)): "resnet18"}.get((bottleneck, tuple(blocks)))
        if arch is None:
            raise _error(f"unsupported ResNet layout: blocks {blocks}, bottleneck={bottleneck}")
        return arch
    raise _error("base_encoder is neither a ResNet (conv1, layer1-4) nor a ViT (patch_embed)")


def import_moco(checkpoint: str | Path, out_url: str, storage_cfg=None) -> dict[str, Any]:
    """Convert and write the export; returns ``{"backbone": weights URL, "arch": ...}``."""
    from cacr.model import build_backbone
    from pipeline.config import Config, to_dict
    from pipeline.export import export_backbone

    weights, ckpt = read_moco_checkpoint(checkpoint)
    arch = detect_arch(weights)
    net = build_backbone(arch, small_images=False)
    missing, unexpected = net.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise _error(f"{arch} weights do not match cacr's {arch}: missing {sorted(missing)[:4]}, "
                     f"unexpected {sorted(unexpected)[:4]}")
    cfg = Config()
    cfg.model.arch, cfg.model.small_images = arch, False
    cfg.data.image_size = cfg.augment.crop_size = 224
    cfg.augment.mean, cfg.augment.std = tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)
    cfg.loss.name = "cacr_moco"
    state = {"model": {f"backbone.{k}": v for k, v in net.state_dict().items()},
             "config": to_dict(cfg), "epoch": ckpt.get("epoch"), "step": None,
             "metrics": {"imported_from": Path(str(checkpoint)).name}}
    url = export_backbone(state, out_url, storage_cfg)
    return {"backbone": url, "arch": arch, "epoch": ckpt.get("epoch"),
            "encoder": "online (module.base_encoder; momentum encoder and predictor dropped)"}


def run_import(args: argparse.Namespace) -> int:
    from pipeline.config import StorageConfig

    print(json.dumps(import_moco(args.checkpoint, str(args.out), StorageConfig())), flush=True)
    return 0
