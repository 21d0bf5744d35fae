"""`python -m serve` flags and its refusals: one clear line, non-zero exit, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from serve.config import parse_config
from tests.conftest import REPO


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "serve", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def test_help_lists_every_flag() -> None:
    out = run("--help")
    assert out.returncode == 0
    for flag in ("--model", "--host", "--port", "--api-key", "--max-pending-requests", "--max-model-len", "--dtype",
                 "--enforce-eager", "--allow-pickle", "CASCADE_API_KEY", "--engine", "--kv-cache-gib",
                 "--draft-model", "--num-draft-tokens", "--restart-engine", "--gguf-quant", "--threads",
                 "--no-prefix-cache", "CASCADE_ENGINE"):
        assert flag in out.stdout, flag


@pytest.mark.parametrize(("args", "env", "needle"), [
    (["--model", "gpt-17"], None, "unknown model 'gpt-17'"),
    (["--port", "99999"], None, "is not a TCP port"),
    (["--port", "eighty"], None, "invalid int value"),
    ([], {"CASCADE_PORT": "eighty"}, "invalid int value"),
    (["--api-key", " "], None, "--api-key must not be empty"),
    (["--engine", "tgi"], None, "invalid choice: 'tgi'"),
    (["--kv-cache-gib", "-1"], None, "must be a positive number of GiB"),
    (["--num-draft-tokens", "0"], None, "must be between 1 and 16"),
    ([], {"CASCADE_ENGINE": "tgi"}, "--engine 'tgi' (or CASCADE_ENGINE) is not one of auto, vllm, llamacpp"),
])
def test_bad_flags(args: list[str], env: dict[str, str] | None, needle: str) -> None:
    out = run(*args, env=env)
    assert out.returncode == 2 and needle in out.stderr and "Traceback" not in out.stderr


def test_env_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASCADE_API_KEY", "k")
    monkeypatch.setenv("CASCADE_PORT", "9001")
    config = parse_config([])
    assert config.api_key == "k" and config.port == 9001
    assert parse_config(["--port", "9002"]).port == 9002  # flags win over the environment
