"""Where `cacr prepare` reads images from: ``digits``, an image folder (local, or ``s3://bucket/prefix/``),
``cifar10:PATH``/``cifar100:PATH``, ``skimage-photos[:N]`` (random crops of scikit-image's bundled
photos, for benches).

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

from pipeline.data.format import DataError, fit_max, fit_square, open_rgb
from pipeline.storage import is_remote

FOLDER_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
URL_FETCH_CHUNK = 64  # S3 objects fetched concurrently per request batch (one shard = many batches)


@dataclass
class Source:
    name: str                          # "digits", "folder:/abs/path", "cifar10:/abs/path"
    labels: np.ndarray                 # int64 (N,), -1 when unlabelled
    classes: list[str]                 # class names ([] when unlabelled)
    default_image_size: int
    fixed_splits: dict[str, np.ndarray] | None = None   # e.g. CIFAR's own test batch
    arrays: np.ndarray | None = None   # uint8 (N, h, w, 3) for in-memory sources
    files: list[str] | None = None     # absolute paths (local folder) or s3:// URLs (S3 folder)
    crops: list[tuple] | None = None   # photo crop boxes for the skimage-photos source
    digest_extra: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    storage: Any = None                # StorageConfig of an S3 folder (no credentials in it)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def labeled(self) -> bool:
        return bool(self.classes)

    def payload(self, indices: np.ndarray) -> dict[str, Any]:
        """Picklable description of the images at ``indices`` for :func:`load_images`."""
        if self.arrays is not None:
            return {"kind": "array", "pixels": self.arrays[indices]}
        if self.crops is not None:
            return {"kind": "photos", "crops": [self.crops[i] for i in indices]}
        if not self.local_files:
            return {"kind": "urls", "urls": [self.files[i] for i in indices], "storage": self.storage}
        return {"kind": "files", "files": [self.files[i] for i in indices]}

    @property
    def local_files(self) -> bool:
        """Its images are files on THIS machine's disk (only tasks on this node can read them)."""
        return self.files is not None and not (self.files and is_remote(self.files[0]))

    def digest(self) -> str:
        """Identity of the source content (for resuming: same digest -> same shards)."""
        h = hashlib.sha1(self.name.encode())
        h.update(self.labels.tobytes())
        if self.files is not None:
            h.update("\n".join(self.files).encode())
        if self.crops is not None:
            h.update(repr(self.crops).encode())
        h.update(self.digest_extra.encode())
        return h.hexdigest()[:16]


def load_images(payload: dict[str, Any], size: int, layout: str = "square") -> list[np.ndarray | None]:
    """The stored RGB uint8 images of a payload; ``None`` for an unreadable file.

    ``layout="square"``: (size, size, 3), shorter side to ``size`` then a centre crop (small square
    sources are upscaled smoothly). ``layout="aspect"``: (h, w, 3) with the aspect ratio kept and
    ``max(h, w) <= size``; larger images are downscaled, smaller ones stored as they are."""
    from PIL import Image
    aspect = layout == "aspect"
    out: list[np.ndarray | None] = []
    if payload["kind"] in ("array", "photos"):
        pixels = payload["pixels"] if payload["kind"] == "array" else photo_crops(payload["crops"])
        for px in pixels:
            if px.shape[:2] == (size, size) or (aspect and max(px.shape[:2]) <= size and px.shape[2] == 3):
                out.append(np.ascontiguousarray(px))
                continue
            mode = "L" if px.shape[2] == 1 else "RGB"
            im = Image.fromarray(px[..., 0] if mode == "L" else px, mode)
            if aspect:
                im = fit_max(im, size)
            else:
                # Small sources (8x8 digits, 32x32 CIFAR) are upscaled smoothly; bilinear is exact
                # and deterministic for the same input.
                im = im.resize((size, size), Image.BILINEAR) if im.size[0] == im.size[1] else fit_square(im, size)
            out.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
        return out
    encoded = _fetch_urls(payload["urls"], payload["storage"]) if payload["kind"] == "urls" \
        else payload["files"]
    for item in encoded:
        try:
            if item is None:
                raise ValueError("missing")
            im = open_rgb(item, size, longer=aspect)
            im = fit_max(im, size) if aspect else fit_square(im, size)
            out.append(np.asarray(im, dtype=np.uint8))
        except Exception:  # noqa: BLE001 - unreadable source image: counted by the writer
            out.append(None)
    return out


def _fetch_urls(urls: list[str], storage) -> list[bytes | None]:
    """The bytes of S3 objects, fetched concurrently (s3fs ``cat`` on a list) in chunks, so a
    shard of large photos is never all in flight at once. An object that vanished since the
    listing is ``None`` (counted as unreadable); any other failure (endpoint down, access denied)
    fails the shard: a network error must not silently drop images."""
    from pipeline.storage import classify_s3_error, fsspec_fs, parse_url, url_of

    if not urls:
        return []
    fs, _ = fsspec_fs(urls[0], storage)
    out: list[bytes | None] = []
    for start in range(0, len(urls), URL_FETCH_CHUNK):
        chunk = [parse_url(u).path for u in urls[start:start + URL_FETCH_CHUNK]]
        got = fs.cat(chunk, on_error="return")
        for path in chunk:
            v = got.get(path)
            if isinstance(v, FileNotFoundError):
                out.append(None)
            elif isinstance(v, BaseException):
                raise classify_s3_error(v, url_of(path, urls[0]), storage) from None
            else:
                out.append(v)
    return out


# ---------------------------------------------------------------------------------------------
# scikit-image's bundled sample photos: a real-photo source for benches, no download

# Photos that ship inside the scikit-image wheel (no pooch download), one class each; the grey
# ones are replicated to RGB.
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
                  "immunohistochemistry", "retina", "camera", "coins", "grass")
PHOTOS_DEFAULT_N = 1000
PHOTO_CROP_LONG = (256, 320)      # longer side of a generated crop, px (then stored at --max-size)
PHOTO_CROP_RATIO = (0.5, 2.0)     # width / height, log-uniform
PHOTO_CROP_AREA = (0.2, 1.0)      # fraction of the photo's area, uniform


def _photo(name: str) -> np.ndarray:
    import skimage.data
    px = np.asarray(getattr(skimage.data, name)())
    if px.ndim == 2:
        px = np.repeat(px[..., None], 3, axis=2)
    return np.ascontiguousarray(px[..., :3].astype(np.uint8))


def photo_crops(crops: list[tuple[int, int, int, int, int, int, int]]) -> list[np.ndarray]:
    """Render crops ``(photo, top, left, h, w, out_h, out_w)``: cut, then bilinear resize."""
    from PIL import Image
    cache: dict[int, np.ndarray] = {}
    out = []
    for p, top, left, h, w, oh, ow in crops:
        if p not in cache:
            cache[p] = _photo(SKIMAGE_PHOTOS[p])
        im = Image.fromarray(cache[p][top:top + h, left:left + w], "RGB")
        out.append(np.asarray(im.resize((ow, oh), Image.BILINEAR), dtype=np.uint8))
    return out


def photos_source(n: int = PHOTOS_DEFAULT_N, seed: int = 0) -> Source:
    """``skimage-photos[:N]``: N random crops (varied aspect 1:2..2:1, 20-100 % of the area, longer
    side 256-320 px) of scikit-image's bundled photos, labelled by photo (10 classes). Deterministic
    in (n, seed); meant for ``cacr prepare skimage-photos OUT --max-size 224 --format jpg``."""
    try:
        shapes = [_photo(name).shape[:2] for name in SKIMAGE_PHOTOS]
    except ImportError:
        raise DataError("source 'skimage-photos' needs scikit-image: pip install scikit-image") from None
    rng = np.random.default_rng(seed)
    crops, labels = [], []
    for i in range(n):
        p = i % len(SKIMAGE_PHOTOS)
        ph, pw = shapes[p]
        ratio = float(np.exp(rng.uniform(*np.log(PHOTO_CROP_RATIO))))
        area = rng.uniform(*PHOTO_CROP_AREA) * ph * pw
        w = int(min(pw, max(8, round(np.sqrt(area * ratio)))))
        h = int(min(ph, max(8, round(w / ratio))))
        top, left = int(rng.integers(0, ph - h + 1)), int(rng.integers(0, pw - w + 1))
        long = int(rng.integers(PHOTO_CROP_LONG[0], PHOTO_CROP_LONG[1] + 1))
        oh, ow = (long, max(1, round(long * w / h))) if h >= w else (max(1, round(long * h / w)), long)
        crops.append((p, top, left, h, w, oh, ow))
        labels.append(p)
    return Source(f"skimage-photos:{n}", np.asarray(labels, dtype=np.int64), list(SKIMAGE_PHOTOS), 224,
                  crops=crops, digest_extra=f"{seed}:{PHOTO_CROP_LONG}:{PHOTO_CROP_RATIO}:{PHOTO_CROP_AREA}")


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

    subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    classes, files, labels = [], [], []
    for d in subdirs:
        found = []
        for dirpath, dirnames, names in os.walk(os.path.join(root, d)):
            dirnames[:] = sorted(x for x in dirnames if not x.startswith("."))
            found.extend(os.path.join(dirpath, n) for n in sorted(names) if _is_img(n))
        if found:
            labels.extend([len(classes)] * len(found))
            classes.append(d)
            files.extend(found)
    if not files:
        files = [os.path.join(root, n) for n in sorted(os.listdir(root)) if _is_img(n)]
        labels = [-1] * len(files)
    if not files:
        raise DataError(f"no images ({', '.join(FOLDER_EXTS)}) in '{path}' or its sub-folders")
    return Source(f"folder:{root}", np.asarray(labels, dtype=np.int64), classes, 64, files=files,
                  digest_extra=str(sum(os.path.getsize(f) for f in files)))


def _is_img(name: str) -> bool:
    return name.lower().endswith(FOLDER_EXTS) and not name.startswith(".")


def s3_folder_source(url: str, storage=None) -> Source:
    """An image folder on S3, laid out like a local one: ``PREFIX/<class>/**/<image>`` (labelled,
    classes sorted) or images directly under ``PREFIX/`` (unlabelled). One listing on the driver;
    the images are then read by the tasks that write the shards, on whatever node runs them."""
    from pipeline.storage import check_location, classify_s3_error, fsspec_fs, parse_url, url_of

    loc = parse_url(url)
    check_location(url, storage)  # endpoint, credentials, bucket, something under the prefix
    fs, root = fsspec_fs(url, storage)
    root = root.rstrip("/")
    try:
        listing = fs.find(root, detail=True)  # files only (withdirs=False)
    except Exception as e:  # noqa: BLE001
        raise classify_s3_error(e, url, storage) from None
    per_class: dict[str, list[tuple[str, int]]] = {}
    flat: list[tuple[str, int]] = []
    for path, info in sorted(listing.items()):
        parts = path[len(root):].strip("/").split("/")
        if not _is_img(parts[-1]) or any(p.startswith(".") for p in parts):
            continue
        entry = (url_of(path, url), int(info.get("size") or 0))
        (per_class.setdefault(parts[0], []) if len(parts) > 1 else flat).append(entry)
    classes = sorted(per_class)
    if classes:
        found = [(c, e) for c in classes for e in per_class[c]]
        labels = [classes.index(c) for c, _ in found]
        files = [e for _, e in found]
    else:
        files, labels = flat, [-1] * len(flat)
    if not files:
        raise DataError(f"no images ({', '.join(FOLDER_EXTS)}) under '{loc.url}' or its sub-prefixes")
    return Source(loc.url.rstrip("/"), np.asarray(labels, dtype=np.int64), classes, 64,
                  files=[u for u, _ in files], storage=storage,
                  digest_extra=str(sum(n for _, n in files)))


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


def open_source(spec: str, storage=None) -> Source:
    if is_remote(spec):
        return s3_folder_source(spec, storage)
    if spec == "digits":
        return digits_source()
    if spec == "skimage-photos" or spec.startswith("skimage-photos:"):
        n = spec.partition(":")[2] or str(PHOTOS_DEFAULT_N)
        if not n.isdigit() or int(n) < 1:
            raise DataError(f"source '{spec}': use skimage-photos or skimage-photos:N with N >= 1")
        return photos_source(int(n))
    for kind in ("cifar10", "cifar100"):
        if spec.startswith(kind + ":"):
            return cifar_source(kind, spec[len(kind) + 1:])
    return folder_source(spec)
