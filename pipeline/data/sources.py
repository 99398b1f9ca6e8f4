"""Where `cacr prepare` reads images from: ``digits``, an image folder, ``cifar10:PATH``/``cifar100:PATH``.

A :class:`Source` is a list of samples (index -> label) plus a way to produce the stored RGB image of
any index at the stored size. Work for one shard is described by a small picklable *payload*
(pixel arrays for in-memory sources, file paths for folders) so it can run in a Ray task.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.data.format import DataError, fit_square

FOLDER_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


@dataclass
class Source:
    name: str                          # "digits", "folder:/abs/path", "cifar10:/abs/path"
    labels: np.ndarray                 # int64 (N,), -1 when unlabelled
    classes: list[str]                 # class names ([] when unlabelled)
    default_image_size: int
    fixed_splits: dict[str, np.ndarray] | None = None   # e.g. CIFAR's own test batch
    arrays: np.ndarray | None = None   # uint8 (N, h, w, 3) for in-memory sources
    files: list[str] | None = None     # absolute paths for folder sources
    digest_extra: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def labeled(self) -> bool:
        return bool(self.classes)

    def payload(self, indices: np.ndarray) -> dict[str, Any]:
        """Picklable description of the images at ``indices`` for :func:`load_images`."""
        if self.arrays is not None:
            return {"kind": "array", "pixels": self.arrays[indices]}
        return {"kind": "files", "files": [self.files[i] for i in indices]}

    def digest(self) -> str:
        """Identity of the source content (for resuming: same digest -> same shards)."""
        h = hashlib.sha1(self.name.encode())
        h.update(self.labels.tobytes())
        if self.files is not None:
            h.update("\n".join(self.files).encode())
        h.update(self.digest_extra.encode())
        return h.hexdigest()[:16]


def load_images(payload: dict[str, Any], size: int) -> list[np.ndarray | None]:
    """The stored RGB uint8 (size, size, 3) images of a payload; ``None`` for an unreadable file."""
    from PIL import Image
    out: list[np.ndarray | None] = []
    if payload["kind"] == "array":
        for px in payload["pixels"]:
            if px.shape[:2] == (size, size):
                out.append(np.ascontiguousarray(px))
            else:
                mode = "L" if px.shape[2] == 1 else "RGB"
                im = Image.fromarray(px[..., 0] if mode == "L" else px, mode)
                # Small sources (8x8 digits, 32x32 CIFAR) are upscaled smoothly; bilinear is exact
                # and deterministic for the same input.
                im = im.resize((size, size), Image.BILINEAR) if im.size[0] == im.size[1] else fit_square(im, size)
                out.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
        return out
    for path in payload["files"]:
        try:
            with Image.open(path) as im:
                if im.format == "JPEG" and min(im.size) >= 2 * size:
                    im.draft("RGB", (size, size))
                im = fit_square(im.convert("RGB"), size)
                out.append(np.asarray(im, dtype=np.uint8))
        except Exception:  # noqa: BLE001 - unreadable source image: counted by the writer
            out.append(None)
    return out


def digits_source() -> Source:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes): the embedded default data set."""
    from sklearn.datasets import load_digits
    d = load_digits()
    px = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]  # (N, 8, 8, 1)
    return Source("digits", d.target.astype(np.int64), [str(i) for i in range(10)], 32, arrays=px)


def folder_source(path: str) -> Source:
    """One sub-folder per class (searched recursively inside each class), or a flat folder of
    unlabelled images. Sorted, so the same folder always gives the same samples."""
    root = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(root):
        raise DataError(f"source '{path}' is not a directory, 'digits', or cifar10:PATH / cifar100:PATH")

    def is_img(n: str) -> bool:
        return n.lower().endswith(FOLDER_EXTS) and not n.startswith(".")

    subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    classes, files, labels = [], [], []
    for d in subdirs:
        found = []
        for dirpath, dirnames, names in os.walk(os.path.join(root, d)):
            dirnames[:] = sorted(x for x in dirnames if not x.startswith("."))
            found.extend(os.path.join(dirpath, n) for n in sorted(names) if is_img(n))
        if found:
            labels.extend([len(classes)] * len(found))
            classes.append(d)
            files.extend(found)
    if not files:
        files = [os.path.join(root, n) for n in sorted(os.listdir(root)) if is_img(n)]
        labels = [-1] * len(files)
    if not files:
        raise DataError(f"no images ({', '.join(FOLDER_EXTS)}) in '{path}' or its sub-folders")
    return Source(f"folder:{root}", np.asarray(labels, dtype=np.int64), classes, 64, files=files,
                  digest_extra=str(sum(os.path.getsize(f) for f in files)))


def _unpickle_user_file(path: str) -> dict:
    # CIFAR ships as Python pickles. These are files the USER points us at on their own disk, so
    # loading them is their decision (like `torchvision.datasets.CIFAR10`). Shard content is never
    # unpickled anywhere in this project.
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def cifar_source(kind: str, path: str) -> Source:
    root = os.path.abspath(os.path.expanduser(path))
    sub = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[kind]
    if os.path.isdir(os.path.join(root, sub)):
        root = os.path.join(root, sub)
    if kind == "cifar10":
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_files, meta_file, label_key, names_key = ["test_batch"], "batches.meta", b"labels", b"label_names"
    else:
        train_files, test_files, meta_file, label_key, names_key = ["train"], ["test"], "meta", b"fine_labels", b"fine_label_names"
    missing = [f for f in train_files if not os.path.isfile(os.path.join(root, f))]
    if missing:
        raise DataError(f"{kind} batches not found in '{path}' (missing {', '.join(missing)}): point "
                        f"{kind}:PATH at the extracted '{sub}' folder")
    chunks, labels, split_of = [], [], []
    for split, names in (("train", train_files), ("val", test_files)):
        for n in names:
            p = os.path.join(root, n)
            if not os.path.isfile(p):
                continue
            d = _unpickle_user_file(p)
            x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            chunks.append(x)
            labels.extend(int(v) for v in d[label_key])
            split_of.extend([split] * len(x))
    meta_path = os.path.join(root, meta_file)
    if os.path.isfile(meta_path):
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in _unpickle_user_file(meta_path)[names_key]]
    else:
        classes = [str(i) for i in range(max(labels) + 1)]
    split_arr = np.asarray(split_of)
    fixed = {s: np.flatnonzero(split_arr == s) for s in ("train", "val") if (split_arr == s).any()}
    px = np.ascontiguousarray(np.concatenate(chunks))
    return Source(f"{kind}:{root}", np.asarray(labels, dtype=np.int64), classes, 32, fixed_splits=fixed,
                  arrays=px, digest_extra=hashlib.sha1(px[:: max(1, len(px) // 64)].tobytes()).hexdigest())


def open_source(spec: str) -> Source:
    if spec == "digits":
        return digits_source()
    for kind in ("cifar10", "cifar100"):
        if spec.startswith(kind + ":"):
            return cifar_source(kind, spec[len(kind) + 1:])
    return folder_source(spec)
