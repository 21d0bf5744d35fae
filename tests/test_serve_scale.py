"""vLLM's scale-out as server options: flags and environment, the engine args we build, refusals before start, and
a real tensor-parallel engine (two CPU workers) answering as the one-worker engine does."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import httpx
import pytest

from models.registry import ModelSpec
from serve.config import parse_config
from serve.engine import EngineStartError
from serve.startup import StartupError, check_scale_out, resolve_engine, scale_out
from serve.vllm_engine import ScaleOut, VLLMEngine, VLLMSettings, cpu_thread_binding
from tests.conftest import RunningServer, start, stop_server
from tests.test_serve_cli import run


def test_flags_and_environment_reach_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config(["-tp", "4", "--pipeline-parallel-size", "2", "-dp", "3", "--distributed-executor-backend",
                           "ray", "--no-enable-chunked-prefill", "--max-num-batched-tokens", "8192"])
    assert scale_out(config) == ScaleOut(4, 2, 3, "ray", False, 8192)
    monkeypatch.setenv("CASCADE_TENSOR_PARALLEL_SIZE", "2")
    monkeypatch.setenv("CASCADE_ENABLE_CHUNKED_PREFILL", "0")
    monkeypatch.setenv("CASCADE_DISTRIBUTED_EXECUTOR_BACKEND", "mp")
    config = parse_config([])
    assert (config.tensor_parallel_size, config.enable_chunked_prefill, config.distributed_executor_backend) == \
        (2, False, "mp")
    assert parse_config(["--enable-chunked-prefill"]).enable_chunked_prefill is True  # the flag wins
    monkeypatch.delenv("CASCADE_ENABLE_CHUNKED_PREFILL")
    assert parse_config([]).enable_chunked_prefill is None  # unset: vLLM's default, not ours


@pytest.mark.parametrize(("args", "env", "needle"), [
    (["-tp", "0"], None, "--tensor-parallel-size 0 must be between 1 and 512"),
    (["--data-parallel-size", "9999"], None, "--data-parallel-size 9999 must be between 1 and 512"),
    (["--distributed-executor-backend", "slurm"], None, "invalid choice: 'slurm'"),
    ([], {"CASCADE_DISTRIBUTED_EXECUTOR_BACKEND": "slurm"}, "(or CASCADE_DISTRIBUTED_EXECUTOR_BACKEND) is not one"),
    ([], {"CASCADE_ENABLE_CHUNKED_PREFILL": "maybe"}, "CASCADE_ENABLE_CHUNKED_PREFILL='maybe' must be 1 or 0"),
    (["--max-num-batched-tokens", "8"], None, "--max-num-batched-tokens 8 is too small"),
    (["--model", "tiny-mistral", "--engine", "llamacpp", "-tp", "2"], None,
     "parallelism and the chunked-prefill settings are vLLM's"),
    (["--model", "tiny-mistral", "--distributed-executor-backend", "ray"], None, "needs Ray in this environment"),
    (["--model", "tiny-mistral", "--no-enable-chunked-prefill", "--max-num-batched-tokens", "512",
      "--max-model-len", "1024"], None, "--max-num-batched-tokens 512 is below the context length 1024"),
])
def test_refusals_are_one_line(args: list[str], env: dict[str, str] | None, needle: str) -> None:
    out = run(*args, env=env)
    assert out.returncode == 2 and needle in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


def test_parallel_serving_picks_vllm() -> None:
    assert resolve_engine("auto", scaled=True) == "vllm"
    with pytest.raises(StartupError, match="use --engine vllm"):
        resolve_engine("llamacpp", scaled=True)
    check_scale_out(ScaleOut(enable_chunked_prefill=True, max_num_batched_tokens=64), 4096)  # chunks: fine


def test_engine_args_carry_the_settings(tiny_mistral: ModelSpec) -> None:
    settings = VLLMSettings(max_model_len=1024, dtype="float32", kv_cache_bytes=1 << 28)
    plain = VLLMEngine(tiny_mistral, settings)._engine_args()
    scaled = VLLMEngine(tiny_mistral, dataclasses.replace(
        settings, scale=ScaleOut(4, 2, 3, "ray", False, 8192)))._engine_args()
    got = {k: getattr(scaled, k) for k in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size",
                                           "distributed_executor_backend", "enable_chunked_prefill",
                                           "max_num_batched_tokens")}
    assert got == {"tensor_parallel_size": 4, "pipeline_parallel_size": 2, "data_parallel_size": 3,
                   "distributed_executor_backend": "ray", "enable_chunked_prefill": False,
                   "max_num_batched_tokens": 8192}
    # unset settings leave vLLM's own defaults in place
    from vllm.engine.arg_utils import AsyncEngineArgs

    default = AsyncEngineArgs(model=str(tiny_mistral.checkpoint_dir))
    for key in got:
        assert getattr(plain, key) == getattr(default, key), key
    assert scaled.kv_cache_memory_bytes == plain.kv_cache_memory_bytes == 1 << 28


def test_cpu_workers_get_their_own_cores() -> None:
    assert cpu_thread_binding(list(range(8)), 2) == "0,1,2,3|4,5,6,7"
    assert cpu_thread_binding([2, 3, 5], 3) == "2|3|5"
    assert cpu_thread_binding(list(range(5)), 2) == "0,1|2,3"  # equal shares; the odd core is left out
    with pytest.raises(EngineStartError, match="need at least as many cores"):
        cpu_thread_binding([0, 1], 4)


@pytest.fixture(scope="module")
def tp2_server(tiny_mistral: ModelSpec, tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    """tiny-mistral with tensor parallelism 2: two vLLM CPU workers (gloo), each half the heads (~30 s, eager)."""
    s = start(tiny_mistral, tmp_path_factory.mktemp("tp2"), "--max-model-len", "1024", "--tensor-parallel-size", "2",
              "--enforce-eager", "--kv-cache-gib", "0.25")
    yield s
    stop_server(s)


def _greedy(server: RunningServer, prompt: str) -> tuple[list[str], list[float]]:
    body = {"model": server.spec.name, "prompt": prompt, "max_tokens": 12, "temperature": 0, "logprobs": 1}
    r = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    return lp["tokens"], lp["token_logprobs"]


def test_two_tensor_parallel_workers_answer_as_one(tp2_server: RunningServer, tiny_server: RunningServer,
                                                   ) -> None:
    log = tp2_server.log_path.read_text()
    assert "world_size=2" in log  # really two workers, not one process
    for prompt in ("The capital of France is", "1, 2, 3,", "def fibonacci(n):"):
        tokens_tp, logprobs_tp = _greedy(tp2_server, prompt)
        tokens_one, logprobs_one = _greedy(tiny_server, prompt)
        assert tokens_tp == tokens_one, prompt
        assert logprobs_tp == pytest.approx(logprobs_one, abs=2e-3), prompt


def test_container_limits_bound_memory_and_cores(tmp_path: Path) -> None:
    """Inside a pod the node's numbers are not ours: the cgroup's memory headroom and CPU quota are."""
    import psutil

    from serve.machine import available_memory, usable_cores

    assert available_memory(tmp_path) == pytest.approx(psutil.virtual_memory().available, rel=0.05)  # no cgroup
    (tmp_path / "memory.max").write_text("2147483648\n")
    (tmp_path / "memory.current").write_text("536870912\n")
    assert available_memory(tmp_path) == 3 << 29  # 2 GiB limit - 0.5 GiB used
    (tmp_path / "memory.max").write_text("max\n")
    assert available_memory(tmp_path) > 3 << 29
    cores = usable_cores(tmp_path)
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs
    assert usable_cores(tmp_path) == min(2, cores)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cores(tmp_path) == cores


def test_gpu_memory_is_checked_per_gpu(tiny_mistral: ModelSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU the host's memory says nothing: vLLM sizes the cache from the GPU, and weights + cache over
    TP x PP GPUs must fit each one's free memory. No GPU here: torch.cuda's answers are the boundary faked (the real
    CPU path is test_bad_configuration_is_one_line's `not enough memory`)."""
    import torch

    from serve.startup import prepare_engine

    def gpus(count: int, free_gib: float, total_gib: float = 80.0) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: (int(free_gib * 2**30), int(total_gib * 2**30)))

    def engine(*args: str) -> VLLMEngine:
        return prepare_engine(parse_config(["--model", "tiny-mistral", "--engine", "vllm", *args]))

    gpus(2, free_gib=79)
    assert engine().settings.kv_cache_bytes is None  # vLLM profiles and fills 90% of the GPU
    assert engine("-tp", "2", "--kv-cache-gib", "3").settings.kv_cache_bytes == 3 << 29  # per worker
    assert engine("--kv-cache-gib", "60").settings.kv_cache_bytes == 60 << 30  # more than the host has: a GPU's
    with pytest.raises(StartupError, match=r"not enough GPU memory: .* over 1 GPU\(s\) need 90.1 GiB each but 79.0"):
        engine("--kv-cache-gib", "90")
    assert engine("-tp", "2", "--kv-cache-gib", "90").settings.kv_cache_bytes == 45 << 30  # half on each
    gpus(1, free_gib=0.001)
    with pytest.raises(StartupError, match="one context of KV cache"):
        engine()
    with pytest.raises(StartupError, match="this node has 1"):
        engine("-tp", "2")
