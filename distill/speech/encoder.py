"""Stage 1: a Whisper-style audio encoder trained from scratch, with a CTC character head, on the synthetic speech.

The encoder is transformers' `VoxtralEncoder` (conv stem to 50 Hz, pre-LN layers, sinusoidal positions, as vLLM
computes them), sized for two CPU cores: 4 layers x 256, 5.12 s chunks (256 positions; one chunk per clip). Its CTC
head reads every 50 Hz frame and is thrown away afterwards: the adapter (stage 2) reads the encoder's frames in
groups of 4 (12.5 Hz), as Voxtral's does. SpecAugment (two frequency and two time masks) on the log-mel during
training. Greedy CTC decoding gives the encoder's own character and word error rates, a check before any language
model is involved.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from distill.speech.text import normalise

log = logging.getLogger(__name__)
CHARS = " '" + "abcdefghijklmnopqrstuvwxyz"  # CTC classes: blank (0), then these
CHUNK_S = 5.12  # 256 encoder positions at 50 Hz; 64 adapter tokens at 12.5 Hz
RATE = 16000


def encoder_config(hidden: int = 256, layers: int = 4, heads: int = 4) -> Any:
    from transformers.models.voxtral.configuration_voxtral import VoxtralEncoderConfig

    return VoxtralEncoderConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                                num_attention_heads=heads, num_mel_bins=128, max_source_positions=int(CHUNK_S * 50))


class CTCEncoder(nn.Module):
    def __init__(self, config: Any) -> None:
        from transformers.models.voxtral.modeling_voxtral import VoxtralEncoder
        from transformers.models.whisper.modeling_whisper import sinusoids

        super().__init__()
        self.encoder = VoxtralEncoder(config)
        # fixed sinusoids: what vLLM computes in place of loading them
        self.encoder.embed_positions.weight.data.copy_(sinusoids(config.max_source_positions, config.hidden_size))
        self.encoder.embed_positions.requires_grad_(False)
        self.head = nn.Linear(config.hidden_size, len(CHARS) + 1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """[B, mel, frames] -> CTC log-probs [B, positions, classes]."""
        return self.head(self.encoder(mel).last_hidden_state).log_softmax(-1)


def load_clips(split: Path) -> tuple[list[dict], torch.Tensor]:
    """Records and their waveforms padded to one chunk [N, samples] (clips longer than a chunk were not kept)."""
    import soundfile

    records = [json.loads(line) for line in split.read_text().splitlines() if line.strip()]
    waves = torch.zeros(len(records), int(CHUNK_S * RATE))
    for i, r in enumerate(records):
        samples, rate = soundfile.read(split.parent / r["audio"], dtype="float32")
        if rate != RATE or len(samples) > waves.shape[1]:
            raise ValueError(f"{r['audio']}: expected at most {CHUNK_S} s at {RATE} Hz")
        waves[i, : len(samples)] = torch.from_numpy(samples)
    return records, waves


def spec_augment(mel: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    mel = mel.clone()
    b, f, t = mel.shape
    for _ in range(2):
        width = torch.randint(0, 16, (b,), generator=generator)
        start = (torch.rand(b, generator=generator) * (f - width)).long()
        bins = torch.arange(f)[None, :]
        mel.masked_fill_(((bins >= start[:, None]) & (bins < (start + width)[:, None]))[:, :, None], 0.0)
        width = torch.randint(0, 26, (b,), generator=generator)
        start = (torch.rand(b, generator=generator) * (t - width)).long()
        frames = torch.arange(t)[None, :]
        mel.masked_fill_(((frames >= start[:, None]) & (frames < (start + width)[:, None]))[:, None, :], 0.0)
    return mel


def targets(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [[CHARS.index(c) + 1 for c in normalise(t)] for t in texts]
    return torch.tensor([i for row in ids for i in row]), torch.tensor([len(row) for row in ids])


def greedy(log_probs: torch.Tensor) -> list[str]:
    out = []
    for row in log_probs.argmax(-1):
        chars, last = [], 0
        for k in row.tolist():
            if k != last and k != 0:
                chars.append(CHARS[k - 1])
            last = k
        out.append(" ".join("".join(chars).split()))
    return out


def train_encoder(train: Path, held_out: Path, out: Path, steps: int, batch: int = 16, lr: float = 1e-3,
                  seed: int = 0, progress: bool = True) -> dict:
    """Train, then save the encoder (HF weights + config) and a card with its CTC error rates."""
    from distill.speech.wer import error_rates
    from models.audio import log_mel

    torch.manual_seed(seed)
    records, waves = load_clips(train)
    model = CTCEncoder(encoder_config())
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    gen = torch.Generator().manual_seed(seed)
    ctc = nn.CTCLoss(zero_infinity=True)
    start, losses = time.monotonic(), []
    bar = tqdm(range(steps), desc="encoder (CTC)", unit="step", disable=not progress)
    for step in bar:
        for group in optim.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        rows = torch.randint(0, len(records), (batch,), generator=gen)
        mel = spec_augment(log_mel(waves[rows]), gen)
        logp = model(mel)  # [B, T, C]
        labels, lengths = targets([records[i]["text"] for i in rows.tolist()])
        loss = ctc(logp.transpose(0, 1), labels, torch.full((batch,), logp.shape[1]), lengths)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    train_s = time.monotonic() - start
    model.eval()
    scores = {}
    for name, split in (("held_out", held_out),):
        recs, audio = load_clips(split)
        with torch.no_grad():
            hyps = [h for i in range(0, len(recs), 32) for h in greedy(model(log_mel(audio[i:i + 32])))]
        scores[name] = error_rates([r["text"] for r in recs], hyps)
        scores[name]["examples"] = [{"ref": r["text"], "hyp": h} for r, h in list(zip(recs, hyps, strict=True))[:5]]
    out.mkdir(parents=True, exist_ok=True)
    model.encoder.save_pretrained(out, safe_serialization=True)
    card = {"steps": steps, "batch": batch, "lr": lr, "train_clips": len(records), "train_seconds": round(train_s),
            "loss_first_20": round(float(np.mean(losses[:20])), 3),
            "loss_last_20": round(float(np.mean(losses[-20:])), 3),
            "params": sum(p.numel() for p in model.encoder.parameters()), "ctc": scores}
    (out / "encoder-card.json").write_text(json.dumps(card, indent=1) + "\n")
    log.info("encoder: CTC loss %.3f -> %.3f in %d s; held-out CER %.3f WER %.3f", card["loss_first_20"],
             card["loss_last_20"], train_s, scores["held_out"]["cer"], scores["held_out"]["wer"])
    return card
