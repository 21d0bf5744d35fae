"""Preference optimisation as GPO (Tang et al. 2024, arXiv 2402.05749): one loss, `f(beta * delta)`, over pairs.

    delta = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]     (sums over answer tokens)
    loss  = p * f(beta * delta) + (1 - p) * f(-beta * delta)                           (mean over pairs)

with `f` convex from `GPO_LOSSES` and `p` = P(y_w is better) per pair (1 for a hard label). For the logistic f this
is DPO, and with soft p Ministral 3's online-DPO loss `-p log s(b d) - (1 - p) log s(-b d)`. The squared f is IPO;
its soft form is the IPO analogue `(beta * delta - (2p - 1))^2` (Azar et al.'s `(delta - (p - 1/2) / tau)^2` with
tau = beta / 2, scaled by beta^2), which differs from p f(z) + (1 - p) f(-z) by a constant only. Convention check:
TRL's `ipo` loss is `(delta_avg - 1 / (2 beta))^2` on per-token averages (`average_logprobs: true` here), the same
as ours at beta_ours = 2 beta_TRL up to the scale 1 / (4 beta^2).

The reference's log-probs are computed once per batch without gradient: a frozen copy of the starting weights, or
with LoRA the student itself with its adapters off (no second copy). Only the answers' tokens are scored, so for
short answers the head runs on a few tokens per row, not all of them (arithmetic: 3 of 128).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from distill.components.lora import adapters_disabled
from distill.components.models import Student, Teacher, load_teacher
from distill.config import GPOLoss, TrainConfig
from distill.data import Batch, BatchSampler
from kernels.distill_loss import IGNORE_INDEX

GPO_LOSSES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "logistic": lambda z: F.softplus(-z),  # DPO: log(1 + e^-z)
    "squared": lambda z: (z - 1) ** 2,  # IPO
    "hinge": lambda z: F.relu(1 - z),  # SLiC
    "exponential": lambda z: torch.exp(-z),
    "truncated_quadratic": lambda z: F.relu(1 - z) ** 2,
    "savage": lambda z: torch.sigmoid(-z) ** 2,  # 1 / (1 + e^z)^2
}


def gpo_loss(z: torch.Tensor, p: torch.Tensor, loss: GPOLoss) -> torch.Tensor:
    """Per-pair loss for margins z = beta * delta and soft labels p (see the module docstring)."""
    if loss == "squared":
        return (z - (2 * p - 1)) ** 2
    f = GPO_LOSSES[loss]
    return p * f(z) + (1 - p) * f(-z)


def _token_logprobs(hidden: torch.Tensor, head: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    with torch.autocast(hidden.device.type, enabled=False):  # fp32 head and log-softmax under bf16 autocast
        logits = hidden.float() @ head.float().T  # [n, V]
    return logits.log_softmax(-1).gather(-1, labels[:, None])[:, 0]


def sequence_logprobs(hidden: torch.Tensor, head: torch.Tensor, labels: torch.Tensor, chunk: int = 512,
                      average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum (or mean) of log p(label) over each row's trained tokens [R], trained tokens per row [R]).

    hidden [R, T-1, d], labels [R*(T-1)] with IGNORE_INDEX off the answers. The head runs on the answers' tokens
    only, `chunk` at a time, each chunk recomputed in the backward (checkpoint), so no [tokens x vocab] is kept."""
    rows, width = hidden.shape[0], hidden.shape[1]
    live = (labels != IGNORE_INDEX).nonzero()[:, 0]  # flat positions of answer tokens
    flat = hidden.reshape(-1, hidden.shape[-1])[live]  # [n, d]
    targets = labels[live]
    parts = []
    for start in range(0, len(live), chunk):
        args = (flat[start:start + chunk], head, targets[start:start + chunk])
        parts.append(checkpoint(_token_logprobs, *args, use_reentrant=False) if torch.is_grad_enabled()
                     else _token_logprobs(*args))
    token = torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.float32)
    row = live // width
    sums = token.new_zeros(rows).index_add(0, row, token)
    counts = torch.bincount(row, minlength=rows).to(sums.dtype)
    return (sums / counts.clamp_min(1) if average else sums), counts


class PreferenceOptimisation:
    teacher: Teacher | None = None  # no teacher: the evaluator's KL needs eval_teacher

    def __init__(self, config: TrainConfig, student: Student, train_rows: torch.Tensor, sampler: BatchSampler,
                 total_steps: int, on: torch.device, progress: bool = True) -> None:
        self.settings = config.prefer
        self.chunk = config.loss.chunk_tokens
        self.lora_reference = config.lora is not None and self.settings.reference is None
        self.reference: Teacher | None = None
        if not self.lora_reference:
            self.reference = load_teacher(Path(self.settings.reference or config.student), Path(config.student),
                                          student.lm.config.vocab_size, config.attention, on)

    def describe(self) -> str:
        s = self.settings
        source = "the student with its adapters off" if self.lora_reference else f"frozen {s.reference or 'start'}"
        return (f"prefer (GPO {s.loss}, beta {s.beta:g}, {'per-token' if s.average_logprobs else 'per-answer'} "
                f"log-ratios; reference: {source})")

    def __call__(self, student: Student, batch: Batch, step: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.gpo(student, batch)

    def gpo(self, student: Student, batch: Batch, weight: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The GPO loss of a batch of pairs; `weight` [B] (0 or 1) leaves pairs out (online: ties)."""
        reference = self._reference_logprobs(student, batch)
        return student(batch.ids, self._head_loss, positions=batch.positions, labels=batch.labels,
                       reference=reference, p=batch.preference, weight=weight)

    @torch.no_grad()
    def validation(self, student: Student, batch: Batch) -> dict[str, torch.Tensor]:
        """Sums over the held-out pairs of a batch (padding pairs, with no answer tokens, left out) and their
        count: the GPO loss, reward accuracy (delta > 0) and margin."""
        reference = self._reference_logprobs(student, batch)
        _, metrics = student(batch.ids, self._head_loss, positions=batch.positions, labels=batch.labels,
                             reference=reference, p=batch.preference, reduce=False)
        real = metrics.pop("answer_tokens") > 0
        return {"count": real.sum().double(), **{k: v[real].double().sum() for k, v in metrics.items()}}

    def close(self) -> None:
        """Nothing to stop: the reference lives in this process."""

    @torch.no_grad()
    def _reference_logprobs(self, student: Student, batch: Batch) -> torch.Tensor:
        """[2B] the reference's log-probs of every answer (chosen rows, then rejected)."""
        def score(hidden: torch.Tensor, head: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            return sequence_logprobs(hidden, head, batch.labels, self.chunk, self.settings.average_logprobs)[0]  # type: ignore[arg-type]

        if self.reference is not None:
            hidden, head = self.reference(batch.ids, batch.positions)
            return score(hidden, head, batch.ids)
        with adapters_disabled(student.lm) if self.lora_reference else nullcontext():
            return student(batch.ids, score, positions=batch.positions)

    def _head_loss(self, hidden: torch.Tensor, head: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor,
                   reference: torch.Tensor, p: torch.Tensor, reduce: bool = True, weight: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        sums, counts = sequence_logprobs(hidden, head, labels, self.chunk)
        per_token = sums / counts.clamp_min(1)
        ratio = (per_token if self.settings.average_logprobs else sums) - reference  # [2B] log pi / pi_ref
        chosen, rejected = ratio.chunk(2)  # [B] each
        z = self.settings.beta * (chosen - rejected)
        losses = gpo_loss(z, p, self.settings.loss)
        chosen_nll = -per_token.chunk(2)[0]  # [B] per-token NLL of each chosen answer
        if self.settings.sft_weight:
            losses = losses + self.settings.sft_weight * chosen_nll
        metrics = {"reward_accuracy": (z > 0).float(), "margin": z.detach(), "chosen_logratio": chosen.detach(),
                   "rejected_logratio": rejected.detach(), "chosen_nll": chosen_nll.detach()}
        if not reduce:
            return losses, {"loss": losses.detach(), **metrics, "answer_tokens": counts.chunk(2)[0]}
        w = torch.ones_like(z) if weight is None else weight.to(z.dtype)
        pairs = w.sum()  # "tokens" is what the loop normalises by: pairs here (the loss is a mean over pairs)
        mean = lambda v: (v * w).sum() / pairs.clamp_min(1)  # noqa: E731
        return mean(losses), {**{k: mean(v) for k, v in metrics.items()}, "tokens": pairs.detach()}
