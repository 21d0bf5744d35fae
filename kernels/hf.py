"""The attention kernel as a transformers attention implementation: `model.set_attn_implementation("cascade")`.

transformers hands us q [batch, heads, q_len, dim] and K/V [batch, kv_heads, kv_len, dim] (GQA not expanded), the
layer's `sliding_window`, and the mask that the registered mask function built (`sdpa_mask`: None when the mask is
plainly causal, else a 4-D bool tensor). The kernel does causal (bottom-right: a decode step's query is the last
position) and sliding-window masking itself; any other mask (padding in a batch) goes to SDPA, which honours it.
"""

from __future__ import annotations

import logging

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kernels.attention import attention, visible_mask

NAME = "cascade"
log = logging.getLogger(__name__)


def _plain(mask: torch.Tensor, q_len: int, kv_len: int, causal: bool, window: int | None) -> bool:
    """Is the mask exactly what the kernel computes itself (for every batch row)?"""
    allowed = mask if mask.dtype == torch.bool else mask == 0
    want = visible_mask(q_len, kv_len, causal, window, mask.device)
    return allowed.shape[-2:] == want.shape and bool((allowed == want).all())


def cascade_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      sliding_window: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    causal = bool(getattr(module, "is_causal", True))
    window = sliding_window if causal else None
    q_len, kv_len = query.shape[2], key.shape[2]
    if dropout > 0 or (attention_mask is not None and not _plain(attention_mask, q_len, kv_len, causal, window)):
        log.debug("cascade attention: mask other than causal/sliding window (or dropout): using sdpa")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    out = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=causal, window=window,
                    scale=scaling)
    return out, None  # [batch, q_len, heads, dim], as transformers expects


def register() -> str:
    """Register "cascade" with transformers (idempotent); returns the name for `set_attn_implementation`."""
    AttentionInterface.register(NAME, cascade_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # without a mask function the causal mask is silently dropped
    return NAME
