"""README's search block: ``cacr tune --config conf/tune/digits.yaml`` then ``cacr train --config``
on the best config it wrote, verbatim, in a fresh working directory holding the checkout's conf/
(nothing else: digits are prepared on first use).

CI appends ``num_samples=2 train.epochs=1`` to ``cacr tune`` (the marker in README.md says so):
the embedded search is 8 trials of 4 epochs. The best config then trains 1 epoch as it is.

The user has AWS keys in the environment (a distinctive secret; nothing here uses S3): the secret
must end up in no file of the working directory, HOME or Ray's temp dir (Tune forwards AWS
variables into every trial's runtime env, which Ray's runtime-env agent logs).
"""
from __future__ import annotations

import uuid

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.acceptance]

TUNE_CI = "num_samples=2 train.epochs=1"
SECRET = f"cacr-acceptance-SECRET-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def tune_run(module_user, acc):
    acc.copy_checkout_configs(module_user)
    module_user.env_extra.update({"AWS_ACCESS_KEY_ID": "cacr-acceptance-key",
                                  "AWS_SECRET_ACCESS_KEY": SECRET,
                                  "AWS_DEFAULT_REGION": "us-east-1"})
    block = acc.readme_block("tune")
    script = acc.append_overrides(block.text, "cacr tune", TUNE_CI, block.note)
    r = module_user.run(script, timeout=1200)
    assert r.returncode == 0, r.out[-8000:]
    search = acc.last_json(r.stdout, "best_config")
    train = acc.last_json(r.stdout, "run_dir")
    return module_user, r, search, train


def test_tune_writes_trials_and_a_best_config_where_it_prints(tune_run, acc):
    user, r, search, _ = tune_run
    assert search["trials"] == 2 and search["errored"] == 0 and search["best_metric"] is not None
    best = acc.resolve(search["best_config"], user.workdir)
    # README's second line reads the best config at the default place: the printed one.
    assert best.resolve() == (user.workdir / "runs/tune/digits/best_config.yaml").resolve()
    cfg = yaml.safe_load(best.read_text())
    assert cfg["epochs"] == 1 and cfg["name"] is None
    for key, value in search["best_params"].items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert node == value, (key, node, value)

    watch = [ln for ln in r.stdout.splitlines() if "tensorboard --logdir" in ln]
    assert any(ln.split("tensorboard --logdir", 1)[1].strip() == search["tensorboard_logdir"] for ln in watch)
    trials = acc.resolve(search["tensorboard_logdir"], user.workdir)
    tags = acc.scalar_tags(trials)
    assert tags.get("val/knn_top1", 0) >= 2, f"no per-trial kNN scalars under {trials}: {sorted(tags)}"


def test_best_config_rerun_writes_tensorboard_where_it_prints(tune_run, acc):
    user, _, _, s = tune_run
    run_dir = acc.resolve(s["run_dir"], user.workdir)
    assert run_dir.is_dir() and run_dir.resolve().is_relative_to((user.workdir / "runs").resolve())
    assert s["epochs"] == 1
    tb = acc.resolve(s["tensorboard_logdir"], user.workdir)
    assert tb.is_dir(), f"printed tensorboard_logdir {s['tensorboard_logdir']} does not exist"
    tags = acc.scalar_tags(tb)
    assert tags.get("train/loss", 0) >= 1 and tags.get("val/knn_top1", 0) == 1, sorted(tags)
    assert acc.resolve(s["backbone"], user.workdir).is_file()


def test_no_file_the_search_wrote_holds_the_secret_key(tune_run, acc):
    user, *_ = tune_run
    hits = acc.files_containing([user.workdir, user.home, user.ray_tmp], SECRET.encode())
    assert not hits, f"AWS_SECRET_ACCESS_KEY written to {len(hits)} file(s): {hits[:10]}"
    assert list(user.ray_tmp.rglob("*.log")), "nothing under RAY_TMPDIR: the grep saw nothing"
