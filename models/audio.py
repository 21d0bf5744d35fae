"""Audio inputs of Voxtral-style models on the transformers side (training, the reference forward): Whisper log-mel
features, cut into the encoder's chunks exactly as vLLM's `VoxtralEncoderModel` cuts them."""

from __future__ import annotations

from typing import Any


def mel_chunks(arrays: list[Any], model_config: Any) -> Any:
    """[chunks, mel bins, 2 x max_source_positions] for audio already padded by the tokenizer to whole chunks
    (mistral_common's `encode_chat_completion` / `encode_transcription` return it so). One log-mel per array, its
    clamp taken over the whole array, then split: what vLLM computes, so both engines see the same features."""
    import numpy as np
    import torch
    from transformers import WhisperFeatureExtractor

    audio = model_config.audio_config
    frames = 2 * audio.max_source_positions  # the conv stem halves mel frames into encoder positions
    extractor = WhisperFeatureExtractor(feature_size=audio.num_mel_bins)
    chunks = []
    for array in arrays:
        samples = np.asarray(array, dtype=np.float32)
        if len(samples) % (frames * extractor.hop_length):
            raise ValueError(f"audio of {len(samples)} samples is not padded to whole {frames}-frame chunks")
        features = extractor(samples, sampling_rate=extractor.sampling_rate, return_tensors="pt",
                             padding=False).input_features  # [1, mel, frames per array]
        chunks += list(features.split(frames, dim=-1))
    return torch.cat(chunks, dim=0)
