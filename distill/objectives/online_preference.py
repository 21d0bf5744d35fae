"""Online preference optimisation (Ministral 3's online DPO, Calandriello et al.'s online IPO): each step the current
policy answers every prompt twice through the project's vLLM engine (weights pushed in place, the engine's
log-probs checked against the trainer's after the first pushes: distill/components/rollouts.py), the two answers
are labelled, and the GPO loss of distill/objectives/preference.py trains on them against the frozen reference.

Labels: a verifier (distill/verifiers.py; right beats wrong, equal rewards leave the pair out) or the teacher, whose
soft label is p = sigmoid((l_1 - l_2) / tau) with l its per-token log-likelihood of each answer. An answer that
never ends (no end-of-sequence within `new_tokens`) loses to one that does, whatever the labeller says. Prompts are
the data's pairs' prompts (their answers are not used); held-out evaluation stays on the data's held-out pairs.
Sampling uses a temperature only (no top-p/top-k) and one seed per (run seed, step, row, answer), so a resumed run
draws the same pairs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distill.common import resolve_precision
from distill.components.models import Student, load_teacher
from distill.components.rollouts import PolicySampler, completion_rows, seeded_uniform
from distill.config import TrainConfig
from distill.data import Batch, BatchSampler
from distill.objectives.preference import PreferenceOptimisation, sequence_logprobs
from distill.verifiers import VERIFIERS
from kernels.distill_loss import IGNORE_INDEX
from models.registry import get_model
from models.tokenizers import load_tokenizer


class OnlinePreference(PreferenceOptimisation):
    def __init__(self, config: TrainConfig, student: Student, train_rows: torch.Tensor, sampler: BatchSampler,
                 total_steps: int, on: torch.device, progress: bool = True) -> None:
        super().__init__(config, student, train_rows, sampler, total_steps, on, progress)
        self.online = config.prefer.online
        assert self.online is not None
        self.seed, self.device = config.seed, on
        self.policy = PolicySampler(Path(config.student), config.data.seq_len + self.online.new_tokens,
                                    resolve_precision(config.precision, on), self.online.kv_cache_gib, config.seed,
                                    self.online.sync_every, train_rows[0, 0, :64].tolist(), self.online.probe_tolerance)
        self.tokenizer = load_tokenizer(get_model(config.data_model()))
        if self.online.labels == "teacher":
            self.teacher = load_teacher(Path(config.teacher), Path(config.student), student.lm.config.vocab_size,  # type: ignore[arg-type]
                                        config.attention, on, config.teacher_dtype)

    def describe(self) -> str:
        o = self.online
        return (f"{super().describe()}; online: two answers a prompt from the policy through vLLM (temperature "
                f"{o.temperature:g}, up to {o.new_tokens} tokens), labelled by {o.labels}")  # type: ignore[union-attr]

    def __call__(self, student: Student, batch: Batch, step: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.policy.sync(student, step)
        prompts = _prompts(batch)
        seeds = [int(seeded_uniform(self.seed, "prefer", step, int(row), k) * 2**31)
                 for row in batch.rows for k in (0, 1)]
        outs = self.policy.generate([p for p in prompts for _ in (0, 1)], self.online.new_tokens,  # type: ignore[union-attr]
                                    self.online.temperature, seeds)  # type: ignore[union-attr]
        pairs = self._pair_batch(batch.rows, prompts, outs[0::2], outs[1::2])
        p, weight, stats = self._labels(pairs, prompts, outs[0::2], outs[1::2])
        pairs.preference = p
        loss, metrics = self.gpo(student, pairs, weight)
        return loss, {**metrics, **stats}

    def close(self) -> None:
        self.policy.close()

    def _pair_batch(self, rows: torch.Tensor, prompts: list[list[int]], first: list[list[int]],
                    second: list[list[int]]) -> Batch:
        """[2B, W] prompt + answer rows (the B first answers, then the B second ones), labels on the answers."""
        ids, labels = completion_rows(prompts + prompts, first + second, self.policy.eos)
        return Batch(rows, ids.to(self.device), labels.to(self.device))

    def _finished(self, answer: list[int]) -> bool:
        return len(answer) < self.online.new_tokens or (bool(answer) and answer[-1] == self.policy.eos)  # type: ignore[union-attr]

    def _labels(self, pairs: Batch, prompts: list[list[int]], first: list[list[int]], second: list[list[int]]
                ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(p [B]: P(first answer is better), weight [B]: 0 for pairs without a preference, metrics)."""
        done = torch.tensor([[self._finished(a), self._finished(b)] for a, b in zip(first, second, strict=True)])
        if self.online.labels == "teacher":  # type: ignore[union-attr]
            hidden, head = self.teacher(pairs.ids)  # type: ignore[misc]
            mean, _ = sequence_logprobs(hidden, head, pairs.labels, average=True)  # type: ignore[arg-type]
            a, b = mean.chunk(2)
            p = torch.sigmoid((a - b) / self.online.label_temperature).cpu()  # type: ignore[union-attr]
            rewards = torch.stack([a, b], -1).cpu()
        else:
            check = VERIFIERS[self.online.labels]  # type: ignore[union-attr]
            rewards = torch.tensor([[check(self.tokenizer.decode(prompt), self._text(answer)) or 0.0
                                     for answer in (a, b)] for prompt, a, b in zip(prompts, first, second,
                                                                                    strict=True)])
            p = (rewards[:, 0] > rewards[:, 1]).float() + 0.5 * (rewards[:, 0] == rewards[:, 1]).float()
        # an answer that never ends loses to one that does, whatever the labeller said
        p = torch.where(done[:, 0] & ~done[:, 1], 1.0, torch.where(~done[:, 0] & done[:, 1], 0.0, p))
        weight = (p != 0.5).float() if self.online.labels != "teacher" else torch.ones_like(p)  # type: ignore[union-attr]
        # per micro-batch ("batch_": the loop averages them over micro-batches, not over the decided pairs)
        stats = {"batch_sample_reward": rewards.float().mean(), "batch_decided": (p != 0.5).float().mean(),
                 "batch_unfinished": (~done).float().mean()}
        return p.to(self.device), weight.to(self.device), {k: v.to(self.device) for k, v in stats.items()}

    def _text(self, answer: list[int]) -> str:
        eos = self.policy.eos
        return self.tokenizer.decode([t for t in answer if t != eos])


def _prompts(batch: Batch) -> list[list[int]]:
    """Each pair's prompt: its chosen row up to the first answer token."""
    rows = len(batch.rows)
    labels = batch.labels.view(2 * rows, -1)[:rows]  # type: ignore[union-attr]
    starts = (labels != IGNORE_INDEX).int().argmax(-1) + 1  # label t is token t + 1
    return [batch.ids[r, : int(s)].tolist() for r, s in enumerate(starts)]
