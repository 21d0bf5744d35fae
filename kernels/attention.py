"""Prefill/training attention: a FlashAttention-2 style Triton forward and backward, beside its torch reference.

Layouts follow flash-attn: dense `[batch, seq, heads, head_dim]`, or packed `[tokens, heads, head_dim]` with
`cu_seqlens_q/k` (int32 offsets, batch + 1 entries). K/V have `heads_kv` heads dividing the query heads (GQA): a
program reads its KV head by index, nothing is expanded. Causal masking is aligned bottom-right (query i of a
sequence sees key j iff j <= i + len_k - len_q), so a query shorter than its keys is a decode/chunked-prefill step.
A sliding window W keeps keys with j > i + len_k - len_q - W (Mistral, transformers' `sliding_window`).
Accumulation is fp32; the log-sum-exp per row (natural log, -inf for a row with no visible key) feeds the backward.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.runtime import INTERPRET, check_triton_device, empty, empty_like

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _visible(rows, cols, k_len, diag, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    ok = cols[None, :] < k_len
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None] + diag)
    if WINDOW:
        ok = ok & (cols[None, :] > rows[:, None] + diag - window)
    return ok


@triton.jit
def _seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    if VARLEN:
        q_start = tl.load(CU_Q + b)
        q_len = tl.load(CU_Q + b + 1) - q_start
        k_start = tl.load(CU_K + b)
        k_len = tl.load(CU_K + b + 1) - k_start
    else:
        q_start = 0
        q_len = seqlen_q
        k_start = 0
        k_len = seqlen_k
    return q_start, q_len, k_start, k_len


@triton.jit
def _key_range(start_m, k_len, diag, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
               WINDOW: tl.constexpr):
    """[lo, hi): the keys any row of the query tile starting at start_m may see (lo aligned to BLOCK_N)."""
    lo = 0
    hi = k_len
    if CAUSAL:
        hi = tl.minimum(k_len, start_m + BLOCK_M + diag)
    if WINDOW:
        lo = tl.maximum(0, start_m + diag - window + 1) // BLOCK_N * BLOCK_N
    return lo, hi


@triton.jit
def _load_tile(BASE, rows, row_ok, stride, offs_d, UPCAST: tl.constexpr):
    """[rows, head_dim] from BASE + row * stride; fp32 under the interpreter (its bf16 arithmetic is wrong)."""
    x = tl.load(BASE + rows[:, None] * stride + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def softmax_step(qk, m_i, l_i, acc, v):
    """Fold one tile of base-2 scores qk (masked entries -inf) and its values v into the running (max, sum, acc)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet stays at zero
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def softmax_finish(m_i, l_i, acc):
    """(normalised output, natural-log LSE); a row that saw no key gives 0 and LSE -inf."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    return acc / l_safe[:, None], lse


@triton.jit
def _unmasked_range(start_m, lo, hi, k_len, diag, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """[full_lo, full_hi) within [lo, hi), block-aligned: key blocks every row of the tile sees whole."""
    full_hi = k_len
    if CAUSAL:
        full_hi = tl.minimum(k_len, start_m + diag + 1)  # the last key the first row sees, + 1
    full_hi = full_hi // BLOCK_N * BLOCK_N
    full_lo = lo
    if WINDOW:
        first = tl.maximum(0, start_m + BLOCK_M + diag - window)  # the first key the last row sees
        full_lo = tl.maximum(lo, tl.cdiv(first, BLOCK_N) * BLOCK_N)
    full_lo = tl.minimum(full_lo, hi)
    full_hi = tl.maximum(full_lo, tl.minimum(full_hi, hi))
    return full_lo, full_hi


@triton.jit
def _fwd_blocks(q, m_i, l_i, acc, k_base, v_base, sks, svs, rows, offs_n, offs_d, start, stop, k_len, diag, window,
                qk_scale, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, MASKED: tl.constexpr,
                UPCAST: tl.constexpr):
    for start_n in range(start, stop, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < k_len
        k = _load_tile(k_base, cols, col_ok, sks, offs_d, UPCAST)
        v = _load_tile(v_base, cols, col_ok, svs, offs_d, UPCAST)
        qk = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        if MASKED:
            qk = tl.where(_visible(rows, cols, k_len, diag, window, CAUSAL, WINDOW), qk, float("-inf"))
        m_i, l_i, acc = softmax_step(qk, m_i, l_i, acc, v)
    return m_i, l_i, acc


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh, slb, slh,
    seqlen_q, seqlen_k, sm_scale, window, num_heads,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, VARLEN: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    kv_h = h // GROUP
    q_start, q_len, k_start, k_len = _seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return
    diag = k_len - q_len
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < q_len
    q = _load_tile(Q + b * sqb + q_start * sqs + h * sqh, rows, row_ok, sqs, offs_d, UPCAST)
    lo, hi = _key_range(start_m, k_len, diag, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_base = K + b * skb + k_start * sks + kv_h * skh
    v_base = V + b * svb + k_start * svs + kv_h * svh
    # Only blocks on the diagonal or the window's edge need a mask: the tutorial's stages, in three ranges
    full_lo, full_hi = _unmasked_range(start_m, lo, hi, k_len, diag, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    m_i, l_i, acc = _fwd_blocks(q, m_i, l_i, acc, k_base, v_base, sks, svs, rows, offs_n, offs_d, lo, full_lo, k_len,
                                diag, window, qk_scale, BLOCK_N, CAUSAL, WINDOW, True, UPCAST)
    m_i, l_i, acc = _fwd_blocks(q, m_i, l_i, acc, k_base, v_base, sks, svs, rows, offs_n, offs_d, full_lo, full_hi,
                                k_len, diag, window, qk_scale, BLOCK_N, CAUSAL, WINDOW, False, UPCAST)
    m_i, l_i, acc = _fwd_blocks(q, m_i, l_i, acc, k_base, v_base, sks, svs, rows, offs_n, offs_d, full_hi, hi, k_len,
                                diag, window, qk_scale, BLOCK_N, CAUSAL, WINDOW, True, UPCAST)
    out, lse = softmax_finish(m_i, l_i, acc)
    tl.store(O + b * sob + (q_start + rows[:, None]) * sos + h * soh + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LSE + b * slb + h * slh + q_start + rows, lse, mask=row_ok)


@triton.jit
def _row_stats(LSE, DELTA, offset, rows, row_ok):
    """(LSE in base 2, delta) of the rows; a row that saw no key gets LSE +inf so its probabilities are 0."""
    lse = tl.load(LSE + offset + rows, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    return lse, tl.load(DELTA + offset + rows, mask=row_ok, other=0.0)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, CU_Q, CU_K,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdob, sdos, sdoh, sdqb, sdqs, sdqh, slb, slh,
    seqlen_q, seqlen_k, sm_scale, window, num_heads,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, VARLEN: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    kv_h = h // GROUP
    q_start, q_len, k_start, k_len = _seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return
    diag = k_len - q_len
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < q_len
    q = _load_tile(Q + b * sqb + q_start * sqs + h * sqh, rows, row_ok, sqs, offs_d, UPCAST)
    do = _load_tile(DO + b * sdob + q_start * sdos + h * sdoh, rows, row_ok, sdos, offs_d, UPCAST)
    lse, delta = _row_stats(LSE, DELTA, b * slb + h * slh + q_start, rows, row_ok)
    lo, hi = _key_range(start_m, k_len, diag, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_base = K + b * skb + k_start * sks + kv_h * skh
    v_base = V + b * svb + k_start * svs + kv_h * svh
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < k_len
        k = _load_tile(k_base, cols, col_ok, sks, offs_d, UPCAST)
        v = _load_tile(v_base, cols, col_ok, svs, offs_d, UPCAST)
        qk = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        p = tl.math.exp2(qk - lse[:, None])
        p = tl.where(_visible(rows, cols, k_len, diag, window, CAUSAL, WINDOW), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
    dq = dq * sm_scale
    tl.store(DQ + b * sdqb + (q_start + rows[:, None]) * sdqs + h * sdqh + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, CU_Q, CU_K,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdob, sdos, sdoh, sdkb, sdks, sdkh, sdvb, sdvs, sdvh, slb, slh,
    seqlen_q, seqlen_k, sm_scale, window, num_kv_heads,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, VARLEN: tl.constexpr, UPCAST: tl.constexpr,
):
    """One program owns a K/V tile and sums over every query head of its group: GQA without atomics."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_kv_heads
    kv_h = pid_bh % num_kv_heads
    q_start, q_len, k_start, k_len = _seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n >= k_len:
        return
    diag = k_len - q_len
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = cols < k_len
    k = _load_tile(K + b * skb + k_start * sks + kv_h * skh, cols, col_ok, sks, offs_d, UPCAST)
    v = _load_tile(V + b * svb + k_start * svs + kv_h * svh, cols, col_ok, svs, offs_d, UPCAST)
    lo = 0
    hi = q_len
    if CAUSAL:
        lo = tl.maximum(0, start_n - diag) // BLOCK_M * BLOCK_M
    if WINDOW:
        hi = tl.minimum(q_len, start_n + BLOCK_N - 1 - diag + window)
    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for g in range(GROUP):
        h = kv_h * GROUP + g
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < q_len
            q = _load_tile(Q + b * sqb + q_start * sqs + h * sqh, rows, row_ok, sqs, offs_d, UPCAST)
            do = _load_tile(DO + b * sdob + q_start * sdos + h * sdoh, rows, row_ok, sdos, offs_d, UPCAST)
            lse, delta = _row_stats(LSE, DELTA, b * slb + h * slh + q_start, rows, row_ok)
            qk = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
            p = tl.math.exp2(qk - lse[:, None])
            p = tl.where(_visible(rows, cols, k_len, diag, window, CAUSAL, WINDOW) & row_ok[:, None], p, 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision="ieee")
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision="ieee")
    dk = dk * sm_scale
    tl.store(DK + b * sdkb + (k_start + cols[:, None]) * sdks + kv_h * sdkh + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + b * sdvb + (k_start + cols[:, None]) * sdvs + kv_h * sdvh + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


# ---------------------------------------------------------------------------------------------------------------
# Host side: shapes, strides and launch


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor | None,
           cu_k: torch.Tensor | None, causal: bool, window: int | None) -> None:
    packed = cu_q is not None
    if (cu_q is None) != (cu_k is None):
        raise ValueError("give both cu_seqlens_q and cu_seqlens_k, or neither")
    want = 3 if packed else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != want:
            raise ValueError(f"{name} must be {'[tokens, heads, dim]' if packed else '[batch, seq, heads, dim]'}, "
                             f"got shape {tuple(t.shape)}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q head_dim {q.shape[-1]} != k head_dim {k.shape[-1]}")
    d = q.shape[-1]
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"head_dim must be a power of two in 16..256, got {d}")
    if q.shape[-2] % k.shape[-2]:
        raise ValueError(f"query heads ({q.shape[-2]}) must be a multiple of KV heads ({k.shape[-2]})")
    if window is not None and (window < 1 or not causal):
        raise ValueError("a sliding window must be >= 1 and needs causal attention")
    if not packed and q.shape[0] != k.shape[0]:
        raise ValueError(f"batch of q ({q.shape[0]}) and k ({k.shape[0]}) differ")


def _blocks(head_dim: int) -> tuple[int, int]:
    if INTERPRET:  # few, large programs: the interpreter pays ~10 ms per program instance
        return 64, 64
    return (128, 64) if head_dim <= 128 else (64, 32)


def _layout(t: torch.Tensor, packed: bool) -> tuple[int, int, int]:
    """(batch stride, sequence stride, head stride); a packed tensor has no batch axis (stride 0)."""
    return (0, t.stride(0), t.stride(1)) if packed else (t.stride(0), t.stride(1), t.stride(2))


def _meta(q: torch.Tensor, k: torch.Tensor, cu_q: torch.Tensor | None, max_q: int, max_k: int
          ) -> tuple[bool, int, int, int, int, int]:
    packed = cu_q is not None
    batch = cu_q.shape[0] - 1 if packed else q.shape[0]
    seq_q = max_q if packed else q.shape[1]
    seq_k = max_k if packed else k.shape[1]
    return packed, batch, seq_q, seq_k, q.shape[-2], k.shape[-2]


def _lse_shape(q: torch.Tensor, packed: bool) -> tuple[int, ...]:
    return (1, q.shape[1], q.shape[0]) if packed else (q.shape[0], q.shape[2], q.shape[1])


@torch.library.custom_op("cascade::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor | None,
                  cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                  window: int | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out like q, lse fp32 [batch, heads, seq] or [1, heads, tokens] when packed)."""
    check_triton_device(q, k, v)
    packed, batch, seq_q, seq_k, heads, kv_heads = _meta(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    out = empty_like(q)
    lse = empty(_lse_shape(q, packed), like=q)
    block_m, block_n = _blocks(q.shape[-1])
    grid = (triton.cdiv(seq_q, block_m), batch * heads)
    cu_q = cu_seqlens_q if packed else lse  # any tensor: the pointer is not read when VARLEN is off
    cu_k = cu_seqlens_k if packed else lse
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, cu_q, cu_k,
        *_layout(q, packed), *_layout(k, packed), *_layout(v, packed), *_layout(out, packed),
        0 if packed else lse.stride(0), lse.stride(1),
        seq_q, seq_k, scale, window or 0, heads,
        GROUP=heads // kv_heads, HEAD_DIM=q.shape[-1], BLOCK_M=block_m, BLOCK_N=block_n,
        CAUSAL=causal, WINDOW=window is not None, VARLEN=packed, UPCAST=INTERPRET,
    )
    return out, lse


@attention_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window, scale):
    packed = cu_seqlens_q is not None
    return torch.empty_like(q), q.new_empty(_lse_shape(q, packed), dtype=torch.float32)


@torch.library.custom_op("cascade::attention_bwd", mutates_args=())
def attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
                  max_seqlen_q: int, max_seqlen_k: int, causal: bool, window: int | None, scale: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_triton_device(grad_out, q, k, v)
    packed, batch, seq_q, seq_k, heads, kv_heads = _meta(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    grad_out = grad_out.contiguous()
    # delta_i = rowsum(dO_i * O_i): the softmax-backward term, in the lse layout
    delta = (grad_out.float() * out.float()).sum(-1)
    delta = delta.T[None].contiguous() if packed else delta.transpose(1, 2).contiguous()
    dq, dk, dv = empty_like(q), empty_like(k), empty_like(v)
    block_m, block_n = _blocks(q.shape[-1])
    cu_q = cu_seqlens_q if packed else lse
    cu_k = cu_seqlens_k if packed else lse
    lse_strides = (0 if packed else lse.stride(0), lse.stride(1))
    common = dict(GROUP=heads // kv_heads, HEAD_DIM=q.shape[-1], BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal,
                  WINDOW=window is not None, VARLEN=packed, UPCAST=INTERPRET)
    _attn_bwd_dq_kernel[(triton.cdiv(seq_q, block_m), batch * heads)](
        q, k, v, grad_out, dq, lse, delta, cu_q, cu_k,
        *_layout(q, packed), *_layout(k, packed), *_layout(v, packed), *_layout(grad_out, packed),
        *_layout(dq, packed), *lse_strides, seq_q, seq_k, scale, window or 0, heads, **common,
    )
    _attn_bwd_dkdv_kernel[(triton.cdiv(seq_k, block_n), batch * kv_heads)](
        q, k, v, grad_out, dk, dv, lse, delta, cu_q, cu_k,
        *_layout(q, packed), *_layout(k, packed), *_layout(v, packed), *_layout(grad_out, packed),
        *_layout(dk, packed), *_layout(dv, packed), *lse_strides, seq_q, seq_k, scale, window or 0, kv_heads,
        **common,
    )
    return dq, dk, dv


@attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    q, k, v, cu_q, cu_k, max_q, max_k, causal, window, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, causal, window, scale)


def _backward(ctx, grad_out, grad_lse):  # type: ignore[no-untyped-def]
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = attention_bwd(grad_out, q, k, v, out, lse, cu_q, cu_k, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, window: int | None = None,
              scale: float | None = None, cu_seqlens_q: torch.Tensor | None = None,
              cu_seqlens_k: torch.Tensor | None = None, max_seqlen_q: int | None = None,
              max_seqlen_k: int | None = None) -> torch.Tensor:
    """Attention output shaped like q; differentiable in q, k, v (the log-sum-exp is not)."""
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, window)
    if cu_seqlens_q is not None and cu_seqlens_k is not None:
        cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32)
        max_seqlen_q = max_seqlen_q or int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
        max_seqlen_k = max_seqlen_k or int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max())
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out, _ = attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q or 0, max_seqlen_k or 0, causal, window,
                           scale)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Reference


def visible_mask(len_q: int, len_k: int, causal: bool, window: int | None, device: torch.device | None = None
                 ) -> torch.Tensor:
    """[len_q, len_k] bool: which keys each query sees (bottom-right causal alignment, optional sliding window)."""
    i = torch.arange(len_q, device=device)[:, None] + (len_k - len_q)
    j = torch.arange(len_k, device=device)[None, :]
    ok = torch.ones(len_q, len_k, dtype=torch.bool, device=device)
    if causal:
        ok &= j <= i
    if window is not None:
        ok &= j > i - window
    return ok


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                        window: int | None = None, scale: float | None = None,
                        cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
                        compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain torch attention in (and returned as) `compute_dtype` (default: the input's), K/V heads repeated for
    GQA; rows that see no key give 0. The test oracle (in float64) and the same-precision baseline the kernel's
    error is judged against."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if cu_seqlens_q is not None and cu_seqlens_k is not None:
        outs = []
        for b in range(cu_seqlens_q.shape[0] - 1):
            sq = slice(int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]))
            sk = slice(int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1]))
            outs.append(attention_reference(q[None, sq], k[None, sk], v[None, sk], causal=causal, window=window,
                                            scale=scale, compute_dtype=compute_dtype)[0])
        return torch.cat(outs)
    dtype = compute_dtype or q.dtype
    group = q.shape[2] // k.shape[2]
    qt = q.to(dtype).transpose(1, 2)
    kt = k.to(dtype).transpose(1, 2).repeat_interleave(group, dim=1)
    vt = v.to(dtype).transpose(1, 2).repeat_interleave(group, dim=1)
    scores = (qt @ kt.transpose(-1, -2)) * scale
    ok = visible_mask(q.shape[1], k.shape[1], causal, window, q.device)
    scores = scores.masked_fill(~ok, float("-inf"))
    probs = torch.softmax(scores.float() if dtype in (torch.float16, torch.bfloat16) else scores, dim=-1)
    probs = probs.nan_to_num(0.0).to(dtype)
    return (probs @ vt).transpose(1, 2)
