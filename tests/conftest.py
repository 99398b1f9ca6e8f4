"""Shared fixtures.

* ``s3_server`` (session): moto's S3 server on 127.0.0.1 - a real HTTP endpoint reached through
  s3fs/botocore like AWS or MinIO. Sets dummy credentials, region and ``AWS_ENDPOINT_URL`` in
  ``os.environ`` for the session (restored afterwards) and isolates the tests from ~/.aws.
  Returns the endpoint URL.
* ``s3_bucket`` (function): a fresh, empty bucket; returns ``"s3://<name>"``.
* ``ray_session`` (session): Ray started the way every command starts it
  (:func:`pipeline.ray_start.start_ray`) with 8 logical CPUs (over-declared on purpose: tasks
  and workers ask for fractions), started AFTER ``s3_server`` so every Ray worker inherits the S3
  environment from the raylet (never through a runtime_env); ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=120``;
  custom resource ``cacr_data`` (to test ``data.data_resource`` pinning). Dashboard on when it
  starts (Tune needs the State API); falls back to no dashboard. Returns ``ray``.
* ``digits_shards`` (session): ``cacr prepare digits`` output in a temp dir (train 1438 / val 359
  samples, 8 shards each, 32 px PNG); returns the directory path. Treat as read-only: copy it
  (``copy_shards``) before damaging it.
* ``s3_digits_shards`` (session): the same shard set uploaded to a bucket; returns its s3:// URL.
* ``copy_shards`` / ``upload_to_s3``: helpers (as fixtures) to copy a shard set locally / to S3.
* ``fresh_user(secret) -> (env, [work, home, ray_tmp])``: the environment of a user on a fresh
  machine with AWS keys exported (``secret`` as the secret key; moto accepts any), an empty HOME
  and a private ``RAY_TMPDIR``, for a command run as a subprocess in ``work``.
* ``find_secret(secret, dirs, s3_prefixes=()) -> [paths]``: every file / object holding it.
* ``ray_starts`` (function): every attempt of the test's command to start or join Ray (a check
  "fails before Ray starts" asserts it stays empty).
* ``write_webdataset(pattern, n, style=timm|img2dataset)``: a shard set as other tools write it,
  with ``webdataset.ShardWriter``.
* ``s3_outage`` (function): an :class:`Outage` - a TCP proxy on its own fixed port in front of the
  moto server. ``.endpoint`` is what a run is pointed at; ``.stop()`` takes the endpoint away
  (listening socket closed: new connections are refused; open ones reset), ``.start()`` brings it
  back on the SAME port, with moto's state intact (the data and checkpoints stay: an outage of
  the endpoint, not a wipe of the store). Why a proxy rather than stopping moto itself: moto's
  ``ThreadedMotoServer.stop()`` leaves its listening socket open (connections then hang instead of
  being refused, and no server can bind the port again), and a fresh moto process starts empty.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import uuid
from pathlib import Path

import pytest

_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}
_S3_ENV_DROP = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
                "AWS_ENDPOINT_URL_S3", "AWS_CA_BUNDLE")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    aws_dir = tmp_path_factory.mktemp("aws")
    env = {**_S3_ENV, "AWS_ENDPOINT_URL": endpoint,
           "AWS_CONFIG_FILE": str(aws_dir / "config"),
           "AWS_SHARED_CREDENTIALS_FILE": str(aws_dir / "credentials"),
           "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in [*env, *_S3_ENV_DROP]}
    for k in _S3_ENV_DROP:
        os.environ.pop(k, None)
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def _s3_client(endpoint: str):
    import boto3
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def make_bucket(endpoint: str, prefix: str = "t") -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    _s3_client(endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_bucket(s3_server):
    return "s3://" + make_bucket(s3_server)


def upload_dir(local_dir: str, url: str) -> str:
    """Copy the files of ``local_dir`` (recursively) to ``url`` through s3fs."""
    from pipeline.storage import fsspec_fs
    fs, base = fsspec_fs(url)
    for root, _, names in os.walk(local_dir):
        for n in names:
            src = os.path.join(root, n)
            rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
            fs.put_file(src, f"{base}/{rel}")
    return url


@pytest.fixture
def upload_to_s3(s3_server):
    """``upload_to_s3(local_dir, url) -> url``: copy a directory to S3 through s3fs."""
    return upload_dir


@pytest.fixture
def copy_shards():
    """``copy_shards(src_dir, dst_dir) -> dst_dir``: a private, damageable copy of a shard set."""
    def copy(src, dst) -> str:
        shutil.copytree(src, dst)
        return str(dst)
    return copy


@pytest.fixture(scope="session")
def ray_session(s3_server, tmp_path_factory):
    import ray

    from pipeline.ray_start import start_ray

    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "120")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if ray.is_initialized():
        ray.shutdown()
    # The commands' own start-up (dashboard on a free port, State API pinned to it, a NEW local
    # instance); log_level info: Ray's console left as it is (tests read no console here).
    start_ray(num_cpus=8, log_level="info", dashboard=True, log_to_driver=False,
              logging_level=logging.WARNING, object_store_memory=1 << 30,
              resources={"cacr_data": 1000})
    from ray.data import DataContext
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def fresh_user(s3_server, tmp_path):
    import tempfile

    made = []

    def make(secret: str):
        work, home = tmp_path / "work", tmp_path / "home"
        work.mkdir()
        home.mkdir()
        ray_tmp = Path(tempfile.mkdtemp(prefix="ru", dir="/tmp"))  # short: Ray's socket paths
        made.append(ray_tmp)
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE")}
        env.update(HOME=str(home), RAY_TMPDIR=str(ray_tmp), AWS_ACCESS_KEY_ID="AKIACACRTESTKEY",
                   AWS_SECRET_ACCESS_KEY=secret, OMP_NUM_THREADS="1")
        return env, [work, home, ray_tmp]

    yield make
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def find_secret():
    def find(secret: str, dirs, s3_prefixes=()) -> list[str]:
        from pipeline.storage import fsspec_fs

        hits, needle = [], secret.encode()
        for d in dirs:
            for p in Path(d).rglob("*"):
                try:
                    if p.is_file() and not p.is_symlink() and needle in p.read_bytes():
                        hits.append(str(p))
                except OSError:
                    pass  # a socket, or a file Ray removed meanwhile
        for url in s3_prefixes:
            fs, path = fsspec_fs(url)
            hits += [f"s3://{key}" for key in fs.find(path) if needle in fs.cat_file(key)]
        return hits
    return find


@pytest.fixture
def ray_starts(monkeypatch) -> list:
    """Every attempt of this test's command to start or join Ray (none may happen). Recorded at
    the one place commands start Ray, and at ``ray.init``, so a Ray that other tests of the
    session already started in this process does not count."""
    import ray

    import pipeline.ray_start
    import pipeline.tune  # imports start_ray by name at import time: import it BEFORE patching (else
    # a first import under the patch binds `refuse` for the rest of the process), and patch it too

    calls: list = []

    def refuse(*a, **kw):
        calls.append((a, kw))
        raise AssertionError("Ray was started")

    monkeypatch.setattr(pipeline.ray_start, "start_ray", refuse)
    monkeypatch.setattr(pipeline.tune, "start_ray", refuse)
    monkeypatch.setattr(ray, "init", refuse)
    return calls


@pytest.fixture(scope="session")
def write_webdataset():
    """``write(pattern, n, *, style, maxcount=16, seed=0) -> [paths]``: a shard set as other tools
    write it, with ``webdataset.ShardWriter`` (``pattern`` like ``dir/imagenet1k-train-%04d.tar``):

    * ``style="timm"``: ``<key>.jpg`` + ``<key>.cls`` (label ``i % 5``), the images 24 x 40 (landscape);
    * ``style="img2dataset"``: ``<key>.jpg`` (40 x 24, portrait) + ``.txt`` caption + ``.json``
      metadata (url, caption, status, width, height, and ``meta.label`` = ``i % 3``), no ``.cls``.

    Key ``i`` is ``f"{seed}-{i:06d}"``; pixel values are random (seeded)."""
    import io
    import json

    import numpy as np
    import webdataset as wds
    from PIL import Image

    def write(pattern: str, n: int, *, style: str, maxcount: int = 16, seed: int = 0) -> list[str]:
        rng = np.random.default_rng(seed)
        Path(pattern).parent.mkdir(parents=True, exist_ok=True)
        h, w = (24, 40) if style == "timm" else (40, 24)
        written = []
        with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0) as sink:
            for i in range(n):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
                sample = {"__key__": f"{seed}-{i:06d}", "jpg": buf.getvalue()}
                if style == "timm":
                    sample["cls"] = i % 5
                else:
                    sample["txt"] = f"a caption {i}"
                    sample["json"] = json.dumps({"url": f"http://example.com/{i}.jpg", "caption": f"c{i}",
                                                 "status": "success", "width": w, "height": h,
                                                 "meta": {"label": i % 3}}).encode()
                sink.write(sample)
                if sink.fname not in written:
                    written.append(sink.fname)
        return written
    return write


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> str:
    from pipeline.data import prepare
    out = tmp_path_factory.mktemp("digits") / "shards"
    prepare("digits", str(out), progress=False, echo=lambda m: None)
    return str(out)


@pytest.fixture(scope="session")
def s3_digits_shards(s3_server, digits_shards) -> str:
    return upload_dir(digits_shards, f"s3://{make_bucket(s3_server, 'digits')}/sets/digits")


class Outage:
    """A TCP proxy 127.0.0.1:<port> -> the moto server, that can go away and come back."""

    def __init__(self, upstream: str):
        host, port = upstream.rsplit("//", 1)[1].split(":")
        self._upstream = (host, int(port))
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        from pipeline.ray_start import free_port
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.start()

    def start(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(128)
        self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def stop(self) -> None:
        """The endpoint goes away: refuse new connections, reset the open ones."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            listener.close()
        for c in conns:
            try:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")  # RST
                c.close()
            except OSError:
                pass

    @property
    def up(self) -> bool:
        return self._listener is not None

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by stop()
            try:
                upstream = socket.create_connection(self._upstream, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self._lock:
            self._conns = [c for c in self._conns if c not in (src, dst)]


@pytest.fixture
def s3_outage(s3_server):
    proxy = Outage(s3_server)
    try:
        yield proxy
    finally:
        proxy.stop()


# ----------------------------------------------------------------------------------------------
# Nothing left behind for the next test


def _leftover_threads(before: set, grace_s: float = 10.0) -> list[str]:
    """Non-daemon threads started during the test and still alive after ``grace_s`` (a daemon
    thread cannot keep the process alive; a non-daemon one can, and runs into the next test)."""
    import threading
    import time

    deadline = time.monotonic() + grace_s
    while True:
        left = [t for t in threading.enumerate()
                if t not in before and t.is_alive() and not t.daemon and t is not threading.main_thread()]
        if not left or time.monotonic() > deadline:
            return [t.name for t in left]
        left[0].join(timeout=0.2)


@pytest.fixture(autouse=True)
def _leaves_nothing_behind(request):
    """Every test ends with no torch process group of its own, no Ray started by it other than
    the shared ``ray_session``, and no non-daemon thread of its own: what one test leaves, the
    next one runs into (a SyncBatchNorm under a stale group, a driver whose cluster is gone)."""
    import sys
    import threading

    before = set(threading.enumerate())
    ray_was_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    yield
    problems = []
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        problems.append("a torch.distributed process group")
    ray = sys.modules.get("ray")
    if (ray is not None and ray.is_initialized() and not ray_was_up
            and "ray_session" not in request.fixturenames):
        ray.shutdown()
        problems.append("a Ray instance (use the ray_session fixture)")
    threads = _leftover_threads(before)
    if threads:
        problems.append(f"non-daemon threads {threads}")
    assert not problems, f"the test left {', '.join(problems)} behind"


# ----------------------------------------------------------------------------------------------
# The order files are handed to the test processes (pyproject: -n 2 --dist loadfile)

#: seconds each of the longest files took in a full run on the 2-core VM (`--junitxml`, summed
#: per file): only the ORDER matters, so a stale figure costs balance, never a result
_MEASURED_S = {  # per-file wall seconds in a clean-clone run on the 2-core VM (ci10, 2026-12-08)
    "faults/test_interrupts.py": 910, "acceptance/test_readme_local.py": 690,
    "faults/test_tune_faults.py": 530, "pipeline/test_train.py": 470,
    "acceptance/test_readme_longtail.py": 420, "acceptance/test_webdataset_sets.py": 400,
    "acceptance/test_readme_s3.py": 390, "acceptance/test_readme_tune.py": 320,
    "pipeline/test_evaluate.py": 300, "pipeline/test_tune.py": 280,
    "infra/test_multinode.py": 265, "acceptance/test_ray_job_fresh_home.py": 260,
    "acceptance/test_readme_moco.py": 235, "pipeline/test_methods_train.py": 220,
    "faults/test_storage_outage.py": 210, "pipeline/test_data_read.py": 200,
    "faults/test_bounded_memory.py": 200, "faults/test_preemption.py": 95,
}


def _file_weight(path: str, slow: int) -> float:
    """A file's expected cost in seconds: measured for the longest, else ~5 s per slow test."""
    for name, seconds in _MEASURED_S.items():
        if path.endswith(name):
            return seconds
    return 5.0 * slow


def pytest_collection_modifyitems(config, items):
    """Heaviest files first, a file's tests kept together in their own order: with the files
    handed out one at a time, the long end-to-end files start at once and the many short ones
    fill the gaps, instead of one long file starting last and running alone at the end."""
    slow: dict[str, int] = {}
    for item in items:
        path = str(item.path)
        slow[path] = slow.get(path, 0) + (item.get_closest_marker("slow") is not None)
    first_seen = {p: i for i, p in reversed(list(enumerate(str(it.path) for it in items)))}
    items.sort(key=lambda it: (-_file_weight(str(it.path), slow[str(it.path)]),
                               first_seen[str(it.path)]))
