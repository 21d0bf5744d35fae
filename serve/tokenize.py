"""POST /tokenize, POST /detokenize, GET /tokenizer_info: vLLM's tokenizer routes, so clients (lm-eval's remote
tokenizer among them) can count and build token-id prompts exactly as this server does."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from models.tokenizers import ChatTemplateError
from serve.app import read_json_object
from serve.chat import render_prompt
from serve.engine import Engine
from serve.errors import APIError
from serve.protocol import ChatCompletionRequest
from serve.routes import check_model, parse_body


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[Any] | None = None  # the chat form (validated as a chat request): the rendered prompt's ids
    add_special_tokens: bool = True  # prompt form only
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


def register_tokenizer_routes(app: FastAPI) -> None:
    engine: Engine = app.state.engine

    def check(model: str | None) -> None:
        if model is not None:  # optional here, unlike the OpenAI routes
            check_model(engine, model)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await read_json_object(request)
        req = parse_body(TokenizeRequest, body)
        check(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of 'prompt' or 'messages'", param="prompt", code="invalid_value")
        tok = engine.tokenizer
        if req.messages is not None:  # exactly the ids /v1/chat/completions would send to the engine
            chat = parse_body(ChatCompletionRequest, {**body, "model": engine.model_name})
            try:
                ids = await asyncio.to_thread(render_prompt, engine, chat)
            except ChatTemplateError as e:
                raise APIError(400, str(e), param="messages", code="invalid_value") from None
        else:
            ids = await asyncio.to_thread(tok.encode, req.prompt or "", req.add_special_tokens)
        out: dict[str, Any] = {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}
        if req.return_token_strs:
            out["token_strs"] = [tok.decode([i]) for i in ids]
        return out

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        req = parse_body(DetokenizeRequest, await read_json_object(request))
        check(req.model)
        vocab = engine.tokenizer.info()["vocab_size"]
        if bad := [t for t in req.tokens if t >= vocab]:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary (size {vocab})", param="tokens",
                           code="invalid_value")
        return {"prompt": engine.tokenizer.decode(req.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        return engine.tokenizer.info() | {"model_max_length": engine.max_model_len}
