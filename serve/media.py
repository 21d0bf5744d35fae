"""Images and audio in requests: fetched (only from allowed hosts), decoded and checked against the server's limits
before any engine sees them, so bad media is a 400 that names the part (`messages[2].content[1].input_audio`)
instead of vLLM's mix of 400/500/501 from deep inside its media loaders (shared/notes/multimodal.md §2.5).

The server makes no outbound requests unless `--allowed-media-domains` names hosts: a remote URL is refused, so the
server cannot be used to reach hosts on its network (SSRF). Only `data:` URLs and inline base64 are read otherwise.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from serve.errors import APIError
from serve.protocol import ImagePart, InputAudioPart, MediaPart

Modality = Literal["audio", "image"]

# soundfile's format names for the formats OpenAI's `input_audio.format` and our data URLs take
AUDIO_FORMATS = {"wav": "WAV", "mp3": "MP3", "flac": "FLAC", "ogg": "OGG"}
AUDIO_MIME = {"audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/vnd.wave": "wav",
              "audio/mpeg": "mp3", "audio/mp3": "mp3", "audio/flac": "flac", "audio/x-flac": "flac",
              "audio/ogg": "ogg"}
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


@dataclass(frozen=True)
class MediaLimits:
    """Server options (`python -m serve --help`): what one request may carry."""

    per_prompt: dict[str, int] = field(default_factory=lambda: {"audio": 5, "image": 8})
    max_audio_seconds: float = 300.0  # per item; 12.5 tokens a second on Voxtral-style models
    max_image_pixels: int = 4096 * 4096  # per item, read from the header before decoding (no decompression bombs)
    max_bytes: int = 20 << 20  # per item, after base64 decoding or fetching
    allowed_domains: tuple[str, ...] = ()  # hosts remote URLs may name; empty: no outbound requests at all
    fetch_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        for modality, count in self.per_prompt.items():
            if modality not in ("audio", "image") or count < 0:
                raise ValueError(f"limit-mm-per-prompt: {modality}={count} (modalities: audio, image; counts >= 0)")
        if self.max_audio_seconds <= 0 or self.max_image_pixels <= 0 or self.max_bytes <= 0:
            raise ValueError("media limits must be positive")


def parse_per_prompt(text: str) -> dict[str, int]:
    """`audio=1,image=4` (vLLM's --limit-mm-per-prompt also takes JSON: both are read)."""
    import json

    text = text.strip()
    if text.startswith("{"):
        value = json.loads(text)
        return {str(k): int(v) for k, v in value.items()}
    out = {}
    for item in filter(None, (i.strip() for i in text.split(","))):
        key, sep, count = item.partition("=")
        if not sep or not count.strip().isdigit():
            raise ValueError(f"limit-mm-per-prompt: {item!r} is not MODALITY=COUNT")
        out[key.strip()] = int(count)
    return out


class MediaError(APIError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(400, f"{param}: {message}", param=param, code="invalid_media")


@dataclass
class LoadedMedia:
    """One checked item: what mistral_common reads to place its tokens, and what the engine takes."""

    modality: Modality
    param: str
    part: dict[str, Any]  # the OpenAI-shaped part with inline data, for mistral_common
    seconds: float = 0.0  # audio
    image: Any = None  # PIL image (RGB), handed to the engine


def modality_of(part: MediaPart) -> Modality:
    return "image" if isinstance(part, ImagePart) else "audio"


def part_field(part: MediaPart) -> str:
    return part.type  # the part's payload key: image_url, input_audio, audio_url


def check_parts(parts: list[tuple[str, MediaPart]], accepted: tuple[str, ...], model: str,
                limits: MediaLimits, roles: dict[str, str]) -> None:
    """What the model takes, where media may go, and how many: before anything is decoded."""
    counts: dict[str, int] = {}
    for param, part in parts:
        modality = modality_of(part)
        if modality not in accepted:
            takes = " and ".join(accepted) if accepted else "text only"
            raise MediaError(param, f"model '{model}' cannot take {modality} input (it takes {takes})")
        if roles[param] != "user":
            raise MediaError(param, f"{modality} can only be sent in user messages, not {roles[param]}")
        counts[modality] = counts.get(modality, 0) + 1
        allowed = limits.per_prompt.get(modality, 0)
        if counts[modality] > allowed:
            raise MediaError(param, f"at most {allowed} {modality} item(s) per request on this server "
                                    "(--limit-mm-per-prompt)")


async def fetch_payload(param: str, part: MediaPart, limits: MediaLimits) -> tuple[bytes, str | None]:
    """(bytes, declared format) for a part: inline base64, a data: URL, or an allowed remote URL."""
    if isinstance(part, InputAudioPart):
        return _b64(part.input_audio.data, f"{param}.input_audio.data", limits), part.input_audio.format
    url = part.image_url.url if isinstance(part, ImagePart) else part.audio_url.url
    where = f"{param}.{part_field(part)}.url"
    if url.startswith("data:"):
        header, sep, data = url[5:].partition(",")
        if not sep:
            raise MediaError(where, "a data: URL needs a comma before its data")
        mime, *options = header.split(";")
        if "base64" not in options:
            raise MediaError(where, "only base64 data: URLs are accepted (data:<type>;base64,<data>)")
        return _b64(data, where, limits), _declared(mime.strip().lower(), part, where)
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise MediaError(where, f"URL scheme {scheme or '(none)'!r} is not accepted: send a data: URL")
    host = (urlsplit(url).hostname or "").lower()
    if host not in limits.allowed_domains:
        raise MediaError(where, "remote media URLs are off on this server (it makes no outbound requests); send a "
                                "data: URL, or start the server with --allowed-media-domains " + (host or "HOST"))
    return await _fetch(url, where, limits), None


def _declared(mime: str, part: MediaPart, where: str) -> str | None:
    if isinstance(part, ImagePart):
        if mime and not mime.startswith("image/"):
            raise MediaError(where, f"an image_url data: URL must hold an image, not {mime}")
        return None
    if not mime:
        return None
    if mime not in AUDIO_MIME:
        raise MediaError(where, f"audio type {mime} is not accepted (wav, mp3, flac, ogg)")
    return AUDIO_MIME[mime]


def _b64(data: str, where: str, limits: MediaLimits) -> bytes:
    if len(data) > math.ceil(limits.max_bytes / 3) * 4 + 4:
        raise MediaError(where, f"more than {limits.max_bytes} bytes of media (--max-media-bytes)")
    try:
        raw = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(where, "not valid base64") from None
    if not raw:
        raise MediaError(where, "empty")
    return raw


async def _fetch(url: str, where: str, limits: MediaLimits) -> bytes:
    import httpx

    chunks, size = [], 0
    try:
        # no redirects: a redirect could lead to a host that is not allowed
        async with httpx.AsyncClient(timeout=limits.fetch_timeout_s, follow_redirects=False) as client, \
                client.stream("GET", url) as response:
            if response.status_code != 200:
                raise MediaError(where, f"fetching it answered HTTP {response.status_code}")
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limits.max_bytes:
                    raise MediaError(where, f"more than {limits.max_bytes} bytes of media (--max-media-bytes)")
                chunks.append(chunk)
    except httpx.HTTPError as e:
        raise MediaError(where, f"could not fetch it: {type(e).__name__}") from None
    return b"".join(chunks)


def load_media(param: str, part: MediaPart, raw: bytes, declared: str | None, limits: MediaLimits) -> LoadedMedia:
    """Decode and check one item (CPU work: run it in the bounded pool)."""
    where = f"{param}.{part_field(part)}"
    if isinstance(part, ImagePart):
        image = _image(raw, where, limits)
        data_url = f"data:image/{image.format_name};base64," + base64.b64encode(raw).decode()
        return LoadedMedia("image", param, {"type": "image_url", "image_url": {"url": data_url}}, image=image.rgb)
    seconds, fmt = _audio(raw, declared, where, limits)
    payload = {"data": base64.b64encode(raw).decode(), "format": fmt}
    return LoadedMedia("audio", param, {"type": "input_audio", "input_audio": payload}, seconds=seconds)


def load_audio_file(raw: bytes, where: str, limits: MediaLimits) -> tuple[float, str]:
    """(seconds, format) of an uploaded audio file, checked as a chat part's audio is."""
    return _audio(raw, None, where, limits)


def _audio(raw: bytes, declared: str | None, where: str, limits: MediaLimits) -> tuple[float, str]:
    import soundfile

    try:
        info = soundfile.info(io.BytesIO(raw))
    except Exception:  # noqa: BLE001 - libsndfile raises its own error types for every kind of bad file
        raise MediaError(where, "cannot decode the audio (wav, mp3, flac and ogg are accepted)") from None
    found = next((k for k, v in AUDIO_FORMATS.items() if v == info.format), None)
    if found is None:
        raise MediaError(where, f"audio format {info.format} is not accepted (wav, mp3, flac, ogg)")
    if declared is not None and declared != found:
        raise MediaError(where, f"the data is {found}, not {declared} as declared")
    if not 1000 <= info.samplerate <= 384000 or info.channels > 16:
        raise MediaError(where, f"{info.samplerate} Hz with {info.channels} channels is not a usable recording")
    seconds = info.frames / info.samplerate if info.frames > 0 else 0.0
    if seconds > limits.max_audio_seconds:
        raise MediaError(where, f"{seconds:.1f} s of audio is longer than this server's limit of "
                                f"{limits.max_audio_seconds:g} s (--max-audio-seconds)")
    try:
        samples, _ = soundfile.read(io.BytesIO(raw), dtype="float32", always_2d=True)
    except Exception:  # noqa: BLE001 - a valid header over corrupt data fails only here
        raise MediaError(where, "cannot decode the audio: the data is damaged") from None
    if samples.shape[0] == 0:
        raise MediaError(where, "the audio holds no samples")
    return samples.shape[0] / info.samplerate, found


@dataclass
class _Image:
    rgb: Any
    format_name: str


def _image(raw: bytes, where: str, limits: MediaLimits) -> _Image:
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(raw))
    except Exception:  # noqa: BLE001 - PIL raises UnidentifiedImageError, OSError, SyntaxError...
        raise MediaError(where, "cannot decode the image (png, jpeg, webp, gif and bmp are accepted)") from None
    if image.format not in IMAGE_FORMATS:
        raise MediaError(where, f"image format {image.format} is not accepted (png, jpeg, webp, gif, bmp)")
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise MediaError(where, f"{width}x{height} pixels is more than this server's limit of "
                                f"{limits.max_image_pixels} (--max-image-pixels)")
    if width < 1 or height < 1:
        raise MediaError(where, "the image is empty")
    try:
        rgb = image.convert("RGB")
    except Exception:  # noqa: BLE001 - a valid header over corrupt data fails only here
        raise MediaError(where, "cannot decode the image: the data is damaged") from None
    return _Image(rgb, image.format.lower())
