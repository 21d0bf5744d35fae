"""GGUF export (llama.cpp's model format) of any registry model or checkpoint: `python -m models export-gguf NAME`.

Written with the `gguf` package from PyPI (pure Python: no C++ build, no llama.cpp source in this repo). Weights
come from our safetensors checkpoints; Llama and Mistral models map onto llama.cpp's `llama` architecture
(Ministral 3 onto `mistral3`). The tokenizer goes in as llama.cpp's GPT-2 style BPE vocabulary: HF tokenizers from
`tokenizer.json` (vocabulary, merges, special tokens), Mistral's Tekken from `tekken.json` through mistral_common.
Quantization: `f32`, `f16`, `q8_0`, `q4_1` (the `gguf` package's own quantizers; K-quants need llama.cpp's C++
`llama-quantize`). As llama.cpp's own `q4_1` files do, the token embedding stays at Q8_0 and norms at F32, and a
matrix whose rows do not split into 32-value blocks falls back to F16.

Exports are cached under `$CASCADE_HOME/gguf/<model>/<quant>/model.gguf`, written to a temporary directory and
renamed (an interrupted export leaves nothing half-written), and stamped with the source weights' identity, so a
retrained student is exported again and an unchanged one is reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from models.checkpoint import COMPLETE_MARKER, atomic_directory, is_prepared, weights_state
from models.registry import ModelSpec, cascade_home

log = logging.getLogger(__name__)

QUANTS = ("f32", "f16", "q8_0", "q4_1")
RECIPE = "gguf/1"  # change it to re-export every cached GGUF


class GGUFExportError(ValueError):
    """The model cannot be written as a GGUF llama.cpp runs (the message says why)."""


def gguf_dir(spec: ModelSpec, quant: str) -> Path:
    """Keyed by name and checkpoint location: two local checkpoints both named `final` do not evict each other."""
    where = hashlib.sha256(str(spec.checkpoint_dir.resolve()).encode()).hexdigest()[:8]
    return cascade_home() / "gguf" / f"{spec.name}-{where}" / quant


def export_gguf(spec: ModelSpec, quant: str = "q8_0", force: bool = False, progress: bool = True) -> Path:
    """The model's GGUF file, exported now unless an export of the same weights is cached."""
    if quant not in QUANTS:
        raise GGUFExportError(f"unknown GGUF quantization {quant!r}; choose one of {', '.join(QUANTS)}")
    source = spec.checkpoint_dir
    stamp = f"{RECIPE}: {quant} of {source_identity(source)}"
    out = gguf_dir(spec, quant)
    if is_prepared(out, stamp) and not force:
        log.info("GGUF of %s (%s) is cached at %s", spec.name, quant, out / "model.gguf")
        return out / "model.gguf"
    log.info("exporting %s to GGUF (%s)", spec.name, quant)
    with atomic_directory(out, stamp) as tmp:
        write_gguf(source, tmp / "model.gguf", quant, spec.name, progress=progress)
    return out / "model.gguf"


def source_identity(path: Path) -> str:
    """What the export depends on: the checkpoint's place, its preparation stamp, its weight files' sizes and times."""
    marker = path / COMPLETE_MARKER
    stamp = marker.read_text().strip() if marker.is_file() else ""
    return json.dumps([str(path.resolve()), stamp, weights_state(path)])


# ---------------------------------------------------------------------------------------------------------------
# writing


def write_gguf(source: Path, out: Path, quant: str, name: str, progress: bool = True) -> None:
    import gguf

    config = json.loads((source / "config.json").read_text())
    arch = _architecture(config)
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(name)
    writer.add_file_type(_FILE_TYPES[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_hparams(writer, config)
    _add_tokenizer(writer, source, config)
    for gguf_name, array in _tensors(source, config):
        qtype = _tensor_type(gguf_name, array, quant)
        data = gguf.quants.quantize(array, qtype)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=progress)
    writer.close()


def _architecture(config: dict[str, Any]) -> str:
    model_type = config.get("model_type")
    if model_type in ("llama", "mistral"):
        return "llama"
    if model_type == "ministral3":
        return "mistral3"
    raise GGUFExportError(f"model_type {model_type!r} has no GGUF export here (Llama, Mistral and Ministral 3 do)")


def _add_hparams(writer: Any, config: dict[str, Any]) -> None:
    import gguf

    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(config["vocab_size"])
    rope_type = rope.get("rope_type", "default")
    if rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        writer.add_rope_scaling_yarn_beta_fast(float(rope.get("beta_fast", 32.0)))
        writer.add_rope_scaling_yarn_beta_slow(float(rope.get("beta_slow", 1.0)))
        writer.add_rope_scaling_yarn_log_mul(0.1 * float(rope.get("mscale_all_dim", 0.0)))
    elif rope_type != "default":
        raise GGUFExportError(f"rope_type {rope_type!r} has no GGUF export here (default and yarn do)")
    if "llama_4_scaling_beta" in rope:  # Ministral 3: queries scaled by 1 + beta * log(1 + pos // original)
        writer.add_attn_temperature_scale(float(rope["llama_4_scaling_beta"]))
        writer.add_attn_temperature_length(int(rope["original_max_position_embeddings"]))


def _add_tokenizer(writer: Any, source: Path, config: dict[str, Any]) -> None:
    import gguf

    if (source / "tekken.json").is_file():
        vocab = gguf.MistralVocab(source)
        tokens, types = [], []
        for text, _score, toktype in vocab.all_tokens():
            tokens.append(text)
            types.append(toktype)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("tekken")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(vocab.extract_vocab_merges_from_model())
        writer.add_bos_token_id(vocab.bos_id)
        writer.add_eos_token_id(vocab.eos_id)
        writer.add_unk_token_id(vocab.unk_id)
        writer.add_pad_token_id(vocab.pad_id)
        writer.add_add_bos_token(False)  # prompts arrive as token ids that already hold BOS
        writer.add_add_eos_token(False)
        _check_vocab(tokens, config)
        return
    tok_file = source / "tokenizer.json"
    if not tok_file.is_file():
        raise GGUFExportError(f"{source} has neither tokenizer.json nor tekken.json")
    tok = json.loads(tok_file.read_text())
    model = tok["model"]
    if model.get("type") != "BPE":
        raise GGUFExportError(f"tokenizer type {model.get('type')!r} has no GGUF export here (byte-level BPE does)")
    size = max(config["vocab_size"], *(t["id"] + 1 for t in tok.get("added_tokens", [])), len(model["vocab"]))
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in model["vocab"].items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for added in tok.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    # llama.cpp picks its pre-tokenizer regex by name. We send prompts as token ids, so it only matters for text a
    # client of llama.cpp's own server would send; SmolLM2's vocabulary has a name, others get llama.cpp's default.
    writer.add_tokenizer_pre("smollm" if tokens[:2] == ["<|endoftext|>", "<|im_start|>"] else "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = model.get("merges", [])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    gguf.SpecialVocab(source, load_merges=False).add_to_gguf(writer, quiet=True)  # bos/eos/pad ids, chat template
    writer.add_add_bos_token(False)  # prompts arrive as token ids that already hold BOS


def _check_vocab(tokens: list[bytes], config: dict[str, Any]) -> None:
    if len(tokens) != config["vocab_size"]:
        raise GGUFExportError(f"the tokenizer has {len(tokens)} tokens but the model {config['vocab_size']}")


# HF name -> GGUF name; {} is the layer index.
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _tensors(source: Path, config: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every weight, q/k permuted from HF's rotate-half layout to llama.cpp's."""
    from safetensors import safe_open

    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    files = sorted(source.glob("*.safetensors"))
    if not files:
        raise GGUFExportError(f"{source} has no safetensors weights")
    seen_head = False
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                array = f.get_tensor(key).float().numpy()
                name = _gguf_name(key)
                if name is None:
                    if key.endswith("rotary_emb.inv_freq"):
                        continue
                    raise GGUFExportError(f"weight {key!r} has no GGUF counterpart here")
                if name.endswith("attn_q.weight"):
                    array = _permute(array, heads)
                elif name.endswith("attn_k.weight"):
                    array = _permute(array, kv_heads)
                seen_head |= name == "output.weight"
                yield name, array
    if not seen_head and not config.get("tie_word_embeddings", False):
        raise GGUFExportError("the checkpoint has no lm_head.weight and does not tie its embeddings")


def _gguf_name(key: str) -> str | None:
    key = key.removeprefix("model.")
    if key == "embed_tokens.weight":
        return "token_embd.weight"
    if key == "norm.weight":
        return "output_norm.weight"
    if key == "lm_head.weight":
        return "output.weight"
    if key.startswith("layers."):
        _, index, rest = key.split(".", 2)
        if rest in _LAYER_NAMES:
            return f"blk.{index}.{_LAYER_NAMES[rest]}"
    return None


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores each head's rotary pairs as two halves; llama.cpp's `llama` rope expects them interleaved."""
    # [n_head * head_dim, hidden] -> [n_head, 2, head_dim / 2, hidden] -> swap the middle axes -> back
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_type(name: str, array: np.ndarray, quant: str) -> Any:
    import gguf

    q = gguf.GGMLQuantizationType
    if array.ndim == 1 or quant == "f32":
        return q.F32
    if quant == "f16":
        return q.F16
    wanted = q.Q8_0 if (quant == "q8_0" or name == "token_embd.weight") else q.Q4_1
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if array.shape[-1] % block == 0 else q.F16


_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "q4_1": 3}  # llama.cpp's LLAMA_FTYPE values
