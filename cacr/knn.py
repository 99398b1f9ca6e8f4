"""Weighted k-nearest-neighbour classification of frozen features (the standard SSL monitor).

For a query q and bank features b_j (all L2-normalised), with cosine similarity s_j = q·b_j, take
the k most similar bank items and vote for their labels with weights exp(s_j / T):

    score(c) = Σ_{j in top-k} exp(s_j / T) · [y_j = c],     prediction = argmax_c score(c)

(Wu et al. 2018; T = 0.07 is the usual temperature.) Bank items labelled −1 (unlabelled) are ignored.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, *, k: int = 20,
                temperature: float = 0.07, num_classes: int | None = None,
                chunk: int = 1024) -> torch.Tensor:
    """Predicted labels (Q,) for ``queries`` (Q, F) from ``bank`` (M, F) with labels (M,)."""
    keep = bank_labels >= 0
    bank, bank_labels = bank[keep], bank_labels[keep].long()
    if bank.shape[0] == 0:
        raise ValueError("kNN bank has no labelled samples")
    num_classes = int(num_classes or int(bank_labels.max()) + 1)
    k = min(k, bank.shape[0])
    bank = F.normalize(bank.float(), dim=1)
    out = []
    for start in range(0, queries.shape[0], chunk):  # chunks bound memory at chunk × M
        q = F.normalize(queries[start:start + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, bank_labels[idx], (sim / temperature).exp())
        out.append(votes.argmax(dim=1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def knn_top1(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor,
             query_labels: torch.Tensor, **kw) -> float:
    """Top-1 accuracy of :func:`knn_predict` over the labelled queries."""
    keep = query_labels >= 0
    if not bool(keep.any()):
        raise ValueError("kNN queries have no labels")
    pred = knn_predict(bank, bank_labels, queries[keep], **kw)
    return float((pred == query_labels[keep].long().to(pred.device)).float().mean())
