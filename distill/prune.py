"""Structured pruning of a Llama/Mistral-style decoder, as pure functions on (config, state dict).

Each operation returns a new config and state that load strictly into the same model class, in transformers and in
vLLM: fewer layers, fewer FFN channels, fewer attention heads (whole KV groups or query heads evenly per group), or a
narrower residual stream (one PCA rotation for the whole network after folding the RMSNorm gains, as SliceGPT; the
rotation is exact at full rank). `head_dim` is always written explicitly, so `num_heads * head_dim != hidden_size`
works after the hidden size shrinks.
"""

from __future__ import annotations

import copy
import math

import torch
from transformers import PretrainedConfig

from distill.model_io import StateDict

LAYER = "model.layers.{}."


def _layer_keys(state: StateDict, i: int) -> dict[str, torch.Tensor]:
    prefix = LAYER.format(i)
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _with_head_dim(config: PretrainedConfig) -> PretrainedConfig:
    new = copy.deepcopy(config)
    if getattr(new, "head_dim", None) is None:
        new.head_dim = config.hidden_size // config.num_attention_heads
    return new


def as_mistral(config: PretrainedConfig) -> PretrainedConfig:
    """The same network as a Mistral config (no sliding window): transformers' LlamaConfig insists that
    hidden_size be a multiple of num_attention_heads even with an explicit head_dim, MistralConfig does not.
    The weight names are identical, so only the config changes."""
    from transformers import MistralConfig

    if config.model_type == "mistral":
        return config
    values = config.to_dict()
    if values.get("attention_bias") or values.get("mlp_bias"):
        raise ValueError("a Llama model with attention or MLP biases has no Mistral equivalent")
    for key in ("attention_bias", "mlp_bias", "pretraining_tp", "model_type", "architectures", "transformers_version"):
        values.pop(key, None)
    new = MistralConfig(**{**values, "sliding_window": None})
    new.architectures = ["MistralForCausalLM"]
    return new


def _fit_heads(config: PretrainedConfig) -> PretrainedConfig:
    if config.hidden_size % config.num_attention_heads and config.model_type == "llama":
        return as_mistral(config)
    return config


def drop_layers(config: PretrainedConfig, state: StateDict, keep: list[int]) -> tuple[PretrainedConfig, StateDict]:
    """Keep the decoder layers `keep` (in order) and renumber them; per-layer config lists follow."""
    n = config.num_hidden_layers
    keep = sorted(set(keep))
    if not keep or keep[0] < 0 or keep[-1] >= n:
        raise ValueError(f"layers to keep must be a non-empty subset of 0..{n - 1}, got {keep}")
    new = _with_head_dim(config)
    new.num_hidden_layers = len(keep)
    for key, value in config.to_dict().items():
        if isinstance(value, list) and len(value) == n and key not in ("architectures",):
            setattr(new, key, [value[i] for i in keep])
    out = {k: v for k, v in state.items() if not k.startswith("model.layers.")}
    for new_i, old_i in enumerate(keep):
        for name, tensor in _layer_keys(state, old_i).items():
            out[LAYER.format(new_i) + name] = tensor
    return new, out


Pruned = tuple[PretrainedConfig, StateDict]


def slice_ffn(config: PretrainedConfig, state: StateDict, keep: list[torch.Tensor]) -> Pruned:
    """Keep FFN channels `keep[i]` of layer i: rows of gate/up, columns of down. All layers keep the same count."""
    sizes = {len(k) for k in keep}
    if len(keep) != config.num_hidden_layers or len(sizes) != 1:
        raise ValueError("slice_ffn needs one index set per layer, all of the same size")
    new = _with_head_dim(config)
    new.intermediate_size = sizes.pop()
    out = dict(state)
    for i, idx in enumerate(keep):
        idx = torch.as_tensor(idx, dtype=torch.long).sort().values
        p = LAYER.format(i) + "mlp."
        for proj in ("gate_proj", "up_proj"):
            out[p + proj + ".weight"] = state[p + proj + ".weight"][idx].contiguous()
            if p + proj + ".bias" in state:
                out[p + proj + ".bias"] = state[p + proj + ".bias"][idx].contiguous()
        out[p + "down_proj.weight"] = state[p + "down_proj.weight"][:, idx].contiguous()
    return new, out


def slice_heads(config: PretrainedConfig, state: StateDict, keep: list[torch.Tensor]) -> Pruned:
    """Keep query heads `keep[i]` of layer i, group-consistently.

    Query head j reads KV group j // (H / KV). A KV group survives if any of its heads do, and every surviving group
    must keep the same number of query heads, so the kept heads still map onto the kept groups in order.
    """
    h, kv = config.num_attention_heads, config.num_key_value_heads
    per_group = h // kv
    new = _with_head_dim(config)
    hd = new.head_dim
    out = dict(state)
    shapes = set()
    for i, heads in enumerate(keep):
        heads = torch.as_tensor(heads, dtype=torch.long).sort().values
        if len(heads) == 0 or heads.min() < 0 or heads.max() >= h or len(heads.unique()) != len(heads):
            raise ValueError(f"layer {i}: query heads to keep must be distinct indices in 0..{h - 1}")
        groups = (heads // per_group).unique()
        counts = torch.bincount(heads // per_group, minlength=kv)[groups]
        if len(counts.unique()) != 1:
            raise ValueError(f"layer {i}: kept query heads are uneven across KV groups ({counts.tolist()})")
        shapes.add((len(heads), len(groups)))
        q_rows = (heads[:, None] * hd + torch.arange(hd)).flatten()
        kv_rows = (groups[:, None] * hd + torch.arange(hd)).flatten()
        p = LAYER.format(i) + "self_attn."
        for proj, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            out[p + proj + ".weight"] = state[p + proj + ".weight"][rows].contiguous()
            if p + proj + ".bias" in state:
                out[p + proj + ".bias"] = state[p + proj + ".bias"][rows].contiguous()
        out[p + "o_proj.weight"] = state[p + "o_proj.weight"][:, q_rows].contiguous()
    if len(shapes) != 1:
        raise ValueError(f"all layers must keep the same number of heads and groups, got {sorted(shapes)}")
    new.num_attention_heads, new.num_key_value_heads = shapes.pop()
    return _fit_heads(new), out


def heads_to_keep(head_scores: torch.Tensor, config: PretrainedConfig, num_heads: int,
                  num_kv_heads: int) -> list[torch.Tensor]:
    """Choose query heads per layer from [layers, heads] scores: best KV groups first, then best heads in each."""
    h, kv = config.num_attention_heads, config.num_key_value_heads
    if num_kv_heads > kv or num_heads > h or num_heads % num_kv_heads or num_heads // num_kv_heads > h // kv:
        raise ValueError(f"cannot prune {h} heads / {kv} KV groups to {num_heads} / {num_kv_heads}")
    per_group, keep_per_group = h // kv, num_heads // num_kv_heads
    keep = []
    for scores in head_scores:
        grouped = scores.view(kv, per_group)
        groups = grouped.sum(dim=1).topk(num_kv_heads).indices.sort().values
        heads = [g * per_group + grouped[g].topk(keep_per_group).indices.sort().values for g in groups]
        keep.append(torch.cat(heads))
    return keep


def pca_rotation(covariance: torch.Tensor, hidden_size: int) -> torch.Tensor:
    """The `hidden_size` leading eigenvectors of the residual-stream second moment, as a [d, d'] matrix."""
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
    order = eigenvalues.argsort(descending=True)[:hidden_size]
    return eigenvectors[:, order]


def rotate_hidden(config: PretrainedConfig, state: StateDict, rotation: torch.Tensor,
                  untie: bool = False) -> tuple[PretrainedConfig, StateDict]:
    """Shrink the residual stream from d to d' with an orthonormal [d, d'] rotation (SliceGPT).

    RMSNorm gains are folded into the linears that read the normalised stream (q/k/v, gate/up, lm_head) first; the
    stream is then rotated: readers W -> W diag(g) Q, writers (o_proj, down_proj) W -> Q^T W, embedding E -> E Q.
    The new norms carry a constant gain sqrt(d/d') because RMSNorm divides by the root of the *mean* square, which
    a truncated stream would otherwise shrink. With tied embeddings the head is the rotated embedding, so the final
    norm's gain cannot be folded exactly; it becomes the best diagonal fit diag(Q^T diag(g) Q), exact when the gain
    is uniform. `untie=True` writes a separate, exactly folded head instead (more parameters).
    """
    d = config.hidden_size
    q = rotation.double()
    if q.shape[0] != d or q.shape[1] > d:
        raise ValueError(f"rotation must be [{d}, d' <= {d}], got {list(q.shape)}")
    d_new = q.shape[1]
    gain = math.sqrt(d / d_new)
    new = _with_head_dim(config)
    new.hidden_size = d_new
    out = dict(state)

    def reader(key: str, norm_gain: torch.Tensor) -> None:
        w = state[key].double() * norm_gain.double()[None, :]
        out[key] = (w @ q).to(state[key].dtype).contiguous()

    def writer(key: str) -> None:
        out[key] = (q.T @ state[key].double()).to(state[key].dtype).contiguous()
        bias = key.replace(".weight", ".bias")
        if bias in state:
            out[bias] = (q.T @ state[bias].double()).to(state[bias].dtype)

    for i in range(config.num_hidden_layers):
        p = LAYER.format(i)
        g_attn, g_mlp = state[p + "input_layernorm.weight"], state[p + "post_attention_layernorm.weight"]
        for proj in ("q_proj", "k_proj", "v_proj"):
            reader(p + f"self_attn.{proj}.weight", g_attn)
        for proj in ("gate_proj", "up_proj"):
            reader(p + f"mlp.{proj}.weight", g_mlp)
        writer(p + "self_attn.o_proj.weight")
        writer(p + "mlp.down_proj.weight")
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[p + norm + ".weight"] = torch.full((d_new,), gain, dtype=state[p + norm + ".weight"].dtype)

    embed = state["model.embed_tokens.weight"]
    g_final = state["model.norm.weight"]
    out["model.embed_tokens.weight"] = (embed.double() @ q).to(embed.dtype).contiguous()
    tied = getattr(config, "tie_word_embeddings", False)
    if tied and not untie:
        fitted = (q * q * g_final.double()[:, None]).sum(dim=0)  # diag(Q^T diag(g) Q)
        out["model.norm.weight"] = (fitted * gain).to(g_final.dtype)
        out.pop("lm_head.weight", None)
    else:
        head = state["lm_head.weight"] if "lm_head.weight" in state else embed
        out["lm_head.weight"] = ((head.double() * g_final.double()[None, :]) @ q).to(head.dtype).contiguous()
        out["model.norm.weight"] = torch.full((d_new,), gain, dtype=g_final.dtype)
        new.tie_word_embeddings = False
    return _fit_heads(new), out
