"""The KL gradient, by exact expectation over every answer of a small policy (no sampling noise; notes §2.3).

E[grad s(y)] = sum_y pi(y) grad_theta s(y) with pi(y) held fixed: feeding the project's KL and policy-loss code every
answer weighted by its probability gives its expected gradient exactly. It must equal the true gradient of
KL(pi || pi_ref) for the default placement (k1 in the reward, sequence level) with one- and two-token answers; k2 in
the loss is right for one token and only the local part for two; the k3-in-the-loss form other frameworks use gives
pi - pi_ref, the gradient of KL(pi_ref || pi), the other divergence."""

from __future__ import annotations

import itertools

import torch

from distill.rl.kl import k1_sequence, k2_tokens, k3_tokens
from distill.rl.policy_loss import asymmetric_token_loss, clipped_token_loss

K = 4


def _one_token() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(K, dtype=torch.float64, requires_grad=True), torch.randn(K, dtype=torch.float64)


def _expected_grad(theta: torch.Tensor, per_answer) -> torch.Tensor:
    """sum_y pi(y) grad s(y), pi detached: the exact expectation of the sampled gradient."""
    pi = theta.detach().softmax(-1)
    total = sum(pi[y] * per_answer(y) for y in range(K))
    (grad,) = torch.autograd.grad(total, theta)
    return grad


def _true_one_token(theta: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    log_pi, log_ref = theta.log_softmax(-1), phi.log_softmax(-1)
    (grad,) = torch.autograd.grad((log_pi.exp() * (log_pi - log_ref)).sum(), theta)
    return grad


def test_k1_in_the_reward_and_k2_in_the_loss_descend_kl_policy_to_reference_one_token():
    theta, phi = _one_token()
    true = _true_one_token(theta, phi)
    log_ref = phi.log_softmax(-1)

    def k1_reward(y: int) -> torch.Tensor:  # the reward gets -k1 (detached); our clipped loss at ratio 1 trains it
        logp = theta.log_softmax(-1)[y:y + 1]
        kl = k1_sequence(logp, log_ref[y:y + 1], torch.zeros(1, dtype=torch.long), 1)
        loss, _, _ = clipped_token_loss(logp, logp.detach(), -kl.to(logp.dtype), 0.2, 0.28)
        return loss.sum()  # minimising it descends KL: its expected gradient must be +grad KL

    def k2_loss(y: int) -> torch.Tensor:
        return k2_tokens(theta.log_softmax(-1)[y:y + 1], log_ref[y:y + 1]).sum()

    def k3_loss(y: int) -> torch.Tensor:
        return k3_tokens(theta.log_softmax(-1)[y:y + 1], log_ref[y:y + 1]).sum()

    assert torch.allclose(_expected_grad(theta, k1_reward), true, atol=1e-12)
    assert torch.allclose(_expected_grad(theta, k2_loss), true, atol=1e-12)
    k3 = _expected_grad(theta, k3_loss)
    pi, ref = theta.detach().softmax(-1), phi.softmax(-1)
    assert torch.allclose(k3, pi - ref, atol=1e-12)  # = grad KL(pi_ref || pi): the other divergence
    assert not torch.allclose(k3, true, atol=1e-2)


def test_k1_in_the_reward_is_exact_for_two_token_answers_and_k2_is_only_local():
    """Token 2's distribution depends on token 1, and so does its KL: the first token's gradient must carry the
    KL of what follows it (k1 per sequence does; per-token k2 misses it)."""
    torch.manual_seed(0)
    theta1 = torch.randn(K, dtype=torch.float64, requires_grad=True)
    theta2 = torch.randn(K, K, dtype=torch.float64, requires_grad=True)  # [a1, a2] conditional logits
    phi1, phi2 = torch.randn(K, dtype=torch.float64), 3 * torch.randn(K, K, dtype=torch.float64)
    answers = list(itertools.product(range(K), repeat=2))

    def logps(a1: int, a2: int) -> tuple[torch.Tensor, torch.Tensor]:
        logp = torch.stack([theta1.log_softmax(-1)[a1], theta2[a1].log_softmax(-1)[a2]])
        ref = torch.stack([phi1.log_softmax(-1)[a1], phi2[a1].log_softmax(-1)[a2]])
        return logp, ref

    def prob(a1: int, a2: int) -> torch.Tensor:
        return logps(a1, a2)[0].sum().detach().exp()

    # the true gradient of the sequence KL: sum_y pi(y) log pi(y)/pi_ref(y), differentiated exactly
    true_total = sum(logps(*y)[0].sum().exp() * (logps(*y)[0] - logps(*y)[1]).sum() for y in answers)
    true = torch.autograd.grad(true_total, (theta1, theta2))

    def expected(per_answer) -> tuple[torch.Tensor, ...]:
        total = sum(prob(*y) * per_answer(*y) for y in answers)
        return torch.autograd.grad(total, (theta1, theta2))

    def k1_reward(a1: int, a2: int) -> torch.Tensor:
        logp, ref = logps(a1, a2)
        kl = k1_sequence(logp, ref, torch.zeros(2, dtype=torch.long), 1)  # one sequence of two tokens
        loss, _, _ = clipped_token_loss(logp, logp.detach(), -kl.to(logp.dtype).expand(2), 0.2, 0.28)
        return loss.sum()  # minimising this descends KL: its gradient is +grad KL

    def reinforce(a1: int, a2: int) -> torch.Tensor:  # the asymmetric loss with the KL as its only reward
        logp, ref = logps(a1, a2)
        kl = k1_sequence(logp, ref, torch.zeros(2, dtype=torch.long), 1)
        return asymmetric_token_loss(logp, -kl.to(logp.dtype).expand(2)).sum()

    def k2_loss(a1: int, a2: int) -> torch.Tensor:
        return k2_tokens(*logps(a1, a2)).sum()

    for got, want in zip(expected(k1_reward), true, strict=True):
        assert torch.allclose(got, want, atol=1e-10)
    for got, want in zip(expected(reinforce), true, strict=True):
        assert torch.allclose(got, want, atol=1e-10)
    local = expected(k2_loss)
    assert torch.allclose(local[1], true[1], atol=1e-10)  # the last token's gradient is right...
    assert not torch.allclose(local[0], true[0], atol=1e-2)  # ...the first misses the KL of the token after it
