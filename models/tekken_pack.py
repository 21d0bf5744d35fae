"""A GPT-2-style byte-level BPE tokenizer (SmolLM2's) re-packed as a Mistral Tekken file, losslessly.

Mistral's audio and vision paths (mistral_common's placeholders, vLLM's `tokenizer_mode=mistral`) need a Tekken
tokenizer. Tekken is tiktoken-style BPE: ranks 0-255 are the 256 bytes in byte order, then each merged token at the
rank of its merge, so a SmolLM2 merge list in order becomes a rank table and the same pre-tokenizer regex (GPT-2's)
gives the same pieces (measured: identical ids after the id map, shared/notes/multimodal.md §3). Control tokens are
Mistral's (`[INST]`, `[AUDIO]`, ...) at their Tekken ids; the model's embedding rows move with the id map
(`id_map`), new rows (bytes SmolLM2 never saw, control tokens) start from the mean embedding.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

# GPT-2's pre-tokenizer (SmolLM2's ByteLevel with use_regex), as tiktoken writes it
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
NUM_SPECIALS = 100


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def repack(tokenizer_json: Path, out: Path, specials: dict[int, str], version: str = "v7",
           audio: dict | None = None, image: dict | None = None) -> list[int | None]:
    """Write `out` (tekken.json) and return, for each new id, the old id whose embedding row it takes (None: new).

    `specials` are Mistral's control tokens by Tekken id (0 <unk>, 1 <s>, 2 </s>, 3 [INST], ...); the rest of the
    first NUM_SPECIALS ids are placeholders. The old tokenizer's own added tokens (SmolLM2's <|im_start|> ...) are
    not carried over: Mistral's chat format has its own."""
    data = json.loads(tokenizer_json.read_text())
    model = data["model"]
    if model["type"] != "BPE" or data["pre_tokenizer"]["type"] != "ByteLevel":
        raise ValueError(f"{tokenizer_json}: not a byte-level BPE tokenizer")
    decode = _byte_decoder()
    vocab: dict[str, int] = model["vocab"]
    added = {t["content"] for t in data.get("added_tokens", [])}

    def raw(token: str) -> bytes:
        return bytes(decode[c] for c in token)

    entries: list[tuple[bytes, int | None]] = []  # (bytes, old id) in rank order
    by_bytes = {raw(t): i for t, i in vocab.items() if t not in added}
    for b in range(256):
        entries.append((bytes([b]), by_bytes.get(bytes([b]))))
    for merge in model["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        token = left + right
        entries.append((raw(token), vocab[token]))
    seen = {e[0] for e in entries}
    if len(seen) != len(entries):
        raise ValueError("two merges make the same token: the rank table would be ambiguous")
    table = [{"rank": r, "token_bytes": base64.b64encode(b).decode(), "token_str": b.decode("utf-8", "replace")}
             for r, (b, _) in enumerate(entries)]
    names = {i: specials.get(i, f"<SPECIAL_{i}>") for i in range(NUM_SPECIALS)}
    tekken = {
        "config": {"pattern": GPT2_PATTERN, "num_vocab_tokens": len(table),
                   "default_vocab_size": NUM_SPECIALS + len(table), "default_num_special_tokens": NUM_SPECIALS,
                   "version": version},
        "vocab": table,
        "special_tokens": [{"rank": i, "token_str": names[i], "is_control": True} for i in range(NUM_SPECIALS)],
    }
    if audio is not None:
        tekken["audio"] = audio
    if image is not None:
        tekken["image"] = image
    out.write_text(json.dumps(tekken))
    return [None] * NUM_SPECIALS + [old for _, old in entries]
