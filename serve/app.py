"""The FastAPI app: middleware (auth, metrics), admission control, and the non-OpenAI routes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.engine import Engine
from serve.errors import APIError
from serve.metrics import ServerMetrics

log = logging.getLogger(__name__)

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/tokenize", "/detokenize",
          "/tokenizer_info")


class Admission:
    """A bound on requests in flight: past it, 429 with Retry-After instead of unbounded queues."""

    def __init__(self, limit: int, metrics: ServerMetrics) -> None:
        self.limit = limit
        self.in_flight = 0
        self.metrics = metrics

    def acquire(self, count: int = 1) -> None:
        """Take one slot per engine request (a completions batch of k prompts takes k)."""
        if count > self.limit:
            raise APIError(400, f"{count} prompts in one request exceed the server's limit of {self.limit}",
                           param="prompt", code="too_many_prompts")
        if self.in_flight + count > self.limit:
            self.metrics.rejected.inc()
            raise APIError(429, f"server is at its limit of {self.limit} requests in flight; retry shortly",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"})
        self.in_flight += count

    def release(self, count: int = 1) -> None:
        self.in_flight -= count

    async def release_after(self, chunks: AsyncIterator[str], count: int = 1) -> AsyncIterator[str]:
        """Hold the slots for as long as a stream runs."""
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            self.release(count)


class GatewayMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware, which hides client disconnects): API-key check and request counting."""

    def __init__(self, app: ASGIApp, api_key: str | None, metrics: ServerMetrics) -> None:
        self.app = app
        self.key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None
        self.metrics = metrics

    def _authorized(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        provided = hashlib.sha256(token.strip().encode("latin-1")).digest()
        # Compare fixed-length digests in constant time: no timing signal on how much of the key matched.
        return hmac.compare_digest(provided, self.key_digest or b"") and scheme.lower() == "bearer"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.key_digest and path.startswith("/v1") and scope["method"] != "OPTIONS" \
                    and not self._authorized(scope):
                error = APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")
                await error.response()(scope, receive, send_and_record)
                return
            await self.app(scope, receive, send_and_record)
        finally:
            route = path if path in ROUTES else ("/v1/models/{model}" if path.startswith("/v1/models/") else "other")
            self.metrics.http_requests.labels(route, str(status)).inc()


MAX_BODY_BYTES = 32 << 20  # far above any prompt that fits a context; stops a client from filling memory


async def read_json_object(request: Request) -> dict[str, Any]:
    """Parse the body ourselves so malformed JSON is a 400 in OpenAI's shape, not FastAPI's 422."""
    too_large = APIError(413, f"request body exceeds {MAX_BODY_BYTES} bytes", code="request_too_large")
    if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    return body


async def cancel_on_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Run a non-streaming handler, cancelling it (and so aborting its engine request) if the client leaves."""
    task = asyncio.ensure_future(work)

    async def wait_disconnect() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(wait_disconnect())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return Response(status_code=499)  # nobody is listening; logged as "client closed request"
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


def create_app(engine: Engine, *, api_key: str | None = None, max_pending_requests: int = 128,
               reasoning_content: bool = False, shutdown_engine: bool = True) -> FastAPI:
    metrics = ServerMetrics()
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        log.info("serving %s", engine.model_name)
        yield
        if shutdown_engine:
            engine.shutdown()

    app = FastAPI(title="cascade", version="0.1.0", lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.admission = Admission(max_pending_requests, metrics)
    app.state.reasoning_content = reasoning_content  # also send reasoning as `reasoning_content` (older clients)
    app.add_middleware(GatewayMiddleware, api_key=api_key, metrics=metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return APIError(400, str(exc.errors()[0].get("msg", "invalid request"))).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}").response()

    @app.get("/health")
    async def health() -> Response:
        if await engine.is_healthy():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "engine dead"}, status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict[str, Any]:
        return {"id": engine.model_name, "object": "model", "created": started, "owned_by": "cascade",
                "max_model_len": engine.max_model_len}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        if model != engine.model_name:
            raise APIError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")
        return model_card()

    from serve.routes import register_openai_routes

    register_openai_routes(app)
    from serve.tokenize import register_tokenizer_routes

    register_tokenizer_routes(app)
    return app

