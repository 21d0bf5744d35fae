"""Arithmetic with verifiable answers, generated: the task post-training can measure on CPU.

SmolLM2-135M answers 1-digit sums about a third of the time (bigbench arithmetic 1-digit 0.32, docs/eval), so there is
signal to sharpen, and a right answer is checkable by a regex. Operand pairs are split between training and held-out
by a seeded hash of the problem, so a held-out score measures problems never trained on. Questions use bigbench's
wording ("What is 7 plus 2?"); the answer is the number alone.

`python -m distill arithmetic OUT_DIR` writes `sft-train.jsonl` / `sft-heldout.jsonl` (conversations),
`prefer-train.jsonl` / `prefer-heldout.jsonl` (the right answer chosen over a plausible wrong one) and
`heldout.jsonl` (problems with answers, for scoring).
"""

from __future__ import annotations

import hashlib
import json
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from models.checkpoint import write_text_atomic

Split = Literal["train", "heldout"]
OPERATIONS: dict[str, Callable[[int, int], int]] = {"plus": operator.add, "minus": operator.sub,
                                                     "times": operator.mul}
_NUMBER = re.compile(r"-?\d+")
THINK_END = "</think>"  # serve/formats.py's think-tags end marker (not imported: this module stays light)


@dataclass(frozen=True)
class Problem:
    a: int
    op: str
    b: int

    @property
    def question(self) -> str:
        return f"What is {self.a} {self.op} {self.b}?"

    @property
    def answer(self) -> int:
        return OPERATIONS[self.op](self.a, self.b)

    def conversation(self, answer: str | None = None) -> dict:
        """A chat record: the question, then `answer` (default: the right one)."""
        return {"messages": [{"role": "user", "content": self.question},
                             {"role": "assistant", "content": str(self.answer) if answer is None else answer}]}


def wrong_answer(problem: Problem, seed: int = 0) -> int:
    """A plausible mistake, fixed by (seed, problem): off by one or two, or another operation's result (the slips
    a small model makes: "7 times 2" -> 9)."""
    others = {OPERATIONS[op](problem.a, problem.b) for op in OPERATIONS if op != problem.op}
    candidates = sorted({problem.answer + d for d in (-2, -1, 1, 2)} | others - {problem.answer})
    digest = hashlib.sha256(f"wrong:{seed}:{problem.a}:{problem.op}:{problem.b}".encode()).digest()
    return candidates[int.from_bytes(digest[:8], "big") % len(candidates)]


def preference_pair(problem: Problem, seed: int = 0) -> dict:
    """A preference record (distill/pair_data.py): the right answer chosen over a wrong one."""
    return {"prompt": [{"role": "user", "content": problem.question}], "chosen": str(problem.answer),
            "rejected": str(wrong_answer(problem, seed))}


def split_of(problem: Problem, seed: int = 0, heldout_share: float = 0.5) -> Split:
    digest = hashlib.sha256(f"{seed}:{problem.a}:{problem.op}:{problem.b}".encode()).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") / 2**64 < heldout_share else "train"


def problems(split: Split, digits: int = 1, seed: int = 0, ops: tuple[str, ...] = tuple(OPERATIONS)
             ) -> list[Problem]:
    """Every problem with operands of `digits` digits (0-9 for one digit) in `split`, in a fixed order."""
    top = 10**digits
    low = 0 if digits == 1 else 10 ** (digits - 1)
    every = [Problem(a, op, b) for op in ops for a in range(low, top) for b in range(low, top)]
    return [p for p in every if split_of(p, seed) == split]


def first_number(text: str) -> int | None:
    """The first integer in a completion (as lm-eval's arithmetic filter reads answers)."""
    found = _NUMBER.search(text)
    return int(found.group()) if found else None


def correct(problem: Problem, completion: str) -> bool:
    """The strict check (the task's answer format): the completion's first number is the answer."""
    return first_number(completion) == problem.answer


def answered_somewhere(problem: Problem, completion: str) -> bool:
    """The lenient check, for models that answer in a sentence ("7 plus 2 equals 9."): the last number of the
    completion's first line is the answer."""
    numbers = _NUMBER.findall(completion.strip().split("\n")[0])
    return bool(numbers) and int(numbers[-1]) == problem.answer


def write_task(out: Path, digits: int = 1, seed: int = 0) -> dict[str, int]:
    """The SFT conversations and preference pairs of each split and the held-out problems; returns counts per
    file."""
    counts = {}
    for split in ("train", "heldout"):
        chosen = problems(split, digits, seed)  # type: ignore[arg-type]
        for kind, record in (("sft", Problem.conversation), ("prefer", lambda p: preference_pair(p, seed))):
            name = f"{kind}-{split}.jsonl"
            write_text_atomic(out / name, "".join(json.dumps(record(p)) + "\n" for p in chosen))
            counts[name] = len(chosen)
    held = problems("heldout", digits, seed)
    write_text_atomic(out / "heldout.jsonl", "".join(
        json.dumps({"question": p.question, "answer": p.answer, "a": p.a, "op": p.op, "b": p.b}) + "\n"
        for p in held))
    counts["heldout.jsonl"] = len(held)
    return counts


def accuracy(model: str | Path, chosen: list[Problem], batch_size: int = 32, max_new_tokens: int = 16
             ) -> dict[str, float]:
    """Shares of `chosen` answered right, greedy, each question alone in a chat rendered as the server renders it
    (a reasoning model's answer after its thinking):
    `strict` (the first number is the answer) and `lenient` (the last number of the first line is). A quick check
    for benchmarks; the served model gives the same answers through `python -m eval`."""
    import torch

    from distill.model_io import load_model
    from models.prepare import prepare
    from models.registry import get_model
    from models.tokenizers import load_tokenizer

    spec = get_model(str(model))
    lm = load_model(prepare(spec)).eval()
    tok = load_tokenizer(spec)
    strict = lenient = 0
    for start in range(0, len(chosen), batch_size):
        part = chosen[start:start + batch_size]
        prompts = [tok.encode_chat([{"role": "user", "content": p.question}]) for p in part]
        width = max(map(len, prompts))
        ids = torch.tensor([[tok.eos_token_id] * (width - len(x)) + x for x in prompts])  # left-padded
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in prompts])
        with torch.no_grad():
            out = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=tok.eos_token_id)
        for p, o in zip(part, out, strict=True):
            generated = o[width:].tolist()
            text = tok.decode(generated[: generated.index(tok.eos_token_id)] if tok.eos_token_id in generated
                              else generated)
            text = text.split(THINK_END)[-1]  # a reasoning model is graded on its answer, not its thinking
            strict += correct(p, text)
            lenient += answered_somewhere(p, text)
    return {"strict": strict / len(chosen), "lenient": lenient / len(chosen)}
