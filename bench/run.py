"""Benchmark runner: ``python bench/run.py [--quick] [NAME ...]``.

Each benchmark module ``bench/bench_<name>.py`` exposes ``run(quick: bool) -> list[dict]``. Every
line printed is one JSON object with the figure and its baseline measured side by side in the same
run: ``name``, ``value``, ``baseline``, ``ratio`` (value / baseline), ``unit``,
``higher_is_better`` (+ free context keys). Speed is measured here, never asserted in tests.
"""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ["augment", "loss", "ingest", "step", "quality", "moco", "longtail", "memory", "gpu"]
GPU_ONLY = {"gpu"}  # left out of the default list on a machine without CUDA
REQUIRED = ("name", "value", "baseline", "ratio", "unit", "higher_is_better")


def _default_names() -> list[str]:
    import torch

    return [n for n in BENCHES if torch.cuda.is_available() or n not in GPU_ONLY]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {', '.join(BENCHES)}; "
                                             "gpu only where CUDA is available)")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--out", help="also append the JSON lines to this file")
    args = ap.parse_args(argv)
    names = args.names or _default_names()
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {BENCHES}")
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    import torch

    env = {"host": platform.node(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    out = open(args.out, "a") if args.out else None
    failed = 0
    for name in names:
        t0 = time.perf_counter()
        try:
            mod = importlib.import_module(f"bench_{name}")
        except ModuleNotFoundError as e:
            print(json.dumps({"name": name, "error": f"benchmark module missing: {e}"}), flush=True)
            failed += 1
            continue
        try:
            lines = mod.run(quick=args.quick)
        except Exception as e:  # a broken benchmark should not hide the others' figures
            print(json.dumps({"name": name, "error": f"{type(e).__name__}: {e}"}), flush=True)
            failed += 1
            continue
        for line in lines:
            missing = [k for k in REQUIRED if k not in line]
            if missing:
                raise SystemExit(f"benchmark {name} produced a line without {missing}: {line}")
            line = {**line, "quick": args.quick, "bench_seconds": round(time.perf_counter() - t0, 1),
                    "env": env}
            text = json.dumps(line)
            print(text, flush=True)
            if out:
                out.write(text + "\n")
    if out:
        out.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
