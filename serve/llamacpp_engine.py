"""The `Engine` on llama.cpp: its C++ server (continuous batching, llguidance grammars, draft-model speculation) runs
in-process through the `xllamacpp` wheel, and we call its handlers directly.

What we keep ours, as with vLLM: prompts arrive as our token ids; stop strings and stop token ids are matched here
(so a segment knows which stop ended it, as vLLM reports); structured outputs become llguidance grammars, validated
before a request starts (llama.cpp itself would log a bad grammar and generate unconstrained); every token's id
and token counts are exact: llama.cpp's usage counts each choice's tokens. Token ids come with llama.cpp's logprobs
when a request asks for logprobs; otherwise we do not ask llama.cpp for them (measured: `n_probs` 1 cost about 5%
of throughput at 16 streams) and take the ids of each streamed piece from our tokenizer, which reproduces the
piece exactly and matches the model's own ids except where a piece could be split two ways (multi-step plans feed
those ids back as the next prompt: the same text). While a drafter speculates llama.cpp sends no logprobs at all,
so requests asking for them are refused.

llama.cpp's server also opens an HTTP listener of its own. It cannot be turned off, so we bind it to a Unix socket
in a private directory and unlink that socket once the server is up: nothing can connect to it, and no TCP port
besides ours is ever open (tests/test_llamacpp.py checks both). llama.cpp's start installs SIGINT/SIGTERM
handlers over Python's; we put Python's back so that uvicorn still shuts down cleanly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import secrets
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.registry import ModelSpec
from models.tokenizers import ChatTokenizer, load_tokenizer
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
from serve.formats import output_markers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LlamaCppSettings:
    gguf: Path  # the exported model (models/gguf.py)
    max_model_len: int
    kv_cache_tokens: int  # llama.cpp's n_ctx: one KV cache shared by all slots (kv_unified)
    parallel: int  # requests decoded together (llama.cpp's slots); more wait in llama.cpp's queue
    threads: int
    draft_gguf: Path | None = None
    num_draft_tokens: int = 3
    max_requests: int = 128  # requests in flight at once (one waiting thread each)
    prefix_cache: bool = True  # llama.cpp's cache_prompt: reuse the KV of a slot's matching prefix


class LlamaCppEngine:
    name = "llamacpp"

    def __init__(self, spec: ModelSpec, settings: LlamaCppSettings) -> None:
        self.spec = spec
        self.settings = settings
        self.model_name = spec.name
        self.adapters: tuple[str, ...] = ()  # per-request LoRA is vLLM's (serve/adapters.py)
        self.media: tuple[str, ...] = ()  # our GGUF export is text-only: audio/vision models are served on vLLM
        self.max_model_len = settings.max_model_len
        self.tokenizer: ChatTokenizer = None  # type: ignore[assignment]  # loaded by start()
        self._server: Any = None
        self._defaults: dict[str, float] = {}
        self._markers: list[str] = []  # the formats' markers that are single (special) tokens, set by start()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=settings.max_requests + 4,
                                                               thread_name_prefix="llamacpp-request")
        self._requests: dict[str, threading.Event] = {}  # request id -> set to end it

    async def start(self) -> None:
        import xllamacpp

        tokenizer = asyncio.ensure_future(asyncio.to_thread(load_tokenizer, self.spec))
        params = self._params()
        private = Path(tempfile.mkdtemp(prefix="cascade-llamacpp-"))  # 0700: only we could reach the socket
        params.hostnames = [str(private / "llama.sock")]
        saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        started = time.monotonic()
        log.info("starting llama.cpp engine for %s (%s, %d threads, %d slots, n_ctx %d)%s", self.spec.name,
                 self.settings.gguf, self.settings.threads, self.settings.parallel, self.settings.kv_cache_tokens,
                 f" with drafter {self.settings.draft_gguf}" if self.settings.draft_gguf else "")
        try:
            self._server = await asyncio.to_thread(xllamacpp.Server, params)
        except Exception as e:  # xllamacpp raises RuntimeError; any failure is a failed start
            with contextlib.suppress(Exception):
                await tokenizer
            raise EngineStartError(f"llama.cpp could not load {self.settings.gguf} ({e}); the log above says why") \
                from e
        finally:
            for sig, handler in saved.items():
                if handler is not None:
                    signal.signal(sig, handler)  # llama.cpp installed its own C handlers; Python's come back
            shutil.rmtree(private, ignore_errors=True)  # unlinks the side door's socket: nothing can connect
        self.tokenizer = await tokenizer
        self._defaults = generation_defaults(self.spec)
        # Markers written as one special token ([THINK], [TOOL_CALLS]) must be kept in the text; llama.cpp drops
        # special tokens from its output unless told (and mangles multi-token text markers given as "preserved").
        self._markers = [m for m in output_markers(self.spec.tool_format, self.spec.reasoning_format)
                         if len(self.tokenizer.encode_piece(m)) == 1]
        log.info("engine started in %.1f s; llama.cpp's own listener (%s) is unlinked", time.monotonic() - started,
                 self._server.listening_address)

    def _params(self) -> Any:
        import xllamacpp

        s = self.settings
        p = xllamacpp.CommonParams()
        p.model.path = str(s.gguf)
        p.n_ctx = s.kv_cache_tokens
        p.n_parallel = s.parallel
        p.kv_unified = True  # slots share one cache: any request may use the whole context
        p.cpuparams.n_threads = s.threads
        p.cpuparams_batch.n_threads = s.threads
        p.endpoint_metrics = True
        # Output text reaches our parsers as the model wrote it: llama.cpp's own reasoning extraction would cut
        # `<think>...</think>` out of completions text.
        p.reasoning_format = xllamacpp.common_reasoning_format.COMMON_REASONING_FORMAT_NONE
        p.enable_reasoning = 0
        p.ui = False
        p.api_keys = [secrets.token_hex(16)]  # the side door would also need a key nobody has
        if s.draft_gguf is not None:
            p.speculative.types = [xllamacpp.common_speculative_type.COMMON_SPECULATIVE_TYPE_DRAFT_SIMPLE]
            p.speculative.draft.mparams.path = str(s.draft_gguf)
            p.speculative.draft.n_max = s.num_draft_tokens
            p.speculative.draft.n_min = 0
            p.speculative.draft.cpuparams.n_threads = s.threads
            p.speculative.draft.cpuparams_batch.n_threads = s.threads
        return p

    # -- requests ---------------------------------------------------------------------------------------------

    def _body(self, prompt_token_ids: list[int], p: GenerationParams) -> dict[str, Any]:
        chosen = {"temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k, "min_p": p.min_p,
                  "repetition_penalty": p.repetition_penalty}
        sampling = {k: v if v is not None else self._defaults.get(k) for k, v in chosen.items()}
        body: dict[str, Any] = {
            "prompt": prompt_token_ids,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": p.max_tokens,
            "n": p.n,
            # OpenAI's neutral defaults; llama.cpp's own are temperature 0.8, top_k 40, top_p 0.95, min_p 0.05.
            "temperature": 1.0 if sampling["temperature"] is None else sampling["temperature"],
            "top_p": 1.0 if sampling["top_p"] is None else sampling["top_p"],
            "top_k": 0 if sampling["top_k"] in (None, -1) else sampling["top_k"],
            "min_p": 0.0 if sampling["min_p"] is None else sampling["min_p"],
            "repeat_penalty": 1.0 if sampling["repetition_penalty"] is None else sampling["repetition_penalty"],
            "repeat_last_n": self.max_model_len,  # penalties over the whole context, as vLLM applies them
            "presence_penalty": p.presence_penalty,
            "frequency_penalty": p.frequency_penalty,
            "ignore_eos": p.ignore_eos,
            "cache_prompt": self.settings.prefix_cache,
        }
        if p.logprobs is not None or p.stop_token_ids:
            body["logprobs"] = max(1, p.logprobs or 0)  # each entry carries the chosen token's exact id
        if p.seed is not None:
            body["seed"] = p.seed % (1 << 32)
        if p.logit_bias:
            body["logit_bias"] = [[token, bias] for token, bias in p.logit_bias]
        if p.constraint is not None:
            body["grammar"] = llguidance_grammar(p.constraint)
        if not p.skip_special_tokens and self._markers:
            body["preserved_tokens"] = self._markers  # special tokens such as [THINK] stay in the text
        return body

    def check_params(self, params: GenerationParams) -> None:
        if params.logprobs is not None and self.settings.draft_gguf is not None:
            raise EngineRequestError("llama.cpp returns no logprobs while a drafter speculates; serve without "
                                     "--draft-model (or on the vllm engine) for logprobs", param="logprobs")
        if params.prompt_logprobs is not None:
            raise EngineRequestError("the llamacpp engine cannot return prompt logprobs (echo with logprobs); "
                                     "use the vllm engine for that", param="echo")
        if params.min_tokens:
            raise EngineRequestError("the llamacpp engine has no min_tokens", param="min_tokens")
        if params.logprobs is not None and params.logprobs > 20:
            raise EngineRequestError("at most 20 logprobs", param="logprobs")
        if params.constraint is not None:
            from llguidance import LLMatcher

            error = LLMatcher.validate_grammar(llguidance_grammar(params.constraint))
            if error:
                raise EngineRequestError(f"the constraint does not compile: {error.strip().splitlines()[0]}")

    async def generate(self, prompt_token_ids: list[int], params: GenerationParams, request_id: str,
                       media: Media | None = None) -> AsyncIterator[EngineOutput]:
        if media:
            raise EngineRequestError("this engine takes text only")
        if self._server is None:
            raise EngineDeadError("the engine is restarting")
        self.check_params(params)
        server, body = self._server, json.dumps(self._body(prompt_token_ids, params))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[dict[str, Any] | BaseException | None] = asyncio.Queue()
        stop = self._requests[request_id] = threading.Event()
        choices = [_ChoiceState(i, params, self.tokenizer.encode_piece) for i in range(params.n)]

        def on_chunk(raw: str) -> bool:  # llama.cpp's thread; returning True ends the request there
            try:
                loop.call_soon_threadsafe(queue.put_nowait, json.loads(raw))
            except RuntimeError:  # the event loop has closed (shutdown with this request in flight)
                return True
            return stop.is_set()

        def hand_over(item: BaseException | None) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop has closed
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def run() -> None:
            try:
                if not stop.is_set():  # a client that left while this waited for a thread costs no prefill
                    server.handle_completions(body, on_chunk)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                hand_over(e)
            finally:
                hand_over(None)

        loop.run_in_executor(self._executor, run)
        num_prompt = len(prompt_token_ids)
        try:
            while not stop.is_set():
                item = await queue.get()
                if item is None:  # llama.cpp ended without a finish for some choice (should not happen)
                    rest = [c.finish("stop") for c in choices if not c.finished]
                    yield EngineOutput(choices=rest, num_prompt_tokens=num_prompt, finished=True)
                    return
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"llama.cpp failed: {item}") from item
                if "error" in item:
                    error = item["error"]
                    raise EngineRequestError(str(error.get("message", error)) if isinstance(error, dict) else error)
                usage = item.get("usage")
                deltas = [d for c in item.get("choices", []) if (d := choices[c["index"]].feed(c, usage)) is not None]
                done = all(c.finished for c in choices)  # our stop strings may end a choice before llama.cpp
                if deltas or done:
                    yield EngineOutput(choices=deltas, num_prompt_tokens=num_prompt, finished=done)
                if done:
                    return
        finally:
            stop.set()  # llama.cpp's next callback returns True and frees the slot
            self._requests.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        if (stop := self._requests.get(request_id)) is not None:
            stop.set()

    def is_running(self) -> bool:
        return self._server is not None

    async def is_healthy(self) -> bool:
        return self.is_running()  # llama.cpp runs in this process: if it crashed, so did we

    def metrics_text(self) -> bytes:
        return self._server.handle_metrics().encode() if self._server is not None else b""

    def spec_decode_stats(self) -> SpecDecodeStats | None:
        if self.settings.draft_gguf is None or self._server is None:
            return None
        values: dict[str, float] = {}
        for line in self._server.handle_metrics().splitlines():
            name, _, value = line.partition(" ")
            if name.startswith("llamacpp:spec_decode_num_"):
                values[name.removeprefix("llamacpp:spec_decode_num_").removesuffix("_total")] = float(value)
        return SpecDecodeStats(drafts=int(values.get("drafts", 0)), draft_tokens=int(values.get("draft_tokens", 0)),
                               accepted_tokens=int(values.get("accepted_tokens", 0)))

    def shutdown(self) -> None:
        server, self._server = self._server, None
        del server  # llama.cpp's destructor ends its loop and frees the model


@dataclass
class _ChoiceState:
    """One choice's stream: token ids from the logprobs, stop strings and stop token ids matched here."""

    index: int
    params: GenerationParams
    retokenize: Callable[[str], list[int]]  # ids for a piece that comes without logprobs
    finished: bool = False
    held: str = ""  # text that may be the start of a stop string
    counted: int = 0  # tokens reported so far

    def feed(self, c: dict[str, Any], usage: dict[str, Any] | None) -> ChoiceDelta | None:
        if self.finished:
            return None
        delta = self._feed(c)
        if delta is not None and delta.finish_reason is not None and usage is not None:
            # the last delta makes the count exact: llama.cpp counted this choice's tokens
            delta.num_tokens = max(0, int(usage.get("completion_tokens", 0)) - self.counted)
        if delta is not None:
            self.counted += delta.num_tokens
        return delta

    def _feed(self, c: dict[str, Any]) -> ChoiceDelta | None:
        entries = (c.get("logprobs") or {}).get("content") or []
        text = c.get("text") or ""
        ids = [int(e["id"]) for e in entries] if entries or not text else self.retokenize(text)
        stopped: str | int | None = None
        # stop token ids: the token ends the choice and its text is not shown (vLLM's rule)
        for k, token in enumerate(ids):
            if token in self.params.stop_token_ids:
                ids, entries, stopped = ids[: k + 1], entries[: k + 1], token
                text = "".join(e.get("token", "") for e in entries[:k])
                break
        out, hit = self._match_stops(text)
        if hit is not None:
            stopped = hit
        elif stopped is not None:  # a stop token: text held for a partial stop string is output after all
            out += self.held
            self.held = ""
        logprobs = _logprobs(entries, self.params.logprobs) if self.params.logprobs is not None else None
        if stopped is not None:
            self.finished = True
            return ChoiceDelta(self.index, out, ids, logprobs, "stop", stopped)
        finish = c.get("finish_reason")
        if finish is not None:
            self.finished = True
            out += self.held
            self.held = ""
            return ChoiceDelta(self.index, out, ids, logprobs, "length" if finish == "length" else "stop", None)
        if not out and not ids:
            return None
        return ChoiceDelta(self.index, out, ids, logprobs)

    def _match_stops(self, text: str) -> tuple[str, str | None]:
        stops = self.params.stop
        if not stops:
            return text, None
        buf = self.held + text
        hits = [(i, s) for s in stops if (i := buf.find(s)) != -1]
        if hits:
            i, s = min(hits)
            self.held = ""
            return buf[: i + len(s)] if self.params.include_stop_str_in_output else buf[:i], s
        # the longest tail of the text that starts a stop string is held back (longest first: one hit per string)
        keep = max((next((n for n in range(min(len(s) - 1, len(buf)), 0, -1) if buf.endswith(s[:n])), 0)
                    for s in stops), default=0)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep], None

    def finish(self, reason: str) -> ChoiceDelta:
        self.finished = True
        return ChoiceDelta(self.index, self.held, [], None, reason, None)


def _logprobs(entries: list[dict[str, Any]], k: int | None) -> list[TokenLogprob]:
    return [TokenLogprob(token_id=int(e["id"]), token=e.get("token", ""), logprob=float(e["logprob"]),
                         top=tuple((int(t["id"]), t.get("token", ""), float(t["logprob"]))
                                   for t in (e.get("top_logprobs") or [])[: k or 0]))
            for e in entries]


def llguidance_grammar(c: Constraint) -> str:
    """Any of our constraints as an llguidance grammar (llama.cpp runs grammars that start with `%llguidance`).
    JSON is compact, as with vLLM: with free whitespace a small model pads values with newlines."""
    compact = {"x-guidance": {"whitespace_flexible": False}}
    head = "%llguidance {}\n"
    if c.kind == "json":
        return f"{head}start: %json {json.dumps(dict(c.value) | compact)}"
    if c.kind == "json_object":
        return f"{head}start: %json {json.dumps({'type': 'object'} | compact)}"
    if c.kind == "choice":
        return f"{head}start: " + " | ".join(json.dumps(choice) for choice in c.value)
    if c.kind == "regex":
        from llguidance import regex_to_lark

        return f"{head}start: /{regex_to_lark(c.value)}/"
    from llguidance.gbnf_to_lark import any_to_lark

    try:  # vLLM's xgrammar EBNF is GBNF; lark passes through unchanged
        lark = any_to_lark(c.value)
    except Exception as e:  # noqa: BLE001 - the converter raises its own error types for any bad grammar
        raise EngineRequestError(f"the grammar does not parse: {e}") from None
    return lark if lark.startswith("%llguidance") else head + lark


def default_threads() -> int:
    from serve.machine import usable_cores

    return usable_cores()
