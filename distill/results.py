"""docs/distill-results.md: do the students keep their teacher's abilities? The headline numbers of every measured
recipe side by side, read from the files the benchmarks write (nothing here trains or evaluates by default):

  held-out general split   distill/heldout.py, on the long recipe's held-out documents (teacher answers, code,
                           prose no step trains on) -> docs/distill/<long recipe>/heldout.json (--score makes it)
  abilities suite          `make eval-report SUITE=abilities` -> docs/eval/abilities/<model>/report.json
  iterative vs one-shot    `python -m distill.bench --recipe <long recipe> --only-iterative` -> results.json
  TRL side by side         `make bench-distill-trl` -> docs/bench/distill-vs-trl.json
  throughput               `make bench-distill-speed` -> docs/bench/distill-throughput.json
  per-recipe baselines     `make bench-distill` -> docs/distill/<recipe>/results.md

`python -m distill.results [--score]`; a missing input is named in the doc with the command that makes it.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

from models.checkpoint import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
LONG_RECIPE = ROOT / "distill" / "recipes" / "smollm2-general.yaml"
TEACHER = "smollm2-135m-instruct"
# (student, the recipe that made it, its target: at most this many times the teacher's held-out perplexity and at
# least this share of its abilities-suite mean; issue 14)
STUDENTS = [
    ("smollm2-cascade-100m", "smollm2-cascade", 1.3, 0.85),
    ("smollm2-cascade-70m", "smollm2-cascade", 2.0, 0.70),
    ("smollm2-general-100m", "smollm2-general", 1.3, 0.85),
    ("smollm2-general-70m", "smollm2-general", 2.0, 0.70),
]


def _json(path: Path) -> dict | list | None:
    return json.loads(path.read_text()) if path.is_file() else None


@functools.cache
def _report(docs: Path, model: str):
    """A model's abilities report (eval.report.RunReport), read once per run, or None before it is measured."""
    from eval.report import RunReport

    path = docs / "eval" / "abilities" / model / "report.json"
    return RunReport.from_json(path.read_text()) if path.is_file() else None


def abilities_mean(docs: Path, model: str) -> tuple[float, int] | None:
    """(unweighted mean over tasks of each task's first higher-is-better metric, number of tasks)."""
    report = _report(docs, model)
    if report is None:
        return None
    rows = report.primary_rows()
    return sum(r.value for r in rows.values()) / len(rows), len(rows)


def score_heldout(docs: Path) -> Path:
    """Score the teacher and every student that exists on the long recipe's held-out split."""
    from distill.heldout import score
    from models.registry import UnknownModelError, get_model

    names = [TEACHER]
    for name, *_ in STUDENTS:
        try:
            get_model(name)
            names.append(name)
        except UnknownModelError:
            print(f"results: {name} is not registered (its recipe has not run); skipped", file=sys.stderr)
    out = docs / "distill" / "smollm2-general" / "heldout.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(score(LONG_RECIPE, names), indent=1) + "\n")
    return out


def corpus_card(docs: Path) -> Path:
    """The long recipe's corpus card: the teacher-written part (distill/corpus.py) and the mixture as tokenized
    (per-source documents and tokens, the held-out share, answers dropped for quoting held-out documents)."""
    from distill.cascade import load_recipe
    from distill.corpus import LICENCES, answers_file
    from distill.data import cache_key
    from models.registry import cascade_home, get_model

    recipe = load_recipe(LONG_RECIPE)
    answers = next(s for s in recipe.data.sources if s.kind == "answers")
    data = json.loads((cascade_home() / "data" / cache_key(recipe.data, get_model(recipe.parent).checkpoint_dir)
                       / "data.json").read_text())
    card = {"recipe": recipe.name, "teacher_answers": json.loads((answers_file(answers).parent / "card.json")
                                                                  .read_text()),
            "mixture": data["sources"], "train_tokens": data["train_tokens"], "val_tokens": data["val_tokens"],
            "licences": {s.kind: LICENCES[s.kind] for s in recipe.data.sources}}
    out = docs / "distill" / "smollm2-general" / "corpus-card.json"
    write_text_atomic(out, json.dumps(card, indent=1) + "\n")
    return out


def heldout_table(docs: Path) -> list[str]:
    rows = _json(docs / "distill" / "smollm2-general" / "heldout.json")
    if not rows:
        return ["Not measured yet: `python -m distill.results --score`.", ""]
    by_model = {r["model"]: r for r in rows}  # type: ignore[union-attr]
    teacher = by_model[TEACHER]
    t_mean = abilities_mean(docs, TEACHER)
    lines = ["| model | recipe | held-out perplexity | vs teacher | KL(teacher ‖ model) | top-1 agreement | "
             "abilities mean | share of teacher's | target (ppl, abilities) | met |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    lines.append(f"| {TEACHER} (teacher) | - | {teacher['val_ppl']:.2f} | 1.00x | - | - | "
                 f"{_mean(t_mean)} | 100% | - | - |")
    for name, recipe, ppl_target, share_target in STUDENTS:
        r = by_model.get(name)
        if r is None:
            lines.append(f"| {name} | `{recipe}` | not run | | | | | | ≤ {ppl_target}x, ≥ {share_target:.0%} | |")
            continue
        ratio = r["val_ppl"] / teacher["val_ppl"]
        mean = abilities_mean(docs, name)
        share = mean[0] / t_mean[0] if mean and t_mean else None
        met = ("-" if share is None else
               "yes" if ratio <= ppl_target and share >= share_target else
               "ppl only" if ratio <= ppl_target else "abilities only" if share >= share_target else "no")
        lines.append(f"| {name} | `{recipe}` | {r['val_ppl']:.2f} | {ratio:.2f}x | {r['val_kl']:.3f} | "
                     f"{r['val_top1_agree']:.3f} | {_mean(mean)} | {'-' if share is None else f'{share:.0%}'} | "
                     f"≤ {ppl_target}x, ≥ {share_target:.0%} | {met} |")
    return [*lines, "", *_verdicts(docs, by_model, teacher["val_ppl"], t_mean), ""]


def _verdicts(docs: Path, by_model: dict, teacher_ppl: float, t_mean: tuple[float, int] | None) -> list[str]:
    """One line per measured student: each target met or missed, and where its abilities fell furthest."""
    teacher = _report(docs, TEACHER)
    teacher_rows = teacher.primary_rows() if teacher is not None else {}
    lines = []
    for name, _, ppl_target, share_target in STUDENTS:
        r, mean = by_model.get(name), abilities_mean(docs, name)
        if r is None or mean is None or t_mean is None:
            continue
        ratio, share = r["val_ppl"] / teacher_ppl, mean[0] / t_mean[0]
        rows = _report(docs, name).primary_rows()
        task = max(teacher_rows, key=lambda t: teacher_rows[t].value - rows[t].value if t in rows else 0)
        lines.append(f"- {name}: perplexity {ratio:.2f}x the teacher's (target ≤ {ppl_target}x: "
                     f"{'met' if ratio <= ppl_target else 'missed'}); abilities {share:.0%} of the teacher's mean "
                     f"(target ≥ {share_target:.0%}: {'met' if share >= share_target else 'missed'}); furthest "
                     f"behind on {task} ({teacher_rows[task].value:.2f} -> {rows[task].value:.2f}).")
    return lines


def _mean(mean: tuple[float, int] | None) -> str:
    return "not run" if mean is None else f"{mean[0]:.3f}"


def abilities_table(docs: Path) -> list[str]:
    models = [TEACHER, *(name for name, *_ in STUDENTS)]
    reports = {m: report for m in models if (report := _report(docs, m)) is not None}
    if not reports:
        return ["Not measured yet: `make eval-report SUITE=abilities`.", ""]
    tasks = list(next(iter(reports.values())).primary_rows())
    lines = [f"| model | {' | '.join(tasks)} |", f"|---|{'---:|' * len(tasks)}"]
    for model, report in reports.items():
        rows = report.primary_rows()
        lines.append(f"| {model} | " + " | ".join(f"{rows[t].value:.2f}" if t in rows else "-" for t in tasks) + " |")
    return [*lines, "", f"n ≤ {next(iter(reports.values())).limit} per task (stderr about ±0.05 at n = 100); "
            "the full reports and plot: [docs/eval/abilities/compare.md](eval/abilities/compare.md).", ""]


def iterative_table(docs: Path) -> list[str]:
    result = _json(docs / "distill" / "smollm2-general" / "results.json")
    if not result:
        return ["Not measured yet at the long budget: `python -m distill.bench --recipe "
                "distill/recipes/smollm2-general.yaml --only-iterative` (about 1.5 h here: one-shot pruning to "
                "70M distilled with both stages' tokens). At the default recipe's 41k tokens a stage iterative "
                "lost (see below).", ""]
    stage = next(s for s in result["stages"] if s["stage"] == "iterative vs one-shot")  # type: ignore[index]
    lines = ["| variant | tokens | perplexity | KL | top-1 |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['tokens']:,} | {r['val_ppl']:.1f} | {r['val_kl']:.3f} | "
              f"{r['val_top1_agree']:.3f} |" for r in stage["rows"]]
    one_shot, cascade = stage["rows"][1]["val_kl"], stage["rows"][3]["val_kl"]  # both distilled, equal tokens
    verdict = "wins" if cascade < one_shot else "loses"
    return [*lines, "", f"Iterative pruning {verdict} at this budget: KL {cascade:.3f} for the cascade against "
            f"{one_shot:.3f} for one-shot pruning ({cascade / one_shot - 1:+.0%}). Curves: "
            "[docs/distill/smollm2-general/results.md](distill/smollm2-general/results.md).", ""]


def trl_table(docs: Path) -> list[str]:
    rows = _json(docs / "bench" / "distill-vs-trl.json")
    if not rows:
        return ["Not measured yet: `make bench-distill-trl`.", ""]
    lines = ["| trainer | tokens/s | peak RSS GiB | held-out KL | perplexity | measured |",
             "|---|---:|---:|---:|---:|---|"]
    lines += [f"| {r['setting']} | {r['tokens'] / r['train_s']:.1f} | {r['peak_rss_gib']:.2f} | "
              f"{r['scores']['val_kl']:.3f} | {r['scores']['val_ppl']:.1f} | {r.get('measured_at', '-')} |"
              for r in rows]  # type: ignore[union-attr]
    return [*lines, "", "Details: [docs/bench/distill-vs-trl.md](bench/distill-vs-trl.md).", ""]


def throughput_lines(docs: Path) -> list[str]:
    report = _json(docs / "bench" / "distill-throughput.json")
    if not report:
        return ["Not measured yet: `make bench-distill-speed`.", ""]
    rows = report["rows"]  # type: ignore[index]
    base, best = rows[0], max(rows, key=lambda r: r["tokens_per_s"])
    return [f"Fastest setting: {best['setting']} at {best['tokens_per_s']:.1f} tokens/s against "
            f"{base['tokens_per_s']:.1f} for the old default ({report['meta']['date']}, "  # type: ignore[index]
            "[docs/bench/distill-throughput.md](bench/distill-throughput.md)).", ""]


def write(docs: Path) -> Path:
    _report.cache_clear()  # reports read afresh for each composition (they change between runs of one process)
    card = _json(docs / "distill" / "smollm2-general" / "corpus-card.json")
    lines = [
        "# Distillation results: do the students keep what their teacher can do?", "",
        f"Written by `python -m distill.results` on {time.strftime('%Y-%m-%d')} from the benchmark files named in "
        "each section (2 CPU cores, no GPU, one seed each). The teacher is SmolLM2-135M-Instruct; the students are "
        "pruned from it and distilled by forward KL. `smollm2-cascade` is the quick default recipe (41k Shakespeare "
        "tokens a stage); `smollm2-general` the long one: a general corpus of the teacher's own answers to 1,907 "
        "prompts, standard-library code and Shakespeare, ~500k tokens a stage.", "",
        "## Held-out general text and the abilities suite", "",
        "Held-out split of `smollm2-general` (whole documents of all three sources that no recipe trains on; the "
        "default recipe never saw any of these sources but Shakespeare). Abilities: `make eval-report "
        "SUITE=abilities` (generated arithmetic, unit conversion, navigation, counting; n = 100 per task).", "",
        *heldout_table(docs), "### Abilities per task", "", *abilities_table(docs),
        "## Iterative vs one-shot pruning at the long budget", "", *iterative_table(docs),
        "## cascade vs TRL on the same distillation", "", *trl_table(docs),
        "## Throughput", "", *throughput_lines(docs),
        "## Per-recipe baselines", "",
        "Prune + distill against prune + cross-entropy, random init, pruning choices and iterative vs one-shot at "
        "the default recipe's budget: [docs/distill/smollm2-cascade/results.md](distill/smollm2-cascade/results.md)"
        " (`make bench-distill`).", "",
    ]
    if card:
        lines += ["## The general corpus", "", "```json", json.dumps(card, indent=1), "```", ""]
    out = docs / "distill-results.md"
    write_text_atomic(out, "\n".join(lines))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill.results", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    parser.add_argument("--score", action="store_true", help="first score the teacher and the registered students "
                        "on the long recipe's held-out split (a few minutes each)")
    args = parser.parse_args(argv)
    if args.score:
        print(f"wrote {corpus_card(args.docs)}", file=sys.stderr)
        print(f"wrote {score_heldout(args.docs)}", file=sys.stderr)
    print(write(args.docs).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
