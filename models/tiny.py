"""Tiny random-initialised Mistral-family models for fast tests, with a real Mistral tokenizer.

The weights are noise, but everything around them is real: the architecture classes, config keys, the Tekken 131k
vocabulary from mistral_common's bundled files, and a checkpoint layout that transformers and vLLM both load.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from models.checkpoint import atomic_directory, is_prepared
from models.registry import ModelSpec

# Tekken v3: [INST], [TOOL_CALLS], [AVAILABLE_TOOLS], [TOOL_RESULTS], [SYSTEM_PROMPT]
TEKKEN_FILE = "tekken_240911.json"
VOCAB_SIZE = 131072
RECIPE = "tiny/1"

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
    raise ValueError(f"no tiny builder for family {family!r}")


def prepare_tiny(spec: ModelSpec, force: bool = False) -> Path:
    out = spec.checkpoint_dir
    if is_prepared(out, RECIPE) and not force:
        return out
    import torch

    model = build_tiny_model(spec.family, spec.max_context)
    model.to(getattr(torch, spec.dtype))
    with atomic_directory(out, RECIPE) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        shutil.copyfile(mistral_tokenizer_file(), tmp / "tekken.json")
        config = json.loads((tmp / "config.json").read_text())
        (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2))
        assert config["vocab_size"] == VOCAB_SIZE
    return out
