"""Our own checks that run through the chat endpoint, so the server's tool-call and reasoning parsers are scored as
users meet them (lm-eval's chat model sends neither tools nor reasoning options).

A check sends its cases and scores each reply (0/1 per metric); `run_checks` turns the scores into
{metric: (mean, stderr)} and keeps every case's request, reply and scores for samples.jsonl.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from typing import Any

import httpx
import jsonschema
from tqdm import tqdm

from eval.suites import TASKS_DIR
from serve.formats import ALL_MARKERS

log = logging.getLogger(__name__)

MARKERS = ALL_MARKERS  # no marker of any format may be left in the thinking or the answer


def _chat(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post("/v1/chat/completions", json=body)
    if r.status_code != 200:
        raise RuntimeError(f"chat request failed ({r.status_code}): {r.text[:300]}")
    return r.json()


def _same(expected: Any, actual: Any) -> bool:
    """Arguments match: numbers by value (3 == 3.0), strings ignoring case and outer spaces, objects key by key."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and expected.keys() == actual.keys() and all(
            _same(v, actual[k]) for k, v in expected.items())
    if isinstance(expected, bool) or isinstance(actual, bool):
        return expected == actual
    if isinstance(expected, int | float):
        return isinstance(actual, int | float) and math.isclose(expected, actual, rel_tol=1e-9)
    if isinstance(expected, str):
        return isinstance(actual, str) and expected.strip().casefold() == actual.strip().casefold()
    return expected == actual


def score_tool_call(case: dict[str, Any], tools: dict[str, Any], message: dict[str, Any]) -> dict[str, float]:
    """Name right, arguments right (only the arguments the case expects, none extra), arguments valid per schema."""
    calls = message.get("tool_calls") or []
    expected = case["expected"]
    scores = {"decision_acc": float(bool(calls) == (expected is not None))}
    if expected is None:
        return scores
    call = calls[0]["function"] if calls else {"name": None, "arguments": "null"}
    try:
        args = json.loads(call["arguments"])
    except (json.JSONDecodeError, TypeError):
        args = None
    schema = tools.get(call["name"], {}).get("parameters")
    valid = schema is not None and isinstance(args, dict)
    if valid:
        try:
            jsonschema.validate(args, schema)
        except jsonschema.ValidationError:
            valid = False
    scores |= {"name_acc": float(call["name"] == expected["name"]),
               "args_acc": float(call["name"] == expected["name"] and _same(expected["arguments"], args)),
               "schema_valid": float(valid)}
    return scores


def score_reasoning(case: dict[str, Any], message: dict[str, Any]) -> dict[str, float]:
    thinking = message.get("reasoning") or message.get("reasoning_content") or ""
    answer = message.get("content") or ""
    clean = not any(m in text for m in MARKERS for text in (thinking, answer))
    present, answered = bool(thinking.strip()), bool(answer.strip())
    return {"format_ok": float(present and answered and clean), "thinking_present": float(present),
            "answer_after": float(answered), "no_marker_leak": float(clean),
            "answer_correct": float(case["expected"].casefold() in answer.casefold())}


Check = Callable[[httpx.Client, str, int | None], tuple[list, list]]


def _ask_all(client: httpx.Client, desc: str, cases: list[dict[str, Any]],
             body: Callable[[dict[str, Any]], dict[str, Any]],
             score: Callable[[dict[str, Any], dict[str, Any]], dict[str, float]]) -> tuple[list, list]:
    """One chat request per case; its reply scored, and kept with the case for samples.jsonl."""
    scores, records = [], []
    for case in tqdm(cases, desc=desc, unit="case"):
        message = _chat(client, body(case))["choices"][0]["message"]
        s = score(case, message)
        scores.append(s)
        records.append({"id": case["id"], "expected": case["expected"], "message": message, "scores": s})
    return scores, records


def _tool_check(tool_choice: str) -> Check:
    def run(client: httpx.Client, model: str, limit: int | None) -> tuple[list, list]:
        data = json.loads((TASKS_DIR / "tool_calls.json").read_text())
        cases = [c for c in data["cases"] if tool_choice == "auto" or c["expected"] is not None][:limit]

        def body(case: dict[str, Any]) -> dict[str, Any]:
            tools = [{"type": "function", "function": {"name": n, **data["tools"][n]}} for n in case["tools"]]
            return {"model": model, "messages": [{"role": "user", "content": case["request"]}], "tools": tools,
                    "tool_choice": tool_choice, "max_tokens": 128, "temperature": 0}

        return _ask_all(client, f"tool calls ({tool_choice})", cases, body,
                        lambda case, message: score_tool_call(case, data["tools"], message))

    return run


def _reasoning_check(client: httpx.Client, model: str, limit: int | None) -> tuple[list, list]:
    data = json.loads((TASKS_DIR / "reasoning.json").read_text())

    def body(case: dict[str, Any]) -> dict[str, Any]:
        return {"model": model, "messages": [{"role": "user", "content": case["request"]}], "temperature": 0,
                "max_reasoning_tokens": data["max_reasoning_tokens"], "max_tokens": data["max_tokens"]}

    return _ask_all(client, "reasoning format", data["cases"][:limit], body, score_reasoning)


CHECKS: dict[str, Check] = {
    "tool_calls_required": _tool_check("required"),
    "tool_calls_auto": _tool_check("auto"),
    "reasoning_format": _reasoning_check,
}


def mean_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def run_checks(names: tuple[str, ...], base_url: str, model: str, api_key: str | None,
               limit: int | None) -> dict[str, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    out: dict[str, dict[str, Any]] = {}
    with httpx.Client(base_url=base_url, headers=headers, timeout=600) as client:
        for name in names:
            scores, records = CHECKS[name](client, model, limit)
            keys = dict.fromkeys(k for s in scores for k in s)  # every metric, in first-seen order
            metrics = {m: mean_stderr([s[m] for s in scores if m in s]) for m in keys}
            out[name] = {"metrics": metrics, "n": len(scores), "samples": records}
            log.info("%s: %s", name, {m: round(v[0], 3) for m, v in metrics.items()})
    return out
