"""Mid-epoch resume without Ray: what a checkpoint records (pipeline/epoch_resume.py) and how the
streaming reader leaves the consumed rows out and re-pads (pipeline/data/read.py). The end-to-end
run (a worker failure mid-epoch, cached and streaming) is tests/pipeline/test_train.py."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import torch

from pipeline.data.format import OK, PAD, UNDECODABLE_IMAGE
from pipeline.data.read import EXTRA_PAD_BIT, _read_shard_blocks, _without_consumed, is_extra_pad
from pipeline.epoch_resume import Consumption, merge_partial


def test_partial_epoch_unites_workers_and_what_a_resumed_session_carried():
    a, b = Consumption(), Consumption()
    a.add_trained(torch.tensor([5, 1]), torch.tensor([OK, OK], dtype=torch.int8))
    a.add_dropped(torch.tensor([9]), torch.tensor([UNDECODABLE_IMAGE], dtype=torch.int8))
    b.add_trained(torch.tensor([2, 7]), torch.tensor([OK, 2], dtype=torch.int8))  # 2 = bad label
    carried = {"consumed": torch.tensor([3, 4]), "skipped": {"undecodable_image": 1},
               "sum_loss": 1.5, "steps": 2, "worker_steps": 1, "rows": 2}
    gathered = [{**a.local(), "loss": 2.0, "steps": 1}, {**b.local(), "loss": 2.5, "steps": 1}]
    p = merge_partial(carried, gathered, epoch=3, mode="row", worker_steps=2, rows_of=len)
    assert p["consumed"].tolist() == [1, 2, 3, 4, 5, 7, 9]
    assert p["skipped"] == {"undecodable_image": 2, "bad_label": 1}
    assert (p["sum_loss"], p["steps"], p["worker_steps"], p["rows"], p["epoch"]) == (6.0, 4, 2, 7, 3)


def _shard_bytes(n: int) -> bytes:
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i in range(n):
            for ext, data in (("png", b"img%d" % i), ("cls", b"1")):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _task(path: str, shard_no: int, rows: int, pad: int):
    from ray.data.block import BlockMetadata
    from ray.data.datasource import ReadTask

    data = _shard_bytes(rows)

    def read():
        yield from _read_shard_blocks(io.BytesIO(data), path, shard_no, None, pad, True, 4, rows)
    return ReadTask(read, BlockMetadata(num_rows=rows + pad, size_bytes=None, input_files=[path],
                                        exec_stats=None))


def test_streaming_resume_reads_the_rest_of_the_epoch_once_and_still_divides_by_the_workers():
    # two shards (7 + 6 rows, 1 PAD row on the first so that 14 divides by 2 workers)
    plans = {"s/a.tar": (0, None, 1, 7), "s/b.tar": (1, None, 0, 6)}
    tasks = [_task("s/a.tar", 0, 7, 1), _task("s/b.tar", 1, 6, 0)]
    every = [r for t in tasks for blk in t() for r in blk.column("id").to_pylist()]
    assert len(every) == 14
    consumed = np.array([(0 << 32) | 2, (0 << 32) | 7, (1 << 32) | 0], np.int64)  # 7 = the PAD row
    out = _without_consumed(tasks, consumed, plans, world=2)
    rows = pa.concat_tables([blk for t in out for blk in t()])
    ids = np.array(rows.column("id").to_pylist(), np.int64)
    extra = is_extra_pad(ids)
    assert sorted(ids[~extra].tolist()) == sorted(set(every) - set(consumed.tolist()))  # the rest, once
    assert len(ids) % 2 == 0 and extra.sum() == 1  # 11 left: one resume PAD row makes it 12
    assert np.array(rows.column("skip").to_pylist())[extra].tolist() == [PAD]
    assert ids[extra][0] >> 32 == 0 and ids[extra][0] & EXTRA_PAD_BIT  # in the first shard's task
    # a second resume of the same epoch: the first resume's PAD row is no consumed row
    again = _without_consumed(tasks, np.concatenate([consumed, ids[extra]]), plans, world=2)
    ids2 = np.array([r for t in again for blk in t() for r in blk.column("id").to_pylist()], np.int64)
    assert len(ids2) == 12 and is_extra_pad(ids2).sum() == 1


class _Shard:
    """Stands for a cached DataIterator (the block cache is keyed by it, weakly)."""


def test_cached_resume_reads_the_rest_of_the_epoch_once_split_over_the_workers(monkeypatch):
    from pipeline.data import batches

    # a cached set of 3 blocks (10 + 7 + 9 rows); block b's column "id" = 100 * b + row
    sizes = [10, 7, 9]
    blocks = {b: {"id": np.arange(n) + 100 * b, "skip": np.zeros(n, np.int8), "label": np.zeros(n, np.int64)}
              for b, n in enumerate(sizes)}
    monkeypatch.setattr(batches, "_cached_blocks", lambda shard: [(b, n) for b, n in enumerate(sizes)])
    monkeypatch.setattr(batches, "_fetch_block", lambda ref: blocks[ref])

    def epoch_rows(shard, exclude=None, world=2):
        per = []
        for rank in range(world):
            got = list(batches._cached_rows(shard, batch_size=4, epoch=3, seed=1, rank=rank, world=world,
                                            prefetch=1, exclude=exclude))
            per.append([int(r) for b in got for r in b["row"]])
            for b in got:  # the row number names the row it gathered
                starts = np.cumsum([0, *sizes])
                blk = np.searchsorted(starts, b["row"], side="right") - 1
                assert (b["id"] == 100 * blk + (b["row"] - starts[blk])).all()
        return per

    full = epoch_rows(_Shard())
    assert sorted(full[0] + full[1]) == list(range(26))
    consumed = np.array(full[0][:4] + full[1][:4])  # one step of each worker trained
    rest = epoch_rows(_Shard(), exclude=consumed)
    assert not set(rest[0]) & set(rest[1])
    assert sorted(rest[0] + rest[1]) == sorted(set(range(26)) - set(consumed.tolist()))
    assert abs(len(rest[0]) - len(rest[1])) <= 1
    # the same again after a second resume (exclusion = a superset): still the rest, once
    more = np.concatenate([consumed, np.array(rest[0][:4] + rest[1][:4])])
    again = epoch_rows(_Shard(), exclude=more)
    assert sorted(again[0] + again[1]) == sorted(set(range(26)) - set(more.tolist()))
