"""HF-format multimodal checkpoints written in Mistral's native layout (`params.json` + `consolidated.safetensors`).

vLLM 0.32 serves Voxtral only from the native layout: its `VoxtralForConditionalGeneration` reads
`audio_config.downsample_factor`, which only its Mistral config parser creates, and its weight loader maps only
Mistral tensor names. We train in transformers (HF names), so a multimodal checkpoint directory holds both: the HF
files for training and the reference path, the native ones for the engine. Weight map: shared/notes/multimodal.md
§2.2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PARAMS_FILE = "params.json"
WEIGHTS_FILE = "consolidated.safetensors"

_LM_LAYER = {  # HF decoder-layer names -> Mistral names
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
}
_WHISPER_LAYER = {  # HF Voxtral encoder-layer names -> Mistral names
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.out_proj": "attention.wo",
    "self_attn_layer_norm": "attention_norm",
    "fc1": "feed_forward.w1",
    "fc2": "feed_forward.w2",
    "final_layer_norm": "ffn_norm",
}
_ENCODER = "mm_whisper_embeddings.whisper_encoder."


def has_native_files(path: Path) -> bool:
    return (path / PARAMS_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def to_meta_rope(w: Any, n_heads: int) -> Any:
    """HF keeps q/k rows in rotate-half order; Mistral's files interleave the rotary pairs (Meta's layout). The
    inverse of vLLM's `MistralForCausalLM.maybe_remap_mistral` permute."""
    out, dim_in = w.shape
    # [n_heads, 2, head_dim/2, in] -> [n_heads, head_dim/2, 2, in]: halves become interleaved pairs
    return w.view(n_heads, 2, out // n_heads // 2, dim_in).transpose(1, 2).reshape(out, dim_in)


def language_model_tensors(state: dict[str, Any], prefix: str, text: Any) -> dict[str, Any]:
    """The decoder's tensors under Mistral names, from HF names under `prefix` (e.g. 'model.language_model.')."""
    out: dict[str, Any] = {}
    for name, w in state.items():
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix):]
        if rest == "embed_tokens.weight":
            out["tok_embeddings.weight"] = w
        elif rest == "norm.weight":
            out["norm.weight"] = w
        elif rest.startswith("layers."):
            _, index, module = rest.split(".", 2)
            module, kind = module.rsplit(".", 1)
            if module == "self_attn.q_proj":
                w = to_meta_rope(w, text.num_attention_heads)
            elif module == "self_attn.k_proj":
                w = to_meta_rope(w, text.num_key_value_heads)
            out[f"layers.{index}.{_LM_LAYER[module]}.{kind}"] = w
        else:
            raise ValueError(f"unexpected language-model tensor {name}")
    return out


def text_params(text: Any, max_context: int) -> dict[str, Any]:
    if getattr(text, "sliding_window", None):
        raise ValueError("a sliding-window language model cannot be written in Mistral's native layout here")
    return {
        "dim": text.hidden_size, "n_layers": text.num_hidden_layers, "head_dim": text.head_dim,
        "hidden_dim": text.intermediate_size, "n_heads": text.num_attention_heads,
        "n_kv_heads": text.num_key_value_heads, "rope_theta": float(text.rope_parameters["rope_theta"]),
        "norm_eps": text.rms_norm_eps, "vocab_size": text.vocab_size, "max_position_embeddings": max_context,
        "tied_embeddings": False,
    }


def voxtral_native(model: Any, max_context: int, sampling_rate: int = 16000, hop_length: int = 160,
                   window_size: int = 400) -> tuple[dict[str, Any], dict[str, Any]]:
    """(params.json, tensors) for a transformers `VoxtralForConditionalGeneration`."""
    config = model.config
    audio, text = config.audio_config, config.text_config
    if audio.intermediate_size % audio.hidden_size:
        raise ValueError("the adapter groups intermediate_size / hidden_size encoder frames: make it a multiple")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors = language_model_tensors(state, "model.language_model.", text)
    tensors["output.weight"] = state["lm_head.weight"]
    for name, w in state.items():
        if not name.startswith("model.audio_tower."):
            continue
        rest = name[len("model.audio_tower."):]
        if rest.startswith("embed_positions"):
            continue  # vLLM computes the sinusoids itself; ours are the same table (tiny.py)
        if rest.startswith("conv"):
            tensors[f"{_ENCODER}conv_layers.{int(rest[4]) - 1}.conv.{rest.rsplit('.', 1)[1]}"] = w
        elif rest.startswith("layer_norm."):
            tensors[f"{_ENCODER}transformer.norm.{rest.rsplit('.', 1)[1]}"] = w
        else:
            _, index, module = rest.split(".", 2)
            module, kind = module.rsplit(".", 1)
            tensors[f"{_ENCODER}transformer.layers.{index}.{_WHISPER_LAYER[module]}.{kind}"] = w
    for i, hf in ((0, "linear_1"), (2, "linear_2")):
        tensors[f"mm_whisper_embeddings.audio_language_projection.{i}.weight"] = \
            state[f"model.multi_modal_projector.{hf}.weight"]
    params = text_params(text, max_context)
    params["multimodal"] = {"whisper_model_args": {
        "encoder_args": {
            "audio_encoding_args": {"sampling_rate": sampling_rate, "num_mel_bins": audio.num_mel_bins,
                                    "hop_length": hop_length, "window_size": window_size},
            "dim": audio.hidden_size, "n_layers": audio.num_hidden_layers,
            "head_dim": audio.hidden_size // audio.num_attention_heads, "hidden_dim": audio.intermediate_size,
            "n_heads": audio.num_attention_heads, "vocab_size": audio.vocab_size,
            "max_source_positions": audio.max_source_positions,
        },
        "downsample_args": {"downsample_factor": audio.intermediate_size // audio.hidden_size},
    }}
    return params, tensors


_VIT_LAYER = {  # HF Pixtral ViT layer names -> Mistral names
    "attention.q_proj": "attention.wq",
    "attention.k_proj": "attention.wk",
    "attention.v_proj": "attention.wv",
    "attention.o_proj": "attention.wo",
    "attention_norm": "attention_norm",
    "ffn_norm": "ffn_norm",
    "feed_forward.gate_proj": "feed_forward.w1",
    "feed_forward.down_proj": "feed_forward.w2",
    "feed_forward.up_proj": "feed_forward.w3",
}


def pixtral_native(model: Any, max_context: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(params.json, tensors) for a transformers `Mistral3ForConditionalGeneration` (Pixtral ViT + patch merger):
    the layout vLLM's `PixtralForConditionalGeneration` reads."""
    config = model.config
    vision, text = config.vision_config, config.text_config
    if config.vision_feature_layer != -1 or config.multimodal_projector_bias:
        raise ValueError("Mistral's native layout takes the last ViT layer and a projector without bias")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors = language_model_tensors(state, "model.language_model.", text)
    tensors["output.weight"] = state["lm_head.weight"]
    for name, w in state.items():
        if name.startswith("model.vision_tower."):
            rest = name[len("model.vision_tower."):]
            if rest.startswith("transformer.layers."):
                _, _, index, module = rest.split(".", 3)
                module, kind = module.rsplit(".", 1)
                if module in ("attention.q_proj", "attention.k_proj"):
                    w = to_meta_rope(w, vision.num_attention_heads)  # the ViT's 2-D RoPE: complex pairs in vLLM
                rest = f"transformer.layers.{index}.{_VIT_LAYER[module]}.{kind}"
            tensors[f"vision_encoder.{rest}"] = w
    projector = "model.multi_modal_projector."
    tensors["pre_mm_projector_norm.weight"] = state[f"{projector}norm.weight"]
    tensors["patch_merger.merging_layer.weight"] = state[f"{projector}patch_merger.merging_layer.weight"]
    tensors["vision_language_adapter.w_in.weight"] = state[f"{projector}linear_1.weight"]
    tensors["vision_language_adapter.w_out.weight"] = state[f"{projector}linear_2.weight"]
    params = text_params(text, max_context)
    params["vision_encoder"] = {
        "hidden_size": vision.hidden_size, "num_channels": vision.num_channels, "image_size": vision.image_size,
        "patch_size": vision.patch_size, "intermediate_size": vision.intermediate_size,
        "num_hidden_layers": vision.num_hidden_layers, "num_attention_heads": vision.num_attention_heads,
        "rope_theta": float(vision.rope_parameters["rope_theta"]), "image_token_id": config.image_token_index,
        "image_break_token_id": 12, "image_end_token_id": 13, "spatial_merge_size": config.spatial_merge_size,
        "adapter_bias": False, "add_pre_mm_projector_layer_norm": True, "mm_projector_id": "patch_merge",
    }
    return params, tensors


def write_native(model: Any, out: Path, max_context: int) -> None:
    """Write params.json + consolidated.safetensors for `model` into `out` (inside an atomic_directory)."""
    from safetensors.torch import save_file

    kind = type(model).__name__
    if kind == "VoxtralForConditionalGeneration":
        params, tensors = voxtral_native(model, max_context)
    elif kind == "Mistral3ForConditionalGeneration":
        params, tensors = pixtral_native(model, max_context)
    else:
        raise ValueError(f"no Mistral-native writer for {kind}")
    save_file(tensors, str(out / WEIGHTS_FILE))
    (out / PARAMS_FILE).write_text(json.dumps(params, indent=1))
