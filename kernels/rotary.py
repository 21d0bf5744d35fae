"""Rotary position embedding (Llama/Mistral "rotate half" convention) on q/k, in place, beside its reference.

`x [tokens, heads, head_dim]` with `cos, sin [tokens, head_dim // 2]` (transformers' `[tokens, head_dim]` tables
repeat their halves; pass either, only the first half is read). Pair (x1, x2) = (x[:d/2], x[d/2:]) becomes
(x1 cos - x2 sin, x2 cos + x1 sin). The backward is the inverse rotation (sin negated), done by the same kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.runtime import INTERPRET, check_triton_device, empty_like


@triton.jit
def _rotary_kernel(X, Y, COS, SIN, n_tokens, n_heads, sxt, sxh, syt, syh, sct, sst,
                   HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, CONJ: tl.constexpr):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, HALF)
    tok_ok = toks < n_tokens
    cos = tl.load(COS + toks[:, None] * sct + dims[None, :], mask=tok_ok[:, None], other=0.0).to(tl.float32)
    sin = tl.load(SIN + toks[:, None] * sst + dims[None, :], mask=tok_ok[:, None], other=0.0).to(tl.float32)
    if CONJ:
        sin = -sin
    ok = tok_ok[:, None, None] & (heads < n_heads)[None, :, None]
    x_at = X + toks[:, None, None] * sxt + heads[None, :, None] * sxh + dims[None, None, :]
    y_at = Y + toks[:, None, None] * syt + heads[None, :, None] * syh + dims[None, None, :]
    x1 = tl.load(x_at, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_at + HALF, mask=ok, other=0.0).to(tl.float32)
    c = cos[:, None, :]
    s = sin[:, None, :]
    tl.store(y_at, (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=ok)
    tl.store(y_at + HALF, (x2 * c + x1 * s).to(Y.dtype.element_ty), mask=ok)


def _launch(x: torch.Tensor, out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, conj: bool) -> None:
    tokens, heads, dim = x.shape
    block_t = 64 if INTERPRET else 16
    _rotary_kernel[(triton.cdiv(tokens, block_t),)](
        x, out, cos, sin, tokens, heads, x.stride(0), x.stride(1), out.stride(0), out.stride(1), cos.stride(0),
        sin.stride(0), HALF=dim // 2, BLOCK_T=block_t, BLOCK_H=triton.next_power_of_2(heads), CONJ=conj,
    )


@torch.library.custom_op("cascade::rotary_", mutates_args=("q", "k"))
def rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate q and k in place (serving: no autograd)."""
    check_triton_device(q, k, cos, sin)
    _launch(q, q, cos, sin, False)
    _launch(k, k, cos, sin, False)


@rotary_.register_fake
def _(q, k, cos, sin):
    return None


@torch.library.custom_op("cascade::rotary", mutates_args=())
def rotary_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, conj: bool) -> torch.Tensor:
    check_triton_device(x, cos, sin)
    out = empty_like(x)
    _launch(x, out, cos, sin, conj)
    return out


@rotary_op.register_fake
def _(x, cos, sin, conj):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    _, cos, sin, conj = inputs
    ctx.save_for_backward(cos, sin)
    ctx.conj = conj


def _backward(ctx, grad):  # type: ignore[no-untyped-def]
    cos, sin = ctx.saved_tensors
    return rotary_op(grad.contiguous(), cos, sin, not ctx.conj), None, None, None


rotary_op.register_autograd(_backward, setup_context=_setup_context)


def _tables(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() != 3 or x.shape[-1] % 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [tokens, heads, even head_dim] with a contiguous last axis, got "
                         f"{tuple(x.shape)}")
    half = x.shape[-1] // 2
    if half & (half - 1):
        raise ValueError(f"head_dim must be a power of two, got {x.shape[-1]}")
    if cos.shape != sin.shape or cos.shape[0] != x.shape[0] or cos.shape[-1] not in (half, 2 * half):
        raise ValueError(f"cos/sin must be [tokens, head_dim // 2 or head_dim], got {tuple(cos.shape)} for x "
                         f"{tuple(x.shape)}")
    return cos[:, :half].contiguous(), sin[:, :half].contiguous()


def apply_rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """In place on q [tokens, heads, dim] and k [tokens, kv_heads, dim]."""
    cos_h, sin_h = _tables(q, cos, sin)
    _tables(k, cos, sin)
    rotary_(q, k, cos_h, sin_h)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Out of place and differentiable (training)."""
    cos_h, sin_h = _tables(x, cos, sin)
    return rotary_op(x, cos_h, sin_h, False)


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """transformers' `x * cos + rotate_half(x) * sin` with full-width tables."""
    half = x.shape[-1] // 2
    c = torch.cat([cos[:, :half]] * 2, -1)[:, None].to(compute_dtype)
    s = torch.cat([sin[:, :half]] * 2, -1)[:, None].to(compute_dtype)
    xc = x.to(compute_dtype)
    rotated = torch.cat([-xc[..., half:], xc[..., :half]], -1)
    return xc * c + rotated * s
