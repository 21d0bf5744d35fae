"""Start a server: check everything that can be checked before an engine loads (the model and its weights, the
drafter, the port, the memory), build the engine, start it, then serve until stopped.

Every failure at start is one line on stderr naming the problem and the fix, and a non-zero exit (2: bad
configuration, 1: the engine failed to start), never a traceback. The KV cache is sized here, from the model and
the machine, instead of vLLM's CPU default of most of the machine's memory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import logging
import math
import os
import socket
import sys

from models.registry import ModelSpec
from serve.config import ServerConfig
from serve.engine import Engine, EngineStartError
from serve.machine import available_memory, gpu_memory
from serve.vllm_engine import ScaleOut  # plain settings: vLLM itself loads only when an engine starts

log = logging.getLogger(__name__)

GiB = 1 << 30
DEFAULT_KV_TOKENS = 32768  # at least this many tokens of KV cache by default (4 full contexts if that is more)
GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default share of each GPU's memory when it sizes the KV cache itself
ENGINE_OVERHEAD = {"vllm": 2 * GiB, "llamacpp": GiB // 2}  # processes, imports, activations (measured RSS, rounded)


class StartupError(Exception):
    """A configuration or environment problem found before serving; the message says what to change."""


def run(config: ServerConfig) -> int:
    sock = None
    try:
        sock = bind(config.host, config.port)
        engine = prepare_engine(config)
    except StartupError as e:
        if sock is not None:
            sock.close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    return asyncio.run(serve(engine, config, sock))


async def serve(engine: Engine, config: ServerConfig, sock: socket.socket) -> int:
    import uvicorn

    from serve.app import AppSettings, create_app
    from serve.http import uvicorn_config
    from serve.supervisor import EngineSupervisor

    try:
        await engine.start()
    except EngineStartError as e:
        print(f"error: {e}", file=sys.stderr)
        engine.shutdown()
        return 1
    except Exception as e:  # an unforeseen failure after the engine came up (its tokenizer, say): still one line
        log.debug("engine start failed", exc_info=True)
        print(f"error: the {engine.name} engine failed to start: {type(e).__name__}: {e} (--log-level debug "
              "shows the traceback)", file=sys.stderr)
        engine.shutdown()
        return 1
    exit_code = 0
    server: uvicorn.Server | None = None

    def on_fatal(code: int) -> None:
        nonlocal exit_code
        exit_code = code
        if server is not None:
            server.should_exit = True

    supervisor = EngineSupervisor(engine, restart=config.restart_engine, on_fatal=on_fatal)
    app = create_app(engine, AppSettings(api_key=config.api_key, max_pending_requests=config.max_pending_requests,
                                         reasoning_content=config.reasoning_content,
                                         media_limits=config.media_limits()), supervisor)
    spec = engine.spec
    log.info("cascade server for %s on http://%s:%d (engine %s, auth %s, tools %s, reasoning %s)", spec.name,
             config.host, config.port, engine.name, "on" if config.api_key else "off", spec.tool_format,
             spec.reasoning_format)
    server = uvicorn.Server(uvicorn_config(app, config.log_level))
    try:
        await server.serve(sockets=[sock])  # the app's lifespan shuts the engine down
    finally:
        engine.shutdown()  # in case the app never started (shutdown twice is a no-op)
    return exit_code


# ---------------------------------------------------------------------------------------------------------------
# checks before any engine loads


def resolve_engine(engine: str, adapters: bool = False, media: tuple[str, ...] = (), scaled: bool = False) -> str:
    """`auto`: vLLM where there is a GPU, LoRA adapters to serve per request, a model that takes audio or images, or
    vLLM scale-out settings; on a CPU-only machine llama.cpp, which `make bench-serve` measured faster for one to a
    few clients (vLLM overtakes it from about 16 concurrent streams; README, "Engines")."""
    if engine == "llamacpp" and scaled:
        raise StartupError("tensor, pipeline and data parallelism and the chunked-prefill settings are vLLM's: use "
                           "--engine vllm (or auto), or run llama.cpp replicas behind a load balancer "
                           "(deploy/README.md)")
    if engine == "llamacpp" and media:
        raise StartupError(f"the llamacpp engine serves text only and this model takes {' and '.join(media)}: use "
                           "--engine vllm (or auto)")
    if engine != "auto":
        return engine
    if adapters or media or scaled or any(os.path.exists(dev) for dev in ("/dev/nvidia0", "/dev/kfd")):
        return "vllm"
    import importlib.util

    return "llamacpp" if importlib.util.find_spec("xllamacpp") is not None else "vllm"


def prepare_engine(config: ServerConfig) -> Engine:
    spec = resolve_model(config.model, config.allow_pickle)
    scale = scale_out(config)
    config = dataclasses.replace(config, engine=resolve_engine(config.engine, bool(config.lora), spec.media,
                                                               scale != ScaleOut()))
    if "image" in spec.media:
        from serve.torchvision_shim import ShimError, activate

        try:
            activate()  # before vLLM imports its Pixtral code (and the engine processes inherit it)
        except ShimError as e:
            raise StartupError(str(e)) from None
    overrides = {k: getattr(config, k) for k in ("tool_format", "reasoning_format") if getattr(config, k)}
    spec = dataclasses.replace(spec, **overrides)
    drafter = None
    if config.draft_model:
        from serve.drafters import DrafterError, check_drafter, warn_if_slower

        drafter = resolve_model(config.draft_model, config.allow_pickle, what="--draft-model")
        try:
            check_drafter(spec, drafter)
        except DrafterError as e:
            raise StartupError(str(e)) from None
        warn_if_slower(spec.name, drafter.name, config.engine, config.num_draft_tokens)
    adapters = _adapters(config, spec)
    max_model_len = context_length(spec, config)
    check_scale_out(scale, max_model_len)
    gpus = gpu_memory() if config.engine == "vllm" else []
    kv_bytes = kv_cache_bytes(config, spec, drafter, max_model_len, on_gpu=bool(gpus))
    if not gpus:
        check_memory(config.engine, spec, drafter, kv_bytes, replicas=scale.data_parallel_size)
    elif scale.distributed_executor_backend != "ray":  # Ray's GPUs are other nodes': vLLM checks them there
        check_gpu_memory(config, spec, drafter, kv_bytes, max_model_len, scale, gpus)
    if config.engine == "llamacpp":
        return _llamacpp_engine(config, spec, drafter, max_model_len, kv_bytes)
    from serve.vllm_engine import DraftSettings, VLLMEngine, VLLMSettings

    # vLLM sizes the KV cache per worker, each holding 1/(TP x PP) of it
    kv_per_worker = None if kv_bytes is None else kv_bytes // scale.workers_per_replica
    draft = DraftSettings(drafter.checkpoint_dir, config.num_draft_tokens) if drafter else None
    return VLLMEngine(spec, VLLMSettings(max_model_len=max_model_len, dtype=config.dtype or spec.dtype,
                                         kv_cache_bytes=kv_per_worker,
                                         enforce_eager=config.enforce_eager,
                                         max_num_seqs=config.max_num_seqs, draft=draft,
                                         prefix_cache=config.prefix_cache, adapters=adapters,
                                         media_per_prompt=config.media_limits().per_prompt, scale=scale))


def scale_out(config: ServerConfig) -> ScaleOut:
    return ScaleOut(tensor_parallel_size=config.tensor_parallel_size,
                    pipeline_parallel_size=config.pipeline_parallel_size,
                    data_parallel_size=config.data_parallel_size,
                    distributed_executor_backend=config.distributed_executor_backend,
                    enable_chunked_prefill=config.enable_chunked_prefill,
                    max_num_batched_tokens=config.max_num_batched_tokens)


def check_scale_out(scale: ScaleOut, max_model_len: int) -> None:
    """What vLLM would find only after minutes of start-up (or as a worker's traceback), found first."""
    if scale.enable_chunked_prefill is False and scale.max_num_batched_tokens is not None \
            and scale.max_num_batched_tokens < max_model_len:
        raise StartupError(f"--max-num-batched-tokens {scale.max_num_batched_tokens} is below the context length "
                           f"{max_model_len}: without chunked prefill a whole prompt must fit one step (raise it, "
                           "lower --max-model-len, or enable chunked prefill)")
    if scale.distributed_executor_backend == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise StartupError("--distributed-executor-backend ray needs Ray in this environment (`pip install "
                               "'ray[default]'`) and a running cluster (`ray start --head`)")
        return  # the GPUs are the Ray cluster's, not this node's
    import torch

    if torch.cuda.is_available():
        local = scale.workers_per_replica * scale.data_parallel_size
        if local > torch.cuda.device_count():
            raise StartupError(f"tensor x pipeline x data parallel = {local} GPUs, but this node has "
                               f"{torch.cuda.device_count()}: lower the sizes, or spread them over nodes with "
                               "--distributed-executor-backend ray")


def _adapters(config: ServerConfig, spec: ModelSpec) -> tuple:
    """The --lora adapters, checked against the served model before any engine loads."""
    if not config.lora:
        return ()
    from serve.adapters import AdapterError, max_lora_rank, resolve_adapters

    if config.engine != "vllm":
        raise StartupError(f"--lora serves adapters per request on the vllm engine, not {config.engine}: use "
                           "--engine vllm, or serve the merged model (a LoRA post-training run registers it)")
    try:
        adapters = resolve_adapters(spec, config.lora, config.allow_pickle)
        max_lora_rank(adapters)  # a rank vLLM cannot hold fails here, not inside the engine
    except AdapterError as e:
        raise StartupError(str(e)) from None
    log.info("LoRA adapters served per request: %s (on CPU this runs vLLM eager: no torch.compile)",
             ", ".join(f"{a.name} (rank {a.rank})" for a in adapters))
    return adapters


def _llamacpp_engine(config: ServerConfig, spec: ModelSpec, drafter: ModelSpec | None, max_model_len: int,
                     kv_bytes: int) -> Engine:
    try:
        import xllamacpp  # noqa: F401
    except ImportError:
        raise StartupError("the llamacpp engine needs the xllamacpp wheel: `make install` (DEVICE=cpu) installs "
                           "it, or `pip install xllamacpp==2026.10.11549`") from None
    from models.gguf import GGUFExportError, export_gguf
    from serve.llamacpp_engine import LlamaCppEngine, LlamaCppSettings, default_threads

    try:
        gguf = export_gguf(spec, config.gguf_quant)
        draft_gguf = export_gguf(drafter, config.gguf_quant) if drafter else None
    except GGUFExportError as e:
        raise StartupError(f"{spec.name} cannot run on llama.cpp: {e}") from None
    except OSError as e:  # a full disk, an unreadable checkpoint
        raise StartupError(f"could not export {spec.name} to GGUF: {e}") from None
    tokens = kv_bytes // kv_token_bytes(config, spec, drafter)  # a drafter keeps its own cache of as many tokens
    return LlamaCppEngine(spec, LlamaCppSettings(
        gguf=gguf, max_model_len=max_model_len, kv_cache_tokens=max(tokens, max_model_len),
        parallel=config.max_num_seqs or 32, threads=config.threads or default_threads(), draft_gguf=draft_gguf,
        num_draft_tokens=config.num_draft_tokens, max_requests=config.max_pending_requests,
        prefix_cache=config.prefix_cache))


def resolve_model(name: str, allow_pickle: bool, what: str = "--model") -> ModelSpec:
    from models.checkpoint import MissingCheckpointError, UnsafeCheckpointError
    from models.downloads import DownloadError, IntegrityError
    from models.prepare import prepare
    from models.registry import UnknownModelError, get_model

    try:
        spec = get_model(name)
        prepare(spec, allow_pickle=allow_pickle)
    except UnknownModelError as e:
        raise StartupError(f"{what}: {e} (or give a checkpoint directory)") from None
    except MissingCheckpointError as e:
        if spec.source == "config":
            raise StartupError(f"{what}: {e}") from None
        raise StartupError(f"{what}: {e}; run `python -m models prepare {name}` or the recipe that makes it") \
            from None
    except UnsafeCheckpointError as e:
        raise StartupError(f"{what}: {e}") from None
    except (DownloadError, IntegrityError, OSError) as e:
        raise StartupError(f"{what}: preparing {name} failed: {e}") from None
    return spec


def context_length(spec: ModelSpec, config: ServerConfig) -> int:
    length = config.max_model_len or spec.max_context
    window = _config(spec).get("sliding_window")
    if config.engine == "llamacpp" and window and length > window:
        if config.max_model_len:
            raise StartupError(f"llama.cpp runs {spec.name} without its sliding window of {window} tokens, so "
                               f"contexts over {window} tokens would compute another model: use --max-model-len "
                               f"{window} or --engine vllm")
        log.info("llama.cpp has no sliding window: serving %s with a context of %d tokens (its window)", spec.name,
                 window)
        length = window
    return length


def _config(spec: ModelSpec) -> dict:
    """The language model's config (an audio/vision model nests it under text_config)."""
    config = json.loads((spec.checkpoint_dir / "config.json").read_text())
    return config.get("text_config", config)


def kv_bytes_per_token(spec: ModelSpec, dtype_bytes: int) -> int:
    """K and V for every layer: 2 x layers x KV heads x head size."""
    c = _config(spec)
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    return 2 * c["num_hidden_layers"] * (c.get("num_key_value_heads") or heads) * head_dim * dtype_bytes


_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def served_dtype_bytes(config: ServerConfig, spec: ModelSpec) -> int:
    """Bytes per element as served: vLLM's dtype (weights and KV cache); llama.cpp keeps its KV cache in f16."""
    return 2 if config.engine == "llamacpp" else _DTYPE_BYTES[config.dtype or spec.dtype]


def kv_token_bytes(config: ServerConfig, spec: ModelSpec, drafter: ModelSpec | None) -> int:
    """KV bytes of one token, model and drafter together, at the served dtype (llama.cpp: f16)."""
    dtype_bytes = served_dtype_bytes(config, spec)
    return kv_bytes_per_token(spec, dtype_bytes) + (kv_bytes_per_token(drafter, dtype_bytes) if drafter else 0)


def kv_cache_bytes(config: ServerConfig, spec: ModelSpec, drafter: ModelSpec | None, max_model_len: int,
                   on_gpu: bool = False) -> int | None:
    """--kv-cache-gib; else on a GPU None: vLLM profiles the model and gives the cache what 90% of the GPU leaves
    (the host's memory says nothing there); else room for max(4 contexts, 32k tokens), at most a quarter of the free
    memory."""
    per_token = kv_token_bytes(config, spec, drafter)
    needed = per_token * max_model_len
    if config.kv_cache_gib is not None:
        chosen = int(config.kv_cache_gib * GiB)
        if chosen < needed:
            raise StartupError(f"--kv-cache-gib {config.kv_cache_gib} holds {chosen // per_token} tokens, less than "
                               f"one context of {max_model_len}: raise it to at least "
                               f"{math.ceil(needed / GiB * 100) / 100} or lower --max-model-len")
        return chosen
    if on_gpu:
        return None
    wanted = per_token * max(4 * max_model_len, DEFAULT_KV_TOKENS)
    cap = available_memory() // 4
    chosen = max(min(wanted, cap), needed)
    return math.ceil(chosen / (GiB // 4)) * (GiB // 4)  # whole quarters of a GiB


def check_memory(engine: str, spec: ModelSpec, drafter: ModelSpec | None, kv_bytes: int, replicas: int = 1) -> None:
    """Host memory for weights, KV cache and engine, once per data-parallel replica (what a CPU run holds)."""
    from models.checkpoint import weight_files

    weights = replicas * sum(f.stat().st_size for m in (spec, drafter) if m for f in weight_files(m.checkpoint_dir))
    kv_bytes *= replicas
    need = weights + kv_bytes + replicas * ENGINE_OVERHEAD[engine]
    available = available_memory()
    if need > available:
        raise StartupError(f"not enough memory: the weights ({weights / GiB:.2f} GiB), the KV cache "
                           f"({kv_bytes / GiB:.2f} GiB) and the engine (~{ENGINE_OVERHEAD[engine] / GiB:.1f} GiB) "
                           f"need {need / GiB:.1f} GiB but {available / GiB:.1f} GiB is free: lower --kv-cache-gib "
                           "or --max-model-len, or stop other processes")


def check_gpu_memory(config: ServerConfig, spec: ModelSpec, drafter: ModelSpec | None, kv_bytes: int | None,
                     max_model_len: int, scale: ScaleOut, gpus: list[tuple[int, int]]) -> None:
    """Each GPU holds 1/(TP x PP) of the weights and of the KV cache (at least one context): found here, not after
    minutes of loading as a CUDA out-of-memory traceback in a worker."""
    from models.checkpoint import count_parameters

    workers = scale.workers_per_replica
    used = gpus[:workers * scale.data_parallel_size]
    weights = served_dtype_bytes(config, spec) * sum(count_parameters(m.checkpoint_dir) for m in (spec, drafter) if m)
    kv = kv_bytes if kv_bytes is not None else kv_token_bytes(config, spec, drafter) * max_model_len
    free = min(f for f, _ in used)
    # An explicit cache is allocated as asked; otherwise vLLM keeps to 90% of the GPU and needs that much free.
    budget = free if kv_bytes is not None else min(free, int(GPU_MEMORY_UTILIZATION * min(t for _, t in used)))
    need = (weights + kv) // workers
    if need > budget:
        what = "the KV cache" if kv_bytes is not None else "one context of KV cache"
        raise StartupError(f"not enough GPU memory: the weights ({weights / GiB:.2f} GiB) and {what} "
                           f"({kv / GiB:.2f} GiB) over {workers} GPU(s) need {need / GiB:.1f} GiB each but "
                           f"{budget / GiB:.1f} GiB is usable: raise --tensor-parallel-size, lower --max-model-len "
                           "or --kv-cache-gib, or free the GPU")


def bind(host: str, port: int) -> socket.socket:
    """Bind the port now, before minutes of engine start, so a port in use fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto given explicitly: asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP, and connections
    # accepted from a proto-0 socket inherit 0. Without it, Nagle held back each response's first body chunk until
    # the client's delayed ACK (measured: first streamed token 40-50 ms late on keep-alive connections).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise StartupError(f"port {port} on {host} is already in use (another server?): stop it or choose "
                               "another with --port / CASCADE_PORT") from None
        if e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) or isinstance(e, socket.gaierror):
            raise StartupError(f"cannot listen on {host}: it is not an address of this machine (--host)") from None
        if e.errno == errno.EACCES:
            raise StartupError(f"port {port} needs privileges: choose one above 1023 with --port") from None
        raise StartupError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock

