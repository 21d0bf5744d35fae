"""What is particular to the llama.cpp engine: no side door around our API, clean shutdown despite llama.cpp's own
signal handlers, and its prefix cache."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import httpx
import psutil
import pytest

from models.registry import ModelSpec
from tests.conftest import RunningServer, start, stop_server

pytestmark = pytest.mark.server


def test_no_listener_besides_ours(llamacpp_server: RunningServer) -> None:
    """llama.cpp's server always opens an HTTP listener of its own (no API key on /health and /v1/models). We bind it
    to a Unix socket in a private directory and unlink it: no TCP port but ours, no socket file anyone can open."""
    proc = psutil.Process(llamacpp_server.proc.pid)
    port = int(llamacpp_server.base_url.rsplit(":", 1)[1])
    tcp = [c.laddr.port for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert tcp == [port]
    unix = [c for c in proc.net_connections(kind="unix") if c.status == psutil.CONN_LISTEN or not c.raddr]
    assert all(not c.laddr or not Path(c.laddr).exists() for c in unix), unix
    assert "is unlinked" in llamacpp_server.log_path.read_text(errors="replace")


def test_sigterm_shuts_down_cleanly(tiny_mistral: ModelSpec, tmp_path: Path) -> None:
    """llama.cpp installs SIGINT/SIGTERM handlers when it starts; ours (uvicorn's) must still get the signal."""
    server = start(tiny_mistral, tmp_path, engine="llamacpp")
    try:
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(timeout=60)
        assert "Application shutdown complete" in server.log_path.read_text(errors="replace")
    finally:
        stop_server(server)


def cached_tokens(server: RunningServer) -> float:
    text = httpx.get(f"{server.base_url}/metrics", timeout=30).text
    return float(re.search(r"^llamacpp:prompt_tokens_cached_total (\S+)$", text, re.M).group(1))


def test_prefix_cache_reuses_a_shared_prompt(tiny_llamacpp_server: RunningServer) -> None:
    server = tiny_llamacpp_server
    prefix = [1, *range(2000, 2200)]
    before = cached_tokens(server)
    for tail in ([5, 6], [7, 8]):
        r = httpx.post(f"{server.base_url}/v1/completions", timeout=120,
                       json={"model": "tiny-mistral", "prompt": prefix + tail, "max_tokens": 2})
        assert r.status_code == 200
    assert cached_tokens(server) - before >= len(prefix)  # the second prompt reused the first one's KV
