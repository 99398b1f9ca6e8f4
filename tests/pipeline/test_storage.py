"""pipeline.storage: URL parsing, s3fs options, and one clear error per storage failure, fast.

Every S3 call goes over HTTP to the moto server of the ``s3_server`` fixture (no in-process mocks).
"""
from __future__ import annotations

import ast
import contextlib
import pickle
import re
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.config import StorageConfig
from pipeline.storage import (StorageError, arrow_fs, check_location, check_writable, describe_endpoint,
                              fsspec_fs, is_remote, join_url, list_dirs, list_files, parse_url,
                              read_text, resolve_paths, resolve_url, s3fs_options, url_of, write_text)


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


# ---------------------------------------------------------------------------------------------
# The one storage API: scheme checks, small files, user paths resolved once

REPO = Path(__file__).resolve().parents[2]
# storage schemes (and the bare separator); http:// of the Ray dashboard is not storage
_SCHEME = re.compile(r"^(s3|s3a|gs|gcs|az|abfs|hdfs|file)?://$")


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


_SCHEME_NAMES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "hdfs", "file"}


def _names_a_scheme(node: ast.AST) -> bool:
    """``x.scheme``, or a literal storage scheme name ("s3", "file", also inside a tuple / list /
    set literal) as one side of a comparison."""
    if isinstance(node, ast.Attribute):
        return node.attr == "scheme"
    if isinstance(node, ast.Constant):
        return node.value in _SCHEME_NAMES
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_names_a_scheme(e) for e in node.elts)
    return False


def scheme_handling(path: Path) -> list[str]:
    """Code in ``path`` that looks at or builds a URL scheme itself: a string literal that IS a
    scheme ("://", "s3://", "file://", also as the literal head of an f-string like
    f"s3://{bucket}"), or a comparison of a scheme (``parse_url(u).scheme == "s3"``,
    ``scheme in ("s3", "file")``). Help texts that merely mention s3://bucket/prefix, docstrings
    and comments are not code that handles URLs."""
    tree = ast.parse(path.read_text())
    docs = _docstring_nodes(tree)
    hits = [(node.lineno, repr(node.value)) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docs and _SCHEME.match(node.value)]
    hits += [(node.lineno, "scheme comparison") for node in ast.walk(tree) if isinstance(node, ast.Compare)
             and any(_names_a_scheme(o) for o in (node.left, *node.comparators))]
    return [f"{path.name}:{line}: {what}" for line, what in sorted(hits)]


def test_only_storage_py_handles_url_schemes():
    """storage.py is THE place that knows local from s3:// (is_remote, join_url, read_text,
    write_text, url_of): a `"://" in url` check anywhere else in pipeline/ is the bug this guards
    against (two kinds of checks disagreed on file://)."""
    offenders = []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        if path.name == "storage.py" and path.parent.name == "pipeline":
            continue
        offenders += [f"{path.relative_to(REPO).parent}/{hit}" for hit in scheme_handling(path)]
    assert offenders == [], "URL-scheme handling outside pipeline/storage.py:\n" + "\n".join(offenders)


def test_scheme_checker_sees_the_patterns_it_forbids(tmp_path):
    # the guard itself must catch what it is for (else the test above passes vacuously)
    f = tmp_path / "probe.py"
    f.write_text('"""Docstring mentioning s3://bucket/x is fine."""\nremote = "://" in u\n'
                 'x = f"s3://{b}/k"\nhelp_ = "local dir or s3://bucket/prefix"\n# "://" in a comment\n'
                 'if parse_url(u).scheme == "s3":\n    pass\nlocal = loc.scheme != "file"\n'
                 'ok = kind in ("s3", "gs")\nfine = fmt == "png" and loc.path == p\n')
    assert [h.split(": ", 1)[1] for h in scheme_handling(f)] == [
        "'://'", "'s3://'", "scheme comparison", "scheme comparison", "scheme comparison"]


def test_is_remote_and_file_urls_agree(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_remote("s3://b/x") and not is_remote("./runs") and not is_remote(f"file://{tmp_path}")
    assert resolve_url("./runs") == resolve_url(f"file://{tmp_path}/runs") == str(tmp_path / "runs")
    assert resolve_url("s3://b/p/") == "s3://b/p"
    assert url_of("b/runs/x/checkpoint_1", like="s3://b/runs") == "s3://b/runs/x/checkpoint_1"
    assert url_of(str(tmp_path / "c"), like="./runs") == str(tmp_path / "c")


def test_resolve_paths_makes_user_paths_absolute_once(tmp_path, monkeypatch):
    from pipeline.config import load_config

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["storage_path=./runs", "data.url=data/x"])
    out = resolve_paths(cfg)
    assert out.storage_path == str(tmp_path / "runs") and out.data.url == str(tmp_path / "data" / "x")
    assert cfg.storage_path == "./runs"  # a copy: the user's config is untouched
    s3 = resolve_paths(load_config(None, ["storage_path=s3://b/runs/", "data.url=s3://b/d"]))
    assert (s3.storage_path, s3.data.url) == ("s3://b/runs", "s3://b/d")


def test_read_write_text_local_and_s3(tmp_path, s3_bucket):
    for url in (str(tmp_path / "a" / "b.txt"), f"file://{tmp_path}/c.txt", f"{s3_bucket}/x/y.txt"):
        assert read_text(url) is None
        write_text(url, "héllo\n")
        assert read_text(url) == "héllo\n"
    assert list_dirs(s3_bucket) == ["x"] and list_dirs(str(tmp_path)) == ["a"]
    assert list_dirs(str(tmp_path / "none")) == []


def test_check_writable(tmp_path, s3_server):
    check_writable(str(tmp_path / "new" / "runs"))  # created later by the run
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StorageError, match="is a file"):
        check_writable(str(tmp_path / "afile" / "runs"))
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-cacr'.*does not exist"):
        check_writable("s3://no-such-bucket-cacr/runs")


def test_open_atomic_readers_never_see_a_half_written_file(tmp_path, s3_bucket):
    from pipeline.storage import ensure_location, open_atomic

    local = tmp_path / "new" / "dir"
    ensure_location(str(local))  # created, parents too
    for url in (str(local / "a.tar"), f"{s3_bucket}/atomic/a.tar"):
        with open_atomic(url) as f:
            f.write(b"half")
            assert list_files(url.rsplit("/", 1)[0], suffix=".tar") == {}  # not there yet
        assert list_files(url.rsplit("/", 1)[0], suffix=".tar") == {"a.tar": 4}
    with pytest.raises(RuntimeError):
        with open_atomic(str(local / "b.tar")) as f:
            f.write(b"partial")
            raise RuntimeError("writer failed")
    assert sorted(p.name for p in local.iterdir()) == ["a.tar"]  # no b.tar, no temporary left
    with pytest.raises(StorageError, match="does not exist"):
        ensure_location("s3://no-such-bucket-cacr/x")


# ---------------------------------------------------------------------------------------------
# Outages: retried with backoff until storage.retry_deadline_s, counted, then one clear failure


def test_outage_is_ridden_out_with_counted_retries(s3_bucket, s3_outage):
    import threading

    from pipeline import storage_retry

    storage_retry.set_tag("outage-test")
    try:
        cfg = StorageConfig(endpoint_url=s3_outage.endpoint, retry_deadline_s=60)
        url = s3_bucket + "/p/x.txt"
        write_text(url, "before", cfg)
        s3_outage.stop()
        threading.Timer(3.0, s3_outage.start).start()  # back on the same port after 3 s
        write_text(url, "during", cfg)                 # waits the outage out instead of failing
        assert read_text(url, cfg) == "during"
        counts = storage_retry.local_counts("outage-test")
        assert counts["retries"] >= 1 and counts["gave_up"] == 0 and counts["wait_s"] >= 2
    finally:
        storage_retry.set_tag(None)


def test_endpoint_gone_for_good_fails_after_the_deadline_naming_it(s3_bucket, s3_outage):
    from pipeline import storage_retry

    cfg = StorageConfig(endpoint_url=s3_outage.endpoint, retry_deadline_s=2)
    write_text(s3_bucket + "/p/y.txt", "x", cfg)
    s3_outage.stop()
    before = storage_retry.local_counts("")
    t0 = time.monotonic()
    with pytest.raises(StorageError) as ei:
        read_text(s3_bucket + "/p/y.txt", cfg)
    assert 2 <= time.monotonic() - t0 < 30  # waited out the deadline, then gave up
    _assert_one_clear_line(ei.value, s3_outage.endpoint, "cannot reach")
    after = storage_retry.local_counts("")
    assert after["gave_up"] == before["gave_up"] + 1 and after["retries"] > before["retries"]


def test_ray_data_read_path_reports_the_outage_not_a_missing_file(s3_bucket, s3_outage):
    """Ray Data reads through pyarrow's fsspec wrapper, which checks ``isfile`` first: an endpoint
    that stopped answering must surface as such (one line naming it), never as "file not found"."""
    from pipeline.storage import storage_unreachable

    cfg = StorageConfig(endpoint_url=s3_outage.endpoint, retry_deadline_s=1)
    write_text(s3_bucket + "/p/z.tar", "x", cfg)
    afs, path = arrow_fs(s3_bucket + "/p/z.tar", cfg)
    s3_outage.stop()
    with pytest.raises(Exception) as ei:
        afs.open_input_stream(path).read()
    assert not isinstance(ei.value, FileNotFoundError) and storage_unreachable(ei.value), repr(ei.value)

    class Wrapped(RuntimeError):  # how Ray Train hands a worker's error to the driver
        def __init__(self, failures):
            super().__init__("Training failed due to worker errors")
            self.worker_failures = failures
    assert storage_unreachable(Wrapped({0: ei.value})) and not storage_unreachable(Wrapped({0: KeyError()}))


def test_retry_policy_retries_only_what_retrying_can_fix():
    from botocore.exceptions import EndpointConnectionError

    from pipeline.storage_retry import backoff, retry_reason

    def answer(status, code=""):
        return (None, {"ResponseMetadata": {"HTTPStatusCode": status}, "Error": {"Code": code}})

    assert retry_reason(None, EndpointConnectionError(endpoint_url="http://x")) == "EndpointConnectionError"
    assert retry_reason(answer(503, "SlowDown"), None) and retry_reason(answer(500), None)
    for final in (answer(200), answer(403, "AccessDenied"), answer(404, "NoSuchKey"), answer(400)):
        assert retry_reason(final, None) is None
    delays = [backoff(a) for a in range(1, 12)]
    assert all(0 < d <= 8.0 for d in delays) and backoff(1) <= 0.5 and max(delays) > 2
