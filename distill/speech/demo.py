"""The speech demo end to end, each step kept on disk and skipped once done (`python -m distill.speech`):

  data      sentences spoken by espeak-ng and flite (train: training voices and sentences; test-synthetic: held-out
            voices and held-out sentences), and the human recordings of Debian's pocketsphinx-testdata (test-human)
  encoder   stage 1: the audio encoder from scratch, CTC on characters (distill/speech/encoder.py)
  assemble  encoder + new adapter + SmolLM2-135M re-packed as Tekken (distill/speech/assemble.py)
  adapter   stage 2a, as Voxtral's first pass: only the adapter trains, decoder frozen, on the transcription pattern
            `[INST][BEGIN_AUDIO][AUDIO]...[/INST]lang:en[TRANSCRIBE]` -> transcript (our Trainer, media data)
  tune      stage 2b: adapter and decoder train together; the result is the registry's voxtral-smollm2-135m
The word error rates (through our server, and PocketSphinx on the same clips) and the cascade are in
distill/speech/report.py.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from distill.speech import synth
from distill.speech.text import is_held_out, normalise, sentences
from models.checkpoint import atomic_directory, is_prepared
from models.registry import cascade_home, get_model

log = logging.getLogger(__name__)
MODEL = "voxtral-smollm2-135m"
HUMAN = Path("/usr/share/pocketsphinx/test/data")  # Debian's pocketsphinx-testdata


@dataclass(frozen=True)
class DemoConfig:
    sentences: int = 6000
    train_clips: int = 4000
    test_clips: int = 200
    encoder_steps: int = 1500
    adapter_tokens: int = 250_000
    tune_tokens: int = 150_000
    seed: int = 0


def work_dir() -> Path:
    return cascade_home() / "speech"


def data_step(config: DemoConfig, progress: bool = True) -> Path:
    out = work_dir() / "data"
    stamp = "speech-data " + json.dumps(asdict(config) | {"encoder_steps": 0, "adapter_tokens": 0, "tune_tokens": 0},
                                        sort_keys=True)
    if is_prepared(out, stamp):
        return out
    import numpy as np

    spoken = sentences(config.sentences, config.seed)
    held = [s for s in spoken if is_held_out(s)]
    kept = [s for s in spoken if not is_held_out(s)]
    voices = synth.voices()
    train_voices = [v for v in voices if v.key not in synth.HELD_OUT_VOICES]
    test_voices = [v for v in voices if v.key in synth.HELD_OUT_VOICES]
    rng = np.random.default_rng(config.seed)
    train_plan = [(kept[i % len(kept)], train_voices[rng.integers(len(train_voices))])
                  for i in range(config.train_clips)]
    test_plan = [(held[i % len(held)], test_voices[i % len(test_voices)]) for i in range(config.test_clips)]
    with atomic_directory(out, stamp) as tmp:
        records = synth.synthesise(tmp, train_plan + test_plan, config.seed, max_seconds=5.12, progress=progress)
        train = [r for r in records if r["voice"] not in synth.HELD_OUT_VOICES]
        test = [r for r in records if r["voice"] in synth.HELD_OUT_VOICES]
        synth.write_split(tmp / "train.jsonl", train)
        synth.write_split(tmp / "test-synthetic.jsonl", test)
        synth.write_split(tmp / "test-human.jsonl", human_clips(tmp))
    log.info("speech data: %d training clips, %d held-out synthetic clips (%s)", len(train), len(test), out)
    return out


def human_clips(out: Path) -> list[dict]:
    """The 10 transcribed human recordings of pocketsphinx-testdata (5 LibriVox readings of Austen, 5 card names),
    copied beside the synthetic clips."""
    if not HUMAN.is_dir():
        raise synth.SynthError(f"{HUMAN} not found: `apt-get install pocketsphinx-testdata` (a Debian package)")
    records = []
    for folder, listing in (("librivox", "transcription"), ("cards", "cards.transcription")):
        for line in (HUMAN / folder / listing).read_text().splitlines():
            if not line.strip():
                continue
            text, _, clip = line.rpartition("(")
            clip = clip.strip(") ")
            source = HUMAN / folder / f"{clip}.wav"
            (out / "human").mkdir(exist_ok=True)
            shutil.copyfile(source, out / "human" / source.name)
            words = text.replace("<s>", " ").replace("</s>", " ")
            records.append({"audio": f"human/{source.name}", "text": normalise(words), "language": "en",
                            "voice": f"human:{folder}"})
    return records


def encoder_step(config: DemoConfig, data: Path, progress: bool = True) -> Path:
    from distill.speech.encoder import train_encoder

    out = work_dir() / "encoder"
    stamp = f"speech-encoder {config.encoder_steps} {config.seed} {(data / '.cascade-complete').read_text()!r}"
    if not is_prepared(out, stamp):
        with atomic_directory(out, stamp) as tmp:
            train_encoder(data / "train.jsonl", data / "test-synthetic.jsonl", tmp, config.encoder_steps,
                          seed=config.seed, progress=progress)
    return out


def assemble_step(encoder: Path, decoder: str = "smollm2-135m-instruct") -> Path:
    from distill.speech.assemble import RECIPE, assemble
    from models.prepare import prepare

    out = work_dir() / "assembled"
    stamp = f"{RECIPE} {(encoder / '.cascade-complete').read_text()!r}"
    if not is_prepared(out, stamp):
        assemble(encoder, prepare(get_model(decoder)), out)
        (out / ".cascade-complete").write_text(stamp)
    return out


def train_step(student: Path, out: Path, data: Path, tokens: int, train_only: str, lr: float,
               progress: bool = True) -> Path:
    """One run of our Trainer on the transcription records (media data: the encoder's features computed once)."""
    from distill.cascade import train_config
    from distill.config import TrainSettings
    from distill.train import Trainer

    settings = TrainSettings.model_validate({
        "batch_size": 8, "precision": "bfloat16", "train_only": train_only,  # bf16 autocast: 1.4x faster here
        "loss": {"kd_weight": 0.0, "ce_weight": 1.0}, "optim": {"lr": lr, "warmup_fraction": 0.05},
        "eval": {"every": 50}, "checkpoint": {"every": 50}})
    data_config = {"format": "media", "sources": [{"kind": "files", "paths": [str(data / "train.jsonl")]}],
                   "seq_len": 112, "val_sequences": 32, "train_on": "answers"}
    config = train_config(settings, student=student, out_dir=out.with_name(out.name + "-run"), data=data_config,
                          tokens=tokens)
    trainer = Trainer(config, progress=progress)
    final = trainer.train(resume=True)
    trainer.export(out, {"stage": out.name, "final": final, "tokens": tokens, "train_only": train_only})
    return out


def run(config: DemoConfig, progress: bool = True) -> Path:
    data = data_step(config, progress)
    encoder = encoder_step(config, data, progress)
    assembled = assemble_step(encoder)
    adapter = work_dir() / "adapter"
    if not is_prepared(adapter, "distill"):
        train_step(assembled, adapter, data, config.adapter_tokens, "projector", 2e-3, progress)
    final = get_model(MODEL).checkpoint_dir
    if not is_prepared(final, "distill"):
        train_step(adapter, final, data, config.tune_tokens, "all", 3e-4, progress)
    return final
