"""HumanEval scoring: a completion passes when the problem's own tests run clean in the sandbox."""

from __future__ import annotations

import secrets
from typing import Any

from eval.sandbox import Limits, SandboxResult, run_python

LIMITS = Limits(timeout_s=10.0, memory_bytes=1 << 30)


def check_completion(problem: dict[str, Any], completion: str, limits: Limits = LIMITS) -> SandboxResult:
    """Prompt + completion + the problem's `check` function, run once. A random line printed only after `check`
    returns tells a real pass from a program that exits 0 early (`sys.exit(0)`, `os._exit(0)`)."""
    nonce = secrets.token_hex(16)
    program = (f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
               f"print('passed {nonce}')\n")
    result = run_python(program, limits)
    if result.passed and f"passed {nonce}" not in result.output:
        return SandboxResult("failed", result.returncode, result.output, result.seconds)
    return result


def humaneval_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """lm-eval `process_results` hook: one greedy sample per problem, so pass@1 is the pass rate."""
    return {"pass_at_1": float(check_completion(doc, results[0]).passed)}
