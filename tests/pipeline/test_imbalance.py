"""Long-tailed training subsets (`cacr prepare --imbalance`): exact per-class counts on digits,
seeded and reproducible, validation untouched, zero-class refusal in one line."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import prepare
from pipeline.data.format import DataError
from pipeline.data.imbalance import Profile, class_counts, parse_profile, subsample

REPO = Path(__file__).resolve().parents[2]
# digits, seed 0, val 0.2: the balanced training split's class counts, and floor(f_c * n_c) of exp:100
BALANCED_TRAIN = [142, 146, 142, 146, 145, 146, 145, 143, 139, 144]
EXP100_TRAIN = [142, 87, 51, 31, 18, 11, 6, 3, 2, 1]


def _shard_labels(url: str, split: str) -> tuple[Counter, set[str]]:
    """Labels and keys actually stored in the tar shards of ``split`` (read without the pipeline)."""
    labels: Counter = Counter()
    keys: set[str] = set()
    for tar in sorted(Path(url).glob(f"{split}-*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, _, ext = m.name.partition(".")
                if ext == "cls":
                    labels[int(tf.extractfile(m).read())] += 1
                    keys.add(key)
    return labels, keys


@pytest.fixture(scope="module")
def lt_shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("digits-lt") / "exp100"
    prepare("digits", str(out), imbalance="exp:100", progress=False, echo=lambda m: None)
    return str(out)


def test_parse_profiles_and_their_fractions():
    assert parse_profile(None) is None and parse_profile("none") is None and parse_profile("") is None
    assert parse_profile("exp:100") == Profile("exp", 100.0)
    f = parse_profile("exp:10").fractions(10)
    assert f[0] == 1.0 and f[-1] == pytest.approx(0.1) and np.all(np.diff(f) < 0)
    # linear with R = C (and plain `linear`) is the authors' CIFAR-10 profile (c + 1) / C
    for text in ("linear", "linear:10"):
        np.testing.assert_allclose(parse_profile(text).fractions(10), (np.arange(10) + 1) / 10)
    for bad in ("exp", "exp:0.5", "exp:abc", "log:10", "exp:inf"):
        with pytest.raises(DataError, match="--imbalance"):
            parse_profile(bad)


def test_digits_exp100_exact_counts_train_only(lt_shards, digits_shards):
    idx = json.loads((Path(lt_shards) / "index.json").read_text())
    assert idx["imbalance"]["profile"] == "exp:100"
    assert idx["imbalance"]["train_counts_before"] == BALANCED_TRAIN
    assert idx["imbalance"]["train_counts"] == EXP100_TRAIN
    assert idx["class_counts"]["train"] == EXP100_TRAIN
    # what is in the shards is what the index says
    got, _ = _shard_labels(lt_shards, "train")
    assert [got[c] for c in range(10)] == EXP100_TRAIN
    # validation: the same images as the balanced set with the same seed, class for class
    lt_val, lt_keys = _shard_labels(lt_shards, "val")
    bal_val, bal_keys = _shard_labels(digits_shards, "val")
    assert lt_keys == bal_keys and lt_val == bal_val
    bal = json.loads((Path(digits_shards) / "index.json").read_text())
    assert bal["imbalance"] is None and bal["class_counts"]["train"] == BALANCED_TRAIN
    assert [s["fingerprint"] for s in idx["splits"]["val"]["shards"]] == \
        [s["fingerprint"] for s in bal["splits"]["val"]["shards"]]


def test_same_seed_same_shards_other_seed_other_images(lt_shards, tmp_path):
    again = tmp_path / "again"
    prepare("digits", str(again), imbalance="exp:100", progress=False, echo=lambda m: None)
    a = json.loads((Path(lt_shards) / "index.json").read_text())
    b = json.loads((again / "index.json").read_text())
    assert a == b
    for tar in Path(lt_shards).glob("*.tar"):
        assert (again / tar.name).read_bytes() == tar.read_bytes()
    # other seed, same counts, different images; a steeper profile keeps a subset of a milder one
    labels = np.repeat(np.arange(5), 40)
    idx = np.random.default_rng(3).permutation(len(labels))
    names = [str(c) for c in range(5)]
    s0 = subsample(idx, labels, Profile("exp", 10.0), seed=0, class_names=names)
    s1 = subsample(idx, labels, Profile("exp", 10.0), seed=1, class_names=names)
    assert class_counts(labels[s0], 5) == class_counts(labels[s1], 5) == [40, 22, 12, 7, 4]
    assert set(s0.tolist()) != set(s1.tolist())
    steep = subsample(idx, labels, Profile("exp", 40.0), seed=0, class_names=names)
    assert set(steep.tolist()) <= set(s0.tolist())
    # the kept images keep the split's (shuffled) order
    pos = {int(v): i for i, v in enumerate(idx)}
    assert [pos[int(v)] for v in s0] == sorted(pos[int(v)] for v in s0)


def test_zero_image_class_refused_in_one_line_unless_allowed(tmp_path):
    out = tmp_path / "refused"
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "prepare", "digits", str(out),
                        "--imbalance", "exp:1000", "--no-progress"], capture_output=True, text=True,
                       cwd=REPO, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "class 7 ('7') with 0 of its 143 training images" in lines[0], r.stderr
    assert "--allow-empty-classes" in lines[0] and "Traceback" not in r.stderr
    assert not list(out.glob("*")) if out.exists() else True       # nothing written
    allowed = tmp_path / "allowed"
    idx = prepare("digits", str(allowed), imbalance="exp:1000", allow_empty_classes=True,
                  progress=False, echo=lambda m: None)
    assert idx["class_counts"]["train"][7:] == [0, 0, 0] and idx["imbalance"]["allow_empty_classes"]
    assert idx["class_counts"]["val"][7:] == [36, 35, 36]


@pytest.mark.slow
def test_inspect_prints_per_class_counts_and_profile(lt_shards, ray_session):
    from pipeline.data.commands import format_summary, inspect_shards

    r = inspect_shards(lt_shards, "train")
    assert r["classes"] == {str(c): n for c, n in enumerate(EXP100_TRAIN)}
    text = format_summary(r)
    assert "classes: 0=142, 1=87, 2=51" in text and "imbalance: exp:100 on the training split" in text
    v = inspect_shards(lt_shards, "val")
    assert sum(v["classes"].values()) == 359 and min(v["classes"].values()) >= 35


def test_config_imbalance_key_is_checked():
    from pipeline.config import ConfigError, load_config

    assert load_config(None, ["data.imbalance=exp:10"]).data.imbalance == "exp:10"
    with pytest.raises(ConfigError, match="data.imbalance"):
        load_config(None, ["data.imbalance=exp:0"])
