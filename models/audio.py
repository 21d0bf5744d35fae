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


def log_mel(waveforms: Any, num_mel_bins: int = 128) -> Any:
    """Whisper's log-mel for a batch of equal-length waveforms [B, samples] -> [B, mel, samples / 160], each item
    clamped to 8 below its own maximum: the feature extractor's (and vLLM's) formula, batched in torch."""
    import torch
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=num_mel_bins)
    window = torch.hann_window(extractor.n_fft)
    stft = torch.stft(waveforms.float(), extractor.n_fft, extractor.hop_length, window=window, return_complex=True)
    power = (stft[..., :-1].abs() ** 2).contiguous()
    mel = torch.from_numpy(extractor.mel_filters).float().T @ power
    log = mel.clamp(min=1e-10).log10()
    log = torch.maximum(log, log.amax(dim=(1, 2), keepdim=True) - 8.0)
    return (log + 4.0) / 4.0
