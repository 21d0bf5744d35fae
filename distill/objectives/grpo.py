"""GRPO as Magistral runs it (arXiv 2506.10910; notes/posttraining.md §1.5): the policy answers each prompt of the
chat data `group_size` times through the project's vLLM engine (weights pushed in place before each generation,
engine and trainer log-probs checked on a probe after the first pushes: distill/components/rollouts.py), named
rewards score the answers (distill/rl/rewards.py), each sample's advantage is its reward against its group's
(distill/rl/advantages.py), and a clipped policy-gradient loss trains on the sampled tokens (distill/rl/
policy_loss.py). No KL term and no reference model by default; with `kl.beta > 0` a reference is loaded and the KL
placed where its gradient is right (distill/rl/kl.py). With a teacher and `kd_weight > 0` the same loss adds the
exact forward KL(teacher || student) over the vocabulary at every sampled token: RL and distillation at once
(Ministral 3 found logit distillation steadies RL for small models).

One generation serves `minibatches` optimizer steps (the first on-policy, the later ones on samples of older weights,
where the clip matters); its log-probs under the weights that sampled it (pi_old) are computed by the trainer then.
Advantages are normalised over each step's live samples on every rank. A step whose groups all got equal rewards
trains nothing (its loss is 0 and no gradient flows): that is the signal running out, logged as `zero_std_groups`.
Samples are seeded by (run seed, step, row, sample), so a resumed run draws the same groups.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from distill.common import all_sum, resolve_precision, world
from distill.components.lora import adapters_disabled
from distill.components.models import Student, Teacher, load_teacher
from distill.components.rollouts import PolicySampler, completion_rows, seeded_uniform
from distill.config import TrainConfig
from distill.data import Batch, BatchSampler, load_splits
from distill.losses import token_divergence
from distill.rl.advantages import group_advantages, live_groups, normalise
from distill.rl.kl import k1_sequence, k2_tokens, k3_tokens
from distill.rl.policy_loss import (
    asymmetric_token_loss,
    clipped_token_loss,
    sequence_weights,
    truncated_is_weights,
)
from distill.rl.rewards import Completion, total_reward
from kernels.distill_loss import IGNORE_INDEX
from models.registry import get_model
from models.tokenizers import load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class Rollouts:
    """One micro-batch's live samples, ready for the trainer (S sequences of width W)."""
    ids: torch.Tensor  # [S, W] prompt + completion, padded with EOS
    labels: torch.Tensor  # [S*(W-1)] the completion's tokens, IGNORE_INDEX elsewhere
    advantages: torch.Tensor  # [S]
    groups: torch.Tensor  # [S] which group (prompt) of the micro-batch each sequence answers
    lengths: torch.Tensor  # [S] completion tokens
    engine_logp: torch.Tensor  # [n] the engine's log-prob of each sampled token (label order)
    old_logp: torch.Tensor | None  # [n] the trainer's, under the weights that sampled them (None: the current ones)
    stats: dict[str, float] = field(default_factory=dict)


def prompt_end(targets: torch.Tensor) -> int:
    """Where a conversation's final assistant turn starts: the prompt is everything before it. targets [T] bool."""
    starts = (targets & ~torch.cat([targets.new_zeros(1), targets[:-1]])).nonzero()
    return int(starts[-1]) if len(starts) else int(targets.shape[0])


def _token_terms(h: torch.Tensor, head: torch.Tensor, targets: torch.Tensor, temperature: float,
                 teacher: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """[3, n]: log p(target) under logits / temperature, the sampling distribution's entropy (no gradient), and
    KL(teacher || student) at temperature 1 (0 without a teacher). One chunk of tokens, fp32."""
    with torch.autocast(h.device.type, enabled=False):
        logits = h.float() @ head.float().T  # [n, V]
    logprobs = F.log_softmax(logits / temperature, -1)
    logp = logprobs.gather(-1, targets[:, None])[:, 0]
    entropy = -(logprobs.exp() * logprobs).sum(-1).detach()
    if teacher is None:
        kd = torch.zeros_like(logp)
    else:
        with torch.no_grad(), torch.autocast(h.device.type, enabled=False):
            teacher_logits = teacher[0].float() @ teacher[1].float().T
        kd = token_divergence(logits, teacher_logits, "forward_kl")
    return torch.stack([logp, entropy, kd])


def token_terms(hidden: torch.Tensor, head: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                teacher_hidden: torch.Tensor | None = None, teacher_head: torch.Tensor | None = None,
                chunk: int = 512) -> torch.Tensor:
    """[3, n] `_token_terms` over the sampled tokens only (labels != IGNORE_INDEX, in order), `chunk` at a time,
    each chunk recomputed in the backward: no [tokens x vocab] is kept. hidden [S, W-1, d]."""
    live = (labels != IGNORE_INDEX).nonzero()[:, 0]
    flat = hidden.reshape(-1, hidden.shape[-1])[live]  # [n, d]
    teacher_flat = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[live] if teacher_hidden is not None else None
    parts = []
    for start in range(0, len(live), chunk):
        part = slice(start, start + chunk)
        teacher = (teacher_flat[part], teacher_head) if teacher_flat is not None else None  # type: ignore[assignment]
        args = (flat[part], head, labels[live][part], temperature, teacher)
        parts.append(checkpoint(_token_terms, *args, use_reentrant=False) if torch.is_grad_enabled()
                     else _token_terms(*args))
    return torch.cat(parts, 1) if parts else flat.new_zeros(3, 0, dtype=torch.float32)


class GroupPolicyOptimisation:
    def __init__(self, config: TrainConfig, student: Student, train_rows: torch.Tensor, sampler: BatchSampler,
                 total_steps: int, on: torch.device, progress: bool = True) -> None:
        self.config, self.settings, self.sampler, self.device = config, config.grpo, sampler, on
        self.rank, self.world = world()
        self.chunk = config.loss.chunk_tokens
        train, _ = load_splits(config.data, config.data_model())
        assert train.targets is not None
        self.prompts = [train.ids[r, : prompt_end(train.targets[r])].tolist() for r in range(len(train))]
        width = max(map(len, self.prompts)) + self.settings.new_tokens
        self.policy = PolicySampler(Path(config.student), width + 1, resolve_precision(config.precision, on),
                                    self.settings.kv_cache_gib, config.seed, self.settings.minibatches,
                                    train.ids[0, :64].tolist(), self.settings.probe_tolerance,
                                    check_every_push=True)  # the samples' log-probs enter the loss (TIS)
        self.tokenizer = load_tokenizer(get_model(config.data_model()))
        self.teacher: Teacher | None = None
        if self.settings.kd_weight > 0:
            self.teacher = load_teacher(Path(config.teacher), Path(config.student),  # type: ignore[arg-type]
                                        student.lm.config.vocab_size, config.attention, on, config.teacher_dtype)
        kl = self.settings.kl
        self.lora_reference = kl.beta > 0 and config.lora is not None and kl.reference is None
        self.reference: Teacher | None = None
        if kl.beta > 0 and not self.lora_reference:
            self.reference = load_teacher(Path(kl.reference or config.student), Path(config.student),
                                          student.lm.config.vocab_size, config.attention, on)
        self._rollouts: dict[int, list[Rollouts]] = {}  # step -> its micro-batches, in order
        self._next_step = 0

    def describe(self) -> str:
        s = self.settings
        rewards = " + ".join(f"{t.weight:g} {t.name}" + (" (gate)" if t.gate else "") for t in s.rewards)
        extra = (f"; KL to the reference beta {s.kl.beta:g} ({s.kl.estimator})" if s.kl.beta else "; no KL") + (
            f"; + {s.kd_weight:g} KL(teacher || student) on the samples" if s.kd_weight else "")
        return (f"grpo ({s.group_size} samples a prompt through vLLM, temperature {s.temperature:g}, up to "
                f"{s.new_tokens} tokens; rewards {rewards}; {s.advantage} advantages; {s.loss} loss, eps "
                f"{s.epsilon_low:g}/{s.epsilon_high:g}, {s.normalisation} normalisation{extra})")

    def close(self) -> None:
        self.policy.close()

    # -- a step's samples -------------------------------------------------------------------------------------

    def __call__(self, student: Student, batch: Batch, step: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not self._rollouts.get(step):
            self._generate(student, step)
        rollouts = self._rollouts[step].pop(0)
        self._next_step = step + 1
        return self._loss(student, rollouts)

    def _generate(self, student: Student, step: int) -> None:
        """Samples, rewards and advantages for steps step .. step + minibatches - 1 (this rank's micro-batches)."""
        s = self.settings
        started = time.monotonic()
        self.policy.sync(student, step)
        synced = time.monotonic()
        steps = range(step, step + s.minibatches)
        micros = [(t, m, self.sampler.indices(t, m, self.rank).tolist()) for t in steps
                  for m in range(self.config.grad_accum)]
        prompts = [self.prompts[r] for _, _, rows in micros for r in rows for _ in range(s.group_size)]
        seeds = [int(seeded_uniform(self.config.seed, "grpo", t, r, g) * 2**31)
                 for t, _, rows in micros for r in rows for g in range(s.group_size)]
        samples = self.policy.sample(prompts, s.new_tokens, s.temperature, seeds)
        sampled = time.monotonic()

        per_micro = len(micros[0][2]) * s.group_size
        built: dict[int, list[tuple[list[list[int]], list[tuple[list[int], list[float]]], torch.Tensor, dict]]] = {}
        for k, (t, _, _) in enumerate(micros):
            part = slice(k * per_micro, (k + 1) * per_micro)
            rewards, scores = self._rewards(prompts[part], samples[part])
            rewards = rewards.view(-1, s.group_size)  # [B, G]
            built.setdefault(t, []).append((prompts[part], samples[part], rewards, scores))
        for t, parts in built.items():
            self._rollouts[t] = self._prepare(student, parts)
        seconds = {"generate_s": sampled - synced, "sync_s": synced - started,
                   "score_s": time.monotonic() - sampled}
        for t in steps:  # timings per optimizer step: the generation's share
            for r in self._rollouts[t]:
                r.stats |= {k: v / s.minibatches for k, v in seconds.items()}

    def _rewards(self, prompts: list[list[int]], samples: list[tuple[list[int], list[float]]]
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        """Each sample's reward [N] and the mean score of each reward term."""
        s, eos = self.settings, self.policy.eos
        totals, scores = [], {t.name: 0.0 for t in s.rewards}
        texts: dict[tuple[int, ...], str] = {}
        for prompt, (tokens, _) in zip(prompts, samples, strict=True):
            key = tuple(prompt)
            if key not in texts:
                texts[key] = self.tokenizer.decode(prompt)
            finished = len(tokens) < s.new_tokens or (bool(tokens) and tokens[-1] == eos)
            completion = Completion(texts[key], self.tokenizer.decode([t for t in tokens if t != eos]), len(tokens),
                                    finished, s.new_tokens)
            total, parts = total_reward(s.rewards, completion)
            totals.append(total)
            for name, v in parts.items():
                scores[name] += v / len(prompts)
        return torch.tensor(totals, dtype=torch.float64), scores

    def _prepare(self, student: Student, parts: list) -> list[Rollouts]:
        """One step's micro-batches: KL-in-reward, advantages normalised over the step (all ranks), live groups."""
        s = self.settings
        prepared = []
        for prompts, samples, rewards, scores in parts:
            ids, labels = self._rows(prompts, samples)
            engine = torch.tensor([lp for _, lps in samples for lp in lps], dtype=torch.float32)
            old = kl = None
            if s.minibatches > 1 or (s.kl.beta > 0 and s.kl.estimator == "k1_reward"):
                old = self._logprobs(student, ids, labels)
            if s.kl.beta > 0 and s.kl.estimator == "k1_reward":
                reference = self._logprobs(student, ids, labels, reference=True)
                sequence = (labels != IGNORE_INDEX).nonzero()[:, 0] // (ids.shape[1] - 1)
                kl = k1_sequence(old, reference, sequence.cpu(), len(ids)).view_as(rewards)  # type: ignore[arg-type]
            shaped = rewards - s.kl.beta * kl if kl is not None else rewards
            if s.loss == "asymmetric":  # every group: V below the group's mean keeps the update an improvement
                live = torch.ones(len(rewards), dtype=torch.bool)
                advantages = shaped - shaped.mean(-1, keepdim=True) - s.asymmetric_offset
            else:
                live = live_groups(shaped)
                advantages = group_advantages(shaped, s.advantage, s.pass_k)
            prepared.append([ids, labels, engine, old, rewards, shaped, live, advantages, scores, kl])
        if s.normalise and s.loss == "clipped":
            values = torch.cat([p[7][p[6]].flatten() for p in prepared]).double()
            totals = all_sum(torch.tensor([values.numel(), values.sum(), values.pow(2).sum()], dtype=torch.float64,
                                          device=self.device)).tolist() if self.world > 1 else None
            for p in prepared:
                p[7] = normalise(p[7], p[6], totals)
        return [self._live(*p) for p in prepared]

    def _live(self, ids: torch.Tensor, labels: torch.Tensor, engine: torch.Tensor, old: torch.Tensor | None,
              rewards: torch.Tensor, shaped: torch.Tensor, live: torch.Tensor, advantages: torch.Tensor,
              scores: dict[str, float], kl: torch.Tensor | None) -> Rollouts:
        """The micro-batch cut to its live groups (at least one sequence stays, weighted 0, so every rank runs a
        forward and backward: FSDP2's collectives need all of them). With a KD term every group stays: a group
        whose rewards agree has nothing for the policy gradient but still the teacher's logits to learn from (the
        weak-student case: most groups all wrong)."""
        g = self.settings.group_size
        width = ids.shape[1] - 1
        keep = (live | (self.settings.kd_weight > 0)).repeat_interleave(g)  # [B*G]
        weight = 1.0
        if not keep.any():
            keep[0], weight = True, 0.0
        token_keep = keep.repeat_interleave(width)[(labels != IGNORE_INDEX).cpu()]  # sampled tokens kept
        lengths = (labels.view(-1, width) != IGNORE_INDEX).sum(-1).cpu()
        stats = {"reward_mean": rewards.mean().item(), "reward_std": rewards.std().item(),
                 "zero_std_groups": 1 - live_groups(shaped).float().mean().item(),
                 "abs_advantage": advantages.abs()[live].mean().item() if live.any() else 0.0,
                 "completion_tokens": lengths.float().mean().item(),
                 "unfinished": (lengths >= self.settings.new_tokens).float().mean().item(),
                 **{f"reward_{k}": v for k, v in scores.items()}}
        if kl is not None:
            stats["kl_ref_k1"] = kl.mean().item()
        labels = labels.view(-1, width)[keep.to(labels.device)].reshape(-1)
        return Rollouts(ids[keep.to(ids.device)], labels, advantages.flatten()[keep].float().to(self.device) * weight,
                        torch.arange(len(live)).repeat_interleave(g)[keep].to(self.device),
                        lengths[keep].to(self.device), engine[token_keep].to(self.device),
                        old[token_keep.to(old.device)] if old is not None else None, stats)

    def _rows(self, prompts: list[list[int]], samples: list[tuple[list[int], list[float]]]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """[S, W] prompt + completion ids (EOS-padded) and [S*(W-1)] labels on the completions."""
        ids, labels = completion_rows(prompts, [tokens for tokens, _ in samples], self.policy.eos)
        return ids.to(self.device), labels.to(self.device)

    @torch.no_grad()
    def _logprobs(self, student: Student, ids: torch.Tensor, labels: torch.Tensor, reference: bool = False
                  ) -> torch.Tensor:
        """[n] log-probs of the sampled tokens under the student now (pi_old) or the reference."""
        def score(hidden: torch.Tensor, head: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
            return token_terms(hidden, head, labels, self.settings.temperature, chunk=self.chunk)[0]

        if reference and self.reference is not None:
            hidden, head = self.reference(ids)
            return score(hidden, head, ids)
        if reference:  # LoRA: the student with its adapters off is the starting policy
            with adapters_disabled(student.lm):
                return student(ids, score)
        return student(ids, score)

    # -- the loss ---------------------------------------------------------------------------------------------

    def _loss(self, student: Student, r: Rollouts) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s = self.settings
        teacher = self.teacher(r.ids) if self.teacher is not None else (None, None)
        terms = student(r.ids, self._head_terms, labels=r.labels, teacher_hidden=teacher[0], teacher_head=teacher[1])
        logp, entropy, kd = terms  # [n] each
        width = r.ids.shape[1] - 1
        sequence = (r.labels != IGNORE_INDEX).nonzero()[:, 0] // width  # [n] each token's sequence
        advantage = r.advantages[sequence]
        old = r.old_logp if r.old_logp is not None else logp.detach()
        stats: dict[str, float] = {}
        if s.loss == "clipped":
            weights = truncated_is_weights(old, r.engine_logp, s.tis_cap)
            per_token, low, high = clipped_token_loss(logp, old, advantage, s.epsilon_low, s.epsilon_high, weights)
            stats |= {"clip_low": low.float().mean().item(), "clip_high": high.float().mean().item(),
                      "is_weight": weights.mean().item()}
        else:
            per_token = asymmetric_token_loss(logp, advantage)
        if s.kl.beta > 0 and s.kl.estimator == "k2_loss":
            reference = self._logprobs(student, r.ids, r.labels, reference=True)
            per_token = per_token + s.kl.beta * k2_tokens(logp, reference)
            stats["kl_ref_k3"] = k3_tokens(logp.detach(), reference).mean().item()
        if self.teacher is not None:
            per_token = per_token + s.kd_weight * kd
            stats["kd"] = kd.mean().item()
        seq_weight, units = sequence_weights(r.lengths, r.groups, s.normalisation)
        # a micro-batch with no advantage (and no KD term) trains nothing
        live = float(r.advantages.abs().sum() > 0 or s.loss != "clipped" or self.teacher is not None)
        loss = (per_token * seq_weight[sequence].to(per_token.dtype)).sum() / units * live
        stats |= {"entropy": entropy.mean().item(),
                  "engine_gap": (old - r.engine_logp).abs().mean().item(),  # same weights: engine vs trainer
                  "policy_drift": (logp.detach() - old).abs().mean().item(),  # weights moved since sampling
                  **r.stats}
        metrics = {f"batch_{k}": torch.tensor(v, dtype=torch.float64, device=self.device) for k, v in stats.items()}
        return loss, {**metrics, "tokens": torch.tensor(units * live, dtype=torch.float64, device=self.device)}

    def _head_terms(self, hidden: torch.Tensor, head: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor,
                    teacher_hidden: torch.Tensor | None, teacher_head: torch.Tensor | None) -> torch.Tensor:
        return token_terms(hidden, head, labels, self.settings.temperature, teacher_hidden, teacher_head, self.chunk)

    # -- held-out ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def validation(self, student: Student, batch: Batch) -> dict[str, torch.Tensor]:
        """Greedy answers to the held-out conversations' prompts through the engine (synced with the weights now),
        scored by the recipe's rewards: sums of the reward and of each term, and the count."""
        rows = len(batch.rows)
        labels = batch.labels.view(rows, -1)  # type: ignore[union-attr]
        targets = torch.cat([labels.new_zeros(rows, 1, dtype=torch.bool), labels != IGNORE_INDEX], 1).cpu()
        real = [r for r in range(rows) if targets[r].any()]  # padding rows hold no conversation
        sums = {"count": torch.tensor(float(len(real)), dtype=torch.float64)}
        self.policy.sync(student, self._next_step, force=True)  # on every rank: gathering the weights is collective
        if real:
            prompts = [batch.ids[r, : prompt_end(targets[r])].tolist() for r in real]
            outs = self.policy.generate(prompts, self.settings.new_tokens, 0.0, [0] * len(prompts))
            rewards, scores = self._rewards(prompts, [(o, []) for o in outs])
            sums["reward"] = rewards.sum().double()
            sums |= {f"reward_{k}": torch.tensor(v * len(real), dtype=torch.float64) for k, v in scores.items()}
        return {k: v.to(self.device) for k, v in sums.items()}
