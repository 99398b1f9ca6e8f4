"""Shard sets as other tools write them (pipeline/data/urls.py, the pre-scan in
pipeline/data/validate.py, the reader in pipeline/data/read.py): brace patterns and URL lists, any
shard names, labels from ``.cls`` or a JSON field (``data.label_key``), unlabelled sets,
``data.val_url``; bad input fails in one line before Ray starts."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.config import ConfigError, load_config
from pipeline.data.format import DataError
from pipeline.data.urls import expand, is_shard_list, resolve
from pipeline.data.validate import scan_shards


# ---------------------------------------------------------------------------------------------
# Expansion (pure string work)


def test_brace_ranges_keep_their_zero_padding_and_expand_left_to_right():
    assert expand("s3://b/imagenet1k-train-{0000..0002}.tar") == [
        "s3://b/imagenet1k-train-0000.tar", "s3://b/imagenet1k-train-0001.tar", "s3://b/imagenet1k-train-0002.tar"]
    assert expand("/d/{8..11}.tar") == ["/d/8.tar", "/d/9.tar", "/d/10.tar", "/d/11.tar"]
    assert expand("/d/{a,b}-{0..1}.tar") == ["/d/a-0.tar", "/d/a-1.tar", "/d/b-0.tar", "/d/b-1.tar"]
    assert expand("/d/x-{00..04..2}.tar") == ["/d/x-00.tar", "/d/x-02.tar", "/d/x-04.tar"]


def test_url_lists_join_with_double_colons_or_a_yaml_list_and_drop_repeats(tmp_path):
    assert expand("/a/{0..1}.tar :: s3://b/c.tar::/a/0.tar") == ["/a/0.tar", "/a/1.tar", "s3://b/c.tar"]
    conf = tmp_path / "c.yaml"
    conf.write_text("data:\n  url:\n    - /a/x-{0..1}.tar\n    - '/b/y.tar'\n  val_url: ['/v/0.tar']\n")
    cfg = load_config(conf)
    assert cfg.data.url == "/a/x-{0..1}.tar::/b/y.tar" and cfg.data.val_url == "/v/0.tar"
    assert is_shard_list(cfg.data.url) and not is_shard_list("s3://b/sets/digits")


@pytest.mark.parametrize("spec, match", [
    ("/d/{5..1}.tar", "is empty"), ("/d/{0..3.tar", "unbalanced"), ("/d/{x}.tar", "cannot expand"),
    ("/d/{0..99999999}.tar", "more than"), (" :: ", "names no shard")])
def test_bad_patterns_say_what_is_wrong(spec, match):
    with pytest.raises(DataError, match=match):
        expand(spec)


def test_relative_patterns_are_resolved_on_the_driver_braces_kept(tmp_path, monkeypatch):
    from pipeline.storage import resolve_paths, resolve_url

    monkeypatch.chdir(tmp_path)
    assert resolve("in/x-{0..1}.tar::s3://b/y.tar", resolve_url) == f"{tmp_path}/in/x-{{0..1}}.tar::s3://b/y.tar"
    cfg = resolve_paths(load_config(None, ["data.url=in/{0..1}.tar", "data.val_url=v/0.tar"]))
    assert cfg.data.url == f"{tmp_path}/in/{{0..1}}.tar" and cfg.data.val_url == f"{tmp_path}/v/0.tar"


def test_label_key_must_be_a_field_name():
    with pytest.raises(ConfigError, match="data.label_key"):
        load_config(None, ["data.label_key=a b"])
    assert load_config(None, ["data.label_key=meta.label"]).data.label_key == "meta.label"


# ---------------------------------------------------------------------------------------------
# The pre-scan (no Ray)


@pytest.fixture(scope="module")
def sets(tmp_path_factory, write_webdataset):
    root = tmp_path_factory.mktemp("foreign")
    write_webdataset(str(root / "in1k" / "imagenet1k-train-%04d.tar"), 40, style="timm")  # 3 shards
    write_webdataset(str(root / "laion" / "%05d.tar"), 20, style="img2dataset")          # 2 shards
    write_webdataset(str(root / "a" / "%03d.tar"), 5, style="timm", seed=1)               # a/000.tar
    write_webdataset(str(root / "b" / "%03d.tar"), 7, style="timm", seed=2)               # b/000.tar
    return root


def test_a_timm_named_set_by_pattern_is_labelled_and_absent_shards_are_counted(sets):
    scan = scan_shards(f"{sets}/in1k/imagenet1k-train-{{0000..0002}}.tar")
    assert scan.rows == 40 and scan.labeled and scan.skipped == {}
    assert [s.name for s in scan.shards] == [f"imagenet1k-train-{i:04d}.tar" for i in range(3)]
    more = scan_shards(f"{sets}/in1k/imagenet1k-train-{{0000..0004}}.tar")  # 2 of 5 absent
    assert more.rows == 40 and more.skipped == {"missing_shard": 2}
    assert [s.status for s in more.shards] == ["ok", "ok", "ok", "missing", "missing"]


def test_an_img2dataset_set_is_unlabelled_unless_a_json_label_key_is_given(sets):
    plain = scan_shards(f"{sets}/laion")  # a folder of any shard names: all its .tar files
    assert plain.rows == 20 and not plain.labeled and len(plain.shards) == 2
    keyed = scan_shards(f"{sets}/laion/{{00000..00001}}.tar", label_key="meta.label")
    assert keyed.rows == 20 and keyed.labeled


def test_same_file_names_in_two_folders_are_two_shards(sets):
    scan = scan_shards(f"{sets}/a/000.tar::{sets}/b/000.tar")
    assert scan.rows == 12 and [s.name for s in scan.shards] == ["a/000.tar", "b/000.tar"]


def test_val_url_folder_is_one_set_whatever_its_names(sets):
    with pytest.raises(DataError, match="no 'val' shards"):
        scan_shards(f"{sets}/laion", "val")  # a train url's folder never doubles as its val set
    assert scan_shards(f"{sets}/laion", "val", whole_set=True).rows == 20


# ---------------------------------------------------------------------------------------------
# Bad input: one line, before Ray starts


@pytest.mark.parametrize("over, expect", [
    (["data.url={sets}/in1k/imagenet-{{0000..0009}}.tar"], ["matches no file", "imagenet-{0000..0009}.tar",
                                                             "10 shard"]),
    (["data.url={sets}/laion", "data.label_key=label"], ["data.label_key='label'", "no such field",
                                                          "caption", "meta"]),
    (["data.url={sets}/in1k", "data.label_key=label"], ["no .json member"]),
    (["data.url={sets}/in1k", "data.val_url={sets}/laion"], ["data.val_url", "unlabelled"]),
], ids=["pattern-matches-nothing", "label-key-absent", "label-key-without-json", "unlabelled-val-url"])
def test_bad_sets_fail_in_one_line_before_ray(sets, over, expect, ray_starts, capsys, tmp_path):
    argv = ["train", "epochs=1", "batch_size=8", f"storage_path={tmp_path}/runs",
            *[o.format(sets=sets) for o in over]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(e in err[0] for e in expect), err
    assert not ray_starts


# ---------------------------------------------------------------------------------------------
# Reading (Ray Data)


@pytest.mark.slow
def test_reader_takes_labels_from_json_or_cls_keeps_the_aspect_and_both_same_named_shards(sets, ray_session):
    from pipeline.config import DataConfig
    from pipeline.data import build_dataset

    def rows(url, label_key=None):
        data = DataConfig(url=url, image_size=16, label_key=label_key)
        out = build_dataset(url, data=data, shuffle=False, with_keys=True).take_all()
        return sorted(out, key=lambda r: r["key"])

    laion = rows(f"{sets}/laion/{{00000..00001}}.tar", "meta.label")
    assert [int(r["label"]) for r in laion] == [i % 3 for i in range(20)]
    assert {tuple(r["hw"]) for r in laion} == {(16, 10)}  # 40 x 24 portrait: longer side 16, aspect kept
    assert all(int(r["skip"]) == 0 for r in laion)
    assert not np.asarray(laion[0]["image"])[:, 10:].any()  # the canvas right of the image is zero

    both = rows(f"{sets}/a/000.tar::{sets}/b/000.tar")
    assert [r["key"] for r in both] == [f"1-{i:06d}" for i in range(5)] + [f"2-{i:06d}" for i in range(7)]
    assert [int(r["label"]) for r in both] == [i % 5 for i in range(5)] + [i % 5 for i in range(7)]
    assert {tuple(r["hw"]) for r in both} == {(10, 16)}  # 24 x 40 landscape
    assert len({int(r["id"]) for r in both}) == 12


def test_the_label_key_check_reads_samples_only_when_a_key_is_given(sets, monkeypatch):
    """Without data.label_key the pre-scan walks tar headers only; the label check (which reads
    the first samples' .json) runs once when a key is given."""
    from pipeline.data import validate

    calls = []
    monkeypatch.setattr(validate, "check_label_key", lambda *a, **k: calls.append(a))
    scan_shards(f"{sets}/laion")
    assert calls == []
    scan_shards(f"{sets}/laion", label_key="meta.label")
    assert len(calls) == 1
