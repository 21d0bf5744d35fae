"""Preference pairs for GPO (distill/objectives/preference.py): a prompt, a chosen and a rejected answer, and an
optional soft label `p` = P(chosen is better), rendered by the model's own chat template.

Each JSONL line takes TRL's preference formats, so the same file trains here and in TRL's DPOTrainer:

    {"prompt": [{"role": "user", "content": "..."}], "chosen": [{"role": "assistant", "content": "4"}],
     "rejected": [{"role": "assistant", "content": "5"}], "p": 0.9}      # conversational; "tools" optional
    {"prompt": "What is 2 plus 2?", "chosen": "4", "rejected": "5"}       # plain strings: a one-turn chat

Both answers go through the SFT renderer (distill/chat_data.py: the server's prompt path, the assistant's tokens
found by prefix rendering), so a pair trains on exactly the tokens the served model would write. A pair is one row
of [2, seq_len] ids (chosen, rejected), never packed: the loss is per pair. Pairs whose answers do not fit seq_len
are cut (the answer keeps its first tokens); pairs with nothing left of either answer are dropped and counted.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from distill.chat_data import FilesOrTask, TaskConfig, chat_cache_key, render_conversation, seeded_order, source_files
from distill.data import DataError, jsonl_records
from models.checkpoint import atomic_directory, is_prepared
from models.registry import ModelSpec, cascade_home, get_model
from models.tokenizers import ChatTokenizer, load_tokenizer

log = logging.getLogger(__name__)

PAIR_DATA_VERSION = "pair-data/1"


class PairDataConfig(FilesOrTask):
    format: Literal["pairs"] = Field(description="pairs: preference pairs (prompt, chosen, rejected, optional p)")
    paths: list[str] = Field(default_factory=list, description="JSONL globs, one pair per line (TRL's preference "
                             "format, conversational or plain strings, plus an optional soft label p)")
    task: TaskConfig | None = Field(None, description="generated pairs instead of paths: the task's training split "
                                    "(arithmetic: the right answer chosen over a plausible wrong one)")
    seq_len: int = Field(256, ge=8, le=131072, description="tokens per answer row (prompt + answer); longer ones "
                         "are cut")
    val_pairs: int = Field(16, ge=1, description="pairs held out for evaluation (seeded hash)")
    max_train_pairs: int | None = Field(None, ge=1, description="cap on training pairs")
    template: str | None = Field(None, description="registry name (or checkpoint) whose chat template renders the "
                                 "pairs (default: the student; a post-training recipe sets its model's name)")
    seed: int = 0


def _messages(value: Any, role: str, key: str) -> list[dict]:
    """A record's prompt or answer as messages: a string is one message of `role`."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
        raise DataError(f"'{key}' must be a string or a non-empty list of messages")
    return value


def render_pair(record: dict[str, Any], spec: ModelSpec, tokenizer: ChatTokenizer
                ) -> tuple[list[tuple[list[int], list[bool]]], float]:
    """[(ids, targets) of chosen, of rejected] and the soft label p. Raises DataError naming the problem."""
    if not isinstance(record, dict) or any(k not in record for k in ("prompt", "chosen", "rejected")):
        raise DataError("a pair needs 'prompt', 'chosen' and 'rejected'")
    p = record.get("p", 1.0)
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p <= 1:
        raise DataError(f"'p' must be a number in [0, 1] (the probability that chosen is better), not {p!r}")
    prompt = _messages(record["prompt"], "user", "prompt")
    rows = []
    for key in ("chosen", "rejected"):
        answer = _messages(record[key], "assistant", key)
        if answer[-1].get("role") != "assistant":
            raise DataError(f"'{key}' must end with an assistant message")
        try:
            examples = render_conversation({"messages": prompt + answer, "tools": record.get("tools")}, spec,
                                           tokenizer)
        except DataError as e:
            raise DataError(f"{key}: {e}") from e
        earlier = sum(1 for m in prompt if m.get("role") == "assistant")  # turns that are context, not answer
        if len(examples) == 1:
            rows.append((examples[0].ids, _after_runs(examples[0].targets, earlier)))
        elif len(answer) == 1:  # one example per turn (a template that rewrites history): the last is the answer
            rows.append((examples[-1].ids, examples[-1].targets))
        else:
            raise DataError(f"{key}: this chat template rewrites earlier turns, so an answer of several messages "
                            "cannot be rendered as one sequence; give the answer as one assistant message")
    return rows, float(p)


def _after_runs(targets: list[bool], skip: int) -> list[bool]:
    """`targets` without its first `skip` runs of trained tokens (the prompt's own assistant turns)."""
    out, runs, previous = [], 0, False
    for t in targets:
        runs += t and not previous
        previous = t
        out.append(t and runs > skip)
    return out


def build_pair_tokens(config: PairDataConfig, model: str | Path) -> dict[str, torch.Tensor]:
    """Rows rendered by `model`: {"train", "val"} ids [N, 2, T] (chosen, rejected), "<split>_targets" [N, 2, T] and
    "<split>_p" [N]."""
    spec = get_model(str(model))
    tokenizer = load_tokenizer(spec)
    out = cascade_home() / "data" / chat_cache_key(config, spec, tokenizer, PAIR_DATA_VERSION)
    if is_prepared(out, PAIR_DATA_VERSION):
        return load_file(out / "tokens.safetensors")
    named = []
    for name, path in source_files(config):
        for n, record in tqdm(jsonl_records(path), desc=f"render {path.name}", unit="pair"):
            try:
                named.append((f"{name}:{n}", render_pair(record, spec, tokenizer)))
            except DataError as e:
                raise DataError(f"{path}:{n}: {e}") from e
    if len(named) <= config.val_pairs:
        raise DataError(f"{len(named)} pairs: need more than data.val_pairs ({config.val_pairs}) to train on any")
    named = seeded_order(named, config.seed)
    splits = {"val": named[: config.val_pairs], "train": named[config.val_pairs:][: config.max_train_pairs]}
    shards: dict[str, torch.Tensor] = {}
    stats: dict[str, dict[str, int]] = {}
    for split, pairs in splits.items():
        ids, targets, p, counts = _rows(pairs, config.seq_len, tokenizer.eos_token_id)
        if not len(ids):
            raise DataError(f"no {split} pair keeps an answer token within data.seq_len ({config.seq_len})")
        shards |= {split: ids, f"{split}_targets": targets, f"{split}_p": p}
        stats[split] = counts
    with atomic_directory(out, PAIR_DATA_VERSION) as tmp:
        save_file(shards, tmp / "tokens.safetensors")
        (tmp / "data.json").write_text(json.dumps({"config": config.model_dump(), "model": spec.name, **stats},
                                                  indent=1) + "\n")
    log.info("pair data: %d train pairs, %d val pairs of 2 x %d tokens; %d cut at seq_len, %d dropped (%s)",
             stats["train"]["pairs"], stats["val"]["pairs"], config.seq_len,
             stats["train"]["cut"] + stats["val"]["cut"], stats["train"]["dropped"] + stats["val"]["dropped"], out)
    return shards


def _rows(pairs: list[tuple[str, Any]], seq_len: int, pad_id: int
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, int]]:
    kept = []
    cut = dropped = 0
    for _, (answers, p) in pairs:
        rows = []
        for ids, targets in answers:
            cut += len(ids) > seq_len
            rows.append((ids[:seq_len], targets[:seq_len]))
        if all(any(t[1:]) for _, t in rows):  # position 0 is never predicted
            kept.append((rows, p))
        else:
            dropped += 1
    ids = torch.full((len(kept), 2, seq_len), pad_id, dtype=torch.long)
    targets = torch.zeros((len(kept), 2, seq_len), dtype=torch.bool)
    for i, (rows, _) in enumerate(kept):
        for j, (row_ids, row_targets) in enumerate(rows):
            ids[i, j, : len(row_ids)] = torch.tensor(row_ids)
            targets[i, j, : len(row_targets)] = torch.tensor(row_targets)
    p = torch.tensor([p for _, p in kept], dtype=torch.float32)
    return ids, targets, p, {"pairs": len(kept), "cut": cut, "dropped": dropped}
