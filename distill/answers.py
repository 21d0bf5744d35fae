"""Chat distillation data: the teacher answers a file of prompts through an OpenAI-compatible server.

`python -m distill answers PROMPTS.jsonl OUT.jsonl --teacher NAME` starts our server (vLLM's engine) for the
teacher, asks it for every prompt concurrently and writes one `{"messages": [..., assistant answer]}` line per
prompt, which the `files` data source renders with the chat template (`distill/data.py`). `--endpoint URL` uses a
server that is already running instead (ours or vLLM's own).

Input lines are `{"messages": [...]}` (ending with a user turn) or `{"prompt": "text"}`. Answers go to
`OUT.jsonl.partial` as they arrive, tagged with the prompt's line number, so an interrupted run picks up where it
stopped; the finished file is written in prompt order and renamed into place. A reasoning model's thinking (the
server's `reasoning`, or `reasoning_content` from older servers) is kept as the answer's `reasoning`, which the data
source writes back between the model's thinking markers, so students learn to think as their teacher does.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from distill.data import DataError, jsonl_records


class AnswerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    concurrency: int = Field(8, ge=1)
    timeout_s: float = Field(600, gt=0)


class EndpointError(RuntimeError):
    pass


def read_prompts(path: Path) -> list[list[dict[str, Any]]]:
    """Each line as a message list; a line that is neither form is an error naming the file and line."""
    if not path.is_file():
        raise DataError(f"prompts file {path} does not exist")
    prompts = []
    for n, record in jsonl_records(path):
        if isinstance(record.get("prompt"), str):
            messages = [{"role": "user", "content": record["prompt"]}]
        elif isinstance(record.get("messages"), list) and record["messages"]:
            messages = record["messages"]
            last = messages[-1]
            if not isinstance(last, dict) or last.get("role") != "user":
                raise DataError(f"{path}:{n}: the last message must be the user's turn for the teacher to answer")
        else:
            raise DataError(f"{path}:{n}: a line needs a 'prompt' string or a non-empty 'messages' list")
        prompts.append(messages)
    if not prompts:
        raise DataError(f"{path} holds no prompts")
    return prompts


def _done(partial: Path) -> dict[int, dict[str, Any]]:
    """Answers already written by an earlier, interrupted run (a torn last line is ignored)."""
    done: dict[int, dict[str, Any]] = {}
    if partial.is_file():
        for line in partial.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[int(record["index"])] = record
    return done


async def _answer_all(base_url: str, api_key: str | None, model: str, prompts: list[list[dict[str, Any]]],
                      settings: AnswerSettings, partial: Path, progress: bool) -> dict[int, dict[str, Any]]:
    done = _done(partial)
    todo = [i for i in range(len(prompts)) if i not in done]
    limit = asyncio.Semaphore(settings.concurrency)
    bar = tqdm(total=len(prompts), initial=len(done), desc="answers", unit="prompt", disable=not progress)
    with partial.open("a", encoding="utf-8") as out:
        async with httpx.AsyncClient(base_url=base_url, headers=auth_headers(api_key),
                                     timeout=settings.timeout_s) as client:

            async def one(i: int) -> None:
                body = {"model": model, "messages": prompts[i], "max_tokens": settings.max_tokens,
                        "temperature": settings.temperature, "top_p": settings.top_p, "seed": settings.seed + i}
                async with limit:
                    try:
                        r = await client.post("/v1/chat/completions", json=body)
                    except httpx.HTTPError as e:
                        raise EndpointError(f"{base_url}: {type(e).__name__}: {e}") from e
                if r.status_code != 200:
                    raise EndpointError(f"{base_url} answered {r.status_code} to prompt {i + 1}: {r.text[:300]}")
                choice = r.json()["choices"][0]
                message = choice["message"]
                record = {"index": i, "answer": message.get("content") or "", "finish_reason": choice["finish_reason"]}
                reasoning = message.get("reasoning") or message.get("reasoning_content")
                if reasoning:  # a reasoning model's thinking, split off by the server: kept
                    record["reasoning"] = reasoning
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()
                done[i] = record
                bar.update()

            await asyncio.gather(*(one(i) for i in todo))
    bar.close()
    return done


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def served_models(base_url: str, api_key: str | None) -> list[str]:
    """The models a server serves (`/v1/models`); also checks that the endpoint is reachable."""
    try:
        r = httpx.get(f"{base_url}/v1/models", headers=auth_headers(api_key), timeout=30)
    except httpx.HTTPError as e:
        raise EndpointError(f"cannot reach {base_url}: {e}") from e
    if r.status_code != 200:
        raise EndpointError(f"{base_url}/v1/models answered {r.status_code}: {r.text[:200]}")
    return [m["id"] for m in r.json()["data"]]


def served_model(base_url: str, api_key: str | None) -> str:
    """The one model a server serves."""
    return served_models(base_url, api_key)[0]


def write_answers(prompts_path: Path, out: Path, base_url: str, api_key: str | None = None,
                  settings: AnswerSettings | None = None, progress: bool = True) -> dict[str, int]:
    """Answer every prompt with the served model; returns counts (answers, truncated at max_tokens)."""
    settings = settings or AnswerSettings()
    prompts = read_prompts(prompts_path)
    model = served_model(base_url, api_key)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    done = asyncio.run(_answer_all(base_url, api_key, model, prompts, settings, partial, progress))
    tmp = out.with_name(f".{out.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for i, messages in enumerate(prompts):
            record = done[i]
            answer = {"role": "assistant", "content": record["answer"]}
            if record.get("reasoning"):
                answer["reasoning"] = record["reasoning"]
            line = {"messages": [*messages, answer],
                    "teacher": model, "finish_reason": record["finish_reason"]}
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    partial.unlink()
    truncated = sum(1 for r in done.values() if r["finish_reason"] == "length")
    return {"answers": len(prompts), "truncated": truncated}


def answer_with_teacher(prompts_path: Path, out: Path, teacher: str, settings: AnswerSettings,
                        server_args: list[str] | None = None, progress: bool = True) -> dict[str, int]:
    """Start our server for `teacher` on a free local port, answer, stop it."""
    from models.prepare import prepare
    from models.registry import get_model
    from serve.launch import ServerStartError, served

    read_prompts(prompts_path)  # bad input fails before a server starts
    prepare(get_model(teacher))
    log_path = out.with_name(out.name + ".server.log")
    args = ["--max-pending-requests", str(max(128, settings.concurrency)), *(server_args or [])]
    print(f"answers: starting the server for {teacher} (log: {log_path})", file=sys.stderr)
    try:
        with served(teacher, args, log_path) as server:
            return write_answers(prompts_path, out, server.url, None, settings, progress)
    except ServerStartError as e:
        last = str(e).strip().splitlines()[-1:]
        raise EndpointError(f"the server for {teacher} did not start ({' '.join(last)}); log: {log_path}") from e
