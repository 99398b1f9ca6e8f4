"""Riding out an object-storage outage: every S3 request retried with backoff until a deadline,
and every retry counted.

:func:`pipeline.storage.fsspec_fs` (hence :func:`~pipeline.storage.arrow_fs`: Ray Data reads, Ray
Train's checkpoint uploads, TensorBoard uploads, checkpoint loads) hands out a
:class:`RetryingS3FileSystem`: s3fs with botocore's own retries switched off and ONE retry
policy in their place, hooked into botocore's ``needs-retry`` event, so it sees every request
the client sends (single calls, paginated listings, multipart parts alike):

* retried: the request never got an answer (connection refused or reset, timeouts: the endpoint
  is down or unreachable) or the store said "try again" (HTTP 500/502/503/504, SlowDown,
  Throttling, RequestTimeout);
* backoff: 0.5 s doubling up to 8 s, with jitter (a cluster's workers do not retry in lockstep);
* deadline: ``storage.retry_deadline_s`` (default 120 s) after a request's FIRST failure it is
  given up and its error raised (which names the endpoint); a re-run resumes from the last
  checkpoint once the store answers again.

Counting. Each process counts its retries per *tag* (the run name: :func:`set_tag`, captured by
every filesystem object created afterwards, so it travels with the pickled filesystem into Ray
Data tasks). A process with Ray up also publishes its counts to the cluster's key-value store,
so rank 0 of a run can sum them over all processes (:func:`cluster_counts`) for the epoch line,
TensorBoard (``storage/retries``) and the final summary. The first retry of an outage and
then one line every 10 s are logged (WARNING, ``pipeline.storage``), and so is the recovery.

The up-front checks (:func:`pipeline.storage.check_location`) do NOT use this: they must answer
within seconds.
"""
from __future__ import annotations

import json
import logging
import os
import random
import socket
import sys
import threading
import time
from typing import Any

import s3fs

log = logging.getLogger("pipeline.storage")

BASE_DELAY_S = 0.5
MAX_DELAY_S = 8.0
DEFAULT_DEADLINE_S = 120.0
LOG_EVERY_S = 10.0
_RETRY_STATUS = (500, 502, 503, 504)
_RETRY_CODES = ("SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
                "ServiceUnavailable", "RequestLimitExceeded")
KV_PREFIX = "cacr:storage-retries:"

_lock = threading.Lock()
_counts: dict[str, dict[str, float]] = {}   # tag -> {"retries", "gave_up", "wait_s"}
_tag = ""
_last_log = 0.0


def set_tag(tag: str | None) -> None:
    """Count this process's retries under ``tag`` (a run name) from now on; filesystem objects
    created afterwards carry it into the processes they are shipped to."""
    global _tag
    _tag = tag or ""


def current_tag() -> str:
    return _tag


def local_counts(tag: str | None = None) -> dict[str, float]:
    """This process's counts for ``tag`` (default: the current one)."""
    with _lock:
        return dict(_counts.get(_tag if tag is None else tag, {"retries": 0, "gave_up": 0, "wait_s": 0.0}))


def cluster_counts(tag: str | None = None) -> dict[str, float]:
    """Counts for ``tag`` summed over every process of the Ray cluster that published some (this
    one included); this process's own counts when Ray is not up."""
    tag = _tag if tag is None else tag
    if not _ray_up():
        return local_counts(tag)
    from pipeline import ray_compat

    total = {"retries": 0, "gave_up": 0, "wait_s": 0.0}
    for key in ray_compat.kv_keys((KV_PREFIX + tag + "|").encode()):
        raw = ray_compat.kv_get(key)
        for k, v in (json.loads(raw) if raw else {}).items():
            total[k] = total.get(k, 0) + v
    return total


def _ray_up() -> bool:
    ray = sys.modules.get("ray")
    try:
        return bool(ray is not None and ray.is_initialized())
    except Exception:  # noqa: BLE001 - half-imported / shutting down
        return False


def _kv_key(tag: str) -> bytes:
    return f"{KV_PREFIX}{tag}|{socket.gethostname()}:{os.getpid()}".encode()


def _count(tag: str, *, retries: int = 0, gave_up: int = 0, wait_s: float = 0.0) -> None:
    with _lock:
        c = _counts.setdefault(tag, {"retries": 0, "gave_up": 0, "wait_s": 0.0})
        c["retries"] += retries
        c["gave_up"] += gave_up
        c["wait_s"] += wait_s
        snapshot = dict(c)
    if _ray_up():
        try:
            from pipeline import ray_compat

            ray_compat.kv_put(_kv_key(tag), json.dumps(snapshot).encode())
        except Exception:  # noqa: BLE001 - counting must never break the I/O it counts
            pass


def retry_reason(response: Any, caught_exception: BaseException | None) -> str | None:
    """Why a finished attempt should be retried (a short text), or None (success, or an answer
    that retrying cannot change: 403, 404, a bad request)."""
    if caught_exception is not None:
        return type(caught_exception).__name__  # no answer at all: down, refused, reset, timeout
    if not response:
        return None
    parsed = response[1] if isinstance(response, tuple) and len(response) > 1 else {}
    status = int((parsed.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
    code = str((parsed.get("Error") or {}).get("Code") or "")
    if status in _RETRY_STATUS or code in _RETRY_CODES:
        return f"HTTP {status} {code}".strip()
    return None


def backoff(attempts: int, rng: random.Random = random) -> float:
    """Delay before retry number ``attempts`` (1 = the first retry): exponential, capped, jittered."""
    return min(MAX_DELAY_S, BASE_DELAY_S * 2 ** max(0, attempts - 1)) * rng.uniform(0.5, 1.0)


class RetryPolicy:
    """The ``needs-retry`` handler of one client: returns the delay before the next attempt, or
    None to give up (botocore then raises the attempt's error)."""

    def __init__(self, deadline_s: float, tag: str):
        self.deadline_s = float(deadline_s)
        self.tag = tag

    def __call__(self, response=None, attempts: int = 1, caught_exception=None, request_dict=None,
                 operation=None, endpoint=None, **_: Any) -> float | None:
        ctx = (request_dict or {}).setdefault("context", {})
        op = getattr(operation, "name", "request")
        where = getattr(endpoint, "host", None) or "the S3 endpoint"
        reason = retry_reason(response, caught_exception)
        first = ctx.get("cacr_first_failure")
        if reason is None:
            if first is not None:
                _say(f"S3 {op} at {where} answered again after {attempts - 1} retries "
                     f"({time.monotonic() - first:.0f} s)", force=True)
            return None
        now = time.monotonic()
        if first is None:
            first = ctx["cacr_first_failure"] = now
        waited = now - first
        if waited >= self.deadline_s:
            _count(self.tag, gave_up=1)
            _say(f"S3 {op} at {where}: giving up after {attempts - 1} retries over "
                 f"{waited:.0f} s ({reason}; storage.retry_deadline_s={self.deadline_s:g})", force=True)
            return None
        delay = min(backoff(attempts), self.deadline_s - waited)
        _count(self.tag, retries=1, wait_s=delay)
        _say(f"S3 {op} at {where} failed ({reason}): retry {attempts} in {delay:.1f} s "
             f"(gives up {self.deadline_s:g} s after the first failure)", force=attempts == 1)
        return delay


def _say(msg: str, force: bool = False) -> None:
    global _last_log
    now = time.monotonic()
    if force or now - _last_log >= LOG_EVERY_S:
        _last_log = now
        log.warning(msg)


class RetryingS3FileSystem(s3fs.S3FileSystem):
    """s3fs with :class:`RetryPolicy` on its client (see the module docstring). Its two extra
    arguments are part of its identity, so they survive pickling into Ray tasks."""

    def __init__(self, *args, retry_deadline_s: float = DEFAULT_DEADLINE_S, retry_tag: str = "",
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.retry_deadline_s = float(retry_deadline_s)
        self.retry_tag = retry_tag

    async def _isfile(self, path):
        """Only "not found" is False: fsspec's ``isfile`` answers False for ANY error, so pyarrow's
        wrapper (Ray Data's reads) turned an endpoint that stopped answering into a
        FileNotFoundError that named neither the endpoint nor the outage."""
        try:
            return (await self._info(path))["type"] != "directory"  # s3fs: "file" | "directory"
        except FileNotFoundError:
            return False

    async def set_session(self, refresh=False, kwargs={}):  # noqa: B006 - s3fs's signature
        client = await super().set_session(refresh=refresh, kwargs=kwargs)
        if not getattr(client, "_cacr_retry_policy", None):
            policy = RetryPolicy(self.retry_deadline_s, self.retry_tag)
            client.meta.events.register("needs-retry.s3", policy)
            client._cacr_retry_policy = policy
        return client


__all__ = ["RetryingS3FileSystem", "RetryPolicy", "retry_reason", "backoff", "set_tag", "current_tag",
           "local_counts", "cluster_counts", "DEFAULT_DEADLINE_S"]
