"""Fused linear distillation loss (kernels/distill_loss.py): loss and gradients against autograd on full logits."""

from __future__ import annotations

import pytest
import torch

from kernels.distill_loss import FusedLossConfig, distill_loss_reference, fused_linear_distill_loss
from tests.kernel_checks import DEVICE, fresh_seed

N, D, D_T, V, V_T = 45, 24, 16, 1003, 1010  # odd vocab, teacher vocab padded past the student's


def _problem():
    h = torch.randn(N, D, device=DEVICE)
    w = torch.randn(V, D, device=DEVICE) * 0.4
    th = torch.randn(N, D_T, device=DEVICE)
    tw = torch.randn(V_T, D_T, device=DEVICE) * 0.4
    labels = torch.randint(0, V, (N,), device=DEVICE)
    labels[[0, 7, 30]] = -100
    return h, w, th, tw, labels


def _exact(h, w, th, tw, labels, cfg):
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    loss = distill_loss_reference(h64 @ w64.T, th.double() @ tw.double().T, labels, cfg)
    loss.backward()
    return loss.detach(), h64.grad, w64.grad


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("teacher", ["logits", "hidden"])
@pytest.mark.parametrize("divergence, temperature, ce_weight", [
    ("forward_kl", 1.0, 0.0), ("forward_kl", 2.0, 0.5), ("reverse_kl", 1.5, 0.0), ("jsd", 1.0, 0.3)])
def test_matches_autograd_of_the_full_loss(backend, teacher, divergence, temperature, ce_weight):
    seed = fresh_seed()
    h, w, th, tw, labels = _problem()
    cfg = FusedLossConfig(divergence, temperature, beta=0.3, kd_weight=1.0, ce_weight=ce_weight, chunk_tokens=16)
    hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()
    kw = dict(teacher_logits=th @ tw.T) if teacher == "logits" else dict(teacher_hidden=th, teacher_head=tw)
    loss, kd, ce = fused_linear_distill_loss(hl, wl, labels, cfg, backend=backend, **kw)
    (2.5 * loss).backward()  # the backward scales the gradients made in the forward
    exact, dh, dw = _exact(h, w, th, tw, labels, cfg)
    msg = f"seed {seed}"
    torch.testing.assert_close(loss.double(), exact, rtol=1e-5, atol=1e-6, msg=msg)
    torch.testing.assert_close(hl.grad.double(), 2.5 * dh, rtol=1e-4, atol=1e-7, msg=msg)
    torch.testing.assert_close(wl.grad.double(), 2.5 * dw, rtol=1e-4, atol=1e-7, msg=msg)
    assert torch.allclose(loss, cfg.kd_weight * kd + cfg.ce_weight * ce)


def test_cross_entropy_only_and_no_grad():
    fresh_seed()
    h, w, _, _, labels = _problem()
    cfg = FusedLossConfig(kd_weight=0.0, ce_weight=1.0, chunk_tokens=8)
    with torch.no_grad():
        loss, kd, _ = fused_linear_distill_loss(h, w, labels, cfg, backend="triton")
    expected = torch.nn.functional.cross_entropy(h @ w.T, labels, ignore_index=-100)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert kd == 0 and not loss.requires_grad


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bf16_head_products_equal_the_loss_of_bf16_rounded_operands(backend):
    """matmul_dtype bfloat16 rounds the four head products' inputs to bf16 and keeps the rest fp32: the result is
    the exact loss of the bf16-rounded operands (to bf16 matmul accuracy), and within a few percent of fp32's."""
    seed = fresh_seed()
    h, w, th, tw, labels = _problem()
    cfg = FusedLossConfig(chunk_tokens=16, ce_weight=0.5, matmul_dtype="bfloat16")
    hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, _, _ = fused_linear_distill_loss(hl, wl, labels, cfg, teacher_hidden=th, teacher_head=tw, backend=backend)
    loss.backward()
    rounded = [x.bfloat16().float() for x in (h, w, th, tw)]
    exact, dh, dw = _exact(*rounded, labels, cfg)
    full, _, _ = _exact(h, w, th, tw, labels, cfg)
    msg = f"seed {seed}"
    torch.testing.assert_close(loss.double(), exact, rtol=1e-3, atol=1e-4, msg=msg)
    for got, want in ((hl.grad, dh), (wl.grad, dw)):  # d logits is rounded to bf16 too: compare as vectors
        assert (got.double() - want).norm() < 2e-2 * want.norm(), msg  # worst of 30 seeds: 0.007
    assert loss.item() != pytest.approx(full.item(), rel=1e-6)  # it really ran in bf16
    assert hl.grad.dtype == torch.float32


def test_chunking_does_not_change_the_result():
    fresh_seed()
    h, w, th, tw, labels = _problem()
    results = []
    for chunk in (1, 7, 1000):
        hl = h.clone().requires_grad_()
        loss, _, _ = fused_linear_distill_loss(hl, w, labels, FusedLossConfig(chunk_tokens=chunk), teacher_hidden=th,
                                               teacher_head=tw, backend="triton")
        loss.backward()
        results.append((loss.detach(), hl.grad))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-5, atol=1e-8)


def test_bad_input_is_named():
    h, w, th, tw, labels = _problem()
    with pytest.raises(ValueError, match="needs the teacher"):
        fused_linear_distill_loss(h, w, labels, FusedLossConfig())
    with pytest.raises(ValueError, match="smaller than the student"):
        fused_linear_distill_loss(h, w, labels, FusedLossConfig(), teacher_logits=torch.zeros(N, V - 1))
    with pytest.raises(ValueError, match="jsd needs"):
        FusedLossConfig(divergence="jsd", beta=1.0)
    with pytest.raises(ValueError, match="labels"):
        fused_linear_distill_loss(h, w, labels[:-1], FusedLossConfig(), teacher_hidden=th, teacher_head=tw)
