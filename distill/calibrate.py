"""One forward pass with hooks that collects every importance statistic pruning needs, saved as safetensors.

Saved once per model, so re-pruning to another target needs no new pass (modelopt keeps `scores_path` likewise):
  layer_norm_ratio [L]     mean ||h_out|| / ||h_in|| of the residual stream around each block (Ministral 3)
  block_importance [L]     1 - mean cos(h_in, h_out) (ShortGPT BI; picked better layers on SmolLM2)
  ffn_mean_abs [L, F]      mean |silu(gate x) * up x| at the down_proj input (Ministral 3)
  ffn_l2_mean [L, F]       sqrt(sum over sequences of (per-sequence mean |act|)^2) (Minitron's (L2, mean))
  head_norm [L, H]         mean L2 norm of each head's slice of the o_proj input
  hidden_second_moment [d, d]  sum of n n^T over tokens and every RMSNorm input n = x / rms(x) (for the PCA)
  hidden_l2_mean [d]       Minitron's embedding-channel importance over the normalised stream
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import PreTrainedModel

from models.checkpoint import atomic_directory

STATS_FILE = "importance.safetensors"


@torch.no_grad()
def collect_importance(model: PreTrainedModel, batches: torch.Tensor | list[torch.Tensor], progress: bool = True,
                       media: list[torch.Tensor | None] | None = None) -> dict[str, torch.Tensor]:
    """Run `batches` [n_batches, batch, seq] (or a list of [batch, seq_i]) through `model` and return the statistics
    above. An audio/vision
    model (distill/media_lm.py) takes each batch's encoder features from `media`."""
    config = model.config
    decoder = getattr(model.model, "language_model", model.model)  # MediaLM: projector + decoder
    layers = decoder.layers
    n_layers, heads = config.num_hidden_layers, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    d, ffn = config.hidden_size, config.intermediate_size
    acc = {
        "layer_norm_ratio": torch.zeros(n_layers, dtype=torch.float64),
        "block_importance": torch.zeros(n_layers, dtype=torch.float64),
        "ffn_mean_abs": torch.zeros(n_layers, ffn, dtype=torch.float64),
        "ffn_l2_mean": torch.zeros(n_layers, ffn, dtype=torch.float64),
        "head_norm": torch.zeros(n_layers, heads, dtype=torch.float64),
        "hidden_second_moment": torch.zeros(d, d, dtype=torch.float64),
        "hidden_l2_mean": torch.zeros(d, dtype=torch.float64),
    }
    tokens = 0
    inputs: dict[int, torch.Tensor] = {}
    hooks = []

    def block_in(i: int):
        def hook(module, args, kwargs):
            inputs[i] = (args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    def block_out(i: int):
        def hook(module, args, kwargs, output):
            h_in = inputs.pop(i).double()
            h_out = (output[0] if isinstance(output, tuple) else output).double()
            acc["layer_norm_ratio"][i] += (h_out.norm(dim=-1) / h_in.norm(dim=-1).clamp_min(1e-12)).sum()
            acc["block_importance"][i] += (1 - torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)).sum()
        return hook

    def ffn_in(i: int):
        def hook(module, args):
            act = args[0].detach().double().abs()  # [batch, seq, ffn]
            acc["ffn_mean_abs"][i] += act.sum(dim=(0, 1))
            acc["ffn_l2_mean"][i] += act.mean(dim=1).pow(2).sum(dim=0)
        return hook

    def heads_in(i: int):
        def hook(module, args):
            x = args[0].detach().double()
            acc["head_norm"][i] += x.view(*x.shape[:-1], heads, head_dim).norm(dim=-1).sum(dim=(0, 1))
        return hook

    def norm_in(module, args):
        x = args[0].detach().double()
        n = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-12)
        flat = n.reshape(-1, d)
        acc["hidden_second_moment"].add_(flat.T @ flat)
        acc["hidden_l2_mean"] += n.abs().mean(dim=1).pow(2).sum(dim=0)

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(block_in(i), with_kwargs=True))
        hooks.append(layer.register_forward_hook(block_out(i), with_kwargs=True))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(ffn_in(i)))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(heads_in(i)))
        hooks.append(layer.input_layernorm.register_forward_pre_hook(norm_in))
        hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(norm_in))
    hooks.append(decoder.norm.register_forward_pre_hook(norm_in))
    was_training = model.training
    model.eval()
    try:
        for i, batch in enumerate(tqdm(batches, desc="calibrate", unit="batch", disable=not progress)):
            extra = {"media": media[i]} if media is not None and media[i] is not None else {}
            model.model(input_ids=batch, **extra)
            tokens += batch.numel()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    sequences = sum(len(batch) for batch in batches)
    for key in ("layer_norm_ratio", "block_importance", "ffn_mean_abs", "head_norm"):
        acc[key] /= tokens
    acc["ffn_l2_mean"] = acc["ffn_l2_mean"].sqrt()
    acc["hidden_l2_mean"] = acc["hidden_l2_mean"].sqrt()
    acc["tokens"] = torch.tensor(tokens)
    acc["sequences"] = torch.tensor(sequences)
    return acc


def save_importance(stats: dict[str, torch.Tensor], out_dir: Path, meta: dict[str, str],
                    marker: str = "importance") -> Path:
    """Atomically write `<out_dir>/importance.safetensors` (+ a JSON summary a person can read)."""
    with atomic_directory(out_dir, marker) as tmp:
        save_file({k: v.contiguous() for k, v in stats.items()}, tmp / STATS_FILE, metadata=meta)
        summary = {
            **meta,
            "tokens": int(stats["tokens"]),
            "layer_norm_ratio": [round(float(x), 4) for x in stats["layer_norm_ratio"]],
            "block_importance": [round(float(x), 4) for x in stats["block_importance"]],
        }
        (tmp / "importance.json").write_text(json.dumps(summary, indent=1) + "\n")
    return out_dir / STATS_FILE


def load_importance(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)
