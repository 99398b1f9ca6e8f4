"""`cacr export CHECKPOINT OUT`: the pretrained backbone as safetensors + a JSON with architecture
and preprocessing. CHECKPOINT and OUT may each be local or ``s3://``.

    OUT/backbone.safetensors   state_dict of the method's ``backbone``: a plain torchvision ResNet
                               whose ``fc`` is ``nn.Identity`` (output: pooled features, 512-d for
                               resnet18), or a ViT of ``cacr.vit`` (the class token's features)
    OUT/backbone.json          {"backbone": the checkpoint's backbone spec {arch, small_images,
                                width, norm[, depth]}, "network": which network that is (for
                                cacr_moco / cacr_queue the ONLINE backbone), "feature_dim",
                                "preprocessing": {image_size, crop_size, mean, std, ...},
                                "trained": {epochs, steps, loss, metrics}, "weights_sha256", "load"}

Loading an export into stock torchvision (resnet18/34/50; no cacr package, no pickle)::

    import json, torch, torchvision
    from safetensors.torch import load_file

    meta = json.load(open("export/backbone.json"))
    net = torchvision.models.resnet18(weights=None)          # meta["backbone"]["arch"]
    if meta["backbone"]["small_images"]:                      # CIFAR-style stem (32-px images)
        net.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = torch.nn.Identity()
    net.fc = torch.nn.Identity()
    net.load_state_dict(load_file("export/backbone.safetensors"))
    net.eval()
    # input: RGB float32 NCHW, pixels / 255, center crop of meta["preprocessing"]["crop_size"],
    # normalised with meta["preprocessing"]["mean"] / ["std"]; output: (B, 512) features

(``norm: "group"`` / ``"none"`` exports need the matching ``norm_layer``; "narrow_resnet" and the
ViTs have no stock torchvision builder.) For every architecture the one-liner is
``cacr.model.build_backbone(**meta["backbone"])`` (alias ``build_torchvision_backbone``) +
``load_state_dict``, which is what :func:`load_backbone` does (it also reads ``s3://`` exports);
``meta["load"]`` spells out the lines for the exported architecture.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from pipeline.errors import CacrError

WEIGHTS = "backbone.safetensors"
META = "backbone.json"
FORMAT = "cacr-backbone/1"


class ExportError(CacrError, ValueError):
    """An export that cannot be written or read (user error: one-line message)."""


def read_checkpoint(url: str, storage_cfg=None) -> dict[str, Any]:
    """:func:`pipeline.checkpoint.load_checkpoint` for the commands: its one-line error never
    passes on PyTorch's advice to re-run ``torch.load`` with ``weights_only=False`` (that would
    execute whatever a pickle holds) nor a bare unpickling detail such as ``KeyError: 101``."""
    from pipeline.checkpoint import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(url, storage_cfg)
    except CheckpointError as e:
        msg = str(e)
        if "weights_only" in msg or "Weights only" in msg or "KeyError" in msg:
            head = msg.split(" (", 1)[0]
            raise CheckpointError(f"{head} (not a PyTorch checkpoint written by `cacr train`, or a "
                                  "damaged one; cacr only reads tensors, never pickled code)") from None
        raise


def backbone_state(state: dict[str, Any]) -> dict[str, Any]:
    """The ``backbone.*`` tensors of a checkpoint's model, prefix stripped, contiguous, on CPU."""
    prefix = "backbone."
    model = state.get("model")
    if not isinstance(model, dict):
        from pipeline.checkpoint import CheckpointError
        raise CheckpointError("checkpoint has no model state_dict")
    out = {k[len(prefix):]: v.detach().cpu().contiguous() for k, v in model.items()
           if k.startswith(prefix)}
    if not out:
        from pipeline.checkpoint import CheckpointError
        raise CheckpointError("checkpoint has no backbone weights (keys 'backbone.*')")
    return out


def stored_spec(state: dict[str, Any]) -> dict[str, Any]:
    """The backbone spec of a checkpoint: the one the run stored (``backbone_spec``, what the
    method was built with), else, for checkpoints written before it was stored (and imports),
    :func:`cacr.model.backbone_spec` of the stored config, the same function the run used."""
    from cacr.model import backbone_spec

    spec = state.get("backbone_spec")
    if isinstance(spec, dict) and spec.get("arch"):
        return dict(spec)
    try:
        return backbone_spec(state["config"]["model"])
    except (KeyError, TypeError, AttributeError) as e:
        from pipeline.checkpoint import CheckpointError
        raise CheckpointError(f"checkpoint config lacks {e}: not written by cacr train") from None


def rebuild_backbone(weights: dict[str, Any], spec: dict[str, Any]):
    """The exported network rebuilt from ``spec`` with ``weights`` loaded strictly (eval mode);
    weights that do not fit are a one-line CheckpointError, said on the driver."""
    from cacr.model import build_backbone
    from pipeline.checkpoint import CheckpointError

    try:
        net = build_backbone(**spec)
        net.load_state_dict(weights, strict=True)
    except (RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint weights do not match its backbone {spec} "
                              f"({str(e).splitlines()[0][:200]})") from None
    return net.eval()


def _load_lines(backbone: dict[str, Any]) -> list[str]:
    """How to load the export: stock torchvision lines where they suffice (resnet18/34/50 with
    BatchNorm), else the cacr builder (narrow_resnet, other norms, every ViT)."""
    from cacr.archs import RESNET_ARCHS

    arch = backbone["arch"]
    if arch not in RESNET_ARCHS:
        return ["from cacr.model import build_backbone", "from safetensors.torch import load_file",
                "net = build_backbone(**meta['backbone'])",
                f"net.load_state_dict(load_file('{WEIGHTS}')); net.eval()"]
    if arch == "narrow_resnet" or backbone["norm"] != "batch":
        return ["from cacr.model import build_torchvision_backbone",
                "from safetensors.torch import load_file",
                "net = build_torchvision_backbone(**meta['backbone'])",
                f"net.load_state_dict(load_file('{WEIGHTS}')); net.eval()"]
    lines = ["import torch, torchvision", "from safetensors.torch import load_file",
             f"net = torchvision.models.{arch}(weights=None)"]
    if backbone["small_images"]:
        lines += ["net.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)",
                  "net.maxpool = torch.nn.Identity()"]
    return lines + ["net.fc = torch.nn.Identity()", f"net.load_state_dict(load_file('{WEIGHTS}')); net.eval()"]


def _exported_network(loss: str) -> str:
    """Which of the method's networks the export holds (momentum methods: the ONLINE backbone)."""
    from cacr.methods import METHOD_CLASSES

    cls = METHOD_CLASSES.get(loss)
    return cls.exported_network if cls is not None else "backbone"


def export_metadata(state: dict[str, Any]) -> dict[str, Any]:
    cfg = state["config"]
    try:
        a, d = cfg["augment"], cfg["data"]
        pre = {"image_size": d["image_size"], "crop_size": a["crop_size"], "mean": list(a["mean"]),
               "std": list(a["std"]), "scale": "pixels / 255", "layout": "NCHW float32, RGB",
               "resize": "short side to crop_size (bilinear, antialias), then center crop"}
        loss = cfg["loss"]["name"]
    except (KeyError, TypeError) as e:
        from pipeline.checkpoint import CheckpointError
        raise CheckpointError(f"checkpoint config lacks {e}: not written by cacr train") from None
    backbone = stored_spec(state)
    return {
        "format": FORMAT,
        "backbone": backbone,
        "network": _exported_network(loss),
        "preprocessing": pre,
        "trained": {"epochs": state.get("epoch"), "steps": state.get("step"), "loss": loss,
                    "metrics": state.get("metrics", {})},
        "load": _load_lines(backbone),
    }


def export_backbone(checkpoint: str | Path | dict[str, Any], out_url: str, storage_cfg=None) -> str:
    """Write ``backbone.safetensors`` + ``backbone.json`` under ``out_url`` (local dir or s3://);
    returns the weights URL. ``checkpoint`` is a checkpoint URL/path or a loaded state dict."""
    from safetensors.torch import save_file

    state = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(str(checkpoint), storage_cfg)
    weights, meta = backbone_state(state), export_metadata(state)
    # rebuilt once: the weights must fit the spec before anything is written
    feature_dim = int(rebuild_backbone(weights, meta["backbone"]).feature_dim)
    out_url = str(out_url)
    with tempfile.TemporaryDirectory() as tmp:
        wpath = Path(tmp) / WEIGHTS
        # one metadata key: safetensors writes its header from a hash map, so several keys would make
        # the bytes (and weights_sha256) differ between two exports of the same checkpoint
        save_file(weights, str(wpath), metadata={"format": f"{FORMAT} {meta['backbone']['arch']}"})
        meta["feature_dim"] = feature_dim
        meta["weights_sha256"] = hashlib.sha256(wpath.read_bytes()).hexdigest()
        (Path(tmp) / META).write_text(json.dumps(meta, indent=2))
        from pipeline import storage

        if storage.is_remote(out_url):
            fs, path = storage.fsspec_fs(out_url, storage_cfg)
            try:
                fs.makedirs(path, exist_ok=True)
                for name in (WEIGHTS, META):
                    fs.put_file(str(Path(tmp) / name), path.rstrip("/") + "/" + name)
            except Exception as e:  # noqa: BLE001 - endpoint / bucket / credentials: one line
                raise storage.classify_s3_error(e, out_url, storage_cfg) from None
        else:
            out = Path(out_url)
            if out.exists() and not out.is_dir():
                raise ExportError(f"export target '{out_url}' is a file: pass a directory")
            out.mkdir(parents=True, exist_ok=True)
            for name in (WEIGHTS, META):
                (out / name).write_bytes((Path(tmp) / name).read_bytes())
    return storage.join_url(out_url, WEIGHTS)


def load_backbone(directory: str | Path, storage_cfg=None):
    """Load an export (local dir or s3://) into its backbone (a torchvision ResNet or a cacr ViT)
    in eval mode -> (net, meta)."""
    from safetensors.torch import load_file

    from cacr.model import build_torchvision_backbone

    from pipeline import storage

    url = str(directory)
    with tempfile.TemporaryDirectory() as tmp:
        if storage.is_remote(url):
            fs, path = storage.fsspec_fs(url, storage_cfg)
            try:
                for name in (META, WEIGHTS):
                    fs.get_file(path.rstrip("/") + "/" + name, str(Path(tmp) / name))
            except FileNotFoundError:
                raise ExportError(f"no cacr export at '{url}' ({META} + {WEIGHTS})") from None
            local = Path(tmp)
        else:
            local = Path(url)
        if not (local / META).is_file() or not (local / WEIGHTS).is_file():
            raise ExportError(f"no cacr export at '{url}' ({META} + {WEIGHTS})")
        meta = json.loads((local / META).read_text())
        net = build_torchvision_backbone(**meta["backbone"])
        net.load_state_dict(load_file(str(local / WEIGHTS)), strict=True)
    return net.eval(), meta


def run_export(args: argparse.Namespace) -> int:
    """CLI entry: the checkpoint (or a run dir's newest) and the target are checked up front;
    the printed paths are absolute (or s3:// URLs)."""
    from pipeline import storage
    from pipeline.data.commands import storage_from_args
    from pipeline.evaluate import resolve_checkpoint

    storage_cfg = storage_from_args(args)
    out = storage.resolve_url(str(args.out))
    ckpt = resolve_checkpoint(str(args.checkpoint), storage_cfg)
    storage.check_writable(out, storage_cfg)
    path = export_backbone(ckpt, out, storage_cfg)
    print(json.dumps({"backbone": path, "meta": storage.join_url(out, META)}), flush=True)
    return 0
