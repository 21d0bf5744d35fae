"""The general prompt set and the contamination check against the eval suites."""

from __future__ import annotations

from distill.corpus import NgramIndex, eval_texts
from distill.prompt_set import DEFAULT_COUNTS, build_prompts, normalise


def test_the_prompt_set_is_fixed_broad_deduplicated_and_kept_apart_from_the_evals() -> None:
    prompts = build_prompts()
    assert prompts == build_prompts()  # the same file on every run and machine
    families = {p["family"] for p in prompts}
    assert families == set(DEFAULT_COUNTS) and len(prompts) > 1500
    assert len({normalise(p["prompt"]) for p in prompts}) == len(prompts)
    index = NgramIndex(eval_texts())
    hits = [p["prompt"] for p in prompts if index.hits(p["prompt"])]
    assert len(hits) < 0.01 * len(prompts), hits[:5]  # phrased unlike the eval tasks; the rest are dropped


def test_the_contamination_check_catches_eval_questions_and_long_shared_spans() -> None:
    index = NgramIndex(["What is 4 plus 4?", "def add(a, b): return the sum of the two numbers a and b"])
    assert index.hits("Quick one: what is 4 plus 4?")  # a short eval question, whole
    assert not index.hits("Compute 4 + 4.") and not index.hits("What is 4 plus 45?")
    assert index.hits("Explain: return the sum of the two numbers a and b, please")  # a shared 8-gram
    assert not index.hits("return the sum of two numbers")
