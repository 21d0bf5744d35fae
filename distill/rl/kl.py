"""KL to a reference policy when `grpo.kl.beta > 0` (Magistral runs without one), placed where its gradient is right.

With delta_t = log pi(y_t) - log pi_ref(y_t) on the sampled tokens, the objective's KL(pi || pi_ref) has the exact
gradient E[sum_t grad log pi(y_t) x sum_t' delta_t'] (arXiv 2506.09477). Two placements give it (checked by exact
enumeration in tests/test_grpo_kl.py):
- `k1_reward` (default): r - beta x sum_t delta_t per sequence, detached, before the group baseline: the sequence's
  own reward-to-go, exact in expectation (PPO's and verl's use_kl_in_reward).
- `k2_loss`: beta x delta_t^2 / 2 per token in the loss: its gradient is the local term delta_t grad log pi(y_t)
  only (right for one token; for longer answers it misses the effect of a token on the KL of the tokens after it).
The form TRL, verl's low_var_kl and torchtune put in the loss, k3 = e^-delta - 1 + delta per token, has the
expected gradient of KL(pi_ref || pi), the other direction (arXiv 2506.09477, verl PR #2953): `k3` is kept here
as a value to log and as the test's counter-example, never as a loss.
"""

from __future__ import annotations

import torch


def k1_sequence(logp: torch.Tensor, ref_logp: torch.Tensor, sequence: torch.Tensor, sequences: int) -> torch.Tensor:
    """sum_t delta_t per sequence [S] (no gradient): `sequence` [n] maps each token to its sequence."""
    delta = (logp - ref_logp).detach().double()
    return torch.zeros(sequences, dtype=torch.float64, device=logp.device).index_add(0, sequence, delta)


def k2_tokens(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """delta_t^2 / 2 per token: in the loss, gradient delta_t grad log pi(y_t)."""
    return 0.5 * (logp - ref_logp.detach()) ** 2


def k3_tokens(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """e^(-delta) - 1 + delta per token: an unbiased, low-variance estimate of KL(pi || pi_ref)'s value (log it),
    whose gradient in a loss descends KL(pi_ref || pi) instead."""
    delta = logp - ref_logp.detach()
    return torch.exp(-delta) - 1 + delta
