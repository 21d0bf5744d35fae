"""Speech made here: sentences spoken by espeak-ng and flite (Debian packages), varied and degraded so an encoder
trained on them does not learn one clean voice.

Voices: espeak-ng's English accents with its male/female variants, flite's kal16, awb and rms (awb, rms and slt are
statistical voices built from CMU ARCTIC recordings). Two voices never train: flite's `slt` and espeak-ng's
`en-029+f2` (held-out voices); sentences are held out by a hash of their text (distill/speech/text.py). Each clip
gets its own speaking rate and pitch, a random gain, leading and trailing silence and white noise at 15-40 dB SNR,
and is written as 16 kHz mono FLAC. The split files are JSONL transcription records that distill/media_data.py
reads (`{"audio", "text", "language", "voice"}`).
"""

from __future__ import annotations

import io
import json
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

RATE = 16000
ESPEAK_ACCENTS = ("en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029")
ESPEAK_VARIANTS = ("", "+m1", "+m3", "+m5", "+m7", "+f1", "+f2", "+f3", "+f4")
FLITE_VOICES = ("kal16", "awb", "rms", "slt")
HELD_OUT_VOICES = ("flite:slt", "espeak:en-029+f2")


class SynthError(RuntimeError):
    pass


@dataclass(frozen=True)
class Voice:
    engine: str  # espeak | flite
    name: str

    @property
    def key(self) -> str:
        return f"{self.engine}:{self.name}"


def voices() -> list[Voice]:
    return ([Voice("espeak", a + v) for a in ESPEAK_ACCENTS for v in ESPEAK_VARIANTS]
            + [Voice("flite", v) for v in FLITE_VOICES])


def check_tools() -> None:
    import shutil

    missing = [tool for tool in ("espeak-ng", "flite") if shutil.which(tool) is None]
    if missing:
        raise SynthError(f"{' and '.join(missing)} not found: `apt-get install espeak-ng flite` (Debian packages)")


def speak(text: str, voice: Voice, rng: np.random.Generator) -> np.ndarray:
    """One utterance at 16 kHz, float32, with this clip's rate and pitch."""
    import soundfile
    import soxr

    with tempfile.NamedTemporaryFile(suffix=".wav") as out:
        if voice.engine == "espeak":
            cmd = ["espeak-ng", "-v", voice.name, "-s", str(int(rng.integers(135, 195))),
                   "-p", str(int(rng.integers(25, 75))), "-w", out.name, text]
        else:
            cmd = ["flite", "-voice", voice.name, "--setf", f"duration_stretch={rng.uniform(0.8, 1.2):.2f}",
                   "--setf", f"int_f0_target_mean={rng.uniform(90, 200) if voice.name != 'slt' else 170:.0f}",
                   "-t", text, "-o", out.name]
        done = subprocess.run(cmd, capture_output=True, timeout=60)
        if done.returncode != 0:
            raise SynthError(f"{cmd[0]} failed on {text!r}: {done.stderr.decode(errors='replace')[:200]}")
        samples, rate = soundfile.read(out.name, dtype="float32", always_2d=False)
    if samples.ndim > 1:
        samples = samples.mean(axis=1)
    return soxr.resample(samples, rate, RATE).astype(np.float32) if rate != RATE else samples


def degrade(samples: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gain, silence around the speech and white noise at a random SNR (15-40 dB)."""
    peak = float(np.abs(samples).max()) or 1.0
    speech = samples / peak * rng.uniform(0.2, 0.9)
    lead, tail = (np.zeros(int(RATE * rng.uniform(0.0, 0.4)), np.float32) for _ in range(2))
    clip = np.concatenate([lead, speech, tail])
    power = float(np.mean(speech ** 2)) or 1e-8
    noise = rng.standard_normal(clip.size).astype(np.float32) * np.sqrt(power / 10 ** (rng.uniform(15, 40) / 10))
    return np.clip(clip + noise, -1, 1).astype(np.float32)


def write_clip(path: Path, samples: np.ndarray) -> None:
    import soundfile

    buf = io.BytesIO()
    soundfile.write(buf, samples, RATE, format="FLAC")
    path.write_bytes(buf.getvalue())


def synthesise(out: Path, plan: list[tuple[str, Voice]], seed: int, max_seconds: float, workers: int = 2,
               progress: bool = True) -> list[dict]:
    """Speak each (sentence, voice) of `plan` into out/clips; records of the clips no longer than `max_seconds`."""
    check_tools()
    (out / "clips").mkdir(parents=True, exist_ok=True)

    def one(i: int) -> dict | None:
        text, voice = plan[i]
        rng = np.random.default_rng([seed, i])
        samples = degrade(speak(text, voice, rng), rng)
        if len(samples) > max_seconds * RATE:
            return None
        name = f"clips/{i:06d}.flac"
        write_clip(out / name, samples)
        return {"audio": name, "text": text, "language": "en", "voice": voice.key,
                "seconds": round(len(samples) / RATE, 3)}

    with ThreadPoolExecutor(workers) as pool:  # the TTS engines run as processes: threads keep both cores busy
        records = list(tqdm(pool.map(one, range(len(plan))), total=len(plan), desc="synthesise", unit="clip",
                            disable=not progress))
    return [r for r in records if r is not None]


def write_split(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)
