"""POST /v1/chat/completions and /v1/completions: validate, render to token ids, generate, shape OpenAI responses."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from models.tokenizers import ChatTemplateError
from serve.app import Admission, cancel_on_disconnect, read_json_object
from serve.chat import Piece, chat_full, chat_stream, make_plan, render_prompt, run_choices
from serve.engine import (
    ChoiceDelta,
    Engine,
    EngineDeadError,
    EngineOutput,
    EngineRequestError,
    GenerationParams,
    TokenLogprob,
)
from serve.errors import APIError, from_validation_error
from serve.metrics import ServerMetrics
from serve.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

log = logging.getLogger(__name__)
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _sse(obj: Any) -> str:
    return f"data: {_dumps(obj)}\n\n"


# ---------------------------------------------------------------------------------------------------------------
# shared steps


def check_model(engine: Engine, requested: str) -> None:
    if requested != engine.model_name:
        raise APIError(404, f"The model '{requested}' does not exist; this server serves '{engine.model_name}'",
                       param="model", code="model_not_found")


def budget_tokens(engine: Engine, num_prompt: int, requested: int | None, param: str) -> int:
    """Tokens left for the completion; a prompt (plus requested output) past the context is a 400 with numbers."""
    limit = engine.max_model_len
    if num_prompt >= limit or (requested is not None and num_prompt + requested > limit):
        asked = num_prompt + (requested or 0)
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                            f"{asked} tokens ({num_prompt} in the {param}, {requested or 0} in the completion). "
                            "Please reduce the length of the prompt or the completion.",
                       param=param, code="context_length_exceeded")
    return requested if requested is not None else limit - num_prompt


def generation_params(req: SamplingFields, max_tokens: int, logprobs: int | None,
                      prompt_logprobs: int | None = None) -> GenerationParams:
    return GenerationParams(
        max_tokens=max_tokens, n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
        min_p=req.min_p, presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty, stop=req.stop_list(),
        stop_token_ids=tuple(req.stop_token_ids or ()), seed=req.seed, logprobs=logprobs,
        prompt_logprobs=prompt_logprobs, ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
    )


def check_params(engine: Engine, params: GenerationParams) -> GenerationParams:
    try:
        engine.check_params(params)
    except EngineRequestError as e:
        raise APIError(400, str(e), code="invalid_request") from None
    return params


async def tracked(engine: Engine, metrics: ServerMetrics, route: str, prompt_ids: list[int],
                  params: GenerationParams, request_id: str) -> AsyncIterator[EngineOutput]:
    """engine.generate plus metrics; a consumer that stops early (disconnect) aborts the engine request."""
    start = time.perf_counter()
    state = "waiting"
    metrics.waiting.inc()
    finished = failed = False
    try:
        async for out in engine.generate(prompt_ids, params, request_id):
            new_tokens = sum(len(c.token_ids) for c in out.choices)
            if state == "waiting" and new_tokens:
                metrics.ttft.labels(route).observe(time.perf_counter() - start)
                metrics.waiting.dec()
                metrics.running.inc()
                state = "running"
            metrics.generation_tokens.inc(new_tokens)
            finished = out.finished
            if finished:
                metrics.prompt_tokens.inc(out.num_prompt_tokens)
                metrics.e2e.labels(route).observe(time.perf_counter() - start)
            yield out
    except EngineDeadError as e:
        failed = True
        raise APIError(503, f"the engine is not running: {e}", code="engine_dead") from e
    except EngineRequestError as e:
        failed = True
        raise APIError(400, str(e), code="invalid_request") from e
    finally:
        (metrics.waiting if state == "waiting" else metrics.running).dec()
        if not finished:
            if not failed:
                metrics.aborted.inc()  # the consumer went away: a client disconnect
            await engine.abort(request_id)


@dataclass
class ChoiceState:
    """Everything one choice has produced so far (non-streaming responses and usage counts)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, c: ChoiceDelta) -> None:
        self.text += c.text
        self.token_ids += c.token_ids
        self.logprobs += c.logprobs or []
        if c.finish_reason is not None:
            self.finish_reason = _finish_reason(c.finish_reason)


def _finish_reason(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop" if reason == "abort" else reason


def _usage(num_prompt: int, num_completion: int) -> dict[str, int]:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_completion,
            "total_tokens": num_prompt + num_completion}


def parse_body(model: type[M], body: dict[str, Any]) -> M:
    """Validate a request body; the first bad field becomes a 400 naming it."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise from_validation_error(e) from None


async def _stream_response(chunks: AsyncIterator[str]) -> StreamingResponse:
    # Start the generator now: once inside its try blocks, even a stream that is never sent (client gone before
    # the headers) releases its admission slot and engine request when the generator is closed or collected.
    first = await anext(chunks)

    async def body() -> AsyncIterator[str]:
        yield first
        async for chunk in chunks:
            yield chunk

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _guard_stream(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """After the 200 has gone out, errors travel in-band as an error event, then [DONE]."""
    try:
        async for chunk in chunks:
            yield chunk
    except APIError as e:
        yield e.sse()
    except Exception as e:
        log.exception("stream failed")
        yield APIError(500, f"internal error: {type(e).__name__}").sse()
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------------------------
# logprob shapes


def _chat_logprobs(items: list[TokenLogprob]) -> dict[str, Any]:
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [entry(t.token, t.logprob) | {"top_logprobs": [entry(s, lp) for _, s, lp in t.top]}
                        for t in items]}


def _completion_logprobs(items: list[TokenLogprob | None], offset: int) -> dict[str, Any]:
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for t in items:
        if t is None:  # first prompt token: nothing to condition on
            continue
        tokens.append(t.token)
        token_logprobs.append(t.logprob)
        top_logprobs.append({s: lp for _, s, lp in t.top})
        text_offset.append(offset)
        offset += len(t.token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}


def _echo_logprobs(prompt_ids: list[int], prompt_lp: list[TokenLogprob | None] | None, decode: Any
                   ) -> dict[str, Any]:
    """Prompt tokens in OpenAI's legacy shape, where the first token's logprob is null."""
    first = decode(prompt_ids[:1])
    rest = _completion_logprobs(prompt_lp or [], len(first))
    return {"tokens": [first] + rest["tokens"], "token_logprobs": [None] + rest["token_logprobs"],
            "top_logprobs": [None] + rest["top_logprobs"], "text_offset": [0] + rest["text_offset"]}


# ---------------------------------------------------------------------------------------------------------------
# chat


def register_openai_routes(app: FastAPI) -> None:
    engine: Engine = app.state.engine
    reasoning_content: bool = app.state.reasoning_content
    metrics: ServerMetrics = app.state.metrics
    admission: Admission = app.state.admission

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req: ChatCompletionRequest = parse_body(ChatCompletionRequest, await read_json_object(request))
        check_model(engine, req.model)
        plan = make_plan(req, engine.spec)
        try:
            prompt_ids = await asyncio.to_thread(render_prompt, engine, req)
        except ChatTemplateError as e:
            raise APIError(400, f"messages: {e}", param="messages", code="invalid_messages") from None
        max_tokens = budget_tokens(engine, len(prompt_ids), req.requested_max_tokens(), "messages")
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = check_params(engine, generation_params(req, max_tokens, top))
        if plan.constraint is not None:  # a regex or schema the grammar backend cannot compile: 400 now
            try:
                engine.check_params(dataclasses.replace(params, constraint=plan.constraint))
            except EngineRequestError as e:
                raise APIError(400, f"{plan.constraint_param}: {e}", param=plan.constraint_param,
                               code="invalid_value") from None
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        head = {"id": rid, "created": int(time.time()), "model": engine.model_name}

        def generate(ids: list[int], p: GenerationParams, request_id: str) -> AsyncIterator[EngineOutput]:
            return tracked(engine, metrics, "/v1/chat/completions", ids, p, request_id)

        if plan.multi_segment and req.n > 1:  # plans that continue run per choice; seeds stay distinct
            runs = [run_choices(generate, engine, plan, prompt_ids,
                                dataclasses.replace(params, n=1, seed=None if req.seed is None else req.seed + i),
                                f"{rid}-{i}", index=i) for i in range(req.n)]
            pieces: AsyncIterator[Piece] = (piece async for _, piece in _merge(runs))
        else:
            pieces = run_choices(generate, engine, plan, prompt_ids, params, rid)
        admission.acquire()  # a 429 goes out before any response starts
        shape = dict(plan=plan, head=head, n=req.n, num_prompt=len(prompt_ids), logprobs=req.logprobs,
                     reasoning_content=reasoning_content, logprobs_json=_chat_logprobs, usage=_usage)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await _stream_response(admission.release_after(_guard_stream(
                chat_stream(pieces, include_usage=include_usage, sse=_sse, **shape))))
        try:
            return await cancel_on_disconnect(request, chat_full(pieces, **shape))
        finally:
            admission.release()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req: CompletionRequest = parse_body(CompletionRequest, await read_json_object(request))
        check_model(engine, req.model)
        prompts = req.prompts()
        if isinstance(prompts[0], str):
            prompt_ids = await asyncio.to_thread(lambda: [engine.tokenizer.encode(p) for p in prompts])  # type: ignore[arg-type]
        else:
            prompt_ids = [list(p) for p in prompts]  # type: ignore[arg-type]
        max_tokens = [budget_tokens(engine, len(ids), req.max_tokens if req.max_tokens is not None else 16, "prompt")
                      for ids in prompt_ids]
        rid = f"cmpl-{uuid.uuid4().hex}"
        head = {"id": rid, "created": int(time.time()), "model": engine.model_name}
        echo_lp = req.logprobs if (req.echo and req.logprobs is not None) else None
        params = [check_params(engine, generation_params(req, mt, req.logprobs, echo_lp)) for mt in max_tokens]
        streams = [tracked(engine, metrics, "/v1/completions", ids, p, f"{rid}-{i}")
                   for i, (ids, p) in enumerate(zip(prompt_ids, params, strict=True))]
        admission.acquire(len(streams))
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await _stream_response(admission.release_after(_guard_stream(
                _completion_stream(streams, prompt_ids, head, req, include_usage, engine)), len(streams)))
        try:
            return await cancel_on_disconnect(request, _completion_full(streams, prompt_ids, head, req, engine))
        finally:
            admission.release(len(streams))


# ---------------------------------------------------------------------------------------------------------------
# completions


async def _merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several async streams (a batch's prompts, a request's choices) as items arrive."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, T | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
            await queue.put((i, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises
            await queue.put((i, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _completion_choice(index: int, text: str, lp: dict[str, Any] | None, finish: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}


async def _completion_full(streams: list[AsyncIterator[EngineOutput]], prompt_ids: list[list[int]],
                           head: dict[str, Any], req: CompletionRequest, engine: Engine) -> Response:
    states = [[ChoiceState() for _ in range(req.n)] for _ in streams]
    num_prompt = [len(ids) for ids in prompt_ids]
    prompt_lp: list[list[TokenLogprob | None] | None] = [None] * len(streams)
    async for i, out in _merge(streams):
        if out.prompt_logprobs is not None:
            prompt_lp[i] = out.prompt_logprobs
        for c in out.choices:
            states[i][c.index].add(c)
    choices = []
    for i, per_prompt in enumerate(states):
        prefix = engine.tokenizer.decode(prompt_ids[i]) if req.echo else ""
        for j, s in enumerate(per_prompt):
            lp = None
            if req.logprobs is not None:
                lp = _completion_logprobs(list(s.logprobs), len(prefix))
                if req.echo:
                    echo = _echo_logprobs(prompt_ids[i], prompt_lp[i], engine.tokenizer.decode)
                    lp = {k: echo[k] + lp[k] for k in lp}
            choices.append(_completion_choice(i * req.n + j, prefix + s.text, lp, s.finish_reason))
    completion_tokens = sum(len(s.token_ids) for per_prompt in states for s in per_prompt)
    return JSONResponse(head | {"object": "text_completion", "choices": choices, "system_fingerprint": None,
                                "usage": _usage(sum(num_prompt), completion_tokens)})


async def _completion_stream(streams: list[AsyncIterator[EngineOutput]], prompt_ids: list[list[int]],
                             head: dict[str, Any], req: CompletionRequest, include_usage: bool, engine: Engine
                             ) -> AsyncIterator[str]:
    base = head | {"object": "text_completion", "system_fingerprint": None}
    if include_usage:
        base["usage"] = None
    if req.echo:
        for i, ids in enumerate(prompt_ids):
            text = engine.tokenizer.decode(ids)
            for j in range(req.n):
                yield _sse(base | {"choices": [_completion_choice(i * req.n + j, text, None, None)]})
    offsets = [[0] * req.n for _ in streams]
    num_completion = 0
    async for i, out in _merge(streams):
        for c in out.choices:
            num_completion += len(c.token_ids)
            if not c.text and c.finish_reason is None:
                continue
            lp = None
            if req.logprobs is not None and c.logprobs:
                lp = _completion_logprobs(list(c.logprobs), offsets[i][c.index])
            offsets[i][c.index] += len(c.text)
            finish = _finish_reason(c.finish_reason) if c.finish_reason else None
            yield _sse(base | {"choices": [_completion_choice(i * req.n + c.index, c.text, lp, finish)]})
    if include_usage:
        yield _sse(base | {"choices": [], "usage": _usage(sum(len(ids) for ids in prompt_ids), num_completion)})
