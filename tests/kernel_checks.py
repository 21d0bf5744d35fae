"""Shared checks for the kernel tests: FlashAttention's error rule, fresh seeds, the device the kernels run on."""

from __future__ import annotations

import random

import torch

from kernels.runtime import INTERPRET

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")
# Under the interpreter bf16 arithmetic is wrong (kernels upcast, but stores truncate): CPU tests fp32 and fp16.
DTYPES = [torch.float32, torch.float16] if DEVICE.type == "cpu" else [torch.float32, torch.float16, torch.bfloat16]


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def fresh_seed() -> int:
    """A new seed per test (fresh inputs every run), returned so a failure names it."""
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    return seed


def run_with_grads(fn, inputs, grad_out: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(fn's output, gradients of its inputs for `grad_out`) on fresh leaf copies (values only, not strides)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_within_2x(name: str, kernel: torch.Tensor, same_precision: torch.Tensor, exact: torch.Tensor,
                     seed: int, atol: float = 1e-5) -> None:
    """FlashAttention's rule: the kernel's error against float64 is at most twice that of the plain torch
    computation in the kernel's precision (plus `atol`, the floor where both are at rounding level)."""
    assert not torch.isnan(kernel).any(), f"{name}: NaN in the kernel's output (seed {seed})"
    err, base = max_err(kernel, exact), max_err(same_precision, exact)
    assert err <= 2 * base + atol, f"{name}: error {err:.3g} > 2 x torch's {base:.3g} + {atol:g} (seed {seed})"
