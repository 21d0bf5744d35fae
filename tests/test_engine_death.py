"""When the engine process dies the server does not linger as a 503 zombie: by default it exits non-zero (so a
supervisor restarts it, as vLLM's own server does); with --restart-engine it restarts the engine in-process.

(The llama.cpp engine runs inside the server process: if it crashes, the server is gone with it.)"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import psutil
import pytest

from models.registry import ModelSpec
from serve.supervisor import EXIT_ENGINE_DEAD
from tests.conftest import RunningServer, start, stop_server

pytestmark = pytest.mark.server


def kill_engine(server: RunningServer) -> None:
    children = psutil.Process(server.proc.pid).children(recursive=True)
    assert children, "vLLM runs its engine core in a child process"
    for child in children:
        child.kill()


def test_the_server_exits_when_its_engine_dies(tiny_mistral: ModelSpec, tmp_path: Path) -> None:
    server = start(tiny_mistral, tmp_path, "--max-model-len", "256", "--enforce-eager")
    try:
        kill_engine(server)
        assert server.proc.wait(timeout=120) == EXIT_ENGINE_DEAD
        assert f"exiting with status {EXIT_ENGINE_DEAD}" in server.log_path.read_text(errors="replace")
    finally:
        stop_server(server)


def test_restart_engine_brings_it_back(tiny_mistral: ModelSpec, tmp_path: Path) -> None:
    server = start(tiny_mistral, tmp_path, "--max-model-len", "256", "--enforce-eager", "--restart-engine")
    url = server.base_url
    body = {"model": "tiny-mistral", "prompt": [1, 1000, 1001], "max_tokens": 4, "temperature": 0}
    try:
        expected = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        kill_engine(server)
        deadline = time.monotonic() + 120
        health = httpx.get(f"{url}/health", timeout=10)
        while health.status_code == 200 and time.monotonic() < deadline:  # until the supervisor notices
            time.sleep(0.2)
            health = httpx.get(f"{url}/health", timeout=10)
        assert health.status_code == 503 and health.json()["on_engine_death"] == "restart"
        # while the engine is down, a new stream is refused with 503 before anything is sent (no 200 + error event)
        r = httpx.post(f"{url}/v1/completions", json=body | {"stream": True}, timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            health = httpx.get(f"{url}/health", timeout=10)
            if health.status_code == 200:
                break
            time.sleep(0.5)
        assert health.json() == {"status": "ok", "engine": "vllm", "restarts": 1, "on_engine_death": "restart"}
        again = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert again.status_code == 200 and again.json()["choices"][0]["text"] == expected
        assert server.proc.poll() is None
    finally:
        stop_server(server)


def test_a_killed_server_leaves_no_engine_behind(tiny_mistral: ModelSpec, tmp_path: Path) -> None:
    """SIGKILL gives the server no chance to stop its engine: the engine's processes notice and stop themselves
    (serve/vllm_plugin.py), instead of polling a queue forever."""
    server = start(tiny_mistral, tmp_path, "--max-model-len", "256", "--enforce-eager")
    children = psutil.Process(server.proc.pid).children(recursive=True)
    server.proc.kill()
    server.proc.wait()
    _, alive = psutil.wait_procs(children, timeout=60)
    assert alive == [], [p.name() for p in alive]
