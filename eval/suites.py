"""Named suites: which lm-eval task YAMLs (eval/tasks/) and which server checks (eval/server_checks.py) they run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    tasks: tuple[str, ...] = ()  # lm-eval tasks: eval/tasks/<name>.yaml
    server_checks: tuple[str, ...] = ()  # our own checks through the server: eval/server_checks.py CHECKS
    limit: int | None = None  # default examples per task (None: all); --limit overrides


SUITES: dict[str, Suite] = {
    s.name: s
    for s in [
        Suite("smoke", "1-digit addition three ways (multiple choice, log-likelihood, generation); CI",
              tasks=("add1_mc", "add1_loglik", "add1_gen"), limit=24),
        Suite("abilities", "generated tasks a small model can score on: arithmetic (addition, multiplication; "
              "generation, choice, log-likelihood), SI unit conversion, navigation, counting",
              tasks=("add1_gen", "add2_gen", "add2_mc", "add2_loglik", "mul2_mc", "si_units_mc", "navigate_mc",
                     "count_objects_gen"), limit=100),
        Suite("bigbench", "BIG-bench tasks a small model can score on: arithmetic, unit conversion, logical "
              "deduction, code description, navigation, counting (needs bigbench==1.0.0 from the package index)",
              tasks=("bb_add1_gen", "bb_add2_gen", "bb_add2_mc", "bb_add2_loglik", "bb_mul2_mc", "bb_si_conversion_mc",
                     "bb_logical_deduction3_mc", "bb_code_line_description_mc", "bb_navigate_mc",
                     "bb_object_counting_gen"), limit=100),
        Suite("humaneval", "HumanEval pass@1, model-written code run in the sandbox", tasks=("humaneval",)),
        Suite("tools", "function calling through the server: right tool, right arguments",
              server_checks=("tool_calls_required", "tool_calls_auto")),
        Suite("reasoning", "reasoning format through the server: thinking present and closed, answer after it",
              server_checks=("reasoning_format",)),
        Suite("audio", "audio models through the server: transcription WER (held-out sentences and voices, "
              "espeak-ng/flite), spoken arithmetic questions, counting beeps", server_checks=("transcription",
              "spoken_qa", "beep_count")),
        Suite("audio-smoke", "counting beeps through the server (no speech synthesis needed); CI",
              server_checks=("beep_count",), limit=4),
        Suite("image", "vision models through the server: shapes drawn here (shape and colour), real handwritten "
              "digits (scikit-learn's optdigits)", server_checks=("shape_qa", "digit_qa")),
    ]
}
DEFAULT_SUITE = "abilities"


class UnknownSuiteError(KeyError):
    def __str__(self) -> str:
        return f"unknown suite {self.args[0]!r}; known: {', '.join(SUITES)}"


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise UnknownSuiteError(name)
    return SUITES[name]


def task_configs(names: tuple[str, ...]) -> list[dict[str, Any]]:
    """lm-eval task configs with their data prepared and `data_files` made absolute paths into the data cache."""
    from lm_eval.tasks._yaml_loader import load_yaml

    from eval.sources import prepare_files

    configs = [load_yaml(TASKS_DIR / f"{name}.yaml") for name in names]
    files = prepare_files({rel for c in configs for rel in c["dataset_kwargs"]["data_files"].values()})
    for config in configs:
        data_files = config["dataset_kwargs"]["data_files"]
        config["dataset_kwargs"] = {**config["dataset_kwargs"],
                                    "data_files": {split: str(files[rel]) for split, rel in data_files.items()}}
    return configs


def suite_digest(suite: Suite) -> str:
    """What a run of `suite` scored: its task YAMLs, their data files and its server checks. A report made with
    another digest is not reused (a generator or a prompt changed)."""
    import hashlib

    digest = hashlib.sha256()
    for config, name in zip(task_configs(suite.tasks), suite.tasks, strict=True):
        digest.update((TASKS_DIR / f"{name}.yaml").read_bytes())
        for path in sorted(config["dataset_kwargs"]["data_files"].values()):
            digest.update(Path(path).read_bytes())
    for name in ("tool_calls.json", "reasoning.json"):
        if suite.server_checks and (TASKS_DIR / name).is_file():
            digest.update((TASKS_DIR / name).read_bytes())
    digest.update(",".join(suite.server_checks).encode())
    return digest.hexdigest()[:16]

