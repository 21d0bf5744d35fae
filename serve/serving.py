"""The steps the OpenAI routes share between parsing a request and shaping its response: model and input checks,
token budgets, generation parameters, and running engine requests with metrics, aborts and merging."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TypeVar

from serve.engine import Engine, EngineDeadError, EngineOutput, EngineRequestError, GenerationParams, Media
from serve.errors import APIError
from serve.metrics import ServerMetrics
from serve.protocol import SamplingFields

T = TypeVar("T")


def check_model(engine: Engine, requested: str) -> str | None:
    """The LoRA adapter a request names (None: the base model); 404 for a name this server does not serve."""
    if requested == engine.model_name:
        return None
    if requested in engine.adapters:
        return requested
    served = ", ".join(f"'{name}'" for name in (engine.model_name, *engine.adapters))
    raise APIError(404, f"The model '{requested}' does not exist; this server serves {served}", param="model",
                   code="model_not_found")


def check_running(engine: Engine) -> None:
    """503 before anything starts (a stream would otherwise answer 200 and then an error event)."""
    if not engine.is_running():
        raise APIError(503, "the engine is not running; retry shortly", code="engine_dead",
                       headers={"Retry-After": "5"})


def max_prompt_chars(engine: Engine) -> int:
    """No text longer than this can fit the context: each token covers at most `max_token_chars` characters (x2
    for tokenizers whose normalisation shortens text). Checked before tokenizing, so huge inputs cost nothing."""
    return 2 * engine.max_model_len * engine.tokenizer.max_token_chars


def check_text_length(engine: Engine, chars: int, param: str) -> None:
    limit = max_prompt_chars(engine)
    if chars > limit:
        raise APIError(400, f"{param}: {chars} characters cannot fit this model's context of {engine.max_model_len} "
                            f"tokens (at most {limit} characters are accepted)", param=param,
                       code="context_length_exceeded")


def check_token_ids(engine: Engine, ids: list[int], param: str) -> None:
    vocab = engine.tokenizer.vocab_size
    if ids and max(ids) >= vocab:
        bad = next(t for t in ids if t >= vocab)
        raise APIError(400, f"{param}: token id {bad} is outside the vocabulary (size {vocab})", param=param,
                       code="invalid_value")


def budget_tokens(engine: Engine, num_prompt: int, requested: int | None, param: str) -> int:
    """Tokens left for the completion; a prompt (plus requested output) past the context is a 400 with numbers."""
    limit = engine.max_model_len
    if num_prompt >= limit or (requested is not None and num_prompt + requested > limit):
        asked = num_prompt + (requested or 0)
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                            f"{asked} tokens ({num_prompt} in the {param}, {requested or 0} in the completion). "
                            "Please reduce the length of the prompt or the completion.",
                       param=param, code="context_length_exceeded")
    return requested if requested is not None else limit - num_prompt


def generation_params(engine: Engine, req: SamplingFields, max_tokens: int, logprobs: int | None,
                      prompt_logprobs: int | None = None, adapter: str | None = None) -> GenerationParams:
    bias = req.logit_bias_items()
    check_token_ids(engine, [t for t, _ in bias], "logit_bias")
    check_token_ids(engine, list(req.stop_token_ids or ()), "stop_token_ids")
    params = GenerationParams(
        max_tokens=max_tokens, n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
        min_p=req.min_p, presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty, stop=req.stop_list(),
        stop_token_ids=tuple(req.stop_token_ids or ()), seed=req.seed, logprobs=logprobs,
        prompt_logprobs=prompt_logprobs, ignore_eos=req.ignore_eos, min_tokens=req.min_tokens, logit_bias=bias,
        adapter=adapter,
    )
    try:
        engine.check_params(params)
    except EngineRequestError as e:
        raise APIError(400, str(e), param=e.param, code="invalid_request") from None
    return params


async def tracked(engine: Engine, metrics: ServerMetrics, route: str, prompt_ids: list[int],
                  params: GenerationParams, request_id: str, media: Media | None = None
                  ) -> AsyncIterator[EngineOutput]:
    """engine.generate plus metrics; a consumer that stops early (disconnect) aborts the engine request."""
    start = time.perf_counter()
    state = "waiting"
    metrics.waiting.inc()
    finished = failed = False
    try:
        async for out in engine.generate(prompt_ids, params, request_id, media):
            new_tokens = sum(c.num_tokens for c in out.choices)
            if state == "waiting" and new_tokens:
                metrics.ttft.labels(route).observe(time.perf_counter() - start)
                metrics.waiting.dec()
                metrics.running.inc()
                state = "running"
            metrics.generation_tokens.inc(new_tokens)
            finished = out.finished
            if finished:
                metrics.prompt_tokens.inc(out.num_prompt_tokens)
                metrics.e2e.labels(route).observe(time.perf_counter() - start)
            yield out
    except EngineDeadError as e:
        failed = True
        raise APIError(503, f"the engine is not running: {e}", code="engine_dead") from e
    except EngineRequestError as e:
        failed = True
        raise APIError(400, str(e), param=e.param, code="invalid_request") from e
    finally:
        (metrics.waiting if state == "waiting" else metrics.running).dec()
        if not finished:
            if not failed:
                metrics.aborted.inc()  # the consumer went away: a client disconnect
            await engine.abort(request_id)


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several async streams (a batch's prompts, a request's choices) as items arrive."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, T | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
            await queue.put((i, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises
            await queue.put((i, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
