"""Shared fixtures: offline environment, prepared models, and real servers started once per session."""

from __future__ import annotations

import os

# Offline before anything imports huggingface_hub: tests must never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Triton kernels run under the interpreter when there is no GPU; it is chosen when a kernel module is imported.
# Kernel outputs start as NaN, so a row a kernel forgets to write fails its test.
os.environ.setdefault("CASCADE_KERNEL_POISON", "1")
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from models.prepare import prepare
from models.registry import ModelSpec, get_model
from serve.launch import free_port, spawn, stop, wait_healthy

REPO = Path(__file__).resolve().parents[1]
SERVER_START_TIMEOUT = 900  # the first start compiles with torch inductor: minutes on 2 cores


@dataclass
class RunningServer:
    spec: ModelSpec
    base_url: str  # http://127.0.0.1:PORT
    api_key: str | None
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def start_server(spec: ModelSpec, tmp: Path, *args: str, api_key: str | None = None) -> RunningServer:
    port = free_port()
    log_path = tmp / f"server-{spec.name}.log"
    cmd = [sys.executable, "-m", "serve", "--model", spec.name, "--port", str(port), *args]
    if api_key:
        cmd += ["--api-key", api_key]
    server = RunningServer(spec, f"http://127.0.0.1:{port}", api_key, spawn(cmd, log_path, REPO), log_path)
    wait_healthy(server.base_url, server.proc, log_path, timeout=SERVER_START_TIMEOUT)
    return server


def stop_server(server: RunningServer) -> None:
    stop(server.proc)


class LocalRenderer:
    """The two engine attributes `serve.chat.render_prompt` reads, to render here what a server renders."""

    def __init__(self, spec: ModelSpec) -> None:
        from models.tokenizers import load_tokenizer

        self.spec = spec
        self.tokenizer = load_tokenizer(spec)

    def prompt(self, messages: list[dict[str, Any]], **extra: Any) -> list[int]:
        from serve.chat import render_prompt
        from serve.protocol import ChatCompletionRequest

        req = ChatCompletionRequest.model_validate({"model": self.spec.name, "messages": messages} | extra)
        return render_prompt(self, req)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def smollm2() -> ModelSpec:
    spec = get_model("smollm2-135m-instruct")
    prepare(spec)
    return spec


@pytest.fixture(scope="session")
def tiny_mistral() -> ModelSpec:
    spec = get_model("tiny-mistral")
    prepare(spec)
    return spec


@pytest.fixture(scope="session")
def server(smollm2: ModelSpec, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The default model on the real vLLM engine, with an API key and a small admission limit.

    SmolLM2 is not a reasoning model; the `<think>` parser is switched on so that reasoning tests run on real
    weights (structured outputs force a thinking section). Outputs without tags pass through unchanged.
    `--reasoning-content` also sends the thinking under its pre-0.17 vLLM name.
    """
    s = start_server(smollm2, tmp_path_factory.mktemp("server"), "--max-model-len", "2048",
                     "--max-pending-requests", "8", "--reasoning-format", "think-tags", "--reasoning-content",
                     api_key="test-key")
    yield s
    stop_server(s)


@pytest.fixture(scope="session")
def tiny_server(tiny_mistral: ModelSpec, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A tiny Mistral model (Tekken tokenizer, mistral_common prompts) with auth off."""
    s = start_server(tiny_mistral, tmp_path_factory.mktemp("tiny"), "--max-model-len", "1024")
    yield s
    stop_server(s)


@pytest.fixture(scope="session")
def ministral_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Tiny Ministral 3 with a Tekken v13 tokenizer: [THINK] reasoning and v11 `[TOOL_CALLS]name[ARGS]` calls."""
    spec = get_model("tiny-ministral3")
    prepare(spec)
    s = start_server(spec, tmp_path_factory.mktemp("ministral"), "--max-model-len", "1024", "--enforce-eager")
    yield s
    stop_server(s)
