"""Random micro decoders for the distillation maths tests (milliseconds per step)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig


def micro_config(kind: str = "llama", tied: bool = False, **overrides: object):
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=tied,
                  rms_norm_eps=1e-6)
    common.update(overrides)
    if kind == "mistral":
        return MistralConfig(sliding_window=16, **common)
    return LlamaConfig(**common)


def micro_model(kind: str = "llama", tied: bool = False, seed: int = 0, **overrides: object):
    """A random model with non-trivial norm gains (so gain folding is actually exercised)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(micro_config(kind, tied, **overrides), dtype=torch.float64)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand_like(p))
            else:
                p.normal_(0, 0.2)
    model.config.use_cache = False
    return model.eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits
