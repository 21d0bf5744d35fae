"""Does prune + distill beat the alternatives at equal tokens? Runs the baselines around a cascade recipe.

For each stage of the recipe (run first if needed), at the stage's token budget and on the same held-out text:
  pruned only         the pruned checkpoint before any training
  prune + distill     the cascade's own student (forward KL from the root parent)
  prune + CE          the same pruned start trained with next-token cross-entropy only
  random init + CE    the same architecture from random initialisation, cross-entropy only (lr x3: from-scratch
                      training wants a larger step; at the cascade's lr it learns slower still)
and for the last stage: one-shot pruning from the parent straight to that size, distilled with the cascade's total
token budget (every stage's tokens), against the cascade's iterative path. Before any training, the pruning choices
themselves (which axes, which importance score, how a tied head is handled) are compared zero-shot at the first
stage's size, from the parent's one calibration pass.
Writes docs/distill/<recipe>/results.md (tables), its *.png (validation curves) and results.json (every number);
docs/distill-results.md (distill/results.py) puts the recipes' headline numbers side by side.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from distill.calibrate import STATS_FILE, load_importance
from distill.cascade import (
    Recipe,
    fingerprint,
    importance_marker,
    load_recipe,
    plan_recipe,
    prune_checkpoint,
    pruned_marker,
    run_recipe,
    train_config,
)
from distill.components.checkpointer import CheckpointMismatchError
from distill.components.metrics import read_metrics
from distill.losses import LossConfig
from distill.model_io import load_config
from distill.plan import Architecture, Axis, FfnScore, LayerScore, PlanError, TiedEmbeddings, plan_architecture
from distill.plots import plot_curves
from distill.train import Trainer
from models.checkpoint import is_prepared, write_text_atomic
from models.registry import cascade_home

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]


def _train(recipe: Recipe, out: Path, student: Path, teacher: Path | None, eval_teacher: Path, tokens: int,
           seed: int, random_init: bool = False, lr_scale: float = 1.0) -> list[dict]:
    loss = recipe.train.loss if teacher is not None else LossConfig(kd_weight=0, ce_weight=1)
    optim = recipe.train.optim.model_copy(update={"lr": recipe.train.optim.lr * lr_scale})
    config = train_config(recipe.train, student=student, teacher=teacher, eval_teacher=eval_teacher, out_dir=out,
                          data=recipe.data, loss=loss, optim=optim, tokens=tokens, random_init=random_init, seed=seed)
    trainer = Trainer(config)
    try:
        trainer.train(resume=True)
    except CheckpointMismatchError as e:  # a baseline of an older recipe or pruned start: redo it, it is derived
        log.info("%s; starting this baseline again", e)
        shutil.rmtree(out)
        trainer.train()
    return read_metrics(out / "metrics.jsonl")


# label, axes a parameter target may shrink, layer score, FFN channel score, tied head
PruningChoice = tuple[str, tuple[Axis, ...], LayerScore, FfnScore, TiedEmbeddings]
PRUNING_CHOICES: list[PruningChoice] = [
    ("FFN + depth (default)", ("intermediate_size", "num_hidden_layers"), "block_importance", "ffn_mean_abs", "untie"),
    ("FFN + depth, layers by norm ratio", ("intermediate_size", "num_hidden_layers"), "layer_norm_ratio",
     "ffn_mean_abs", "untie"),
    ("FFN + depth, channels by L2-over-batch", ("intermediate_size", "num_hidden_layers"), "block_importance",
     "ffn_l2_mean", "untie"),
    ("FFN only", ("intermediate_size",), "block_importance", "ffn_mean_abs", "untie"),
    ("depth only, Block Importance", ("num_hidden_layers",), "block_importance", "ffn_mean_abs", "untie"),
    ("depth only, norm ratio (Ministral 3)", ("num_hidden_layers",), "layer_norm_ratio", "ffn_mean_abs", "untie"),
    ("hidden + FFN, head untied", ("hidden_size", "intermediate_size"), "block_importance", "ffn_mean_abs", "untie"),
    ("hidden + FFN, tie approximated", ("hidden_size", "intermediate_size"), "block_importance", "ffn_mean_abs",
     "approximate"),
]


def _zero_shot(recipe: Recipe, student: Path, parent_dir: Path, out: Path, start: str) -> dict[str, float]:
    """Held-out perplexity, KL and top-1 agreement of an untrained checkpoint (the trainer's own evaluation)."""
    cache = out / "eval.json"
    key = fingerprint(start, recipe.data.model_dump())
    cached = json.loads(cache.read_text()) if cache.is_file() else {}
    if cached.get("key") == key:
        return cached["metrics"]
    config = train_config(recipe.train, student=student, eval_teacher=parent_dir, out_dir=out, data=recipe.data,
                          tokens=1, seed=recipe.seed)
    result = Trainer(config, progress=False).evaluate()
    cache.write_text(json.dumps({"key": key, "metrics": result}))
    return result


def pruning_choices(recipe: Recipe, parent_dir: Path, stats_path: Path, params: int, bench: Path) -> dict:
    """Every PRUNING_CHOICES variant pruned from the parent to `params`, evaluated before any training."""
    parent = Architecture.of(load_config(parent_dir))
    stats = load_importance(stats_path)
    importance = importance_marker(parent_dir, recipe)
    rows = []
    for label, axes, layer_score, ffn_score, tied in PRUNING_CHOICES:
        try:
            target = plan_architecture(parent, None, params, axes, tied)
        except PlanError as e:  # e.g. untying the head costs more than the target leaves
            log.info("pruning choice %s: not reachable (%s)", label, e)
            continue
        slug = "-".join(label.split(" (")[0].replace(",", "").split()).lower()
        out = bench / "pruning-choices" / slug
        variant = recipe.model_copy(update={"layer_score": layer_score, "ffn_score": ffn_score})
        start = pruned_marker(importance, target, variant)
        if not is_prepared(out / "pruned", start):
            prune_checkpoint(parent_dir, stats, target, variant, out / "pruned", start)
        metrics = _zero_shot(recipe, out / "pruned", parent_dir, out, start)
        rows.append({"variant": label, "architecture": target.describe(), "params": target.params, "tokens": 0,
                     "val_ppl": metrics["val_ppl"], "val_kl": metrics["val_kl"],
                     "val_top1_agree": metrics["val_top1_agree"]})
        log.info("pruning choice %s: %s, KL %.3f", label, target.describe(), metrics["val_kl"])
    return {"stage": "pruning choices", "name": f"zero-shot at {params / 1e6:.0f}M", "architecture": "varies",
            "rows": rows}


def _row(label: str, params: int, metrics: list[dict], at: int = -1) -> dict:
    m = metrics[at]
    return {"variant": label, "params": params, "tokens": m["tokens"], "val_ppl": m["val_ppl"],
            "val_kl": m.get("val_kl"), "val_top1_agree": m.get("val_top1_agree")}


def run(recipe_path: Path, docs: Path, only_iterative: bool = False) -> dict:
    """Every baseline, or with `only_iterative` just the cascade against one-shot pruning (for budgets where the
    CE and from-scratch baselines would take hours each)."""
    recipe = load_recipe(recipe_path)
    parent, plans = plan_recipe(recipe)
    cards = run_recipe(recipe)
    runs = cascade_home() / "runs" / recipe.name
    bench = runs / "bench"
    stats_path = runs / plans[0].stage.name / "importance" / STATS_FILE  # the parent's one calibration pass
    choices = None if only_iterative else pruning_choices(recipe, parent.checkpoint_dir, stats_path,
                                                          plans[0].stage.target.params or plans[0].target.params,
                                                          bench)
    stages = []
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    kd_metrics: dict[str, list[dict]] = {}
    for i, (plan, card) in enumerate(zip(plans, cards, strict=True), 1):
        stage_dir = runs / plan.stage.name
        pruned = stage_dir / "pruned"
        kd = kd_metrics[plan.stage.name] = read_metrics(stage_dir / "train" / "metrics.jsonl")
        if only_iterative:
            stages.append({"stage": i, "name": plan.stage.name, "architecture": plan.target.describe(), "rows": [
                _row("pruned only", card["params"], kd, 0), _row("prune + distill", card["params"], kd)]})
            curves[plan.stage.name] = {"prune + distill": [(m["tokens"], m["val_ce"]) for m in kd if "val_ce" in m]}
            continue
        ce = _train(recipe, bench / plan.stage.name / "pruned-ce", pruned, None, parent.checkpoint_dir,
                    plan.stage.tokens, recipe.seed + i)
        scratch = _train(recipe, bench / plan.stage.name / "scratch-ce", pruned, None, parent.checkpoint_dir,
                         plan.stage.tokens, recipe.seed + i, random_init=True, lr_scale=3.0)
        rows = [_row("pruned only", card["params"], kd, 0), _row("prune + distill", card["params"], kd),
                _row("prune + CE", card["params"], ce), _row("random init + CE", card["params"], scratch)]
        stages.append({"stage": i, "name": plan.stage.name, "architecture": plan.target.describe(), "rows": rows})
        curves[plan.stage.name] = {
            "prune + distill": [(m["tokens"], m["val_ce"]) for m in kd if "val_ce" in m],
            "prune + CE": [(m["tokens"], m["val_ce"]) for m in ce if "val_ce" in m],
            "random init + CE": [(m["tokens"], m["val_ce"]) for m in scratch if "val_ce" in m],
        }

    # one-shot: the parent pruned straight to the last stage's size, with the cascade's total token budget
    last = plans[-1]
    total_tokens = sum(card["tokens_seen"] for card in cards)  # what the cascade really read (whole steps)
    one_shot_dir = bench / "one-shot" / "pruned"
    start = pruned_marker(importance_marker(parent.checkpoint_dir, recipe), last.target, recipe)
    if not is_prepared(one_shot_dir, start):
        prune_checkpoint(parent.checkpoint_dir, load_importance(stats_path), last.target, recipe, one_shot_dir, start)
    one_shot = _train(recipe, bench / "one-shot" / "train", one_shot_dir, parent.checkpoint_dir,
                      parent.checkpoint_dir, total_tokens, recipe.seed + 100)
    cascade_last = kd_metrics[last.stage.name]
    iterative = {
        "stage": "iterative vs one-shot", "name": last.stage.name, "architecture": last.target.describe(),
        "rows": [
            _row("one-shot prune (pruned only)", cards[-1]["params"], one_shot, 0),
            _row(f"one-shot prune + distill ({total_tokens:,} tokens)", cards[-1]["params"], one_shot),
            _row("cascade: previous student pruned (pruned only)", cards[-1]["params"], cascade_last, 0),
            {**_row(f"cascade ({total_tokens:,} tokens over {len(plans)} stages)", cards[-1]["params"],
                    cascade_last), "tokens": total_tokens},
        ],
    }
    curves["iterative-vs-one-shot"] = {
        f"one-shot prune + distill ({last.target.params / 1e6:.1f}M)": [
            (m["tokens"], m["val_kl"]) for m in one_shot if "val_kl" in m],
    }
    done = 0
    for plan, card in zip(plans, cards, strict=True):  # the cascade's path: every stage, end to end
        curves["iterative-vs-one-shot"][f"cascade stage {card['stage']} ({plan.target.params / 1e6:.1f}M)"] = [
            (m["tokens"] + done, m["val_kl"]) for m in kd_metrics[plan.stage.name] if "val_kl" in m]
        done += card["tokens_seen"]
    teacher = _teacher_eval(recipe, parent.checkpoint_dir, bench / "teacher-eval.json")
    result = {"recipe": recipe.name, "parent": parent.name, "parent_arch": plans[0].source.describe(),
              "stages": [*([choices] if choices else []), *stages, iterative], "teacher_eval": teacher,
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


def summary(result: dict) -> list[str]:
    """The comparisons the benchmark exists for, read off the tables (so they stay true when the numbers change)."""
    lines = []
    for stage in result["stages"]:
        rows = {r["variant"]: r for r in stage["rows"]}
        if stage["stage"] == "pruning choices":
            best = min(stage["rows"], key=lambda r: r["val_kl"])
            default = stage["rows"][0]
            lines.append(f"- Pruning choices, zero-shot at {stage['name'].split()[-1]}: the lowest KL is "
                         f"{best['variant']} ({best['val_kl']:.3f}); the default {default['variant']} has "
                         f"{default['val_kl']:.3f}.")
        elif isinstance(stage["stage"], int) and "prune + CE" not in rows:
            kd = rows["prune + distill"]
            lines.append(f"- Stage {stage['stage']} ({stage['name']}, {kd['params'] / 1e6:.1f}M, {kd['tokens']:,} "
                         f"tokens): prune + distill reaches KL {kd['val_kl']:.3f} and perplexity "
                         f"{kd['val_ppl']:.1f} (baselines not run: --only-iterative).")
        elif isinstance(stage["stage"], int):
            kd, ce, scratch = rows["prune + distill"], rows["prune + CE"], rows["random init + CE"]
            holds = kd["val_kl"] < scratch["val_kl"] and kd["val_ppl"] < scratch["val_ppl"]
            lines.append(
                f"- Stage {stage['stage']} ({stage['name']}, {kd['params'] / 1e6:.1f}M, {kd['tokens']:,} tokens): "
                f"prune + distill reaches KL {kd['val_kl']:.3f} and perplexity {kd['val_ppl']:.1f}; random init + "
                f"CE {scratch['val_kl']:.3f} and {scratch['val_ppl']:.1f} ({scratch['val_kl'] / kd['val_kl']:.1f}x "
                f"the KL). Minitron's claim (prune + distill beats training from scratch at equal tokens) "
                f"{'holds' if holds else 'does not hold'} here. Against prune + CE ({ce['val_kl']:.3f}, "
                f"{ce['val_ppl']:.1f}), distillation gives {_than(kd['val_kl'], ce['val_kl'])} KL and "
                f"{_than(kd['val_ppl'], ce['val_ppl'])} perplexity.")
        else:
            one_shot, cascade = stage["rows"][1], stage["rows"][3]
            gain = 1 - cascade["val_kl"] / one_shot["val_kl"]
            lines.append(
                f"- Iterative vs one-shot at {cascade['params'] / 1e6:.1f}M, {cascade['tokens']:,} tokens each: the "
                f"cascade ends at KL {cascade['val_kl']:.3f} / perplexity {cascade['val_ppl']:.1f}, one-shot pruning "
                f"from the parent at {one_shot['val_kl']:.3f} / {one_shot['val_ppl']:.1f}: iterative is "
                f"{'better' if gain > 0 else 'worse'} by {abs(gain):.0%} in KL.")
    return lines


def _than(a: float, b: float) -> str:
    return "lower" if a < b else "higher" if a > b else "equal"


def report_dir(docs: Path, recipe: str) -> Path:
    return docs / "distill" / recipe


def write_report(result: dict, curves: dict, docs: Path) -> None:
    figures = report_dir(docs, result["recipe"])
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
        f"{result['data']['val_sequences']} held-out sequences (whole documents never seen in training).", "",
        "KL is forward KL(parent ‖ student) per token on the held-out text; top-1 is agreement with the parent's "
        "argmax.", "", "## Summary", "", *summary(result), "",
    ]
    for stage in result["stages"]:
        title = f"Stage {stage['stage']}" if isinstance(stage["stage"], int) else stage["stage"].capitalize()
        per_row = "architecture" in stage["rows"][0]  # the pruning choices differ in shape, not in tokens
        lines += [f"## {title}: {stage['name']}" + ("" if per_row else f" ({stage['architecture']})"), "",
                  f"| variant | {'architecture' if per_row else 'tokens'} | val perplexity | KL to parent | "
                  "top-1 agreement |", "|---|---|---|---|---|"]
        for row in stage["rows"]:
            kl = f"{row['val_kl']:.3f}" if row["val_kl"] is not None else "-"
            top1 = f"{row['val_top1_agree']:.3f}" if row["val_top1_agree"] is not None else "-"
            second = row["architecture"] if per_row else f"{row['tokens']:,}"
            lines.append(f"| {row['variant']} | {second} | {row['val_ppl']:.1f} | {kl} | {top1} |")
        lines.append("")
    lines += ["## Curves", ""] + [f"![{name}]({name}.png)" for name in curves] + [""]
    write_text_atomic(figures / "results.md", "\n".join(lines))
    write_text_atomic(figures / "results.json", json.dumps(result, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=ROOT / "distill" / "recipes" / "smollm2-cascade.yaml")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    parser.add_argument("--only-iterative", action="store_true",
                        help="only the cascade against one-shot pruning at the same total budget (no CE, from-scratch "
                             "or pruning-choice baselines)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from distill.cascade import RecipeError

    try:
        result = run(args.recipe, args.docs, args.only_iterative)
    except (RecipeError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((report_dir(args.docs, result["recipe"]) / "results.md").read_text())
    return 0 if result else 1


if __name__ == "__main__":
    sys.exit(main())
