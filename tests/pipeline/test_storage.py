"""pipeline.storage: URL parsing, s3fs options, and one clear error per storage failure, fast.

Every S3 call goes over HTTP to the moto server of the ``s3_server`` fixture (no in-process mocks).
"""
from __future__ import annotations

import contextlib
import pickle
import time
import urllib.request

import pytest

from pipeline.config import StorageConfig
from pipeline.storage import (StorageError, arrow_fs, check_location, describe_endpoint, fsspec_fs,
                              join_url, list_files, parse_url, s3fs_options)


def test_parse_url_local_and_s3(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loc = parse_url("s3://bucket/some/prefix/")
    assert (loc.scheme, loc.bucket, loc.key, loc.url) == ("s3", "bucket", "some/prefix", "s3://bucket/some/prefix")
    assert parse_url("s3://bucket").key == ""
    assert parse_url("data/x").path == str(tmp_path / "data" / "x")
    assert parse_url(f"file://{tmp_path}/y").path == str(tmp_path / "y")
    assert join_url("s3://b/p", "index.json") == "s3://b/p/index.json"
    assert join_url(str(tmp_path), "a.tar") == str(tmp_path / "a.tar")
    for bad in ("", "gs://bucket/x", "s3://", "s3://AKIA:secret@bucket/x"):
        with pytest.raises(StorageError) as ei:
            parse_url(bad)
        assert "secret" not in str(ei.value)


def test_s3fs_options_config_wins_and_holds_no_secrets(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://env-endpoint:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSECRETVALUE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "VERYSECRET")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert s3fs_options()["endpoint_url"] == "http://env-endpoint:9000"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:9000")
    assert s3fs_options()["endpoint_url"] == "http://s3-specific:9000"
    cfg = StorageConfig(endpoint_url="http://cfg:1234", region="eu-west-3", profile="prof", anonymous=True)
    opts = s3fs_options(cfg)
    assert opts["endpoint_url"] == "http://cfg:1234"
    assert opts["client_kwargs"] == {"region_name": "eu-west-3"}
    assert opts["profile"] == "prof" and opts["anon"] is True
    assert "SECRET" not in repr(opts)
    # filesystem objects pickle without credentials (botocore re-resolves them in each worker)
    fs, _ = fsspec_fs("s3://bucket/x", StorageConfig(endpoint_url="http://cfg:1234"))
    blob = pickle.dumps(fs)
    assert b"VERYSECRET" not in blob and b"AKIDSECRETVALUE" not in blob
    # credentials in an endpoint URL never reach a message
    assert "pw" not in describe_endpoint(StorageConfig(endpoint_url="http://user:pw@host:9000"))


def test_s3_roundtrip_through_arrow_and_fsspec(s3_bucket):
    fs, path = fsspec_fs(s3_bucket + "/p/x.tar")
    fs.pipe_file(path, b"0123456789")
    assert list_files(s3_bucket + "/p") == {"x.tar": 10}
    assert check_location(s3_bucket + "/p") is True
    afs, apath = arrow_fs(s3_bucket + "/p/x.tar")
    afs = pickle.loads(pickle.dumps(afs))  # what Ray ships to read tasks
    with afs.open_input_stream(apath) as f:
        assert f.read() == b"0123456789"


def _assert_one_clear_line(err: StorageError, *needles: str) -> None:
    msg = str(err)
    assert "\n" not in msg and len(msg) < 400, msg
    for n in needles:
        assert n in msg, (n, msg)
    assert "testing" not in msg  # the dummy credentials never appear


def test_unreachable_endpoint_fails_fast(s3_server):
    t0 = time.monotonic()
    with pytest.raises(StorageError) as ei:
        check_location("s3://bucket/prefix", StorageConfig(endpoint_url="http://127.0.0.1:1"))
    assert time.monotonic() - t0 < 30
    _assert_one_clear_line(ei.value, "s3://bucket/prefix", "127.0.0.1:1", "cannot reach")


def test_missing_bucket(s3_server):
    with pytest.raises(StorageError) as ei:
        check_location("s3://no-such-bucket-xyz/prefix")
    _assert_one_clear_line(ei.value, "no-such-bucket-xyz", "does not exist")


def test_missing_prefix(s3_bucket):
    assert check_location(s3_bucket + "/nothing", must_exist=False) is False
    with pytest.raises(StorageError) as ei:
        check_location(s3_bucket + "/nothing")
    _assert_one_clear_line(ei.value, s3_bucket + "/nothing", "missing or empty")


@contextlib.contextmanager
def moto_auth_enforced(endpoint: str):
    """Make the moto server check credentials (its IAM knows no keys, so every signed request is
    rejected with InvalidAccessKeyId / 403) for the duration of the block."""
    def post(value: str) -> None:
        req = urllib.request.Request(endpoint + "/moto-api/reset-auth", data=value.encode(), method="POST",
                                     headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(req, timeout=10).read()
    post("0")
    try:
        yield
    finally:
        post("inf")


def test_denied_credentials(s3_bucket, s3_server):
    # Anonymous requests against the auth-enforcing moto server crash moto itself (HTTP 500,
    # missing Authorization header), so only rejected signed credentials are tested here.
    fs, path = fsspec_fs(s3_bucket + "/p/x.tar")
    fs.pipe_file(path, b"x")
    with moto_auth_enforced(s3_server):
        t0 = time.monotonic()
        with pytest.raises(StorageError) as ei:
            check_location(s3_bucket + "/p")
        assert time.monotonic() - t0 < 30
    _assert_one_clear_line(ei.value, s3_bucket + "/p", "denied")
    assert check_location(s3_bucket + "/p")  # auth back off


def test_local_missing_dir(tmp_path):
    with pytest.raises(StorageError) as ei:
        check_location(str(tmp_path / "nope"))
    _assert_one_clear_line(ei.value, str(tmp_path / "nope"), "does not exist")
    (tmp_path / "f").write_text("x")
    with pytest.raises(StorageError):
        check_location(str(tmp_path / "f"))
    assert check_location(str(tmp_path / "empty-dir"), must_exist=False) is False
