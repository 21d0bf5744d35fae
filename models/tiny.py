"""Tiny random-initialised Mistral-family models for fast tests, with a real Mistral tokenizer.

The weights are noise, but everything around them is real: the architecture classes, config keys, the Tekken 131k
vocabulary from mistral_common's bundled files, and a checkpoint layout that transformers and vLLM both load.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from models.checkpoint import atomic_directory, is_prepared
from models.mistral_format import write_native
from models.registry import ModelSpec

# Tekken v3: [INST], [TOOL_CALLS], [AVAILABLE_TOOLS], [TOOL_RESULTS], [SYSTEM_PROMPT]
TEKKEN_FILE = "tekken_240911.json"
VOCAB_SIZE = 131072
RECIPE = "tiny/2"

# Magistral / Ministral 3 reasoning tokenizers are Tekken v13 with [ARGS] and [THINK] among the special tokens.
# mistral_common ships only v3 Tekken files, so the v13 file is the same vocabulary with the special-token table of
# those releases written out (ranks 0-19 as in v3, [ARGS] 32, [CALL_ID] 33, [THINK] 34, [/THINK] 35).
V3_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]"]
_V13_SPECIALS = {32: "[ARGS]", 33: "[CALL_ID]", 34: "[THINK]", 35: "[/THINK]"}
# Voxtral's tokenizer (Tekken v7): [AUDIO] 24 (transformers' VoxtralProcessor hard-codes it), [BEGIN_AUDIO] 25,
# [TRANSCRIBE] 34 (the transcription mode's marker; no [THINK] in v7).
AUDIO_SPECIALS = {24: "[AUDIO]", 25: "[BEGIN_AUDIO]", 34: "[TRANSCRIBE]"}
# 16 kHz, 128 mel bins every 10 ms, the encoder's conv stem halves that to 50 Hz and the adapter groups 4 frames:
# one audio token per 80 ms (12.5 Hz), as Voxtral. Audio is padded to chunks of `chunk_length_s`, each chunk one
# pass of the encoder (2 x max_source_positions mel frames). Voxtral uses 30 s chunks; our models use 10 s.
AUDIO_CHUNK_S = 10.0
AUDIO_SECTION = {"sampling_rate": 16000, "frame_rate": 12.5, "chunk_length_s": AUDIO_CHUNK_S,
                 "audio_encoding_config": {"num_mel_bins": 128, "hop_length": 160, "window_size": 400}}

_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=11,
    tie_word_embeddings=True,
)


def mistral_tokenizer_file() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / TEKKEN_FILE


def write_tekken(dest: Path, version: str, audio: dict | None = None, image: dict | None = None) -> None:
    """The bundled v3 Tekken file, or the same vocabulary with v13's (or, with `audio`, Voxtral's v7) special tokens
    and the media sections mistral_common reads to place [AUDIO] / [IMG] tokens."""
    if version == "v3" and audio is None and image is None:
        shutil.copyfile(mistral_tokenizer_file(), dest)
        return
    data = json.loads(mistral_tokenizer_file().read_text())
    count = data["config"]["default_num_special_tokens"]
    names = {i: s for i, s in enumerate(V3_SPECIALS)} | (AUDIO_SPECIALS if audio else _V13_SPECIALS)
    if audio is not None or image is not None:  # exactly the media the model takes (the bundled file has an image)
        data.pop("image", None)
    if audio is not None:
        data["audio"] = audio
    if image is not None:
        data["image"] = image
    data["special_tokens"] = [{"rank": r, "token_str": names.get(r, f"<SPECIAL_{r}>"), "is_control": True}
                              for r in range(count)]
    data["config"]["version"] = version
    dest.write_text(json.dumps(data))


def build_tiny_model(family: str, max_context: int, seed: int = 0):
    """Return a random-initialised `*ForCausalLM` for `family` ('mistral' or 'ministral3')."""
    import torch

    torch.manual_seed(seed)
    if family == "mistral":
        from transformers import MistralConfig, MistralForCausalLM

        config = MistralConfig(**_COMMON, max_position_embeddings=max_context, sliding_window=max_context // 4,
                               rope_theta=1e6)
        return MistralForCausalLM(config)
    if family == "ministral3":
        from transformers import Ministral3Config, Ministral3ForCausalLM

        rope = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                "original_max_position_embeddings": max_context // 4, "beta_fast": 32.0, "beta_slow": 1.0,
                "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1}
        config = Ministral3Config(**_COMMON, max_position_embeddings=max_context, rope_parameters=rope)
        return Ministral3ForCausalLM(config)
    if family == "voxtral":
        return build_tiny_voxtral(max_context)
    if family == "mistral3":
        return build_tiny_vision(max_context)
    raise ValueError(f"no tiny builder for family {family!r}")


def build_tiny_voxtral(max_context: int):
    """Voxtral's shape, tiny: a Whisper-style encoder (conv stem, 2 pre-LN layers, 10 s chunks), the 4x adapter, a
    Mistral decoder. Not tied: vLLM's Voxtral loads a separate output matrix."""
    from transformers import VoxtralConfig, VoxtralForConditionalGeneration
    from transformers.models.whisper.modeling_whisper import sinusoids

    positions = int(AUDIO_CHUNK_S * 50)  # 50 Hz after the conv stem
    text = {k: v for k, v in _COMMON.items() if k != "tie_word_embeddings"}
    config = VoxtralConfig(
        audio_config={"hidden_size": 32, "intermediate_size": 4 * 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "num_mel_bins": 128, "max_source_positions": positions},
        text_config={"model_type": "mistral", **text, "max_position_embeddings": max_context, "sliding_window": None,
                     "rope_theta": 1e6, "tie_word_embeddings": False},
        audio_token_id=24)
    model = VoxtralForConditionalGeneration(config)
    # vLLM computes Whisper's sinusoidal positions instead of loading them: the HF table must be the same.
    model.model.audio_tower.embed_positions.weight.data.copy_(sinusoids(positions, 32))
    return model


# Pixtral-style images: 8-pixel patches, images up to 64 px a side, 2x2 patches merged into one token (a 64x64 image:
# 4 rows of 4 [IMG], each row closed by [IMG_BREAK], the last by [IMG_END]).
IMAGE_SECTION = {"image_patch_size": 8, "max_image_size": 64, "spatial_merge_size": 2}


def build_tiny_vision(max_context: int):
    """Ministral 3's vision shape, tiny: a Pixtral ViT (2-D RoPE), RMSNorm + 2x2 patch merger + GELU MLP projector,
    a Mistral decoder (not tied: vLLM's Pixtral loads a separate output matrix)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    text = {k: v for k, v in _COMMON.items() if k != "tie_word_embeddings"}
    config = Mistral3Config(
        vision_config={"model_type": "pixtral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "num_channels": 3, "image_size": IMAGE_SECTION["max_image_size"],
                       "patch_size": IMAGE_SECTION["image_patch_size"], "rope_parameters": {"rope_theta": 10000.0}},
        text_config={"model_type": "mistral", **text, "max_position_embeddings": max_context, "sliding_window": None,
                     "rope_theta": 1e6, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
        image_token_index=10, spatial_merge_size=IMAGE_SECTION["spatial_merge_size"],
        multimodal_projector_bias=False, vision_feature_layer=-1, tie_word_embeddings=False)
    return Mistral3ForConditionalGeneration(config)


def prepare_tiny(spec: ModelSpec, force: bool = False) -> Path:
    out = spec.checkpoint_dir
    if is_prepared(out, RECIPE) and not force:
        return out
    import torch

    model = build_tiny_model(spec.family, spec.max_context)
    model.to(getattr(torch, spec.dtype))
    with atomic_directory(out, RECIPE) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if spec.family == "voxtral":
            write_tekken(tmp / "tekken.json", "v7", audio=AUDIO_SECTION)
            write_native(model, tmp, spec.max_context)
        elif spec.family == "mistral3":
            write_tekken(tmp / "tekken.json", "v13", image=IMAGE_SECTION)
            write_native(model, tmp, spec.max_context)
        else:
            write_tekken(tmp / "tekken.json", "v13" if spec.reasoning_format == "mistral-think" else "v3")
        config = json.loads((tmp / "config.json").read_text())
        (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2))
        assert config.get("vocab_size", config.get("text_config", {}).get("vocab_size")) == VOCAB_SIZE
    return out
