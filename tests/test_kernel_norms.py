"""RMSNorm, rotary and SwiGLU kernels (kernels/rmsnorm.py, rotary.py, swiglu.py) against float64 torch."""

from __future__ import annotations

import pytest
import torch

from kernels.rmsnorm import rmsnorm, rmsnorm_reference
from kernels.rotary import apply_rotary_, rotary, rotary_reference
from kernels.swiglu import swiglu, swiglu_reference
from tests.kernel_checks import DEVICE, DTYPES, assert_within_2x, dtype_id, fresh_seed, run_with_grads

EACH_DTYPE = pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)


def _check_all(name, fn, ref, inputs, grad_out, seed, atol=1e-5):
    out, grads = run_with_grads(fn, inputs, grad_out)
    exact, exact_grads = run_with_grads(lambda *t: ref(*t, compute_dtype=torch.float64), inputs, grad_out)
    # the same-precision torch computation: float32 math, rounded to the input dtype (as transformers does)
    low, low_grads = run_with_grads(lambda *t: ref(*t, compute_dtype=torch.float32).to(t[0].dtype), inputs, grad_out)
    assert_within_2x(name, out, low, exact, seed, atol)
    for i, (g, g_low, g_exact) in enumerate(zip(grads, low_grads, exact_grads, strict=True)):
        assert_within_2x(f"{name} grad {i}", g, g_low, g_exact, seed, atol)


@EACH_DTYPE
@pytest.mark.parametrize("shape", [(2, 128, 512), (5, 123, 123), (3, 1000)])
def test_rmsnorm(shape, dtype):
    seed = fresh_seed()
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], device=DEVICE)).to(dtype)
    # the weight gradient sums over every row: allow for float32 summation order over hundreds of rows
    _check_all("rmsnorm", lambda x, w: rmsnorm(x, w, 1e-6), lambda x, w, compute_dtype: rmsnorm_reference(
        x, w, 1e-6, compute_dtype), (x, w), torch.randn(shape, device=DEVICE), seed, atol=1e-4)


@EACH_DTYPE
@pytest.mark.parametrize("shape", [(2, 256, 512), (6, 42, 431)])
def test_swiglu(shape, dtype):
    seed = fresh_seed()
    gate, up = (torch.randn(shape, device=DEVICE, dtype=dtype) for _ in range(2))
    _check_all("swiglu", swiglu, swiglu_reference, (gate, up), torch.randn(shape, device=DEVICE), seed)


def _tables(tokens, dim):
    angles = torch.arange(tokens, device=DEVICE)[:, None] * (10000.0 ** (-torch.arange(0, dim, 2, device=DEVICE) / dim))
    return angles.cos(), angles.sin()


@EACH_DTYPE
@pytest.mark.parametrize("tokens, heads, dim", [(128, 8, 64), (37, 5, 32), (9, 3, 128)])
def test_rotary(tokens, heads, dim, dtype):
    seed = fresh_seed()
    cos, sin = _tables(tokens, dim)
    x = torch.randn(tokens, heads, dim, device=DEVICE, dtype=dtype)
    _check_all("rotary", lambda x: rotary(x, cos, sin), lambda x, compute_dtype: rotary_reference(
        x, cos, sin, compute_dtype), (x,), torch.randn(tokens, heads, dim, device=DEVICE), seed)


def test_rotary_in_place_on_q_and_k_with_full_width_tables():
    """transformers' [tokens, dim] cos/sin tables (halves repeated) are accepted; q and k are rotated in place."""
    fresh_seed()
    cos, sin = _tables(40, 64)
    q, k = torch.randn(40, 8, 64, device=DEVICE), torch.randn(40, 2, 64, device=DEVICE)
    q0, k0 = q.clone(), k.clone()
    apply_rotary_(q, k, torch.cat([cos, cos], -1), torch.cat([sin, sin], -1))
    torch.testing.assert_close(q, rotary_reference(q0, cos, sin), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k, rotary_reference(k0, cos, sin), rtol=1e-5, atol=1e-6)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="does not match"):
        rmsnorm(torch.zeros(2, 8, device=DEVICE), torch.ones(7, device=DEVICE))
    with pytest.raises(ValueError, match="must match"):
        swiglu(torch.zeros(4, device=DEVICE), torch.zeros(5, device=DEVICE))
    with pytest.raises(ValueError, match="cos/sin"):
        rotary(torch.zeros(3, 2, 16, device=DEVICE), torch.zeros(4, 8, device=DEVICE), torch.zeros(4, 8, device=DEVICE))


def test_opcheck():
    fresh_seed()
    x = torch.randn(6, 32, device=DEVICE, requires_grad=True)
    w = torch.randn(32, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.cascade.rmsnorm_fwd.default, (x, w, 1e-6))
    torch.library.opcheck(torch.ops.cascade.swiglu.default, (x, torch.randn_like(x).requires_grad_()))
    cos, sin = _tables(6, 32)
    xr = torch.randn(6, 2, 32, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.cascade.rotary.default, (xr, cos, sin, False))
    q, k = torch.randn(6, 4, 32, device=DEVICE), torch.randn(6, 2, 32, device=DEVICE)
    torch.library.opcheck(torch.ops.cascade.rotary_.default, (q, k, cos, sin))


def test_compiled_block_matches_eager():
    """A norm -> SwiGLU block under torch.compile(fullgraph=True): the ops stay opaque and differentiable."""
    fresh_seed()
    x = torch.randn(16, 64, device=DEVICE, requires_grad=True)
    w = torch.randn(64, device=DEVICE, requires_grad=True)

    def block(x, w):
        h = rmsnorm(x, w)
        return swiglu(h[:, :32], h[:, 32:]).square().sum()

    torch.compile(block, fullgraph=True)(x, w).backward()
    got = (x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    h = rmsnorm_reference(x, w)
    swiglu_reference(h[:, :32], h[:, 32:]).square().sum().backward()
    torch.testing.assert_close(got, (x.grad, w.grad), rtol=1e-4, atol=1e-5)
