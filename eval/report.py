"""Reports: one run (markdown + JSON + bar chart) and a comparison across models (table + quality vs parameters)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from eval.harness import SuiteResult
from models.checkpoint import write_text_atomic


@dataclass(frozen=True)
class Row:
    task: str
    metric: str
    value: float
    stderr: float | None
    n: int
    higher_is_better: bool | None = None
    filter: str = "none"


@dataclass
class RunReport:
    model: str
    suite: str
    mode: str  # what answered: Target.describe(), e.g. "endpoint: http://host:8000 (completions)", "checkpoint (hf)"
    params: int | None
    date: str  # ISO 8601, UTC
    limit: int | None
    seconds: float
    rows: list[Row] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    data: str = ""  # eval.suites.suite_digest: the tasks and data this run scored ("" in reports made before it)

    def primary_rows(self) -> dict[str, Row]:
        """One row per task: its first higher-is-better metric (what the plots and the comparison show)."""
        out: dict[str, Row] = {}
        for row in self.rows:
            if row.task not in out and row.higher_is_better:
                out[row.task] = row
        return out

    def primary(self) -> dict[str, float]:
        return {task: row.value for task, row in self.primary_rows().items()}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> RunReport:
        data = json.loads(text)
        data["rows"] = [Row(**r) for r in data["rows"]]
        return cls(**data)


def _number(value: Any) -> float | None:
    """lm-eval writes "N/A" for a stderr it could not compute."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


LOWER_IS_BETTER = frozenset({"wer", "cer"})  # server-check metrics that are error rates


def rows_from(result: SuiteResult) -> list[Row]:
    rows: list[Row] = []
    if result.lm_eval is not None:
        results, better = result.lm_eval["results"], result.lm_eval.get("higher_is_better", {})
        n_samples = result.lm_eval.get("n-samples", {})
        for task in sorted(results):
            for key, value in results[task].items():
                metric, _, filt = key.partition(",")
                if not filt or metric.endswith("_stderr") or _number(value) is None:
                    continue
                stderr = _number(results[task].get(f"{metric}_stderr,{filt}"))
                n = int(n_samples.get(task, {}).get("effective", results[task].get("sample_len", 0)))
                rows.append(Row(task, metric, float(value), stderr, n, better.get(task, {}).get(metric), filt))
    for check, out in result.server_checks.items():
        for metric, (value, stderr) in out["metrics"].items():
            rows.append(Row(check, metric, value, stderr, out["n"], metric not in LOWER_IS_BETTER))
    return rows


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _params(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.1f}M"


def run_markdown(report: RunReport) -> str:
    lines = [f"# {report.suite} on {report.model}", "",
             f"- answered by: {report.mode}", f"- parameters: {_params(report.params)}",
             f"- date: {report.date}", f"- limit: {report.limit or 'all'} examples per task",
             f"- wall time: {report.seconds:.0f} s",
             f"- versions: {', '.join(f'{k} {v}' for k, v in report.versions.items())}", "",
             "| task | metric | filter | value | stderr | n |", "|---|---|---|---:|---:|---:|"]
    for r in report.rows:
        arrow = "" if r.higher_is_better is None else (" ↑" if r.higher_is_better else " ↓")
        lines.append(f"| {r.task} | {r.metric}{arrow} | {r.filter} | {_fmt(r.value)} | {_fmt(r.stderr)} | {r.n} |")
    return "\n".join(lines) + "\n"


def write_run(report: RunReport, out_dir: Path) -> list[Path]:
    return [write_text_atomic(out_dir / "report.json", report.to_json() + "\n"),
            write_text_atomic(out_dir / "report.md", run_markdown(report)),
            plot_run(report, out_dir / "report.png")]


def write_samples(samples: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Every request and response with its scores, one JSON line each: for reading why a task failed."""
    lines = [json.dumps({"task": task, **record}, default=str) for task, records in samples.items()
             for record in records]
    return write_text_atomic(path, "\n".join(lines) + "\n")


def plot_run(report: RunReport, out: Path) -> Path:
    """One bar per task (its primary metric) with its standard error."""
    import matplotlib.pyplot as plt

    from distill.plots import save_figure

    rows = list(report.primary_rows().values())
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * max(1, len(rows))), dpi=120)
    ax.barh([f"{r.task} ({r.metric})" for r in rows], [r.value for r in rows],
            xerr=[r.stderr or 0.0 for r in rows], color="tab:blue", alpha=0.8, capsize=3)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("score (higher is better; bars: ±1 stderr)")
    ax.set_title(f"{report.suite} on {report.model} ({_params(report.params)}), n≤{report.limit or 'all'}")
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, out)


def comparison_markdown(reports: list[RunReport]) -> str:
    tasks = sorted({t for r in reports for t in r.primary()})
    metric = {task: row.metric for r in reports for task, row in r.primary_rows().items()}
    lines = [f"# {reports[0].suite}: models compared", "",
             f"Each cell is the task's first higher-is-better metric; n ≤ {reports[0].limit or 'all'} per task. "
             "Mean: the unweighted mean over tasks.", "",
             "| model | params | mean | " + " | ".join(f"{t} ({metric.get(t, '?')})" for t in tasks) + " |",
             "|---|---:|---:|" + "---:|" * len(tasks)]
    for r in sorted(reports, key=lambda r: -(r.params or 0)):
        p = r.primary()
        cells = " | ".join(_fmt(p.get(t)) for t in tasks)
        lines.append(f"| {r.model} | {_params(r.params)} | {_fmt(mean_score(r))} | {cells} |")
    lines += ["", "Runs: " + "; ".join(f"{r.model}: {r.mode}, {r.date}" for r in reports)]
    return "\n".join(lines) + "\n"


def mean_score(report: RunReport) -> float | None:
    scores = list(report.primary().values())
    return sum(scores) / len(scores) if scores else None


def plot_comparison(reports: list[RunReport], out: Path) -> Path:
    """Quality against parameter count: each task's score as a dot, the mean per model as a labelled square."""
    import matplotlib.pyplot as plt

    from distill.plots import save_figure

    known = sorted((r for r in reports if r.params), key=lambda r: r.params or 0)
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    xs = [(r.params or 0) / 1e6 for r in known]
    for task in sorted({t for r in known for t in r.primary()}):
        ax.plot(xs, [r.primary().get(task, math.nan) for r in known], "o", alpha=0.5, markersize=5, label=task)
    means = [mean_score(r) or 0.0 for r in known]
    ax.plot(xs, means, "s-", color="black", linewidth=2, markersize=7, label="mean over tasks")
    for i, (x, y, r) in enumerate(zip(xs, means, known, strict=True)):
        same_size = sum(1 for j in range(i) if xs[j] == x)  # models of equal size: stack their labels
        ax.annotate(r.model, (x, y), textcoords="offset points", xytext=(6, 8 + 11 * same_size), fontsize=7)
    span = (max(xs) - min(xs)) if len(xs) > 1 else max(xs, default=1.0)
    ax.set_xlim(min(xs, default=0) - 0.1 * span, max(xs, default=1) + 0.35 * span)
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("score")
    ax.set_ylim(0, 1)
    ax.set_title(f"{reports[0].suite}: quality vs parameters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return save_figure(fig, out)


def write_comparison(reports: list[RunReport], out_dir: Path) -> list[Path]:
    return [write_text_atomic(out_dir / "compare.md", comparison_markdown(reports)),
            plot_comparison(reports, out_dir / "compare.png")]
