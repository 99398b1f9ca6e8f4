"""URL -> filesystem: the ONE place that knows about local paths and ``s3://``.

Everything else in the project calls :func:`is_remote`, :func:`join_url`, :func:`read_text` /
:func:`write_text` (small files), :func:`open_atomic` (a large file written in one go),
:func:`ensure_location` (a directory to write into), :func:`fsspec_fs` (listing, reading) or
:func:`arrow_fs` (Ray Data reads) and never looks at a URL's scheme or builds a filesystem itself
(tests/pipeline/test_storage.py fails if ``://`` handling or a scheme comparison appears anywhere
else in pipeline/).
``file:///abs`` and plain paths are the same thing: local.

User paths are resolved ONCE, on the driver, before anything reaches Ray (:func:`resolve_paths`):
a relative ``./runs`` means the driver's working directory, never a Ray worker's (whose working
directory is Ray's per-run artifacts folder).

S3 goes through s3fs (botocore underneath), so the standard AWS configuration applies: credentials
from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, the shared
config/credentials files or the instance profile; the endpoint from ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL`` (or ``endpoint_url`` in the profile, which botocore reads itself); the region from
``AWS_REGION`` / ``AWS_DEFAULT_REGION`` / the profile. :class:`~pipeline.config.StorageConfig` values win
over the environment. Credentials are never read, stored or printed by this module: only botocore sees
them, so the filesystem objects pickle without secrets and re-resolve credentials in each Ray worker
(workers inherit the driver's environment on a local cluster; on a real cluster each node needs its
own credentials - instance profile, IRSA or the same variables in the container).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pipeline.config import StorageConfig
from pipeline.errors import CacrError

__all__ = [
    "StorageError", "Location", "parse_url", "is_s3", "is_remote", "join_url", "resolve_url",
    "resolve_paths", "url_of", "read_text", "write_text", "open_atomic", "ensure_location",
    "resolve_endpoint", "describe_endpoint", "s3fs_options", "fsspec_fs", "arrow_fs",
    "check_location", "check_writable", "list_files", "list_dirs", "storage_unreachable",
]

# Timeouts: the data path retries patiently (pipeline/storage_retry.py: backoff until
# storage.retry_deadline_s, so botocore's own retries are off there); the up-front check must
# answer within ~30 s.
_DATA_CONFIG = {"connect_timeout": 10, "read_timeout": 60,
                "retries": {"total_max_attempts": 1, "mode": "standard"}}
_CHECK_CONFIG = {"connect_timeout": 3, "read_timeout": 8,
                 "retries": {"max_attempts": 2, "mode": "standard"}}
CHECK_TIMEOUT_S = 25.0


class StorageError(CacrError, ValueError):
    """Storage cannot be reached or used (endpoint down, bucket missing, access denied).

    The message is one line naming the URL and what to do; it never contains credentials."""


@dataclass(frozen=True)
class Location:
    url: str          # as given (normalised: no trailing slash)
    scheme: str       # "file" or "s3"
    path: str         # absolute local path, or "bucket/prefix" (no leading/trailing slash)

    @property
    def bucket(self) -> str:
        return self.path.split("/", 1)[0] if self.scheme == "s3" else ""

    @property
    def key(self) -> str:
        return self.path.split("/", 1)[1] if self.scheme == "s3" and "/" in self.path else ""


def parse_url(url: str) -> Location:
    """``s3://bucket/prefix``, ``file:///abs`` or a plain (relative) path."""
    if not isinstance(url, str) or not url.strip():
        raise StorageError(f"empty storage URL {url!r}: give a local directory or s3://bucket/prefix")
    url = url.strip()
    if url.startswith(("s3://", "s3a://")):
        rest = url.split("://", 1)[1].strip("/")
        if not rest or rest.startswith("/"):
            raise StorageError(f"URL '{url}' names no bucket: use s3://bucket/prefix")
        if "@" in rest.split("/", 1)[0]:
            raise StorageError(f"URL '{_redact(url)}' embeds credentials: put them in the AWS "
                               "variables or a profile, never in the URL")
        return Location(f"s3://{rest}", "s3", rest)
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url) and not url.startswith("file://"):
        raise StorageError(f"unsupported URL scheme in '{_redact(url)}': use a local path or s3://bucket/prefix")
    path = url[len("file://"):] if url.startswith("file://") else url
    path = os.path.abspath(os.path.expanduser(path))
    return Location(path, "file", path)


def is_s3(url: str) -> bool:
    return parse_url(url).scheme == "s3"


def is_remote(url: str) -> bool:
    """True for object storage (``s3://``); False for local paths, ``file://`` included."""
    return parse_url(url).scheme != "file"


def join_url(url: str, *names: str) -> str:
    loc = parse_url(url)
    if loc.scheme == "s3":
        return "s3://" + "/".join([loc.path, *[n.strip("/") for n in names]])
    return os.path.join(loc.path, *names)


def resolve_url(url: str) -> str:
    """The URL every process can use: a local path made absolute against THIS process's working
    directory (``~`` expanded, ``file://`` dropped), an ``s3://`` URL normalised."""
    return parse_url(url).url


def url_of(fs_path: str, like: str) -> str:
    """A filesystem path (what Ray reports, e.g. a checkpoint's ``bucket/runs/x/checkpoint_..``)
    back as a URL of the same kind as ``like`` (``s3://bucket/...`` or a local path)."""
    if parse_url(like).scheme == "s3":
        return "s3://" + fs_path.lstrip("/")
    return os.path.abspath(fs_path)


def resolve_paths(cfg):
    """A copy of ``cfg`` (a :class:`~pipeline.config.Config`) with every user location resolved
    by :func:`resolve_url` (``storage_path``, ``data.url``, the debug ``trace_ids_dir``): done once on the driver, before the
    config reaches Ray. (``data.source`` is only read by the driver, in its own directory.)"""
    from pipeline.config import from_dict, to_dict

    out = from_dict(type(cfg), to_dict(cfg))
    from pipeline.data.urls import resolve

    out.storage_path = resolve_url(out.storage_path)
    out.data.url = resolve(out.data.url, resolve_url)  # each '::' part; braces kept
    if out.data.val_url:
        out.data.val_url = resolve(out.data.val_url, resolve_url)
    if out.trace_ids_dir:
        out.trace_ids_dir = os.path.abspath(os.path.expanduser(out.trace_ids_dir))
    return out


def read_text(url: str, storage: StorageConfig | None = None) -> str | None:
    """A small text file (local or s3://); None if it does not exist."""
    loc = parse_url(url)
    if loc.scheme == "file":
        return open(loc.path, encoding="utf-8").read() if os.path.isfile(loc.path) else None
    fs, path = fsspec_fs(url, storage)
    try:
        return fs.cat_file(path).decode("utf-8")
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 - endpoint / bucket / credentials: one line
        raise classify_s3_error(e, url, storage) from None


def _hidden_tmp(path: str) -> str:
    """A temporary name next to ``path`` that readers skip (leading dot) and no other process uses."""
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")


def write_text(url: str, text: str, storage: StorageConfig | None = None) -> None:
    """Write a small text file (local: parents created, replaced atomically; s3://: one PUT)."""
    loc = parse_url(url)
    if loc.scheme == "file":
        os.makedirs(os.path.dirname(loc.path) or ".", exist_ok=True)
        tmp = _hidden_tmp(loc.path)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, loc.path)
        return
    fs, path = fsspec_fs(url, storage)
    try:
        fs.pipe_file(path, text.encode("utf-8"))
    except Exception as e:  # noqa: BLE001
        raise classify_s3_error(e, url, storage) from None


@contextlib.contextmanager
def open_atomic(url: str, storage: StorageConfig | None = None):
    """A binary file object to write ``url`` in one go; readers never see it half written. Local:
    written under a hidden temporary name next to it and renamed on success (removed on failure);
    s3://: s3fs's upload, which only completes (the object only appears) on a clean close. Errors
    pass through as they are (the caller knows what failed)."""
    fs, path = fsspec_fs(url, storage)
    if parse_url(url).scheme != "file":
        with fs.open(path, "wb") as f:
            yield f
        return
    tmp = _hidden_tmp(path)
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def ensure_location(url: str, storage: StorageConfig | None = None) -> None:
    """Make ``url`` ready to receive files: a local directory is created (with its parents); for
    s3:// (where prefixes need no creating) the endpoint, credentials and bucket are checked, so a
    bad location fails fast in one line (:func:`check_location`)."""
    loc = parse_url(url)
    if loc.scheme == "file":
        os.makedirs(loc.path, exist_ok=True)
    else:
        check_location(url, storage, must_exist=False)


def _redact(url: str | None) -> str:
    """Drop any user:password@ part of a URL before it goes into a message."""
    if not url:
        return str(url)
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return url


def resolve_endpoint(storage: StorageConfig | None = None) -> str | None:
    """Explicit config, else the standard AWS variables; ``None`` = botocore's default (AWS or the
    profile's ``endpoint_url``)."""
    storage = storage or StorageConfig()
    return (storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL") or None)


def _resolve_region(storage: StorageConfig) -> str | None:
    return storage.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def describe_endpoint(storage: StorageConfig | None = None) -> str:
    ep = resolve_endpoint(storage)
    return f"endpoint {_redact(ep)}" if ep else "the default AWS endpoint"


def s3fs_options(storage: StorageConfig | None = None, *, check: bool = False) -> dict[str, Any]:
    """Keyword arguments for ``s3fs.S3FileSystem`` (no secrets: botocore resolves credentials);
    the data path's also for :class:`pipeline.storage_retry.RetryingS3FileSystem`."""
    storage = storage or StorageConfig()
    opts: dict[str, Any] = {
        "anon": bool(storage.anonymous),
        "use_listings_cache": False,  # other processes (Ray tasks) write shards: never trust stale listings
        "config_kwargs": dict(_CHECK_CONFIG if check else _DATA_CONFIG),
    }
    if check:
        opts["skip_instance_cache"] = True
    else:
        from pipeline import storage_retry
        opts["retry_deadline_s"] = float(storage.retry_deadline_s)
        opts["retry_tag"] = storage_retry.current_tag()
    ep = resolve_endpoint(storage)
    if ep:
        opts["endpoint_url"] = ep
    region = _resolve_region(storage)
    if region:
        opts["client_kwargs"] = {"region_name": region}
    if storage.profile:
        opts["profile"] = storage.profile
    return opts


def fsspec_fs(url: str, storage: StorageConfig | None = None, *, check: bool = False):
    """(fsspec filesystem, path) for ``url``. Picklable: safe to ship into Ray tasks. S3 requests
    are retried through an outage (:mod:`pipeline.storage_retry`), except with ``check``."""
    loc = parse_url(url)
    if loc.scheme == "file":
        import fsspec
        return fsspec.filesystem("file"), loc.path
    if check:
        import s3fs
        return s3fs.S3FileSystem(**s3fs_options(storage, check=True)), loc.path
    from pipeline.storage_retry import RetryingS3FileSystem
    return RetryingS3FileSystem(**s3fs_options(storage)), loc.path


def arrow_fs(url: str, storage: StorageConfig | None = None):
    """(pyarrow filesystem, path) for Ray Data: local, or s3fs wrapped as ``PyFileSystem(FSSpecHandler)``.

    s3fs rather than pyarrow's own S3 client so that one configuration (profile, endpoint, timeouts)
    serves both paths; the wrapper pickles by re-creating s3fs in the worker."""
    import pyarrow.fs as pafs
    loc = parse_url(url)
    if loc.scheme == "file":
        return pafs.LocalFileSystem(), loc.path
    fs, path = fsspec_fs(url, storage)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


# ---------------------------------------------------------------------------------------------
# Up-front check: one clear error, fast

_DENIED_CODES = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                 "InvalidToken", "AllAccessDisabled", "Forbidden", "403", "InvalidClientTokenId",
                 "UnrecognizedClientException")
_UNREACHABLE = ("EndpointConnectionError", "ConnectTimeout", "ConnectionError", "Connection refused",
                "Could not connect", "timed out", "Timeout", "Name or service not known",
                "nodename nor servname", "Cannot connect to host", "ClientConnectorError",
                "Temporary failure in name resolution")


def _error_text(exc: BaseException) -> str:
    """Type names and messages of an exception chain (for classification only, never printed)."""
    parts = []
    seen = 0
    while exc is not None and seen < 6:
        parts.append(type(exc).__name__)
        parts.append(str(exc))
        resp = getattr(exc, "response", None)
        if isinstance(resp, dict):
            parts.append(str(resp.get("Error", {}).get("Code", "")))
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return " ".join(parts)


def classify_s3_error(exc: BaseException, url: str, storage: StorageConfig | None = None) -> StorageError:
    """Turn any exception from an S3 call into a one-line :class:`StorageError`."""
    loc = parse_url(url)
    text = _error_text(exc)
    where = describe_endpoint(storage)
    if any(c in text for c in ("NoCredentialsError", "Unable to locate credentials", "PartialCredentialsError")):
        return StorageError(
            f"no AWS credentials found for '{loc.url}' at {where}: set AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or storage.anonymous=true for a public bucket")
    if "ProfileNotFound" in text or "could not be found" in text and "profile" in text:
        return StorageError(f"AWS profile '{storage.profile if storage else ''}' not found for '{loc.url}': "
                            "check storage.profile / AWS_PROFILE and ~/.aws/config")
    if isinstance(exc, (PermissionError,)) or any(c in text for c in _DENIED_CODES):
        how = "anonymous (unsigned) requests" if (storage and storage.anonymous) else "the configured credentials"
        return StorageError(
            f"access to '{loc.url}' at {where} denied for {how}: check AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE (storage.profile) or the bucket policy")
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return StorageError(f"bucket '{loc.bucket}' of '{loc.url}' does not exist at {where}: "
                            "create it or fix the URL")
    if any(c in text for c in _UNREACHABLE) or isinstance(exc, (TimeoutError, ConnectionError)):
        return StorageError(f"cannot reach S3 {where} for '{loc.url}' (connection failed or timed out): "
                            "check AWS_ENDPOINT_URL / storage.endpoint_url and that the server is up")
    if isinstance(exc, FileNotFoundError):
        return StorageError(f"'{loc.url}' not found at {where}: check the bucket and prefix")
    return StorageError(f"S3 request for '{loc.url}' at {where} failed ({type(exc).__name__}): "
                        "check the endpoint, credentials and URL")


# What an S3 request that never got an answer leaves in an error's text (botocore's exception
# names and messages, our own StorageError): the endpoint was down, not the request wrong.
_NO_ANSWER = ("EndpointConnectionError", "Could not connect to the endpoint URL", "ConnectionClosedError",
              "ConnectTimeoutError", "Connect timeout on endpoint URL", "Read timeout on endpoint URL",
              "cannot reach S3 ")


def storage_unreachable(error: BaseException | str) -> bool:
    """True when ``error`` (however deeply Ray wrapped it) is an S3 request that was given up
    because the endpoint did not answer (see :mod:`pipeline.storage_retry`)."""
    if isinstance(error, str):
        return any(m in error for m in _NO_ANSWER)
    seen, todo = 0, [error]
    while todo and seen < 24:  # the cause chain, and exceptions held in attributes (Ray Train's
        exc = todo.pop()       # WorkerGroupError keeps each worker's error in worker_failures)
        seen += 1
        if any(m in _error_text(exc) for m in _NO_ANSWER):
            return True
        for v in vars(exc).values() if hasattr(exc, "__dict__") else ():
            items = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else [v]
            todo += [x for x in items if isinstance(x, BaseException)]
    return False


def _with_deadline(fn, timeout: float):
    ex = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="storage-check")
    fut = ex.submit(fn)
    try:
        return fut.result(timeout=timeout)
    finally:
        ex.shutdown(wait=False, cancel_futures=True)


def check_location(url: str, storage: StorageConfig | None = None, *, must_exist: bool = True,
                   timeout: float = CHECK_TIMEOUT_S) -> bool:
    """Fail fast with a :class:`StorageError` if ``url`` cannot be used.

    S3: the endpoint answers, the credentials are accepted and the bucket exists (one
    ``ListObjectsV2`` with short timeouts). Returns whether anything exists under the prefix; with
    ``must_exist`` an empty/missing prefix raises too. Local: the directory exists (``must_exist``)."""
    loc = parse_url(url)
    if loc.scheme == "file":
        exists = os.path.isdir(loc.path)
        if must_exist and not exists:
            if os.path.exists(loc.path):
                raise StorageError(f"'{loc.url}' is a file, not a directory of shards")
            raise StorageError(f"directory '{loc.url}' does not exist: run `cacr prepare SOURCE {url}` first "
                               "or fix the path")
        return exists and bool(os.listdir(loc.path))
    fs, _ = fsspec_fs(url, storage, check=True)
    prefix = loc.key.rstrip("/")

    def probe():
        kw = {"Bucket": loc.bucket, "MaxKeys": 1}
        if prefix:
            kw["Prefix"] = prefix + "/"
        return fs.call_s3("list_objects_v2", **kw)

    t0 = time.monotonic()
    try:
        resp = _with_deadline(probe, timeout)
    except concurrent.futures.TimeoutError:
        raise StorageError(f"cannot reach S3 {describe_endpoint(storage)} for '{loc.url}': no answer in "
                           f"{time.monotonic() - t0:.0f} s; check AWS_ENDPOINT_URL / storage.endpoint_url "
                           "and the network") from None
    except Exception as e:  # noqa: BLE001 - every failure becomes one clear message
        raise classify_s3_error(e, url, storage) from None
    found = bool(resp.get("KeyCount", len(resp.get("Contents", []) or [])))
    if must_exist and not found:
        raise StorageError(f"nothing under '{loc.url}' at {describe_endpoint(storage)}: the prefix is "
                           f"missing or empty; run `cacr prepare SOURCE {loc.url}` or fix the URL")
    return found


def check_writable(url: str, storage: StorageConfig | None = None, *,
                   timeout: float = CHECK_TIMEOUT_S) -> None:
    """Fail fast with a :class:`StorageError` if a run could not write under ``url``.

    S3: :func:`check_location` (endpoint answers, credentials accepted, bucket exists). Local: the
    nearest existing ancestor is a writable directory (the rest is created by the run)."""
    loc = parse_url(url)
    if loc.scheme != "file":
        check_location(url, storage, must_exist=False, timeout=timeout)
        return
    p = loc.path
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    if not os.path.isdir(p):
        raise StorageError(f"cannot write under '{loc.url}': '{p}' is a file, not a directory")
    if not os.access(p, os.W_OK | os.X_OK):
        raise StorageError(f"cannot write under '{loc.url}': directory '{p}' is not writable")


def list_dirs(url: str, storage: StorageConfig | None = None) -> list[str]:
    """Names of the sub-directories directly under ``url`` (sorted; [] if ``url`` is missing)."""
    loc = parse_url(url)
    if loc.scheme == "file":
        if not os.path.isdir(loc.path):
            return []
        return sorted(n for n in os.listdir(loc.path) if os.path.isdir(os.path.join(loc.path, n)))
    fs, path = fsspec_fs(url, storage)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    except Exception as e:  # noqa: BLE001
        raise classify_s3_error(e, url, storage) from None
    return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory")


def list_files(url: str, storage: StorageConfig | None = None, suffix: str = "") -> dict[str, int]:
    """``{name: size}`` of the files directly under ``url`` (names relative to it)."""
    loc = parse_url(url)
    fs, path = fsspec_fs(url, storage)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    except Exception as e:  # noqa: BLE001
        if loc.scheme == "s3":
            raise classify_s3_error(e, url, storage) from None
        raise
    out = {}
    for e in entries:
        if e.get("type") != "file":
            continue
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        if name.endswith(suffix):
            out[name] = int(e.get("size") or 0)
    return out
