"""Distillation losses on logits, computed chunk by chunk over tokens so [tokens x vocab] never exists whole.

forward KL(teacher || student) is the default (Ministral 3, Minitron: logits-only forward KL beat every mix with
cross-entropy). Reverse KL and generalized JSD(beta) follow TRL's GKD conventions (no tau^2 factor). The loss is a
sum over unmasked tokens divided by their number, so it does not depend on batch shape or chunking.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch.utils.checkpoint import checkpoint

from kernels.distill_loss import (
    IGNORE_INDEX,
    Divergence,
    FusedLossConfig,
    distill_loss_reference,
    divergence_of_logprobs,
    fused_linear_distill_loss,
)


class LossConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    divergence: Divergence = "forward_kl"
    temperature: float = Field(1.0, gt=0)
    beta: float = 0.5  # JSD only: the mixture is beta * teacher + (1 - beta) * student
    kd_weight: float = Field(1.0, ge=0)  # 0 gives plain cross-entropy training (the from-scratch baseline)
    ce_weight: float = Field(0.0, ge=0)
    chunk_tokens: int = Field(512, ge=1)
    # precision of the LM-head products in the fused loss (kernels/distill_loss.py: bf16 is about twice as fast on
    # AVX512-BF16 CPUs and is what HF/TRL's autocast does; the chunked path always uses fp32)
    head_matmul: Literal["float32", "bfloat16"] = "float32"

    @model_validator(mode="after")
    def _check(self) -> LossConfig:
        if self.divergence == "jsd" and not 0 < self.beta < 1:
            raise ValueError(f"jsd needs 0 < beta < 1, got {self.beta} (beta 0 is forward KL, 1 reverse KL)")
        if self.kd_weight + self.ce_weight == 0:
            raise ValueError("kd_weight and ce_weight cannot both be 0")
        return self

    def kernel_config(self) -> FusedLossConfig:
        """The same loss as kernels/distill_loss.py spells it."""
        return FusedLossConfig(self.divergence, self.temperature, self.beta, self.kd_weight, self.ce_weight,
                               self.chunk_tokens, IGNORE_INDEX, self.head_matmul)


class VocabMismatchError(ValueError):
    pass


def shared_vocab(student_vocab: int, teacher_vocab: int) -> int:
    """Teachers may pad their vocabulary past the student's (Qwen2.5 151936 vs 152064); compare the shared range."""
    if teacher_vocab < student_vocab:
        raise VocabMismatchError(
            f"teacher vocabulary ({teacher_vocab}) is smaller than the student's ({student_vocab})"
        )
    return student_vocab


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, divergence: Divergence,
                     temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """Per-token divergence [N] between the two distributions (fp32 math), teacher truncated to the student vocab."""
    vocab = shared_vocab(student_logits.shape[-1], teacher_logits.shape[-1])
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits[..., :vocab].float() / temperature, dim=-1)
    return divergence_of_logprobs(s, t, divergence, beta)


def topk_with_tail(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices [N, k], their log-probs [N, k], log of the remaining mass [N]) of a full log-prob matrix."""
    top, idx = logprobs.topk(k, dim=-1)
    return idx, top, _tail(logprobs, idx)


def _tail(logprobs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    # logsumexp over the tokens outside the top k: stable even when the top k hold almost all the mass
    return logprobs.scatter(-1, idx, float("-inf")).logsumexp(-1).clamp_min(-80.0)


def topk_divergence(student_logits: torch.Tensor, top_idx: torch.Tensor, top_logprobs: torch.Tensor,
                    tail_logprob: torch.Tensor, divergence: Divergence, temperature: float = 1.0,
                    beta: float = 0.5) -> torch.Tensor:
    """The divergence over k+1 buckets: the teacher's top-k tokens and one bucket for everything else.

    A top-k KL without the tail bucket is not a KL (it can go negative: verl#7856); with it, this is the exact
    divergence between the two distributions coarsened onto the same k+1 outcomes, so 0 <= it <= the full one.
    The teacher's log-probs must have been taken at the same temperature.
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    idx = top_idx.long()
    student = torch.cat([s.gather(-1, idx), _tail(s, idx)[..., None]], dim=-1)
    teacher = torch.cat([top_logprobs.float(), tail_logprob.float()[..., None]], dim=-1)
    return divergence_of_logprobs(student, teacher, divergence, beta)


def _chunk_terms(h: torch.Tensor, weight: torch.Tensor, teacher: tuple[torch.Tensor, ...] | None,
                 labels: torch.Tensor, config: LossConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums over one chunk of tokens: (weighted loss, divergence, cross-entropy).

    `teacher` is (hidden [n, d_t], head [V_t, d_t]) for a live teacher, or (top indices, top log-probs, tail
    log-prob) from a cache. A live teacher's logits are made here, not passed in: checkpointing keeps a chunk's
    inputs until the backward pass, and [chunk x vocab] teacher logits kept for every chunk would be the full
    matrix again.
    """
    with torch.autocast(h.device.type, enabled=False):  # bf16 logits would put noise of ~1% into the KL
        logits = h.float() @ weight.float().T
    mask = labels != IGNORE_INDEX
    ce = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if teacher is None:
        div = torch.zeros((), device=h.device)
    elif len(teacher) == 3:
        per_token = topk_divergence(logits, *teacher, config.divergence, config.temperature, config.beta)
        div = (per_token * mask).sum()
    else:
        with torch.no_grad(), torch.autocast(h.device.type, enabled=False):
            teacher_logits = teacher[0].float() @ teacher[1].float().T
        per_token = token_divergence(logits, teacher_logits, config.divergence, config.temperature, config.beta)
        div = (per_token * mask).sum()
    return config.kd_weight * div + config.ce_weight * ce, div.detach(), ce.detach()


def distill_loss(student_hidden: torch.Tensor, student_head: torch.Tensor, labels: torch.Tensor, config: LossConfig,
                 teacher_hidden: torch.Tensor | None = None, teacher_head: torch.Tensor | None = None,
                 teacher_topk: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 fused: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss from final hidden states and LM heads, one chunk of `config.chunk_tokens` tokens at a time.

    student_hidden [N, d], labels [N] (IGNORE_INDEX masks a token), teacher_hidden [N, d_t]. Each chunk's student
    logits are recomputed in the backward pass (activation checkpointing) and the teacher's exist only inside the
    chunk, so peak memory is O(chunk x vocab) instead of O(N x vocab). `teacher_topk` ([N, k] indices, [N, k]
    log-probs, [N] tail log-prob) replaces a live teacher with a cached one. Returns (loss, metrics per token).
    `fused` computes the same loss with kernels/distill_loss.py (live teacher or none): gradients are made in the
    forward chunk by chunk, so no logits are recomputed and fewer [chunk x vocab] temporaries exist.
    """
    live = teacher_hidden is not None and teacher_head is not None
    if config.kd_weight > 0 and not live and teacher_topk is None:
        raise ValueError("a distillation loss needs the teacher's hidden states and head, or its cached top-k")
    tokens = (labels != IGNORE_INDEX).sum()  # reported as is: the loop divides by the step's total
    count = tokens.clamp_min(1)
    if fused and (live or config.kd_weight == 0):
        loss, kd, ce = fused_linear_distill_loss(
            student_hidden, student_head, labels, config.kernel_config(),
            teacher_hidden=teacher_hidden if config.kd_weight > 0 else None,
            teacher_head=teacher_head if config.kd_weight > 0 else None)
        return loss, {"kd": kd.detach(), "ce": ce.detach(), "tokens": tokens}
    total = torch.zeros((), device=student_hidden.device)
    div_sum = torch.zeros((), device=student_hidden.device)
    ce_sum = torch.zeros((), device=student_hidden.device)
    for start in range(0, labels.shape[0], config.chunk_tokens):
        part = slice(start, start + config.chunk_tokens)
        teacher = None
        if config.kd_weight > 0:
            teacher = ((teacher_hidden[part].detach(), teacher_head.detach()) if live
                       else tuple(t[part] for t in teacher_topk))  # type: ignore[union-attr]
        args = (student_hidden[part], student_head, teacher, labels[part], config)
        if torch.is_grad_enabled() and student_hidden.requires_grad:
            loss, div, ce = checkpoint(_chunk_terms, *args, use_reentrant=False)
        else:
            loss, div, ce = _chunk_terms(*args)
        total = total + loss
        div_sum += div
        ce_sum += ce
    return total / count, {"kd": div_sum / count, "ce": ce_sum / count, "tokens": tokens}


def reference_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
                   config: LossConfig) -> torch.Tensor:
    """The same loss computed in one piece from full logits: the test oracle and the naive baseline."""
    return distill_loss_reference(student_logits, teacher_logits, labels, config.kernel_config())
