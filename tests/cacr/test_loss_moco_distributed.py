"""The distributed contract of cacr_moco_loss (docs/METHOD.md, "Momentum-encoder CACR"):

W = 2 real gloo processes × n images (keys all-gathered WITHOUT gradient inside the loss, DDP
averaging the gradients) must give the same loss (mean over ranks), the same effective numbers and
the same parameter gradients as ONE process on all 2n images.  The keys come from a second network
that DOES require grad, so that a gather with gradient (or a missing detach) would show up as a
gradient difference: the one-process reference detaches the keys explicitly.
"""

from __future__ import annotations

import datetime
import os
import sys

import pytest
import torch
import torch.nn.functional as F

W, V, N_LOCAL, D_IN, D = 2, 4, 3, 6, 5
CASES = {"light": (2, 1.0), "full": (V, 0.2), "one_target": (1, 0.5)}   # name -> (A, T)


def make_nets():
    g = torch.Generator().manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(D_IN, 8), torch.nn.Tanh(), torch.nn.Linear(8, D))
            for _ in range(2)]
    with torch.no_grad():
        for net in nets:
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    return [net.double() for net in nets]


def make_data(n_total):
    g = torch.Generator().manual_seed(1)
    return torch.randn(V, n_total, D_IN, generator=g, dtype=torch.float64)


def qk(online, target, x, A):
    return F.normalize(online(x), dim=-1), F.normalize(target(x[:A]), dim=-1)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from cacr.loss import cacr_moco_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=W,
                            timeout=datetime.timedelta(seconds=60))
    res = {}
    for name, (A, T) in CASES.items():
        online, target = make_nets()
        online = DDP(online)
        x = make_data(W * N_LOCAL)[:, rank * N_LOCAL:(rank + 1) * N_LOCAL]
        q, k = qk(online, target, x, A)
        out = cacr_moco_loss(q, k, temperature=T)
        out.loss.backward()
        vals = torch.stack([out.loss, out.attraction, out.repulsion, out.eff_positives,
                            out.eff_negatives]).detach()
        dist.all_reduce(vals)
        res[name] = {"values": (vals / W).tolist(),
                     "grads": [p.grad.clone() for p in online.parameters()],
                     "key_grads": [p.grad for p in target.parameters()]}
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, spawn_ranks):
    return spawn_ranks(__file__, W, tmp_path_factory.mktemp("dist_moco"), "rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_equal_one_process(ranks, name):
    from cacr.loss import cacr_moco_loss

    A, T = CASES[name]
    online, target = make_nets()
    q, k = qk(online, target, make_data(W * N_LOCAL), A)
    out = cacr_moco_loss(q, k.detach(), temperature=T)
    out.loss.backward()
    values = [float(getattr(out, f).detach()) for f in
              ("loss", "attraction", "repulsion", "eff_positives", "eff_negatives")]
    for r in range(W):
        got = ranks[r][name]
        assert got["values"] == pytest.approx(values, rel=1e-10, abs=1e-10), (r, got["values"], values)
        for g_dist, g_one in zip(got["grads"], online.parameters()):
            torch.testing.assert_close(g_dist, g_one.grad, rtol=1e-10, atol=1e-10)
        assert all(g is None for g in got["key_grads"])          # no gradient reaches the keys


if __name__ == "__main__":
    _worker(int(sys.argv[1]), sys.argv[2], sys.argv[3])
