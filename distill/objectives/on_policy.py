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

import hashlib
import json
import logging
from pathlib import Path

import torch

from distill.common import resolve_precision
from distill.components.checkpointer import full_model_state
from distill.components.models import Student
from distill.components.rollouts import RolloutEngine
from distill.config import TrainConfig
from distill.data import Batch, BatchSampler
from distill.objectives.kd import Distillation
from kernels.distill_loss import IGNORE_INDEX

log = logging.getLogger(__name__)

PROBE_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.05}  # mean |log p| difference, engine vs trainer, on the probe


class OnPolicyDistillation(Distillation):
    def __init__(self, config: TrainConfig, student: Student, train_rows: torch.Tensor, sampler: BatchSampler,
                 total_steps: int, on: torch.device, progress: bool = True) -> None:
        super().__init__(config, student, train_rows, sampler, total_steps, on, progress)
        self.settings = config.on_policy
        self.prompt_tokens = self.settings.prompt_tokens
        self.new_tokens = self.settings.new_tokens or config.data.seq_len - self.prompt_tokens
        self.precision = resolve_precision(config.precision, on)
        self.engine: RolloutEngine | None = None  # started at the first on-policy step
        self.synced_step: int | None = None
        self.pushes = 0
        self.probe = train_rows[0, : min(64, train_rows.shape[1] - 1)].tolist()  # + 1 generated <= max_len

    def describe(self) -> str:
        return (f"gkd (on-policy share {self.settings.mix:g}: the student continues {self.prompt_tokens} prompt "
                f"tokens by {self.new_tokens} through vLLM; {super().describe()})")

    def on_policy(self, step: int) -> bool:
        """Whether `step` trains on the student's samples: a seeded draw per step, the same after a resume."""
        if self.settings.mix >= 1:
            return True
        return _uniform(self.config.seed, "mix", step) < self.settings.mix

    def __call__(self, student: Student, batch: Batch, step: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not self.on_policy(step):
            loss, metrics = super().__call__(student, batch, step)
            return loss, {**metrics, "on_policy": torch.zeros(())}
        self._sync(student, step)
        samples, labels = self._samples(batch.rows, batch.ids, step)
        teacher_hidden, teacher_head = self.teacher(samples)  # type: ignore[misc]
        loss, metrics = student(samples, self._head_loss, teacher_hidden=teacher_hidden, teacher_head=teacher_head,
                                teacher_topk=None, labels=labels)
        sampled = (labels != IGNORE_INDEX).sum(-1).float().mean()
        return loss, {**metrics, "on_policy": torch.ones(()), "sample_tokens": sampled}

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def _sync(self, student: Student, step: int) -> None:
        """Push the student's weights when the engine's are older than the last multiple of `sync_every` (every
        rank gathers its full copy). Checkpoints fall on those multiples, so a resumed run pushes exactly where the
        interrupted one would have, with or without off-policy steps in between."""
        if not push_due(self.synced_step, step, self.settings.sync_every):
            return
        state = {k.removeprefix("lm."): v for k, v in full_model_state(student).items()}
        if self.engine is None:
            self.engine = RolloutEngine(Path(self.config.student), self.config.data.seq_len, self.precision,
                                        self.settings.kv_cache_gib, self.config.seed, _eos(self.config.student))
        dtype = torch.bfloat16 if self.precision == "bfloat16" else torch.float32
        seconds = self.engine.load(state, dtype)  # type: ignore[union-attr]
        self.synced_step, self.pushes = step, self.pushes + 1
        log.debug("rollouts: weights pushed at step %d in %.1f s", step, seconds)
        if self.pushes <= 2:  # the start, and the first push of trained weights (a reload that did nothing fails)
            self._check_probe(student)

    def _check_probe(self, student: Student) -> None:
        """The engine must compute the trainer's log-probs, or the samples are not the student's (checked on the
        first two pushes: the second carries trained weights, so a reload that changed nothing is caught)."""
        engine = torch.tensor(self.engine.prompt_logprobs(self.probe))  # type: ignore[union-attr]
        ids = torch.tensor([self.probe], device=self.device)
        with torch.no_grad():
            logits = student(ids)[0].float()  # [T-1, V] fp32
        trainer = logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0].cpu()
        diff = (engine - trainer).abs().mean().item()
        tolerance = self.settings.probe_tolerance or PROBE_TOLERANCE[self.precision]
        log.info("rollouts: engine vs trainer log-probs on a %d-token probe: mean |diff| %.2e (tolerance %.0e)",
                 len(self.probe), diff, tolerance)
        if not diff <= tolerance:
            raise RuntimeError(f"the rollout engine's log-probs differ from the trainer's by {diff:.3g} on average "
                               f"(tolerance {tolerance:g}): its weights are not the student's")

    def _samples(self, rows: torch.Tensor, ids: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, P + N] prompt + sampled ids (padded with EOS after an early stop) and labels [B*(P+N-1)] that keep
        only the sampled tokens."""
        prompts = ids[:, : self.prompt_tokens].tolist()
        seeds = [int(_uniform(self.config.seed, "sample", step, int(r)) * 2**31) for r in rows]
        outs = self.engine.generate(prompts, self.new_tokens, self.settings.temperature, seeds)  # type: ignore[union-attr]
        pad = self.engine.eos if self.engine.eos is not None else 0  # type: ignore[union-attr]
        width = self.prompt_tokens + self.new_tokens
        samples = torch.full((len(prompts), width), pad, dtype=torch.long)
        labels = torch.full((len(prompts), width - 1), IGNORE_INDEX, dtype=torch.long)
        for i, (prompt, out) in enumerate(zip(prompts, outs, strict=True)):
            sequence = prompt + out
            samples[i, : len(sequence)] = torch.tensor(sequence)
            # position t predicts token t+1: the sampled tokens are targets from position P-1 on
            labels[i, self.prompt_tokens - 1: len(sequence) - 1] = torch.tensor(out)
        return samples.to(self.device), labels.reshape(-1).to(self.device)


def push_due(synced_step: int | None, step: int, every: int) -> bool:
    """Whether an on-policy `step` must push weights first: the engine has none yet, or holds weights older than the
    last multiple of `every` (the steps at which an uninterrupted run and a resumed one both hold fresh weights)."""
    return synced_step is None or synced_step < step // every * every


def _uniform(seed: int, *key: object) -> float:
    """A number in [0, 1) fixed by (seed, key): no RNG state to save for an exact resume."""
    digest = hashlib.sha256(":".join(map(str, (seed, *key))).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _eos(checkpoint: str) -> int | None:
    """The checkpoint's end-of-sequence id (generation_config.json first, as vLLM and transformers read it)."""
    for name in ("generation_config.json", "config.json"):
        path = Path(checkpoint) / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if isinstance(eos, list):
                eos = eos[0] if eos else None
            if eos is not None:
                return int(eos)
    return None
