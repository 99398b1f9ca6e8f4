"""README's long-tailed recipe, verbatim, as a new user runs it: prepare digits with ``--imbalance
exp:100`` -> inspect -> train -> evaluate -> open TensorBoard.

CI appends ``epochs=2 model.width=8 loss.num_positives=1`` to ``cacr train`` (the marker in README.md
says so: what is checked here is counts, groups and pictures, not accuracy). The ``tensorboard``
line serves until it is stopped, so it runs apart, with ``--port 0`` appended (also named by the
marker): the test asks the running server's HTTP API for what a user opens (the per-class chart,
both confusion matrices, the projector's embeddings), after reading the event and projector files
back at the path ``cacr evaluate`` printed.
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.acceptance]

TRAIN_CI = "epochs=2 model.width=8 loss.num_positives=1"  # counts, groups, pictures: not accuracy
TB_CI = "--port 0"
EXP100_TRAIN = [142, 87, 51, 31, 18, 11, 6, 3, 2, 1]  # digits seed 0 (docs/LONGTAIL.md)
IMAGE_TAGS = {"eval/per_class_accuracy", "eval/confusion_matrix/knn", "eval/confusion_matrix/linear"}


def _split_tensorboard_line(text: str) -> tuple[str, str]:
    lines = text.splitlines()
    tb = [ln for ln in lines if ln.startswith("tensorboard ")]
    assert len(tb) == 1 and lines[-1] == tb[0], "the recipe ends with its one `tensorboard` line"
    return "\n".join(lines[:-1]), tb[0]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _serve(user, line: str, timeout: float = 180.0):
    """Start the README's tensorboard line; (process, base URL) once it says where it serves."""
    proc = subprocess.Popen(["bash", "-c", line], cwd=user.workdir, env=user.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = proc.stdout.readline()
        if not out and proc.poll() is not None:
            break
        seen.append(out)
        m = re.search(r"(http://localhost:\d+)/", out)
        if m:
            return proc, m.group(1)
    _stop(proc)
    pytest.fail("tensorboard did not start:\n" + "".join(seen)[-3000:])


def _stop(proc: subprocess.Popen) -> None:
    import os

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_long_tailed_recipe_then_tensorboard_shows_chart_confusion_and_projector(user, acc):
    block = acc.readme_block("longtail-recipe")
    script, tb_line = _split_tensorboard_line(block.text)
    script = acc.append_overrides(script, "cacr train", TRAIN_CI, block.note)
    r = user.run(script, timeout=1200)
    assert r.returncode == 0, r.out[-6000:]

    # inspect: the per-class counts of the long-tailed training split, and its profile
    info = [j for j in acc.json_lines(r.stdout, "samples") if "split" in j][-1]
    assert info["split"] == "train" and info["classes"] == {str(c): n for c, n in enumerate(EXP100_TRAIN)}
    assert info["imbalance"]["profile"] == "exp:100"
    assert "imbalance: exp:100 on the training split" in r.stdout

    # train, then evaluate the run it printed
    s = acc.last_json(r.stdout, "run_dir")
    run_dir = acc.resolve(s["run_dir"], user.workdir)
    assert run_dir.resolve() == (user.workdir / "runs" / "lt").resolve() and s["epochs"] == 2
    ev = [j for j in acc.json_lines(r.stdout, "per_class") if "knn_top1" in j][-1]
    assert ev["per_class"]["train_counts"] == EXP100_TRAIN and sum(ev["per_class"]["val_counts"]) == 359
    assert ev["groups"]["classes"] == {"many": [0, 1, 2, 3], "medium": [4, 5, 6], "few": [7, 8, 9]}
    assert set(ev["groups"]["knn_top1"]) == {"many", "medium", "few"}

    # the README's tensorboard line opens the directory evaluate wrote its pictures to
    printed = acc.resolve(ev["tensorboard"], user.workdir)
    said = [ln for ln in r.stdout.splitlines() if "per-class chart" in ln and "tensorboard --logdir" in ln]
    assert said and acc.resolve(said[-1].split("tensorboard --logdir", 1)[1].strip(), user.workdir) == printed
    readme_logdir = tb_line.split("--logdir", 1)[1].split()[0]
    assert acc.resolve(readme_logdir, user.workdir).resolve() == printed.resolve()

    # the files, read back where it printed them
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(printed), size_guidance={"images": 0})
    ea.Reload()
    assert IMAGE_TAGS <= set(ea.Tags()["images"])
    chart = ea.Images("eval/per_class_accuracy")[-1]
    assert chart.step == 2 and chart.width >= 320 and chart.height > 200
    cfg = (printed / "projector_config.pbtxt").read_text()
    tensors = printed / re.search(r'tensor_path: "([^"]+)"', cfg).group(1)
    meta = printed / re.search(r'metadata_path: "([^"]+)"', cfg).group(1)
    sprite = printed / re.search(r'image_path: "([^"]+)"', cfg).group(1)
    assert len(tensors.read_text().strip().splitlines()) == 359
    assert meta.read_text().splitlines()[0] == "label\tclass\tgroup" and sprite.stat().st_size > 1000

    # what a user sees: the README's tensorboard line, served, asked over HTTP
    proc, base = _serve(user, acc.append_overrides(tb_line, "tensorboard", TB_CI, block.note))
    try:
        deadline = time.monotonic() + 120  # TensorBoard loads the event files in the background
        images: dict = {}
        while time.monotonic() < deadline:
            images = _get(f"{base}/data/plugin/images/tags")
            if IMAGE_TAGS <= set(images.get(".", {})):
                break
            time.sleep(2)
        assert IMAGE_TAGS <= set(images.get(".", {})), images
        assert "." in _get(f"{base}/data/plugin/projector/runs")
        emb = _get(f"{base}/data/plugin/projector/info?run=.")["embeddings"]
        assert any(e.get("tensorShape", [0])[0] == 359 and e.get("metadataPath") and e.get("sprite")
                   for e in emb), emb
    finally:
        _stop(proc)
