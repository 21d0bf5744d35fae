"""LoRA adapters served per request beside their base model (vLLM's multi-LoRA): a request whose `model` names an
adapter runs the base with that adapter; `/v1/models` lists each adapter with the base as its parent.

`--lora` takes a registry name of a LoRA post-training result (its model directory holds `adapter/`, written by
distill/components/lora.py), a directory holding `adapter/`, or a peft adapter directory itself, optionally as
`NAME=PATH`. Each is checked before the engine starts: peft's safetensors format (no pickled `adapter_model.bin`
unless --allow-pickle), a LoRA (not another peft method), and trained on the served base: the post-training card's
start weights, or peft's `base_model_name_or_path`, must be the served checkpoint's, since an adapter applied to
other weights computes garbage without any error.

On vLLM's CPU backend LoRA turns torch.compile off (platforms/cpu.py sets the compilation mode to NONE when a LoRA
config exists), so every request, base or adapter, runs eager: see README "LoRA adapters" for the measured cost.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from models.registry import ModelSpec

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM 0.32's allowed max_lora_rank values


class AdapterError(ValueError):
    """An adapter that cannot be served with this base; the message names it and the reason."""


@dataclass(frozen=True)
class Adapter:
    name: str  # what requests put in `model`
    path: Path  # the peft adapter directory
    rank: int


def max_lora_rank(adapters: tuple[Adapter, ...]) -> int:
    """The smallest rank vLLM accepts that holds every adapter."""
    need = max(a.rank for a in adapters)
    for rank in VLLM_RANKS:
        if rank >= need:
            return rank
    raise AdapterError(f"LoRA rank {need} is above vLLM's largest ({VLLM_RANKS[-1]})")


def resolve_adapters(base: ModelSpec, given: tuple[str, ...], allow_pickle: bool = False) -> tuple[Adapter, ...]:
    """Each `--lora` value as an Adapter checked against `base`; AdapterError names the first problem."""
    adapters: list[Adapter] = []
    for item in given:
        name, path = _locate(item)
        if not NAME.match(name):
            raise AdapterError(f"--lora {item}: adapter name {name!r} must be letters, digits, '.', '_' or '-'")
        if name == base.name or name in {a.name for a in adapters}:
            raise AdapterError(f"--lora {item}: the name {name!r} is already served; give NAME=PATH")
        adapters.append(Adapter(name, path, _check(item, path, base, allow_pickle)))
    return tuple(adapters)


def _locate(item: str) -> tuple[str, Path]:
    """(name, peft adapter directory) of one --lora value."""
    name, sep, where = item.partition("=")
    if not sep:
        name, where = "", item
    path = Path(where).expanduser()
    if path.exists():
        default = path.parent.name if path.name == "adapter" else path.name
    else:
        from models.registry import UnknownModelError, get_model

        try:
            path, default = get_model(where).checkpoint_dir, where
        except UnknownModelError:
            raise AdapterError(f"--lora {item}: {where} is neither a directory nor a registered model") from None
    if (path / "adapter" / "adapter_config.json").is_file():
        return name or default, path / "adapter"
    if (path / "adapter_config.json").is_file():
        return name or default, path
    raise AdapterError(f"--lora {item}: {path} holds no LoRA adapter (adapter_config.json, or adapter/ as a LoRA "
                       "post-training run writes it)")


def _check(item: str, path: Path, base: ModelSpec, allow_pickle: bool) -> int:
    config = json.loads((path / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"--lora {item}: a {config.get('peft_type')} adapter; only LoRA is served")
    if not (path / "adapter_model.safetensors").is_file():
        if not ((path / "adapter_model.bin").is_file() and allow_pickle):
            raise AdapterError(f"--lora {item}: no adapter_model.safetensors in {path} (a pickled "
                               "adapter_model.bin loads only with --allow-pickle)")
    if not _same_base(path, config, base):
        raise AdapterError(f"--lora {item}: trained on {config.get('base_model_name_or_path')}, not on the served "
                           f"{base.name} ({base.checkpoint_dir}); an adapter only fits the weights it was trained on")
    return int(config.get("r", 8))


def _same_base(path: Path, config: dict, base: ModelSpec) -> bool:
    from models.checkpoint import weights_state

    card = path.parent / "cascade-card.json"
    if card.is_file():  # a post-training run recorded the exact weights it started from
        started = json.loads(card.read_text()).get("start_weights")
        if started is not None:
            return started == weights_state(base.checkpoint_dir)
    named = config.get("base_model_name_or_path")
    return named in (base.name, str(base.checkpoint_dir)) or (
        named is not None and Path(named).expanduser().resolve() == base.checkpoint_dir.resolve())
