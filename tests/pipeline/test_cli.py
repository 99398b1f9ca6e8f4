"""`cacr` argument handling: key=value overrides are accepted before AND after options (argparse
alone stops a "*" positional at the first option), anything else stray is refused."""
from __future__ import annotations

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
