"""Does prune + distill beat the alternatives at equal tokens? Runs the baselines around a cascade recipe.

For each stage of the recipe (run first if needed), at the stage's token budget and on the same held-out text:
  pruned only         the pruned checkpoint before any training
  prune + distill     the cascade's own student (forward KL from the root parent)
  prune + CE          the same pruned start trained with next-token cross-entropy only
  random init + CE    the same architecture from random initialisation, cross-entropy only (lr x3: from-scratch
                      training wants a larger step; at the cascade's lr it learns slower still)
and for the last stage: one-shot pruning from the parent straight to that size, distilled with the cascade's total
token budget (every stage's tokens), against the cascade's iterative path.
Writes docs/distill-results.md (tables), docs/distill/*.png (validation curves) and a JSON of every number.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from distill.calibrate import STATS_FILE, load_importance
from distill.cascade import Recipe, load_recipe, plan_recipe, prune_checkpoint, run_recipe
from distill.losses import LossConfig
from distill.plots import plot_curves
from distill.train import TrainConfig, Trainer, read_metrics
from models.registry import cascade_home

ROOT = Path(__file__).resolve().parents[1]


def _train(recipe: Recipe, out: Path, student: Path, teacher: Path | None, eval_teacher: Path, tokens: int,
           seed: int, random_init: bool = False, lr_scale: float = 1.0) -> list[dict]:
    loss = recipe.train.loss if teacher is not None else LossConfig(kd_weight=0, ce_weight=1)
    optim = recipe.train.optim.model_copy(update={"lr": recipe.train.optim.lr * lr_scale})
    config = TrainConfig(
        student=str(student), teacher=str(teacher) if teacher else None, eval_teacher=str(eval_teacher),
        out_dir=str(out), data=recipe.data, loss=loss, optim=optim, tokens=tokens,
        batch_size=recipe.train.batch_size, grad_accum=recipe.train.grad_accum, eval_every=recipe.train.eval_every,
        checkpoint_every=recipe.train.checkpoint_every, precision=recipe.train.precision, random_init=random_init,
        seed=seed,
    )
    Trainer(config).train(resume=True)
    return read_metrics(out / "metrics.jsonl")


def _row(label: str, params: int, metrics: list[dict], at: int = -1) -> dict:
    m = metrics[at]
    return {"variant": label, "params": params, "tokens": m["tokens"], "val_ppl": m["val_ppl"],
            "val_kl": m.get("val_kl"), "val_top1_agree": m.get("val_top1_agree")}


def run(recipe_path: Path, docs: Path) -> dict:
    recipe = load_recipe(recipe_path)
    parent, plans = plan_recipe(recipe)
    cards = run_recipe(recipe)
    runs = cascade_home() / "runs" / recipe.name
    bench = runs / "bench"
    stages = []
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for i, (plan, card) in enumerate(zip(plans, cards, strict=True), 1):
        stage_dir = runs / plan.stage.name
        pruned = stage_dir / "pruned"
        kd = read_metrics(stage_dir / "train" / "metrics.jsonl")
        started = time.time()
        ce = _train(recipe, bench / plan.stage.name / "pruned-ce", pruned, None, parent.checkpoint_dir,
                    plan.stage.tokens, recipe.seed + i)
        scratch = _train(recipe, bench / plan.stage.name / "scratch-ce", pruned, None, parent.checkpoint_dir,
                         plan.stage.tokens, recipe.seed + i, random_init=True, lr_scale=3.0)
        rows = [_row("pruned only", card["params"], kd, 0), _row("prune + distill", card["params"], kd),
                _row("prune + CE", card["params"], ce), _row("random init + CE", card["params"], scratch)]
        stages.append({"stage": i, "name": plan.stage.name, "architecture": plan.target.describe(), "rows": rows,
                       "baseline_seconds": round(time.time() - started)})
        curves[plan.stage.name] = {
            "prune + distill": [(m["tokens"], m["val_ce"]) for m in kd if "val_ce" in m],
            "prune + CE": [(m["tokens"], m["val_ce"]) for m in ce if "val_ce" in m],
            "random init + CE": [(m["tokens"], m["val_ce"]) for m in scratch if "val_ce" in m],
        }

    # one-shot: the parent pruned straight to the last stage's size, with the cascade's total token budget
    last = plans[-1]
    total_tokens = sum(p.stage.tokens for p in plans)
    one_shot_dir = bench / "one-shot" / "pruned"
    if not (one_shot_dir / "config.json").is_file():
        stats = load_importance(runs / plans[0].stage.name / "importance" / STATS_FILE)  # the parent's statistics
        prune_checkpoint(parent.checkpoint_dir, stats, last.target, recipe, one_shot_dir)
    one_shot = _train(recipe, bench / "one-shot" / "train", one_shot_dir, parent.checkpoint_dir,
                      parent.checkpoint_dir, total_tokens, recipe.seed + 100)
    cascade_last = read_metrics(runs / last.stage.name / "train" / "metrics.jsonl")
    offset = sum(p.stage.tokens for p in plans[:-1])
    iterative = {
        "stage": "iterative vs one-shot", "name": last.stage.name, "architecture": last.target.describe(),
        "rows": [
            _row("one-shot prune (pruned only)", cards[-1]["params"], one_shot, 0),
            _row(f"one-shot prune + distill ({total_tokens:,} tokens)", cards[-1]["params"], one_shot),
            _row("cascade: stage-1 student pruned (pruned only)", cards[-1]["params"], cascade_last, 0),
            {**_row(f"cascade ({total_tokens:,} tokens over {len(plans)} stages)", cards[-1]["params"],
                    cascade_last), "tokens": total_tokens},
        ],
    }
    curves["iterative-vs-one-shot"] = {
        "one-shot prune + distill": [(m["tokens"], m["val_kl"]) for m in one_shot if "val_kl" in m],
        "cascade (last stage, offset by earlier stages' tokens)": [
            (m["tokens"] + offset, m["val_kl"]) for m in cascade_last if "val_kl" in m],
    }
    teacher = _teacher_eval(recipe, parent.checkpoint_dir, bench / "teacher-eval.json")
    result = {"recipe": recipe.name, "parent": parent.name, "parent_arch": plans[0].source.describe(),
              "stages": [*stages, iterative], "teacher_eval": teacher,
              "date": time.strftime("%Y-%m-%d"), "data": recipe.data.model_dump()}
    write_report(result, curves, docs)
    return result


def _teacher_eval(recipe: Recipe, parent_dir: Path, cache: Path) -> dict:
    """The parent's own held-out perplexity, for scale (its KL is 0 by definition)."""
    if cache.is_file():
        return json.loads(cache.read_text())
    import math

    import torch

    from distill.data import build_tokens
    from distill.model_io import load_model

    model = load_model(parent_dir).eval()
    rows = build_tokens(recipe.data, parent_dir)["val"]
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), 8):
            ids = rows[start:start + 8]
            logits = model(input_ids=ids).logits[:, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(),
                                                             reduction="sum"))
            count += ids[:, 1:].numel()
    result = {"val_ppl": math.exp(total / count), "val_ce": total / count}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result))
    return result


def write_report(result: dict, curves: dict, docs: Path) -> None:
    figures = docs / "distill"
    figures.mkdir(parents=True, exist_ok=True)
    for name, series in curves.items():
        metric = "KL(parent || student), nats/token" if name == "iterative-vs-one-shot" else "val cross-entropy"
        plot_curves(series, figures / f"{name}.png", f"{result['recipe']}: {name}", metric, logy=True)
    lines = [
        f"# Cascade distillation results: `{result['recipe']}`", "",
        f"Parent: {result['parent']} ({result['parent_arch']}); held-out perplexity "
        f"{result['teacher_eval']['val_ppl']:.1f}. Measured {result['date']} by `make bench-distill` on the "
        "development machine (2 CPU cores, no GPU); one seed each, so differences of a few percent are noise.",
        f"Data: {json.dumps(result['data']['sources'])}, sequences of {result['data']['seq_len']} tokens, "
        f"{result['data']['val_sequences']} held-out sequences (whole plays never seen in training).", "",
        "KL is forward KL(parent ‖ student) per token on the held-out text; top-1 is agreement with the parent's "
        "argmax.", "",
    ]
    for stage in result["stages"]:
        title = f"Stage {stage['stage']}" if isinstance(stage["stage"], int) else stage["stage"].capitalize()
        lines += [f"## {title}: {stage['name']} ({stage['architecture']})", "",
                  "| variant | tokens | val perplexity | KL to parent | top-1 agreement |", "|---|---|---|---|---|"]
        for row in stage["rows"]:
            kl = f"{row['val_kl']:.3f}" if row["val_kl"] is not None else "-"
            top1 = f"{row['val_top1_agree']:.3f}" if row["val_top1_agree"] is not None else "-"
            lines.append(f"| {row['variant']} | {row['tokens']:,} | {row['val_ppl']:.1f} | {kl} | {top1} |")
        lines.append("")
    lines += ["## Curves", ""] + [f"![{name}](distill/{name}.png)" for name in curves] + [""]
    tmp = docs / ".distill-results.md.tmp"
    tmp.write_text("\n".join(lines))
    tmp.replace(docs / "distill-results.md")
    (figures / "results.json").write_text(json.dumps(result, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=ROOT / "distill" / "recipes" / "smollm2-cascade.yaml")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from distill.cascade import RecipeError

    try:
        result = run(args.recipe, args.docs)
    except (RecipeError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((args.docs / "distill-results.md").read_text())
    return 0 if result else 1


if __name__ == "__main__":
    sys.exit(main())
