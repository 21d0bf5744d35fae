"""Held-out evaluation: cross-entropy / perplexity of the student, and against a teacher the per-token
KL(teacher || student) and top-1 agreement. Every rank runs the same number of batches (FSDP2 collectives)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from distill.common import Precision, all_sum, autocast, world
from distill.components.models import Teacher
from distill.data import Batch, TokenRows
from distill.losses import token_divergence
from kernels.distill_loss import IGNORE_INDEX


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    every: int = Field(20, ge=1, description="steps between evaluations (the last step always evaluates)")


class Evaluator:
    def __init__(self, config: EvalConfig, rows: TokenRows, batch_size: int, teacher: Teacher | None,
                 precision: Precision, on: torch.device,
                 extra: Callable[[nn.Module, Batch], dict[str, torch.Tensor]] | None = None) -> None:
        rank, size = world()
        self.config, self.batch_size, self.teacher, self.precision, self.device = (
            config, batch_size, teacher, precision, on)
        self.extra = extra  # the objective's own held-out metrics (sums and their "count"), e.g. preference accuracy
        self.rows = rows
        self.mine = torch.arange(rank, len(rows), size)  # equal shares: the caller makes the count divide

    def due(self, step: int, total: int) -> bool:
        return step % self.config.every == 0 or step == total

    @torch.no_grad()
    def __call__(self, student: nn.Module) -> dict[str, float]:
        """val_ce, val_ppl and, with a teacher, val_kl and val_top1_agree (means per trained token: every next
        token of text, the assistant's tokens of chat data, the chosen answers' tokens of preference pairs), and
        the objective's own `val_<name>` means."""
        was_training = student.training
        student.eval()
        sums = torch.zeros(4, dtype=torch.float64)  # ce, kl, agree, tokens
        extra: dict[str, torch.Tensor] = {}
        for start in range(0, len(self.mine), self.batch_size):
            batch = self.rows.batch(self.mine[start:start + self.batch_size], self.device)
            if self.extra is not None:
                with autocast(self.precision, self.device):
                    for name, value in self.extra(student, batch).items():
                        extra[name] = extra.get(name, 0) + value.detach().double().cpu()
            if batch.preference is not None:  # pairs: CE and KL on the chosen answers (the first half of the rows)
                chosen = len(batch.rows)
                batch = Batch(batch.rows, batch.ids[:chosen], batch.labels[: chosen * (batch.ids.shape[1] - 1)])  # type: ignore[index]
            labels = batch.labels if batch.labels is not None else batch.ids[:, 1:].reshape(-1)
            # chat data: only the assistant's tokens count (text: all, without copying [N, V] logits to select them)
            live = (labels != IGNORE_INDEX) if batch.labels is not None else slice(None)
            with autocast(self.precision, self.device):
                logits = student(batch.ids, positions=batch.positions, media=batch.media).flatten(0, 1)[live]
                t_logits = (self.teacher.logits(batch.ids, batch.positions, batch.media).flatten(0, 1)[live]
                            if self.teacher is not None else None)
            sums[0] += torch.nn.functional.cross_entropy(logits, labels[live], reduction="sum")
            if t_logits is not None:
                sums[1] += token_divergence(logits, t_logits, "forward_kl").sum()
                sums[2] += (logits.argmax(-1) == t_logits[..., : logits.shape[-1]].argmax(-1)).sum()
            sums[3] += len(logits)
        sums = all_sum(sums)
        student.train(was_training)
        n = max(sums[3].item(), 1.0)
        result = {"val_ce": sums[0].item() / n, "val_ppl": math.exp(min(50.0, sums[0].item() / n))}
        if self.teacher is not None:
            result |= {"val_kl": sums[1].item() / n, "val_top1_agree": sums[2].item() / n}
        if extra:
            names = sorted(extra)
            totals = all_sum(torch.stack([extra[k].reshape(()) for k in names]))
            count = max(totals[names.index("count")].item(), 1.0)
            result |= {f"val_{k}": totals[i].item() / count for i, k in enumerate(names) if k != "count"}
        return result
