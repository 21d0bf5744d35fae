"""Word and character error rates: edit distance over the normalised text (distill/speech/text.py), summed over a
set before dividing (a corpus rate, as speech recognition reports it, not a mean of per-clip rates)."""

from __future__ import annotations

from distill.speech.text import normalise


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


def error_rates(refs: list[str], hyps: list[str]) -> dict:
    """{"wer", "cer", "words", "clips"} over the pairs."""
    words = chars = word_errors = char_errors = 0
    for ref, hyp in zip(refs, hyps, strict=True):
        r, h = normalise(ref), normalise(hyp)
        word_errors += edit_distance(r.split(), h.split())
        char_errors += edit_distance(list(r), list(h))
        words += len(r.split())
        chars += len(r)
    return {"wer": round(word_errors / max(1, words), 4), "cer": round(char_errors / max(1, chars), 4),
            "words": words, "clips": len(refs)}
