"""RMSNorm forward and backward (Llama/Mistral: fp32 statistics, `weight * x / rms(x)`), beside its reference.

A program normalizes several rows, so the grid stays small: a few programs per SM on a GPU, a handful under the
interpreter. The backward writes one partial weight gradient per program and sums them on the host, so no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.runtime import INTERPRET, check_triton_device, empty, empty_like


@triton.jit
def _rmsnorm_fwd_kernel(X, W, Y, RSTD, n_rows, n_cols, sx, sy, eps, rows_per_program, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    for i in range(0, rows_per_program):
        row = pid * rows_per_program + i
        if row < n_rows:
            x = tl.load(X + row * sx + cols, mask=col_ok, other=0.0).to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / n_cols + tl.cast(eps, tl.float32))
            tl.store(Y + row * sy + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=col_ok)
            tl.store(RSTD + row, rstd)


@triton.jit
def _rmsnorm_bwd_kernel(DY, X, W, RSTD, DX, DW_PART, n_rows, n_cols, sdy, sx, sdx, rows_per_program,
                        BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], tl.float32)
    for i in range(0, rows_per_program):
        row = pid * rows_per_program + i
        if row < n_rows:
            x = tl.load(X + row * sx + cols, mask=col_ok, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * sdy + cols, mask=col_ok, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            x_hat = x * rstd
            wdy = w * dy
            dx = rstd * (wdy - x_hat * (tl.sum(x_hat * wdy, 0) / n_cols))
            tl.store(DX + row * sdx + cols, dx.to(DX.dtype.element_ty), mask=col_ok)
            dw += dy * x_hat
    tl.store(DW_PART + pid * n_cols + cols, dw, mask=col_ok)


def _grid(n_rows: int) -> tuple[int, int]:
    programs = min(n_rows, 8 if INTERPRET else 4 * 132)
    per = triton.cdiv(n_rows, max(programs, 1))
    return triton.cdiv(n_rows, per), per


@torch.library.custom_op("cascade::rmsnorm_fwd", mutates_args=())
def rmsnorm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    check_triton_device(x, weight)
    x2 = x.reshape(-1, x.shape[-1])
    y = empty_like(x2)
    rstd = empty((x2.shape[0],), like=x)
    programs, per = _grid(x2.shape[0])
    _rmsnorm_fwd_kernel[(programs,)](x2, weight, y, rstd, x2.shape[0], x2.shape[1], x2.stride(0), y.stride(0), eps,
                                     per, BLOCK_N=triton.next_power_of_2(x2.shape[1]))
    return y.view_as(x), rstd


@rmsnorm_fwd.register_fake
def _(x, weight, eps):
    return torch.empty_like(x), x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32)


@torch.library.custom_op("cascade::rmsnorm_bwd", mutates_args=())
def rmsnorm_bwd(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    check_triton_device(grad_y, x, weight)
    x2 = x.reshape(-1, x.shape[-1])
    dy = grad_y.reshape(-1, x.shape[-1]).contiguous()
    dx = empty_like(x2)
    programs, per = _grid(x2.shape[0])
    dw_part = empty((programs, x2.shape[1]), like=x)
    _rmsnorm_bwd_kernel[(programs,)](dy, x2, weight, rstd, dx, dw_part, x2.shape[0], x2.shape[1], dy.stride(0),
                                     x2.stride(0), dx.stride(0), per, BLOCK_N=triton.next_power_of_2(x2.shape[1]))
    return dx.view_as(x), dw_part.sum(0).to(weight.dtype)


@rmsnorm_bwd.register_fake
def _(grad_y, x, weight, rstd):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _backward(ctx, grad_y, grad_rstd):  # type: ignore[no-untyped-def]
    x, weight, rstd = ctx.saved_tensors
    dx, dw = rmsnorm_bwd(grad_y, x, weight, rstd)
    return dx, dw, None


rmsnorm_fwd.register_autograd(_backward, setup_context=_setup_context)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y = weight * x / sqrt(mean(x^2) + eps) over the last axis; statistics in fp32, output in x's dtype."""
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight {tuple(weight.shape)} does not match the last axis of x {tuple(x.shape)}")
    return rmsnorm_fwd(x.contiguous(), weight.contiguous(), eps)[0]


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                      compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    xc = x.to(compute_dtype)
    return weight.to(compute_dtype) * xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
