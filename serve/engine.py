"""The engine interface the HTTP layer talks to: token ids in, streamed token/text deltas out.

Kept engine-neutral (no vLLM types) so a second engine (a transformers loop, llama.cpp) can slot in behind the same
routes. The vLLM implementation lives in `serve/vllm_engine.py`.
"""

from __future__ import annotations

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


@dataclass
class EngineOutput:
    """What changed since the previous output of the same request."""

    choices: list[ChoiceDelta]
    num_prompt_tokens: int
    finished: bool
    prompt_logprobs: list[TokenLogprob | None] | None = field(default=None)  # first output only


class EngineDeadError(RuntimeError):
    """The engine can no longer serve; /health reports 503 and requests get 503."""


class EngineRequestError(ValueError):
    """The engine rejected one request as invalid (its message is safe to show the client)."""


class Engine(Protocol):
    spec: ModelSpec  # formats (chat, tools, reasoning) the routes need
    model_name: str
    max_model_len: int
    tokenizer: ChatTokenizer

    async def start(self) -> None: ...

    def generate(self, prompt_token_ids: list[int], params: GenerationParams, request_id: str
                 ) -> AsyncIterator[EngineOutput]: ...

    def check_params(self, params: GenerationParams) -> None:
        """Raise EngineRequestError now for parameters the engine would refuse."""

    async def abort(self, request_id: str) -> None: ...

    async def is_healthy(self) -> bool: ...

    def shutdown(self) -> None: ...
