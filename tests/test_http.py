"""The HTTP plumbing (serve/http.py) under a real uvicorn: hostile bodies, unexpected errors, unknown routes, limits.

The app here is our plumbing around stand-in routes (one that fails on purpose: no real route should, which is the
point of the server tests); everything on the way in and out is the server's own code."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from serve.errors import APIError
from serve.http import (
    MAX_HEADER_BYTES,
    MAX_JSON_DEPTH,
    BlockingPool,
    GatewayMiddleware,
    cancel_on_disconnect,
    decode_json_object,
    install_error_handlers,
    parse_body,
    read_json_object,
    uvicorn_config,
)
from serve.metrics import ServerMetrics
from serve.protocol import ChatCompletionRequest


def nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


@pytest.mark.parametrize(("body", "param"), [
    ('{"messages": ' + nested(5000) + "}", "messages"),  # deeper than json.loads can parse
    ('{"model": "m", "response_format": {"a": ' + nested(200) + "}}", "response_format.a.0"),
    ('{"tools": [{"function": {"parameters": ' + nested(MAX_JSON_DEPTH) + "}}]}", "tools.0.function"),
])
def test_deep_json_is_a_400_naming_the_field(body: str, param: str) -> None:
    with pytest.raises(APIError) as err:
        decode_json_object(body.encode())
    assert err.value.status == 400 and err.value.param == param and "nested deeper" in err.value.message


def test_nesting_up_to_the_limit_is_accepted() -> None:
    body = decode_json_object(('{"x": ' + nested(MAX_JSON_DEPTH - 2) + "}").encode())
    assert "x" in body


@pytest.mark.parametrize(("body", "param"), [
    ('{"prompt": "a\\ud800b"}', "prompt"),
    ('{"stop": ["ok", "\\udfff"]}', "stop.1"),
    ('{"messages": [{"content": "\\ud83d"}]}', "messages.0.content"),
])
def test_lone_surrogates_are_a_400_naming_the_field(body: str, param: str) -> None:
    with pytest.raises(APIError) as err:
        decode_json_object(body.encode())
    assert err.value.status == 400 and err.value.param == param and "surrogate" in err.value.message


def test_surrogate_pairs_and_escaped_backslashes_are_fine() -> None:
    assert decode_json_object(b'{"p": "\\ud83d\\ude42 and \\\\ud800"}')["p"] == "🙂 and \\ud800"


def test_booleans_and_numbers_are_strict() -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    for field, value in (("stream", "yes"), ("stream", 1), ("max_tokens", "5"), ("temperature", "0.5"),
                         ("logprobs", "true")):
        with pytest.raises(APIError) as err:
            parse_body(ChatCompletionRequest, base | {field: value})
        assert err.value.param == field
    assert parse_body(ChatCompletionRequest, base | {"temperature": 1, "stream": True}).temperature == 1.0


# ----------------------------------------------------------------------------------------------------------------
# a real uvicorn around the plumbing


def build_app() -> tuple[FastAPI, dict[str, int]]:
    app = FastAPI()
    app.add_middleware(GatewayMiddleware, api_key=None, metrics=ServerMetrics())
    install_error_handlers(app)
    pool = BlockingPool(workers=1, queue=1)
    seen = {"blocking_runs": 0}

    @app.post("/echo")
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse(await read_json_object(request, pool))

    @app.post("/boom")
    async def boom(request: Request) -> JSONResponse:
        raise RuntimeError("a bug")

    @app.post("/slow")
    async def slow(request: Request) -> Response:
        await read_json_object(request)

        def work() -> int:
            seen["blocking_runs"] += 1
            time.sleep(0.5)
            return 1

        async def respond() -> Response:
            return JSONResponse({"ran": await pool.run(work)})

        return await cancel_on_disconnect(request, respond())

    return app, seen


@pytest.fixture(scope="module")
def plumbing() -> Iterator[tuple[str, dict[str, int]]]:
    app, seen = build_app()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, "warning"))  # the server's own settings
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", seen
    server.should_exit = True
    thread.join(10)


def test_an_unexpected_error_is_a_500_and_the_connection_survives(plumbing: tuple[str, dict[str, int]]) -> None:
    url, _ = plumbing
    connections: list[object] = []
    with httpx.Client(base_url=url, timeout=30,
                      event_hooks={"request": [lambda r: connections.append(r.extensions.get("network_stream"))]}) \
            as client:
        r = client.post("/boom", json={})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert r.headers.get("connection") != "close"
        ok = client.post("/echo", json={"a": 1})  # the next, valid request on the same keep-alive connection
        assert ok.status_code == 200 and ok.json() == {"a": 1}
        pool = client._transport._pool  # one connection served both
        assert len(pool.connections) == 1


def test_unknown_routes_and_methods_answer_in_openai_shape(plumbing: tuple[str, dict[str, int]]) -> None:
    url, _ = plumbing
    r = httpx.get(f"{url}/v1/nothing")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(f"{url}/echo")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_an_oversized_request_head_is_cut_off(plumbing: tuple[str, dict[str, int]]) -> None:
    """Headers past the limit are refused before they are buffered (the connection is closed); the server goes on."""
    url, _ = plumbing
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent = 0
        with contextlib.suppress(OSError):  # the server closes the connection while we are still sending
            while sent < 64 * MAX_HEADER_BYTES:
                conn.sendall(b"a" * 65536)
                sent += 65536
        assert sent < 64 * MAX_HEADER_BYTES or conn.recv(100).startswith(b"HTTP/1.1 400")
    assert httpx.post(f"{url}/echo", json={"ok": True}).status_code == 200


def test_bad_bodies_are_400_in_openai_shape(plumbing: tuple[str, dict[str, int]]) -> None:
    url, _ = plumbing
    for body, param in (('{"x": ' + nested(3000) + "}", "x"), ('{"s": "\\ud800"}', "s"), ("[1]", None),
                        ("{nope", None)):
        r = httpx.post(f"{url}/echo", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, body[:40]
        assert r.json()["error"]["param"] == param


def test_blocking_work_is_bounded_and_dropped_when_the_client_leaves(plumbing: tuple[str, dict[str, int]]) -> None:
    """One worker and one queued slot: a third request is refused with 429 rather than piling up; a queued request
    whose client has gone never runs."""
    url, seen = plumbing

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            return [r.status_code for r in await asyncio.gather(*[client.post("/slow", json={}) for _ in range(3)])]

    assert sorted(asyncio.run(burst())) == [200, 200, 429]
    before = seen["blocking_runs"]

    async def leave_early() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            first = asyncio.ensure_future(client.post("/slow", json={}))
            await asyncio.sleep(0.1)
            with pytest.raises(httpx.TimeoutException):
                await client.post("/slow", json={}, timeout=0.2)  # queued behind the first, then abandoned
            await first

    asyncio.run(leave_early())
    time.sleep(1.0)
    assert seen["blocking_runs"] == before + 1  # the abandoned one was dropped before it ran


def test_large_bodies_parse_off_the_event_loop(plumbing: tuple[str, dict[str, int]]) -> None:
    url, _ = plumbing
    big = {"prompt": "x" * (1 << 20)}
    r = httpx.post(f"{url}/echo", content=json.dumps(big), headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 200 and len(r.json()["prompt"]) == 1 << 20


def test_api_key_check() -> None:
    gate = GatewayMiddleware(FastAPI(), api_key="s3cret\n", metrics=ServerMetrics())  # read from a file

    def allowed(header: bytes | None) -> bool:
        return gate._authorized({"headers": [(b"authorization", header)] if header is not None else []})

    assert allowed(b"Bearer s3cret") and allowed(b"bearer  s3cret ")
    assert not allowed(b"Bearer s3cre") and not allowed(b"Basic s3cret") and not allowed(b"s3cret")
    assert not allowed(b"Bearer ") and not allowed(None)
