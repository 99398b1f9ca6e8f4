"""What rank 0 watches during training: TensorBoard scalars/images/HParams and the kNN monitor.

Event files are written to a local directory and, when the run directory is remote (s3://),
uploaded after every epoch and at the end, so ``tensorboard --logdir s3://…`` sees them too.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cacr.augment_config import AugmentConfig


def eval_tensor(images: torch.Tensor, aug: AugmentConfig) -> torch.Tensor:
    """uint8 (B, H, W, C) -> normalised float (B, 3, crop, crop), no randomness: resize the short
    side to ``crop_size`` (bilinear, antialiased; the long side keeps the aspect ratio), then
    center-crop ``crop_size`` x ``crop_size``. Images already ``crop_size`` square pass unchanged.

    This is what backbone.json's ``preprocessing.resize`` tells users of an export. (It is not
    the ImageNet "resize to crop / 0.875" recipe: the monitor sees the whole short side.)"""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[-2:]
    c = aug.crop_size
    if min(h, w) != c:
        scale = c / min(h, w)
        x = F.interpolate(x, size=(max(c, round(h * scale)), max(c, round(w * scale))),
                          mode="bilinear", antialias=True, align_corners=False)
        h, w = x.shape[-2:]
    if (h, w) != (c, c):
        top, left = (h - c) // 2, (w - c) // 2
        x = x[:, :, top:top + c, left:left + c]
    mean = torch.tensor(aug.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(aug.std, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, images: torch.Tensor, aug: AugmentConfig,
                     device: torch.device, batch_size: int = 512) -> torch.Tensor:
    """Pooled features of uint8 images through ``backbone`` (a method's ``backbone``: its forward
    gives the features), in eval mode, without augmentation (:func:`eval_tensor`)."""
    was_training = backbone.training
    backbone.eval()
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = eval_tensor(images[i:i + batch_size].to(device), aug)
        out.append(backbone(x).float().cpu())
    backbone.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def embedding_stats(z: torch.Tensor) -> dict[str, float]:
    """Collapse alarm: per-dimension std of normalised embeddings. Healthy ≈ 1/sqrt(D); a
    collapsed encoder drives it to 0."""
    flat = z.detach().float().reshape(-1, z.shape[-1])
    std = flat.std(dim=0)
    return {"embedding/std_mean": float(std.mean()), "embedding/std_min": float(std.min()),
            "embedding/std_healthy": 1.0 / math.sqrt(z.shape[-1])}


def denormalise_grid(views: torch.Tensor, aug: AugmentConfig, max_images: int = 8) -> torch.Tensor:
    """(V, B, 3, H, W) normalised views -> one (3, H', W') grid: a row per image, a column per view."""
    from torchvision.utils import make_grid

    v, b = views.shape[:2]
    b = min(b, max_images)
    x = views[:, :b].detach().float().cpu().transpose(0, 1).reshape(b * v, *views.shape[2:])
    mean = torch.tensor(aug.mean).view(1, 3, 1, 1)
    std = torch.tensor(aug.std).view(1, 3, 1, 1)
    return make_grid((x * std + mean).clamp(0, 1), nrow=v, padding=1)


class TensorBoard:
    """Rank-0 TensorBoard writer that mirrors its event files to a remote run directory."""

    def __init__(self, logdir_url: str, storage_cfg=None, run_name: str | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.url = logdir_url
        from pipeline import storage

        self.remote = storage.is_remote(logdir_url)
        self.storage_cfg = storage_cfg
        if self.remote:
            from pipeline.checkpoint import run_temp_dir

            self._tmp = run_temp_dir(run_name, "tb")  # named after the run: found if we are killed
            local = self._tmp
        else:
            local = logdir_url
            Path(local).mkdir(parents=True, exist_ok=True)
        self.local = local
        self.writer = SummaryWriter(log_dir=local, flush_secs=30)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            if v is not None:
                self.writer.add_scalar(k, v, step)

    def image(self, tag: str, img: torch.Tensor, step: int) -> None:
        self.writer.add_image(tag, img, step)

    def hparams(self, hparams: dict[str, Any], metric_tags: list[str]) -> None:
        """HParams plugin records written into this same run (not a sub-run), so a search directory
        shows one row per trial; metric values come from the scalar series named ``metric_tags``."""
        from torch.utils.tensorboard.summary import hparams as hp_summary

        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                 for k, v in hparams.items() if v is not None}
        exp, ssi, sei = hp_summary(clean, {tag: 0.0 for tag in metric_tags})
        from pipeline.ray_compat import tb_file_writer

        fw = tb_file_writer(self.writer)
        for s in (exp, ssi):  # session end is not written: the run may still be resumed
            fw.add_summary(s)

    def sync(self) -> None:
        self.writer.flush()
        if self.remote:
            from pipeline import storage

            fs, path = storage.fsspec_fs(self.url, self.storage_cfg)
            for f in Path(self.local).rglob("*"):
                if f.is_file():  # event files are append-only: re-upload the whole (small) file
                    fs.put_file(str(f), path.rstrip("/") + "/" + f.relative_to(self.local).as_posix())

    def close(self) -> None:
        self.sync()
        self.writer.close()
        if self.remote:
            shutil.rmtree(self._tmp, ignore_errors=True)
