"""The engine interface the HTTP layer talks to: token ids in, streamed token/text deltas out.

Kept engine-neutral (no vLLM or llama.cpp types): `serve/vllm_engine.py` implements it on vLLM's `AsyncLLM`,
`serve/llamacpp_engine.py` on llama.cpp's server (the `xllamacpp` wheel). Prompts arrive as token ids rendered by
our tokenizer, so prompt rendering, usage counts and context checks are identical for every engine.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from models.registry import ModelSpec
from models.tokenizers import ChatTokenizer


@dataclass(frozen=True)
class Constraint:
    """Structured output: what the generated text must match (enforced by the engine's grammar backend)."""

    kind: Literal["json", "regex", "choice", "grammar", "json_object"]
    value: Any = None  # JSON Schema dict, regex, list of choices, grammar text; None for json_object


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    n: int = 1
    temperature: float | None = None  # None: the model's generation_config default, else 1.0
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # number of top alternatives per sampled token; None: no logprobs
    prompt_logprobs: int | None = None  # same for prompt tokens (completions `echo` + `logprobs`)
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True  # False when a parser needs markers such as [THINK] in the text
    constraint: Constraint | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    adapter: str | None = None  # a LoRA adapter served beside the base (serve/adapters.py), by name


@dataclass(frozen=True)
class Media:
    """Decoded media for one prompt, in prompt order: the prompt's ids already hold their placeholder tokens, made
    by the same tokenizer call (serve/media.py, models/tokenizers.py)."""

    audio: tuple[tuple[Any, int], ...] = ()  # (float32 mono samples, padded as the tokenizer counted them; rate)
    images: tuple[Any, ...] = ()  # PIL RGB images

    def __bool__(self) -> bool:
        return bool(self.audio or self.images)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()  # (token_id, token, logprob), best first


@dataclass
class ChoiceDelta:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # the stop string or token id that ended it; None for EOS
    num_tokens: int = -1  # tokens this delta stands for: len(token_ids) unless the engine counts exactly otherwise

    def __post_init__(self) -> None:
        if self.num_tokens < 0:
            self.num_tokens = len(self.token_ids)


@dataclass
class EngineOutput:
    """What changed since the previous output of the same request."""

    choices: list[ChoiceDelta]
    num_prompt_tokens: int
    finished: bool
    prompt_logprobs: list[TokenLogprob | None] | None = field(default=None)  # first output only


@dataclass(frozen=True)
class SpecDecodeStats:
    """Speculative decoding counters since the engine started (a drafter proposes, the target verifies)."""

    drafts: int  # target steps that verified drafted tokens
    draft_tokens: int  # tokens the drafter proposed
    accepted_tokens: int  # of those, tokens the target accepted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens produced per target step: the accepted drafts plus the target's own token."""
        return 1.0 + self.accepted_tokens / self.drafts if self.drafts else 0.0


class EngineDeadError(RuntimeError):
    """The engine can no longer serve; /health reports 503 and requests get 503."""


class EngineRequestError(ValueError):
    """The engine rejected one request as invalid (its message is safe to show the client)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param  # the request field at fault, when known


class EngineStartError(RuntimeError):
    """The engine could not start; the message names the problem and the fix in one line."""


class Engine(Protocol):
    name: str  # "vllm" | "llamacpp"
    spec: ModelSpec  # formats (chat, tools, reasoning) the routes need
    model_name: str
    adapters: tuple[str, ...]  # LoRA adapters a request may name instead of the model (vLLM only)
    media: tuple[str, ...]  # what prompts may carry besides text ("audio", "image"); () for text-only engines
    max_model_len: int
    tokenizer: ChatTokenizer  # loaded by start()

    async def start(self) -> None:
        """Load the model; raise EngineStartError with a one-line reason on failure. Also used to restart."""

    def generate(self, prompt_token_ids: list[int], params: GenerationParams, request_id: str,
                 media: Media | None = None) -> AsyncIterator[EngineOutput]: ...

    def check_params(self, params: GenerationParams) -> None:
        """Raise EngineRequestError now for parameters the engine would refuse."""

    async def abort(self, request_id: str) -> None: ...

    def is_running(self) -> bool:
        """Cheap and synchronous: started and not known to be dead (checked before each request)."""

    async def is_healthy(self) -> bool: ...

    def metrics_text(self) -> bytes:
        """The engine's own Prometheus metrics (vLLM's `vllm:*`, llama.cpp's as `llamacpp:*`)."""

    def spec_decode_stats(self) -> SpecDecodeStats | None:
        """Drafting counters, or None when the engine runs without a drafter."""

    def shutdown(self) -> None: ...


SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def generation_defaults(spec: ModelSpec) -> dict[str, float]:
    """Sampling for what a request leaves out: the registry entry's defaults, then the model's
    generation_config.json (as vLLM's own server applies it); the engine's neutral defaults after that."""
    path = spec.checkpoint_dir / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    found = {k: config[k] for k in SAMPLING_KEYS if config.get(k) is not None}
    return found | spec.sampling_defaults
