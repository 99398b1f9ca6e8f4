"""Shard-set format shared by the writer, the validator and the reader.

A shard set under a URL (local dir or ``s3://bucket/prefix``)::

    index.json                    the index (written last by ``cacr prepare``; JSON, never pickle)
    train-000000.tar ...          webdataset tars: <key>.png|jpg (+ <key>.cls, ASCII int label)
    val-000000.tar ...            only when labels exist and the validation fraction is > 0
    _parts/train-000000.tar.json  per-shard completion markers (resume of an interrupted prepare)

Per-sample skip codes travel with every decoded row as the int8 column ``skip``; see
:data:`SKIP_REASONS`. Pre-scan (shard-level) reasons are listed in :data:`SHARD_REASONS`.
"""
from __future__ import annotations

import io
import json
import re
from typing import Any

import numpy as np

from pipeline.errors import CacrError

INDEX_NAME = "index.json"
PARTS_DIR = "_parts"
FORMAT_VERSION = 1
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
LABEL_EXT = "cls"
SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9]+)-(?P<num>\d{6})\.tar$")


class DataError(CacrError, ValueError):
    """The data at a URL cannot be used (no shards, nothing readable, bad source).

    One line naming the URL and what to do."""


# ---------------------------------------------------------------------------------------------
# Per-sample codes (column ``skip``, int8). Codes < FIRST_DROPPED are delivered to training.
OK = 0
MISSING_LABEL = 1      # labelled set, sample has no .cls: kept, label -1 (fine for pretraining)
BAD_LABEL = 2          # .cls is not an ASCII non-negative integer: kept, label -1
MISSING_IMAGE = 3      # no .png/.jpg member for the key: dropped
UNDECODABLE_IMAGE = 4  # image bytes PIL cannot decode: dropped
READ_ERROR = 5         # a sample a shard could not deliver although the pre-scan passed it: dropped
PAD = 6                # filler row so the row count divides by the train workers: dropped, not counted
FIRST_DROPPED = MISSING_IMAGE
NUM_CODES = 7

SKIP_REASONS: dict[int, str] = {
    MISSING_LABEL: "missing_label",
    BAD_LABEL: "bad_label",
    MISSING_IMAGE: "missing_image",
    UNDECODABLE_IMAGE: "undecodable_image",
    READ_ERROR: "read_error",
}
# Shard-level reasons found by the pre-scan (validate.scan_shards), before any sample is read.
SHARD_REASONS = {
    "corrupt_shard": "shards that are not readable tar files (garbage named .tar): excluded",
    "empty_shard": "shards with no samples (0 bytes or an empty tar): excluded",
    "missing_shard": "shards listed in index.json but absent: excluded",
    "truncated_shard": "shards cut short (mid-member or on a member boundary): complete samples kept",
    "lost_samples": "samples index.json promises that the damaged shards above cannot deliver",
}
ALL_REASONS = tuple(SHARD_REASONS) + tuple(SKIP_REASONS.values())


def shard_name(split: str, num: int) -> str:
    return f"{split}-{num:06d}.tar"


def split_key(name: str) -> tuple[str | None, str | None]:
    """webdataset convention: key = path up to the first '.' of the basename; rest = extension."""
    m = re.match(r"^((?:.*/|)[^./]+)\.([^/]*)$", name)
    return (m.group(1), m.group(2).lower()) if m else (None, None)


def parse_label(raw: bytes | None) -> tuple[int, int]:
    """ASCII integer label -> (label, code). Never evaluates or unpickles anything."""
    if raw is None:
        return -1, MISSING_LABEL
    s = raw.strip()
    if 0 < len(s) <= 18 and s.isdigit():
        return int(s), OK
    return -1, BAD_LABEL


JSON_EXT = "json"


def json_field(raw: bytes | None, key: str) -> tuple[bool, Any]:
    """``(found, value)`` of the dotted field ``key`` in a sample's JSON member (``json.loads``:
    data only, nothing evaluated); not found for a missing member, bad JSON or a missing field."""
    if raw is None:
        return False, None
    try:
        node = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return False, None
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def parse_json_label(raw: bytes | None, key: str) -> tuple[int, int]:
    """The label in field ``key`` of a sample's JSON member -> (label, code): a non-negative
    integer (or a string of digits) is OK; a missing member or field is MISSING_LABEL; anything
    else (a class name, a float, null) BAD_LABEL."""
    found, value = json_field(raw, key)
    if not found:
        return -1, MISSING_LABEL
    if isinstance(value, bool):
        return -1, BAD_LABEL
    if isinstance(value, int) and value >= 0:
        return value, OK
    if isinstance(value, str):
        return parse_label(value.encode("ascii", "replace"))
    return -1, BAD_LABEL


def open_rgb(fp, target: int, *, longer: bool = False):
    """Open an encoded image (bytes-like, file object or path) as a loaded PIL RGB image.

    JPEGs are decoded in draft mode (DCT scaling by 1/2, 1/4 or 1/8) when the side that will be
    resized to ``target`` is at least twice ``target``: the shorter side for square sets, the longer
    side for aspect sets (``longer=True``). Draft scaling never goes below the requested size, so
    the final resize is always a downscale. The one place that implements this for the writer
    (source images) and the reader (stored shards). Raises whatever PIL raises."""
    from PIL import Image
    if isinstance(fp, (bytes, bytearray, memoryview)):
        fp = io.BytesIO(fp)
    with Image.open(fp) as im:
        w, h = im.size
        if im.format == "JPEG" and (max(w, h) if longer else min(w, h)) >= 2 * target:
            # draft picks the largest DCT scale keeping each side >= the requested one
            im.draft("RGB", (max(1, w * target // max(w, h)), max(1, h * target // max(w, h)))
                     if longer else (target, target))
        return im.convert("RGB")


def decode_image(data: bytes, size: int) -> np.ndarray | None:
    """Encoded image -> uint8 (size, size, 3) RGB, or ``None`` if PIL cannot decode it.

    Same size: no resampling (byte-exact for PNG). Otherwise shorter side to ``size`` and a centre
    crop (JPEG uses draft mode to decode at reduced scale first)."""
    try:
        im = open_rgb(data, size)
        if im.size != (size, size):
            im = fit_square(im, size)
        arr = np.asarray(im, dtype=np.uint8)
    except Exception:  # noqa: BLE001 - any decoder failure is an undecodable image
        return None
    if arr.shape != (size, size, 3):
        return None
    return arr


def decode_aspect(data: bytes, size: int) -> np.ndarray | None:
    """Encoded image -> uint8 (h, w, 3) RGB with ``max(h, w) <= size`` (aspect kept; downscaled only
    when the stored image is larger than ``size``, never upscaled), or ``None`` if PIL cannot decode
    it. Stored images of an aspect set decoded at their own ``max_size`` are never resampled."""
    try:
        im = fit_max(open_rgb(data, size, longer=True), size)
        arr = np.asarray(im, dtype=np.uint8)
    except Exception:  # noqa: BLE001 - any decoder failure is an undecodable image
        return None
    if arr.ndim != 3 or arr.shape[2] != 3 or min(arr.shape[:2]) < 1:
        return None
    return arr


def fit_max(im, size: int):
    """Downscale (bilinear, antialiased) so that the longer side is at most ``size``, keeping the
    aspect ratio: new side = max(1, round(side * size / longer side)). Smaller images are returned
    unchanged (never upscaled: upscaling adds pixels, not information; the crop resize does it)."""
    from PIL import Image
    w, h = im.size
    if max(w, h) <= size:
        return im
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    return im.resize((nw, nh), Image.BILINEAR, reducing_gap=3.0 if scale < 0.5 else None)


def fit_square(im, size: int):
    """Resize the shorter side to ``size`` (bilinear, antialiased) and centre-crop a square."""
    from PIL import Image
    w, h = im.size
    if (w, h) == (size, size):
        return im
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.BILINEAR, reducing_gap=3.0 if scale < 0.5 else None)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def encode_image(arr: np.ndarray, fmt: str, jpeg_quality: int = 90) -> bytes:
    from PIL import Image
    im = Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    if fmt == "png":
        im.save(buf, format="PNG", compress_level=3)
    elif fmt in ("jpg", "jpeg"):
        im.save(buf, format="JPEG", quality=jpeg_quality, subsampling=0 if jpeg_quality >= 90 else 2)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return buf.getvalue()


def load_index(text: str | bytes) -> dict[str, Any]:
    """Parse and sanity-check index.json (plain JSON)."""
    idx = json.loads(text)
    if not isinstance(idx, dict) or not isinstance(idx.get("splits"), dict):
        raise ValueError("index.json has no 'splits' mapping")
    for split, info in idx["splits"].items():
        shards = info.get("shards") if isinstance(info, dict) else None
        if not isinstance(shards, list):
            raise ValueError(f"index.json split '{split}' has no 'shards' list")
        for s in shards:
            if not isinstance(s, dict) or not isinstance(s.get("name"), str) \
                    or not isinstance(s.get("samples"), int) or not isinstance(s.get("bytes"), int):
                raise ValueError(f"index.json split '{split}': bad shard entry {s!r:.80}")
    return idx
