"""Our own checks that run through the chat endpoint, so the server's tool-call and reasoning parsers are scored as
users meet them (lm-eval's chat model sends neither tools nor reasoning options).

A check sends its cases and scores each reply (0/1 per metric); `run_checks` turns the scores into
{metric: (mean, stderr)} and keeps every case's request, reply and scores for samples.jsonl.
"""

from __future__ import annotations

import json
import logging
import math
import re
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


# ---------------------------------------------------------------------------------------------------------------
# audio and image checks (suites `audio` and `image`): media made here, deterministically, never seen in training
# (other seeds than the training data's; held-out sentences and voices for speech)

EVAL_SEED = 1000
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen")


def says_number(answer: str, n: int) -> bool:
    words = set(re.findall(r"[a-z]+|\d+", answer.lower()))
    return str(n) in words or NUMBER_WORDS[n] in words


def _media_cases(limit: int | None, default: int) -> int:
    return default if limit is None else min(limit, default)


def _beep_check(client: httpx.Client, model: str, limit: int | None) -> tuple[list, list]:
    from distill.media_data import tone_item

    cases = []
    for i in range(_media_cases(limit, 24)):
        messages, answer = tone_item(i, EVAL_SEED)
        cases.append({"id": f"beeps-{i}", "expected": answer, "messages": messages,
                      "count": NUMBER_WORDS.index(answer.rstrip(".").lower())})

    def body(case: dict[str, Any]) -> dict[str, Any]:
        return {"model": model, "messages": case["messages"], "max_tokens": 16, "temperature": 0}

    return _ask_all(client, "beep count", cases, body,
                    lambda case, message: {"count_acc": float(says_number(message.get("content") or "",
                                                                           case["count"]))})


def _shape_check(client: httpx.Client, model: str, limit: int | None) -> tuple[list, list]:
    from distill.media_data import shape_item

    cases = []
    for i in range(_media_cases(limit, 24)):
        messages, answer = shape_item(i, EVAL_SEED)
        cases.append({"id": f"shape-{i}", "expected": answer, "messages": messages})

    def score(case: dict[str, Any], message: dict[str, Any]) -> dict[str, float]:
        _, colour, shape = case["expected"].rstrip(".").lower().split()
        said = set(re.findall(r"[a-z]+", (message.get("content") or "").lower()))
        return {"shape_acc": float(shape in said), "colour_acc": float(colour in said)}

    def body(case: dict[str, Any]) -> dict[str, Any]:
        return {"model": model, "messages": case["messages"], "max_tokens": 16, "temperature": 0}

    return _ask_all(client, "shape questions", cases, body, score)


def _digit_check(client: httpx.Client, model: str, limit: int | None) -> tuple[list, list]:
    """scikit-learn's real handwritten digits (UCI optdigits), the last 10% (a fixed slice), scaled up 4x."""
    import base64
    import io

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    start = len(digits.images) * 9 // 10
    cases = []
    for i in range(start, start + _media_cases(limit, 40)):
        pixels = (255 - digits.images[i] * 255 / 16).astype(np.uint8)  # dark ink on white
        buf = io.BytesIO()
        Image.fromarray(pixels).resize((32, 32), Image.NEAREST).convert("RGB").save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        cases.append({"id": f"digit-{i}", "expected": str(int(digits.target[i])), "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What digit is this?"}]}]})

    def body(case: dict[str, Any]) -> dict[str, Any]:
        return {"model": model, "messages": case["messages"], "max_tokens": 8, "temperature": 0}

    return _ask_all(client, "digit questions", cases, body,
                    lambda case, message: {"digit_acc": float(says_number(message.get("content") or "",
                                                                           int(case["expected"])))})


def _speech_cases(kind: str, count: int) -> list[dict[str, Any]]:
    """Spoken by espeak-ng and flite in the held-out voices (distill/speech/synth.py), as WAV bytes."""
    import io

    import numpy as np
    import soundfile

    from distill.speech import synth
    from distill.speech.text import is_held_out, sentences

    synth.check_tools()
    voices = [v for v in synth.voices() if v.key in synth.HELD_OUT_VOICES]
    if kind == "transcription":
        texts = [s for s in sentences(3000, EVAL_SEED) if is_held_out(s)][:count]
        expected = texts
    else:
        rng = np.random.default_rng(EVAL_SEED)
        pairs = [(int(a), int(b)) for a, b in rng.integers(1, 10, (count, 2))]
        texts = [f"what is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}" for a, b in pairs]
        expected = [str(a + b) for a, b in pairs]
    cases = []
    for i, (text, answer) in enumerate(zip(texts, expected, strict=True)):
        rng = np.random.default_rng([EVAL_SEED, i])
        samples = synth.degrade(synth.speak(text, voices[i % len(voices)], rng), rng)
        buf = io.BytesIO()
        soundfile.write(buf, samples, synth.RATE, format="WAV")
        cases.append({"id": f"{kind}-{i}", "expected": answer, "text": text, "wav": buf.getvalue()})
    return cases


def _transcription_check(client: httpx.Client, model: str, limit: int | None) -> tuple[list, list]:
    from distill.speech.wer import error_rates

    scores, records = [], []
    for case in tqdm(_speech_cases("transcription", _media_cases(limit, 40)), desc="transcription", unit="clip"):
        r = client.post("/v1/audio/transcriptions", data={"model": model, "language": "en"},
                        files={"file": ("clip.wav", case["wav"])})
        if r.status_code != 200:
            raise RuntimeError(f"transcription request failed ({r.status_code}): {r.text[:300]}")
        hyp = r.json()["text"]
        rates = error_rates([case["expected"]], [hyp])
        s = {"wer": rates["wer"], "cer": rates["cer"], "exact": float(rates["wer"] == 0)}
        scores.append(s)
        records.append({"id": case["id"], "expected": case["expected"], "message": {"content": hyp}, "scores": s})
    return scores, records


def _spoken_qa_check(client: httpx.Client, model: str, limit: int | None) -> tuple[list, list]:
    import base64

    cases = _speech_cases("spoken_qa", _media_cases(limit, 24))

    def body(case: dict[str, Any]) -> dict[str, Any]:
        audio = {"data": base64.b64encode(case["wav"]).decode(), "format": "wav"}
        return {"model": model, "max_tokens": 16, "temperature": 0, "messages": [
            {"role": "user", "content": [{"type": "input_audio", "input_audio": audio},
                                         {"type": "text", "text": "Answer the spoken question with a number."}]}]}

    def clean(case: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in case.items() if k != "wav"}

    scores, records = _ask_all(client, "spoken questions", cases, body,
                               lambda case, message: {"answer_acc": float(says_number(message.get("content") or "",
                                                                                        int(case["expected"])))})
    return scores, [clean(r) for r in records]


CHECKS |= {
    "beep_count": _beep_check,
    "shape_qa": _shape_check,
    "digit_qa": _digit_check,
    "transcription": _transcription_check,
    "spoken_qa": _spoken_qa_check,
}
