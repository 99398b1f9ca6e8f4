"""README commands (1) and (2), the data block and the evaluate/export block, on a laptop.

README command (1) is ``python3.11 -m venv .venv && . .venv/bin/activate && pip install -e . &&
cacr train``. CI runs its post-install part, ``cacr train``, in the installed environment, with
``epochs=2`` appended (the marker in README.md says so): the embedded default runs 12 epochs, about
2 minutes. One such run (module fixture) serves every test here that only reads its artifacts.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.acceptance]

INSTALL_TRAIN_PREFIX = "python3.11 -m venv .venv && . .venv/bin/activate && pip install -e . && "
INSTALL_TEST_PREFIX = "python3.11 -m venv .venv && . .venv/bin/activate && pip install -e '.[test]' && "
TRAIN_CI = "epochs=2"
CHECKPOINT_PLACEHOLDER = "./runs/<name>/checkpoint_<time>"
# What the embedded default is (scikit-learn digits, split by `cacr prepare digits`).
DIGITS_TRAIN, DIGITS_VAL, DIGITS_CLASSES = 1438, 359, 10
RAY_INFO = re.compile(r"\sINFO\s+(\S+\.py):\d+ --")


def post_install(block_text: str, prefix: str) -> str:
    """The README one-liner minus its venv + install part, which must be exactly ``prefix``."""
    assert block_text.count("\n") == 0, f"expected a one-line command, got {block_text!r}"
    assert block_text.startswith(prefix), f"README command no longer starts with the install part {prefix!r}"
    rest = block_text[len(prefix):]
    assert rest and "pip install" not in rest and ".venv" not in rest
    return rest


#: exported as AWS_SECRET_ACCESS_KEY for the default run, as a user with AWS keys set up has it:
#: no file the run or its Ray writes may hold it
SECRET = f"cacrSECRET{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def default_run(module_user, acc):
    """README command (1), post-install part, + ``epochs=2``, with AWS keys exported:
    (user, result, summary JSON)."""
    module_user.env_extra.update(AWS_ACCESS_KEY_ID="AKIACACRTESTKEY", AWS_SECRET_ACCESS_KEY=SECRET)
    block = acc.readme_block("install-train")
    cmd = post_install(block.text, INSTALL_TRAIN_PREFIX)
    assert cmd == "cacr train"
    script = acc.append_overrides(cmd, "cacr train", TRAIN_CI, block.note)
    r = module_user.run(script, timeout=900)
    assert r.returncode == 0, r.out[-6000:]
    return module_user, r, acc.last_json(r.stdout, "run_dir")


def test_command_2_is_what_ci_runs(acc):
    block = acc.readme_block("install-test")
    rest = post_install(block.text, INSTALL_TEST_PREFIX)
    assert rest == "python -m pytest"
    ci = (acc.ROOT / ".ci/run").read_text().splitlines()
    assert block.text in ci, ".ci/run must run README command (2) verbatim"


def test_default_train_writes_everything_where_it_prints(default_run, acc):
    user, r, s = default_run
    run_dir = acc.resolve(s["run_dir"], user.workdir)
    assert run_dir.is_dir(), f"printed run_dir {s['run_dir']} does not exist"
    assert run_dir.resolve().is_relative_to(user.workdir.resolve() / "runs"), \
        "the default storage_path ./runs is the working directory's runs/"
    assert (user.workdir / "data/digits/index.json").is_file(), "./data/digits prepared on first use"
    assert s["epochs"] == 2 and s["steps"] > 0 and s["skipped"] == {}
    assert 0.2 < s["knn_top1"] <= 1.0  # 10 classes: chance is 0.1

    # The monitoring line it prints names the directory that holds the event files.
    watch = [ln for ln in r.stdout.splitlines() if "tensorboard --logdir" in ln]
    assert watch and watch[-1].split("tensorboard --logdir", 1)[1].strip() == s["tensorboard_logdir"]
    tb = acc.resolve(s["tensorboard_logdir"], user.workdir)
    assert tb.is_dir(), f"printed tensorboard_logdir {s['tensorboard_logdir']} does not exist"
    tags = acc.scalar_tags(tb)
    for tag in ("train/loss", "val/knn_top1", "epoch/loss", "train/lr"):
        assert tags.get(tag, 0) >= 1, f"no {tag} scalars in {tb}: {sorted(tags)}"
    assert tags["val/knn_top1"] == 2  # one per epoch

    ckpt = acc.resolve(s["checkpoint"], user.workdir)
    assert ckpt.is_dir() and ckpt.resolve().is_relative_to(run_dir.resolve())
    backbone = acc.resolve(s["backbone"], user.workdir)
    assert backbone.is_file() and (backbone.parent / "backbone.json").is_file()
    # Nothing written outside the working directory, HOME and Ray's temp dir: no runs/ or data/
    # in Ray's per-run folders (where a relative path resolved inside a worker would land).
    stray = [str(p) for p in user.ray_tmp.rglob("events.out.tfevents.*")]
    assert not stray, f"event files under Ray's temp dir instead of {tb}: {stray}"


def test_no_file_the_default_run_wrote_holds_the_secret_key(default_run, acc):
    """Relative default paths resolved on the driver (the checks above: everything under ./runs,
    nothing in Ray's per-run folders) and the AWS secret of the user's environment in no file of
    the working directory, HOME or Ray's temp dir, nor in the output."""
    user, r, _ = default_run
    assert list(user.ray_tmp.rglob("*.log")), "Ray wrote nothing under the private RAY_TMPDIR"
    assert acc.files_containing([user.workdir, user.home, user.ray_tmp], SECRET.encode()) == []
    assert SECRET not in r.out


def test_default_train_console_is_one_line_per_epoch_then_json(default_run, acc):
    """What a user watches: one progress line per epoch (once, not echoed by Ray's logging),
    none of Ray's per-report / per-dataset chatter, and the summary JSON as the very last line."""
    _, r, s = default_run
    out = r.stdout + r.stderr
    epoch_lines = [ln for ln in out.splitlines() if "[cacr] epoch " in ln]
    assert [ln.split("[cacr] epoch ")[1].split()[0] for ln in epoch_lines] == ["1/2", "2/2"], out[-3000:]
    assert all(" knn " in ln and "samples/s" in ln and "ETA" in ln for ln in epoch_lines)
    for noise in ("Reporting training result", "Failed to query Ray Train Controller",
                  "execution finished in", "exclude_resources", "Progress bars disabled"):
        assert noise not in out, noise
    assert json.loads(r.stdout.strip().splitlines()[-1]) == s, "the summary JSON is not the last line"
    assert "tensorboard --logdir " + s["tensorboard_logdir"] in out


def test_evaluate_and_export_the_printed_checkpoint_then_load_it(default_run, acc):
    user, _, s = default_run
    block = acc.readme_block("evaluate-export")
    assert block.text.count(CHECKPOINT_PLACEHOLDER) == 2
    import shlex
    script = block.text.replace(CHECKPOINT_PLACEHOLDER, shlex.quote(s["checkpoint"]))
    r = user.run(script, timeout=600)
    assert r.returncode == 0, r.out[-6000:]
    ev = acc.last_json(r.stdout, "knn_top1")
    assert ev["samples"] == {"train": DIGITS_TRAIN, "val": DIGITS_VAL} and ev["classes"] == DIGITS_CLASSES
    assert ev["epoch"] == 2 and ev["arch"] == "narrow_resnet"
    assert 0.2 < ev["knn_top1"] <= 1.0 and 0.2 < ev["linear_top1"] <= 1.0
    ex = acc.last_json(r.stdout, "backbone")
    assert acc.resolve(ex["backbone"], user.workdir).is_file()
    assert acc.resolve(ex["meta"], user.workdir) == user.workdir / "backbone/backbone.json"

    # README's loader for any architecture, verbatim, in a fresh interpreter in the same folder;
    # then the features it computes must be those of the export `cacr train` made of the same
    # (final) checkpoint.
    snippet = acc.readme_block("load-any")
    assert snippet.lang == "python"
    check = f"""
import torch
from safetensors.torch import load_file
net.eval()
x = torch.rand(4, 3, 32, 32)
with torch.no_grad():
    y = net(x)
assert y.shape == (4, 8 * meta["backbone"]["width"]), y.shape
assert torch.isfinite(y).all()
ref = load_file({str(acc.resolve(s["backbone"], user.workdir))!r})
mine = load_file("backbone/backbone.safetensors")
assert ref.keys() == mine.keys() and all(torch.equal(ref[k], mine[k]) for k in ref)
print("LOADED", tuple(y.shape))
"""
    p = subprocess.run([sys.executable, "-c", snippet.text + "\n" + check], cwd=user.workdir,
                       env=user.env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "LOADED" in p.stdout, p.stdout + p.stderr


def test_data_block_prepares_and_inspects_digits(user, acc):
    block = acc.readme_block("data-digits")
    r = user.run(block.text, timeout=600)
    assert r.returncode == 0, r.out[-6000:]
    info = acc.last_json(r.stdout, "samples")
    assert info["samples"] == DIGITS_TRAIN and info["split"] == "train"
    assert info["shards"] == info["readable_shards"] > 0 and info["skipped"] == {}
    assert len(info["classes"]) == DIGITS_CLASSES and sum(info["classes"].values()) == DIGITS_TRAIN
    assert sorted(info["splits"]) == ["train", "val"]
    assert (user.workdir / "data/digits/index.json").is_file()
    assert json.loads((user.workdir / "data/digits/index.json").read_text())
    # Ray's per-execution INFO chatter (Ray Data's plan and progress) stays off the console: the
    # only Ray INFO lines a user sees are Ray's start-up ones (token written, instance started).
    chatter = [ln for ln in r.out.splitlines() if (m := RAY_INFO.search(ln))
               and m.group(1) not in ("authentication_token_setup.py", "worker.py")]
    assert not chatter, "\n".join(chatter[:5])


USAGE_CI = "epochs=1 batch_size=64 model.width=8 data.image_size=16 augment.crop_size=16"


def test_train_usage_block_runs_as_written(default_run, acc):
    """The "What `cacr train` does" block in the same working directory as command (1) (so
    ./data/digits exists): ``--help`` and a run of conf/digits.yaml with overrides and a name,
    whose summary names its own run directory under ./runs."""
    user, _, _ = default_run
    acc.copy_checkout_configs(user)
    block = acc.readme_block("train-usage")
    script = acc.append_overrides(block.text, "cacr train", USAGE_CI, block.note)
    r = user.run(script, timeout=900)
    assert r.returncode == 0, r.out[-6000:]
    assert "loss.tau_neg" in r.stdout and "optim.base_lr" in r.stdout  # the --help key table
    runs = acc.json_lines(r.stdout, "run_dir")
    assert len(runs) == 1 and runs[0]["epochs"] == 1
    named = acc.resolve(runs[0]["run_dir"], user.workdir)
    assert named.name == "my-run" and named.parent.resolve() == (user.workdir / "runs").resolve()
    from pipeline.checkpoint import load_checkpoint

    state = load_checkpoint(str(acc.resolve(runs[0]["checkpoint"], user.workdir)))
    assert state["config"]["loss"]["tau_neg"] == 2.0 and state["config"]["name"] == "my-run"
