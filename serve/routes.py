"""POST /v1/chat/completions and /v1/completions: each route reads its body, then runs a list of steps under
cancellation (a client that leaves aborts its engine requests and queued tokenization)."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import Response

from models.tokenizers import ChatTemplateError
from serve.chat import Piece, make_plan, render_prompt, run_choices
from serve.engine import Engine, EngineOutput, EngineRequestError, GenerationParams, Media
from serve.errors import APIError
from serve.http import (
    Admission,
    BlockingPool,
    cancel_on_disconnect,
    parse_body,
    read_json_object,
    stream_response,
)
from serve.media import LoadedMedia, MediaLimits, check_parts, fetch_payload, load_media
from serve.metrics import ServerMetrics
from serve.protocol import ChatCompletionRequest, CompletionRequest
from serve.responses import ChatShape, CompletionShape, chat_full, chat_stream, completion_full, completion_stream
from serve.serving import (
    budget_tokens,
    check_model,
    check_running,
    check_text_length,
    check_token_ids,
    generation_params,
    merge,
    tracked,
)


@dataclasses.dataclass(frozen=True)
class RouteContext:
    """What the OpenAI routes share, built once per app."""

    engine: Engine
    metrics: ServerMetrics
    admission: Admission
    pool: BlockingPool
    reasoning_content: bool
    media_limits: MediaLimits = dataclasses.field(default_factory=MediaLimits)


def register_openai_routes(app: FastAPI, ctx: RouteContext) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_json_object(request, ctx.pool)
        return await cancel_on_disconnect(request, serve_chat(ctx, body))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read_json_object(request, ctx.pool)
        return await cancel_on_disconnect(request, serve_completions(ctx, body))


async def render_chat(ctx: RouteContext, req: ChatCompletionRequest) -> tuple[list[int], Media | None]:
    """The prompt's token ids (and media), rendered in the bounded pool; a conversation the template refuses is a
    400, and so is media that is not accepted (serve/media.py)."""
    engine = ctx.engine
    check_text_length(engine, req.text_length(), "messages")
    if len(req.messages) > engine.max_model_len:  # each renders to a token at least: empty ones are not free
        raise APIError(400, f"messages: {len(req.messages)} messages cannot fit this model's context of "
                            f"{engine.max_model_len} tokens", param="messages", code="context_length_exceeded")
    media = await load_request_media(ctx, req)
    try:
        return await ctx.pool.run(render_prompt, engine.spec, engine.tokenizer, req, media)
    except ChatTemplateError as e:
        raise APIError(400, f"messages: {e}", param="messages", code="invalid_messages") from None


async def load_request_media(ctx: RouteContext, req: ChatCompletionRequest) -> list[LoadedMedia]:
    """Every image and audio part checked (what the model takes, how many, allowed sources), then decoded."""
    parts = req.media_parts()
    if not parts:
        return []
    roles = {f"messages[{i}].content[{j}]": m.role for i, m in enumerate(req.messages) for j, _ in m.media_parts()}
    check_parts(parts, ctx.engine.media, ctx.engine.model_name, ctx.media_limits, roles)
    payloads = [await fetch_payload(param, part, ctx.media_limits) for param, part in parts]
    return await ctx.pool.run(lambda: [load_media(param, part, raw, declared, ctx.media_limits)
                                       for (param, part), (raw, declared) in zip(parts, payloads, strict=True)])


async def serve_chat(ctx: RouteContext, body: dict) -> Response:
    engine = ctx.engine
    req = parse_body(ChatCompletionRequest, body)
    adapter = check_model(engine, req.model)
    check_running(engine)
    plan = make_plan(req, engine.spec)
    # plans that continue run one engine request per choice: each takes an admission slot
    slots = req.n if plan.multi_segment and req.n > 1 else 1
    ctx.admission.check_size(slots, "n")
    prompt_ids, media = await render_chat(ctx, req)
    max_tokens = budget_tokens(engine, len(prompt_ids), req.requested_max_tokens(), "messages")
    params = generation_params(engine, req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None,
                               adapter=adapter)
    if plan.constraint is not None:  # a regex or schema the grammar backend cannot compile: 400 now
        try:
            engine.check_params(dataclasses.replace(params, constraint=plan.constraint))
        except EngineRequestError as e:
            raise APIError(400, f"{plan.constraint_param}: {e}", param=plan.constraint_param,
                           code="invalid_value") from None
    rid = f"chatcmpl-{uuid.uuid4().hex}"

    def generate(ids: list[int], p: GenerationParams, request_id: str) -> AsyncIterator[EngineOutput]:
        return tracked(engine, ctx.metrics, "/v1/chat/completions", ids, p, request_id, media)

    if plan.multi_segment and req.n > 1:  # plans that continue run per choice; seeds stay distinct
        runs = [run_choices(generate, engine, plan, prompt_ids,
                            dataclasses.replace(params, n=1, seed=None if req.seed is None else req.seed + i),
                            f"{rid}-{i}", index=i) for i in range(req.n)]
        pieces: AsyncIterator[Piece] = (piece async for _, piece in merge(runs))
    else:
        pieces = run_choices(generate, engine, plan, prompt_ids, params, rid)
    shape = ChatShape(plan=plan, head={"id": rid, "created": int(time.time()), "model": req.model},
                      n=req.n, num_prompt=len(prompt_ids), logprobs=req.logprobs,
                      reasoning_content=ctx.reasoning_content)
    ctx.admission.acquire(slots, "n")  # a 429 goes out before any response starts
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await stream_response(ctx.admission.release_after(chat_stream(pieces, shape, include_usage), slots))
    try:
        return await chat_full(pieces, shape)
    finally:
        ctx.admission.release(slots)


async def serve_completions(ctx: RouteContext, body: dict) -> Response:
    engine = ctx.engine
    req = parse_body(CompletionRequest, body)
    adapter = check_model(engine, req.model)
    check_running(engine)
    prompts = req.prompts()
    ctx.admission.check_size(len(prompts))
    if isinstance(prompts[0], str):
        for p in prompts:
            check_text_length(engine, len(p), "prompt")  # type: ignore[arg-type]
        prompt_ids = await ctx.pool.run(lambda: [engine.tokenizer.encode(p) for p in prompts])  # type: ignore[arg-type]
    else:
        prompt_ids = [list(p) for p in prompts]  # type: ignore[arg-type]
        for ids in prompt_ids:
            check_token_ids(engine, ids, "prompt")
    requested = req.max_tokens if req.max_tokens is not None else 16  # OpenAI's default for completions
    echo_lp = req.logprobs if (req.echo and req.logprobs is not None) else None
    params = [generation_params(engine, req, budget_tokens(engine, len(ids), requested, "prompt"), req.logprobs,
                                echo_lp, adapter) for ids in prompt_ids]
    rid = f"cmpl-{uuid.uuid4().hex}"
    streams = [tracked(engine, ctx.metrics, "/v1/completions", ids, p, f"{rid}-{i}")
               for i, (ids, p) in enumerate(zip(prompt_ids, params, strict=True))]
    shape = CompletionShape(head={"id": rid, "created": int(time.time()), "model": req.model}, req=req,
                            prompt_ids=prompt_ids, decode=engine.tokenizer.decode)
    ctx.admission.acquire(len(streams))
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await stream_response(ctx.admission.release_after(completion_stream(streams, shape, include_usage),
                                                                 len(streams)))
    try:
        return await completion_full(streams, shape)
    finally:
        ctx.admission.release(len(streams))
