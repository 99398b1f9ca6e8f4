"""bench/bench_gpu.py's code path at toy sizes on the CPU.

No figure is checked here (speed lives in bench/): the GPU bench runs only on a lent GPU machine,
so this is what keeps its code from rotting between such runs - every measurement function
runs once, end to end, on real decode / augmentation / method / loss code, and produces complete
JSON lines."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench_gpu  # noqa: E402
from run import REQUIRED  # noqa: E402

CPU = torch.device("cpu")


def _complete(lines: list[dict]) -> None:
    assert lines
    for line in lines:
        assert all(k in line for k in REQUIRED), line
        assert line["value"] > 0 and line["baseline"] > 0, line


def test_decode_lines_on_cpu():
    blobs = bench_gpu.photo_jpegs(6, max_size=64)
    assert len(blobs) == 6 and all(b[:2] == b"\xff\xd8" for b in blobs)
    lines = bench_gpu.decode_lines(CPU, blobs, size=64, batch=3, reps=1, cpu_workers=1)
    _complete(lines)
    assert [ln["name"] for ln in lines] == ["gpu.decode.nvjpeg_vs_cpu", "gpu.decode_augment.v2_64"]


@pytest.mark.slow
def test_step_and_loss_gather_lines_on_cpu():
    _complete(bench_gpu.step_lines(CPU, n=2, size=64, reps=1, depth=1))
    lines = bench_gpu.loss_gather_lines(CPU, ranks=4, n=8, reps=1, step_n=2, step_size=64)
    _complete(lines)
    assert lines[0]["negatives"] == 4 * 8 * 2

