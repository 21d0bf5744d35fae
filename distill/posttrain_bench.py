"""Post-training benchmarks -> docs/posttrain-results.md and .json (`make bench-posttrain`).

1. SFT of the bundled model on the generated arithmetic task (the `make posttrain` recipe): greedy accuracy on the
   held-out operand pairs and on the trained ones, before and after.
2. SFT against SFT with logit distillation (Ministral 3) for a cascade student (default: the default recipe's 70M,
   which never saw chat data) on its parent's answers to the general prompts: cross-entropy and KL to the parent on
   held-out conversations' assistant tokens, at equal tokens and settings.

Runs live under $CASCADE_HOME/runs/bench-posttrain/ and are not registered; a finished run is reused.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from distill.arithmetic import accuracy, problems
from distill.components.lora import LoraSettings
from distill.components.metrics import read_metrics
from distill.posttrain import PostTrainRecipe, load_posttrain_recipe, run_posttrain
from models.checkpoint import write_text_atomic
from models.registry import cascade_home

ROOT = Path(__file__).resolve().parents[1]
ARITHMETIC_RECIPE = ROOT / "distill" / "recipes" / "posttrain" / "smollm2-arithmetic-sft.yaml"
GENERAL_RECIPE = ROOT / "distill" / "recipes" / "smollm2-general.yaml"


def _answers_file() -> Path:
    """The parent's answers to the general prompts, as the long cascade recipe made them (`make corpus`)."""
    from distill.cascade import load_recipe
    from distill.corpus import answers_file

    source = next(s for s in load_recipe(GENERAL_RECIPE).data.sources if s.kind == "answers")
    path = answers_file(source)
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing: make corpus RECIPE={GENERAL_RECIPE.relative_to(ROOT)} first")
    return path


def _speed(card: dict) -> float:
    """Training tokens/s of the loop alone (the metrics log's last step)."""
    steps = [m for m in read_metrics(Path(card["path"]).parent / "train" / "metrics.jsonl") if "loss" in m]
    return steps[-1]["tokens_per_s"]


def arithmetic(runs: Path) -> dict:
    """Full fine-tuning and LoRA (rank 16, 10x the learning rate, as "LoRA Without Regret" advises) on the task."""
    recipe = load_posttrain_recipe(ARITHMETIC_RECIPE, "sft").model_copy(update={"name": "arithmetic-sft"})
    optim = recipe.train.optim
    lora_train = recipe.train.model_copy(update={"lora": LoraSettings(rank=16),
                                                 "optim": optim.model_copy(update={"lr": optim.lr * 10})})
    lora = recipe.model_copy(update={"name": "arithmetic-sft-lora", "train": lora_train})
    cards = {"after": run_posttrain(recipe, runs / recipe.name, register=False),
             "after_lora": run_posttrain(lora, runs / lora.name, register=False)}
    task = recipe.data.task
    held, seen = (problems(split, task.digits, task.seed) for split in ("heldout", "train"))  # type: ignore[union-attr]
    scores = {}
    for label, model in (("before", recipe.model), *((k, c["path"]) for k, c in cards.items())):
        scores[label] = {"heldout": accuracy(model, held), "train": accuracy(model, seen)}
        print(f"arithmetic {label}: held-out {scores[label]['heldout']}, trained pairs {scores[label]['train']}",
              flush=True)
    card = cards["after"]
    return {"model": recipe.model, "heldout_problems": len(held), "train_problems": len(seen),
            "val_conversations": recipe.data.val_conversations, **scores,
            "tokens": card["tokens_seen"], "train_s": card["train_seconds"], "tokens_per_s": _speed(card),
            "lora": {"rank": 16, "lr": lora_train.optim.lr, "train_s": cards["after_lora"]["train_seconds"],
                     "tokens_per_s": _speed(cards["after_lora"]), "val_ce": cards["after_lora"]["final"]["val_ce"]},
            "full_val_ce": card["final"]["val_ce"]}


def sft_vs_kd(runs: Path, student: str, teacher: str, tokens: int) -> list[dict]:
    data = {"format": "chat", "paths": [str(_answers_file())], "seq_len": 256, "val_conversations": 64}
    rows = []
    for label, weight in (("SFT", 0.0), ("SFT + logit distillation", 1.0), ("0.5 CE + 0.5 KL", 0.5)):
        name = f"chat-{student}-a{weight:g}"
        recipe = PostTrainRecipe.model_validate({
            "name": name, "model": student, "teacher": teacher, "data": data, "tokens": tokens,
            "train": {"objective": "sft", "batch_size": 4, "precision": "auto", "fused_loss": "on",
                      "sft": {"teacher_weight": weight}, "eval": {"every": 16}, "checkpoint": {"every": 16},
                      "optim": {"lr": 1e-4, "warmup_fraction": 0.1, "min_lr_ratio": 0.1}}})
        card = run_posttrain(recipe, runs / name, register=False)
        rows.append({"setting": label, "teacher_weight": weight, "before": card["before"], "after": card["final"],
                     "tokens": card["tokens_seen"], "train_s": card["train_seconds"], "tokens_per_s": _speed(card)})
        print(f"{label}: held-out CE {card['before']['val_ce']:.3f} -> {card['final']['val_ce']:.3f}, KL "
              f"{card['before']['val_kl']:.3f} -> {card['final']['val_kl']:.3f}", flush=True)
    return rows


def write_report(results: dict, out: Path) -> None:
    a = results["arithmetic"]
    lines = [
        "# Post-training results", "",
        f"Measured {results['measured_at']} on this 2-core CPU by `make bench-posttrain` (distill/posttrain_bench.py);"
        " numbers read ±10-15% for speed.", "",
        "## SFT on generated arithmetic (`make posttrain`)", "",
        f"`{a['model']}` fine-tuned on the training split of 1-digit plus/minus/times problems "
        f"({a['train_problems']} conversations, {a['val_conversations']} of them the loss curve's validation; "
        f"{a['tokens']:,} tokens, {a['train_s']:.0f} s, "
        f"{a['tokens_per_s']:.0f} tokens/s). Greedy answers to each question alone in a chat; strict: the first "
        "number of the answer is right (the task's format); lenient: the last number of its first line is (an "
        "answer in a sentence, \"7 plus 2 equals 9.\", counts):", "",
        "| | held-out pairs, strict | held-out, lenient | trained pairs, strict | trained, lenient |",
        "|---|---|---|---|---|",
        *[f"| {label} | {a[key]['heldout']['strict']:.3f} | {a[key]['heldout']['lenient']:.3f} | "
          f"{a[key]['train']['strict']:.3f} | {a[key]['train']['lenient']:.3f} |"
          for label, key in (("before", "before"), ("after SFT", "after"),
                             (f"after LoRA SFT (rank {a['lora']['rank']}, lr {a['lora']['lr']:g})", "after_lora"))],
        "",
        f"LoRA against full fine-tuning on this CPU: {a['lora']['tokens_per_s']:.0f} against {a['tokens_per_s']:.0f} "
        f"training tokens/s ({a['lora']['train_s']:.0f} s against {a['train_s']:.0f} s), held-out conversation CE "
        f"{a['lora']['val_ce']:.3f} against {a['full_val_ce']:.3f}. The adapter is exported beside the merged model "
        "(adapter/, peft's format).", "",
        f"({a['heldout_problems']} held-out problems: one problem is 1/{a['heldout_problems']} = "
        f"{1 / a['heldout_problems']:.3f}.)", "",
    ]
    chat = results["sft_vs_kd"]
    if chat:
        c = results["chat"]
        lines += [
            "## SFT vs SFT with logit distillation, on a cascade student", "",
            f"`{c['student']}` post-trained on its parent `{c['teacher']}`'s answers to the general prompts (chat "
            f"template, loss on the answers only), {chat[0]['tokens']:,} tokens each, same settings; held-out: 64 "
            "whole conversations never trained on (assistant tokens only).", "",
            "| setting | CE before | CE after | KL(parent ‖ student) before | after | top-1 agreement after "
            "| tokens/s |",
            "|---|---|---|---|---|---|---|",
            *[f"| {r['setting']} | {r['before']['val_ce']:.3f} | {r['after']['val_ce']:.3f} | "
              f"{r['before']['val_kl']:.3f} | {r['after']['val_kl']:.3f} | {r['after']['val_top1_agree']:.3f} | "
              f"{r['tokens_per_s']:.0f} |" for r in chat], "",
        ]
    write_text_atomic(out / "posttrain-results.md", "\n".join(lines))
    write_text_atomic(out / "posttrain-results.json", json.dumps(results, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill.posttrain_bench", description=__doc__)
    parser.add_argument("--student", default="smollm2-cascade-70m", help="cascade student for SFT vs SFT+KD "
                        "(`make distill` registers it); '' skips that part")
    parser.add_argument("--teacher", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=32_768, help="training tokens of each SFT vs SFT+KD run")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args(argv)
    runs = cascade_home() / "runs" / "bench-posttrain"
    results = {"measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "arithmetic": arithmetic(runs),
               "chat": {"student": args.student, "teacher": args.teacher}}
    results["sft_vs_kd"] = sft_vs_kd(runs, args.student, args.teacher, args.tokens) if args.student else []
    write_report(results, args.out)
    print(f"wrote {args.out / 'posttrain-results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
