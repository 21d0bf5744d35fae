"""Post-training benchmarks -> docs/posttrain-results.md and .json (`make bench-posttrain`).

1. SFT of the bundled model on the generated arithmetic task (the `make posttrain` recipe): greedy accuracy on the
   held-out operand pairs and on the trained ones, before and after.
2. SFT against SFT with logit distillation (Ministral 3) for a cascade student (default: the default recipe's 70M,
   which never saw chat data) on its parent's answers to the general prompts: cross-entropy and KL to the parent on
   held-out conversations' assistant tokens, at equal tokens and settings.
3. Preference optimisation (GPO) on the arithmetic pairs: the shipped DPO recipe from the bundled model, and from
   the SFT model of 1: DPO, then DPO / IPO / SLiC with the chosen answers' NLL at matched regularisation, beside
   more SFT for as long (the control), and online DPO on the policy's own samples labelled by the verifier.
   Held-out generation accuracy before and after.
4. Against TRL (distill/posttrain_vs_trl.py): SFT and DPO, same model, data, order, steps and batch.

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
from distill.config import OnlinePreferenceConfig
from distill.posttrain import PostTrainRecipe, load_posttrain_recipe, run_posttrain
from models.checkpoint import write_text_atomic
from models.registry import cascade_home

ROOT = Path(__file__).resolve().parents[1]
ARITHMETIC_RECIPE = ROOT / "distill" / "recipes" / "posttrain" / "smollm2-arithmetic-sft.yaml"
PREFER_RECIPE = ROOT / "distill" / "recipes" / "posttrain" / "smollm2-arithmetic-dpo.yaml"
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


def preference(runs: Path, sft_model: str) -> dict:
    """GPO rows; each with held-out generation accuracy (strict and lenient) and held-out pair metrics."""
    shipped = load_posttrain_recipe(PREFER_RECIPE, "prefer").model_copy(update={"name": "arithmetic-dpo"})
    sft = load_posttrain_recipe(ARITHMETIC_RECIPE, "sft")
    task = shipped.data.task
    held = problems("heldout", task.digits, task.seed)  # type: ignore[union-attr]

    def variant(name: str, loss: str, beta: float, nll: float, online: dict | None = None) -> PostTrainRecipe:
        prefer = shipped.train.prefer.model_copy(update={
            "loss": loss, "beta": beta, "sft_weight": nll,
            "online": OnlinePreferenceConfig.model_validate(online) if online else None})
        # online: float32, where the engine-vs-trainer probe is exact (1e-3); in bf16 the two kernels' rounding
        # alone differs by ~0.05 mean |log p| on SmolLM2, the size of the bf16 tolerance
        train = shipped.train.model_copy(update={"prefer": prefer, **({"precision": "float32"} if online else {})})
        return shipped.model_copy(update={"name": name, "model": sft_model, "train": train})

    # matched regularisation: beta x f''(0)/|f'(0)| equal (logistic 1/2, squared 1; hinge has no curvature)
    rows = [("shipped recipe, from the bundled model", shipped),
            ("more SFT, as many epochs (control)", sft.model_copy(update={"name": "arithmetic-sft-more",
                                                                          "model": sft_model})),
            ("DPO (logistic, beta 0.1)", variant("arithmetic-sft-dpo", "logistic", 0.1, 0.0)),
            ("DPO + NLL (beta 0.1)", variant("arithmetic-sft-dpo-nll", "logistic", 0.1, 1.0)),
            ("IPO + NLL (squared, beta 0.05)", variant("arithmetic-sft-ipo-nll", "squared", 0.05, 1.0)),
            ("SLiC + NLL (hinge, beta 0.1)", variant("arithmetic-sft-slic-nll", "hinge", 0.1, 1.0)),
            ("online DPO + NLL: two samples a prompt (T 0.7), verifier labels, fp32",
             variant("arithmetic-sft-online-dpo-nll", "logistic", 0.1, 1.0,
                     {"labels": "arithmetic", "temperature": 0.7, "new_tokens": 16}))]
    results = []
    for label, recipe in rows:
        card = run_posttrain(recipe, runs / recipe.name, register=False)
        prefer = card.get("prefer") or {}
        row = {"setting": label, "start": recipe.model, "objective": card["objective"], "prefer": prefer,
               "epochs": recipe.epochs, "heldout": accuracy(card["path"], held), "final": card["final"],
               "before": card["before"], "train_s": card["train_seconds"], "tokens_per_s": _speed(card)}
        results.append(row)
        print(f"{label}: held-out accuracy {row['heldout']}", flush=True)
    return {"rows": results, "heldout_problems": len(held), "pairs": shipped.data.model_dump(),
            "start_accuracy": {"bundled": accuracy(shipped.model, held), "sft": accuracy(sft_model, held)}}


def versus_trl(runs: Path) -> list[dict]:
    """SFT (the arithmetic recipe) and plain DPO (the preference recipe without its NLL term) in both trainers."""
    from distill.common import device, resolve_precision
    from distill.posttrain import run_config
    from distill.posttrain_vs_trl import compare

    sft = run_config(load_posttrain_recipe(ARITHMETIC_RECIPE, "sft"), runs / "trl-sft")
    dpo_recipe = load_posttrain_recipe(PREFER_RECIPE, "prefer")
    plain = dpo_recipe.train.prefer.model_copy(update={"sft_weight": 0.0, "loss": "logistic"})
    dpo = run_config(dpo_recipe.model_copy(update={"train": dpo_recipe.train.model_copy(update={"prefer": plain})}),
                     runs / "trl-dpo")
    bf16 = resolve_precision(sft.precision, device()) == "bfloat16"
    return [row | {"kind": kind} for kind, config in (("sft", sft), ("dpo", dpo))
            for row in compare(kind, config, runs / "vs-trl", bf16)]


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
    lines += _preference_lines(results.get("preference")) + _trl_lines(results.get("trl"))
    doc = out / "posttrain-results.md"
    grpo = _kept_section(doc)  # `make bench-grpo` writes its own section: keep it
    write_text_atomic(doc, "\n".join(lines) + (f"\n\n{grpo}\n" if grpo else ""))
    write_text_atomic(out / "posttrain-results.json", json.dumps(results, indent=1) + "\n")


def _kept_section(doc: Path) -> str | None:
    """The GRPO section distill/grpo_bench.py wrote into `doc`, if any."""
    from distill.grpo_bench import SECTION_END, SECTION_START

    text = doc.read_text() if doc.is_file() else ""
    if SECTION_START not in text or SECTION_END not in text:
        return None
    return SECTION_START + text.split(SECTION_START, 1)[1].split(SECTION_END, 1)[0] + SECTION_END


def _preference_lines(p: dict | None) -> list[str]:
    if not p:
        return []
    start = p["start_accuracy"]
    return [
        "## Preference optimisation (GPO) on arithmetic pairs", "",
        f"Pairs: each training problem's right answer chosen over a plausible wrong one (off by one or two, or "
        f"another operation's result: \"7 times 2\" -> \"14\" over \"9\"); {p['pairs']['val_pairs']} of the "
        "training split's pairs held out for the pair metrics. Rows from the SFT model start from section 1's SFT "
        f"result (held-out strict {start['sft']['strict']:.3f}); the shipped recipe starts from the bundled model "
        f"(held-out strict {start['bundled']['strict']:.3f}, lenient {start['bundled']['lenient']:.3f}). Matched "
        "regularisation: beta x f''(0)/|f'(0)| equal for DPO and IPO (logistic 1/2, squared 1); hinge has no "
        "curvature. NLL: + 1 x the chosen answer's per-token NLL (`prefer.sft_weight`, TRL's rpo_alpha). Held-out "
        f"accuracy: greedy answers to the {p['heldout_problems']} held-out problems (never trained on, in any row).",
        "",
        "| setting | start | held-out strict | lenient | held-out pairs ranked right | margin | chosen CE before "
        "| after | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|",
        *[f"| {r['setting']} | {_start(r['start'])} | {r['heldout']['strict']:.3f} | {r['heldout']['lenient']:.3f} | "
          f"{_num(r['final'].get('val_reward_accuracy'), '.3f')} | {_num(r['final'].get('val_margin'), '.2f')} | "
          f"{r['before']['val_ce']:.3f} | {r['final']['val_ce']:.3f} | {r['tokens_per_s']:.0f} |"
          for r in p["rows"]], "",
        "Chosen CE is per token of the held-out pairs' chosen answers (the control row: of the held-out SFT "
        "conversations' answers, the same kind of text). tokens/s counts padded rows; the online row's includes "
        "sampling and weight pushes.", "",
    ]


def _start(path: str) -> str:
    return "section 1's SFT model" if Path(path).parent.name == "arithmetic-sft" else Path(path).name


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _trl_lines(rows: list[dict] | None) -> list[str]:
    if not rows:
        return []
    return [
        "## cascade against TRL on the same post-training runs", "",
        "distill/posttrain_vs_trl.py: SFT (the arithmetic recipe; TRL's SFTTrainer fed our packed rows, labels and "
        "position ids in our order) and plain DPO (the preference recipe without its NLL term; TRL's DPOTrainer fed "
        "the same training pairs in our order, tokenized by the same chat template). Same batch, steps, optimiser "
        "and schedule; each trainer in its own process (peak RSS = VmHWM); tokens/s is the training loop alone (TRL's "
        "`train_runtime`; ours from after the first evaluation to the last step, padded rows counted alike); the "
        "trained models scored by the same evaluator and the same greedy check. Differences left: HF's warm-up "
        "starts at lr 0 and its weight decay covers embeddings and norms; under bf16 autocast TRL computes the LM "
        "head and its logits in bf16, ours in fp32. In fp32 on micro models both trainers give the same loss at "
        "every step (tests/test_posttrain_vs_trl.py).", "",
        "| run | trainer | tokens/s | peak RSS GiB | step-1 loss | last loss | held-out CE | held-out pairs ranked "
        "right | held-out accuracy (strict) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {r['kind'].upper()} | {r['setting']} | {r['tokens'] / r['train_s']:.1f} | {r['peak_rss_gib']:.2f} | "
          f"{r['losses'][0]:.4f} | {r['losses'][-1]:.4f} | {r['scores']['val_ce']:.3f} | "
          f"{_num(r['scores'].get('val_reward_accuracy'), '.3f')} | {r['heldout_accuracy']['strict']:.3f} |"
          for r in rows], "",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill.posttrain_bench", description=__doc__)
    parser.add_argument("--student", default="smollm2-cascade-70m", help="cascade student for SFT vs SFT+KD "
                        "(`make distill` registers it); '' skips that part")
    parser.add_argument("--teacher", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=32_768, help="training tokens of each SFT vs SFT+KD run")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--no-trl", action="store_true", help="skip the comparison with TRL")
    args = parser.parse_args(argv)
    runs = cascade_home() / "runs" / "bench-posttrain"
    results = {"measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "arithmetic": arithmetic(runs),
               "chat": {"student": args.student, "teacher": args.teacher}}
    results["sft_vs_kd"] = sft_vs_kd(runs, args.student, args.teacher, args.tokens) if args.student else []
    results["preference"] = preference(runs, str(runs / "arithmetic-sft" / "model"))
    results["trl"] = versus_trl(runs) if not args.no_trl else []
    write_report(results, args.out)
    print(f"wrote {args.out / 'posttrain-results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
