"""Checkpoint directories on disk: written atomically, read as safetensors only unless told otherwise."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
COMPLETE_MARKER = ".cascade-complete"


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds pickle files (which can run code when loaded) and no safetensors."""


class MissingCheckpointError(FileNotFoundError):
    pass


@contextlib.contextmanager
def atomic_directory(final: Path, recipe: str = "ok") -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to `final` only if the block finishes.

    An interrupted write leaves at most a `.tmp-*` directory behind, never a half-written `final`. The marker file
    records `recipe`, so a changed preparation recipe rebuilds instead of trusting an old directory.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a model directory is meant to be shared
    try:
        yield tmp
        (tmp / COMPLETE_MARKER).write_text(recipe + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def is_prepared(path: Path, recipe: str) -> bool:
    marker = path / COMPLETE_MARKER
    return marker.is_file() and marker.read_text().strip() == recipe


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file() or (
        (path / "config.json").is_file() and any(path.glob("*.safetensors"))
    )


def check_checkpoint(path: Path, allow_pickle: bool = False) -> Path:
    """Refuse to hand a checkpoint to a loader unless its weights are safetensors.

    Pickle weights (`.bin`, `.pt`, ...) execute arbitrary code on load; they pass only with `allow_pickle`.
    """
    if not (path / "config.json").is_file():
        raise MissingCheckpointError(f"{path} is not a checkpoint directory (no config.json)")
    if any(path.glob("*.safetensors")):
        return path
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not allow_pickle:
        raise UnsafeCheckpointError(
            f"{path} holds only pickle weights ({', '.join(pickles)}); refusing to load them. "
            "Convert to safetensors, or pass allow_pickle=True (--allow-pickle) if you trust the source."
        )
    if not pickles:
        raise MissingCheckpointError(f"{path} has no weights (*.safetensors)")
    return path


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files, each weight once: an audio/vision checkpoint holds them twice (HF files,
    and Mistral's native consolidated.safetensors for vLLM)."""
    return sorted(f for f in path.glob("*.safetensors") if f.name != "consolidated.safetensors")


def count_parameters(path: Path) -> int:
    """Parameters stored in a checkpoint's safetensors files, from their headers (no weights are read).
    Tied embeddings are stored once, so they count once, as in `sum(p.numel() for p in model.parameters())`."""
    import math

    from safetensors import safe_open

    total = 0
    for file in weight_files(path):
        with safe_open(str(file), framework="np") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total


def write_text_atomic(path: Path, text: str) -> Path:
    """Write a file through a temporary sibling and a rename: readers see the old file or the new, never half."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8") as f:
        f.write(text)
    os.chmod(f.name, 0o644)  # mkstemp makes it private; reports and data are meant to be read by others
    os.replace(f.name, path)
    return path


def weights_state(model_dir: Path) -> list[list[str | int]]:
    """A checkpoint's weight files by name, size and modification time: retraining or replacing it changes them."""
    return [[f.name, (st := f.stat()).st_size, st.st_mtime_ns] for f in sorted(model_dir.glob("*.safetensors"))]
