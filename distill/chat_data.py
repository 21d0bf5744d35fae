"""Chat data for supervised fine-tuning: JSONL conversations rendered by the model's own template, trained on the
assistant's tokens only.

Each line holds OpenAI `messages` (system/user/assistant/tool, tool calls, an assistant's `reasoning` or
`reasoning_content`) and optional `tools`. They are rendered exactly as the server renders a prompt
(serve/chat.py `template_inputs`: tools as text for templates without tool support, Mistral call ids), so a model
trains on the format it is served in. The assistant's tokens are found by rendering each prefix of the conversation:
the tokens between "conversation so far + the assistant's opening" and "conversation through this answer" are that
answer (its end-of-turn token included, so the model learns to stop). Templates that rewrite earlier turns (some drop
old reasoning) break the prefix property; such a conversation becomes one example per assistant turn instead.

Packing puts whole conversations into rows (first fit, never split); position ids restart at each conversation, from
which transformers builds a block-diagonal causal mask, so packed conversations never attend to each other. Cached
under $CASCADE_HOME/data/<key> like the text data (distill/data.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from distill.data import DataError, jsonl_records, matching_files, tokenizer_digest
from models.checkpoint import atomic_directory, is_prepared
from models.registry import ModelSpec, cascade_home, get_model
from models.tokenizers import ChatTemplateError, ChatTokenizer, load_tokenizer

log = logging.getLogger(__name__)

CHAT_DATA_VERSION = "chat-data/1"


class TaskConfig(BaseModel):
    """Conversations generated here instead of read from files (distill/arithmetic.py)."""
    model_config = ConfigDict(extra="forbid")
    name: Literal["arithmetic"]
    digits: int = Field(1, ge=1, le=3)
    seed: int = Field(0, description="which operand pairs are held out (the held-out ones never train)")

    def folder(self) -> Path:
        return cascade_home() / "tasks" / f"{self.name}-{self.digits}digit-seed{self.seed}"

    def train_file(self, kind: Literal["sft", "prefer"] = "sft") -> Path:
        """The training split as conversations (sft) or preference pairs (prefer), written on first use."""
        from distill.arithmetic import write_task

        path = self.folder() / f"{kind}-train.jsonl"
        if not path.is_file():
            write_task(self.folder(), self.digits, self.seed)
        return path


class ChatDataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["chat"] = Field(description="chat: conversations trained on the assistant's tokens only")
    paths: list[str] = Field(default_factory=list, description="JSONL globs, one conversation per line: "
                             '{"messages": [...], "tools": [...]} (tools optional)')
    task: TaskConfig | None = Field(None, description="generated conversations instead of paths: the task's "
                                    "training split")
    seq_len: int = Field(512, ge=8, le=131072, description="tokens per row; longer conversations are cut")
    val_conversations: int = Field(16, ge=1, description="conversations held out for evaluation (seeded hash)")
    packing: bool = Field(True, description="whole conversations share rows (block-diagonal attention); false: one "
                          "conversation per row, padded")
    max_train_tokens: int | None = Field(None, ge=1, description="cap on training rows x seq_len")
    template: str | None = Field(None, description="registry name (or checkpoint) whose chat template and tool/"
                                 "reasoning formats render the data: the model as it is served (default: the "
                                 "student; a post-training recipe sets its model's name)")
    seed: int = 0

    @model_validator(mode="after")
    def _source(self) -> ChatDataConfig:
        if bool(self.paths) == (self.task is not None):
            raise ValueError("give paths (JSONL files) or a task, one of them")
        return self


@dataclass
class Example:
    """One training example: token ids and which of them are trained on (the assistant's)."""
    ids: list[int]
    targets: list[bool]


def _renders_reasoning(spec: ModelSpec, tokenizer: ChatTokenizer) -> bool:
    """Whether the template itself writes an assistant's reasoning (else it would silently drop it)."""
    if spec.reasoning_format is None:
        return False
    return spec.chat_format == "mistral" or "reasoning_content" in (tokenizer.info().get("chat_template") or "")


def _inline_reasoning(message: Any, spec: ModelSpec, native: bool) -> Any:
    """An assistant's reasoning written into its content between the model's thinking markers (`<think>` tags
    for models without a reasoning format), for templates that do not render it themselves."""
    from serve.formats import REASONING_FORMATS

    if native or not isinstance(message, dict) or message.get("role") != "assistant":
        return message
    reasoning = message.get("reasoning", message.get("reasoning_content"))
    if not isinstance(reasoning, str) or not reasoning:
        return message
    markers = REASONING_FORMATS[spec.reasoning_format or "think-tags"]
    thought = f"{markers.start}\n{reasoning}\n{markers.end}\n\n"
    content = message.get("content")
    if isinstance(content, list):
        content = [{"type": "text", "text": thought}, *content]
    else:
        content = thought + (content if isinstance(content, str) else "")
    rest = {k: v for k, v in message.items() if k not in ("reasoning", "reasoning_content")}
    return rest | {"content": content}


def render_conversation(record: dict[str, Any], spec: ModelSpec, tokenizer: ChatTokenizer) -> list[Example]:
    """A record as training examples: one, or one per assistant turn when the template rewrites earlier turns.
    Raises DataError naming the problem."""
    from serve.chat import template_inputs
    from serve.protocol import ChatCompletionRequest

    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError("a record needs a non-empty 'messages' list")
    if not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
        raise DataError("the conversation must end with an assistant message (the last answer is what trains)")
    native = _renders_reasoning(spec, tokenizer)
    try:
        request = ChatCompletionRequest.model_validate({
            "model": spec.name, "messages": [_inline_reasoning(m, spec, native) for m in messages],
            **({"tools": record["tools"]} if record.get("tools") else {})})
    except ValidationError as e:
        err = e.errors()[0]
        raise DataError(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from e
    try:
        rendered, tools, kwargs = template_inputs(spec, tokenizer, request)
        full = tokenizer.encode_conversation(rendered, tools, kwargs)
        turns: list[tuple[list[int], list[int]]] = []  # (prompt ids, prompt + answer ids) per assistant turn
        for i, message in enumerate(rendered):
            if message["role"] == "assistant":
                prompt = tokenizer.encode_chat(rendered[:i], tools, kwargs)
                answered = tokenizer.encode_conversation(rendered[: i + 1], tools, kwargs)
                if answered[: len(prompt)] != prompt:
                    raise DataError(f"the chat template does not render assistant message {i} after its prompt "
                                    "(its tokens cannot be told apart)")
                turns.append((prompt, answered))
    except ChatTemplateError as e:
        raise DataError(f"chat template: {e}") from e
    if all(full[: len(answered)] == answered for _, answered in turns):
        targets = [False] * len(full)
        for prompt, answered in turns:
            targets[len(prompt): len(answered)] = [True] * (len(answered) - len(prompt))
        return [Example(full, targets)]
    return [Example(answered, [False] * len(prompt) + [True] * (len(answered) - len(prompt)))
            for prompt, answered in turns]


def source_files(config: Any) -> list[tuple[str, Path]]:
    """(name, path) of a chat or pairs config's files: its task's training split, or what its globs match."""
    if config.task is not None:
        path = config.task.train_file("prefer" if config.format == "pairs" else "sft")
        return [(path.name, path)]
    return matching_files([os.path.expanduser(pattern) for pattern in config.paths])


def chat_cache_key(config: Any, spec: ModelSpec, tokenizer: ChatTokenizer, version: str = CHAT_DATA_VERSION
                   ) -> str:
    """Everything the rows of a chat or pairs config depend on: the files, the vocabulary, and how the model
    renders a chat (its template and formats: two models sharing a tokenizer.json may render differently)."""
    files = [(str(p), (st := p.stat()).st_size, st.st_mtime_ns) for _, p in source_files(config)]
    rendering = {"chat_format": spec.chat_format, "tool_format": spec.tool_format,
                 "reasoning_format": spec.reasoning_format, "template": tokenizer.info().get("chat_template")}
    payload = json.dumps({"config": config.model_dump(), "tokenizer": tokenizer_digest(spec.checkpoint_dir),
                          "rendering": rendering, "files": files, "python": sys.version_info[:2],
                          "version": version}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def pack(examples: list[Example], seq_len: int, pad_id: int, packing: bool
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, int]]:
    """(ids, targets, positions) rows [n, seq_len] and counts. First fit: each example goes whole into the first
    row with room (packing) or its own row; one longer than a row is cut to it. Padding is never a target."""
    rows: list[list[Example]] = []
    free: list[int] = []
    cut = dropped = 0
    for ex in examples:
        if len(ex.ids) > seq_len:
            ex, cut = Example(ex.ids[:seq_len], ex.targets[:seq_len]), cut + 1
        if not any(ex.targets[1:]):  # position 0 is never predicted: nothing left to train on
            dropped += 1
            continue
        slot = next((r for r, room in enumerate(free) if room >= len(ex.ids)), None) if packing else None
        if slot is None:
            rows.append([])
            free.append(seq_len)
            slot = len(rows) - 1
        rows[slot].append(ex)
        free[slot] -= len(ex.ids)
    ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.int32)
    targets = torch.zeros((len(rows), seq_len), dtype=torch.bool)
    positions = torch.zeros((len(rows), seq_len), dtype=torch.int32)
    for r, row in enumerate(rows):
        at = 0
        for ex in row:
            n = len(ex.ids)
            ids[r, at: at + n] = torch.tensor(ex.ids, dtype=torch.int32)
            targets[r, at: at + n] = torch.tensor(ex.targets)
            positions[r, at: at + n] = torch.arange(n, dtype=torch.int32)  # restarts: a new sequence begins
            at += n
        positions[r, at:] = torch.arange(seq_len - at, dtype=torch.int32)  # the padding is a sequence of its own
    return ids, targets, positions, {"examples": len(examples), "cut": cut, "dropped_no_target": dropped}


def build_chat_tokens(config: ChatDataConfig, model: str | Path) -> dict[str, torch.Tensor]:
    """Rows rendered by `model` (registry name or checkpoint): {"train", "val"} ids, {"train_targets",
    "val_targets"} and {"train_positions", "val_positions"}."""
    spec = get_model(str(model))
    tokenizer = load_tokenizer(spec)
    out = cascade_home() / "data" / chat_cache_key(config, spec, tokenizer)
    if is_prepared(out, CHAT_DATA_VERSION):
        return _widen(load_file(out / "tokens.safetensors"))
    named: list[tuple[str, list[Example]]] = []
    for name, path in source_files(config):
        for n, record in tqdm(jsonl_records(path), desc=f"render {path.name}", unit="conversation"):
            try:
                named.append((f"{name}:{n}", render_conversation(record, spec, tokenizer)))
            except DataError as e:
                raise DataError(f"{path}:{n}: {e}") from e
    if len(named) <= config.val_conversations:
        raise DataError(f"{len(named)} conversations: need more than data.val_conversations "
                        f"({config.val_conversations}) to train on anything")
    named = seeded_order(named, config.seed)
    val = [ex for _, exs in named[: config.val_conversations] for ex in exs]
    train = [ex for _, exs in named[config.val_conversations:] for ex in exs]
    shards: dict[str, torch.Tensor] = {}
    stats = {}
    for split, examples in (("train", train), ("val", val)):
        ids, targets, positions, counts = pack(examples, config.seq_len, tokenizer.eos_token_id, config.packing)
        if split == "train" and config.max_train_tokens is not None:
            keep = max(1, config.max_train_tokens // config.seq_len)
            ids, targets, positions = ids[:keep], targets[:keep], positions[:keep]
        if not len(ids):
            raise DataError(f"no {split} conversation has an assistant token within data.seq_len ({config.seq_len})")
        shards |= {split: ids, f"{split}_targets": targets, f"{split}_positions": positions}
        stats[split] = counts | {"rows": len(ids), "target_tokens": int(targets[:, 1:].sum())}
    with atomic_directory(out, CHAT_DATA_VERSION) as tmp:
        save_file(shards, tmp / "tokens.safetensors")
        (tmp / "data.json").write_text(json.dumps({"config": config.model_dump(), "model": spec.name,
                                                   "conversations": len(named), **stats}, indent=1) + "\n")
    log.info("chat data: %d conversations -> %d train rows (%d assistant tokens), %d val rows of %d tokens; "
             "%d cut at seq_len (%s)", len(named), stats["train"]["rows"], stats["train"]["target_tokens"],
             stats["val"]["rows"], config.seq_len, stats["train"]["cut"] + stats["val"]["cut"], out)
    return _widen(shards)


def seeded_order(named: list[tuple[str, Any]], seed: int) -> list[tuple[str, Any]]:
    """Records in the order of a seeded hash of their names (file:line): the held-out split is the first ones,
    the same wherever the files live."""
    return sorted(named, key=lambda item: hashlib.sha256(f"{seed}:{item[0]}".encode()).hexdigest())


def _widen(shards: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v if v.dtype == torch.bool else v.long() for k, v in shards.items()}
