"""Offline teacher: its top-k log-probs plus a tail bucket for every training token, computed once and reused.

Made by the teacher checkpoint run here (`local_topk`) or by a teacher served apart (distill/served_teacher.py,
`train.teacher_server`). Keyed on the teacher (checkpoint, or served URL and model), the token shards, k, the
temperature and the shared vocabulary, and stored under $CASCADE_HOME/teacher-cache/<key>; a later run (a resumed
one, a baseline, another seed) computes only the rows it lacks. At k=64 a token costs 516 bytes (int32 ids, fp32
log-probs, the tail), against 4 x vocab bytes for full logits (196 KB for SmolLM2's 49,152).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from distill.losses import topk_with_tail
from distill.model_io import load_model
from models.checkpoint import atomic_directory
from models.registry import cascade_home

log = logging.getLogger(__name__)
CACHE_VERSION = "teacher-cache/1"
CACHE_FILE = "topk.safetensors"
# rows [B, T] -> ([B, T-1, k] int32 ids, [B, T-1, k] fp32 log-probs, [B, T-1] fp32 tail log-prob)
TopK = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def bytes_per_token(k: int) -> int:
    """What the cache stores for one token: k int32 ids, k fp32 log-probs and the tail's fp32 log-prob."""
    return k * 8 + 4


def checkpoint_identity(teacher: Path) -> dict[str, object]:
    """A local teacher is its path and its weight files' names, sizes and times (a rewritten file is a new key)."""
    weights = sorted(teacher.glob("*.safetensors"))
    return {"teacher": str(teacher.resolve()),
            "weights": [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights]}


def cache_dir(teacher: dict[str, object], data_key: str, k: int, temperature: float, vocab: int) -> Path:
    """`teacher`: checkpoint_identity(path), or a served teacher's (distill/served_teacher.py::served_identity)."""
    identity = {**teacher, "data": data_key, "k": k, "temperature": temperature, "vocab": vocab,
                "version": CACHE_VERSION}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return cascade_home() / "teacher-cache" / digest


class TeacherCache:
    """Rows of the training shard -> (top-k ids, top-k log-probs, tail log-prob) for each predicted position."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        path = folder / CACHE_FILE
        self.tensors = load_file(path) if path.is_file() else {}
        rows = self.tensors.get("rows", torch.zeros(0, dtype=torch.long)).tolist()
        self.position = {row: i for i, row in enumerate(rows)}

    def missing(self, rows: list[int]) -> list[int]:
        return [r for r in rows if r not in self.position]

    def lookup(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flattened over (row, position): [B*T, k] ids, [B*T, k] log-probs, [B*T] tail log-probs."""
        at = torch.tensor([self.position[int(r)] for r in rows])
        idx, logp, tail = (self.tensors[name][at] for name in ("indices", "logprobs", "tail"))
        return idx.flatten(0, 1), logp.flatten(0, 1), tail.flatten(0, 1)


def local_topk(teacher: Path, k: int, temperature: float, vocab: int,
               autocast_dtype: torch.dtype | None = None) -> TopK:
    """The teacher checkpoint run here: its logits over the shared vocabulary at `temperature`."""
    model = load_model(teacher).eval()

    @torch.no_grad()
    def topk(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
        logits = hidden.float() @ model.lm_head.weight.float()[:vocab].T
        idx, top, tail = topk_with_tail(torch.log_softmax(logits / temperature, dim=-1), k)
        return idx.int(), top, tail

    return topk


def ensure_cache(folder: Path, train_rows: torch.Tensor, needed: list[int], source: Callable[[], TopK],
                 about: dict[str, object], batch_size: int = 8, progress: bool = True) -> TeacherCache:
    """Compute the top-k for the rows in `needed` that the cache in `folder` lacks; return the cache. `source()`
    makes the teacher (loaded or connected only when rows are missing); `about` goes into cache.json."""
    cache = TeacherCache(folder)
    missing = sorted(set(cache.missing(needed)))
    if not missing:
        log.info("teacher cache %s holds all %d rows", folder, len(needed))
        return cache
    topk = source()
    parts: dict[str, list[torch.Tensor]] = {"indices": [], "logprobs": [], "tail": []}
    for start in tqdm(range(0, len(missing), batch_size), desc="teacher top-k", unit="batch", disable=not progress):
        idx, top, tail = topk(train_rows[missing[start:start + batch_size]])
        parts["indices"].append(idx)
        parts["logprobs"].append(top)
        parts["tail"].append(tail)
    merged = {name: torch.cat([cache.tensors[name], *chunks]) if cache.tensors else torch.cat(chunks)
              for name, chunks in parts.items()}
    merged["rows"] = torch.cat([cache.tensors["rows"], torch.tensor(missing)]) if cache.tensors else torch.tensor(
        missing)
    k = merged["indices"].shape[-1]
    with atomic_directory(folder, CACHE_VERSION) as tmp:
        save_file({name: t.contiguous() for name, t in merged.items()}, tmp / CACHE_FILE)
        (tmp / "cache.json").write_text(json.dumps({
            **about, "k": k, "rows": len(merged["rows"]), "bytes_per_token": bytes_per_token(k),
        }, indent=1) + "\n")
    log.info("teacher cache %s: +%d rows (%d total)", folder, len(missing), len(merged["rows"]))
    return TeacherCache(folder)
