"""Media checks without an engine: every bad image or audio part is a 400 that names the part and says why."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from serve.errors import APIError
from serve.media import MediaError, MediaLimits, check_parts, fetch_payload, load_media, parse_per_prompt
from serve.protocol import AudioURLPart, ImagePart, InputAudioPart, TranscriptionRequest

RATE = 16000


def audio_bytes(seconds: float = 1.0, fmt: str = "WAV", rate: int = RATE, channels: int = 1) -> bytes:
    import soundfile

    t = np.arange(int(seconds * rate)) / rate
    tone = (0.2 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
    buf = io.BytesIO()
    soundfile.write(buf, np.stack([tone] * channels, axis=1) if channels > 1 else tone, rate, format=fmt)
    return buf.getvalue()


def png_bytes(width: int = 20, height: int = 10) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)  # incompressible
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def input_audio(raw: bytes, fmt: str) -> InputAudioPart:
    return InputAudioPart.model_validate({"type": "input_audio", "input_audio": {"data": b64(raw), "format": fmt}})


def image(url: str) -> ImagePart:
    return ImagePart.model_validate({"type": "image_url", "image_url": {"url": url}})


def audio_url(url: str) -> AudioURLPart:
    return AudioURLPart.model_validate({"type": "audio_url", "audio_url": {"url": url}})


def load(part, limits: MediaLimits = MediaLimits(), param: str = "messages[0].content[1]"):  # noqa: B008
    raw, declared = asyncio.run(fetch_payload(param, part, limits))
    return load_media(param, part, raw, declared, limits)


@pytest.mark.parametrize("fmt", ["wav", "mp3", "flac", "ogg"])
def test_each_audio_format_loads_with_its_duration(fmt: str) -> None:
    item = load(input_audio(audio_bytes(1.5, fmt.upper()), fmt))
    assert item.modality == "audio" and item.part["input_audio"]["format"] == fmt
    assert item.seconds == pytest.approx(1.5, abs=0.06)  # mp3 frames pad the end a little


def test_audio_data_url_and_stereo_44k() -> None:
    raw = audio_bytes(0.5, "FLAC", rate=44100, channels=2)
    item = load(audio_url("data:audio/flac;base64," + b64(raw)))
    assert item.part == {"type": "input_audio", "input_audio": {"data": b64(raw), "format": "flac"}}


def test_image_data_url_becomes_rgb() -> None:
    item = load(image("data:image/png;base64," + b64(png_bytes())))
    assert item.modality == "image" and item.image.mode == "RGB" and item.image.size == (20, 10)


@pytest.mark.parametrize(("part", "where", "words"), [
    (InputAudioPart.model_validate({"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}}),
     "input_audio.data", "not valid base64"),
    (input_audio(b"just some text, not audio", "wav"), "input_audio", "cannot decode"),
    (input_audio(audio_bytes(1.0, "WAV"), "mp3"), "input_audio", "is wav, not mp3"),
    (input_audio(audio_bytes(1.0, "WAV")[:44], "wav"), "input_audio", "no samples"),
    (input_audio(audio_bytes(3.0, "FLAC"), "flac"), "input_audio", "longer than this server's limit of 2 s"),
    (audio_url("data:audio/aac;base64," + b64(b"x")), "audio_url.url", "audio type audio/aac is not accepted"),
    (audio_url("data:audio/wav," + "plain"), "audio_url.url", "only base64 data: URLs"),
    (audio_url("file:///etc/passwd"), "audio_url.url", "scheme 'file' is not accepted"),
    (audio_url("http://169.254.169.254/latest/meta-data"), "audio_url.url", "remote media URLs are off"),
    (image("https://example.com/cat.png"), "image_url.url", "remote media URLs are off"),
    (image("data:text/plain;base64," + b64(b"hi")), "image_url.url", "must hold an image"),
    (image("data:image/png;base64," + b64(b"\x89PNG not really")), "image_url", "cannot decode the image"),
    (image("data:image/png;base64," + b64(png_bytes(300, 200))), "image_url", "more than this server's limit"),
    (image("data:image/png;base64," + b64(png_bytes()[:300])), "image_url", "damaged"),
])
def test_bad_media_names_the_part(part, where: str, words: str) -> None:
    limits = MediaLimits(max_audio_seconds=2.0, max_image_pixels=300 * 199)
    with pytest.raises(MediaError) as err:
        load(part, limits)
    assert err.value.status == 400 and err.value.param == f"messages[0].content[1].{where}"
    assert words in err.value.message, err.value.message


def test_oversized_base64_is_refused_before_decoding() -> None:
    limits = MediaLimits(max_bytes=1000)
    with pytest.raises(MediaError, match="more than 1000 bytes"):
        load(input_audio(audio_bytes(1.0), "wav"), limits)


def test_parts_checked_against_model_roles_and_counts() -> None:
    wav = input_audio(audio_bytes(0.2), "wav")
    png = image("data:image/png;base64," + b64(png_bytes()))
    limits = MediaLimits(per_prompt={"audio": 1, "image": 2})
    user = {"messages[0].content[0]": "user", "messages[0].content[1]": "user", "messages[1].content[0]": "system"}
    check_parts([("messages[0].content[0]", wav)], ("audio",), "m", limits, user)
    cases = [
        ([("messages[0].content[0]", png)], ("audio",), "cannot take image input (it takes audio)"),
        ([("messages[0].content[0]", wav)], (), "cannot take audio input (it takes text only)"),
        ([("messages[1].content[0]", wav)], ("audio",), "only be sent in user messages, not system"),
        ([("messages[0].content[0]", wav), ("messages[0].content[1]", wav)], ("audio",), "at most 1 audio"),
    ]
    for parts, accepted, words in cases:
        with pytest.raises(MediaError) as err:
            check_parts(parts, accepted, "m", limits, user)
        assert words in err.value.message and err.value.param == parts[-1][0]


def test_limit_parsing() -> None:
    assert parse_per_prompt("audio=1, image=4") == {"audio": 1, "image": 4}
    assert parse_per_prompt('{"audio": 2}') == {"audio": 2}
    for bad in ("audio", "audio=x", "audio=-1"):
        with pytest.raises(ValueError, match="limit-mm-per-prompt"):
            MediaLimits(per_prompt=parse_per_prompt(bad))
    with pytest.raises(ValueError, match="modalities"):
        MediaLimits(per_prompt={"video": 1})


def test_transcription_fields() -> None:
    req = TranscriptionRequest.model_validate({"model": "m", "temperature": "0.2", "stream": "true"})
    assert req.temperature == 0.2 and req.stream is True and req.response_format == "json"
    for bad in ({"model": "m", "language": "english"}, {"model": "m", "response_format": "csv"},
                {"model": "m", "temperature": "3"}, {"model": "m", "timestamp_granularities": ["word"]},
                {"model": "m", "stream": "true", "response_format": "srt"}):
        with pytest.raises(ValueError):
            TranscriptionRequest.model_validate(bad)


@pytest.fixture
def media_host() -> Iterator[str]:
    """A local HTTP server: /a.wav (audio), /moved (a redirect to a host that is not allowed), /missing (404)."""
    wav = audio_bytes(0.5)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/a.wav":
                self.send_response(200)
                self.send_header("Content-Length", str(len(wav)))
                self.end_headers()
                self.wfile.write(wav)
            elif self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", "http://169.254.169.254/")
                self.end_headers()
            else:
                self.send_response(404)
                self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_allowed_host_is_fetched_and_redirects_are_not_followed(media_host: str) -> None:
    limits = MediaLimits(allowed_domains=("127.0.0.1",))
    assert load(audio_url(f"{media_host}/a.wav"), limits).seconds == pytest.approx(0.5)
    for path, words in (("/moved", "HTTP 302"), ("/missing", "HTTP 404")):
        with pytest.raises(APIError, match=words):
            load(audio_url(media_host + path), limits)
    with pytest.raises(APIError, match="more than 100 bytes"):
        load(audio_url(f"{media_host}/a.wav"), MediaLimits(allowed_domains=("127.0.0.1",), max_bytes=100))
