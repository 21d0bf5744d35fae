"""Stage 2 starts here: the Voxtral-style model around SmolLM2-135M-Instruct.

Parts: the encoder trained in stage 1 (distill/speech/encoder.py), a new adapter (Voxtral's: 4 frames -> Linear ->
GELU -> Linear into the decoder's 576-wide stream), SmolLM2's decoder with its tokenizer re-packed as Tekken
(models/tekken_pack.py; embedding rows moved with the id map, rows for Mistral's control tokens and for the bytes
SmolLM2 never saw start from the mean embedding). The head is SmolLM2's tied embedding, written as a separate
matrix (Voxtral's layout in transformers and vLLM has no tie). Written like every multimodal checkpoint here: HF files
for training, Mistral's native files for vLLM (models/mistral_format.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distill.speech.encoder import CHUNK_S
from models.checkpoint import atomic_directory
from models.mistral_format import write_native
from models.tekken_pack import repack
from models.tiny import AUDIO_SPECIALS, V3_SPECIALS

# Mistral's control tokens at their Tekken ids, as tiny-voxtral's (Voxtral's v7 layout: [AUDIO] 24, [BEGIN_AUDIO]
# 25, [TRANSCRIBE] 34)
SPECIALS = dict(enumerate(V3_SPECIALS)) | AUDIO_SPECIALS
AUDIO_SECTION = {"sampling_rate": 16000, "frame_rate": 12.5, "chunk_length_s": CHUNK_S,
                 "audio_encoding_config": {"num_mel_bins": 128, "hop_length": 160, "window_size": 400}}
RECIPE = "speech-demo/1"


def assemble(encoder_dir: Path, decoder_dir: Path, out: Path, max_context: int = 2048, seed: int = 0) -> Path:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, VoxtralConfig, VoxtralForConditionalGeneration

    torch.manual_seed(seed)
    decoder = AutoModelForCausalLM.from_pretrained(decoder_dir, dtype=torch.float32)
    encoder_config = AutoConfig.from_pretrained(encoder_dir)
    with atomic_directory(out, RECIPE) as tmp:
        id_map = repack(decoder_dir / "tokenizer.json", tmp / "tekken.json", SPECIALS, audio=AUDIO_SECTION)
        text = decoder.config.to_dict()
        for key in ("architectures", "transformers_version", "torch_dtype", "dtype", "bos_token_id", "eos_token_id",
                    "pad_token_id"):
            text.pop(key, None)
        text |= {"model_type": "llama", "vocab_size": len(id_map), "tie_word_embeddings": False,
                 "max_position_embeddings": max_context, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 11}
        config = VoxtralConfig(audio_config=encoder_config.to_dict(), text_config=text, audio_token_id=24)
        model = VoxtralForConditionalGeneration(config)
        old = decoder.model.embed_tokens.weight.detach()
        rows = torch.stack([old[i] if i is not None else old.mean(0) for i in id_map])  # [new vocab, d]
        state = {f"model.language_model.{k[len('model.'):]}": v for k, v in decoder.state_dict().items()
                 if k.startswith("model.") and k != "model.embed_tokens.weight"}
        state |= {"model.language_model.embed_tokens.weight": rows, "lm_head.weight": rows.clone()}
        state |= {f"model.audio_tower.{k}": v for k, v in load_file(encoder_dir / "model.safetensors").items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        fresh = [k for k in missing if not k.startswith("model.multi_modal_projector.")]
        if fresh or unexpected:
            raise ValueError(f"assembly left {fresh[:4]} unset and {unexpected[:4]} unused")
        model.save_pretrained(tmp, safe_serialization=True)
        write_native(model, tmp, max_context)
        (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2))
    return out
