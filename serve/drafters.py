"""Drafters for speculative decoding: a cascade student drafts tokens, its teacher verifies them.

A drafter must share its target's tokenizer id for id (speculation compares token ids), which cascade's students do
by construction. Whether drafting pays off depends on the drafter's size and how often the target agrees with it;
`make bench-serve` measures the speed-up per (target, drafter, engine) and records it here, and the server warns at
start when the recorded speed-up is below 1.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from models.checkpoint import write_text_atomic
from models.registry import ModelSpec, all_models, cascade_home
from models.tokenizers import tokenizer_vocab

log = logging.getLogger(__name__)


class DrafterError(ValueError):
    """The drafter cannot draft for this target (the message says why and what to do)."""


def check_drafter(target: ModelSpec, drafter: ModelSpec) -> None:
    """Refuse a drafter whose vocabulary differs from the target's in any id."""
    if drafter.checkpoint_dir.resolve() == target.checkpoint_dir.resolve():
        raise DrafterError(f"--draft-model {drafter.name} is the served model itself; pick a smaller student")
    mine, theirs = tokenizer_vocab(target.checkpoint_dir), tokenizer_vocab(drafter.checkpoint_dir)
    config_vocab = [json.loads((m.checkpoint_dir / "config.json").read_text()).get("vocab_size")
                    for m in (target, drafter)]
    if config_vocab[0] != config_vocab[1]:
        raise DrafterError(f"--draft-model {drafter.name} has a vocabulary of {config_vocab[1]} tokens, "
                           f"{target.name} of {config_vocab[0]}: a drafter must share its target's tokenizer")
    for i, (a, b) in enumerate(zip(mine, theirs, strict=False)):
        if a != b:
            raise DrafterError(f"--draft-model {drafter.name} has another tokenizer than {target.name} (token {i} "
                               f"is {b!r} there, {a!r} here): a drafter must share its target's tokenizer")
    if len(mine) != len(theirs):
        raise DrafterError(f"--draft-model {drafter.name}'s tokenizer has {len(theirs)} tokens, {target.name}'s "
                           f"{len(mine)}: a drafter must share its target's tokenizer")


def drafters_of(target: str) -> list[ModelSpec]:
    """Registered models made to draft for `target` (a cascade recipe's `drafter: true` stages)."""
    return [s for s in all_models().values() if s.draft_for == target]


def _records_path() -> Path:
    return cascade_home() / "bench" / "drafters.json"


def load_speedups() -> dict[str, dict[str, Any]]:
    """The recorded measurements; an unreadable file is as good as none (it only feeds a warning)."""
    path = _records_path()
    try:
        records = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as e:
        log.warning("ignoring %s: %s", path, e)
        return {}
    if not isinstance(records, dict):
        return {}
    return {k: v for k, v in records.items() if isinstance(v, dict) and isinstance(v.get("speedup"), (int, float))
            and isinstance(v.get("acceptance_rate"), (int, float)) and isinstance(v.get("measured"), str)}


def _key(target: str, drafter: str, engine: str, num_draft_tokens: int) -> str:
    return f"{target}|{drafter}|{engine}|k={num_draft_tokens}"


def record_speedup(target: str, drafter: str, engine: str, num_draft_tokens: int, speedup: float,
                   acceptance: float) -> None:
    """Written by the benchmark: one entry per (target, drafter, engine, drafted tokens), the latest measurement."""
    records = load_speedups()
    records[_key(target, drafter, engine, num_draft_tokens)] = {
        "speedup": round(speedup, 3), "acceptance_rate": round(acceptance, 3),
        "measured": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}
    write_text_atomic(_records_path(), json.dumps(records, indent=1, sort_keys=True) + "\n")


def warn_if_slower(target: str, drafter: str, engine: str, num_draft_tokens: int) -> None:
    """Nothing is refused that works; a drafter measured to slow its target down gets a warning."""
    entry = load_speedups().get(_key(target, drafter, engine, num_draft_tokens))
    if entry is None:
        log.info("drafter %s for %s on %s (%d tokens) has no measured speed-up yet (make bench-serve measures it)",
                 drafter, target, engine, num_draft_tokens)
    elif entry["speedup"] < 1.0:
        log.warning("drafter %s made %s on %s %.2fx as fast with %d drafted tokens (acceptance %.0f%%, measured "
                    "%s): serving without it is faster", drafter, target, engine, entry["speedup"], num_draft_tokens,
                    100 * entry["acceptance_rate"], entry["measured"])
    else:
        log.info("drafter %s: measured speed-up %.2fx on %s with %d drafted tokens (acceptance %.0f%%, %s)", drafter,
                 entry["speedup"], engine, num_draft_tokens, 100 * entry["acceptance_rate"], entry["measured"])
