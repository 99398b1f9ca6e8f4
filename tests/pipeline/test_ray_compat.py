"""Each private Ray / TensorBoard API we lean on (pipeline/ray_compat.py), checked against the
installed versions: a Ray or TensorBoard upgrade that moves one fails HERE, by name, instead of a
feature degrading silently (credentials written to disk, a leaked placement group, chatty logs)."""
from __future__ import annotations

import ast
import logging
import os
from pathlib import Path

import pytest

from pipeline import ray_compat


def test_tune_forwarding_list_is_a_set_that_lists_aws_credentials_today():
    from ray.tune.execution import class_cache

    names = class_cache.ENV_VARS_TO_PROPAGATE
    assert isinstance(names, set), "Tune's propagation list changed type: update ray_compat"
    # If Ray stops forwarding credentials itself, the shim is harmless; if the list moves, the
    # import above fails.
    assert "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S" in names


def test_trial_actors_get_no_aws_variables_in_their_runtime_env(monkeypatch):
    """What Tune builds for a trial actor (class_cache._ActorClassCache.get) after our shim:
    no AWS variable, even with all of them in the driver's environment; our own pinned variable
    still travels."""
    from ray.tune.execution import class_cache

    secret = "wJalrXUtnFEMI-cacr-compat-SECRET"
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.setenv(var, secret)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:1")
    saved = set(class_cache.ENV_VARS_TO_PROPAGATE)
    try:
        removed = ray_compat.tune_stop_forwarding_secrets()
        ray_compat.tune_propagate_env("RAY_API_SERVER_ADDRESS")

        class Trainable:
            pass

        remote = class_cache._ActorClassCache().get(Trainable)
        env = remote._default_options["runtime_env"]["env_vars"]
        assert not [k for k in env if k.startswith("AWS_")], env
        assert secret not in repr(remote._default_options)
        assert env["RAY_API_SERVER_ADDRESS"] == "http://127.0.0.1:1"
        assert all(n.startswith("AWS_") for n in removed)
    finally:
        class_cache.ENV_VARS_TO_PROPAGATE.clear()
        class_cache.ENV_VARS_TO_PROPAGATE.update(saved)


def test_secrets_cannot_be_added_to_the_propagation_list():
    with pytest.raises(ValueError, match="runtime_env"):
        ray_compat.tune_propagate_env("AWS_SECRET_ACCESS_KEY")


def test_train_report_logger_is_where_the_shim_sets_it():
    from ray.train.v2._internal.execution import context as train_context

    before = train_context.logger.level
    try:
        ray_compat.set_train_report_log_level("error")
        assert train_context.logger.level == logging.ERROR
    finally:
        train_context.logger.setLevel(before)


def test_tensorboard_file_writer_takes_raw_summaries(tmp_path):
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    w = SummaryWriter(log_dir=str(tmp_path))
    fw = ray_compat.tb_file_writer(w)
    exp, ssi, _ = hparams({"lr": 0.1}, {"m": 0.0})
    fw.add_summary(exp)
    w.close()
    assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())


@pytest.mark.slow
def test_kv_and_dashboard_address_on_a_running_ray(ray_session):
    key = f"cacr:compat:{os.getpid()}".encode()
    assert ray_compat.kv_get(key) is None
    ray_compat.kv_put(key, b"1")
    assert ray_compat.kv_get(key) == b"1"
    assert key in ray_compat.kv_keys(key[:-2])
    assert ray_compat.kv_keys(key + b"-none") == []
    ray_compat.kv_del(key)
    assert ray_compat.kv_get(key) is None
    stats = ray_compat.object_store_stats()
    assert stats["capacity"] > 0 and stats["spilled"] >= 0 and stats["used"] >= 0, stats
    addr = ray_compat.dashboard_address()
    # the fixture starts Ray with the dashboard (as the commands do): its address is registered
    # (None only where the dashboard could not start, which the fixture tolerates)
    assert addr is None or addr.startswith("http://")


def test_driver_failure_signal_handler_switch_is_the_flag_ray_reads():
    """Ray's core worker reads this flag when the driver connects; if Ray renames it, SIGTERM on
    `cacr train` would abort with a stack dump again: fail here, loudly."""
    import ray._raylet
    from ray._private import ray_constants

    from pipeline.ray_compat import disable_driver_failure_signal_handler

    saved = ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER
    try:
        disable_driver_failure_signal_handler()
        assert ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER is True
    finally:
        ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = saved
    # the compiled core worker (Cython) is what reads it when the driver connects
    with open(ray._raylet.__file__, "rb") as f:
        assert b"RAY_DISABLE_FAILURE_SIGNAL_HANDLER" in f.read()


# ---------------------------------------------------------------------------------------------
# Ray Data internals behind the cached train set and the streamed one (pipeline/data/batches.py)


@pytest.mark.slow
def test_block_refs_of_a_materialised_dataset_and_its_iterator(ray_session):
    """The cached train set is read by block: every row once, in the dataset's order, for a
    Dataset and for the DataIterator Train hands a worker."""
    import ray
    from ray.data.block import BlockAccessor

    ds = ray.data.range(10, override_num_blocks=3).materialize()
    # the order Ray materialised (blocks may finish out of order: preserve_order is off)
    order = [int(r["id"]) for r in ds.take_all()]
    assert sorted(order) == list(range(10))
    for source in (ds, ds.iterator()):
        blocks = ray_compat.block_refs(source)
        assert len(blocks) >= 2 and sum(n for _, n in blocks) == 10  # Ray may cut blocks finer
        rows = [int(v) for ref, _ in blocks for v in BlockAccessor.for_block(ray.get(ref)).to_numpy()["id"]]
        assert rows == order


@pytest.mark.slow
def test_stream_split_iterator_is_recognised(ray_session):
    # the private module itself: if it moves, the name fallback in ray_compat is all that is left
    from ray.data._internal.iterator.stream_split_iterator import StreamSplitDataIterator

    import ray

    ds = ray.data.range(8)
    split = ds.streaming_split(2)
    assert isinstance(split[0], StreamSplitDataIterator)
    assert all(ray_compat.is_stream_split_iterator(it) for it in split)
    assert not ray_compat.is_stream_split_iterator(ds.materialize().iterator())
    assert not ray_compat.is_stream_split_iterator(ds)


@pytest.mark.slow
def test_raylet_pid_is_this_instances_raylet(ray_session):
    pid = ray_compat.raylet_pid()
    assert isinstance(pid, int), "ray._private.worker._global_node changed: update ray_compat.raylet_pid"
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert b"raylet" in f.read()


# ---------------------------------------------------------------------------------------------
# The guard: private Ray / TensorBoard names only in pipeline/ray_compat.py

REPO = Path(__file__).resolve().parents[2]
_PRIVATE_ROOTS = ("ray", "tensorboard", "torch.utils.tensorboard")
# private members without a leading underscore (or reached through an object, not a module path)
_PRIVATE_ATTRS = {"iter_internal_ref_bundles", "_get_file_writer", "_global_node",
                  "ENV_VARS_TO_PROPAGATE", "_internal_kv_get", "_internal_kv_put", "_internal_kv_del"}


def _is_private_path(dotted: str) -> bool:
    parts = dotted.split(".")
    rooted = any(dotted == r or dotted.startswith(r + ".") for r in _PRIVATE_ROOTS)
    return rooted and any(p.startswith("_") for p in parts)


def _root_name(node: ast.AST) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def private_ray_uses(path: Path) -> list[str]:
    """``file:line name`` of every private Ray / TensorBoard name used in ``path``: an import of a
    module path with a ``_private`` / ``_internal`` / ``_x`` part (or of a ``_name`` from such a
    package), an attribute chain ``ray._private...``, or a known private member."""
    tree = ast.parse(path.read_text(), filename=str(path))
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            hits += [(node.lineno, a.name) for a in node.names if _is_private_path(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.module:
            hits += [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                     if _is_private_path(f"{node.module}.{a.name}") or a.name in _PRIVATE_ATTRS]
        elif isinstance(node, ast.Attribute):
            if node.attr in _PRIVATE_ATTRS or (node.attr.startswith("_") and _root_name(node) == "ray"):
                hits.append((node.lineno, node.attr))
    return [f"{path.name}:{line} {name}" for line, name in sorted(set(hits))]


def test_private_ray_apis_only_in_ray_compat():
    offenders = []
    for package in ("pipeline", "bench", "cacr"):
        for path in sorted((REPO / package).rglob("*.py")):
            if path == REPO / "pipeline" / "ray_compat.py":
                continue
            offenders += [f"{package}/{hit}" for hit in private_ray_uses(path)]
    assert offenders == [], ("private Ray / TensorBoard API outside pipeline/ray_compat.py (move it "
                             "there, with a test here):\n" + "\n".join(offenders))


def test_private_api_checker_sees_what_it_forbids(tmp_path):
    # the guard must catch each form (else the test above passes vacuously) and leave public
    # Ray and our own private names alone
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import ray\nimport ray.data\nfrom ray.util import get_node_ip_address\n"
        "from ray._private import ray_constants\n"
        "from ray.data._internal.iterator.stream_split_iterator import StreamSplitDataIterator\n"
        "import ray._private.services\n"
        "node = ray._private.worker._global_node\n"
        "blocks = ds.iter_internal_ref_bundles()\n"
        "from ray.experimental.internal_kv import _internal_kv_get\n"
        "fw = writer._get_file_writer()\n"
        "self._cache = obj._private_thing\n")
    lines = sorted({int(h.split(":")[1].split()[0]) for h in private_ray_uses(probe)})
    assert lines == [4, 5, 6, 7, 8, 9, 10], private_ray_uses(probe)


def test_progress_bar_notice_dropped_other_warnings_kept():
    """The notice Ray Data logs when its bars are off (we switch them off) must not reach the
    console: from a train worker it arrives after the summary JSON, the promised last line."""
    import ray.data

    from ray.data._internal.progress import get_progress_manager

    seen: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    log = logging.getLogger("ray.data._internal.progress")
    grab = Grab(level=logging.WARNING)
    log.addHandler(grab)
    try:
        ray_compat.drop_progress_bar_notice()
        ray_compat.drop_progress_bar_notice()  # idempotent
        log.warning("Progress bars disabled. To enable, set ...")
        log.warning("something else")
        assert get_progress_manager.__module__ == "ray.data._internal.progress"
    finally:
        log.removeHandler(grab)
    assert seen == ["something else"]
    assert ray.data is not None



def test_persist_checkpoint_is_ray_trains_own_upload(tmp_path, monkeypatch):
    """The upload the fault-injection point wraps: a reported checkpoint's files copied to
    <storage>/<run>/<dir_name>, returned as a Checkpoint there (a real StorageContext)."""
    import ray.train
    from ray.train import Checkpoint
    from ray.train.v2._internal.execution.storage import StorageContext

    src = tmp_path / "staging"
    src.mkdir()
    (src / "state.pt").write_bytes(b"weights")
    storage = StorageContext(str(tmp_path / "runs"), "r1")

    class _Context:
        def get_storage(self):
            return storage
    monkeypatch.setattr(ray.train, "get_context", lambda: _Context())
    out = ray_compat.persist_checkpoint(Checkpoint.from_directory(str(src)), "checkpoint_x")
    assert isinstance(out, Checkpoint) and out.path.endswith("runs/r1/checkpoint_x")
    assert (tmp_path / "runs" / "r1" / "checkpoint_x" / "state.pt").read_bytes() == b"weights"
