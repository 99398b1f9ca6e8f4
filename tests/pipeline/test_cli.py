"""`cacr` argument handling: key=value overrides are accepted before AND after options (argparse
alone stops a "*" positional at the first option), anything else stray is refused."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main

CONF = str(Path(__file__).resolve().parents[2] / "conf" / "digits.yaml")


def test_train_override_after_config_option_is_read(capsys):
    assert main(["train", "epochs=3", "--config", CONF, "optim.base_lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'optim.base_lrr'" in err and "unrecognized" not in err


def test_evaluate_options_after_data_option_are_read(tmp_path, capsys):
    # options are validated before the checkpoint is opened: the error names the option
    assert main(["evaluate", str(tmp_path / "ckpt"), "--data", str(tmp_path), "linear_epochs=many"]) == 2
    err = capsys.readouterr().err
    assert "linear_epochs" in err and "unrecognized" not in err


@pytest.mark.parametrize("argv", [["evaluate", "ckpt", "--data", "x", "--bogus"],
                                  ["export", "ckpt", "out", "extra=1"],
                                  ["train", "epochs=1", "--config", CONF, "--epochs", "2"]])
def test_stray_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["train", "--config", CONF, "notakeyvalue"],
                                  ["train", "epochs=1", "--config", CONF, "notakeyvalue"]])
def test_a_word_that_is_not_key_value_is_named(argv, capsys):
    assert main(argv) == 2
    assert "override 'notakeyvalue' is not of the form key=value" in capsys.readouterr().err


def test_user_errors_are_one_line_and_our_bugs_show_a_traceback(monkeypatch, capsys):
    """CacrError (and subclasses) -> `cacr: error: ...`, exit 2; any other exception, a
    ValueError from our own code included, propagates with its traceback."""
    import pipeline.train
    from pipeline.storage import StorageError

    def user_mistake(cfg):
        raise StorageError("bucket 'x' of 's3://x/runs' does not exist at endpoint e: create it")

    monkeypatch.setattr(pipeline.train, "run_training", user_mistake)
    assert main(["train", "epochs=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cacr: error: bucket 'x'"), err

    def our_bug(cfg):
        raise ValueError("internal invariant broken")

    monkeypatch.setattr(pipeline.train, "run_training", our_bug)
    with pytest.raises(ValueError, match="internal invariant"):
        main(["train", "epochs=1"])


def _help(*argv: str) -> str:
    from pipeline.cli import build_parser

    return build_parser()._subparsers._group_actions[0].choices[argv[0]].format_help()


def test_train_help_shows_effective_defaults_and_augment_help():
    text = _help("train")
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("augment.scale "))
    assert "(default: [0.4, 1.0])" in line and "crop" in line
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("augment.flip_p "))
    assert "(default: 0.0)" in line


def test_tune_help_lists_tune_keys():
    text = _help("tune")
    for key in ("num_samples", "max_concurrent_trials", "scheduler.grace_period", "metric",
                "storage_path", "train.<key>"):
        assert key in text, key


def test_unknown_tune_key_points_at_the_training_key(capsys):
    conf = str(Path(__file__).resolve().parents[2] / "conf" / "tune" / "digits.yaml")
    assert main(["tune", "--config", conf, "epochs=2"]) == 2
    err = capsys.readouterr().err
    assert "unknown tune key 'epochs' (did you mean 'train.epochs'?)" in err, err
    assert main(["tune", "--config", conf, "num_sample=2"]) == 2
    assert "did you mean 'num_samples'" in capsys.readouterr().err


def test_evaluate_and_export_take_the_endpoint_options_and_fail_fast_unreachable(tmp_path):
    """`cacr evaluate|export s3://...` against an endpoint nobody listens on: one line saying it
    cannot reach the endpoint (the up-front check, short timeouts), not "does not exist"."""
    import socket

    # A port bound here but never listened on: connections are refused, and no other process of
    # the parallel suite (a Ray dashboard answering 403, a moto server) can take it meanwhile.
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    endpoint = f"http://127.0.0.1:{held.getsockname()[1]}"
    try:
        _unreachable_endpoint_checks(endpoint, tmp_path)
    finally:
        held.close()


def _unreachable_endpoint_checks(endpoint: str, tmp_path) -> None:
    for argv in (["evaluate", "s3://bucket/runs/r", "--endpoint-url", endpoint],
                 ["export", "s3://bucket/runs/r", str(tmp_path / "out"), "--endpoint-url", endpoint]):
        r = subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], capture_output=True,
                           text=True, timeout=120, env={**os.environ, "AWS_ACCESS_KEY_ID": "k",
                                                         "AWS_SECRET_ACCESS_KEY": "s"})
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        assert "cannot reach" in lines[0] and endpoint in lines[0], lines
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# `cacr train` on the driver: what is checked before Ray starts


def test_a_typed_url_without_shards_is_never_prepared_implicitly(s3_bucket, ray_starts, capsys):
    """data.url=s3://bucket/digitz (a typo) must not train on digits written into the bucket."""
    from pipeline.storage import list_files

    assert main(["train", f"data.url={s3_bucket}/digitz", "epochs=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{s3_bucket}/digitz" in err[0] and "cacr prepare" in err[0], err
    assert list_files(f"{s3_bucket}/digitz") == {} and not ray_starts


def test_implicit_preparation_rule(tmp_path, monkeypatch):
    from pipeline.config import load_config
    from pipeline.train import source_to_prepare

    monkeypatch.chdir(tmp_path)

    def src(*ov):
        return source_to_prepare(load_config(None, list(ov)))

    assert src() == "digits"                                   # the embedded default
    assert src("data.url=data/digits/") == src(f"data.url=file://{tmp_path}/data/digits") == "digits"
    assert src("data.url=./data/digitz") is None and src("data.url=s3://b/digits") is None
    assert src("data.url=s3://b/x", "data.source=digits") == "digits"   # explicit: always
    assert src("data.source=null") is None


def test_unusable_storage_path_fails_before_ray_in_one_line(s3_server, tmp_path, monkeypatch,
                                                            ray_starts, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "storage_path=s3://no-such-bucket-cacr/runs", "epochs=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-bucket-cacr" in err[0] and "does not exist" in err[0], err
    assert not (tmp_path / "data").exists() and not ray_starts  # nothing prepared, no Ray


def test_use_gpu_without_gpus_fails_before_ray(digits_shards, tmp_path, monkeypatch, ray_starts, capsys):
    import pipeline.ray_start

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(pipeline.ray_start, "local_gpu_count", lambda: 0)  # this machine's fact
    assert main(["train", "use_gpu=true", f"data.url={digits_shards}",
                 f"storage_path={tmp_path}", "epochs=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "use_gpu=true" in err[0] and "no CUDA GPU" in err[0], err
    assert not ray_starts


def test_a_failed_run_promises_a_resume_only_with_a_checkpoint(tmp_path):
    from pipeline.config import load_config
    from pipeline.train import training_failed

    cfg = load_config(None, ["name=r"])
    run = tmp_path / "r"
    run.mkdir()
    msg = str(training_failed(cfg, str(run), RuntimeError("boom\nWorkerGroupStartupTimeoutError: x")))
    assert "resume" not in msg and "before its first checkpoint" in msg and "WorkerGroup" in msg
    (run / "checkpoint_2026-01-01_00-00-00.000000").mkdir()
    assert "name=r to resume" in str(training_failed(cfg, str(run), RuntimeError("boom")))


def test_the_driver_resolves_relative_paths_before_ray(digits_shards, copy_shards, tmp_path, monkeypatch):
    """The config that goes to Ray (and into checkpoints) carries absolute paths: a Ray Train
    worker's cwd is Ray's artifacts dir, where ./runs would be somewhere else entirely."""
    from pipeline.config import load_config
    from pipeline.train import prepare_run

    monkeypatch.chdir(tmp_path)
    copy_shards(digits_shards, tmp_path / "data" / "digits")   # the default ./data/digits
    cfg, plan = prepare_run(load_config(None, ["name=r"]))
    assert cfg.storage_path == str(tmp_path / "runs") and cfg.data.url == str(tmp_path / "data" / "digits")
    assert plan.train_scan.rows == 1438


@pytest.mark.slow
def test_inspect_is_quiet_by_default_and_takes_log_level(digits_shards):
    """`cacr inspect` starts its own Ray through the one start-up (never joining a `ray start`
    cluster); by default none of Ray Data's INFO lines reach the console, the JSON is last."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "inspect", digits_shards, "--split", "val"],
                       capture_output=True, text=True, timeout=300, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    noise = [ln for ln in out.splitlines() if " INFO " in ln or "Execution plan" in ln
             or "Registered dataset logger" in ln]
    assert noise == [], noise
    assert json.loads(r.stdout.strip().splitlines()[-1])["samples"] == 359
    help_text = subprocess.run([sys.executable, "-m", "pipeline.cli", "inspect", "--help"],
                               capture_output=True, text=True, timeout=60).stdout
    assert "--log-level" in help_text
