"""HTTP plumbing shared by every route: body reading with its limits, request validation, auth, admission,
cancellation on disconnect, streaming, a bounded pool for blocking work, and the error handlers.

It imports no route: routes import it. Everything here answers in OpenAI's error shape (`serve/errors.py`) and keeps
the connection usable: an unexpected error becomes a 500 response, never a reset keep-alive connection.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import hmac
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.errors import APIError, from_validation_error
from serve.metrics import ServerMetrics

log = logging.getLogger(__name__)
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

MAX_BODY_BYTES = 32 << 20  # far above any prompt that fits a context; stops a client from filling memory
MAX_HEADER_BYTES = 64 << 10  # the request line and headers together; past it uvicorn (h11) answers 400 and closes
MAX_JSON_DEPTH = 64  # nesting of the request body; real tool and response schemas stay far below
OPEN_ROUTES = frozenset({"/health", "/metrics"})  # the only routes that never need the API key
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/audio/transcriptions", "/v1/audio/translations",
          "/v1/models", "/health", "/metrics", "/tokenize", "/detokenize",
          "/tokenizer_info")

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF][0-9a-fA-F]{2}")


# ---------------------------------------------------------------------------------------------------------------
# request bodies


async def read_json_object(request: Request, pool: BlockingPool | None = None) -> dict[str, Any]:
    """Read and parse the body ourselves: malformed, too large, too deep or invalid-Unicode bodies are 400/413s in
    OpenAI's shape, never FastAPI's 422 or a 500. Large bodies are parsed in the bounded pool, off the event loop."""
    raw = await read_body(request)
    if pool is not None and len(raw) > 256 << 10:
        return await pool.run(decode_json_object, raw)
    return decode_json_object(raw)


async def read_body(request: Request) -> bytes:
    """The whole body, refused with a 413 past MAX_BODY_BYTES whether or not the client declared its length."""
    too_large = APIError(413, f"request body exceeds {MAX_BODY_BYTES} bytes", code="request_too_large")
    try:
        declared = int(request.headers.get("content-length") or 0)
    except ValueError:
        raise APIError(400, "Content-Length is not a number", code="invalid_request") from None
    if declared > MAX_BODY_BYTES:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def decode_json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except RecursionError:
        field = _deep_field(raw)
        raise APIError(400, f"{field or 'request body'}: JSON is nested deeper than {MAX_JSON_DEPTH} levels",
                       param=field, code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    check_tree(body, strings=_SURROGATE_ESCAPE.search(raw) is not None)
    return body


def check_tree(body: dict[str, Any], strings: bool) -> None:
    """Refuse nesting past MAX_JSON_DEPTH (recursive code downstream, such as JSON Schema checks, would overflow)
    and, when `strings`, lone UTF-16 surrogates (`"\\ud800"`), which no tokenizer or encoder can take."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(body, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if not _valid_unicode(value):
                name = _dotted(path)
                raise APIError(400, f"{name}: contains a lone UTF-16 surrogate; send valid Unicode", param=name,
                               code="invalid_value")
            continue
        items = value.items() if isinstance(value, dict) else enumerate(value)
        if len(path) >= MAX_JSON_DEPTH:
            name = _dotted(path[:3])
            raise APIError(400, f"{name}: JSON is nested deeper than {MAX_JSON_DEPTH} levels", param=name,
                           code="invalid_value")
        for k, v in items:
            if strings and isinstance(k, str) and not _valid_unicode(k):
                name = _dotted(path) or "request body"
                raise APIError(400, f"{name}: a key contains a lone UTF-16 surrogate", param=_dotted(path) or None,
                               code="invalid_value")
            if isinstance(v, (dict, list)) or (strings and isinstance(v, str)):
                stack.append((v, (*path, k)))


def _valid_unicode(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _dotted(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


def _deep_field(raw: bytes) -> str | None:
    """The top-level key whose value nests too deeply (only for bodies too deep for json.loads to parse)."""
    depth, pos, last_key = 0, 0, None
    for m in _STRING.finditer(raw):
        for ch in raw[pos:m.start()]:
            depth += (ch in b"[{") - (ch in b"]}")
            if depth > MAX_JSON_DEPTH:
                return last_key
        pos = m.end()
        if depth == 1 and raw[pos:pos + 64].lstrip().startswith(b":"):
            with contextlib.suppress(ValueError):
                last_key = json.loads(m.group())
    return last_key


def parse_body(model: type[M], body: dict[str, Any]) -> M:
    """Validate a request body strictly (`"stream": "yes"` is not a boolean); the first bad field is a 400."""
    try:
        return model.model_validate(body, strict=True)
    except ValidationError as e:
        raise from_validation_error(e) from None
    except RecursionError:  # belt and braces: check_tree has bounded the depth already
        raise APIError(400, "request body is nested too deeply", code="invalid_value") from None


# ---------------------------------------------------------------------------------------------------------------
# blocking work


class BlockingPool:
    """A few threads for CPU-bound request work (tokenizing, rendering, parsing big bodies), with a bounded queue.

    Work beyond the queue gets 429 instead of piling up; work whose client left before it started is dropped
    (cancelling the awaiting task cancels the queued future). Small so that it can never starve the event loop
    and the engine of the CPU.
    """

    def __init__(self, workers: int = 2, queue: int = 64) -> None:
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cascade-work")
        self.slots = asyncio.Semaphore(workers + queue)
        self.capacity = workers + queue

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self.slots.locked():
            raise APIError(429, f"the server is busy preparing {self.capacity} requests; retry shortly",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"})
        async with self.slots:
            future = asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
            try:
                return await future
            except asyncio.CancelledError:
                future.cancel()  # not started yet: it never runs
                raise

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------------------------------------------
# admission, cancellation, streaming


class Admission:
    """A bound on requests in flight: past it, 429 with Retry-After instead of unbounded queues."""

    def __init__(self, limit: int, metrics: ServerMetrics) -> None:
        self.limit = limit
        self.in_flight = 0
        self.metrics = metrics

    def check_size(self, count: int, param: str = "prompt") -> None:
        """A request needing more engine requests than the server ever admits is a 400: call it before doing any
        per-prompt work, so a million-prompt body costs nothing."""
        if count > self.limit:
            what = f"{count} prompts" if param == "prompt" else f"{param}={count} (one engine request per choice here)"
            raise APIError(400, f"{what} exceed the server's limit of {self.limit} requests in flight", param=param,
                           code="too_many_prompts")

    def acquire(self, count: int = 1, param: str = "prompt") -> None:
        """Take one slot per engine request (a completions batch of k prompts takes k)."""
        self.check_size(count, param)
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


async def cancel_on_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Run a handler's work, cancelling it (aborting its engine requests, dropping queued tokenization) if the client
    leaves first. Call it after the body has been read: it takes over the request's receive channel."""
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


async def stream_response(chunks: AsyncIterator[str]) -> Response:
    """An SSE response whose status is known before it starts: the first chunk is produced now (the stream shapes wait
    for the engine's first output), so an error up to there is a real 4xx/5xx. After the 200 has gone out, errors
    travel in-band as an error event, and every stream ends with [DONE]. Starting the generator now also means that a
    stream never sent (client gone before the headers) still releases its admission slot and engine request."""
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        first = ""

    async def body() -> AsyncIterator[str]:
        if first:
            yield first
            try:
                async for chunk in chunks:
                    yield chunk
            except APIError as e:
                yield e.sse()
            except Exception as e:
                log.exception("stream failed")
                yield APIError(500, f"internal error: {type(e).__name__}").sse()
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---------------------------------------------------------------------------------------------------------------
# the HTTP server, middleware and error handlers


def uvicorn_config(app: ASGIApp, log_level: str = "info") -> Any:
    """h11, not httptools: h11 bounds the request head (measured: httptools buffered a 132 MB header line and kept
    reading; h11 closed the connection after 64 KiB)."""
    import uvicorn

    return uvicorn.Config(app, log_level=log_level, http="h11", h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                          timeout_graceful_shutdown=10)


class GatewayMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware, which hides client disconnects): the API key, request counting, and the last
    line of defence against unexpected errors."""

    def __init__(self, app: ASGIApp, api_key: str | None, metrics: ServerMetrics) -> None:
        self.app = app
        # stripped like the token a client sends: a key read from a file with its newline still matches
        self.key_digest = hashlib.sha256(api_key.strip().encode()).digest() if api_key else None
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
        status = 0

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal.response()(scope, receive, send_and_record)
                return
            await self.app(scope, receive, send_and_record)
        except ClientDisconnect:
            status = status or 499  # the client left while we read its body: nobody to answer
        except Exception as e:
            # Answer here instead of letting the error reach uvicorn, which would reset the keep-alive connection
            # (and fail the client's next, valid request on it).
            log.exception("unhandled error on %s %s", scope.get("method"), path)
            if status == 0:
                await APIError(500, f"internal error: {type(e).__name__}").response()(scope, receive, send_and_record)
        finally:
            route = path if path in ROUTES else ("/v1/models/{model}" if path.startswith("/v1/models/") else "other")
            self.metrics.http_requests.labels(route, str(status or 500)).inc()

    def _refusal(self, scope: Scope) -> APIError | None:
        if self.key_digest and scope["path"] not in OPEN_ROUTES and not self._authorized(scope):
            return APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                            code="invalid_api_key")
        return None


def install_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: ours, FastAPI's validation, and Starlette's 404/405 for unknown routes."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return APIError(400, str(exc.errors()[0].get("msg", "invalid request"))).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            error = APIError(404, f"no route {request.method} {request.url.path}", code="not_found")
        elif exc.status_code == 405:
            error = APIError(405, f"method {request.method} is not allowed on {request.url.path}",
                             code="method_not_allowed", headers=dict(exc.headers or {}))
        else:
            error = APIError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))
        return error.response()
