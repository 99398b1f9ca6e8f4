"""Optimisers and the learning-rate schedule used for pretraining.

LARS (You et al. 2017): per-parameter trust ratio η·‖w‖ / (‖g‖ + wd·‖w‖) scales the SGD step of
weight matrices; biases, normalisation parameters and the ViT's position embedding / class token
are excluded from both weight decay and adaptation, as in SimCLR/BYOL/MoCo-v3 practice
(``is_no_decay``: 1-D tensors, or a name ending in ``pos_embed`` / ``cls_token``; ``param_groups``
marks each group with ``lars_adapt`` and LARS follows the mark).

Schedule: linear warm-up from 0 to the peak over ``warmup_steps``, then cosine decay to
``min_ratio``·peak at ``total_steps``:
    f(s) = s / warmup                                                   s < warmup
    f(s) = min + (1 − min) · ½ (1 + cos(π (s − warmup) / (total − warmup)))  otherwise
"""
from __future__ import annotations

import math

import torch


class LARS(torch.optim.Optimizer):
    """SGD with momentum, weight decay and layer-wise trust ratios (1-D params not adapted)."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            adapt = group.get("lars_adapt")
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                # weights: decay + trust ratio; biases / norms / tokens: plain SGD.  Groups from
                # param_groups say which; a bare parameter list falls back to the ndim rule.
                if (p.ndim > 1) if adapt is None else adapt:
                    g = g.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    trust = torch.where((w_norm > 0) & (g_norm > 0),
                                        group["trust_coefficient"] * w_norm / (g_norm + group["eps"]),
                                        torch.ones_like(w_norm))
                    g = g.mul(trust)
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = g.clone()
                else:
                    buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-group["lr"])
        return loss


NO_DECAY_NAMES = ("pos_embed", "cls_token")


def is_no_decay(name: str, p: torch.Tensor) -> bool:
    """Biases and norm scales (1-D) and the ViT's ``pos_embed`` / ``cls_token`` (3-D, by name)."""
    return p.ndim <= 1 or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups of the trainable parameters: decayed + LARS-adapted weights, and the rest
    (``is_no_decay``) with no weight decay and no LARS scaling.  Frozen parameters are left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if is_no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "lars_adapt": True},
            {"params": no_decay, "weight_decay": 0.0, "lars_adapt": False}]


def build_optimizer(name: str, model: torch.nn.Module, *, lr: float, momentum: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimiser '{name}' (sgd | lars | adamw)")


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate at ``step`` (see module docstring)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
