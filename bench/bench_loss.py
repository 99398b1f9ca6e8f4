"""Benchmark: CACR loss vs the multi-view InfoNCE baseline, forward + backward, same inputs.

Measures the real code path: ``cacr.loss._cacr_from_gathered`` / ``_infonce_from_gathered`` (what
``cacr_loss`` / ``infonce_loss`` run after the all-gather) on local queries (V, n, D) and a
pre-gathered key matrix (V, N, D) that contains the queries at offset 0, so N > n simulates one
worker of a W = N / n job without processes (the gather itself is not timed).

Figures (one JSON line each; value = CACR, baseline = InfoNCE, ratio = value / baseline):
  loss.cacr_vs_infonce.time.n{n}_N{N}      median ms per forward + backward (lower is better)
  loss.cacr_vs_infonce.peak_mem.n{n}_N{N}  peak memory of one forward + backward, MiB
  loss.cacr_detach_vs_cacr.time.n{n}_N{N}  detach_weights=True vs False
Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` above the memory held before the step;
on CPU (torch keeps no CPU allocator statistics) the growth of the peak resident set size over
one step after a warm-up step, in a child process whose malloc returns every block > 128 KiB to
the OS on free (MALLOC_MMAP_THRESHOLD_): the kernel's peak mark (VmHWM) is reset through
/proc/self/clear_refs, the step runs, then VmHWM minus the RSS before.  Page-granular, includes
small-block allocator overhead.

Usage: ``python bench/bench_loss.py [--full]`` prints one JSON line per figure.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from cacr.loss import _cacr_from_gathered, _infonce_from_gathered  # noqa: E402

V, N_LOCAL, DIM = 5, 256, 128
CONFIGS = [(N_LOCAL, N_LOCAL), (N_LOCAL, 4096)]          # (n, N)
CACR_KW = dict(alpha=1.0, beta=1.0, tau_pos=1.0, tau_neg=0.9)
INFONCE_KW = dict(temperature=0.2)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _inputs(n: int, N: int, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(V, n, DIM, generator=g), dim=-1).to(device, dtype).requires_grad_()
    rest = None
    if N > n:
        rest = F.normalize(torch.randn(V, N - n, DIM, generator=g), dim=-1).to(device, dtype)
        rest.requires_grad_()
    return q, rest


def _step(loss: str, q, rest, **kw) -> None:
    keys = q if rest is None else torch.cat([q, rest], dim=1)   # queries at global offset 0
    if loss == "cacr":
        out = _cacr_from_gathered(q, keys, 0, **{**CACR_KW, **kw})
    else:
        out = _infonce_from_gathered(q, keys, 0, **INFONCE_KW)
    out.loss.backward()
    q.grad = None
    if rest is not None:
        rest.grad = None


VARIANTS = {"cacr": ("cacr", {}), "cacr_detach": ("cacr", {"detach_weights": True}),
            "infonce": ("infonce", {})}


def _time_ms(n: int, N: int, reps: int) -> dict[str, float]:
    """Median ms per forward + backward of each variant; variants interleaved rep by rep so that
    load from other processes hits them alike."""
    device = _device()
    q, rest = _inputs(n, N, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for loss, kw in VARIANTS.values():                         # warm-up (masks cached, kernels)
        _step(loss, q, rest, **kw)
    sync()
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for _ in range(reps):
        for name, (loss, kw) in VARIANTS.items():
            t0 = time.perf_counter()
            _step(loss, q, rest, **kw)
            sync()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _peak_mib_here(loss: str, n: int, N: int) -> float:
    """Peak memory of one step in THIS process, after one warm-up step (one-time allocations:
    thread pools, kernel workspaces, cached masks).  CUDA: allocator statistics.  CPU: peak-RSS
    growth; only meaningful when large blocks go back to the OS on free (see ``_peak_mib``)."""
    device = _device()
    q, rest = _inputs(n, N, device)
    _step(loss, q, rest)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _step(loss, q, rest)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    # CPU: reset the kernel's peak-RSS mark (VmHWM), run one step, read it.
    base = _reset_hwm_and_read_rss()
    _step(loss, q, rest)
    return (_read_status_kib("VmHWM") - base) / 1024


def _read_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_hwm_and_read_rss() -> int:
    with open("/proc/self/clear_refs", "w") as f:   # "5": reset the peak RSS (Linux >= 4.0)
        f.write("5")
    return _read_status_kib("VmRSS")


def _peak_mib(jobs: list[tuple[str, int, int]]) -> list[float]:
    """Peak MiB of one step for each (loss, n, N).  On CPU in ONE child process whose glibc malloc
    has a fixed mmap threshold (MALLOC_MMAP_THRESHOLD_): every block > 128 KiB is mmap'ed and
    returned to the OS on free, so RSS tracks live tensors and measurements do not leak into each
    other; the parent's allocator (and other benchmarks' timings) are left alone."""
    if _device().type == "cuda":
        return [_peak_mib_here(*job) for job in jobs]
    code = (f"import sys, json; sys.path.insert(0, {REPO!r}); from bench.bench_loss import _peak_mib_here; "
            f"print(json.dumps([_peak_mib_here(*job) for job in {jobs!r}]))")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=str(torch.get_num_threads()))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _line(name, value, baseline, unit, **extra) -> dict:
    return dict(name=name, value=round(value, 3), baseline=round(baseline, 3),
                ratio=round(value / baseline, 3) if baseline else None, unit=unit,
                higher_is_better=False, **extra)


def run(quick: bool) -> list[dict]:
    device = _device()
    out = []
    jobs = [(loss, n, N) for n, N in CONFIGS for loss in ("cacr", "infonce")]
    peaks = dict(zip(jobs, _peak_mib(jobs)))
    for n, N in CONFIGS:
        reps = (3 if N > n else 10) if quick else (10 if N > n else 50)
        config = dict(V=V, n=n, N=N, D=DIM, dtype="float32", device=device.type,
                      threads=torch.get_num_threads(), reps=reps, cacr=CACR_KW, infonce=INFONCE_KW)
        tag = f"n{n}_N{N}"
        t = _time_ms(n, N, reps)
        out.append(_line(f"loss.cacr_vs_infonce.time.{tag}", t["cacr"], t["infonce"], "ms", config=config,
                         measure="median wall time of forward+backward, variants interleaved"))
        out.append(_line(f"loss.cacr_detach_vs_cacr.time.{tag}", t["cacr_detach"], t["cacr"], "ms",
                         config=config, measure="median wall time of forward+backward; "
                                                "baseline = detach_weights=False"))
        out.append(_line(f"loss.cacr_vs_infonce.peak_mem.{tag}", peaks["cacr", n, N], peaks["infonce", n, N],
                         "MiB", config=config,
                         measure=("cuda.max_memory_allocated above pre-step allocation" if device.type == "cuda"
                                  else "peak RSS (VmHWM) growth over one step, child with fixed mmap threshold")))
    return out


if __name__ == "__main__":
    for rec in run(quick="--full" not in sys.argv[1:]):
        print(json.dumps(rec), flush=True)
