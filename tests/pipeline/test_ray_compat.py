"""Each private Ray / TensorBoard API we lean on (pipeline/ray_compat.py), checked against the
installed versions: a Ray or TensorBoard upgrade that moves one fails HERE, by name, instead of a
feature degrading silently (credentials written to disk, a leaked placement group, chatty logs)."""
from __future__ import annotations

import logging
import os

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
