"""The two models a run holds: the student being trained (the FSDP2 root, so its head is gathered for whatever loss
its hidden states feed) and frozen teachers (eval mode, no grad, no optimizer state)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from distill.common import shard, world
from distill.losses import shared_vocab
from distill.model_io import check_same_tokenizer, load_model

# (final hidden states [B, T-1, d], LM head [V, d], input ids [B, T], objective-specific inputs) -> what it returns
HeadLoss = Callable[..., object]


class Student(nn.Module):
    """The student LM whose forward also runs the objective's loss on its head, inside the same FSDP2 unit."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor, head_loss: HeadLoss | None = None, positions: torch.Tensor | None = None,
                media: torch.Tensor | None = None, **inputs: object):
        """`head_loss(hidden, head, ids, **inputs)` for training; without one, fp32 logits [B, T-1, V]. `positions`
        [B, T] restart at each packed sequence (transformers then keeps attention within each); `media` are the
        encoder features of an audio/vision model's placeholders (distill/media_lm.py)."""
        hidden = decoder_hidden(self.lm, ids, positions, media)
        if head_loss is None:
            with torch.autocast(ids.device.type, enabled=False):
                return hidden.float() @ self.lm.lm_head.weight.float().T
        return head_loss(hidden, self.lm.lm_head.weight, ids, **inputs)


def decoder_hidden(lm: nn.Module, ids: torch.Tensor, positions: torch.Tensor | None,
                   media: torch.Tensor | None) -> torch.Tensor:
    """Final hidden states [B, T-1, d] at the positions that predict a next token."""
    extra = {"media": media} if media is not None else {}
    return lm.model(input_ids=ids, position_ids=positions, **extra).last_hidden_state[:, :-1]


class Teacher(nn.Module):
    """A frozen teacher that returns final hidden states and its head; logits are made chunk by chunk later."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor | None = None, media: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return decoder_hidden(self.lm, ids, positions, media), self.lm.lm_head.weight.detach()

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, positions: torch.Tensor | None = None, media: torch.Tensor | None = None
               ) -> torch.Tensor:
        hidden, head = self(ids, positions, media)
        with torch.autocast(ids.device.type, enabled=False):
            return hidden.float() @ head.float().T


def set_attention(model: nn.Module, attention: Literal["sdpa", "cascade"], on: torch.device) -> nn.Module:
    """sdpa (torch), or our Triton attention (kernels/hf.py) registered as a transformers implementation."""
    if attention == "cascade":
        from kernels.hf import register
        from kernels.runtime import INTERPRET

        if on.type != "cuda" and not INTERPRET:
            raise ValueError("attention: cascade needs a CUDA GPU (or TRITON_INTERPRET=1 on CPU); use sdpa here")
        model.set_attn_implementation(register())
    return model


def load_teacher(path: Path, student: Path, student_vocab: int, attention: Literal["sdpa", "cascade"],
                 on: torch.device, dtype: Literal["float32", "bfloat16"] = "float32") -> Teacher:
    """A frozen teacher on `on` in `dtype`, checked to share the student's tokenizer, sharded when ranks exist."""
    teacher = Teacher(set_attention(load_model(path).to(on, getattr(torch, dtype)), attention, on))
    check_same_tokenizer(student, path, shared_vocab(student_vocab, teacher.lm.config.vocab_size))
    if world()[1] > 1:
        shard(teacher, teacher.lm)
    return teacher


def reinitialise(model: nn.Module, seed: int) -> None:
    """Fresh weights for the from-scratch baseline, the model's own initialisation."""
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters") and module is not model:
            module.reset_parameters()
    model.apply(model._init_weights)
