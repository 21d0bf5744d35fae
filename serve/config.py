"""Server configuration: CLI flags, each with an environment variable as its default."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from models.gguf import QUANTS
from models.registry import DEFAULT_MODEL
from serve.formats import REASONING_FORMATS, TOOL_FORMATS
from serve.media import MediaLimits, parse_per_prompt

ENGINES = ("auto", "vllm", "llamacpp")
EXECUTOR_BACKENDS = ("mp", "ray")  # vLLM's: processes on this node, or a Ray cluster across nodes
MAX_PARALLEL = 512


@dataclass(frozen=True)
class ServerConfig:
    model: str = DEFAULT_MODEL
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_pending_requests: int = 128
    max_model_len: int | None = None
    dtype: str | None = None
    enforce_eager: bool = False
    max_num_seqs: int | None = None
    allow_pickle: bool = False
    tool_format: str | None = None
    reasoning_format: str | None = None
    reasoning_content: bool = False
    log_level: str = "info"
    engine: str = "auto"
    kv_cache_gib: float | None = None  # None: sized from the model, the context and the machine
    restart_engine: bool = False
    draft_model: str | None = None
    num_draft_tokens: int = 3
    gguf_quant: str = "f16"
    threads: int | None = None  # llama.cpp compute threads; None: one per core
    prefix_cache: bool = True
    lora: tuple[str, ...] = ()  # LoRA adapters served per request beside the model (serve/adapters.py)
    # audio and image inputs (serve/media.py)
    limit_mm_per_prompt: str = "audio=5,image=8"
    max_audio_seconds: float = 300.0
    max_image_pixels: int = 4096 * 4096
    max_media_bytes: int = 20 << 20
    allowed_media_domains: tuple[str, ...] = ()
    # vLLM's own scale-out (vLLM engine only; deploy/README.md "Serving at scale")
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    distributed_executor_backend: str | None = None  # None: vLLM's choice (mp on one node)
    enable_chunked_prefill: bool | None = None  # None: vLLM's default
    max_num_batched_tokens: int | None = None  # None: vLLM's default

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"--port {self.port} is not a TCP port")
        if self.max_pending_requests < 1:
            raise ValueError("--max-pending-requests must be at least 1")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("--api-key must not be empty")
        if self.kv_cache_gib is not None and not 0 < self.kv_cache_gib <= 4096:
            raise ValueError(f"--kv-cache-gib {self.kv_cache_gib} must be a positive number of GiB")
        if not 1 <= self.num_draft_tokens <= 16:
            raise ValueError(f"--num-draft-tokens {self.num_draft_tokens} must be between 1 and 16")
        if self.threads is not None and self.threads < 1:
            raise ValueError("--threads must be at least 1")
        if self.max_model_len is not None and self.max_model_len < 16:
            raise ValueError(f"--max-model-len {self.max_model_len} is too small (at least 16)")
        for flag in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            if not 1 <= getattr(self, flag) <= MAX_PARALLEL:
                raise ValueError(f"--{flag.replace('_', '-')} {getattr(self, flag)} must be between 1 and "
                                 f"{MAX_PARALLEL}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 16:
            raise ValueError(f"--max-num-batched-tokens {self.max_num_batched_tokens} is too small (at least 16)")
        try:
            self.media_limits()
        except ValueError as e:
            raise ValueError(str(e).replace("limit-mm-per-prompt", "--limit-mm-per-prompt")) from None
        # argparse checks `choices` for flags but not for defaults taken from the environment
        for flag, value, allowed in (("engine", self.engine, ENGINES), ("gguf-quant", self.gguf_quant, QUANTS),
                                     ("tool-format", self.tool_format, (None, *TOOL_FORMATS)),
                                     ("reasoning-format", self.reasoning_format, (None, *REASONING_FORMATS)),
                                     ("dtype", self.dtype, (None, "bfloat16", "float16", "float32")),
                                     ("distributed-executor-backend", self.distributed_executor_backend,
                                      (None, *EXECUTOR_BACKENDS)),
                                     ("log-level", self.log_level, ("debug", "info", "warning", "error"))):
            if value not in allowed:
                env = "CASCADE_" + flag.upper().replace("-", "_")
                raise ValueError(f"--{flag} {value!r} (or {env}) is not one of "
                                 f"{', '.join(a for a in allowed if a)}")


    def media_limits(self) -> MediaLimits:
        return MediaLimits(per_prompt=parse_per_prompt(self.limit_mm_per_prompt),
                           max_audio_seconds=self.max_audio_seconds, max_image_pixels=self.max_image_pixels,
                           max_bytes=self.max_media_bytes,
                           allowed_domains=tuple(d.lower() for d in self.allowed_media_domains))


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"CASCADE_{name}", default)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serve",
        description="OpenAI-compatible server for cascade models on vLLM's engine or llama.cpp's. "
                    "Every flag also reads an environment variable (shown in brackets).",
    )
    p.add_argument("--model", default=_env("MODEL", DEFAULT_MODEL),
                   help="registry name or checkpoint directory [CASCADE_MODEL] (default: %(default)s)")
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"),
                   help="bind address [CASCADE_HOST] (default: %(default)s)")
    p.add_argument("--port", type=int, default=_env("PORT", "8000"),
                   help="TCP port [CASCADE_PORT] (default: %(default)s)")
    p.add_argument("--api-key", default=_env("API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health and /metrics [CASCADE_API_KEY] "
                        "(default: off)")
    p.add_argument("--max-pending-requests", type=int, default=_env("MAX_PENDING_REQUESTS", "128"),
                   help="requests in flight before new ones get 429 [CASCADE_MAX_PENDING_REQUESTS] "
                        "(default: %(default)s)")
    p.add_argument("--max-model-len", type=int, default=_env("MAX_MODEL_LEN"),
                   help="context length in tokens [CASCADE_MAX_MODEL_LEN] (default: the registry's max context)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=_env("DTYPE"),
                   help="weights/activations dtype [CASCADE_DTYPE] (default: the registry's dtype)")
    p.add_argument("--enforce-eager", action="store_true", default=_env("ENFORCE_EAGER", "0") == "1",
                   help="skip torch.compile: faster first start, slower decoding [CASCADE_ENFORCE_EAGER=1]")
    p.add_argument("--max-num-seqs", type=int, default=_env("MAX_NUM_SEQS"),
                   help="sequences the engine batches at once [CASCADE_MAX_NUM_SEQS] (default: vLLM's, 128 on CPU; "
                        "llama.cpp: 32 slots sharing one KV cache)")
    p.add_argument("--allow-pickle", action="store_true", default=_env("ALLOW_PICKLE", "0") == "1",
                   help="allow .bin/.pt checkpoints (pickle can run code) [CASCADE_ALLOW_PICKLE=1]")
    p.add_argument("--tool-format", choices=sorted(TOOL_FORMATS), default=_env("TOOL_FORMAT"),
                   help="how the model writes tool calls [CASCADE_TOOL_FORMAT] (default: the registry's)")
    p.add_argument("--reasoning-format", choices=sorted(REASONING_FORMATS), default=_env("REASONING_FORMAT"),
                   help="how the model marks its thinking [CASCADE_REASONING_FORMAT] (default: the registry's)")
    p.add_argument("--reasoning-content", action="store_true", default=_env("REASONING_CONTENT", "0") == "1",
                   help="also send reasoning as `reasoning_content`, for clients written against vLLM < 0.17 "
                        "[CASCADE_REASONING_CONTENT=1]")
    p.add_argument("--engine", choices=ENGINES, default=_env("ENGINE", "auto"),
                   help="vllm (AsyncLLM; GPU and CPU), llamacpp (llama.cpp's server in-process, CPU; the model is "
                        "exported to GGUF on first use), or auto: vllm on a GPU, llamacpp on a CPU-only machine "
                        "(faster for a few clients; vllm wins from ~16 concurrent streams, see README) "
                        "[CASCADE_ENGINE] (default: %(default)s)")
    p.add_argument("--kv-cache-gib", type=float, default=_env("KV_CACHE_GIB"),
                   help="memory for the KV cache in GiB [CASCADE_KV_CACHE_GIB] (default: room for four full "
                        "contexts or 32k tokens, at most a quarter of the free memory; on a GPU, what 90%% of its "
                        "memory leaves after the weights, sized by vLLM)")
    p.add_argument("--restart-engine", action="store_true", default=_env("RESTART_ENGINE", "0") == "1",
                   help="restart a dead engine in-process with back-off instead of exiting (status 3) "
                        "[CASCADE_RESTART_ENGINE=1]")
    p.add_argument("--draft-model", default=_env("DRAFT_MODEL"),
                   help="registry name or checkpoint of a smaller model with the same tokenizer that drafts tokens "
                        "for speculative decoding (a cascade student) [CASCADE_DRAFT_MODEL] (default: none)")
    p.add_argument("--num-draft-tokens", type=int, default=_env("NUM_DRAFT_TOKENS", "3"),
                   help="tokens drafted per step [CASCADE_NUM_DRAFT_TOKENS] (default: %(default)s)")
    p.add_argument("--gguf-quant", choices=QUANTS, default=_env("GGUF_QUANT", "f16"),
                   help="llamacpp engine: weight format of the exported GGUF; q8_0/q4_1 decode faster but "
                        "round SmolLM2's near-ties differently [CASCADE_GGUF_QUANT] (default: %(default)s)")
    p.add_argument("--threads", type=int, default=_env("THREADS"),
                   help="llamacpp engine: compute threads [CASCADE_THREADS] (default: one per core)")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   default=_env("PREFIX_CACHE", "1") != "0",
                   help="recompute every prompt instead of reusing the KV cache of a shared prefix: slower multi-turn "
                        "chats, but repeated greedy requests give identical text on llama.cpp, whose f16 kernels "
                        "round a re-evaluated token differently [CASCADE_PREFIX_CACHE=0]")
    p.add_argument("--lora", action="append", default=None, metavar="[NAME=]ADAPTER",
                   help="serve a LoRA adapter of this model per request (repeatable): a LoRA post-training result by "
                        "registry name, a directory holding adapter/, or a peft adapter directory; requests name it "
                        "in `model`. vLLM engine only; on CPU it turns torch.compile off (eager decoding) "
                        "[CASCADE_LORA, comma-separated] (default: none)")
    p.add_argument("--limit-mm-per-prompt", default=_env("LIMIT_MM_PER_PROMPT", "audio=5,image=8"),
                   help="audio/vision models: items a request may carry, e.g. audio=1,image=4 (or JSON) "
                        "[CASCADE_LIMIT_MM_PER_PROMPT] (default: %(default)s)")
    p.add_argument("--max-audio-seconds", type=float, default=_env("MAX_AUDIO_SECONDS", "300"),
                   help="longest audio item accepted [CASCADE_MAX_AUDIO_SECONDS] (default: %(default)s)")
    p.add_argument("--max-image-pixels", type=int, default=_env("MAX_IMAGE_PIXELS", str(4096 * 4096)),
                   help="largest image accepted, width x height, read from its header before decoding "
                        "[CASCADE_MAX_IMAGE_PIXELS] (default: %(default)s)")
    p.add_argument("--max-media-bytes", type=int, default=_env("MAX_MEDIA_BYTES", str(20 << 20)),
                   help="largest media item in bytes, after base64 decoding [CASCADE_MAX_MEDIA_BYTES] "
                        "(default: %(default)s)")
    p.add_argument("--allowed-media-domains", action="append", default=None, metavar="HOST",
                   help="hosts whose http(s) image/audio URLs the server may fetch (repeatable); without it the "
                        "server makes no outbound requests and accepts only data: URLs and inline base64 "
                        "[CASCADE_ALLOWED_MEDIA_DOMAINS, comma-separated] (default: none)")
    scale = p.add_argument_group("scale-out (vLLM engine; deploy/README.md)")
    scale.add_argument("--tensor-parallel-size", "-tp", type=int, default=_env("TENSOR_PARALLEL_SIZE", "1"),
                       help="GPUs each layer is split across (vLLM tensor parallelism) [CASCADE_TENSOR_PARALLEL_SIZE] "
                            "(default: %(default)s)")
    scale.add_argument("--pipeline-parallel-size", "-pp", type=int, default=_env("PIPELINE_PARALLEL_SIZE", "1"),
                       help="pipeline stages the layers are split into, e.g. one per node "
                            "[CASCADE_PIPELINE_PARALLEL_SIZE] (default: %(default)s)")
    scale.add_argument("--data-parallel-size", "-dp", type=int, default=_env("DATA_PARALLEL_SIZE", "1"),
                       help="engine replicas behind this one server, each with TP x PP GPUs; requests are balanced "
                            "across them by vLLM [CASCADE_DATA_PARALLEL_SIZE] (default: %(default)s)")
    scale.add_argument("--distributed-executor-backend", choices=EXECUTOR_BACKENDS,
                       default=_env("DISTRIBUTED_EXECUTOR_BACKEND"),
                       help="mp: worker processes on this node; ray: workers across the nodes of a running Ray "
                            "cluster (`ray start --head` here, `ray start --address HEAD:6379` on the others) "
                            "[CASCADE_DISTRIBUTED_EXECUTOR_BACKEND] (default: vLLM's choice, mp on one node)")
    scale.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction,
                       default=_env("ENABLE_CHUNKED_PREFILL"),
                       help="split long prompts into chunks scheduled beside decodes (steadier inter-token latency "
                            "under load) [CASCADE_ENABLE_CHUNKED_PREFILL=1|0] (default: vLLM's, on)")
    scale.add_argument("--max-num-batched-tokens", type=int, default=_env("MAX_NUM_BATCHED_TOKENS"),
                       help="tokens one engine step may process: the prefill chunk size; larger favours throughput, "
                            "smaller latency [CASCADE_MAX_NUM_BATCHED_TOKENS] (default: vLLM's for the platform)")
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "info"), choices=["debug", "info", "warning", "error"],
                   help="log level [CASCADE_LOG_LEVEL] (default: %(default)s)")
    # argparse runs string defaults through `type`, so a bad CASCADE_PORT is reported like a bad --port.
    return p


def parse_config(argv: list[str] | None = None) -> ServerConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.lora is None:
        args.lora = [item.strip() for item in (_env("LORA") or "").split(",") if item.strip()]
    args.lora = tuple(args.lora)
    if args.allowed_media_domains is None:
        args.allowed_media_domains = [d.strip() for d in (_env("ALLOWED_MEDIA_DOMAINS") or "").split(",") if d.strip()]
    args.allowed_media_domains = tuple(args.allowed_media_domains)
    if isinstance(args.enable_chunked_prefill, str):  # from the environment: the flag gives a bool
        flag = {"1": True, "true": True, "0": False, "false": False, "": None}.get(args.enable_chunked_prefill.lower(),
                                                                                  "bad")
        if flag == "bad":
            parser.error(f"CASCADE_ENABLE_CHUNKED_PREFILL={args.enable_chunked_prefill!r} must be 1 or 0")
        args.enable_chunked_prefill = flag
    try:
        return ServerConfig(**vars(args))
    except ValueError as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits
