"""Per-class evaluation: the numbers (per class, many/medium/few groups from the training counts)
and what TensorBoard shows (bar chart, confusion matrices, embedding projector), read back from the
event and projector files that `cacr evaluate` writes."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import eval_report
from pipeline.config import load_config, to_dict

EXP100_TRAIN = [142, 87, 51, 31, 18, 11, 6, 3, 2, 1]


def test_groups_scale_the_usual_rule_to_the_head_class():
    g = eval_report.shot_groups(EXP100_TRAIN)         # s = 142 / 500
    assert g["scale"] == pytest.approx(0.284) and g["many_above"] == pytest.approx(28.4)
    assert g["few_below"] == pytest.approx(5.68)
    assert g["classes"] == {"many": [0, 1, 2, 3], "medium": [4, 5, 6], "few": [7, 8, 9]}
    # a set whose head class has >= 500 images gets the usual > 100 / 20..100 / < 20 rule unscaled
    big = eval_report.shot_groups([5000, 101, 100, 20, 19])
    assert big["scale"] == 1.0 and big["classes"] == {"many": [0, 1], "medium": [2, 3], "few": [4]}


def test_per_class_group_and_confusion_numbers():
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    p = np.array([0, 0, 0, 1, 1, 0, 2, 1, 1, 1])
    assert eval_report.per_class_accuracy(p, y, 4) == [0.75, 0.5, 0.25, None]
    acc = eval_report.group_accuracy(p, y, {"many": [0], "medium": [1, 2], "few": [3]})
    assert acc == {"many": 0.75, "medium": 2 / 6, "few": None}
    cm = eval_report.confusion_matrix(p, y, 4)
    assert cm[0].tolist() == [3, 1, 0, 0] and cm[2].tolist() == [0, 3, 1, 0] and cm.sum() == 10
    rep = eval_report.class_report(np.array([0] * 600 + [1] * 50 + [2] * 5), y, {"knn": p, "linear": None}, 3)
    assert rep["per_class"]["train_counts"] == [600, 50, 5] and rep["per_class"]["linear_top1"] is None
    assert rep["groups"]["classes"] == {"many": [0], "medium": [1], "few": [2]}
    assert rep["groups"]["knn_top1"] == {"many": 0.75, "medium": 0.5, "few": 0.25}
    # the pictures are real images of a plausible size, not blank
    chart = eval_report.bar_chart({**rep["per_class"], "knn_top1": [0.75, 0.5, 0.25]})
    heat = eval_report.confusion_image(cm, ["a", "b", "c", "d"], "t")
    for im in (chart, heat):
        assert im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3 and im.std() > 10


def test_default_logdir_is_next_to_the_checkpoint():
    assert eval_report.default_logdir("runs/r1/checkpoint_000003") == "runs/r1/tensorboard"
    assert eval_report.default_logdir("s3://b/runs/r1/checkpoint_000003/state.pt") == "s3://b/runs/r1/tensorboard"
    from pipeline.cli import build_parser
    args = build_parser().parse_args(["evaluate", "ck", "--tensorboard", "tb/x"])
    assert args.tensorboard == "tb/x"


@pytest.fixture(scope="module")
def lt_eval(ray_session, tmp_path_factory):
    """An untrained checkpoint evaluated on digits exp:100 (random conv features already separate
    digits well; what matters here is what gets reported and written)."""
    from cacr.model import CACRModel
    from pipeline.checkpoint import save_state
    from pipeline.data import prepare
    from pipeline.evaluate import evaluate, parse_options

    root = tmp_path_factory.mktemp("evalrep")
    url = str(root / "digits-lt")
    prepare("digits", url, imbalance="exp:100", progress=False, echo=lambda m: None)
    cfg = load_config(None, ["data.image_size=16", "augment.crop_size=16", "model.width=8",
                             "model.head_hidden=32", "model.head_out=16", f"data.url={url}"])
    torch.manual_seed(0)
    m = cfg.model
    model = CACRModel(m.arch, small_images=m.small_images, width=m.width, head_hidden=m.head_hidden,
                      head_out=m.head_out, head_layers=m.head_layers, norm=m.norm)
    ckpt = root / "run" / "checkpoint_000002"
    save_state(ckpt, {"model": model.state_dict(), "config": to_dict(cfg), "epoch": 2, "step": 4,
                      "metrics": {}})
    result = evaluate(str(ckpt), url, parse_options(["actors=1", "threads=1", "linear_epochs=20"]),
                      echo=lambda m: None)
    return result, root / "run" / "tensorboard"


@pytest.mark.slow
def test_evaluate_json_has_per_class_and_group_accuracy(lt_eval):
    r, logdir = lt_eval
    json.dumps(r, allow_nan=False)
    pc, g = r["per_class"], r["groups"]
    assert pc["train_counts"] == EXP100_TRAIN and sum(pc["val_counts"]) == r["samples"]["val"] == 359
    assert g["classes"] == {"many": [0, 1, 2, 3], "medium": [4, 5, 6], "few": [7, 8, 9]}
    assert "100" in g["rule"] and g["few_below"] == pytest.approx(5.68)
    for m in ("knn", "linear"):
        acc, n = np.array(pc[f"{m}_top1"]), np.array(pc["val_counts"])
        # overall = per-class weighted by validation counts; each group = the same over its classes
        assert float((acc * n).sum() / n.sum()) == pytest.approx(r[f"{m}_top1"], abs=1e-6)  # float32 mean
        for name, cls in g["classes"].items():
            assert g[f"{m}_top1"][name] == pytest.approx(float((acc[cls] * n[cls]).sum() / n[cls].sum()))
    assert r["tensorboard"] == str(logdir)


@pytest.mark.slow
def test_tensorboard_images_and_projector_read_back(lt_eval):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r, logdir = lt_eval
    acc = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"eval/per_class_accuracy", "eval/confusion_matrix/knn",
            "eval/confusion_matrix/linear"} <= set(tags["images"])
    img = acc.Images("eval/per_class_accuracy")[-1]
    assert img.step == 2 and img.width >= 320 and img.height > 200
    assert acc.Scalars("eval/knn_top1/few")[-1].value == pytest.approx(r["groups"]["knn_top1"]["few"])
    # projector: config at the log dir, tensors / metadata / sprite where it points
    cfg = (logdir / "projector_config.pbtxt").read_text()
    tensor_path = re.search(r'tensor_path: "([^"]+)"', cfg).group(1)
    meta_path = re.search(r'metadata_path: "([^"]+)"', cfg).group(1)
    sprite_path = re.search(r'image_path: "([^"]+)"', cfg).group(1)
    rows = (logdir / tensor_path).read_text().strip().splitlines()
    assert len(rows) == 359 and len(rows[0].split("\t")) == 64          # narrow_resnet w=8: 8w features
    meta = (logdir / meta_path).read_text().strip().splitlines()
    assert meta[0] == "label\tclass\tgroup" and len(meta) == 360
    counts = np.bincount([int(line.split("\t")[0]) for line in meta[1:]], minlength=10)
    assert counts.tolist() == r["per_class"]["val_counts"]
    assert {line.split("\t")[2] for line in meta[1:] if line.startswith("9\t")} == {"few"}
    from PIL import Image
    sprite = Image.open(logdir / sprite_path)
    assert sprite.size == (math.ceil(359 ** 0.5) * 16,) * 2 and np.asarray(sprite).std() > 10
