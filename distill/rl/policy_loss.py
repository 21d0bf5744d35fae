"""Per-token policy-gradient losses and how they are normalised (notes/posttraining.md §1.5, §1.7).

`clipped`: PPO's clipped ratio with Magistral's clip-higher (epsilon_low 0.2, epsilon_high 0.28: the ratio of a
token with a positive advantage may grow further before clipping, which keeps exploration alive), times a
truncated importance weight min(pi_old / mu, cap) (detached) for the gap between the trainer's log-probs (pi_old) and
the engine's that sampled the tokens (mu): the two never agree exactly (kernels, precision), and uncorrected the
gap biases the gradient (TRL's vllm_importance_sampling_correction, LlamaRL's AIPO).

`asymmetric`: asymmetric REINFORCE (AsymRE, arXiv 2506.20520) for samples not drawn from the current policy (a stale
engine, replay): -(r - V) log pi with V a little below the group's mean reward (no ratio, no clip); a baseline below
the behaviour policy's value keeps the off-policy update an improvement.

Normalisation (the bookkeeping users most often get wrong, trl#3021, trl PR #6024): `group` divides each group's
token sum by that group's completion tokens and averages over groups (Magistral); `tokens` divides by every live
token of the step (DAPO, TRL's loss_type="dapo"); `sequence` averages each sequence's tokens, then the sequences
(the original GRPO; it weighs a token of a short answer more than one of a long answer).
"""

from __future__ import annotations

from typing import Literal

import torch

Normalisation = Literal["group", "tokens", "sequence"]


def clipped_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, epsilon_low: float,
                       epsilon_high: float, is_weights: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(-min(ratio A, clip(ratio) A) x w per token, clipped-low mask, clipped-high mask); all [n] tokens,
    `advantages` broadcast per token."""
    ratio = torch.exp(logp - old_logp)
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.minimum(ratio * advantages, clipped * advantages)
    if is_weights is not None:
        loss = loss * is_weights.detach()
    low = (advantages < 0) & (ratio < 1 - epsilon_low)
    high = (advantages > 0) & (ratio > 1 + epsilon_high)
    return loss, low.detach(), high.detach()


def asymmetric_token_loss(logp: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """-(r - V) log pi per token (the advantage already holds r - V)."""
    return -advantages * logp


def truncated_is_weights(old_logp: torch.Tensor, engine_logp: torch.Tensor, cap: float | None) -> torch.Tensor:
    """min(pi_old / mu, cap) per token, no gradient; all ones without a cap."""
    if cap is None:
        return torch.ones_like(old_logp)
    return torch.exp(old_logp - engine_logp).clamp(max=cap).detach()


def sequence_weights(lengths: torch.Tensor, groups: torch.Tensor, how: Normalisation) -> tuple[torch.Tensor, float]:
    """(weight per sequence [S], units): the loss is sum_s weight_s x (its token losses' sum) / units, and `units`
    is what the loop adds up over micro-batches and ranks and divides by (it reports it as "tokens")."""
    lengths = lengths.to(torch.float64)
    if how == "tokens":
        return torch.ones_like(lengths), float(lengths.sum())
    if how == "sequence":
        return 1 / lengths.clamp_min(1), float(len(lengths))
    per_group = torch.zeros(int(groups.max()) + 1 if len(groups) else 0, dtype=torch.float64).index_add(
        0, groups, lengths)  # completion tokens of each group
    return 1 / per_group[groups].clamp_min(1), float(len(torch.unique(groups)))
