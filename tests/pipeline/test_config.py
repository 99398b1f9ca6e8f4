"""The typed config: YAML + overrides, types checked, unknown keys and impossible values named."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.config import (Config, ConfigError, apply_flat, describe_keys, from_dict, load_config,
                             to_dict)

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_valid_and_round_trip():
    cfg = load_config()
    assert cfg.num_views == cfg.loss.num_positives + 1 == 5
    assert cfg.loss.tau_neg == 0.9 and cfg.loss.tau_pos == 1.0 and cfg.loss.alpha == 1.0
    again = from_dict(Config, to_dict(cfg))
    assert to_dict(again) == to_dict(cfg)


def test_overrides_are_typed(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 3\nloss:\n  tau_neg: 2\noptim:\n  name: lars\n")
    cfg = load_config(f, ["loss.detach_weights=true", "augment.scale=[0.3, 1.0]", "name=abc",
                          "fail_at_step=null", "batch_size=64"])
    assert cfg.epochs == 3 and cfg.loss.tau_neg == 2.0 and isinstance(cfg.loss.tau_neg, float)
    assert cfg.optim.name == "lars" and cfg.loss.detach_weights is True
    assert cfg.augment.scale == (0.3, 1.0) and cfg.name == "abc" and cfg.batch_size == 64


@pytest.mark.parametrize("override, fragment", [
    ("optim.base_lrr=0.1", "unknown config key 'optim.base_lrr' (did you mean 'optim.base_lr'?)"),
    ("epochs=three", "'epochs'"),
    ("epochs=0", "'epochs'"),
    ("loss.name=triplet", "'loss.name'"),
    ("loss.detach_weights=maybe", "'loss.detach_weights'"),
    ("loss.num_positives=0", "'loss.num_positives'"),
    ("augment.crop_size=64", "'augment.crop_size'"),
    ("augment.scale=[0.5]", "'augment.scale'"),
    ("optim=3", "'optim'"),
    ("noequals", "key=value"),
])
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    unk = tmp_path / "unk.yaml"
    unk.write_text("model:\n  archh: resnet18\n")
    with pytest.raises(ConfigError, match="model.archh"):
        load_config(unk)


def test_apply_flat_is_validated_copy():
    base = load_config()
    new = apply_flat(base, {"loss.tau_neg": 2.0, "optim.base_lr": 0.3})
    assert new.loss.tau_neg == 2.0 and base.loss.tau_neg == 0.9
    with pytest.raises(ConfigError, match="loss.tau_neg"):
        apply_flat(base, {"loss.tau_neg": -1.0})


def test_describe_keys_lists_every_leaf():
    keys = {k for k, _, _ in describe_keys()}
    assert {"epochs", "loss.tau_neg", "optim.base_lr", "augment.scale", "storage.endpoint_url",
            "data.url", "model.arch"} <= keys


@pytest.mark.parametrize("path", sorted((REPO / "conf").glob("*.yaml")))
def test_shipped_training_configs_load(path):
    load_config(path)


def test_help_shows_the_runs_effective_defaults_and_text_for_every_key():
    rows = {k: (d, h) for k, d, h in describe_keys()}
    # the run's augment (digits: milder crops, no flips), not AugmentConfig's own CIFAR defaults
    assert rows["augment.scale"][0] == "[0.4, 1.0]" and rows["augment.flip_p"][0] == "0.0"
    missing = [k for k, (_, h) in rows.items() if not h.strip()]
    assert missing == [], f"keys without help text: {missing}"
    assert "last worker" in rows["fail_at_step"][1]  # what _inject_failure does: rank world - 1


@pytest.mark.parametrize("override, suggestion", [
    ("base_lr=0.1", "optim.base_lr"),          # right leaf, missing section
    ("optim.base_lrr=0.1", "optim.base_lr"),
    ("augment.flip=0.1", "augment.flip_p"),
    ("tau_neg=2", "loss.tau_neg"),
])
def test_did_you_mean_names_the_full_dotted_key(override, suggestion):
    with pytest.raises(ConfigError, match=rf"did you mean '{re.escape(suggestion)}'\?"):
        load_config(None, [override])


def test_yaml_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\nloss:\n  tau_neg: [1\nmodel: {}\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert re.search(rf"{re.escape(str(bad))}:[34]:\d+", str(e.value)), str(e.value)
    assert "\n" not in str(e.value)


def test_config_file_on_s3_is_read_through_storage(s3_bucket):
    from pipeline.storage import write_text

    url = f"{s3_bucket}/conf/best_config.yaml"
    write_text(url, "epochs: 3\noptim:\n  base_lr: 0.3\n")
    cfg = load_config(url, ["batch_size=64"])
    assert cfg.epochs == 3 and cfg.optim.base_lr == 0.3 and cfg.batch_size == 64
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(f"{s3_bucket}/conf/nope.yaml")
