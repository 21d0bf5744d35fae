"""LoRA adapters (peft) on the student: low-rank updates to its linear layers, the base weights frozen.

The adapters are injected into the student's own modules (the Student wrapper and FSDP2 see the same model), only
they train and only they hold optimizer state. A run exports both forms: the adapter as peft writes it
(`adapter/`: adapter_config.json + adapter_model.safetensors, which peft and vLLM's per-request LoRA load) and the
merged model (W + (alpha / r) B A) as a plain checkpoint that transformers, vLLM and llama.cpp load like any other.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

if TYPE_CHECKING:
    from peft import LoraConfig


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rank: int = Field(16, ge=1, le=1024, description="r: the rank of each update")
    alpha: float | None = Field(None, gt=0, description="scale alpha (the update is alpha / r x B A); default 2 x rank")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="layers that get adapters: every linear layer but the LM head, or module names "
                                  "(q_proj, v_proj, ...)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input")

    def peft_config(self) -> LoraConfig:
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha if self.alpha is not None else 2 * self.rank,
                          target_modules=self.target_modules, lora_dropout=self.dropout, bias="none",
                          task_type="CAUSAL_LM")


def add_adapters(lm: nn.Module, settings: LoraSettings) -> nn.Module:
    """Inject fresh adapters into `lm` in place (the base weights frozen); returns the peft wrapper that saves and
    merges them. peft initialises B = 0, so the model starts exactly as the base."""
    from peft import get_peft_model

    return get_peft_model(lm, settings.peft_config())


def trainable_share(lm: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    params = list(lm.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def save_adapter(peft_model: nn.Module, out: Path) -> Path:
    """The adapter alone, as peft writes it (safetensors)."""
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


def merged_copy(peft_model: nn.Module) -> nn.Module:
    """A plain model with the adapters folded into its weights (the training model is left as it is)."""
    return copy.deepcopy(peft_model).merge_and_unload()


@contextmanager
def adapters_disabled(lm: nn.Module) -> Iterator[bool]:
    """The base model's forward inside the block (the preference objective's reference, without a second copy of
    the weights); yields whether `lm` has adapters at all. Sets peft's flag directly: its `enable_adapters(False)`
    also flips requires_grad on the adapters, which must not change under an optimizer (or FSDP2's sharded params)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in lm.modules() if isinstance(m, BaseTunerLayer)]
    before = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield bool(layers)
    finally:
        for m, was in zip(layers, before, strict=True):
            m._disable_adapters = was
