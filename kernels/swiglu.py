"""SwiGLU, `silu(gate) * up`, forward and backward in one elementwise pass each, beside its reference."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.runtime import INTERPRET, check_triton_device, empty_like


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(G + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=ok, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_bwd_kernel(DY, G, U, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    dy = tl.load(DY + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=ok, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(DG + offs, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=ok)
    tl.store(DU + offs, (dy * silu).to(DU.dtype.element_ty), mask=ok)


def _block() -> int:
    return 16384 if INTERPRET else 1024


@torch.library.custom_op("cascade::swiglu", mutates_args=())
def swiglu_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    check_triton_device(gate, up)
    gate, up = gate.contiguous(), up.contiguous()
    y = empty_like(gate)
    _swiglu_fwd_kernel[(triton.cdiv(gate.numel(), _block()),)](gate, up, y, gate.numel(), BLOCK=_block())
    return y


@swiglu_op.register_fake
def _(gate, up):
    return torch.empty_like(gate)


@torch.library.custom_op("cascade::swiglu_bwd", mutates_args=())
def swiglu_bwd(grad_y: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_triton_device(grad_y, gate, up)
    grad_y, gate, up = grad_y.contiguous(), gate.contiguous(), up.contiguous()
    dg, du = empty_like(gate), empty_like(up)
    _swiglu_bwd_kernel[(triton.cdiv(gate.numel(), _block()),)](grad_y, gate, up, dg, du, gate.numel(),
                                                               BLOCK=_block())
    return dg, du


@swiglu_bwd.register_fake
def _(grad_y, gate, up):
    return torch.empty_like(gate), torch.empty_like(up)


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_y):  # type: ignore[no-untyped-def]
    return swiglu_bwd(grad_y, *ctx.saved_tensors)


swiglu_op.register_autograd(_backward, setup_context=_setup_context)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise; math in fp32, output in gate's dtype."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} must match")
    return swiglu_op(gate, up)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor, compute_dtype: torch.dtype = torch.float32
                     ) -> torch.Tensor:
    return torch.nn.functional.silu(gate.to(compute_dtype)) * up.to(compute_dtype)
