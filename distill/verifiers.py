"""Verifiers: reward functions that check a completion against its prompt, by name (recipes name them).

A verifier reads the question from the rendered prompt text itself (no side channel from the data), and returns 1.0
for a right answer, 0.0 for a wrong one, None when the prompt is not one it can check. The online preference
objective turns two samples' rewards into a label; GRPO (next) uses them as rewards.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from distill.arithmetic import OPERATIONS, Problem, correct

_QUESTION = re.compile(rf"What is (-?\d+) ({'|'.join(OPERATIONS)}) (-?\d+)\?")


def arithmetic(prompt: str, completion: str) -> float | None:
    """The last arithmetic question of the prompt, answered by the completion's first number (the task's format)."""
    found = _QUESTION.findall(prompt)
    if not found:
        return None
    a, op, b = found[-1]
    return 1.0 if correct(Problem(int(a), op, int(b)), completion) else 0.0


VERIFIERS: dict[str, Callable[[str, str], float | None]] = {"arithmetic": arithmetic}
