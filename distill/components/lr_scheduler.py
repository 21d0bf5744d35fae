"""AdamW and its schedule: linear warm-up, then cosine decay to a floor; a pure function of the step, so a resumed
run needs no scheduler state."""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class OptimConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr: float = Field(3e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_fraction: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, gt=0)


def lr_at(step: int, total: int, optim: OptimConfig) -> float:
    """Linear warm-up over warmup_fraction of the steps, then cosine decay to min_lr_ratio * lr."""
    warmup = int(total * optim.warmup_fraction)
    if step < warmup:
        return optim.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = optim.lr * optim.min_lr_ratio
    return floor + (optim.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not embeddings, norms or biases)."""
    def decays(name: str, p: nn.Parameter) -> bool:
        return p.ndim >= 2 and "embed" not in name

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [{"params": [p for n, p in params if decays(n, p)], "weight_decay": optim.weight_decay},
         {"params": [p for n, p in params if not decays(n, p)], "weight_decay": 0.0}],
        lr=optim.lr, betas=optim.betas, foreach=True,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
