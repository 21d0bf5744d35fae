"""The `Engine` on vLLM's V1 `AsyncLLM`: we render prompts to token ids ourselves and stream DELTA outputs."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from models.registry import ModelSpec
from models.tokenizers import load_tokenizer
from serve.engine import (
    ChoiceDelta,
    Constraint,
    EngineDeadError,
    EngineOutput,
    EngineRequestError,
    GenerationParams,
    TokenLogprob,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VLLMSettings:
    max_model_len: int | None = None  # None: the registry's max_context
    dtype: str | None = None  # None: the registry's dtype
    enforce_eager: bool = False  # True skips torch.compile: faster start, slower steps
    max_num_seqs: int | None = None  # None: vLLM's default for the platform
    seed: int = 0


class VLLMEngine:
    def __init__(self, spec: ModelSpec, settings: VLLMSettings) -> None:
        self.spec = spec
        self.settings = settings
        self.model_name = spec.name
        self.max_model_len = settings.max_model_len or spec.max_context
        self.tokenizer = load_tokenizer(spec)
        self._llm: Any = None
        self._defaults: dict[str, Any] = {}

    async def start(self) -> None:
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=str(self.spec.checkpoint_dir),
            served_model_name=[self.spec.name],
            tokenizer_mode="mistral" if self.spec.chat_format == "mistral" else "auto",
            dtype=self.settings.dtype or self.spec.dtype,
            max_model_len=self.max_model_len,
            enforce_eager=self.settings.enforce_eager,
            max_num_seqs=self.settings.max_num_seqs,
            seed=self.settings.seed,
            # xgrammar (vLLM's default backend; `grammar` is its EBNF), with compact JSON: with free whitespace a
            # small model pads values with blanks or newlines until max_tokens. vLLM reads this only engine-wide.
            structured_outputs_config=StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True),
        )
        log.info("starting vLLM engine for %s (%s); the first start compiles with torch inductor, "
                 "later starts reuse the cache", self.spec.name, self.spec.checkpoint_dir)
        with _heartbeat("vLLM engine still starting (first start: torch.compile)"):
            self._llm = AsyncLLM.from_engine_args(args)
        # Defaults for what a request leaves out: the registry's, then the model's generation_config.json (which
        # vLLM's own server applies too), then vLLM's.
        self._defaults = dict(self._llm.model_config.get_diff_sampling_param()) | self.spec.sampling_defaults
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
                structured_outputs=_structured(p.constraint),
                output_kind=RequestOutputKind.DELTA,
                **{k: v for k, v in sampling.items() if v is not None},
            )
        except (ValueError, VLLMClientError) as e:  # VLLMValidationError is a VLLMClientError
            raise EngineRequestError(str(e)) from None

    async def generate(self, prompt_token_ids: list[int], params: GenerationParams, request_id: str
                       ) -> AsyncIterator[EngineOutput]:
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError as VLLMDeadError

        sampling = self._sampling_params(params)
        copies = params.n // sampling.n  # > 1 only for greedy n > 1
        first = True
        try:
            async for out in self._llm.generate({"prompt_token_ids": prompt_token_ids}, sampling, request_id):
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
            raise EngineRequestError(str(e)) from e

    def check_params(self, params: GenerationParams) -> None:
        """Raise EngineRequestError for what vLLM would refuse, before any response starts."""
        sampling = self._sampling_params(params)
        if params.constraint is not None:  # a bad regex/grammar/schema: 400 now, not an error event mid-stream
            from vllm.exceptions import VLLMClientError
            from vllm.v1.structured_output.backend_xgrammar import validate_xgrammar_grammar

            try:
                validate_xgrammar_grammar(sampling)
            except (ValueError, VLLMClientError) as e:
                raise EngineRequestError(str(e)) from None

    async def abort(self, request_id: str) -> None:
        if self._llm is not None:
            await self._llm.abort(request_id)

    async def is_healthy(self) -> bool:
        if self._llm is None or self._llm.errored:
            return False
        try:
            await self._llm.check_health()
        except Exception:  # noqa: BLE001 - any failure of the health probe means unhealthy
            return False
        return True

    def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None


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
