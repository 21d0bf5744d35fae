"""Fused linear distillation loss: from student hidden states and LM head to (loss, d hidden, d head), chunk by chunk.

The naive loss makes `[tokens x vocab]` student logits, teacher logits, two log-softmaxes and their gradients: at
Mistral's 131k vocabulary that is 0.5 GiB per tensor per 1k tokens in fp32. Here each chunk of tokens makes its
logits, one kernel turns them in place into the gradient of the loss with respect to them (three passes over the
vocabulary per row: softmax statistics, the divergence, the gradient), and two matmuls fold that into the gradients
of the hidden states and the head. Gradients are computed during the forward (as Liger's fused-linear losses do),
so the backward only scales them, and nothing of size vocab outlives its chunk.

Divergences follow `distill/losses.py` (TRL's GKD conventions, no tau^2): forward KL(teacher || student), reverse
KL, and JSD(beta) with the mixture `beta * teacher + (1 - beta) * student`; cross-entropy on the raw logits. The
loss is the weighted sum over tokens whose label is not `ignore_index`, divided by their number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.runtime import INTERPRET, check_triton_device, empty

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
DIVERGENCE_IDS = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
IGNORE_INDEX = -100


@dataclass(frozen=True)
class FusedLossConfig:
    divergence: Divergence = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    chunk_tokens: int = 1024
    ignore_index: int = IGNORE_INDEX
    # The four head products a chunk makes (student logits, d hidden, d head, teacher logits). fp32 by default;
    # bf16 halves a product's time on CPUs with AVX512-BF16 (measured: [1024 x 576] x [576 x 49152] in 389 vs
    # 176 ms) and is what autocast does in HF/TRL, at the cost of bf16-rounded logits; yet the 2-core training loop
    # was not measurably faster with it (196 vs 204 tokens/s, an hour apart: docs/bench/distill-vs-trl.md). On
    # GPUs, where fp32 products are far slower than bf16 ones, it should matter more (not measured yet).
    # Softmax, divergence and the gradients' accumulation stay fp32 either way.
    matmul_dtype: Literal["float32", "bfloat16"] = "float32"

    def __post_init__(self) -> None:
        if self.divergence not in DIVERGENCE_IDS:
            raise ValueError(f"divergence must be one of {sorted(DIVERGENCE_IDS)}, got {self.divergence!r}")
        if self.temperature <= 0 or self.chunk_tokens < 1 or self.kd_weight < 0 or self.ce_weight < 0:
            raise ValueError(f"bad loss settings: {self}")
        if self.divergence == "jsd" and not 0 < self.beta < 1:
            raise ValueError(f"jsd needs 0 < beta < 1, got {self.beta}")


@triton.jit
def _row_lse(ROW, n, scale, BLOCK_V: tl.constexpr):
    """log-sum-exp of scale * row, online over vocabulary blocks."""
    offs = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, n, BLOCK_V):
        ok = start + offs < n
        x = tl.load(ROW + start + offs, mask=ok, other=float("-inf")).to(tl.float32) * scale
        m_new = tl.maximum(m, x)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.exp(x - m_safe)
        m = m_new
    m_all = tl.max(m, 0)
    return m_all + tl.log(tl.sum(s * tl.exp(m - m_all), 0))


@triton.jit
def _distill_rows_kernel(
    Z, T, LABELS, DIV, CE, n_vocab, sz, st, inv_temp, beta, kd_weight, ce_weight, grad_scale, ignore_index,
    DIVERGENCE: tl.constexpr, HAS_TEACHER: tl.constexpr, HAS_CE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One row: Z (student logits, fp32) is overwritten with d(loss)/dZ * grad_scale; per-row terms to DIV, CE."""
    row = tl.program_id(0)
    z_row = Z + row.to(tl.int64) * sz
    t_row = T + row.to(tl.int64) * st
    label = tl.load(LABELS + row)
    live = label != ignore_index
    offs = tl.arange(0, BLOCK_V)
    log_beta = tl.log(tl.cast(beta, tl.float32))
    log_1m_beta = tl.log(1.0 - tl.cast(beta, tl.float32))
    div = 0.0
    lse_s = 0.0
    lse_t = 0.0
    if HAS_TEACHER:
        lse_s = _row_lse(z_row, n_vocab, inv_temp, BLOCK_V)
        lse_t = _row_lse(t_row, n_vocab, inv_temp, BLOCK_V)
        acc = tl.zeros([BLOCK_V], tl.float32)
        acc2 = tl.zeros([BLOCK_V], tl.float32)
        for start in range(0, n_vocab, BLOCK_V):
            ok = start + offs < n_vocab
            s = tl.load(z_row + start + offs, mask=ok, other=0.0) * inv_temp - lse_s
            t = tl.load(t_row + start + offs, mask=ok, other=0.0).to(tl.float32) * inv_temp - lse_t
            if DIVERGENCE == 0:
                acc += tl.where(ok, tl.exp(t) * (t - s), 0.0)
            elif DIVERGENCE == 1:
                acc += tl.where(ok, tl.exp(s) * (s - t), 0.0)
            else:
                a = t + log_beta
                b = s + log_1m_beta
                hi = tl.maximum(a, b)
                log_m = hi + tl.log(tl.exp(a - hi) + tl.exp(b - hi))
                acc += tl.where(ok, tl.exp(t) * (t - log_m), 0.0)
                acc2 += tl.where(ok, tl.exp(s) * (s - log_m), 0.0)
        kl_sm = tl.sum(acc2, 0)  # JSD: KL(student || mixture), used by its gradient
        if DIVERGENCE == 2:
            div = beta * tl.sum(acc, 0) + (1.0 - beta) * kl_sm
        else:
            div = tl.sum(acc, 0)
    lse_1 = 0.0
    ce = 0.0
    if HAS_CE:
        lse_1 = _row_lse(z_row, n_vocab, 1.0, BLOCK_V)
        ce = lse_1 - tl.load(z_row + tl.maximum(label, 0))
    # pass 3: the gradient, in place
    g_scale = tl.where(live, grad_scale, 0.0)
    for start in range(0, n_vocab, BLOCK_V):
        ok = start + offs < n_vocab
        z = tl.load(z_row + start + offs, mask=ok, other=0.0)
        g = tl.zeros([BLOCK_V], tl.float32)
        if HAS_TEACHER:
            s = z * inv_temp - lse_s
            t = tl.load(t_row + start + offs, mask=ok, other=0.0).to(tl.float32) * inv_temp - lse_t
            p_s = tl.exp(s)
            if DIVERGENCE == 0:
                g = p_s - tl.exp(t)
            elif DIVERGENCE == 1:
                g = p_s * ((s - t) - div)
            else:
                a = t + log_beta
                b = s + log_1m_beta
                hi = tl.maximum(a, b)
                log_m = hi + tl.log(tl.exp(a - hi) + tl.exp(b - hi))
                g = (1.0 - beta) * p_s * ((s - log_m) - kl_sm)
            g = g * (kd_weight * inv_temp)
        if HAS_CE:
            g += ce_weight * (tl.exp(z - lse_1) - tl.where(start + offs == label, 1.0, 0.0))
        tl.store(z_row + start + offs, g * g_scale, mask=ok)
    tl.store(DIV + row, tl.where(live, div, 0.0))
    tl.store(CE + row, tl.where(live, ce, 0.0))


def rows_loss_and_grad_triton(z: torch.Tensor, t: torch.Tensor | None, labels: torch.Tensor, cfg: FusedLossConfig,
                              grad_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel on one chunk: z [n, V] fp32 becomes the gradient; returns per-row (divergence, cross-entropy)."""
    check_triton_device(z, labels)
    n, vocab = z.shape
    div = empty((n,), like=z)
    ce = empty((n,), like=z)
    has_teacher = t is not None and cfg.kd_weight > 0
    teacher = t if has_teacher else z
    block_v = min(triton.next_power_of_2(vocab), 8192 if INTERPRET else 4096)
    _distill_rows_kernel[(n,)](
        z, teacher, labels, div, ce, vocab, z.stride(0), teacher.stride(0), 1.0 / cfg.temperature, cfg.beta,
        cfg.kd_weight, cfg.ce_weight, grad_scale, cfg.ignore_index,
        DIVERGENCE=DIVERGENCE_IDS[cfg.divergence], HAS_TEACHER=has_teacher, HAS_CE=cfg.ce_weight > 0,
        BLOCK_V=block_v,
    )
    return div, ce


def _log_softmax_(x: torch.Tensor) -> torch.Tensor:
    return x.sub_(x.logsumexp(-1, keepdim=True))


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b, -1) without an [n, V] temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def rows_loss_and_grad_torch(z: torch.Tensor, t: torch.Tensor | None, labels: torch.Tensor, cfg: FusedLossConfig,
                             grad_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The same contract in plain torch (CPU, and the fallback): z becomes the gradient in place. In-place ops
    keep it at four [n, V] buffers besides z and t."""
    live = labels != cfg.ignore_index
    safe = labels.clamp_min(0)
    div = torch.zeros(z.shape[0], device=z.device)
    ce = torch.zeros(z.shape[0], device=z.device)
    grad: torch.Tensor | None = None
    if t is not None and cfg.kd_weight > 0:
        s = _log_softmax_(z / cfg.temperature)
        tt = _log_softmax_(t.float() / cfg.temperature)
        if cfg.divergence == "forward_kl":
            p_t = tt.exp()
            div = _rowdot(p_t, tt.sub_(s))
            grad = s.exp_().sub_(p_t)  # p_s - p_t
        elif cfg.divergence == "reverse_kl":
            p_s = s.exp()
            log_ratio = s.sub_(tt)
            div = _rowdot(p_s, log_ratio)
            grad = log_ratio.sub_(div[:, None]).mul_(p_s)  # p_s * (log p_s - log p_t - KL)
        else:
            log_m = torch.logaddexp(tt + math.log(cfg.beta), s + math.log1p(-cfg.beta))
            p_s = s.exp()
            kl_sm = _rowdot(p_s, s - log_m)
            div = cfg.beta * _rowdot(tt.exp(), tt.sub_(log_m)) + (1 - cfg.beta) * kl_sm
            grad = s.sub_(log_m).sub_(kl_sm[:, None]).mul_(p_s).mul_(1 - cfg.beta)
        grad.mul_(cfg.kd_weight / cfg.temperature)
    if cfg.ce_weight > 0:
        lse = z.logsumexp(-1, keepdim=True)
        ce = lse[:, 0] - z.gather(1, safe[:, None])[:, 0]
        p = z.sub(lse).exp_()
        p.scatter_add_(1, safe[:, None], torch.full_like(p[:, :1], -1.0))  # softmax - one hot
        grad = p.mul_(cfg.ce_weight) if grad is None else grad.add_(p, alpha=cfg.ce_weight)
    if grad is None:
        z.zero_()
    else:
        z.copy_(grad.mul_(live[:, None] * grad_scale))
    return div * live, ce * live


class _FusedLinearDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, head, labels, teacher_logits, teacher_hidden, teacher_head, cfg, backend, want_grad):
        vocab = head.shape[0]
        live = labels != cfg.ignore_index
        count = int(live.sum().clamp_min(1))
        rows = rows_loss_and_grad_triton if backend == "triton" else rows_loss_and_grad_torch
        grad_hidden = torch.zeros_like(hidden, dtype=torch.float32) if want_grad else None
        grad_head = torch.zeros_like(head, dtype=torch.float32) if want_grad else None
        div_sum = torch.zeros((), device=hidden.device)
        ce_sum = torch.zeros((), device=hidden.device)
        mm = torch.bfloat16 if cfg.matmul_dtype == "bfloat16" else torch.float32
        head_mm = head.to(mm)
        teacher_head_mm = teacher_head[:vocab].to(mm) if teacher_head is not None else None
        for start in range(0, hidden.shape[0], cfg.chunk_tokens):
            part = slice(start, start + cfg.chunk_tokens)
            h = hidden[part].to(mm)
            z = (h @ head_mm.T).float()  # [n, V] fp32: rows() works in place on it
            if teacher_logits is not None:
                t = teacher_logits[part, :vocab].float()
            elif teacher_hidden is not None:
                t = teacher_hidden[part].to(mm) @ teacher_head_mm.T  # type: ignore[union-attr]
            else:
                t = None
            div, ce = rows(z, t, labels[part], cfg, 1.0 / count)  # z is now d loss / d logits
            div_sum += div.sum()
            ce_sum += ce.sum()
            if want_grad:
                g = z.to(mm)
                grad_hidden[part] = g @ head_mm
                if mm == torch.float32:
                    grad_head.addmm_(g.T, h)
                else:
                    grad_head += (g.T @ h).float()  # summed over chunks in fp32
            del z, t
        ctx.save_for_backward(grad_hidden, grad_head)
        ctx.dtypes = (hidden.dtype, head.dtype)
        loss = (cfg.kd_weight * div_sum + cfg.ce_weight * ce_sum) / count
        div_mean, ce_mean = div_sum / count, ce_sum / count
        ctx.mark_non_differentiable(div_mean, ce_mean)  # metrics: only the loss has gradients
        return loss, div_mean, ce_mean

    @staticmethod
    def backward(ctx, grad_loss, _grad_div, _grad_ce):
        grad_hidden, grad_head = ctx.saved_tensors
        scale = None if bool(grad_loss == 1) else grad_loss  # the usual case: hand over the saved gradients as they are

        def finish(grad: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
            if grad is None:
                return None
            return (grad if scale is None else grad * scale).to(dtype)

        return finish(grad_hidden, ctx.dtypes[0]), finish(grad_head, ctx.dtypes[1]), None, None, None, None, None, \
            None, None


def fused_linear_distill_loss(student_hidden: torch.Tensor, student_head: torch.Tensor, labels: torch.Tensor,
                              cfg: FusedLossConfig, *, teacher_logits: torch.Tensor | None = None,
                              teacher_hidden: torch.Tensor | None = None, teacher_head: torch.Tensor | None = None,
                              backend: Literal["auto", "triton", "torch"] = "auto",
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, divergence per token, cross-entropy per token); only the loss carries gradients.

    student_hidden [N, d], student_head [V, d], labels [N]; the teacher as logits [N, V_t >= V] or as hidden
    states [N, d_t] + head [V_t, d_t] (a padded teacher vocabulary is cut to the student's). `backend="auto"` runs
    the Triton kernel on CUDA tensors and the torch rows otherwise; both keep memory at O(chunk x vocab).
    """
    if student_hidden.dim() != 2 or student_head.dim() != 2 or student_hidden.shape[1] != student_head.shape[1]:
        raise ValueError(f"want hidden [N, d] and head [V, d], got {tuple(student_hidden.shape)} and "
                         f"{tuple(student_head.shape)}")
    if labels.shape != (student_hidden.shape[0],):
        raise ValueError(f"labels must be [N={student_hidden.shape[0]}], got {tuple(labels.shape)}")
    if cfg.kd_weight > 0 and teacher_logits is None and (teacher_hidden is None or teacher_head is None):
        raise ValueError("a distillation loss needs the teacher's logits, or its hidden states and head")
    teacher_vocab = (teacher_logits.shape[1] if teacher_logits is not None
                     else teacher_head.shape[0] if teacher_head is not None else student_head.shape[0])
    if teacher_vocab < student_head.shape[0]:
        raise ValueError(f"teacher vocabulary ({teacher_vocab}) is smaller than the student's "
                         f"({student_head.shape[0]})")
    if backend == "auto":
        backend = "triton" if student_hidden.is_cuda else "torch"
    want_grad = torch.is_grad_enabled() and (student_hidden.requires_grad or student_head.requires_grad)
    with torch.autocast(student_hidden.device.type, enabled=False):
        return _FusedLinearDistill.apply(student_hidden, student_head, labels,
                                         None if teacher_logits is None else teacher_logits.detach(),
                                         None if teacher_hidden is None else teacher_hidden.detach(),
                                         None if teacher_head is None else teacher_head.detach(),
                                         cfg, backend, want_grad)


def divergence_of_logprobs(s: torch.Tensor, t: torch.Tensor, divergence: Divergence,
                           beta: float = 0.5) -> torch.Tensor:
    """The divergence between two distributions given as log-probabilities over the last axis."""
    if divergence == "forward_kl":
        return (t.exp() * (t - s)).sum(-1)
    if divergence == "reverse_kl":
        return (s.exp() * (s - t)).sum(-1)
    log_m = torch.logaddexp(s + math.log1p(-beta), t + math.log(beta))
    return beta * (t.exp() * (t - log_m)).sum(-1) + (1 - beta) * (s.exp() * (s - log_m)).sum(-1)


def distill_loss_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
                           cfg: FusedLossConfig) -> torch.Tensor:
    """The naive loss from full logits with autograd (fp32, or float64 if given): the oracle in tests and the
    baseline in the benchmark."""
    live = labels != cfg.ignore_index
    count = live.sum().clamp_min(1)
    z = student_logits if student_logits.dtype == torch.float64 else student_logits.float()
    total = torch.zeros((), device=z.device, dtype=z.dtype)
    if teacher_logits is not None and cfg.kd_weight > 0:
        s = F.log_softmax(z / cfg.temperature, -1)
        t = F.log_softmax(teacher_logits[:, : z.shape[1]].to(z.dtype) / cfg.temperature, -1)
        total = total + cfg.kd_weight * (divergence_of_logprobs(s, t, cfg.divergence, cfg.beta) * live).sum()
    if cfg.ce_weight > 0:
        total = total + cfg.ce_weight * F.cross_entropy(z, labels, ignore_index=cfg.ignore_index, reduction="sum")
    return total / count
