"""Distillation losses against direct float64 formulas; chunked equals unchunked, in value and gradient."""

from __future__ import annotations

import pytest
import torch

from distill.losses import (
    IGNORE_INDEX,
    LossConfig,
    VocabMismatchError,
    distill_loss,
    reference_loss,
    token_divergence,
    topk_divergence,
    topk_with_tail,
)

GEN = torch.Generator().manual_seed(0)


def _pair(n: int = 10, vocab: int = 50):
    return torch.randn(n, vocab, generator=GEN, dtype=torch.float64) * 3, torch.randn(n, vocab, generator=GEN,
                                                                                        dtype=torch.float64) * 3


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p.log() - q.log())).sum(-1)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_divergences_equal_their_definitions(tau):
    s, t = _pair()
    p_s, p_t = torch.softmax(s / tau, -1), torch.softmax(t / tau, -1)
    torch.testing.assert_close(token_divergence(s, t, "forward_kl", tau).double(), _kl(p_t, p_s), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(token_divergence(s, t, "reverse_kl", tau).double(), _kl(p_s, p_t), rtol=1e-5, atol=1e-6)
    beta = 0.3
    m = beta * p_t + (1 - beta) * p_s
    expected = beta * _kl(p_t, m) + (1 - beta) * _kl(p_s, m)
    torch.testing.assert_close(token_divergence(s, t, "jsd", tau, beta).double(), expected, rtol=1e-5, atol=1e-6)
    forward = token_divergence(s, t, "forward_kl", tau)
    assert (forward > 0).all() and token_divergence(s, s, "forward_kl", tau).abs().max() < 1e-6


def test_teacher_padding_is_truncated_and_a_smaller_teacher_is_refused():
    s, t = _pair(vocab=40)
    padded = torch.cat([t, torch.randn(10, 8, dtype=torch.float64) + 5], dim=-1)
    torch.testing.assert_close(token_divergence(s, padded, "forward_kl"), token_divergence(s, t, "forward_kl"))
    with pytest.raises(VocabMismatchError, match="smaller"):
        token_divergence(s, t[:, :30], "forward_kl")


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_loss_equals_the_full_logits_loss(divergence, chunk):
    n, d, d_t, vocab = 23, 16, 24, 60
    h = torch.randn(n, d, generator=GEN, requires_grad=True)
    w = torch.randn(vocab, d, generator=GEN, requires_grad=True)
    h_t, w_t = torch.randn(n, d_t, generator=GEN), torch.randn(vocab + 4, d_t, generator=GEN)  # padded teacher
    labels = torch.randint(0, vocab, (n,), generator=GEN)
    labels[[2, 5, 17]] = IGNORE_INDEX
    config = LossConfig(divergence=divergence, temperature=1.5, ce_weight=0.25, chunk_tokens=chunk)
    loss, metrics = distill_loss(h, w, labels, config, h_t, w_t)
    loss.backward()
    grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    expected = reference_loss(h @ w.T, h_t @ w_t.T, labels, config)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], h.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[1], w.grad, rtol=1e-4, atol=1e-6)
    assert int(metrics["tokens"]) == n - 3


def test_cross_entropy_only_needs_no_teacher():
    h, w = torch.randn(5, 8, generator=GEN), torch.randn(30, 8, generator=GEN)
    labels = torch.randint(0, 30, (5,), generator=GEN)
    loss, _ = distill_loss(h, w, labels, LossConfig(kd_weight=0, ce_weight=1))
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(h @ w.T, labels))
    with pytest.raises(ValueError, match="teacher"):
        distill_loss(h, w, labels, LossConfig())


@pytest.mark.parametrize("bad", [dict(temperature=0), dict(divergence="jsd", beta=1.0), dict(kd_weight=0)])
def test_bad_loss_configs_are_refused(bad):
    with pytest.raises(ValueError):
        LossConfig(**bad)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_topk_with_tail_is_a_coarsened_divergence(divergence):
    s, t = _pair(n=12, vocab=64)
    t_logp = torch.log_softmax(t.float(), -1)
    full = token_divergence(s, t, divergence, beta=0.4)
    exact = topk_divergence(s, *topk_with_tail(t_logp, 64), divergence, beta=0.4)  # every token: tail empty
    torch.testing.assert_close(exact, full, rtol=1e-4, atol=1e-5)
    for k in (1, 8, 32):
        coarse = topk_divergence(s, *topk_with_tail(t_logp, k), divergence, beta=0.4)
        assert (coarse >= -1e-6).all() and (coarse <= full + 1e-5).all()  # data processing inequality
    # without the tail bucket a top-k "KL" goes negative once the student puts more mass on the teacher's top k
    # than the teacher does (verl#7856); with it, it stays a divergence
    idx, top, tail = topk_with_tail(t_logp, 4)
    confident = t.float().scatter_add(-1, idx, torch.full((12, 4), 3.0))
    s_logp = torch.log_softmax(confident, -1).gather(-1, idx)
    assert ((top.exp() * (top - s_logp)).sum(-1) < 0).all()
    assert (topk_divergence(confident, idx, top, tail, divergence, beta=0.4) > 0).all()


def test_chunked_loss_from_a_cached_teacher_equals_the_direct_formula():
    n, d, vocab, k = 19, 8, 40, 5
    h = torch.randn(n, d, generator=GEN, requires_grad=True)
    w = torch.randn(vocab, d, generator=GEN, requires_grad=True)
    cached = topk_with_tail(torch.log_softmax(torch.randn(n, vocab, generator=GEN), -1), k)
    labels = torch.randint(0, vocab, (n,), generator=GEN)
    config = LossConfig(temperature=1.0, chunk_tokens=4)
    loss, _ = distill_loss(h, w, labels, config, teacher_topk=cached)
    loss.backward()
    grad = h.grad.clone()
    h.grad = None
    expected = topk_divergence(h @ w.T, *cached, "forward_kl").mean()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, h.grad)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_fused_loss_equals_the_checkpointed_one(divergence):
    """distill_loss(fused=True) (kernels/distill_loss.py) computes the same loss, metrics and gradients."""
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(33, 16, generator=gen)
    w = torch.randn(300, 16, generator=gen) * 0.5
    th, tw = torch.randn(33, 8, generator=gen), torch.randn(310, 8, generator=gen) * 0.5
    labels = torch.randint(0, 300, (33,), generator=gen)
    labels[4] = IGNORE_INDEX
    config = LossConfig(divergence=divergence, temperature=1.5, ce_weight=0.2, chunk_tokens=10)
    results = []
    for fused in (False, True):
        hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss, metrics = distill_loss(hl, wl, labels, config, th, tw, fused=fused)
        loss.backward()
        results.append((loss.detach(), metrics["kd"], metrics["ce"], hl.grad, wl.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
