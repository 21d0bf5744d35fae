"""The FastAPI app: plumbing from `serve/http.py`, the OpenAI and tokenizer routes, and the operational routes
(/health, /metrics, /v1/models). The engine is started before the app serves (`serve/startup.py`)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from serve.engine import Engine
from serve.errors import APIError
from serve.http import Admission, BlockingPool, GatewayMiddleware, install_error_handlers
from serve.media import MediaLimits
from serve.metrics import ServerMetrics
from serve.routes import RouteContext, register_openai_routes
from serve.supervisor import EngineSupervisor
from serve.tokenize import register_tokenizer_routes
from serve.transcription import register_audio_routes


@dataclass(frozen=True)
class AppSettings:
    api_key: str | None = None
    max_pending_requests: int = 128
    reasoning_content: bool = False  # also send reasoning as `reasoning_content` (older clients)
    tokenizer_workers: int = 2  # threads of the bounded pool for tokenizing and rendering
    media_limits: MediaLimits = field(default_factory=MediaLimits)


def create_app(engine: Engine, settings: AppSettings, supervisor: EngineSupervisor | None = None) -> FastAPI:
    metrics = ServerMetrics()
    pool = BlockingPool(workers=settings.tokenizer_workers)
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            async with supervisor.watching() if supervisor else contextlib.nullcontext():
                yield
        finally:
            # Here, not after uvicorn returns: on SIGTERM uvicorn re-raises the signal once the app has shut down.
            pool.shutdown()
            engine.shutdown()

    app = FastAPI(title="cascade", version="0.1.0", lifespan=lifespan)
    ctx = RouteContext(engine=engine, metrics=metrics, admission=Admission(settings.max_pending_requests, metrics),
                       pool=pool, reasoning_content=settings.reasoning_content, media_limits=settings.media_limits)
    app.state.ctx = ctx
    app.add_middleware(GatewayMiddleware, api_key=settings.api_key, metrics=metrics)
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        healthy = await engine.is_healthy()
        if supervisor is not None:
            status, body = supervisor.health(healthy)
        else:
            status, body = (200, {"status": "ok"}) if healthy else (503, {"status": "dead"})
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def prometheus() -> Response:
        # in a thread: llama.cpp's metrics handler waits for its loop to finish the current decode step
        text = await asyncio.to_thread(lambda: metrics.render(engine.spec_decode_stats()) + engine.metrics_text())
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card(name: str) -> dict[str, Any]:
        """The base, or a LoRA adapter with the base as its parent (as vLLM lists them; no paths)."""
        return {"id": name, "object": "model", "created": started, "owned_by": "cascade",
                "max_model_len": engine.max_model_len, "root": name,
                "parent": None if name == engine.model_name else engine.model_name}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(n) for n in (engine.model_name, *engine.adapters)]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        if model != engine.model_name and model not in engine.adapters:
            raise APIError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")
        return model_card(model)

    register_openai_routes(app, ctx)
    register_audio_routes(app, ctx)
    register_tokenizer_routes(app, ctx)
    return app
