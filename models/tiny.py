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
RECIPE = "tiny/2"

# Magistral / Ministral 3 reasoning tokenizers are Tekken v13 with [ARGS] and [THINK] among the special tokens.
# mistral_common ships only v3 Tekken files, so the v13 file is the same vocabulary with the special-token table of
# those releases written out (ranks 0-19 as in v3, [ARGS] 32, [CALL_ID] 33, [THINK] 34, [/THINK] 35).
_V3_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]"]
_V13_SPECIALS = {32: "[ARGS]", 33: "[CALL_ID]", 34: "[THINK]", 35: "[/THINK]"}

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


def write_tekken(dest: Path, version: str) -> None:
    """The bundled v3 Tekken file, or (version "v13") the same vocabulary with v13's special tokens."""
    if version == "v3":
        shutil.copyfile(mistral_tokenizer_file(), dest)
        return
    data = json.loads(mistral_tokenizer_file().read_text())
    count = data["config"]["default_num_special_tokens"]
    names = {i: s for i, s in enumerate(_V3_SPECIALS)} | _V13_SPECIALS
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
        write_tekken(tmp / "tekken.json", "v13" if spec.reasoning_format == "mistral-think" else "v3")
        config = json.loads((tmp / "config.json").read_text())
        (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2))
        assert config["vocab_size"] == VOCAB_SIZE
    return out
