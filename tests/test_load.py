"""A bounded load test on both engines: 32 concurrent streams, a quarter of the clients hanging up mid-stream. No
request may get a 5xx, every stream that is read to its end ends with [DONE], and the server keeps serving."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from tests.conftest import RunningServer

pytestmark = pytest.mark.server

CONCURRENCY = 32


def server_errors(server: RunningServer) -> float:
    text = httpx.get(f"{server.base_url}/metrics", timeout=30).text
    return sum(float(v) for v in re.findall(r'^cascade_http_requests_total\{.*status="5\d\d"\} (\S+)$', text, re.M))


async def one_stream(client: httpx.AsyncClient, server: RunningServer, i: int) -> tuple[int, bool | None]:
    """(status, ended with [DONE]); None for a client that hangs up after a few chunks."""
    leaves = i % 4 == 0
    chat = i % 2 == 0
    body = {"model": server.spec.name, "max_tokens": 48, "stream": True, "temperature": 0.8, "seed": i,
            "extra": "ignored"}
    if chat:
        body |= {"messages": [{"role": "user", "content": f"Say something about the number {i}."}]}
    else:
        body |= {"prompt": [1, 1000 + i, 2000 + i, 3000 + i], "ignore_eos": True}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    async with client.stream("POST", f"{server.base_url}{path}", json=body, headers=server.headers) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, None
        lines = []
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                lines.append(line)
            if leaves and len(lines) >= 3:
                return r.status_code, None  # hang up mid-stream
        return r.status_code, bool(lines) and lines[-1] == "data: [DONE]" and all('"error"' not in x for x in lines)


async def burst(server: RunningServer) -> list[tuple[int, bool | None]]:
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        return await asyncio.gather(*[one_stream(client, server, i) for i in range(CONCURRENCY)])


@pytest.mark.parametrize("fixture", ["tiny_server", "tiny_llamacpp_server"])
def test_concurrent_streams_with_clients_leaving(fixture: str, request: pytest.FixtureRequest) -> None:
    server: RunningServer = request.getfixturevalue(fixture)
    errors_before = server_errors(server)
    results = asyncio.run(burst(server))
    assert all(status == 200 for status, _ in results), results
    finished = [done for _, done in results if done is not None]
    assert len(finished) == CONCURRENCY - CONCURRENCY // 4 and all(finished)
    assert server_errors(server) == errors_before
    again = httpx.post(f"{server.base_url}/v1/completions", timeout=120, headers=server.headers,
                       json={"model": server.spec.name, "prompt": [1, 5, 6], "max_tokens": 3})
    assert again.status_code == 200 and httpx.get(f"{server.base_url}/health").status_code == 200
