"""A tiny Voxtral (Whisper-style encoder, adapter, Mistral decoder) served by vLLM from Mistral's native files:
transcription, translation and chat over audio through the official openai client, the same greedy tokens as
transformers, and bad media refused with 400s that name the part while the server keeps serving."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import openai
import pytest

from models.tokenizers import load_tokenizer
from tests.conftest import LocalRenderer, RunningServer

pytestmark = pytest.mark.server
RATE = 16000
MODEL = "tiny-voxtral"


def speechlike(seconds: float, fmt: str = "WAV", seed: int = 0) -> bytes:
    """A chirp with noise: not speech, but audio the encoder has to look at (the model is random anyway)."""
    import soundfile

    t = np.arange(int(seconds * RATE)) / RATE
    wave = 0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.02 * np.random.default_rng(seed).standard_normal(t.size)
    buf = io.BytesIO()
    soundfile.write(buf, wave.astype(np.float32), RATE, format=fmt)
    return buf.getvalue()


def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def audio_message(raw: bytes, fmt: str, text: str = "What do you hear?") -> list[dict]:
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(raw).decode(), "format": fmt}}
    return [{"role": "user", "content": [part, {"type": "text", "text": text}]}]


SHORT = {"max_completion_tokens": 6}


def test_transcription_formats_through_the_openai_client(voxtral_server: RunningServer) -> None:
    c = client(voxtral_server)
    wav = speechlike(2.5)
    plain = c.audio.transcriptions.create(model=MODEL, file=("a.wav", wav), language="en", extra_body=SHORT)
    assert plain.text and plain.usage.seconds == 3 and plain.usage.type == "duration"
    text = c.audio.transcriptions.create(model=MODEL, file=("a.wav", wav), language="en", response_format="text",
                                         extra_body=SHORT)
    assert text.strip() == plain.text  # greedy by default (temperature 0)
    verbose = c.audio.transcriptions.create(model=MODEL, file=("a.wav", wav), language="en",
                                            response_format="verbose_json", extra_body=SHORT)
    segment = verbose.segments[0]
    assert verbose.text == plain.text and verbose.duration == pytest.approx(2.5) and segment.end == pytest.approx(2.5)
    assert len(segment.tokens) == 6 and segment.avg_logprob < 0
    srt = c.audio.transcriptions.create(model=MODEL, file=("a.wav", wav), language="en", response_format="srt",
                                        extra_body=SHORT)
    assert srt.startswith("1\n00:00:00,000 --> 00:00:02,500\n") and plain.text in srt
    events = list(c.audio.transcriptions.create(model=MODEL, file=("a.wav", wav), language="en", stream=True,
                                                extra_body=SHORT))
    deltas = "".join(e.delta for e in events if e.type == "transcript.text.delta")
    assert events[-1].type == "transcript.text.done" and events[-1].text == deltas.strip() == plain.text


def test_transcription_prompt_is_mistral_commons(voxtral_server: RunningServer) -> None:
    """`[INST][BEGIN_AUDIO][AUDIO]x125[/INST]lang:en[TRANSCRIBE]` for 2.5 s of audio (10 s chunks, 12.5 Hz), and
    the prompt's token count is what the server charged."""
    tok = load_tokenizer(voxtral_server.spec)
    ids, audio = tok.encode_transcription(speechlike(2.5), "en")  # type: ignore[attr-defined]
    assert ids.count(24) == 125 and len(audio) == 1 and len(audio[0]) == 10 * RATE
    assert tok.decode(ids[-5:]) == "lang:en"
    ids_any, _ = tok.encode_transcription(speechlike(2.5), None)  # type: ignore[attr-defined]
    assert len(ids_any) < len(ids)  # no language: no `lang:en`


def test_translation(voxtral_server: RunningServer) -> None:
    out = client(voxtral_server).audio.translations.create(model=MODEL, file=("a.flac", speechlike(1.0, "FLAC")),
                                                           extra_body=SHORT)
    assert out.text


@pytest.mark.parametrize("fmt", ["wav", "mp3", "flac", "ogg"])
def test_chat_with_input_audio(voxtral_server: RunningServer, fmt: str) -> None:
    messages = audio_message(speechlike(1.2, fmt.upper()), fmt)
    r = client(voxtral_server).chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    assert r.usage.completion_tokens <= 4
    assert r.usage.prompt_tokens == len(LocalRenderer(voxtral_server.spec).prompt(messages))


def test_audio_url_data_url_and_two_clips(voxtral_server: RunningServer) -> None:
    url = "data:audio/wav;base64," + base64.b64encode(speechlike(0.8)).decode()
    messages = [{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": url}},
                                             {"type": "text", "text": "and"},
                                             {"type": "audio_url", "audio_url": {"url": url}}]}]
    r = client(voxtral_server).chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    prompt = LocalRenderer(voxtral_server.spec).prompt(messages)
    assert r.usage.prompt_tokens == len(prompt) and prompt.count(24) == 250  # two 10 s chunks of [AUDIO]


def test_text_only_request_to_an_audio_model(voxtral_server: RunningServer) -> None:
    r = client(voxtral_server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                       max_tokens=3)
    assert r.usage.prompt_tokens == len(LocalRenderer(voxtral_server.spec).prompt([{"role": "user",
                                                                                   "content": "Hi"}]))


def test_greedy_tokens_match_transformers(voxtral_server: RunningServer) -> None:
    """The HF checkpoint in transformers and the Mistral-native one in vLLM give the same greedy tokens."""
    import torch
    from transformers import VoxtralForConditionalGeneration

    from models.audio import mel_chunks

    messages = audio_message(speechlike(3.0, seed=1), "wav", "Describe it.")
    tok = load_tokenizer(voxtral_server.spec)
    ids, audio, _ = tok.encode_chat_media(messages)  # type: ignore[attr-defined]
    model = VoxtralForConditionalGeneration.from_pretrained(voxtral_server.spec.checkpoint_dir).eval()
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), input_features=mel_chunks(audio, model.config),
                             max_new_tokens=8, do_sample=False, min_new_tokens=8)
    expected = out[0, len(ids):].tolist()
    r = client(voxtral_server).chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                       logprobs=True, extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == tok.decode(expected)
    # and the same log-probabilities, to float noise (fp32 on both sides)
    hf_lp = model(input_ids=torch.tensor([ids + expected[:-1]]), input_features=mel_chunks(audio, model.config)
                  ).logits[0, len(ids) - 1:].log_softmax(-1)
    served = [t.logprob for t in r.choices[0].logprobs.content]
    assert np.allclose(served, [hf_lp[i, t].item() for i, t in enumerate(expected)], atol=2e-3)


def post(server: RunningServer, body: dict) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=120)


def test_bad_media_is_400_naming_the_part_and_the_server_keeps_serving(voxtral_server: RunningServer) -> None:
    wav = base64.b64encode(speechlike(0.5)).decode()
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()

    def with_part(part: dict) -> dict:
        return {"model": MODEL, "max_tokens": 2, "messages": [
            {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": "And now?"}, {"role": "assistant", "content": "Go on."},
            {"role": "user", "content": [{"type": "text", "text": "Listen:"}, part]}]}

    cases = [
        ({"type": "input_audio", "input_audio": {"data": "not base64!", "format": "wav"}},
         "messages[4].content[1].input_audio.data", "base64"),
        ({"type": "input_audio", "input_audio": {"data": base64.b64encode(b"RIFF....garbage").decode(),
                                                 "format": "wav"}}, "messages[4].content[1].input_audio", "decode"),
        ({"type": "input_audio", "input_audio": {"data": wav, "format": "mp3"}},
         "messages[4].content[1].input_audio", "not mp3"),
        ({"type": "input_audio", "input_audio": {"data": base64.b64encode(speechlike(30.0)).decode(),
                                                 "format": "wav"}}, "messages[4].content[1].input_audio", "25 s"),
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64," + png}}, "messages[4].content[1]",
         "cannot take image"),
        ({"type": "audio_url", "audio_url": {"url": "http://10.0.0.1/a.wav"}}, "messages[4].content[1].audio_url.url",
         "remote media URLs are off"),
    ]
    for part, param, words in cases:
        r = post(voxtral_server, with_part(part))
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and words in error["message"], error
    three = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}] * 3}]}
    r = post(voxtral_server, three)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[2]", r.text
    in_system = {"model": MODEL, "max_tokens": 2, "messages": [
        {"role": "system", "content": [{"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}]},
        {"role": "user", "content": "hi"}]}
    r = post(voxtral_server, in_system)
    assert r.status_code == 400 and "user messages" in r.json()["error"]["message"], r.text
    unknown = {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {}}]}]}
    r = post(voxtral_server, unknown)
    assert r.status_code == 400 and "video_url" in r.json()["error"]["message"], r.text
    # Voxtral's tokenizer (Tekken v7) takes no system prompt beside audio: mistral_common's rule, a 400 too
    good = with_part({"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}})
    r = post(voxtral_server, good | {"messages": [{"role": "system", "content": "Be brief."}, *good["messages"]]})
    assert r.status_code == 400 and "system" in r.json()["error"]["message"], r.text
    r = post(voxtral_server, good)
    assert r.status_code == 200, r.text


def test_bad_transcription_requests_are_400(voxtral_server: RunningServer) -> None:
    url = f"{voxtral_server.base_url}/v1/audio/transcriptions"
    wav = speechlike(0.5)
    cases = [
        ({"model": MODEL}, None, "file"),
        ({"model": MODEL, "language": "english"}, wav, "language"),
        ({"model": MODEL, "response_format": "csv"}, wav, "response_format"),
        ({"model": MODEL, "prompt": "Names: Elinor"}, wav, "prompt"),
        ({"model": MODEL, "timestamp_granularities[]": "word"}, wav, "timestamp_granularities"),
        ({"model": MODEL}, b"not audio at all", "file"),
        ({"model": MODEL}, speechlike(30.0), "file"),
    ]
    for fields, raw, param in cases:
        files = {"file": ("a.wav", raw)} if raw is not None else None
        r = httpx.post(url, data=fields, files=files, timeout=60) if files else httpx.post(url, data=fields,
                                                                                            timeout=60)
        assert r.status_code == 400, (fields, r.text)
        assert r.json()["error"]["param"] == param, r.text
    r = httpx.post(url, json={"model": MODEL, "file": "x"}, timeout=60)
    assert r.status_code == 400 and "multipart" in r.json()["error"]["message"]
    r = httpx.post(url, data={"model": "whisper-1"}, files={"file": ("a.wav", wav)}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_audio_requests_are_counted(voxtral_server: RunningServer) -> None:
    client(voxtral_server).audio.transcriptions.create(model=MODEL, file=("a.wav", speechlike(0.3)), extra_body=SHORT)
    r = httpx.get(f"{voxtral_server.base_url}/metrics", timeout=30)
    assert 'cascade_http_requests_total{route="/v1/audio/transcriptions",status="200"}' in r.text


def test_audio_eval_checks_through_the_server(voxtral_server: RunningServer) -> None:
    """The `audio-smoke` suite's check (counting beeps) scores every case; the random model's numbers mean nothing."""
    from eval.server_checks import run_checks, says_number

    out = run_checks(("beep_count",), voxtral_server.base_url, MODEL, None, 3)["beep_count"]
    assert out["n"] == 3 and set(out["metrics"]) == {"count_acc"}
    assert all(r["message"]["content"] is not None for r in out["samples"])
    assert says_number("I hear three beeps.", 3) and says_number("3", 3) and not says_number("thirty", 3)
