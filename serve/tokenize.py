"""POST /tokenize, POST /detokenize, GET /tokenizer_info: vLLM's tokenizer routes, so clients (lm-eval's remote
tokenizer among them) can count and build token-id prompts exactly as this server does.

They do model work, so they sit behind the API key like the OpenAI routes; inputs are capped by what the context can
hold before any tokenizing, and the tokenizing runs in the server's bounded pool (dropped if the client leaves)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from serve.errors import APIError
from serve.http import cancel_on_disconnect, parse_body, read_json_object
from serve.protocol import ChatCompletionRequest, DetokenizeRequest, TokenizeRequest
from serve.routes import RouteContext, render_chat
from serve.serving import check_model, check_text_length, check_token_ids


def register_tokenizer_routes(app: FastAPI, ctx: RouteContext) -> None:
    engine = ctx.engine

    def check(model: str | None) -> None:
        if model is not None:  # optional here, unlike the OpenAI routes
            check_model(engine, model)

    async def tokenize_body(body: dict[str, Any]) -> Response:
        req = parse_body(TokenizeRequest, body)
        check(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of 'prompt' or 'messages'", param="prompt", code="invalid_value")
        tok = engine.tokenizer
        if req.messages is not None:  # exactly the ids /v1/chat/completions would send to the engine
            ids, _ = await render_chat(ctx, parse_body(ChatCompletionRequest, {**body, "model": engine.model_name}))
        else:
            prompt = req.prompt or ""
            check_text_length(engine, len(prompt), "prompt")
            ids = await ctx.pool.run(tok.encode, prompt, req.add_special_tokens)
        out: dict[str, Any] = {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}
        if req.return_token_strs:
            out["token_strs"] = [tok.decode([i]) for i in ids]
        return JSONResponse(out)

    async def detokenize_body(body: dict[str, Any]) -> Response:
        req = parse_body(DetokenizeRequest, body)
        check(req.model)
        check_token_ids(engine, req.tokens, "tokens")
        return JSONResponse({"prompt": await ctx.pool.run(engine.tokenizer.decode, req.tokens)})

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        body = await read_json_object(request, ctx.pool)
        return await cancel_on_disconnect(request, tokenize_body(body))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        body = await read_json_object(request, ctx.pool)
        return await cancel_on_disconnect(request, detokenize_body(body))

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        return engine.tokenizer.info() | {"model_max_length": engine.max_model_len}
