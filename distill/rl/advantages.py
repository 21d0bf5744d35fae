"""Advantages from the rewards of groups of samples of one prompt ([P, G] rewards -> [P, G] advantages).

- `magistral`: r - mean(group) (no division by the group's std: Dr. GRPO and Magistral), then normalised over the
  minibatch by `normalise` (mean 0, std 1 over every live sample of the step).
- `passk`: the pass@k objective (Tang et al., arXiv 2503.19595; the unbiased estimator for k <= G of Walder &
  Karkhanis, PKPO, arXiv 2505.15201, closed form for 0/1 rewards in arXiv 2508.10751). With binary rewards and c
  right answers in a group of n, the group's pass@k is R = 1 - C(n-c, k)/C(n, k); a right sample's advantage is
  1 - R, a wrong one's 1 - R - C(n-c-1, k-1)/C(n-1, k-1) (how much the group's chance of a success drops without
  it). For weak students most groups are all wrong; pass@k keeps more of the rare right answers' signal than
  pass@1 and pushes towards diverse attempts. Rewards other than 0/1 are thresholded at `success`.

Groups whose samples all got the same reward teach nothing (every advantage 0) and are dropped before tokens are
counted (`live_groups`), else they would dilute the loss's denominator (notes §1.5).
"""

from __future__ import annotations

from math import comb

import torch


def live_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[P] bool: groups whose rewards are not all equal."""
    return (rewards.max(-1).values - rewards.min(-1).values) > 1e-9


def magistral(rewards: torch.Tensor) -> torch.Tensor:
    """r - mean(group)."""
    return rewards - rewards.mean(-1, keepdim=True)


def pass_at_k(rewards: torch.Tensor, k: int, success: float = 0.5) -> torch.Tensor:
    """The pass@k advantage per sample (module docstring); k <= group size."""
    n = rewards.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= group size ({n}), got {k}")
    right = rewards > success
    out = torch.empty_like(rewards, dtype=torch.float64)
    for g, row in enumerate(right):
        c = int(row.sum())
        group = 1 - comb(n - c, k) / comb(n, k)  # pass@k of the group: P(some of k drawn are right)
        wrong = 1 - group - comb(n - c - 1, k - 1) / comb(n - 1, k - 1) if c < n else 0.0
        out[g] = torch.where(row, torch.tensor(1 - group, dtype=torch.float64),
                             torch.tensor(wrong, dtype=torch.float64))
    return out.to(rewards.dtype)


def normalise(advantages: torch.Tensor, live: torch.Tensor, totals: tuple[float, float, float] | None = None
              ) -> torch.Tensor:
    """(A - mean) / std over the live groups' samples (Magistral's minibatch normalisation). `totals` (count, sum,
    sum of squares over every rank) replaces the local statistics under data parallelism."""
    values = advantages[live].double()
    count, total, squares = totals if totals is not None else (values.numel(), values.sum().item(),
                                                               values.pow(2).sum().item())
    if count < 2:
        return advantages * live[:, None]
    mean = total / count
    std = max(squares / count - mean * mean, 0.0) ** 0.5
    return ((advantages - mean) / (std + 1e-6)) * live[:, None]


def group_advantages(rewards: torch.Tensor, kind: str, k: int | None = None) -> torch.Tensor:
    """[P, G] advantages before the minibatch normalisation."""
    if kind == "magistral":
        return magistral(rewards)
    if kind == "passk":
        return pass_at_k(rewards, k or rewards.shape[-1])
    raise ValueError(f"unknown advantage {kind!r}")
