"""Shared fixtures: offline environment, prepared models, and real servers started once per session."""

from __future__ import annotations

import os

# Offline before anything imports huggingface_hub: tests must never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels run under the interpreter when there is no GPU; it is chosen when a kernel module is imported.
# Kernel outputs start as NaN, so a row a kernel forgets to write fails its test.
os.environ.setdefault("CASCADE_KERNEL_POISON", "1")
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from models.prepare import prepare
from models.registry import ModelSpec, get_model
from serve.launch import ServerProcess, start_server

REPO = Path(__file__).resolve().parents[1]
SERVER_START_TIMEOUT = 900  # the first start compiles with torch inductor: minutes on 2 cores
ENGINES = ("vllm", "llamacpp")


@dataclass
class RunningServer:
    spec: ModelSpec
    engine: str
    api_key: str | None
    process: ServerProcess

    @property
    def base_url(self) -> str:
        return self.process.url

    @property
    def proc(self):
        return self.process.proc

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def start(spec: ModelSpec, tmp: Path, *args: str, engine: str = "vllm", api_key: str | None = None,
          env: dict[str, str] | None = None) -> RunningServer:
    cmd = ["--engine", engine, *args] + (["--api-key", api_key] if api_key else [])
    process = start_server(spec.name, cmd, tmp / f"server-{spec.name}-{engine}.log", SERVER_START_TIMEOUT, env)
    return RunningServer(spec, engine, api_key, process)


def stop_server(server: RunningServer) -> None:
    server.process.stop()


class LocalRenderer:
    """Renders chat prompts here exactly as a server for `spec` does."""

    def __init__(self, spec: ModelSpec) -> None:
        from models.tokenizers import load_tokenizer

        self.spec = spec
        self.tokenizer = load_tokenizer(spec)

    def prompt(self, messages: list[dict[str, Any]], **extra: Any) -> list[int]:
        import asyncio

        from serve.chat import render_prompt
        from serve.media import MediaLimits, fetch_payload, load_media
        from serve.protocol import ChatCompletionRequest

        req = ChatCompletionRequest.model_validate({"model": self.spec.name, "messages": messages} | extra)
        limits = MediaLimits()
        media = [load_media(param, part, *asyncio.run(fetch_payload(param, part, limits)), limits)
                 for param, part in req.media_parts()]
        return render_prompt(self.spec, self.tokenizer, req, media)[0]


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


def _smollm2_server(smollm2: ModelSpec, tmp: Path, engine: str, *args: str) -> RunningServer:
    """SmolLM2 with an API key and a small admission limit.

    SmolLM2 is not a reasoning model; the `<think>` parser is switched on so that reasoning tests run on real
    weights (structured outputs force a thinking section). Outputs without tags pass through unchanged.
    `--reasoning-content` also sends the thinking under its pre-0.17 vLLM name.
    """
    return start(smollm2, tmp, "--max-model-len", "2048", "--max-pending-requests", "8", "--reasoning-format",
                 "think-tags", "--reasoning-content", *args, engine=engine, api_key="test-key")


@pytest.fixture(scope="session")
def vllm_server(smollm2: ModelSpec, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """SmolLM2 on the vLLM engine (what evaluation and chat data need: prompt log-probs)."""
    s = _smollm2_server(smollm2, tmp_path_factory.mktemp("server-vllm"), "vllm")
    yield s
    stop_server(s)


@pytest.fixture(scope="session")
def llamacpp_server(smollm2: ModelSpec, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """SmolLM2 on the llama.cpp engine (f16 GGUF, exported on first use). Without the prefix cache: llama.cpp's f16
    kernels round a re-evaluated prompt token differently, and the matrix compares repeated greedy requests
    (tests/test_llamacpp.py checks the cache itself)."""
    s = _smollm2_server(smollm2, tmp_path_factory.mktemp("server-llamacpp"), "llamacpp", "--no-prefix-cache")
    yield s
    stop_server(s)


@pytest.fixture(scope="session", params=ENGINES)
def server(request: pytest.FixtureRequest) -> RunningServer:
    """The API test matrix: every test that takes `server` runs against both engines, which keep the same promises."""
    return request.getfixturevalue(f"{request.param}_server")


@pytest.fixture(scope="session")
def vllm_cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A compile cache of this session's own, so a test can tell a cold start from a warm one."""
    return tmp_path_factory.mktemp("vllm-cache")


@pytest.fixture(scope="session")
def tiny_server(tiny_mistral: ModelSpec, vllm_cache_root: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[RunningServer]:
    """A tiny Mistral model (Tekken tokenizer, mistral_common prompts) with auth off, compiled (cold start)."""
    s = start(tiny_mistral, tmp_path_factory.mktemp("tiny"), "--max-model-len", "1024",
              env={"VLLM_CACHE_ROOT": str(vllm_cache_root)})
    yield s
    stop_server(s)


@pytest.fixture(scope="session")
def tiny_llamacpp_server(tiny_mistral: ModelSpec, tmp_path_factory: pytest.TempPathFactory
                         ) -> Iterator[RunningServer]:
    """tiny-mistral on llama.cpp (Tekken vocabulary in its GGUF; the context is its 512-token sliding window)."""
    s = start(tiny_mistral, tmp_path_factory.mktemp("tiny-llamacpp"), engine="llamacpp")
    yield s
    stop_server(s)


@pytest.fixture(scope="session")
def tiny_ministral3() -> ModelSpec:
    spec = get_model("tiny-ministral3")
    prepare(spec)
    return spec


@pytest.fixture(scope="session")
def ministral_server(tiny_ministral3: ModelSpec, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Tiny Ministral 3 with a Tekken v13 tokenizer: [THINK] reasoning and v11 `[TOOL_CALLS]name[ARGS]` calls."""
    s = start(tiny_ministral3, tmp_path_factory.mktemp("ministral"), "--max-model-len", "1024", "--enforce-eager")
    yield s
    stop_server(s)


@pytest.fixture(scope="session")
def tiny_voxtral() -> ModelSpec:
    spec = get_model("tiny-voxtral")
    prepare(spec)
    return spec


@pytest.fixture(scope="session")
def voxtral_server(tiny_voxtral: ModelSpec, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Tiny Voxtral on vLLM (Mistral-native files), with small media limits the tests reach."""
    s = start(tiny_voxtral, tmp_path_factory.mktemp("voxtral"), "--max-model-len", "1024", "--enforce-eager",
              "--limit-mm-per-prompt", "audio=2", "--max-audio-seconds", "25", engine="auto")
    yield s
    stop_server(s)


@pytest.fixture(scope="session")
def tiny_vision() -> ModelSpec:
    spec = get_model("tiny-ministral3-vision")
    prepare(spec)
    return spec


@pytest.fixture(scope="session")
def vision_server(tiny_vision: ModelSpec, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Tiny Mistral 3 with vision on vLLM (Pixtral from Mistral-native files, torchvision's Python half)."""
    s = start(tiny_vision, tmp_path_factory.mktemp("vision"), "--max-model-len", "1024", "--enforce-eager",
              "--limit-mm-per-prompt", "image=2", "--max-image-pixels", "250000", engine="auto")
    yield s
    stop_server(s)


@pytest.fixture(scope="session")
def ministral_llamacpp_server(tiny_ministral3: ModelSpec, tmp_path_factory: pytest.TempPathFactory
                              ) -> Iterator[RunningServer]:
    """tiny-ministral3 on llama.cpp (`mistral3` GGUF: YaRN rope, [THINK] kept as a special token in the text)."""
    s = start(tiny_ministral3, tmp_path_factory.mktemp("ministral-llamacpp"), "--max-model-len", "1024",
              engine="llamacpp")
    yield s
    stop_server(s)
