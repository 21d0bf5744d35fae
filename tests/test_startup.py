"""Starting a server: every failure is one clear line and a non-zero exit, and a second start of the same model loads
the compiled artefact instead of compiling again."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from models.registry import ModelSpec
from tests.conftest import REPO, RunningServer, start, stop_server


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "serve", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def one_line_error(out: subprocess.CompletedProcess[str], needle: str, code: int = 2) -> None:
    assert out.returncode == code, out.stderr[-2000:]
    assert needle in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stderr[-2000:]


def test_port_in_use(smollm2: ModelSpec) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        one_line_error(serve("--port", str(port)), f"port {port} on 127.0.0.1 is already in use")


def test_missing_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    one_line_error(serve("--model", str(tmp_path)), "has no weights")


@pytest.mark.parametrize(("args", "needle"), [
    (("--kv-cache-gib", "4000"), "not enough memory"),
    (("--kv-cache-gib", "0.001"), "less than one context"),
    (("--draft-model", "tiny-mistral"), "a drafter must share its target's tokenizer"),
    (("--draft-model", "smollm2-135m-instruct"), "is the served model itself"),
    (("--model", "no-such-model"), "unknown model 'no-such-model'"),
    (("--model", "voxtral-mini-3b"), "is a config-only entry"),
])
def test_bad_configuration_is_one_line(smollm2: ModelSpec, tiny_mistral: ModelSpec, args: tuple[str, ...],
                                       needle: str) -> None:
    one_line_error(serve(*args), needle)


def test_llamacpp_refuses_a_context_past_the_sliding_window(tiny_mistral: ModelSpec) -> None:
    one_line_error(serve("--model", "tiny-mistral", "--engine", "llamacpp", "--max-model-len", "1024"),
                   "without its sliding window of 512 tokens")


def test_llamacpp_refuses_an_audio_model(tiny_voxtral: ModelSpec) -> None:
    one_line_error(serve("--model", "tiny-voxtral", "--engine", "llamacpp"), "serves text only")


@pytest.mark.parametrize(("args", "needle"), [
    (("--limit-mm-per-prompt", "audio"), "is not MODALITY=COUNT"),
    (("--limit-mm-per-prompt", "video=2"), "modalities: audio, image"),
])
def test_bad_media_limits_are_one_line(args: tuple[str, ...], needle: str) -> None:
    out = serve(*args)
    assert out.returncode == 2 and needle in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


@pytest.mark.server
def test_the_kv_cache_is_sized_by_the_server(tiny_server: RunningServer) -> None:
    """`python -m serve` needs no environment from the Makefile: nothing sets VLLM_CPU_KVCACHE_SPACE, and vLLM gets
    an explicit KV cache from us (0.25 GiB for tiny-mistral) instead of reserving most of the machine's memory."""
    assert "VLLM_CPU_KVCACHE_SPACE" not in (REPO / "Makefile").read_text()
    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ
    assert "Explicitly set (0.25/" in tiny_server.log_path.read_text(errors="replace")


@pytest.mark.server
def test_second_start_loads_the_compiled_model(tiny_server: RunningServer, tmp_path: Path,
                                              vllm_cache_root: Path) -> None:
    """tiny_server compiled tiny-mistral into this session's vLLM cache; a second start must load that artefact
    (vLLM 0.32 on CPU could not, without serve/vllm_plugin.py, and compiled again at every start)."""
    cold = tiny_server.log_path.read_text(errors="replace")
    assert "saved AOT compiled function" in cold
    warm = start(tiny_server.spec, tmp_path, "--max-model-len", "1024", env={"VLLM_CACHE_ROOT": str(vllm_cache_root)})
    try:
        log = warm.log_path.read_text(errors="replace")
        assert "Directly load AOT compilation" in log
        assert "Compiling model again" not in log and "saved AOT compiled function" not in log
    finally:
        stop_server(warm)
