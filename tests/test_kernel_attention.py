"""Attention forward/backward kernel (kernels/attention.py) against float64 torch, under the interpreter on CPU."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.attention import attention, attention_reference
from kernels.runtime import KernelDeviceError, check_triton_device
from tests.kernel_checks import DEVICE, DTYPES, assert_within_2x, dtype_id, fresh_seed, run_with_grads

# (batch, len_q, len_k, heads, kv_heads, head_dim, causal, window)
CASES = [
    (1, 128, 128, 4, 4, 64, True, None),     # aligned MHA
    (2, 100, 100, 6, 2, 32, True, None),     # GQA 3, length not a multiple of the block
    (1, 70, 70, 8, 1, 16, False, None),      # non-causal, MQA (GQA 8)
    (2, 90, 90, 4, 1, 64, True, 20),         # window shorter than the sequence, GQA 4
    (1, 50, 50, 2, 2, 128, True, 200),       # window longer than the sequence, head_dim 128
    (1, 1, 77, 4, 2, 64, True, None),        # one query token against a cache (bottom-right causal)
    (2, 17, 80, 4, 4, 32, True, 16),         # chunked prefill with a window
    (1, 40, 40, 2, 1, 256, True, None),      # head_dim 256
    (1, 300, 300, 2, 1, 16, True, 200),      # long enough for whole unmasked blocks inside the window
]


def _inputs(b, lq, lk, h, hk, d, dtype):
    q = torch.randn(b, lq, h, d, device=DEVICE, dtype=dtype)
    k = torch.randn(b, lk, hk, d, device=DEVICE, dtype=dtype)
    v = torch.randn(b, lk, hk, d, device=DEVICE, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=[f"b{c[0]}q{c[1]}k{c[2]}h{c[3]}/{c[4]}d{c[5]}"
                                             f"{'c' if c[6] else 'nc'}w{c[7]}" for c in CASES])
def test_forward_and_backward_match_float64(case, dtype):
    seed = fresh_seed()
    b, lq, lk, h, hk, d, causal, window = case
    inputs = _inputs(b, lq, lk, h, hk, d, dtype)
    grad_out = torch.randn(b, lq, h, d, device=DEVICE, dtype=dtype)
    kw = dict(causal=causal, window=window)
    out, grads = run_with_grads(lambda q, k, v: attention(q, k, v, **kw), inputs, grad_out)
    ref, ref_grads = run_with_grads(lambda q, k, v: attention_reference(q, k, v, compute_dtype=torch.float64, **kw),
                            inputs, grad_out)
    low, low_grads = run_with_grads(lambda q, k, v: attention_reference(q, k, v, **kw), inputs, grad_out)
    assert out.dtype == dtype and out.shape == (b, lq, h, d)
    assert_within_2x("out", out, low, ref, seed)
    for name, g, g_low, g_ref in zip(("dq", "dk", "dv"), grads, low_grads, ref_grads, strict=True):
        assert_within_2x(name, g, g_low, g_ref, seed)


@settings(max_examples=12, deadline=None)
@given(batch=st.integers(1, 2), len_q=st.integers(1, 80), extra_k=st.integers(0, 40), kv_heads=st.integers(1, 2),
       group=st.sampled_from([1, 2, 3, 4, 8]), dim=st.sampled_from([16, 32, 64]), causal=st.booleans(),
       window=st.one_of(st.none(), st.integers(1, 100)), half=st.booleans())
def test_random_shapes_forward(batch, len_q, extra_k, kv_heads, group, dim, causal, window, half):
    """A property sweep over shapes, GQA ratios, windows and dtypes, forward only (the interpreter is slow)."""
    seed = fresh_seed()
    causal = causal or window is not None
    dtype = torch.float16 if half else torch.float32
    q, k, v = _inputs(batch, len_q, len_q + extra_k, kv_heads * group, kv_heads, dim, dtype)
    kw = dict(causal=causal, window=window)
    exact = attention_reference(q, k, v, compute_dtype=torch.float64, **kw)
    assert_within_2x("out", attention(q, k, v, **kw), attention_reference(q, k, v, **kw), exact, seed)


def test_packed_sequences_with_guard_bands():
    """Varlen: three sequences (one of a single token) packed, K longer than Q for one of them; Q/K/V are views
    into NaN-filled buffers (wider head axis, tokens past the last sequence), so any stray read shows."""
    seed = fresh_seed()
    h, hk, d = 4, 2, 32
    lens_q, lens_k = [1, 64, 37], [1, 64, 60]
    cu_q = torch.tensor([0, 1, 65, 102], device=DEVICE, dtype=torch.int32)
    cu_k = torch.tensor([0, 1, 65, 125], device=DEVICE, dtype=torch.int32)

    def guarded(tokens, heads):
        buf = torch.full((tokens + 9, heads, 2 * d), float("nan"), device=DEVICE)
        view = buf[:tokens, :, :d]
        view.copy_(torch.randn(tokens, heads, d))
        return view

    q, k, v = guarded(sum(lens_q), h), guarded(sum(lens_k), hk), guarded(sum(lens_k), hk)
    grad_out = torch.randn(sum(lens_q), h, d, device=DEVICE)
    kw = dict(causal=True, window=24, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)

    leaves = [t.detach().requires_grad_() for t in (q, k, v)]  # the kernel reads the guarded views themselves
    out = attention(*leaves, **kw)
    out.backward(grad_out)
    # the references get plain copies (run_with_grads clones values, not the band)
    ref, ref_grads = run_with_grads(lambda q, k, v: attention_reference(q, k, v, compute_dtype=torch.float64, **kw),
                                    (q, k, v), grad_out)
    low, low_grads = run_with_grads(lambda q, k, v: attention_reference(q, k, v, **kw), (q, k, v), grad_out)
    assert_within_2x("out", out.detach(), low, ref, seed)
    for name, leaf, g_low, g_ref in zip(("dq", "dk", "dv"), leaves, low_grads, ref_grads, strict=True):
        assert_within_2x(name, leaf.grad, g_low, g_ref, seed)


def test_gqa_equals_mha_on_repeated_kv():
    fresh_seed()
    q, k, v = _inputs(1, 48, 48, 8, 2, 32, torch.float32)
    gqa = attention(q, k, v, causal=True)
    mha = attention(q, k.repeat_interleave(4, dim=2), v.repeat_interleave(4, dim=2), causal=True)
    torch.testing.assert_close(gqa, mha, rtol=0, atol=1e-6)


def test_rows_that_see_no_key_are_zero():
    """More queries than keys under bottom-right causal alignment: the first rows see nothing."""
    fresh_seed()
    q, k, v = _inputs(1, 20, 8, 2, 2, 16, torch.float32)
    out = attention(q, k, v, causal=True)
    assert torch.equal(out[:, :12], torch.zeros_like(out[:, :12]))
    torch.testing.assert_close(out, attention_reference(q, k, v, causal=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad, message", [
    (dict(d=48), "power of two"),
    (dict(hk=3), "multiple of KV heads"),
    (dict(causal=False, window=8), "needs causal"),
])
def test_bad_shapes_are_named(bad, message):
    d, hk = bad.get("d", 32), bad.get("hk", 2)
    q, k, v = _inputs(1, 8, 8, 4, hk, d, torch.float32)
    with pytest.raises(ValueError, match=message):
        attention(q, k, v, causal=bad.get("causal", True), window=bad.get("window"))


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    import kernels.runtime

    monkeypatch.setattr(kernels.runtime, "INTERPRET", False)
    with pytest.raises(KernelDeviceError, match="TRITON_INTERPRET=1"):
        check_triton_device(torch.zeros(1))


def test_opcheck_and_compile():
    """The custom op's fake/autograd registrations are what torch.library.opcheck and torch.compile need."""
    fresh_seed()
    q, k, v = (t.requires_grad_() for t in _inputs(1, 20, 20, 4, 2, 16, torch.float32))
    torch.library.opcheck(torch.ops.cascade.attention_fwd.default, (q, k, v, None, None, 0, 0, True, 8, 0.25))
    compiled = torch.compile(lambda q, k, v: attention(q, k, v, causal=True, window=8).sum(), fullgraph=True)
    compiled(q, k, v).backward()
    expected = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    attention_reference(q, k, v, causal=True, window=8).sum().backward()
    for got, want in zip(expected, (q.grad, k.grad, v.grad), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
