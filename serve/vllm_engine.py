"""The `Engine` on vLLM's V1 `AsyncLLM`: we render prompts to token ids ourselves and stream DELTA outputs."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.registry import ModelSpec
from models.tokenizers import ChatTokenizer, load_tokenizer
from serve.adapters import Adapter, max_lora_rank
from serve.engine import (
    ChoiceDelta,
    Constraint,
    EngineDeadError,
    EngineOutput,
    EngineRequestError,
    EngineStartError,
    GenerationParams,
    Media,
    SpecDecodeStats,
    TokenLogprob,
    generation_defaults,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DraftSettings:
    """A drafter for speculative decoding: a smaller model with the target's tokenizer (a cascade student)."""

    checkpoint: Path
    num_tokens: int


@dataclass(frozen=True)
class ScaleOut:
    """vLLM's own parallelism, passed through as engine args; vLLM validates and runs it (nothing home-made)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    distributed_executor_backend: str | None = None  # None: vLLM's choice
    enable_chunked_prefill: bool | None = None
    max_num_batched_tokens: int | None = None

    @property
    def workers_per_replica(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def single_process(self) -> bool:
        return self.workers_per_replica * self.data_parallel_size == 1 and self.distributed_executor_backend is None

    def engine_args(self) -> dict[str, Any]:
        """The settings given, by their AsyncEngineArgs names (unset ones keep vLLM's defaults)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class VLLMSettings:
    max_model_len: int  # context length in tokens
    dtype: str
    # per worker; explicit on CPU (vLLM's own default there reserves most of the machine's memory); None on a GPU
    # without --kv-cache-gib: vLLM profiles the model and fills its gpu_memory_utilization
    kv_cache_bytes: int | None
    enforce_eager: bool = False  # True skips torch.compile: faster start, slower steps
    max_num_seqs: int | None = None  # None: vLLM's default for the platform
    seed: int = 0
    draft: DraftSettings | None = None
    prefix_cache: bool = True
    adapters: tuple[Adapter, ...] = ()  # LoRA adapters served per request (turns torch.compile off on CPU)
    # CPU: run the model in the engine-core process instead of a third worker process. Measured here (2 cores,
    # SmolLM2 fp32, compiled): 50-54 vs 35-38 tok/s at one stream, 495 vs 337 tok/s at 16, and one process spawn
    # (~8 s) less at every start; vLLM's worker process and its shared-memory polling compete for the two cores.
    worker_in_engine_process: bool = True
    media_per_prompt: dict[str, int] = dataclasses.field(default_factory=dict)  # audio/image items a prompt may hold
    scale: ScaleOut = ScaleOut()


class VLLMEngine:
    name = "vllm"

    def __init__(self, spec: ModelSpec, settings: VLLMSettings) -> None:
        self.spec = spec
        self.settings = settings
        self.model_name = spec.name
        self.adapters = tuple(a.name for a in settings.adapters)
        self.media = spec.media
        self.max_model_len = settings.max_model_len
        self.tokenizer: ChatTokenizer = None  # type: ignore[assignment]  # loaded by start()
        self._llm: Any = None
        self._defaults: dict[str, Any] = {}

    def _engine_args(self) -> Any:
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs

        s = self.settings
        speculative = None
        if s.draft is not None:
            speculative = {"method": "draft_model", "model": str(s.draft.checkpoint),
                           "num_speculative_tokens": s.draft.num_tokens}
        lora = {}
        if s.adapters:  # every adapter stays loaded: vLLM batches requests of different adapters together
            lora = {"enable_lora": True, "max_loras": len(s.adapters), "max_lora_rank": max_lora_rank(s.adapters)}
        return AsyncEngineArgs(
            **lora,
            model=str(self.spec.checkpoint_dir),
            served_model_name=[self.spec.name],
            tokenizer_mode="mistral" if self.spec.chat_format == "mistral" else "auto",
            **self._media_args(),
            dtype=s.dtype,
            max_model_len=self.max_model_len,
            enforce_eager=s.enforce_eager,
            max_num_seqs=s.max_num_seqs,
            seed=s.seed,
            kv_cache_memory_bytes=s.kv_cache_bytes,
            speculative_config=speculative,
            enable_prefix_caching=s.prefix_cache,
            **s.scale.engine_args(),
            # xgrammar (vLLM's default backend; `grammar` is its EBNF), with compact JSON: with free whitespace a
            # small model pads values with blanks or newlines until max_tokens. vLLM reads this only engine-wide.
            structured_outputs_config=StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True),
        )

    def _media_args(self) -> dict[str, Any]:
        """Audio/vision models load from Mistral's native files (models/mistral_format.py) with our item limits."""
        if not self.spec.media:
            return {}
        return {"config_format": "mistral", "load_format": "mistral",
                "limit_mm_per_prompt": {m: self.settings.media_per_prompt.get(m, 0) for m in self.spec.media}}

    async def start(self) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        _configure_environment(self.settings)
        args = self._engine_args()
        # Our tokenizer (transformers or mistral_common, seconds to import) loads while vLLM spawns its engine.
        tokenizer = asyncio.ensure_future(asyncio.to_thread(load_tokenizer, self.spec))
        log.info("starting vLLM engine for %s (%s)%s", self.spec.name, self.spec.checkpoint_dir,
                 f" with drafter {self.settings.draft.checkpoint}" if self.settings.draft else "")
        try:
            with _heartbeat("vLLM engine still starting (a first start compiles the model with torch inductor)"):
                # Off the event loop: a restart must not stop the server from answering (503s, /health) meanwhile.
                self._llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        except Exception as e:
            with contextlib.suppress(Exception):
                await tokenizer
            raise EngineStartError(f"vLLM could not start {self.spec.name}: {_root_cause(e)}") from e
        self.tokenizer = await tokenizer
        self._defaults = generation_defaults(self.spec)
        log.info("engine ready: max_model_len=%d, generation_config defaults=%s", self.max_model_len, self._defaults)

    def _sampling_params(self, p: GenerationParams) -> Any:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind

        chosen = {
            "temperature": p.temperature,
            "top_p": p.top_p,
            "top_k": p.top_k,
            "min_p": p.min_p,
            "repetition_penalty": p.repetition_penalty,
        }
        sampling = {k: v if v is not None else self._defaults.get(k) for k, v in chosen.items()}
        # Greedy choices are all the same sequence, and vLLM refuses n > 1 when greedy: decode once, copy it.
        greedy = sampling["temperature"] is not None and sampling["temperature"] < 1e-5  # vLLM's own threshold
        n = 1 if greedy else p.n
        try:
            return SamplingParams(
                n=n,
                max_tokens=p.max_tokens,
                presence_penalty=p.presence_penalty,
                frequency_penalty=p.frequency_penalty,
                stop=list(p.stop) or None,
                stop_token_ids=list(p.stop_token_ids) or None,
                seed=p.seed,
                logprobs=p.logprobs,
                prompt_logprobs=p.prompt_logprobs,
                ignore_eos=p.ignore_eos,
                min_tokens=p.min_tokens,
                include_stop_str_in_output=p.include_stop_str_in_output,
                skip_special_tokens=p.skip_special_tokens,
                logit_bias=dict(p.logit_bias) or None,
                structured_outputs=_structured(p.constraint),
                output_kind=RequestOutputKind.DELTA,
                **{k: v for k, v in sampling.items() if v is not None},
            )
        except (ValueError, VLLMClientError) as e:  # VLLMValidationError is a VLLMClientError
            raise EngineRequestError(str(e), param=getattr(e, "parameter", None)) from None

    async def generate(self, prompt_token_ids: list[int], params: GenerationParams, request_id: str,
                       media: Media | None = None) -> AsyncIterator[EngineOutput]:
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError as VLLMDeadError

        if self._llm is None:
            raise EngineDeadError("the engine is restarting")
        sampling = self._sampling_params(params)
        copies = params.n // sampling.n  # > 1 only for greedy n > 1
        first = True
        try:
            async for out in self._llm.generate(_prompt(prompt_token_ids, media), sampling, request_id,
                                                lora_request=self._lora_request(params.adapter)):
                choices = [_choice(c, params.logprobs or 0) for c in out.outputs]
                if copies > 1:
                    choices = [dataclasses.replace(choices[0], index=i) for i in range(copies)]
                yield EngineOutput(
                    choices=choices,
                    num_prompt_tokens=len(out.prompt_token_ids or prompt_token_ids),
                    finished=out.finished,
                    prompt_logprobs=_prompt_logprobs(prompt_token_ids, out.prompt_logprobs, params.prompt_logprobs or 0)
                    if first else None,
                )
                first = False
        except VLLMDeadError as e:
            raise EngineDeadError(str(e)) from e
        except (ValueError, VLLMClientError) as e:  # the engine refused this request
            raise EngineRequestError(str(e), param=getattr(e, "parameter", None)) from e

    def _lora_request(self, adapter: str | None) -> Any:
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        number = self.adapters.index(adapter) + 1  # vLLM's adapter ids start at 1 and must be stable
        return LoRARequest(adapter, number, str(self.settings.adapters[number - 1].path))

    def check_params(self, params: GenerationParams) -> None:
        """Raise EngineRequestError for what vLLM would refuse, before any response starts."""
        from vllm.exceptions import VLLMClientError

        if self.settings.draft is not None:  # vLLM 0.32 refuses these with a drafter (SamplingParams.verify)
            if params.min_p:
                raise EngineRequestError("min_p is not supported with speculative decoding (this server runs a "
                                         "drafter)", param="min_p")
            if params.logit_bias:
                raise EngineRequestError("logit_bias is not supported with speculative decoding (this server runs "
                                         "a drafter)", param="logit_bias")
        sampling = self._sampling_params(params)
        if self._llm is None:
            return
        config = self._llm.vllm_config
        try:  # vLLM's own request checks (logprob limits, logit_bias ids, grammars), as its input processor runs them
            sampling.verify(config.model_config, config.speculative_config, config.structured_outputs_config,
                            self._llm.tokenizer)
        except (ValueError, VLLMClientError) as e:
            raise EngineRequestError(str(e), param=getattr(e, "parameter", None)) from None

    async def abort(self, request_id: str) -> None:
        if self._llm is not None:
            await self._llm.abort(request_id)

    def is_running(self) -> bool:
        return self._llm is not None and not self._llm.errored

    async def is_healthy(self) -> bool:
        if not self.is_running():
            return False
        try:
            await self._llm.check_health()
        except Exception:  # noqa: BLE001 - any failure of the health probe means unhealthy
            return False
        return True

    def metrics_text(self) -> bytes:
        from prometheus_client import REGISTRY, generate_latest

        return generate_latest(REGISTRY)  # vLLM registers its `vllm:*` metrics in the default registry

    def spec_decode_stats(self) -> SpecDecodeStats | None:
        if self.settings.draft is None:
            return None
        from prometheus_client import REGISTRY

        totals = dict.fromkeys(("drafts", "draft_tokens", "accepted_tokens"), 0.0)
        for family in REGISTRY.collect():
            for key, name in (("drafts", "vllm:spec_decode_num_drafts"),
                              ("draft_tokens", "vllm:spec_decode_num_draft_tokens"),
                              ("accepted_tokens", "vllm:spec_decode_num_accepted_tokens")):
                if family.name == name:
                    totals[key] += sum(s.value for s in family.samples if s.name == f"{name}_total")
        return SpecDecodeStats(**{k: int(v) for k, v in totals.items()})

    def shutdown(self) -> None:
        if self._llm is not None:
            llm, self._llm = self._llm, None
            llm.shutdown()


def _configure_environment(settings: VLLMSettings) -> None:
    """vLLM reads these in its spawned processes, which inherit our environment."""
    # Our --kv-cache-gib is passed as kv_cache_memory_bytes; vLLM's legacy variable would silently override it.
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    from vllm.platforms import current_platform

    # (one process only: tensor/pipeline/data parallelism need vLLM's worker processes)
    if current_platform.is_cpu() and settings.worker_in_engine_process and settings.scale.single_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    workers = settings.scale.workers_per_replica * settings.scale.data_parallel_size
    if current_platform.is_cpu() and workers > 1 and not os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        # vLLM's CPU workers bind their threads one NUMA node each and refuse to start with more workers than nodes
        # ("Not enough allowed NUMA nodes"); on one node, give each worker its own share of this process's cores.
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(sorted(os.sched_getaffinity(0)), workers)
    # Spawned, not forked (vLLM's CPU platform forces this; its own CLI does on GPUs): a forked engine core would
    # inherit "plugins loaded" and skip serve/vllm_plugin.py's parent watch, and could inherit a lock held by the
    # tokenizer thread that runs while the engine starts.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")


def cpu_thread_binding(cpus: list[int], workers: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `workers` CPU workers: contiguous equal shares of `cpus`, e.g. "0-3|4-7"."""
    if workers > len(cpus):
        raise EngineStartError(f"{workers} vLLM CPU workers (tensor x pipeline x data parallel) need at least as many "
                               f"cores; this process may use {len(cpus)}")
    share = len(cpus) // workers
    groups = [cpus[i * share:(i + 1) * share] for i in range(workers)]
    return "|".join(",".join(str(c) for c in group) for group in groups)


def _root_cause(e: BaseException) -> str:
    """vLLM wraps engine-core failures ("Engine core initialization failed. See root cause above"): say the cause."""
    while e.__cause__ is not None:
        e = e.__cause__
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


@contextlib.contextmanager
def _heartbeat(message: str, every_s: float = 15.0) -> Iterator[None]:
    """Log progress while a long blocking step runs, so a first start is not minutes of silence."""
    done = threading.Event()
    start = time.monotonic()

    def beat() -> None:
        while not done.wait(every_s):
            log.info("%s: %.0f s", message, time.monotonic() - start)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        log.info("engine started in %.1f s", time.monotonic() - start)


def _prompt(ids: list[int], media: Media | None) -> dict[str, Any]:
    """vLLM's prompt dict; the ids already hold the media's placeholder tokens (their processors only check them)."""
    if not media:
        return {"prompt_token_ids": ids}
    data: dict[str, Any] = {}
    if media.audio:
        data["audio"] = list(media.audio)
    if media.images:
        data["image"] = list(media.images)
    return {"prompt_token_ids": ids, "multi_modal_data": data}


def _structured(c: Constraint | None) -> Any:
    if c is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if c.kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    return StructuredOutputsParams(**{c.kind: c.value})


def _choice(c: Any, k: int) -> ChoiceDelta:
    return ChoiceDelta(
        index=c.index,
        text=c.text,
        token_ids=list(c.token_ids),
        logprobs=[_token_logprob(tid, lp, k) for tid, lp in zip(c.token_ids, c.logprobs, strict=True)]
        if c.logprobs is not None else None,
        finish_reason=c.finish_reason,
        stop_reason=c.stop_reason,
    )


def _token_logprob(token_id: int, entry: dict[int, Any], k: int) -> TokenLogprob:
    """vLLM gives {token_id: Logprob(logprob, rank, decoded_token)}: the top-k plus the chosen token at its own rank."""
    chosen = entry[token_id]
    top = sorted(((tid, lp) for tid, lp in entry.items() if lp.rank is not None and 1 <= lp.rank <= k),
                 key=lambda item: item[1].rank)
    return TokenLogprob(
        token_id=token_id,
        token=chosen.decoded_token or "",
        logprob=float(chosen.logprob),
        top=tuple((tid, lp.decoded_token or "", float(lp.logprob)) for tid, lp in top),
    )


def _prompt_logprobs(prompt_token_ids: list[int], entries: Any, k: int) -> list[TokenLogprob | None] | None:
    """One entry per prompt token; the first is None (nothing precedes it)."""
    if entries is None:
        return None
    return [None if e is None else _token_logprob(tid, e, k)
            for tid, e in zip(prompt_token_ids, entries, strict=True)]
