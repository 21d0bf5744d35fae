"""Load and save the decoder checkpoints that distillation reads and writes (safetensors only)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from models.checkpoint import atomic_directory, check_checkpoint
from models.tokenizers import tokenizer_vocab

StateDict = dict[str, torch.Tensor]

# Files that describe the tokenizer and chat format; a child checkpoint copies them from its parent unchanged.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "tekken.json",
    "tokenizer.model", "generation_config.json",
)
SUPPORTED_TYPES = ("llama", "mistral", "ministral3", "qwen2", "voxtral", "mistral3")  # the last two: with media


class UnsupportedModelError(ValueError):
    pass


def load_config(path: Path, weights: bool = True) -> PretrainedConfig:
    """The checkpoint's config (`weights=False`: a config-only entry, enough to plan a cascade)."""
    config = AutoConfig.from_pretrained(check_checkpoint(path) if weights else path)
    if config.model_type not in SUPPORTED_TYPES:
        raise UnsupportedModelError(
            f"{path}: model_type {config.model_type!r} is not a supported decoder ({', '.join(SUPPORTED_TYPES)})"
        )
    return config


def decoder_config(config: PretrainedConfig) -> PretrainedConfig:
    """The config of what the cascade prunes: the decoder (an audio/vision model's text_config)."""
    return getattr(config, "text_config", None) or config


def load_model(path: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The causal LM; for an audio or vision model its projector and decoder (distill/media_lm.py), which take
    the frozen encoder's features as `media`."""
    config = load_config(path)  # refuses unsupported architectures before reading weights
    if config.model_type in ("voxtral", "mistral3"):
        from distill.media_lm import MediaLM, load_full

        return MediaLM(load_full(check_checkpoint(path), dtype))  # type: ignore[return-value]
    model = AutoModelForCausalLM.from_pretrained(check_checkpoint(path), dtype=dtype)
    model.config.use_cache = False
    return model


def model_from_state(config: PretrainedConfig, state: StateDict, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Build a model for `config` and load `state` strictly (the tied head may be absent from `state`)."""
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"state does not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.config.use_cache = False
    return model


def plain_state(model: PreTrainedModel) -> StateDict:
    """Detached copy of the weights, without the tied head (it is the embedding)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def check_same_tokenizer(student: Path, teacher: Path, vocab: int) -> None:
    """Distillation compares distributions id by id: the two tokenizers must agree on every shared id."""
    from distill.losses import VocabMismatchError

    a, b = tokenizer_vocab(student)[:vocab], tokenizer_vocab(teacher)[:vocab]
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            raise VocabMismatchError(f"student and teacher tokenizers differ: id {i} is {x!r} in {student} but {y!r} "
                                     f"in {teacher}; distillation on logits needs the same tokenizer")


def copy_tokenizer(source: Path, dest: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)


def save_model(model: PreTrainedModel, out: Path, tokenizer_from: Path, extra_files: dict[str, str] | None = None,
               recipe: str = "distill", also: Callable[[Path], object] | None = None) -> Path:
    """Write config + safetensors + the parent's tokenizer files into `out`, atomically (`also` writes more into
    the directory before it appears, e.g. a LoRA adapter)."""
    with atomic_directory(out, recipe) as tmp:
        if hasattr(model, "full_model"):  # an audio/vision model: the whole checkpoint, HF and Mistral-native files
            model.save(tmp)  # type: ignore[operator]
        else:
            model.config.use_cache = True
            model.save_pretrained(tmp, safe_serialization=True)
            model.config.use_cache = False
        copy_tokenizer(tokenizer_from, tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if also is not None:
            also(tmp)
    return out
