"""One home for process facts: rank and world size, barriers, sums across ranks, the device, precision, FSDP2.

Every helper works the same without a process group (one CPU, world size 1), so callers never branch on it.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

Precision = Literal["auto", "float32", "bfloat16"]


def init_distributed() -> None:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPU); nothing for a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """(rank, world size)."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_rank0() -> bool:
    return world()[0] == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(value: object) -> object:
    """Rank 0's `value` on every rank (a path, a decision)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (a copy; the input is left alone)."""
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
    return value


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_precision(precision: Precision, on: torch.device) -> Literal["float32", "bfloat16"]:
    """auto: bfloat16 where the device has native support (CUDA bf16, CPU AVX512-BF16/AMX), else float32."""
    if precision != "auto":
        return precision
    if on.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"


def autocast(precision: Precision, on: torch.device) -> AbstractContextManager:
    """bfloat16 autocast for the transformer blocks, or nothing; losses switch it off for their fp32 math."""
    if resolve_precision(precision, on) == "bfloat16":
        return torch.autocast(on.type, dtype=torch.bfloat16)
    return nullcontext()


def shard(module: nn.Module, lm: nn.Module) -> list[str]:
    """FSDP2 over all ranks: each decoder layer its own unit; an untied input embedding its own unit too, gathered
    only for its lookup and its gradient (as torchtitan shards tok_embeddings: V x d fp32 less on every GPU for the
    rest of the step, 2.7 GB for a 131k x 5120 vocabulary); `module` the root, kept gathered through the step, since
    the losses read its head's weight directly rather than through a module call. Returns the units, for the log."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (dist.get_world_size(),))
    decoder = getattr(lm.model, "language_model", lm.model)  # an audio/vision model's: projector + decoder
    for layer in decoder.layers:
        fully_shard(layer, mesh=mesh)
    units = [f"{len(decoder.layers)} layers"]
    if decoder.embed_tokens.weight is not lm.lm_head.weight:  # a tied one is the head, which stays in the root
        fully_shard(decoder.embed_tokens, mesh=mesh)
        units.append("the embedding")
    fully_shard(module, mesh=mesh, reshard_after_forward=False)
    return [*units, "the root (head, final norm)"]
