"""Decode attention over a paged KV cache (one query token per sequence), beside its torch reference.

Cache layout is vLLM's flash layout split in two: `k_cache, v_cache [num_blocks, block_size, heads_kv, head_dim]`
(`kv_cache[:, 0]` and `kv_cache[:, 1]` of vLLM's `[num_blocks, 2, block_size, heads_kv, head_dim]` are such views).
`block_table [batch, max_blocks]` int32 maps a sequence's logical block to a physical one; `seq_lens [batch]` counts
its cached tokens, the new token's K/V included. One program owns one KV head of one sequence and all the query
heads of its group (GQA packing: each K/V tile is loaded once for the group, and the group fills the rows of a
`tl.dot`). Long contexts are cut into splits that run in parallel (flash-decoding); a second kernel merges the
splits' partial outputs by their log-sum-exp.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.attention import softmax_finish, softmax_step
from kernels.runtime import INTERPRET, check_triton_device, empty, empty_like


@triton.jit
def _decode_split_kernel(
    Q, KC, VC, BT, SEQ_LENS, O_PART, LSE_PART,
    sqb, sqh, skn, sks, skh, svn, svs, svh, sbt, sob, soh, sos, slb, slh,
    sm_scale, window,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr, WINDOW: tl.constexpr, UPCAST: tl.constexpr,
):
    b = tl.program_id(0)
    kv_h = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SEQ_LENS + b)
    first_tok = 0
    if WINDOW:
        first_tok = tl.maximum(0, seq_len - window)
    n_blocks = tl.cdiv(seq_len, BLOCK_SIZE)
    first_block = first_tok // BLOCK_SIZE
    per_split = tl.cdiv(n_blocks - first_block, NUM_SPLITS)
    blk_lo = first_block + split * per_split
    blk_hi = tl.minimum(blk_lo + per_split, n_blocks)
    heads = tl.arange(0, BLOCK_H)
    head_ok = heads < GROUP
    h = kv_h * GROUP + heads
    offs_d = tl.arange(0, HEAD_DIM)
    offs_t = tl.arange(0, BLOCK_SIZE)
    q = tl.load(Q + b * sqb + h[:, None] * sqh + offs_d[None, :], mask=head_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    for blk in range(blk_lo, blk_hi):
        phys = tl.load(BT + b * sbt + blk).to(tl.int64)  # int64: block * stride overflows int32 in large caches
        toks = blk * BLOCK_SIZE + offs_t
        tok_ok = (toks < seq_len) & (toks >= first_tok)
        k = tl.load(KC + phys * skn + offs_t[:, None] * sks + kv_h * skh + offs_d[None, :], mask=tok_ok[:, None],
                    other=0.0)
        v = tl.load(VC + phys * svn + offs_t[:, None] * svs + kv_h * svh + offs_d[None, :], mask=tok_ok[:, None],
                    other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        qk = tl.where(tok_ok[None, :], qk, float("-inf"))
        m_i, l_i, acc = softmax_step(qk, m_i, l_i, acc, v)
    out, lse = softmax_finish(m_i, l_i, acc)
    tl.store(O_PART + b * sob + h[:, None] * soh + split * sos + offs_d[None, :], out, mask=head_ok[:, None])
    tl.store(LSE_PART + b * slb + h * slh + split, lse, mask=head_ok)


@triton.jit
def _decode_merge_kernel(
    O_PART, LSE_PART, OUT, sob, soh, sos, slb, slh, sxb, sxh,
    HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_POW2: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    splits = tl.arange(0, SPLITS_POW2)
    split_ok = splits < NUM_SPLITS
    offs_d = tl.arange(0, HEAD_DIM)
    lse = tl.load(LSE_PART + b * slb + h * slh + splits, mask=split_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_safe)  # an empty split has lse -inf and weighs 0
    parts = tl.load(O_PART + b * sob + h * soh + splits[:, None] * sos + offs_d[None, :], mask=split_ok[:, None],
                    other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(OUT + b * sxb + h * sxh + offs_d, out.to(OUT.dtype.element_ty))


def default_splits(max_seq_len: int, block_size: int) -> int:
    """Splits of at least 256 tokens, at most 16: enough programs to fill a GPU at small batch."""
    if INTERPRET:
        return min(4, max(1, max_seq_len // 256))
    return max(1, min(16, max_seq_len // max(256, block_size)))


@torch.library.custom_op("cascade::paged_decode", mutates_args=())
def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float, window: int | None, num_splits: int) -> torch.Tensor:
    check_triton_device(q, k_cache, v_cache, block_table, seq_lens)
    batch, heads, dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    o_part = empty((batch, heads, num_splits, dim), like=q)
    lse_part = empty((batch, heads, num_splits), like=q)
    _decode_split_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, block_table, seq_lens, o_part, lse_part,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_table.stride(0),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        scale, window or 0,
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), HEAD_DIM=dim, BLOCK_SIZE=block_size,
        NUM_SPLITS=num_splits, WINDOW=window is not None, UPCAST=INTERPRET,
    )
    out = empty_like(q)
    _decode_merge_kernel[(batch, heads)](
        o_part, lse_part, out, o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0),
        lse_part.stride(1), out.stride(0), out.stride(1),
        HEAD_DIM=dim, NUM_SPLITS=num_splits, SPLITS_POW2=triton.next_power_of_2(num_splits),
    )
    return out


@paged_decode.register_fake
def _(q, k_cache, v_cache, block_table, seq_lens, scale, window, num_splits):
    return torch.empty_like(q)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                           seq_lens: torch.Tensor, *, scale: float | None = None, window: int | None = None,
                           num_splits: int | None = None, max_seq_len: int | None = None) -> torch.Tensor:
    """q [batch, heads, dim] -> [batch, heads, dim]; see the module docstring for the cache layout."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"want q [batch, heads, dim] and caches [blocks, block_size, kv_heads, dim]; got q "
                         f"{tuple(q.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}")
    block_size, kv_heads, dim = k_cache.shape[1:]
    if block_size % 16:
        raise ValueError(f"block size must be a multiple of 16, got {block_size}")
    if dim != q.shape[2] or dim < 16 or dim > 256 or dim & (dim - 1):
        raise ValueError(f"head_dim must match and be a power of two in 16..256, got q {q.shape[2]}, cache {dim}")
    if q.shape[1] % kv_heads:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({kv_heads})")
    if block_table.dtype not in (torch.int32, torch.int64) or seq_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError("block_table and seq_lens must be integer tensors")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if num_splits is None:
        longest = max_seq_len if max_seq_len is not None else int(seq_lens.max())
        num_splits = default_splits(longest, block_size)
    scale = scale if scale is not None else 1.0 / math.sqrt(dim)
    return paged_decode(q, k_cache, v_cache, block_table, seq_lens, scale, window, num_splits)


def paged_decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                           seq_lens: torch.Tensor, *, scale: float | None = None, window: int | None = None,
                           compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Gather each sequence's cached K/V through the block table, then plain softmax attention, in (and returned as)
    `compute_dtype`, default the input's."""
    dtype = compute_dtype or q.dtype
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    block_size = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    outs = []
    for b in range(q.shape[0]):
        n = int(seq_lens[b])
        first = max(0, n - window) if window is not None else 0
        blocks = block_table[b, : -(-n // block_size)].long()
        k = k_cache[blocks].flatten(0, 1)[first:n].to(dtype).repeat_interleave(group, dim=1)  # [n, heads, dim]
        v = v_cache[blocks].flatten(0, 1)[first:n].to(dtype).repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].to(dtype), k) * scale
        probs = torch.softmax(scores.float(), -1).to(dtype) if n > first else scores
        outs.append(torch.einsum("hn,nhd->hd", probs, v) if n > first else torch.zeros_like(q[b], dtype=dtype))
    return torch.stack(outs)
