"""Training objectives: small loss modules over the one loop in distill/train.py (same data, checkpoints, FSDP2).

An objective is built once per run from the run's config and data, then called per micro-batch:
`objective(student, rows, ids, step) -> (loss, metrics)`, where `metrics` holds per-token means by name and their count
under "tokens" (the loop weights and sums them across micro-batches and ranks). Add one as a module here and a
name in `OBJECTIVES` and in `TrainSettings.objective`.
"""

from __future__ import annotations

from typing import Protocol

import torch

from distill.components.models import Student, Teacher
from distill.objectives.kd import Distillation
from distill.objectives.on_policy import OnPolicyDistillation


class Objective(Protocol):
    teacher: Teacher | None  # a live teacher the evaluator may reuse, if the objective holds one

    def describe(self) -> str: ...  # one line for the log: what the objective runs

    def __call__(self, student: Student, rows: torch.Tensor, ids: torch.Tensor, step: int
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def close(self) -> None: ...  # stop what it started (a rollout engine)


OBJECTIVES: dict[str, type[Objective]] = {"kd": Distillation, "gkd": OnPolicyDistillation}
