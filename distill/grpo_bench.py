"""GRPO benchmarks -> the GRPO section of docs/posttrain-results.md and docs/bench/grpo/ (`make bench-grpo`).

1. Arithmetic GRPO (distill/recipes/posttrain/smollm2-arithmetic-grpo.yaml) on the bundled SmolLM2-135M-Instruct
   and on a cascade student (default: the default recipe's 100M), the student with and without the KD term
   (lambda x KL(parent || student) on its own samples), `--seeds` seeds each: held-out greedy accuracy (operand
   pairs never trained) before and after with standard errors, reward curves (PNG), and each step's time split into
   generation, weight sync, scoring and training.
2. The reasoning variant (smollm2-135m-think, its recipe chain: cold-start SFT, then GRPO): the eval `reasoning`
   suite through the server (format_ok, answer_correct) for the bundled model steered with <think> and for the
   variant, and the variant's held-out arithmetic accuracy (graded after its thinking).
   Then the variant distilled down the cascade (distill/recipes/smollm2-think-cascade.yaml: ~100M and ~70M students
   on its own answers, thinking included): the same suite and arithmetic for each student.
3. TRL's GRPOTrainer on run 1's setting (distill/grpo_vs_trl.py): time per step and reward curve beside ours.

Runs live under $CASCADE_HOME/runs/bench-grpo/ and are not registered (the reasoning variant is: it is a product);
a finished run is reused.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

from distill.arithmetic import accuracy, problems
from distill.components.metrics import read_metrics
from distill.posttrain import load_posttrain_recipe, load_recipe_chain, run_posttrain
from models.checkpoint import write_text_atomic
from models.registry import cascade_home

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "distill" / "recipes" / "posttrain"
GRPO_RECIPE = RECIPES / "smollm2-arithmetic-grpo.yaml"
THINK_RECIPE = RECIPES / "smollm2-135m-think.yaml"
THINK_CASCADE = ROOT / "distill" / "recipes" / "smollm2-think-cascade.yaml"
SECTION_START, SECTION_END = "<!-- grpo:start -->", "<!-- grpo:end -->"


def _mean_se(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0] if values else math.nan), math.nan
    return statistics.mean(values), statistics.stdev(values) / math.sqrt(len(values))


def step_times(metrics: list[dict]) -> dict[str, float]:
    """Mean seconds per step: generation, weight sync, scoring (rewards), and the rest (training)."""
    steps = [m for m in metrics if "loss" in m and "elapsed_s" in m]
    if len(steps) < 2:
        return {}
    # an evaluation runs after a step's record is written: its time lands in the next step's wall, left out
    walls = [b["elapsed_s"] - a["elapsed_s"] for a, b in itertools.pairwise(steps) if "val_ce" not in a]
    mean = lambda key: statistics.mean(m.get(key, 0.0) for m in steps[1:])  # noqa: E731
    out = {"step": statistics.mean(walls), "generate": mean("batch_generate_s"), "sync": mean("batch_sync_s"),
           "score": mean("batch_score_s")}
    out["train"] = out["step"] - out["generate"] - out["sync"] - out["score"]
    return out


def grpo_run(runs: Path, name: str, model: str, seed: int, teacher: str | None = None, kd_weight: float = 0.0
             ) -> dict:
    recipe = load_posttrain_recipe(GRPO_RECIPE, "grpo")
    grpo = recipe.train.grpo.model_copy(update={"kd_weight": kd_weight})
    recipe = recipe.model_copy(update={"name": name, "model": model, "teacher": teacher, "seed": seed,
                                       "train": recipe.train.model_copy(update={"grpo": grpo})})
    card = run_posttrain(recipe, runs / name, register=False)
    metrics = read_metrics(runs / name / "train" / "metrics.jsonl")
    held = problems("heldout")
    return {"name": name, "model": model, "seed": seed, "kd_weight": kd_weight,
            "before": accuracy(model, held), "after": accuracy(card["path"], held),
            "rewards": [m["batch_reward_mean"] for m in metrics if "batch_reward_mean" in m],
            "zero_std": [m["batch_zero_std_groups"] for m in metrics if "batch_zero_std_groups" in m],
            "times": step_times(metrics), "train_seconds": card["train_seconds"]}


def reasoning_eval(model: str, out: Path) -> dict:
    """The eval `reasoning` suite through our server (its own process), as a user runs it."""
    if not (out / "report.json").is_file():
        subprocess.run([sys.executable, "-m", "eval", "run", "--suite", "reasoning", "--model", model,
                        "--out", str(out)], check=True)
    report = json.loads((out / "report.json").read_text())
    return {row["metric"]: row["value"] for row in report["rows"]}


def think(runs: Path) -> dict:
    chain = load_recipe_chain(THINK_RECIPE, "grpo")
    cards = [run_posttrain(recipe) for recipe in chain]
    held = problems("heldout")
    model = chain[-1].name
    return {"sft": cards[0]["path"], "model": model,
            "before": reasoning_eval("smollm2-135m-instruct", runs / "eval-reasoning-base"),
            "after_sft": reasoning_eval(chain[0].name, runs / "eval-reasoning-sft"),
            "after": reasoning_eval(model, runs / "eval-reasoning-think"),
            "arithmetic_sft": accuracy(chain[0].name, held, max_new_tokens=96),
            "arithmetic": accuracy(model, held, max_new_tokens=96),
            "times": step_times(read_metrics(cascade_home() / "runs" / model / "train" / "metrics.jsonl"))}


def think_cascade(runs: Path) -> list[dict]:
    """The reasoning variant distilled down the cascade: does each student keep the format and the answers?"""
    from distill.cascade import load_recipe, run_recipe

    held = problems("heldout")
    out = []
    for card in run_recipe(load_recipe(THINK_CASCADE)):
        out.append({"name": card["name"], "params": card["params"], "val_kl": card["final"].get("val_kl"),
                    "val_kl_pruned": card["pruned_only"].get("val_kl"), "train_seconds": card["train_seconds"],
                    "eval": reasoning_eval(card["name"], runs / f"eval-reasoning-{card['name']}"),
                    "arithmetic": accuracy(card["name"], held, max_new_tokens=96)})
    return out


def plot_rewards(groups: dict[str, list[dict]], out: Path) -> Path:
    from distill.plots import plot_curves

    series = {}
    for label, results in groups.items():
        for r in results:
            rewards = r["rewards"]
            smooth = [statistics.mean(rewards[max(0, i - 4): i + 1]) for i in range(len(rewards))]
            series[f"{label} seed {r['seed']}"] = list(enumerate(smooth, 1))
    return plot_curves(series, out, "GRPO on arithmetic: mean sampled reward (5-step moving mean)", "reward")


def section(results: dict) -> str:
    lines = [SECTION_START, "## GRPO (Magistral's variant)", "",
             "`make bench-grpo` (distill/grpo_bench.py): the arithmetic GRPO recipe (8 prompts x 8 samples a step, "
             "up to 8 new tokens, temperature 1, reward 1 when the answer's first number is right, Magistral "
             "advantages, clip 0.2/0.28, loss per group's tokens, no KL, 40 steps, lr 1e-5, fp32) on 2 CPU cores. "
             "Held-out: greedy answers to the 140 held-out operand pairs (never trained), strict (first number) "
             "and lenient (last number of the first line); mean ± standard error over seeds.", "",
             "| run | seeds | strict before | strict after | lenient before | lenient after | s/step (gen / sync / "
             "score / train) |", "|---|---|---|---|---|---|---|"]
    for label, runs in results.get("arithmetic", {}).items():
        if not runs:
            continue
        row = [label, str(len(runs))]
        for key in ("strict", "lenient"):
            for when in ("before", "after"):
                mean, se = _mean_se([r[when][key] for r in runs])
                row.append(f"{mean:.3f}" + (f" ± {se:.3f}" if not math.isnan(se) else ""))
        t = {k: statistics.mean(r["times"].get(k, math.nan) for r in runs) for k in
             ("step", "generate", "sync", "score", "train")}
        row.append(f"{t['step']:.1f} ({t['generate']:.1f} / {t['sync']:.1f} / {t['score']:.2f} / {t['train']:.1f})")
        lines.append("| " + " | ".join(row) + " |")
    if any("KD" in label for label in results.get("arithmetic", {})):
        lines += ["", "The cascade student starts from the default recipe's 100M (distilled on Shakespeare only, "
                  "never on chat). With the KD term (lambda x exact KL(parent || student) at each sampled token) "
                  "every group trains, since the parent's logits teach where the rewards agree; without it only "
                  "groups whose rewards differ do: hence the longer training part of its step."]
    else:
        lines += ["", "Not measured yet: the cascade student with and without the KD term (`python -m "
                  "distill.grpo_bench --parts student`; finished runs are reused)."]
    lines += ["", "![reward curves](bench/grpo/rewards.png)", ""]
    t = results.get("think")
    if t:
        lines += ["### The reasoning variant `smollm2-135m-think`", "",
                  "Cold-start SFT on distill/prompts/think-cold-start.jsonl (templated worked steps for training-"
                  "split arithmetic, the model's own answers to general questions behind a templated thinking), "
                  "then GRPO with the format gate (0.1), correctness after the thinking (0.9) and the soft overlong "
                  "penalty. The eval `reasoning` suite through the server (6 cases; the bundled model is steered "
                  "with `<think>`), and held-out arithmetic graded on the answer after the thinking.", "",
                  "| model | format_ok | thinking_present | answer_after | answer_correct | held-out arithmetic "
                  "strict |", "|---|---|---|---|---|---|"]
        def row(label: str, suite: dict, arithmetic: dict | None) -> str:
            scores = " | ".join(f"{suite.get(k, math.nan):.3f}" for k in
                                ("format_ok", "thinking_present", "answer_after", "answer_correct"))
            return f"| {label} | {scores} | " + (f"{arithmetic['strict']:.3f} |" if arithmetic else "|")

        for label, key, arith in (("smollm2-135m-instruct (steered)", "before", None),
                                  ("after cold-start SFT", "after_sft", "arithmetic_sft"),
                                  ("smollm2-135m-think (SFT + GRPO)", "after", "arithmetic")):
            lines.append(row(label, t[key], t[arith] if arith else None))
        for student in results.get("think_cascade", []):
            lines.append(row(f"{student['name']} ({student['params'] / 1e6:.1f}M, distilled from it)",
                             student["eval"], student["arithmetic"]))
        if results.get("think_cascade"):
            lines += ["", "The students: distill/recipes/smollm2-think-cascade.yaml (pruned from smollm2-135m-think, "
                      "each distilled on 100k tokens of its answers to the general prompt set, thinking kept between "
                      "`<think>` tags; forward KL, no post-training of their own). Held-out KL to the teacher: "
                      + "; ".join(f"{r['name']} {r['val_kl_pruned']:.3f} pruned -> {r['val_kl']:.3f} distilled "
                                  f"({r['train_seconds'] / 60:.0f} min)" for r in results["think_cascade"]) + "."]
        else:
            lines += ["", "Not measured yet: the variant distilled down the cascade (`python -m distill.grpo_bench "
                      "--parts think-cascade`)."]
        lines.append("")
    c = results.get("trl")
    if c:
        ours, theirs = c["cascade"], c["trl"]
        lines += ["### Against TRL's GRPOTrainer", "",
                  "The arithmetic GRPO recipe, seed 0, both trainers on the same prompts in the same order, group "
                  "size, lengths, sampling, reward, clip, learning rate and steps (distill/grpo_vs_trl.py). TRL "
                  "samples with `model.generate` (its vLLM modes need CUDA) in the training process; ours samples "
                  "through vLLM in a child process, whose memory is not in our peak RSS.", "",
                  "| trainer | steps | train s | s/step | peak RSS GiB | mean reward, first 10 steps | last 10 steps | "
                  "held-out strict | lenient |", "|---|---|---|---|---|---|---|---|---|"]
        for label, r in (("cascade", ours), ("TRL 1.16 GRPOTrainer", theirs)):
            rewards = r["rewards"]
            lines.append(f"| {label} | {r['steps']} | {r['train_s']:.0f} | {r['train_s'] / r['steps']:.1f} | "
                         f"{r['peak_rss_gib']:.2f} | {statistics.mean(rewards[:10]):.3f} | "
                         f"{statistics.mean(rewards[-10:]):.3f} | {r['accuracy']['strict']:.3f} | "
                         f"{r['accuracy']['lenient']:.3f} |")
        lines += ["", f"Before training: strict {c['before']['strict']:.3f}, lenient {c['before']['lenient']:.3f}.", ""]
    lines.append(SECTION_END)
    return "\n".join(lines) + "\n"


def write_section(text: str, doc: Path) -> None:
    """Replace the GRPO section of `doc` (or append it), leaving the rest as `make bench-posttrain` wrote it."""
    old = doc.read_text() if doc.is_file() else ""
    if SECTION_START in old and SECTION_END in old:
        head, rest = old.split(SECTION_START, 1)
        new = head + text.rstrip("\n") + rest.split(SECTION_END, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + text
    write_text_atomic(doc, new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill.grpo_bench", description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--student-seeds", type=int, help="seeds of each student run (default: --seeds)")
    parser.add_argument("--student", default="smollm2-cascade-100m", help="cascade student (make distill first)")
    parser.add_argument("--teacher", default="smollm2-135m-instruct")
    parser.add_argument("--kd-weight", type=float, default=0.1)
    parser.add_argument("--parts", nargs="+", default=["think", "think-cascade", "parent", "trl", "student"],
                        choices=["parent", "student", "think", "think-cascade", "trl"],
                        help="what to run, in this order")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args(argv)
    runs = cascade_home() / "runs" / "bench-grpo"
    bench = args.out / "bench" / "grpo"
    saved = bench / "results.json"
    results: dict = json.loads(saved.read_text()) if saved.is_file() else {}
    arithmetic = results.setdefault("arithmetic", {})

    def save() -> None:  # after every run: a cut benchmark keeps what it measured
        write_text_atomic(saved, json.dumps(results, indent=1) + "\n")
        if any(arithmetic.values()):
            plot_rewards(arithmetic, bench / "rewards.png")
        write_section(section(results), args.out / "posttrain-results.md")

    for part in args.parts:  # in the order given
        if part == "parent":
            rows = arithmetic["SmolLM2-135M-Instruct"] = []
            for s in range(args.seeds):
                rows.append(grpo_run(runs, f"parent-s{s}", "smollm2-135m-instruct", s))
                save()
        elif part == "student":
            plain = arithmetic[args.student] = []
            kd = arithmetic[f"{args.student} + KD {args.kd_weight:g}"] = []
            for s in range(args.student_seeds or args.seeds):
                plain.append(grpo_run(runs, f"student-s{s}", args.student, s))
                kd.append(grpo_run(runs, f"student-kd-s{s}", args.student, s, args.teacher, args.kd_weight))
                save()
        elif part == "think":
            results["think"] = think(runs)
        elif part == "think-cascade":
            results["think_cascade"] = think_cascade(runs)
        else:
            from distill.grpo_vs_trl import compare

            results["trl"] = compare(runs / "trl")
        save()
    print(section(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
