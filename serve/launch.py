"""Run our server (`python -m serve`) as a child process for a task, and wait for it: one helper for the benchmark,
evaluation, chat-data generation and the test suite."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


class ServerStartError(RuntimeError):
    """The server exited or never became healthy; the message ends with its log's tail."""


@dataclass
class ServerProcess:
    url: str  # http://127.0.0.1:PORT
    proc: subprocess.Popen[bytes]
    log_path: Path
    started_s: float  # process start to /health 200

    def stop(self) -> None:
        stop(self.proc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, args: Sequence[str], log_path: Path, timeout: float = 900,
                 env: dict[str, str] | None = None) -> ServerProcess:
    """Start `python -m serve --model MODEL ARGS` on a free local port and wait until /health answers 200."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "serve", "--model", model, "--port", str(port), *args]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    proc = spawn(cmd, log_path, REPO, env)
    try:
        wait_healthy(url, proc, log_path, timeout)
    except BaseException:
        stop(proc)
        raise
    return ServerProcess(url, proc, log_path, time.monotonic() - start)


@contextlib.contextmanager
def served(model: str, args: Sequence[str], log_path: Path, timeout: float = 900,
           env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    """Our server for the duration of a block."""
    server = start_server(model, args, log_path, timeout, env)
    try:
        yield server
    finally:
        server.stop()


def spawn(cmd: list[str], log_path: Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                env=None if env is None else {**os.environ, **env})


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 900) -> None:
    """Poll /health until 200; fail with the log's tail if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerStartError(f"server exited with {proc.returncode}:\n{log_tail(log_path)}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise ServerStartError(f"server at {url} not healthy after {timeout:.0f}s:\n{log_tail(log_path)}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def log_tail(log_path: Path, n: int = 60) -> str:
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-n:])
