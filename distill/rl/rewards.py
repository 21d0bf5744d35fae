"""Rewards: named functions a recipe lists (`grpo.rewards`), each scoring one sampled completion.

Magistral's shape (arXiv 2506.10910): a format check that gates everything (a completion in the wrong format scores 0
and is not graded further; in the right one it earns its weight, 0.1), correctness on the answer with the thinking
stripped (0.9), and DAPO's soft overlong penalty (0 up to `max_tokens - cache_tokens`, then down linearly to -weight
at `max_tokens`, -weight for a completion that never ended). The task checks read the question from the prompt text
itself (distill/verifiers.py): no side channel from the data, so any prompt source works.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator

from distill.verifiers import VERIFIERS
from serve.formats import REASONING_FORMATS

_THINK = REASONING_FORMATS["think-tags"]


@dataclass(frozen=True)
class Completion:
    prompt: str  # the rendered prompt text (chat template included)
    text: str  # the sampled completion, end-of-sequence token left out
    tokens: int  # sampled tokens, end-of-sequence included
    finished: bool  # ended by end-of-sequence (not cut at max_tokens)
    max_tokens: int

    @property
    def answer(self) -> str:
        """What is graded: the text after the thinking when there is a closed thinking section, else all of it."""
        return self.text.split(_THINK.end)[-1] if _THINK.end in self.text else self.text


def think_format(c: Completion) -> float:
    """1 when the completion is `<think>` thinking `</think>` answer: each marker exactly once, the thinking first,
    neither part empty, and the completion ended by itself (a cut one has no complete answer)."""
    text = c.text.lstrip()
    if not c.finished or not text.startswith(_THINK.start):
        return 0.0
    if text.count(_THINK.start) != 1 or text.count(_THINK.end) != 1:
        return 0.0
    thinking, answer = text[len(_THINK.start):].split(_THINK.end)
    return 1.0 if thinking.strip() and answer.strip() else 0.0


def arithmetic(c: Completion) -> float:
    """1 when the answer's first number is the prompt's arithmetic question's answer (0 for other prompts)."""
    return VERIFIERS["arithmetic"](c.prompt, c.answer) or 0.0


def length(c: Completion, cache_tokens: int) -> float:
    """DAPO's soft overlong penalty in [-1, 0]: 0 up to max_tokens - cache_tokens, then linear down to -1."""
    if not c.finished:
        return -1.0
    over = c.tokens - (c.max_tokens - cache_tokens)
    return -min(1.0, max(0.0, over / cache_tokens))


_CODE_BLOCK = re.compile(r"```(?:python|py)?\n(.*?)```", re.S)
_TESTS = re.compile(r"^\s*(assert .+)$", re.M)


def code(c: Completion) -> float:
    """1 when the answer's code (its first ```python block, or all of it) passes the prompt's `assert` lines
    (MBPP-style prompts list their tests), run in the evaluation sandbox (no network, time and memory limits)."""
    from eval.sandbox import Limits, run_python

    tests = _TESTS.findall(c.prompt)
    if not tests:
        return 0.0
    block = _CODE_BLOCK.search(c.answer)
    program = (block.group(1) if block else c.answer) + "\n\n" + "\n".join(tests) + "\n"
    return 1.0 if run_python(program, Limits(timeout_s=5.0)).passed else 0.0


REWARDS: dict[str, Callable[..., float]] = {"think_format": think_format, "arithmetic": arithmetic,
                                            "length": length, "code": code}


class RewardTerm(BaseModel):
    """One named reward in a recipe; the completion's reward is the weighted sum of its terms."""
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description=f"one of {', '.join(REWARDS)}")
    weight: float = Field(1.0, description="its weight in the sum")
    gate: bool = Field(False, description="a score of 0 here makes the whole reward 0 (Magistral's format rule)")
    cache_tokens: int | None = Field(None, ge=1, description="length only: the soft zone before max tokens")

    @model_validator(mode="after")
    def _check(self) -> RewardTerm:
        if self.name not in REWARDS:
            raise ValueError(f"unknown reward {self.name!r}; known: {', '.join(REWARDS)}")
        if (self.name == "length") != (self.cache_tokens is not None):
            raise ValueError("cache_tokens is length's setting, and length needs it" if self.name == "length"
                             else f"cache_tokens is only for the length reward, not {self.name}")
        return self

    def score(self, c: Completion) -> float:
        if self.name == "length":
            return REWARDS["length"](c, min(self.cache_tokens, c.max_tokens))  # type: ignore[type-var]
        return REWARDS[self.name](c)


def total_reward(terms: list[RewardTerm], c: Completion) -> tuple[float, dict[str, float]]:
    """(the completion's reward, each term's raw score by name)."""
    scores = {t.name: t.score(c) for t in terms}
    if any(t.gate and scores[t.name] == 0 for t in terms):
        return 0.0, scores
    return sum(t.weight * scores[t.name] for t in terms), scores
