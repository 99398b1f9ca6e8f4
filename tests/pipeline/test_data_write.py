"""`cacr prepare`: sources, shard layout, index, determinism, resume, Ray path, S3 output."""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline.data import DataError, prepare
from pipeline.data.commands import add_prepare_args, run_prepare
from pipeline.storage import fsspec_fs

QUIET = {"progress": False, "echo": lambda m: None}


def tar_members(path_or_bytes) -> list[tuple[str, bytes]]:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else open(path_or_bytes, "rb").read()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]


def test_digits_layout_and_index(digits_shards):
    idx = json.load(open(os.path.join(digits_shards, "index.json")))
    assert idx["image_size"] == 32 and idx["image_format"] == "png" and idx["classes"] == [str(i) for i in range(10)]
    assert set(idx["splits"]) == {"train", "val"}
    assert idx["splits"]["train"]["samples"] + idx["splits"]["val"]["samples"] == 1797
    for split, info in idx["splits"].items():
        assert len(info["shards"]) >= 8  # >= 4 shards per reader for 2 readers
        assert sum(s["samples"] for s in info["shards"]) == info["samples"]
        for s in info["shards"]:
            p = os.path.join(digits_shards, s["name"])
            assert os.path.getsize(p) == s["bytes"]
            members = tar_members(p)
            assert len(members) == s["members"] == 2 * s["samples"]
            names = [n for n, _ in members]
            assert all(n.endswith((".png", ".cls")) for n in names)
    # labels match the digits targets; val is stratified; keys never repeat across splits
    from sklearn.datasets import load_digits
    target = load_digits().target
    seen, val_labels = set(), []
    for split, info in idx["splits"].items():
        for s in info["shards"]:
            for n, b in tar_members(os.path.join(digits_shards, s["name"])):
                key, ext = n.split(".")
                if ext == "cls":
                    assert int(b) == target[int(key)]
                    assert key not in seen
                    seen.add(key)
                    if split == "val":
                        val_labels.append(int(b))
    assert len(seen) == 1797
    assert sorted(set(val_labels)) == list(range(10))
    assert min(np.bincount(val_labels)) >= 30  # ~20% of ~180 per class


def test_deterministic_and_resumable(tmp_path, digits_shards):
    out = str(tmp_path / "again")
    prepare("digits", out, **QUIET)
    for n in os.listdir(digits_shards):
        if n.endswith(".tar") or n == "index.json":
            assert open(os.path.join(out, n), "rb").read() == open(os.path.join(digits_shards, n), "rb").read(), n
    # re-run: nothing rewritten
    mtimes = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out) if n.endswith(".tar")}
    msgs = []
    prepare("digits", out, progress=False, echo=msgs.append)
    assert "(0 written, 16 skipped)" in msgs[-1]
    assert mtimes == {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in mtimes}
    # a missing shard and a truncated shard are rewritten, nothing else
    os.remove(os.path.join(out, "train-000003.tar"))
    with open(os.path.join(out, "val-000001.tar"), "r+b") as f:
        f.truncate(1000)
    os.remove(os.path.join(out, "index.json"))  # as after a crash before the index was written
    msgs.clear()
    prepare("digits", out, progress=False, echo=msgs.append)
    assert "(2 written, 14 skipped)" in msgs[-1]
    for n in ("train-000003.tar", "val-000001.tar", "index.json"):
        assert open(os.path.join(out, n), "rb").read() == open(os.path.join(digits_shards, n), "rb").read()
    # other options: different shards, stale ones removed
    prepare("digits", out, shard_size=500, val_fraction=0.0, **QUIET)
    tars = sorted(n for n in os.listdir(out) if n.endswith(".tar"))
    assert tars == ["train-000000.tar", "train-000001.tar", "train-000002.tar", "train-000003.tar"]


def _write_images(folder, n, size=(40, 30), seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        p = os.path.join(folder, f"img{i:03d}.png")
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def test_image_folder_labelled_with_unreadable_file(tmp_path):
    src = tmp_path / "src"
    _write_images(src / "cat", 6, seed=1)
    _write_images(src / "dog" / "nested", 5, seed=2)
    (src / "dog" / "broken.jpg").write_bytes(b"not an image")
    out = str(tmp_path / "out")
    msgs = []
    idx = prepare(str(src), out, image_size=16, fmt="jpg", shard_size=3, val_fraction=0.25, progress=False,
                  echo=msgs.append)
    assert idx["classes"] == ["cat", "dog"] and idx["labeled"] and idx["image_format"] == "jpg"
    assert idx["source_unreadable"] == 1 and any("could not be read" in m for m in msgs)
    total = sum(s["samples"] for s in idx["splits"].values())
    assert total == 11  # 12 files, one unreadable
    for info in idx["splits"].values():
        for s in info["shards"]:
            for n, b in tar_members(os.path.join(out, s["name"])):
                if n.endswith(".jpg"):
                    assert Image.open(io.BytesIO(b)).size == (16, 16)


def test_flat_folder_is_unlabelled(tmp_path):
    _write_images(tmp_path / "flat", 7)
    idx = prepare(str(tmp_path / "flat"), str(tmp_path / "out"), image_size=24, **QUIET)
    assert idx["classes"] == [] and idx["labeled"] is False and set(idx["splits"]) == {"train"}
    names = [n for s in idx["splits"]["train"]["shards"]
             for n, _ in tar_members(str(tmp_path / "out" / s["name"]))]
    assert len(names) == 7 and all(n.endswith(".png") for n in names)


def test_cifar10_pickles(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [*[(f"data_batch_{i}", 4) for i in range(1, 6)], ("test_batch", 5)]:
        d = {b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        pickle.dump(d, open(root / name, "wb"))
    pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, open(root / "batches.meta", "wb"))
    idx = prepare(f"cifar10:{tmp_path}", str(tmp_path / "out"), **QUIET)
    assert idx["splits"]["train"]["samples"] == 20 and idx["splits"]["val"]["samples"] == 5
    assert idx["classes"][3] == "c3" and idx["image_size"] == 32
    # pixels stored losslessly (PNG, native 32 px)
    first = pickle.load(open(root / "data_batch_1", "rb"), encoding="bytes")
    want = first[b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0)
    for s in idx["splits"]["train"]["shards"]:
        for n, b in tar_members(str(tmp_path / "out" / s["name"])):
            if n == "0000000.png":
                assert np.array_equal(np.asarray(Image.open(io.BytesIO(b))), want)
                return
    pytest.fail("sample 0000000 not found")


def test_bad_arguments(tmp_path, capsys):
    p = argparse.ArgumentParser()
    add_prepare_args(p)
    assert run_prepare(p.parse_args([str(tmp_path / "missing"), str(tmp_path / "o"), "--no-progress"])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "missing" in err
    with pytest.raises(DataError):
        prepare("cifar10:" + str(tmp_path), str(tmp_path / "o"), **QUIET)
    with pytest.raises(DataError):
        prepare("digits", str(tmp_path / "o"), val_fraction=1.5, **QUIET)


def test_prepare_to_s3_via_cli(s3_bucket, digits_shards):
    p = argparse.ArgumentParser()
    add_prepare_args(p)
    url = s3_bucket + "/sets/digits"
    assert run_prepare(p.parse_args(["digits", url, "--no-progress"])) == 0
    fs, base = fsspec_fs(url)
    for n in sorted(os.listdir(digits_shards)):
        if n.endswith(".tar") or n == "index.json":
            assert fs.cat_file(f"{base}/{n}") == open(os.path.join(digits_shards, n), "rb").read(), n


def test_prepare_to_unreachable_s3_is_one_clear_error(s3_server, tmp_path, capsys):
    p = argparse.ArgumentParser()
    add_prepare_args(p)
    args = p.parse_args(["digits", "s3://bucket/x", "--endpoint-url", "http://127.0.0.1:1", "--no-progress"])
    assert run_prepare(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach" in err[0]


# ---------------------------------------------------------------------------------------------
# image folders on S3 (`cacr prepare s3://bucket/raw/train/ OUT`)


def _labelled_folder(root) -> None:
    _write_images(root / "cat", 6, seed=1)
    _write_images(root / "dog" / "nested", 5, seed=2)
    (root / "dog" / "broken.jpg").write_bytes(b"not an image")
    (root / "dog" / "notes.txt").write_text("not listed")
    _write_images(root / ".cache", 2, seed=9)  # hidden: not a class


def _content(idx: dict) -> dict:
    """An index without what names the source (its name, the shard fingerprints derived from it)."""
    out = {k: v for k, v in idx.items() if k != "source"}
    out["splits"] = {sp: {**info, "shards": [{k: v for k, v in s.items() if k != "fingerprint"}
                                             for s in info["shards"]]}
                     for sp, info in idx["splits"].items()}
    return out


def _shard_bytes(out_url: str, idx: dict) -> dict[str, bytes]:
    fs, base = fsspec_fs(out_url)
    return {s["name"]: fs.cat_file(f"{base}/{s['name']}")
            for info in idx["splits"].values() for s in info["shards"]}


def test_s3_image_folder_gives_the_shards_of_the_same_local_folder(tmp_path, s3_bucket, capsys):
    from tests.conftest import upload_dir

    src = tmp_path / "src"
    _labelled_folder(src)
    upload_dir(str(src), f"{s3_bucket}/raw/train")
    opts = dict(image_size=16, fmt="jpg", shard_size=3, val_fraction=0.25, **QUIET)
    local = prepare(str(src), str(tmp_path / "local"), **opts)
    remote = prepare(f"{s3_bucket}/raw/train/", f"{s3_bucket}/shards", **opts)
    assert remote["source"] == f"{s3_bucket}/raw/train"
    assert remote["classes"] == ["cat", "dog"] and remote["source_unreadable"] == 1
    assert _content(remote) == _content(local)
    assert _shard_bytes(f"{s3_bucket}/shards", remote) == _shard_bytes(str(tmp_path / "local"), local)
    # the CLI: a re-run resumes (nothing rewritten); an empty prefix is one line
    p = argparse.ArgumentParser()
    add_prepare_args(p)
    assert run_prepare(p.parse_args([f"{s3_bucket}/raw/train/", f"{s3_bucket}/shards", "--image-size", "16",
                                     "--format", "jpg", "--shard-size", "3", "--val-fraction", "0.25",
                                     "--no-progress"])) == 0
    assert "(0 written, 5 skipped)" in capsys.readouterr().err
    assert run_prepare(p.parse_args([f"{s3_bucket}/raw/nothing/", str(tmp_path / "x"), "--no-progress"])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing under" in err[0] and "raw/nothing" in err[0], err


def test_s3_flat_folder_unlabelled_and_a_vanished_or_unreachable_object(tmp_path, s3_bucket):
    from moto.server import ThreadedMotoServer

    from pipeline.config import StorageConfig
    from pipeline.data.sources import load_images, open_source
    from pipeline.storage import StorageError
    from tests.conftest import upload_dir

    _write_images(tmp_path / "flat", 5)
    upload_dir(str(tmp_path / "flat"), f"{s3_bucket}/flat")
    idx = prepare(f"{s3_bucket}/flat", str(tmp_path / "out"), image_size=24, **QUIET)
    assert idx["classes"] == [] and idx["labeled"] is False and idx["splits"]["train"]["samples"] == 5

    src = open_source(f"{s3_bucket}/flat")
    payload = src.payload(np.arange(len(src)))
    assert payload["kind"] == "urls" and not src.local_files
    fs, _ = fsspec_fs(src.files[1])
    fs.rm(src.files[1][len("s3://"):])  # gone between the listing and the shard task: unreadable
    images = load_images(payload, 24)
    assert [im is None for im in images] == [False, True, False, False, False]
    # the endpoint stops: the shard fails (a network error never drops images silently)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    server.stop()
    down = StorageConfig(endpoint_url=f"http://{host}:{port}", retry_deadline_s=1.0)
    with pytest.raises(StorageError):
        load_images({**payload, "storage": down}, 24)


def test_shard_tasks_pinned_to_the_driver_only_for_what_is_on_its_disk(tmp_path, s3_bucket):
    from pipeline.data.sources import open_source
    from pipeline.data.write import _pin_to_driver
    from tests.conftest import upload_dir

    _write_images(tmp_path / "flat", 2)
    upload_dir(str(tmp_path / "flat"), f"{s3_bucket}/flat")
    local_src, s3_src = open_source(str(tmp_path / "flat")), open_source(f"{s3_bucket}/flat")
    assert "source folder" in _pin_to_driver(local_src, f"{s3_bucket}/out")
    assert "output" in _pin_to_driver(s3_src, str(tmp_path / "out"))
    assert "output" in _pin_to_driver(open_source("digits"), str(tmp_path / "out"))
    assert _pin_to_driver(s3_src, f"{s3_bucket}/out") is None
    assert _pin_to_driver(open_source("digits"), f"{s3_bucket}/out") is None


@pytest.mark.slow
def test_ray_path_matches_in_process(tmp_path, ray_session, s3_server):
    src = tmp_path / "src"
    _write_images(src / "a", 9, seed=3)
    _write_images(src / "b", 8, seed=4)
    local = prepare(str(src), str(tmp_path / "local"), shard_size=4, image_size=16, parallel="local", **QUIET)
    msgs = []
    remote = prepare(str(src), str(tmp_path / "ray"), shard_size=4, image_size=16, parallel="ray",
                     progress=True, echo=msgs.append)
    assert any("Ray tasks" in m for m in msgs)
    assert local == remote
    for info in local["splits"].values():
        for s in info["shards"]:
            assert open(tmp_path / "local" / s["name"], "rb").read() == open(tmp_path / "ray" / s["name"], "rb").read()
    # an S3 image folder to S3: the tasks read the images from S3 themselves (any node)
    from tests.conftest import make_bucket, upload_dir
    bucket = "s3://" + make_bucket(s3_server)
    upload_dir(str(src), f"{bucket}/raw")
    from_s3 = prepare(f"{bucket}/raw", f"{bucket}/shards", shard_size=4, image_size=16, parallel="ray", **QUIET)
    assert _content(from_s3) == _content(local)
    assert _shard_bytes(f"{bucket}/shards", from_s3) == _shard_bytes(str(tmp_path / "local"), local)


# ---------------------------------------------------------------------------------------------
# aspect-preserving sets (--max-size) and the scikit-image photo source


def _smooth(w: int, h: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8), "RGB")
    return np.asarray(small.resize((w, h), Image.BICUBIC))


def test_max_size_keeps_aspect_never_upscales(tmp_path):
    src = tmp_path / "src"
    sizes = {"wide": (300, 150), "tall": (90, 400), "small": (100, 60), "square": (200, 200)}
    for i, (name, (w, h)) in enumerate(sizes.items()):
        os.makedirs(src / name)
        Image.fromarray(_smooth(w, h, i)).save(src / name / "a.jpg", quality=95)
    out = str(tmp_path / "out")
    p = argparse.ArgumentParser()
    add_prepare_args(p)
    assert run_prepare(p.parse_args([str(src), out, "--max-size", "128", "--val-fraction", "0",
                                     "--no-progress"])) == 0
    idx = json.load(open(os.path.join(out, "index.json")))
    assert (idx["layout"], idx["max_size"], idx["image_size"]) == ("aspect", 128, 128)
    got = {}
    for s in idx["splits"]["train"]["shards"]:
        members = dict(tar_members(os.path.join(out, s["name"])))
        for n, b in members.items():
            if n.endswith(".png"):
                got[idx["classes"][int(members[n[:-4] + ".cls"])]] = Image.open(io.BytesIO(b)).size
    # longer side scaled to 128 with the aspect kept; the small image is stored as it is
    assert got == {"wide": (128, 64), "tall": (29, 128), "small": (100, 60), "square": (128, 128)}
    # a square set records its layout; the two sizes exclude each other
    assert prepare(str(src), str(tmp_path / "sq"), image_size=32, **QUIET)["layout"] == "square"
    with pytest.raises(DataError, match="exclude each other"):
        prepare(str(src), str(tmp_path / "both"), image_size=32, max_size=64, **QUIET)


def test_skimage_photos_source(tmp_path):
    from pipeline.data.sources import SKIMAGE_PHOTOS, open_source
    a, b = open_source("skimage-photos:40"), open_source("skimage-photos:40")
    assert len(a) == 40 and a.classes == list(SKIMAGE_PHOTOS) and a.digest() == b.digest()
    assert sorted(set(a.labels.tolist())) == list(range(10))
    ratios = [w / h for (_, _, _, h, w, _, _) in a.crops]
    assert min(ratios) < 0.8 and max(ratios) > 1.25  # varied aspect, both orientations
    with pytest.raises(DataError, match="skimage-photos:N"):
        open_source("skimage-photos:many")
    idx = prepare("skimage-photos:20", str(tmp_path / "ph"), max_size=224, fmt="jpg", **QUIET)
    assert idx["layout"] == "aspect" and idx["image_format"] == "jpg"
    shapes = set()
    for info in idx["splits"].values():
        for s in info["shards"]:
            for n, b in tar_members(str(tmp_path / "ph" / s["name"])):
                if n.endswith(".jpg"):
                    im = Image.open(io.BytesIO(b))
                    assert im.format == "JPEG" and max(im.size) == 224  # crops are >= 256 px: downscaled
                    shapes.add(im.size)
    assert len(shapes) > 5
