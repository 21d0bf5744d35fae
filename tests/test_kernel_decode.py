"""Paged decode attention (kernels/decode.py): random block tables in a large, NaN-filled cache."""

from __future__ import annotations

import pytest
import torch

from kernels.attention import attention
from kernels.decode import paged_decode_attention, paged_decode_reference
from tests.kernel_checks import DEVICE, DTYPES, assert_within_2x, dtype_id, fresh_seed

NUM_BLOCKS = 32768  # vLLM's choice: block * stride overflows int32 here unless addresses are 64-bit


def _paged(lens, heads_kv, dim, block_size, dtype, num_blocks=NUM_BLOCKS):
    """Caches that are NaN everywhere but the live slots; each sequence's blocks drawn at random near the top."""
    k_cache = torch.full((num_blocks, block_size, heads_kv, dim), float("nan"), device=DEVICE, dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    max_blocks = max(-(-n // block_size) for n in lens)
    ids = num_blocks - 1 - torch.randperm(min(num_blocks, 4 * len(lens) * max_blocks))[: len(lens) * max_blocks]
    table = ids.view(len(lens), max_blocks).to(device=DEVICE, dtype=torch.int32)
    for b, n in enumerate(lens):
        for i in range(-(-n // block_size)):
            used = min(block_size, n - i * block_size)
            k_cache[table[b, i], :used] = torch.randn(used, heads_kv, dim, device=DEVICE, dtype=dtype)
            v_cache[table[b, i], :used] = torch.randn(used, heads_kv, dim, device=DEVICE, dtype=dtype)
    return k_cache, v_cache, table, torch.tensor(lens, device=DEVICE, dtype=torch.int32)


# (lens, heads, kv_heads, dim, block_size, window, splits)
CASES = [
    ([1, 16, 17, 300], 4, 4, 64, 16, None, None),  # GQA 1, lengths around the block edge
    ([45, 130], 6, 2, 32, 32, None, 3),            # GQA 3, block 32, forced splits
    ([200, 7], 8, 2, 128, 16, 50, 4),              # GQA 4, head_dim 128, window shorter than one sequence
    ([90], 8, 1, 16, 16, 200, 2),                  # GQA 8 (MQA), window longer than the sequence
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=[f"lens{c[0]}h{c[1]}/{c[2]}d{c[3]}bs{c[4]}w{c[5]}s{c[6]}"
                                             for c in CASES])
def test_decode_matches_float64(case, dtype):
    seed = fresh_seed()
    lens, heads, heads_kv, dim, block_size, window, splits = case
    k_cache, v_cache, table, seq_lens = _paged(lens, heads_kv, dim, block_size, dtype,
                                               num_blocks=NUM_BLOCKS if dim <= 32 else 2048)
    q = torch.randn(len(lens), heads, dim, device=DEVICE, dtype=dtype)
    out = paged_decode_attention(q, k_cache, v_cache, table, seq_lens, window=window, num_splits=splits)
    exact = paged_decode_reference(q, k_cache, v_cache, table, seq_lens, window=window, compute_dtype=torch.float64)
    low = paged_decode_reference(q, k_cache, v_cache, table, seq_lens, window=window)
    assert out.shape == q.shape and out.dtype == dtype
    assert_within_2x("decode", out, low, exact, seed)


def test_splits_merge_to_the_one_pass_result():
    fresh_seed()
    k_cache, v_cache, table, seq_lens = _paged([333, 64, 1], 2, 32, 16, torch.float32, num_blocks=256)
    q = torch.randn(3, 8, 32, device=DEVICE)
    one = paged_decode_attention(q, k_cache, v_cache, table, seq_lens, num_splits=1)
    for splits in (2, 5, 16):  # 16 splits leave some empty for the short sequences
        many = paged_decode_attention(q, k_cache, v_cache, table, seq_lens, num_splits=splits)
        torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-6)


def test_decode_equals_last_row_of_prefill():
    """The same sequence through the prefill kernel (dense K/V) and the decode kernel (paged K/V)."""
    fresh_seed()
    n, heads, heads_kv, dim = 75, 4, 2, 64
    k_cache, v_cache, table, seq_lens = _paged([n], heads_kv, dim, 16, torch.float32, num_blocks=64)
    k = k_cache[table[0, :5].long()].flatten(0, 1)[:n][None]
    v = v_cache[table[0, :5].long()].flatten(0, 1)[:n][None]
    q = torch.randn(1, n, heads, dim, device=DEVICE)
    prefill = attention(q, k, v, causal=True, window=30)
    decode = paged_decode_attention(q[:, -1], k_cache, v_cache, table, seq_lens, window=30)
    torch.testing.assert_close(decode, prefill[:, -1], rtol=1e-5, atol=1e-6)


def test_vllm_cache_layout_views():
    """vLLM's [blocks, 2, block_size, kv_heads, dim] cache works through its K and V views (strided)."""
    fresh_seed()
    k_cache, v_cache, table, seq_lens = _paged([40, 19], 2, 32, 16, torch.float32, num_blocks=32)
    kv = torch.stack([k_cache, v_cache], dim=1)
    q = torch.randn(2, 4, 32, device=DEVICE)
    out = paged_decode_attention(q, kv[:, 0], kv[:, 1], table, seq_lens)
    torch.testing.assert_close(out, paged_decode_attention(q, k_cache, v_cache, table, seq_lens))


@pytest.mark.parametrize("block_size, message", [(8, "multiple of 16"), (16, "multiple of KV heads")])
def test_bad_input_is_named(block_size, message):
    k_cache = torch.zeros(4, block_size, 3, 16, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        paged_decode_attention(torch.zeros(1, 4, 16, device=DEVICE), k_cache, k_cache,
                               torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32))


def test_opcheck():
    fresh_seed()
    k_cache, v_cache, table, seq_lens = _paged([20, 3], 2, 16, 16, torch.float32, num_blocks=8)
    q = torch.randn(2, 4, 16, device=DEVICE)
    torch.library.opcheck(torch.ops.cascade.paged_decode.default, (q, k_cache, v_cache, table, seq_lens, 0.25, None, 2))
