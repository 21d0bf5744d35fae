"""Training rows with audio or images: conversations (or Voxtral's transcription pattern) rendered by mistral_common
with their [AUDIO]/[IMG] placeholders, and the frozen encoder's features for those placeholders, computed once.

Sources:
  files    JSONL, one record per line, media paths relative to the file:
             {"messages": [...]}: OpenAI messages whose user parts may be {"type": "audio", "path": "a.wav"} or
                                  {"type": "image", "path": "b.png"} besides text
             {"audio": "a.wav", "text": "...", "language": "en"}: transcription, Voxtral's repetition pattern
                                  (`[INST][BEGIN_AUDIO][AUDIO]...[/INST]lang:en[TRANSCRIBE]` then the text)
  shapes   images drawn here (PIL): a coloured circle, square or triangle; "What shape is this?" -> "A red circle."
  tones    audio made here: one to four beeps; "How many beeps do you hear?" -> "Three."
  speech   the speech demo's training transcriptions (`make speech-demo`, distill/speech/)

One item per row, padded to `seq_len` (longer ones are refused: media cannot be cut). `train_on: text` trains on
every text position (what distillation compares: the media stay in context, their placeholders are not predicted);
`answers` on the assistant's answer or the transcript only (SFT, the adapter stage). The encoder is the data model's
(the cascade's root parent: every stage shares it), so its weights are part of the cache key.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from models.checkpoint import atomic_directory, is_prepared, weights_state
from models.registry import cascade_home, get_model
from models.tokenizers import load_tokenizer

log = logging.getLogger(__name__)
MEDIA_DATA_VERSION = "media/1"
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}
NUMBERS = ("One", "Two", "Three", "Four")


class MediaDataError(ValueError):
    pass


class MediaSourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["files", "shapes", "tones", "speech"]
    paths: list[str] = Field(default_factory=list, description="kind=files: JSONL globs")
    items: int = Field(64, ge=1, le=1_000_000, description="kind=shapes|tones: how many to draw or make")

    @model_validator(mode="after")
    def _paths(self) -> MediaSourceConfig:
        if (self.kind == "files") != bool(self.paths):
            raise ValueError("paths are required for kind=files and only allowed there")
        return self


class MediaDataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["media"] = Field(description="media: conversations with audio or images (distill/media_data.py)")
    sources: list[MediaSourceConfig] = Field(min_length=1)
    seq_len: int = Field(256, ge=8, le=131072, description="tokens per row (one item per row, padded)")
    val_sequences: int = Field(8, ge=1, description="items held out for evaluation (seeded hash)")
    train_on: Literal["text", "answers"] = Field("text", description="text: every text position (distillation); "
                                                 "answers: the assistant's answer or transcript only (SFT)")
    seed: int = 0


# ---------------------------------------------------------------------------------------------------------------
# items: (name, messages or transcription, answer text)


def _wav(samples: np.ndarray, rate: int = 16000) -> str:
    import soundfile

    buf = io.BytesIO()
    soundfile.write(buf, samples.astype(np.float32), rate, format="WAV")
    return base64.b64encode(buf.getvalue()).decode()


def _png(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def shape_item(i: int, seed: int) -> tuple[list[dict], str]:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, i])
    shape, colour = SHAPES[rng.integers(3)], list(COLOURS)[rng.integers(3)]
    size = int(rng.integers(32, 65))
    image = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(200, 256, 3)))
    draw = ImageDraw.Draw(image)
    r = size * rng.uniform(0.25, 0.42)
    cx, cy = size / 2 + rng.uniform(-0.08, 0.08) * size, size / 2 + rng.uniform(-0.08, 0.08) * size
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
    question = [{"type": "image_url", "image_url": {"url": _png(image)}},
                {"type": "text", "text": "What shape is this?"}]
    return [{"role": "user", "content": question}], f"A {colour} {shape}."


def tone_item(i: int, seed: int, rate: int = 16000) -> tuple[list[dict], str]:
    rng = np.random.default_rng([seed, i])
    beeps = int(rng.integers(1, 5))
    pitch = rng.uniform(300, 900)
    length, gap = rng.uniform(0.12, 0.25), rng.uniform(0.1, 0.3)
    parts = [np.zeros(int(rate * rng.uniform(0.05, 0.3)))]
    for _ in range(beeps):
        t = np.arange(int(rate * length)) / rate
        parts += [0.3 * np.sin(2 * np.pi * pitch * t) * np.hanning(t.size), np.zeros(int(rate * gap))]
    samples = np.concatenate(parts) + 0.005 * rng.standard_normal(sum(p.size for p in parts))
    question = [{"type": "input_audio", "input_audio": {"data": _wav(samples), "format": "wav"}},
                {"type": "text", "text": "How many beeps do you hear?"}]
    return [{"role": "user", "content": question}], f"{NUMBERS[beeps - 1]}."


def _inside(base: Path, relative: str, where: str) -> Path:
    """A media path from a JSONL file, refused if it leaves the file's folder."""
    path = (base / relative).resolve()
    if base.resolve() not in path.parents:
        raise MediaDataError(f"{where}: media paths must stay inside {base}")
    return path


def _file_part(part: dict, base: Path) -> dict:
    """Our JSONL's {"type": "audio"|"image", "path"} parts as the OpenAI parts mistral_common reads."""
    if part.get("type") not in ("audio", "image"):
        return part
    path = _inside(base, part["path"], part["path"])
    raw = path.read_bytes()
    if part["type"] == "image":
        return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(raw).decode()}}
    fmt = path.suffix.lstrip(".").lower()
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(raw).decode(), "format": fmt}}


Item = tuple[str, dict]  # (name, {"messages": [...]} | {"audio": bytes, "text": str, "language": str | None})


def source_items(source: MediaSourceConfig, seed: int) -> Iterator[Item]:
    if source.kind in ("shapes", "tones"):
        make = shape_item if source.kind == "shapes" else tone_item
        for i in range(source.items):
            messages, answer = make(i, seed)
            yield f"{source.kind}/{i}", {"messages": [*messages, {"role": "assistant", "content": answer}]}
        return
    import glob

    patterns = source.paths
    if source.kind == "speech":
        from distill.speech.demo import work_dir

        train = work_dir() / "data" / "train.jsonl"
        if not train.is_file():
            raise MediaDataError(f"{train} does not exist: `make speech-demo` (python -m distill.speech) makes it")
        patterns = [str(train)]
    for pattern in patterns:
        for file in sorted(glob.glob(pattern, recursive=True)):
            base = Path(file).parent
            for n, line in enumerate(Path(file).read_text().splitlines(), 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                name = f"{file}:{n}"
                if "audio" in record:
                    path = _inside(base, record["audio"], name)
                    yield name, {"audio": path.read_bytes(), "text": record["text"],
                                 "language": record.get("language")}
                else:
                    messages = [m | ({"content": [_file_part(p, base) for p in m["content"]]}
                                     if isinstance(m.get("content"), list) else {}) for m in record["messages"]]
                    yield name, {"messages": messages}


# ---------------------------------------------------------------------------------------------------------------
# rendering and encoding


def render_item(item: dict, tokenizer: Any) -> tuple[list[int], list[bool], list[Any], list[Any]]:
    """(ids, answer mask, audio arrays, images): the finished conversation or transcription, closed by EOS."""
    if "audio" in item:
        prompt, audio = tokenizer.encode_transcription(item["audio"], item["language"])
        answer = [*tokenizer.encode(item["text"], add_special_tokens=False), tokenizer.eos_token_id]
        return prompt + answer, [False] * len(prompt) + [True] * len(answer), audio, []
    messages = item["messages"]
    prompt, _, _ = tokenizer.encode_chat_media(messages[:-1])
    ids, audio, images = tokenizer.encode_conversation_media(messages)
    if ids[: len(prompt)] != prompt:
        raise MediaDataError("the conversation's rendering does not start with its prompt's")
    return ids, [False] * len(prompt) + [True] * (len(ids) - len(prompt)), audio, images


def _held_out(name: str, seed: int) -> float:
    return int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:8], 16) / 2**32


def cache_key(config: MediaDataConfig, model_dir: Path) -> str:
    payload = json.dumps({"config": config.model_dump(), "weights": weights_state(model_dir),
                          "version": MEDIA_DATA_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_media_tokens(config: MediaDataConfig, model: str | Path) -> dict[str, torch.Tensor]:
    """{"<split>", "<split>_targets", "<split>_features", "<split>_offsets"} for train and val (row r's features
    are rows offsets[r]:offsets[r+1]), built once (the encoder runs here), cached under $CASCADE_HOME/data/<key>."""
    spec = get_model(str(model))
    out = cascade_home() / "data" / f"media-{cache_key(config, spec.checkpoint_dir)}"
    if is_prepared(out, MEDIA_DATA_VERSION):
        return load_file(out / "media.safetensors")
    from distill.media_lm import encode_media, load_full

    tokenizer = load_tokenizer(spec)
    full = load_full(spec.checkpoint_dir).eval()
    items = [item for source in config.sources for item in source_items(source, config.seed)]
    order = sorted(range(len(items)), key=lambda i: _held_out(items[i][0], config.seed))
    if len(items) <= config.val_sequences:
        raise MediaDataError(f"{len(items)} items: not enough for {config.val_sequences} validation items and "
                             "training")
    splits = {"val": sorted(order[: config.val_sequences]), "train": sorted(order[config.val_sequences:])}
    shards: dict[str, torch.Tensor] = {}
    for split, indices in splits.items():
        ids = torch.zeros(len(indices), config.seq_len, dtype=torch.int32)
        targets = torch.zeros(len(indices), config.seq_len, dtype=torch.bool)
        features, offsets = [], [0]
        for row, i in enumerate(tqdm(indices, desc=f"encode {split} media", unit="item")):
            name, item = items[i]
            seq, answer, audio, images = render_item(item, tokenizer)
            if len(seq) > config.seq_len:
                raise MediaDataError(f"{name}: {len(seq)} tokens do not fit seq_len {config.seq_len} (media cannot "
                                     "be cut): raise data.seq_len")
            feats = encode_media(full, audio, images)
            ids[row, : len(seq)] = torch.tensor(seq)
            placeholder = ids[row, : len(seq)] == _placeholder(full.config)
            trained = torch.tensor(answer) if config.train_on == "answers" else ~placeholder
            targets[row, 1: len(seq)] = trained[1:]  # the first token is never predicted
            features.append(feats)
            offsets.append(offsets[-1] + len(feats))
        shards |= {split: ids, f"{split}_targets": targets, f"{split}_features": torch.cat(features).to(torch.float16),
                   f"{split}_offsets": torch.tensor(offsets)}
    with atomic_directory(out, MEDIA_DATA_VERSION) as tmp:
        save_file({k: v.contiguous() for k, v in shards.items()}, tmp / "media.safetensors")
        (tmp / "data.json").write_text(json.dumps({
            "config": config.model_dump(), "model": spec.name, "train_items": len(splits["train"]),
            "val_items": len(splits["val"]), "feature_rows": int(shards["train_offsets"][-1]),
        }, indent=1) + "\n")
    log.info("media data: %d train and %d val items encoded by %s (%s)", len(splits["train"]), len(splits["val"]),
             spec.name, out)
    return shards


def _placeholder(config: Any) -> int:
    from distill.media_lm import placeholder_id

    return placeholder_id(config)

