"""Training objectives: small loss modules over the one loop in distill/train.py (same data, checkpoints, FSDP2).

An objective is built once per run from the run's config and data, then called per micro-batch:
`objective(student, batch, step) -> (loss, metrics)`: `loss` is the mean over the micro-batch's trained tokens and
`metrics` holds per-token means by name and their count under "tokens" (per-pair means and the pair count for
preference objectives, whose loss is a mean over pairs; groups for GRPO; names starting with "batch_" describe the
micro-batch itself and are averaged over micro-batches instead). The loop turns each mean back into a sum and
divides by the trained tokens of the whole step (every micro-batch and rank), so gradient accumulation equals one
big batch whatever the tokens per micro-batch. An objective may also offer `validation(student, batch)`: sums
over a held-out batch and their "count", which the evaluator reports as `val_<name>` means. Add one as a module
here and a name in `OBJECTIVES` and in `TrainSettings.objective`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from distill.components.models import Student, Teacher
from distill.config import TrainConfig
from distill.data import Batch
from distill.objectives.grpo import GroupPolicyOptimisation
from distill.objectives.kd import Distillation
from distill.objectives.on_policy import OnPolicyDistillation
from distill.objectives.online_preference import OnlinePreference
from distill.objectives.preference import PreferenceOptimisation
from distill.objectives.sft import SupervisedFineTuning


class Objective(Protocol):
    teacher: Teacher | None  # a live teacher the evaluator may reuse, if the objective holds one

    def describe(self) -> str: ...  # one line for the log: what the objective runs

    def __call__(self, student: Student, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def close(self) -> None: ...  # stop what it started (a rollout engine)


def preference(config: TrainConfig, *args: object, **kwargs: object) -> Objective:
    """GPO on the data's pairs, or on pairs the policy samples each step (`prefer.online`)."""
    kind = OnlinePreference if config.prefer.online is not None else PreferenceOptimisation
    return kind(config, *args, **kwargs)  # type: ignore[arg-type]


OBJECTIVES: dict[str, Callable[..., Objective]] = {"kd": Distillation, "gkd": OnPolicyDistillation,
                                                   "sft": SupervisedFineTuning, "prefer": preference,
                                                   "grpo": GroupPolicyOptimisation}
