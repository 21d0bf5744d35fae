"""On-policy distillation (GKD, Agarwal et al. 2024, with lambda = `on_policy.mix`): on a chosen share of steps the
student continues each training row's first `prompt_tokens` tokens itself (vLLM, distill/components/rollouts.py),
the teacher scores every position of that continuation, and the loss is the configured divergence on the student's
own tokens only (the prompt is context, not target). The other steps are plain KD on the data (distill/objectives/
kd.py), so mix = 0 is KD and mix = 1 is fully on-policy; TRL's GKDTrainer with lmbda=1 samples the same way but
through `model.generate` (its slowest part, trl#4568).

Why: off-policy KD trains the student on text it would not write; on its own samples the teacher corrects the
mistakes the student actually makes (exposure bias), which is what keeps abilities at small sizes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from distill.common import resolve_precision
from distill.components.models import Student
from distill.components.rollouts import PolicySampler, completion_rows, seeded_uniform
from distill.config import TrainConfig
from distill.data import Batch, BatchSampler
from distill.objectives.kd import Distillation
from kernels.distill_loss import IGNORE_INDEX

log = logging.getLogger(__name__)


class OnPolicyDistillation(Distillation):
    def __init__(self, config: TrainConfig, student: Student, train_rows: torch.Tensor, sampler: BatchSampler,
                 total_steps: int, on: torch.device, progress: bool = True) -> None:
        super().__init__(config, student, train_rows, sampler, total_steps, on, progress)
        self.settings = config.on_policy
        self.prompt_tokens = self.settings.prompt_tokens
        self.new_tokens = self.settings.new_tokens or config.data.seq_len - self.prompt_tokens
        self.policy = PolicySampler(Path(config.student), config.data.seq_len, resolve_precision(config.precision, on),
                                    self.settings.kv_cache_gib, config.seed, self.settings.sync_every,
                                    train_rows[0, :64].tolist(), self.settings.probe_tolerance)

    def describe(self) -> str:
        return (f"gkd (on-policy share {self.settings.mix:g}: the student continues {self.prompt_tokens} prompt "
                f"tokens by {self.new_tokens} through vLLM; {super().describe()})")

    def on_policy(self, step: int) -> bool:
        """Whether `step` trains on the student's samples: a seeded draw per step, the same after a resume."""
        if self.settings.mix >= 1:
            return True
        return seeded_uniform(self.config.seed, "mix", step) < self.settings.mix

    def __call__(self, student: Student, batch: Batch, step: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not self.on_policy(step):
            loss, metrics = super().__call__(student, batch, step)
            return loss, {**metrics, "on_policy": torch.zeros(())}
        self.policy.sync(student, step)
        samples, labels = self._samples(batch.rows, batch.ids, step)
        teacher_hidden, teacher_head = self.teacher(samples)  # type: ignore[misc]
        loss, metrics = student(samples, self._head_loss, teacher_hidden=teacher_hidden, teacher_head=teacher_head,
                                teacher_topk=None, labels=labels)
        sampled = (labels != IGNORE_INDEX).sum(-1).float().mean()
        return loss, {**metrics, "on_policy": torch.ones(()), "sample_tokens": sampled}

    def close(self) -> None:
        self.policy.close()

    def _samples(self, rows: torch.Tensor, ids: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, <= P + N] prompt + sampled ids (padded with EOS after an early stop) and labels that keep only the
        sampled tokens."""
        prompts = ids[:, : self.prompt_tokens].tolist()
        seeds = [int(seeded_uniform(self.config.seed, "sample", step, int(r)) * 2**31) for r in rows]
        outs = self.policy.generate(prompts, self.new_tokens, self.settings.temperature, seeds)
        samples, labels = completion_rows(prompts, outs, self.policy.eos)
        return samples.to(self.device), labels.to(self.device)
