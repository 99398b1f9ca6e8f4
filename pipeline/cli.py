"""The ``cacr`` command: prepare, inspect, train, tune, evaluate, export.

User mistakes (:class:`pipeline.errors.CacrError`: bad config, unreachable storage, bad shards,
bad checkpoint path; a missing or unreadable file the user named) end with one line
``cacr: error: ...`` and exit code 2. Anything else is our bug and shows its full traceback (a
``ValueError`` included). Heavy imports (torch, ray) happen inside the subcommands so
``cacr --help`` is instant.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

def user_errors() -> tuple[type[BaseException], ...]:
    """What the CLI reports in one line: our user-error family, plus the OS's "no such file" /
    "permission denied" for a path the user typed."""
    from pipeline.errors import CacrError

    return (CacrError, FileNotFoundError, PermissionError)


def _keys_epilog() -> str:
    from pipeline.config import keys_help

    return keys_help()


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (keys as below); overrides follow it")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def _cmd_train(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.train import run_training

    cfg = load_config(args.config, args.overrides)
    run_training(cfg)
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from pipeline.tune import run_tune

    run_tune(args.config, args.overrides)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.evaluate import run_evaluate

    run_evaluate(args)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from pipeline.export import run_export

    run_export(args)
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from pipeline.import_moco import run_import

    return run_import(args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="cacr",
        description="CACR self-supervised pretraining on Ray: prepare shards, train, tune, evaluate.",
        epilog="Run `cacr train` with no arguments for the embedded default (digits, 2 CPU workers).",
    )
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    from pipeline.data import commands as data_commands

    p = sub.add_parser("prepare", help="write webdataset shards (+ index.json) to a local dir or s3://")
    data_commands.add_prepare_args(p)
    p.set_defaults(func=data_commands.run_prepare)

    p = sub.add_parser("inspect", help="read shards through the Ray Data path and summarise them")
    data_commands.add_inspect_args(p)
    p.set_defaults(func=data_commands.run_inspect)

    p = sub.add_parser("train", help="distributed CACR pretraining with Ray Train",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_keys_epilog())
    _add_config_args(p)
    p.set_defaults(func=_cmd_train)

    from pipeline.tune import tune_keys_epilog

    p = sub.add_parser("tune", help="hyperparameter search with Ray Tune (trials are training runs)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=tune_keys_epilog())
    p.add_argument("--config", "-c", required=True, help="tune config (conf/tune/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides of the tune config (e.g. num_samples=8) or of the base training "
                        "config (train.<key>=value)")
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("evaluate", help="kNN + linear-probe accuracy of a checkpoint's frozen encoder")
    p.add_argument("checkpoint", help="checkpoint dir or file, or a run dir (its newest checkpoint); "
                                      "local or s3://")
    p.add_argument("--data", help="labelled shard set (default: the one the checkpoint trained on)")
    p.add_argument("--tensorboard", metavar="DIR", help="where the per-class chart, confusion matrices and "
                   "embedding projector go (default: <run>/tensorboard next to the checkpoint; none: off)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="evaluation options")
    data_commands.add_storage_args(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("export", help="backbone weights (safetensors) + architecture/preprocessing JSON")
    p.add_argument("checkpoint", help="checkpoint dir or file, or a run dir (its newest checkpoint); "
                                      "local or s3://")
    p.add_argument("out", help="output directory (local or s3://)")
    data_commands.add_storage_args(p)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("import", help="convert the authors' MoCo-v3-layout checkpoint into an export")
    p.add_argument("checkpoint", help="local .pth.tar (torch dict with state_dict module.base_encoder.*)")
    p.add_argument("out", help="output directory (local or s3://), as `cacr export` writes")
    p.set_defaults(func=_cmd_import)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    # `cacr evaluate CKPT --data URL k=v` / `cacr train k=v --config F k=v`: argparse ends a "*"
    # positional at the first option, so overrides after an option come back as extras.
    args, extras = ap.parse_known_args(argv)
    if extras:
        stray = [x for x in extras if x.startswith("-") or not hasattr(args, "overrides")]
        if stray:
            ap.error(f"unrecognized arguments: {' '.join(stray)}")
        args.overrides = [*(args.overrides or []), *extras]
    func: Callable[[argparse.Namespace], int] = args.func
    from pipeline import signals

    signals.install(ray_driver=args.command in ("train", "tune", "evaluate"))  # SIGTERM = Ctrl-C
    try:
        return int(func(args) or 0)
    except (KeyboardInterrupt, SystemExit):  # SystemExit: Ray Train's own SIGINT handler (signals.py)
        return signals.on_interrupt(sys.argv[1:] if argv is None else list(argv))
    except RuntimeError as e:
        from pipeline.train import TrainingFailed

        if not isinstance(e, TrainingFailed) or os.environ.get("CACR_DEBUG"):
            raise
        print(f"cacr: {e}", file=sys.stderr)
        return 1
    except user_errors() as e:
        if os.environ.get("CACR_DEBUG"):
            raise
        # One line, naming the thing and what to do; the classes raised for user mistakes carry it.
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"cacr: error: {msg}  (CACR_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
