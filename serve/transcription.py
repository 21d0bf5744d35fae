"""POST /v1/audio/transcriptions and /v1/audio/translations for audio models (multipart, as OpenAI's API and the
official client send them).

Transcription uses Voxtral's transcription mode: `[INST][BEGIN_AUDIO][AUDIO]...[/INST]lang:xx[TRANSCRIBE]`, no text
prompt (mistral_common's `encode_transcription`). Translation asks the model in chat, with the audio and an
instruction to translate into English, as Voxtral's model card does (vLLM 0.32 builds the transcription prompt for
both, so its "translation" is a transcription). The answer comes back whole (json, text, verbose_json with one
segment, srt, vtt) or streamed as OpenAI's `transcript.text.delta` / `transcript.text.done` events.
"""

from __future__ import annotations

import math
import uuid
import zlib
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from models.tokenizers import ChatTemplateError
from serve.engine import EngineOutput, GenerationParams, Media
from serve.errors import APIError, from_validation_error
from serve.http import read_body, stream_response
from serve.media import MediaError, load_audio_file
from serve.protocol import TranscriptionRequest
from serve.responses import sse
from serve.routes import RouteContext
from serve.serving import budget_tokens, check_model, check_running, tracked

Task = Literal["transcribe", "translate"]
TRANSLATE_INSTRUCTION = "Translate this audio into English."
MAX_FORM_FIELDS = 32


def register_audio_routes(app: FastAPI, ctx: RouteContext) -> None:
    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> Response:
        return await serve_audio_task(ctx, request, "transcribe")

    @app.post("/v1/audio/translations")
    async def translations(request: Request) -> Response:
        return await serve_audio_task(ctx, request, "translate")


async def read_form(request: Request) -> tuple[dict[str, Any], bytes, str]:
    """(fields, file bytes, file name) from a multipart body read within the server's body limit."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(400, "send the audio as multipart/form-data with a `file` field (as OpenAI's API takes it)",
                       param="file", code="invalid_request")
    raw = await read_body(request)
    sent = False

    async def replay() -> dict[str, Any]:  # Starlette's form parser reads the body we already bounded
        nonlocal sent
        if sent:
            return {"type": "http.request", "body": b"", "more_body": False}
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=MAX_FORM_FIELDS)
    except Exception as e:  # noqa: BLE001 - python-multipart's parse errors and Starlette's limits alike
        raise APIError(400, f"cannot read the multipart form: {getattr(e, 'detail', e)}",
                       code="invalid_request") from None
    fields: dict[str, Any] = {}
    upload: UploadFile | None = None
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key != "file":
                raise APIError(400, f"unexpected file field {key!r}: send the audio as `file`", param=key,
                               code="invalid_request")
            upload = value
        elif key.endswith("[]"):
            fields.setdefault(key[:-2], []).append(value)
        else:
            fields[key] = value
    if upload is None:
        raise APIError(400, "file: an audio file is required", param="file", code="invalid_value")
    data = await upload.read()
    await form.close()
    return fields, data, upload.filename or "audio"


def parse_request(fields: dict[str, Any]) -> TranscriptionRequest:
    try:  # form fields are text: lax validation turns "0.2" and "true" into their types
        return TranscriptionRequest.model_validate(fields)
    except ValidationError as e:
        raise from_validation_error(e) from None


async def serve_audio_task(ctx: RouteContext, request: Request, task: Task) -> Response:
    engine = ctx.engine
    fields, data, _ = await read_form(request)
    req = parse_request(fields)
    adapter = check_model(engine, req.model)
    if "audio" not in engine.media:
        raise APIError(400, f"model '{engine.model_name}' does not take audio: transcription needs an audio model "
                            "(e.g. tiny-voxtral)", param="model", code="invalid_value")
    if req.prompt:
        raise APIError(400, "prompt: this model's transcription mode takes no text prompt", param="prompt",
                       code="invalid_value")
    if task == "translate" and req.language is not None:
        raise APIError(400, "language: translations always produce English; the field is not taken here",
                       param="language", code="invalid_value")
    check_running(engine)
    if len(data) > ctx.media_limits.max_bytes:
        raise MediaError("file", f"more than {ctx.media_limits.max_bytes} bytes of media (--max-media-bytes)")
    seconds, fmt = await ctx.pool.run(load_audio_file, data, "file", ctx.media_limits)
    try:
        ids, audio = await ctx.pool.run(_prompt, engine.tokenizer, task, data, fmt, req.language)
    except ChatTemplateError as e:
        raise APIError(400, f"file: {e}", param="file", code="invalid_value") from None
    max_tokens = budget_tokens(engine, len(ids), req.max_completion_tokens, "file")
    params = GenerationParams(max_tokens=max_tokens, temperature=req.temperature,
                              logprobs=0 if req.response_format == "verbose_json" else None, adapter=adapter)
    rate = engine.tokenizer.audio_rate()  # type: ignore[attr-defined]
    media = Media(audio=tuple((a, rate) for a in audio))
    route = f"/v1/audio/{'transcriptions' if task == 'transcribe' else 'translations'}"
    rid = f"{'trsc' if task == 'transcribe' else 'trsl'}-{uuid.uuid4().hex}"
    outputs = tracked(engine, ctx.metrics, route, ids, params, rid, media)
    ctx.admission.acquire(1, "file")
    if req.stream:
        return await stream_response(ctx.admission.release_after(_stream(outputs, seconds)))
    try:
        text, logprobs, tokens = await _collect(outputs)
    finally:
        ctx.admission.release(1)
    return _shape(req, task, text, logprobs, tokens, seconds)


def _prompt(tokenizer: Any, task: Task, data: bytes, fmt: str, language: str | None) -> tuple[list[int], list[Any]]:
    if task == "transcribe":
        try:
            return tokenizer.encode_transcription(data, language)
        except ValueError as e:  # mistral_common's checks (its pydantic errors are ValueErrors too)
            raise ChatTemplateError(str(e).splitlines()[0]) from e
    import base64

    messages = [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}},
        {"type": "text", "text": TRANSLATE_INSTRUCTION}]}]
    ids, audio, _ = tokenizer.encode_chat_media(messages)
    return ids, audio


async def _collect(outputs: AsyncIterator[EngineOutput]) -> tuple[str, list[float], list[int]]:
    text, logprobs, tokens = [], [], []
    async for out in outputs:
        for c in out.choices:
            text.append(c.text)
            tokens += c.token_ids
            logprobs += [t.logprob for t in c.logprobs or ()]
    return "".join(text).strip(), logprobs, tokens


async def _stream(outputs: AsyncIterator[EngineOutput], seconds: float) -> AsyncIterator[str]:
    parts = []
    async for out in outputs:
        for c in out.choices:
            if c.text:
                delta = c.text.lstrip() if not parts else c.text
                parts.append(delta)
                if delta:
                    yield sse({"type": "transcript.text.delta", "delta": delta})
    yield sse({"type": "transcript.text.done", "text": "".join(parts).strip(), "usage": _usage(seconds)})


def _usage(seconds: float) -> dict[str, Any]:
    return {"type": "duration", "seconds": math.ceil(seconds)}  # billed whole seconds, as OpenAI reports them


def _shape(req: TranscriptionRequest, task: Task, text: str, logprobs: list[float], tokens: list[int],
           seconds: float) -> Response:
    if req.response_format == "text":
        return PlainTextResponse(text + "\n")
    if req.response_format == "json":
        return JSONResponse({"text": text, "usage": _usage(seconds)})
    if req.response_format in ("srt", "vtt"):
        return PlainTextResponse(_subtitles(req.response_format, text, seconds))
    # One segment spanning the audio: Voxtral gives no timestamps. avg_logprob and compression_ratio are computed
    # as Whisper computes them; no_speech_prob is left out (the model has no such head).
    segment = {"id": 0, "seek": 0, "start": 0.0, "end": round(seconds, 3), "text": text, "tokens": tokens,
               "temperature": req.temperature,
               "avg_logprob": sum(logprobs) / len(logprobs) if logprobs else 0.0,
               "compression_ratio": len(text.encode()) / max(1, len(zlib.compress(text.encode())))}
    return JSONResponse({"task": task, "language": req.language or ("en" if task == "translate" else None),
                         "duration": round(seconds, 3), "text": text, "segments": [segment],
                         "usage": _usage(seconds)})


def _subtitles(kind: str, text: str, seconds: float) -> str:
    def stamp(t: float) -> str:
        ms = round(t * 1000)
        h, rest = divmod(ms, 3_600_000)
        m, rest = divmod(rest, 60_000)
        s, ms = divmod(rest, 1000)
        return f"{h:02d}:{m:02d}:{s:02d}{',' if kind == 'srt' else '.'}{ms:03d}"

    cue = f"{stamp(0.0)} --> {stamp(seconds)}\n{text}\n"
    return f"1\n{cue}\n" if kind == "srt" else f"WEBVTT\n\n{cue}\n"

