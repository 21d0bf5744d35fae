"""Turn a target (explicit dims or a parameter count) into a child architecture, and prune a parent into it."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from transformers import PretrainedConfig

from distill.model_io import StateDict
from distill.prune import drop_layers, heads_to_keep, pca_rotation, rotate_hidden, slice_ffn, slice_heads

Axis = Literal["num_hidden_layers", "hidden_size", "intermediate_size"]
LayerScore = Literal["block_importance", "layer_norm_ratio"]
FfnScore = Literal["ffn_mean_abs", "ffn_l2_mean"]
ROUND_TO = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
NEAR_BEST = 0.02  # candidates within 2% of the largest child under the target compete on balance


@dataclass(frozen=True)
class Architecture:
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool

    @classmethod
    def of(cls, config: PretrainedConfig) -> Architecture:
        return cls(
            num_hidden_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            vocab_size=config.vocab_size,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )

    @property
    def layer_params(self) -> int:
        """One decoder layer: attention, SwiGLU MLP and its two norms."""
        d, hd = self.hidden_size, self.head_dim
        attn = d * hd * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        return attn + 3 * d * self.intermediate_size + 2 * d

    @property
    def outer_params(self) -> int:
        """Embeddings, head (unless tied) and the final norm: everything outside the layers."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    @property
    def params(self) -> int:
        """Exact parameter count of a bias-free Llama/Mistral decoder with these dims."""
        return self.num_hidden_layers * self.layer_params + self.outer_params

    def describe(self) -> str:
        return (f"{self.num_hidden_layers} layers, hidden {self.hidden_size}, FFN {self.intermediate_size}, "
                f"heads {self.num_attention_heads}/{self.num_key_value_heads} x {self.head_dim}, "
                f"vocab {self.vocab_size}{' (tied)' if self.tie_word_embeddings else ''}: "
                f"{self.params / 1e6:.1f}M params")

    def as_dict(self) -> dict[str, int | bool]:
        return asdict(self)


class PlanError(ValueError):
    pass


TiedEmbeddings = Literal["untie", "approximate"]


def _tie(arch: Architecture, parent: Architecture, tied: TiedEmbeddings) -> Architecture:
    """A tied head cannot follow a hidden-size rotation exactly (see prune.rotate_hidden): untie it, and count it."""
    untie = parent.tie_word_embeddings and arch.hidden_size < parent.hidden_size and tied == "untie"
    return dataclasses.replace(arch, tie_word_embeddings=False) if untie else arch


def plan_architecture(parent: Architecture, dims: dict[str, int] | None = None, params: int | None = None,
                      axes: tuple[Axis, ...] = ("intermediate_size", "num_hidden_layers"),
                      tied: TiedEmbeddings = "untie") -> Architecture:
    """Fixed `dims` first; then, for a parameter target, shrink the free `axes` on a grid (ROUND_TO).

    The default axes are FFN width and depth: with tied embeddings (SmolLM2, Ministral 3B) a hidden-size cut must
    untie the head to stay exact, which costs vocab x hidden parameters back. Among the
    children within 2% of the largest one not above `params`, the most balanced wins: the smallest spread between
    the axes' shrink factors, so no axis is cut much harder than another.
    """
    fields = parent.as_dict()
    for key, value in (dims or {}).items():
        if key not in fields or key in ("vocab_size", "tie_word_embeddings", "head_dim"):
            raise PlanError(f"cannot set {key!r}; prunable dims: num_hidden_layers, hidden_size, intermediate_size, "
                            "num_attention_heads, num_key_value_heads")
        if not 0 < value <= fields[key]:
            raise PlanError(f"{key}={value} must be between 1 and the parent's {fields[key]}")
        fields[key] = value
    base = _tie(Architecture(**fields), parent, tied)
    if base.num_attention_heads % base.num_key_value_heads:
        raise PlanError(f"num_attention_heads {base.num_attention_heads} must be a multiple of "
                        f"num_key_value_heads {base.num_key_value_heads}")
    if params is None:
        return base
    if params >= base.params:
        raise PlanError(f"target {params / 1e6:.1f}M params is not below {base.params / 1e6:.1f}M ({base.describe()})")
    free = [a for a in axes if a not in (dims or {})]
    if not free:
        raise PlanError("a parameter target needs at least one axis that is not fixed explicitly")

    start = base.as_dict()
    grids = [sorted({start[a], *range(ROUND_TO[a], start[a], ROUND_TO[a])}) for a in free]
    fitting: list[tuple[Architecture, float]] = []
    for values in itertools.product(*grids):
        arch = _tie(dataclasses.replace(base, **dict(zip(free, values, strict=True))), parent, tied)
        if arch.params <= params:
            factors = [v / start[a] for a, v in zip(free, values, strict=True)]
            fitting.append((arch, max(factors) - min(factors)))
    if not fitting:
        smallest = dataclasses.replace(base, **{a: ROUND_TO[a] for a in free})
        raise PlanError(f"target {params / 1e6:.1f}M params is below the smallest child reachable by shrinking "
                        f"{', '.join(free)} ({smallest.describe()})")
    best = max(arch.params for arch, _ in fitting)
    near = [(spread, -arch.params, arch) for arch, spread in fitting if arch.params >= best * (1 - NEAR_BEST)]
    return min(near, key=lambda c: (c[0], c[1]))[2]


def prune_to(config: PretrainedConfig, state: StateDict, stats: dict[str, torch.Tensor], target: Architecture,
             layer_score: LayerScore = "block_importance", ffn_score: FfnScore = "ffn_mean_abs",
             ) -> tuple[PretrainedConfig, StateDict]:
    """Apply every needed cut, each by its importance statistic: layers, heads, FFN channels, then hidden size."""
    parent = Architecture.of(config)
    if target.tie_word_embeddings and not parent.tie_word_embeddings:
        raise PlanError("an untied parent cannot produce a tied child")
    if target.vocab_size != parent.vocab_size or target.head_dim != parent.head_dim:
        raise PlanError("vocab_size and head_dim cannot be pruned")
    keep_layers = list(range(parent.num_hidden_layers))
    if target.num_hidden_layers < parent.num_hidden_layers:
        scores = stats[layer_score]
        keep_layers = sorted(scores.topk(target.num_hidden_layers).indices.tolist())
        config, state = drop_layers(config, state, keep_layers)
    if (target.num_attention_heads, target.num_key_value_heads) != (parent.num_attention_heads,
                                                                    parent.num_key_value_heads):
        keep = heads_to_keep(stats["head_norm"][keep_layers], config, target.num_attention_heads,
                             target.num_key_value_heads)
        config, state = slice_heads(config, state, keep)
    if target.intermediate_size < parent.intermediate_size:
        keep = [row.topk(target.intermediate_size).indices for row in stats[ffn_score][keep_layers]]
        config, state = slice_ffn(config, state, keep)
    rotation = hidden_rotation(stats, parent, target)
    if rotation is not None:
        config, state = rotate_hidden(config, state, rotation, untie=not target.tie_word_embeddings)
    return config, state


def hidden_rotation(stats: dict[str, torch.Tensor], parent: Architecture, target: Architecture
                    ) -> torch.Tensor | None:
    """The PCA rotation [d, d'] a hidden-size cut applies to the residual stream (None: no cut)."""
    if target.hidden_size >= parent.hidden_size:
        return None
    return pca_rotation(stats["hidden_second_moment"], target.hidden_size)
