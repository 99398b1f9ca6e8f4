"""Every use of a private Ray / TensorBoard API, in one place.

Each function here leans on a name that is not public API and may move in a Ray or TensorBoard
upgrade. tests/pipeline/test_ray_compat.py checks each one against the installed versions and
fails loudly (naming the function) when a layout changed, rather than letting a feature degrade
silently. Callers never import the private names themselves.

============================  ==============================================================
function                      private name it relies on (Ray 2.60)
============================  ==============================================================
kv_get / kv_put / kv_del      ``ray.experimental.internal_kv._internal_kv_*`` (GCS key-value)
kv_keys                       ``ray.experimental.internal_kv._internal_kv_list``
dashboard_address             ``ray._private.ray_constants.DASHBOARD_ADDRESS`` in the GCS KV
set_train_report_log_level    ``ray.train.v2._internal.execution.context.logger``
tune_propagate_env            ``ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE``
tune_stop_forwarding_secrets  the same set (Tune lists AWS credentials in it)
tb_file_writer                ``torch.utils.tensorboard.SummaryWriter._get_file_writer``
disable_driver_failure_...    ``ray._private.ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER``
is_stream_split_iterator      ``ray.data._internal.iterator.stream_split_iterator``
                              ``.StreamSplitDataIterator`` (what a streamed Train shard is)
block_refs                    ``Dataset.iter_internal_ref_bundles`` (blocks of a cached set)
raylet_pid                    ``ray._private.worker._global_node.all_processes`` (bench only)
drop_progress_bar_notice      the logger of ``ray.data._internal.progress`` (its message text)
object_store_stats            ``ray._private.internal_api.get_memory_info_reply`` (store stats)
persist_checkpoint            ``StorageContext.persist_current_checkpoint`` (Ray Train's own
                              upload, behind ``TrainContext.get_storage``, a DeveloperAPI)
============================  ==============================================================

tests/pipeline/test_ray_compat.py also fails if a private import appears anywhere else in
pipeline/ or bench/.
"""
from __future__ import annotations

import logging
from typing import Any

# Environment variables Tune must never copy into a runtime_env: Ray logs every runtime_env it
# sets up (runtime_env_agent.log under its temp dir), so a secret there is a secret on disk.
SECRET_ENV_PREFIXES = ("AWS_",)


def kv_get(key: bytes) -> bytes | None:
    """A value from the cluster's GCS key-value store (None if absent)."""
    from ray.experimental.internal_kv import _internal_kv_get

    return _internal_kv_get(key)


def kv_put(key: bytes, value: bytes) -> None:
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(key, value)


def kv_del(key: bytes) -> None:
    from ray.experimental.internal_kv import _internal_kv_del

    _internal_kv_del(key)


def kv_keys(prefix: bytes) -> list[bytes]:
    """Keys of the GCS key-value store that start with ``prefix``."""
    from ray.experimental.internal_kv import _internal_kv_list

    return [k if isinstance(k, bytes) else str(k).encode() for k in _internal_kv_list(prefix)]


def dashboard_address() -> str | None:
    """The running dashboard's address as the GCS records it (what the State API client looks up
    for an explicit cluster address), as ``http://host:port``; None without a dashboard."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    v = _internal_kv_get(ray_constants.DASHBOARD_ADDRESS, namespace=ray_constants.KV_NAMESPACE_DASHBOARD)
    if not v:
        return None
    v = v.decode() if isinstance(v, bytes) else str(v)
    return v if v.startswith(("http:", "https:")) else f"http://{v}"


def set_train_report_log_level(level: str) -> None:
    """Ray 2.60 logs every ``ray.train.report`` at INFO through a logger named after its source
    FILE, which RunConfig's ``LoggingConfig`` (matching ``ray.train.*``) does not reach."""
    from ray.train.v2._internal.execution import context as train_context

    train_context.logger.setLevel(getattr(logging, level.upper()))


def _tune_propagated() -> set[str]:
    from ray.tune.execution import class_cache

    names = class_cache.ENV_VARS_TO_PROPAGATE
    if not isinstance(names, set):
        raise TypeError(f"ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE is a {type(names).__name__}, "
                        "not a set: pipeline/ray_compat.py needs updating for this Ray")
    return names


def tune_propagate_env(var: str) -> None:
    """Have Tune put ``var`` (from the driver's environment) into the trial actors' runtime_env;
    the Train controller and its detached cleaner inherit it from there. Never a secret."""
    if var.startswith(SECRET_ENV_PREFIXES):
        raise ValueError(f"{var} must not travel in a runtime_env (Ray logs runtime_envs)")
    _tune_propagated().add(var)


def tune_stop_forwarding_secrets() -> list[str]:
    """Remove AWS credentials from the variables Tune copies into every trial's runtime_env.

    Trials get credentials the way every other Ray process does: the standard AWS chain on the
    node (the raylet's environment, inherited from the driver for a local Ray; profile files; the
    instance role / IRSA). Returns the names removed."""
    names = _tune_propagated()
    removed = sorted(n for n in names if n.startswith(SECRET_ENV_PREFIXES))
    names.difference_update(removed)
    return removed


def tb_file_writer(writer: Any) -> Any:
    """The event-file writer behind a ``SummaryWriter`` (to add raw summaries, e.g. HParams
    session records, into the same run rather than a sub-run)."""
    return writer._get_file_writer()


def disable_driver_failure_signal_handler() -> None:
    """Ray's core installs absl's failure signal handler in the driver for SIGTERM too (stack dump,
    abort, no clean-up); the flag it reads when it creates the driver's core worker switches that
    off for this process only (worker processes keep theirs). Set it before ``ray.init``."""
    from ray._private import ray_constants

    if not hasattr(ray_constants, "RAY_DISABLE_FAILURE_SIGNAL_HANDLER"):
        raise RuntimeError("ray_compat: ray._private.ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER "
                           "is gone in this Ray: SIGTERM on the driver needs another switch")
    ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True


def is_stream_split_iterator(shard: Any) -> bool:
    """Whether a Train dataset shard is the iterator of a ``streaming_split`` (read as it streams)
    rather than a materialised dataset (the cached train set, read by block). Ray exports no
    public type for it; if its module moves, the class name still decides."""
    try:
        from ray.data._internal.iterator.stream_split_iterator import StreamSplitDataIterator
    except ImportError:  # pragma: no cover - the test of this function fails on this Ray
        return type(shard).__name__ == "StreamSplitDataIterator"
    return isinstance(shard, StreamSplitDataIterator)


def block_refs(ds: Any) -> list[tuple[Any, int]]:
    """(block ObjectRef, rows) of every non-empty block of a materialised Dataset, in its order;
    a DataIterator of one (``get_dataset_shard`` of a materialised set) is materialised first,
    which copies nothing. What lets each worker fetch exactly the blocks it needs."""
    ds = ds if hasattr(ds, "iter_internal_ref_bundles") else ds.materialize()
    return [(entry.ref, int(entry.metadata.num_rows)) for bundle in ds.iter_internal_ref_bundles()
            for entry in bundle.blocks if entry.metadata.num_rows]


def raylet_pid() -> int | None:
    """Pid of the raylet of the Ray instance THIS process started (``ray.init`` of a new local
    instance), None when it joined a cluster (no process handles then). The step benchmark
    samples the CPU time of the processes that raylet starts."""
    import ray
    from ray._private import ray_constants

    node = ray._private.worker._global_node
    procs = node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET) if node is not None else None
    return procs[0].process.pid if procs else None


_PROGRESS_LOGGER = "ray.data._internal.progress"
_PROGRESS_NOTICE = "Progress bars disabled"


class _DropProgressNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_PROGRESS_NOTICE)


def drop_progress_bar_notice() -> None:
    """Drop Ray Data's one-time "Progress bars disabled" warning in this process (we disable
    the bars on purpose; in a train worker the notice reaches the driver's console late, after
    the summary JSON that must be the last line). Other warnings of that logger still pass."""
    import ray.data._internal.progress as progress

    if getattr(progress, "logger", None) is None or progress.logger.name != _PROGRESS_LOGGER:
        raise RuntimeError(f"ray_compat: Ray Data's progress logger is no longer {_PROGRESS_LOGGER!r}")
    log = logging.getLogger(_PROGRESS_LOGGER)
    if not any(isinstance(f, _DropProgressNotice) for f in log.filters):
        log.addFilter(_DropProgressNotice())


def object_store_stats() -> dict[str, int]:
    """Object-store totals over the cluster of the connected driver, in bytes: ``used``,
    ``capacity``, ``spilled`` (since the cluster started), ``restored``, ``fallback`` (allocated on
    disk because the store was full). Ray's ``ray memory --stats-only`` shows the same numbers."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    st = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address)).store_stats
    return {"used": int(st.object_store_bytes_used), "capacity": int(st.object_store_bytes_avail),
            "spilled": int(st.spilled_bytes_total), "restored": int(st.restored_bytes_total),
            "fallback": int(st.object_store_bytes_fallback)}


def persist_checkpoint(checkpoint: Any, dir_name: str) -> Any:
    """Ray Train's own upload of a reported checkpoint (what ``ray.train.report`` does when it is
    given no ``checkpoint_upload_fn``), for an upload function that adds a step after it (the
    fault-injection point of :mod:`pipeline.failpoints`). Call from a train worker."""
    import ray.train

    return ray.train.get_context().get_storage().persist_current_checkpoint(checkpoint, dir_name)
