"""Where the Triton kernels may run: CUDA tensors, or CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`).

The interpreter is chosen when a kernel module is imported (the `@triton.jit` decorator reads the variable), so
set it before importing `kernels.*`. It simulates programs one at a time with numpy and gets bf16 arithmetic wrong,
so every kernel upcasts tiles to fp32 right after loading when `INTERPRET` is set.
"""

from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


class KernelDeviceError(RuntimeError):
    pass


def check_triton_device(*tensors: torch.Tensor) -> None:
    """Refuse, with the reason, tensors that a Triton kernel cannot read here."""
    for t in tensors:
        if t.is_cuda:
            continue
        if t.device.type == "cpu" and INTERPRET:
            continue
        raise KernelDeviceError(
            f"cascade kernels run on CUDA tensors, or on CPU with TRITON_INTERPRET=1 set before import; got {t.device}"
        )


def _poisoned(out: torch.Tensor) -> torch.Tensor:
    """Under CASCADE_KERNEL_POISON=1 (tests) a new kernel output starts as NaN: a row the kernel forgot to write
    then fails its test instead of passing on stale memory that happens to look right."""
    return out.fill_(float("nan")) if os.environ.get("CASCADE_KERNEL_POISON") == "1" else out


def empty_like(t: torch.Tensor, **kwargs) -> torch.Tensor:
    """A kernel output shaped (and strided) like `t`."""
    return _poisoned(torch.empty_like(t, **kwargs))


def empty(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A kernel output of `shape` on `like`'s device."""
    return _poisoned(torch.empty(shape, device=like.device, dtype=dtype))
