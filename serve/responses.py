"""Response and chunk shapes of the OpenAI API: chat and completions, whole or streamed (SSE), with logprobs and
usage. Routes hand these functions the engine's output (chat: parsed pieces; completions: engine outputs per prompt);
nothing else in the server builds response JSON.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi.responses import JSONResponse, Response

from serve.chat import ChatPlan, Piece
from serve.engine import ChoiceDelta, EngineOutput, TokenLogprob
from serve.parsers import ParsedDelta, ParsedMessage
from serve.protocol import CompletionRequest
from serve.serving import merge

T = TypeVar("T")


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def usage(num_prompt: int, num_completion: int) -> dict[str, int]:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_completion,
            "total_tokens": num_prompt + num_completion}


def engine_finish_reason(reason: str) -> str:
    """An aborted choice (a segment the server ended) reads as "stop" to the client."""
    return reason if reason in ("stop", "length") else "stop" if reason == "abort" else reason


# ---------------------------------------------------------------------------------------------------------------
# logprobs


def chat_logprobs(items: list[TokenLogprob]) -> dict[str, Any]:
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [entry(t.token, t.logprob) | {"top_logprobs": [entry(s, lp) for _, s, lp in t.top]}
                        for t in items]}


def token_name(token_id: int, text: str, as_ids: bool) -> str:
    """A token as the client asked for it: its text, or vLLM's "token_id:N" (`return_tokens_as_token_ids`), which
    stays unambiguous where several ids decode to the same text (a distillation client needs the ids)."""
    return f"token_id:{token_id}" if as_ids else text


def completion_logprobs(items: list[TokenLogprob | None], offset: int, as_ids: bool = False) -> dict[str, Any]:
    """OpenAI's legacy shape: parallel lists of tokens, logprobs, top alternatives and text offsets."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for t in items:
        if t is None:  # first prompt token: nothing to condition on
            continue
        tokens.append(token_name(t.token_id, t.token, as_ids))
        token_logprobs.append(t.logprob)
        top_logprobs.append({token_name(i, s, as_ids): lp for i, s, lp in t.top})
        text_offset.append(offset)
        offset += len(t.token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}


def echo_logprobs(prompt_ids: list[int], prompt_lp: list[TokenLogprob | None] | None,
                  decode: Callable[[list[int]], str], as_ids: bool = False) -> dict[str, Any]:
    """Prompt tokens in OpenAI's legacy shape, where the first token's logprob is null."""
    first = decode(prompt_ids[:1])
    rest = completion_logprobs(prompt_lp or [], len(first), as_ids)
    return {"tokens": [token_name(prompt_ids[0], first, as_ids)] + rest["tokens"],
            "token_logprobs": [None] + rest["token_logprobs"], "top_logprobs": [None] + rest["top_logprobs"],
            "text_offset": [0] + rest["text_offset"]}


# ---------------------------------------------------------------------------------------------------------------
# chat


def chat_finish_reason(plan: ChatPlan, engine_finish: str, has_calls: bool) -> str:
    if engine_finish == "stop" and has_calls and not plan.named_choice:
        return "tool_calls"  # OpenAI ends a named choice with "stop"
    return engine_finish


def _keep_call(plan: ChatPlan, index: int) -> bool:
    return plan.parallel_tool_calls or index == 0


def message_json(plan: ChatPlan, m: ParsedMessage, reasoning_content: bool) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": m.content}
    if plan.include_reasoning and m.reasoning is not None:
        msg["reasoning"] = m.reasoning
        if reasoning_content:
            msg["reasoning_content"] = m.reasoning
    calls = [c for k, c in enumerate(m.tool_calls) if _keep_call(plan, k)]
    if calls:
        msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                             for c in calls]
    return msg


def delta_json(plan: ChatPlan, d: ParsedDelta, reasoning_content: bool) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if d.reasoning and plan.include_reasoning:
        delta["reasoning"] = d.reasoning
        if reasoning_content:
            delta["reasoning_content"] = d.reasoning
    if d.content:
        delta["content"] = d.content
    calls = []
    for c in d.tool_calls:
        if not _keep_call(plan, c.index):
            continue
        if c.id is not None:
            calls.append({"index": c.index, "id": c.id, "type": "function",
                          "function": {"name": c.name, "arguments": c.arguments}})
        else:
            calls.append({"index": c.index, "function": {"arguments": c.arguments}})
    if calls:
        delta["tool_calls"] = calls
    return delta


@dataclass(frozen=True)
class ChatShape:
    """What a chat response needs besides the pieces."""

    plan: ChatPlan
    head: dict[str, Any]  # id, created, model
    n: int
    num_prompt: int
    logprobs: bool
    reasoning_content: bool  # also send reasoning as `reasoning_content`


async def chat_full(pieces: AsyncIterator[Piece], shape: ChatShape) -> Response:
    messages = [ParsedMessage() for _ in range(shape.n)]
    lps: list[list[TokenLogprob]] = [[] for _ in range(shape.n)]
    finishes = ["stop"] * shape.n
    tokens = 0
    async for p in pieces:
        messages[p.index].add(p.parsed)
        lps[p.index] += p.logprobs
        tokens += p.num_tokens
        if p.finish_reason is not None:
            finishes[p.index] = p.finish_reason
    choices = [{"index": i, "message": message_json(shape.plan, m, shape.reasoning_content),
                "logprobs": chat_logprobs(lps[i]) if shape.logprobs else None,
                "finish_reason": chat_finish_reason(shape.plan, finishes[i], bool(m.tool_calls))}
               for i, m in enumerate(messages)]
    return JSONResponse(shape.head | {"object": "chat.completion", "choices": choices, "system_fingerprint": None,
                                      "usage": usage(shape.num_prompt, tokens)})


async def chat_stream(pieces: AsyncIterator[Piece], shape: ChatShape, include_usage: bool) -> AsyncIterator[str]:
    base = shape.head | {"object": "chat.completion.chunk", "system_fingerprint": None}
    if include_usage:
        base["usage"] = None  # OpenAI sends usage: null on every chunk, then one usage chunk
    has_calls = [False] * shape.n
    tokens = 0
    started = False
    async for p in pieces:
        if not started:  # the role chunks wait for the first output, so an engine refusal is still an HTTP error
            started = True
            for i in range(shape.n):
                yield sse(base | {"choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                               "logprobs": None, "finish_reason": None}]})
        tokens += p.num_tokens
        has_calls[p.index] |= any(c.id is not None for c in p.parsed.tool_calls)
        delta = delta_json(shape.plan, p.parsed, shape.reasoning_content)
        if not delta and p.finish_reason is None and not (shape.logprobs and p.logprobs):
            continue
        finish = chat_finish_reason(shape.plan, p.finish_reason, has_calls[p.index]) if p.finish_reason else None
        yield sse(base | {"choices": [{
            "index": p.index, "delta": delta,
            "logprobs": chat_logprobs(p.logprobs) if shape.logprobs and p.logprobs else None,
            "finish_reason": finish}]})
    if include_usage:
        yield sse(base | {"choices": [], "usage": usage(shape.num_prompt, tokens)})


# ---------------------------------------------------------------------------------------------------------------
# completions


@dataclass
class ChoiceState:
    """Everything one choice has produced so far (non-streaming responses and usage counts)."""

    text: str = ""
    num_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, c: ChoiceDelta) -> None:
        self.text += c.text
        self.num_tokens += c.num_tokens
        self.logprobs += c.logprobs or []
        if c.finish_reason is not None:
            self.finish_reason = engine_finish_reason(c.finish_reason)


def completion_choice(index: int, text: str, lp: dict[str, Any] | None, finish: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}


@dataclass(frozen=True)
class CompletionShape:
    head: dict[str, Any]
    req: CompletionRequest
    prompt_ids: list[list[int]]
    decode: Callable[[list[int]], str]


async def completion_full(streams: list[AsyncIterator[EngineOutput]], shape: CompletionShape) -> Response:
    req = shape.req
    states = [[ChoiceState() for _ in range(req.n)] for _ in streams]
    prompt_lp: list[list[TokenLogprob | None] | None] = [None] * len(streams)
    async for i, out in merge(streams):
        if out.prompt_logprobs is not None:
            prompt_lp[i] = out.prompt_logprobs
        for c in out.choices:
            states[i][c.index].add(c)
    choices = []
    for i, per_prompt in enumerate(states):
        prefix = shape.decode(shape.prompt_ids[i]) if req.echo else ""
        for j, s in enumerate(per_prompt):
            lp = None
            if req.logprobs is not None:
                lp = completion_logprobs(list(s.logprobs), len(prefix), req.return_tokens_as_token_ids)
                if req.echo:
                    echo = echo_logprobs(shape.prompt_ids[i], prompt_lp[i], shape.decode,
                                         req.return_tokens_as_token_ids)
                    lp = {k: echo[k] + lp[k] for k in lp}
            choices.append(completion_choice(i * req.n + j, prefix + s.text, lp, s.finish_reason))
    completion_tokens = sum(s.num_tokens for per_prompt in states for s in per_prompt)
    num_prompt = sum(len(ids) for ids in shape.prompt_ids)
    return JSONResponse(shape.head | {"object": "text_completion", "choices": choices, "system_fingerprint": None,
                                      "usage": usage(num_prompt, completion_tokens)})


async def completion_stream(streams: list[AsyncIterator[EngineOutput]], shape: CompletionShape,
                            include_usage: bool) -> AsyncIterator[str]:
    req = shape.req
    base = shape.head | {"object": "text_completion", "system_fingerprint": None}
    if include_usage:
        base["usage"] = None
    if req.echo:
        for i, ids in enumerate(shape.prompt_ids):
            text = shape.decode(ids)
            for j in range(req.n):
                yield sse(base | {"choices": [completion_choice(i * req.n + j, text, None, None)]})
    offsets = [[0] * req.n for _ in streams]
    num_completion = 0
    async for i, out in merge(streams):
        for c in out.choices:
            num_completion += c.num_tokens
            if not c.text and c.finish_reason is None:
                continue
            lp = None
            if req.logprobs is not None and c.logprobs:
                lp = completion_logprobs(list(c.logprobs), offsets[i][c.index], req.return_tokens_as_token_ids)
            offsets[i][c.index] += len(c.text)
            finish = engine_finish_reason(c.finish_reason) if c.finish_reason else None
            yield sse(base | {"choices": [completion_choice(i * req.n + c.index, c.text, lp, finish)]})
    if include_usage:
        yield sse(base | {"choices": [], "usage": usage(sum(len(ids) for ids in shape.prompt_ids), num_completion)})
