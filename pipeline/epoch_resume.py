"""Mid-epoch checkpoints (``checkpoint.every_steps``): what an epoch has consumed so far, and what
a resume in the middle of that epoch carries over.

A row of the train set is *consumed* once it can never be needed again in the epoch: a row the
step trained on, or a dropped row (damaged sample, padding) that was read (it is counted when
read). Rows read ahead but not yet trained on (prefetched batches, the re-batching buffer) are
NOT consumed: a resume delivers them again. A row is named by its key: the cached set's row
number (``row``), or the streaming reader's stable ``id`` (shard << 32 | ordinal).

At a mid-epoch checkpoint every worker hands its consumption to rank 0, which stores the epoch's
union (sorted keys) with the epoch's running totals (loss sum, steps, rows, skip reasons) under
``"partial_epoch"``. A resume leaves exactly those rows out of that epoch (the cached order is
filtered before it is cut into the workers' slices; the streaming reader filters its shards and
re-pads, :func:`pipeline.data.read.publish_exclusion`) and adds the totals to the epoch's own, so
the epoch's metrics (``rows_read``, ``skipped``, loss) read as if it had never stopped.

Skip reasons are counted so that nothing is counted twice: dropping reasons when the row is read
(it is consumed then), label reasons (missing/bad label, rows that still train) when the row is
trained on.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.data.format import FIRST_DROPPED, NUM_CODES, OK, SKIP_REASONS


def _reasons(codes: torch.Tensor) -> dict[str, int]:
    counts = torch.bincount(codes.to(torch.int64), minlength=NUM_CODES).tolist()
    return {SKIP_REASONS[c]: counts[c] for c in SKIP_REASONS if counts[c]}


def _add(into: dict[str, int], counts: dict[str, int]) -> None:
    for k, v in counts.items():
        into[k] = into.get(k, 0) + int(v)


@dataclass
class Consumption:
    """One worker's consumption of the current epoch in this session."""

    keys: list[torch.Tensor] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def add_dropped(self, keys: torch.Tensor, codes: torch.Tensor) -> None:
        """Dropped rows just read: consumed now (their reasons counted now)."""
        self.keys.append(keys.detach().cpu())
        _add(self.skipped, _reasons(codes))

    def add_trained(self, keys: torch.Tensor, codes: torch.Tensor) -> None:
        """The rows of a step that was trained (their label reasons counted now)."""
        self.keys.append(keys.detach().cpu())
        if bool((codes != OK).any()):
            _add(self.skipped, _reasons(codes[(codes != OK) & (codes < FIRST_DROPPED)]))

    def local(self) -> dict:
        keys = torch.cat(self.keys).numpy() if self.keys else np.zeros(0, np.int64)
        return {"keys": keys.astype(np.int64), "skipped": dict(self.skipped)}


def merge_partial(carried: dict | None, gathered: list[dict], *, epoch: int, mode: str,
                  worker_steps: int, rows_of) -> dict:
    """``"partial_epoch"`` of a checkpoint: the workers' ``local()`` dicts (+ ``loss``, ``steps``)
    united with what a resumed session carried. ``rows_of(keys)``: how many of the keys count as
    rows read (the streaming reader's resume padding does not)."""
    parts = [g["keys"] for g in gathered]
    skipped: dict[str, int] = {}
    sum_loss, steps = 0.0, 0
    if carried is not None:
        parts.append(carried["consumed"].numpy())
        _add(skipped, carried["skipped"])
        sum_loss, steps = float(carried["sum_loss"]), int(carried["steps"])
    for g in gathered:
        _add(skipped, g["skipped"])
        sum_loss += float(g["loss"])
        steps += int(g["steps"])
    consumed = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
    return {"epoch": int(epoch), "mode": mode, "consumed": torch.from_numpy(consumed.astype(np.int64)),
            "sum_loss": sum_loss, "steps": steps, "worker_steps": int(worker_steps),
            "rows": int(rows_of(consumed)), "skipped": skipped}
