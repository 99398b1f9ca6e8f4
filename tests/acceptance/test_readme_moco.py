"""README's momentum-encoder block, verbatim, as a new user runs it in a fresh clone: ``cacr train
--config conf/digits-moco.yaml name=moco`` (CI appends ``epochs=2``, the marker says so) prepares
./data/digits, trains ``cacr_moco`` and exports; ``cacr evaluate ./runs/moco`` scores the printed
run. Checked where the commands printed them: the run directory, its TensorBoard events (the
momentum schedule, key/query alignment, effective positives), the export that names the ONLINE
backbone, and the evaluation's kNN and linear figures. That the preset learns (beats an untrained
encoder) is asserted by tests/pipeline/test_methods_train.py and measured over 3 seeds by
``python bench/run.py quality``.
"""
from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.acceptance]

TRAIN_CI = "epochs=2"
STEPS_PER_EPOCH = 5  # 1438 train images, global batch 2 x 128, last partial batch dropped


def test_digits_moco_preset_trains_exports_the_online_backbone_and_evaluates(user, acc):
    acc.copy_checkout_configs(user)
    block = acc.readme_block("moco-digits")
    r = user.run(acc.append_overrides(block.text, "cacr train", TRAIN_CI, block.note), timeout=1500)
    assert r.returncode == 0, r.out[-6000:]

    s = acc.last_json(r.stdout, "run_dir")
    run_dir = acc.resolve(s["run_dir"], user.workdir)
    assert run_dir.resolve() == (user.workdir / "runs" / "moco").resolve()
    assert s["epochs"] == 2 and s["steps"] == 2 * STEPS_PER_EPOCH and s["skipped"] == {}
    assert (user.workdir / "data" / "digits" / "index.json").is_file()  # prepared where it said

    # TensorBoard at the printed path: the momentum method's own scalars, through the whole run
    tags = acc.scalar_tags(acc.resolve(s["tensorboard_logdir"], user.workdir))
    for tag in ("train/momentum", "train/key_query_alignment", "train/eff_positives"):
        assert tags.get(tag, 0) >= 2, (tag, sorted(tags))

    # the export names the network it holds: the online backbone, not the momentum target
    weights = acc.resolve(s["backbone"], user.workdir)
    assert weights.is_file() and weights.parent == run_dir / "export"
    meta = json.loads((weights.parent / "backbone.json").read_text())
    assert meta["network"].startswith("online backbone"), meta

    ev = [j for j in acc.json_lines(r.stdout, "knn_top1") if "linear_top1" in j][-1]
    assert 0.5 < ev["knn_top1"] <= 1.0 and 0.5 < ev["linear_top1"] <= 1.0, ev
