"""The ``cacr`` command: prepare, inspect, train, tune, evaluate, export.

User mistakes (bad config, unreachable storage, bad shards, bad checkpoint path) end with one line
``cacr: error: ...`` and exit code 2, never a traceback. Heavy imports (torch, ray) happen inside
the subcommands so ``cacr --help`` is instant.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError)


def _keys_epilog(cls_path: str = "pipeline.config:Config") -> str:
    from pipeline.config import describe_keys

    rows = describe_keys()
    width = max(len(k) for k, _, _ in rows)
    lines = ["config keys (set as key=value; nested keys are dotted):"]
    for key, default, help_ in rows:
        lines.append(f"  {key:<{width}}  {help_} (default: {default})")
    return "\n".join(lines)


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

    p = sub.add_parser("tune", help="hyperparameter search with Ray Tune (trials are training runs)")
    p.add_argument("--config", "-c", required=True, help="tune config (conf/tune/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides of the tune config (e.g. num_samples=8) or of the base training "
                        "config (train.<key>=value)")
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("evaluate", help="kNN + linear-probe accuracy of a checkpoint's frozen encoder")
    p.add_argument("checkpoint", help="checkpoint dir or file (local or s3://)")
    p.add_argument("--data", help="labelled shard set (default: the one the checkpoint trained on)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="evaluation options")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("export", help="backbone weights (safetensors) + architecture/preprocessing JSON")
    p.add_argument("checkpoint", help="checkpoint dir or file (local or s3://)")
    p.add_argument("out", help="output directory")
    p.set_defaults(func=_cmd_export)
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
    except USER_ERRORS as e:
        if os.environ.get("CACR_DEBUG"):
            raise
        # One line, naming the thing and what to do; the classes raised for user mistakes carry it.
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"cacr: error: {msg}  (CACR_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
