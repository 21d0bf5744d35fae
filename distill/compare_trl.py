"""cascade's trainer against TRL's GKD trainer on the same distillation: `make bench-distill-trl` ->
docs/bench/distill-vs-trl.{md,json}.

Same teacher, same pruned student start (the recipe's first stage), same token rows in the same order, same batch,
steps, optimiser settings and loss (forward KL at temperature 1, no cross-entropy; TRL's GKD with `lmbda=0`
(no student generations) and `beta=0` is exactly that). Each trainer runs in its own process, so peak RSS is its
own; both students are then scored by the same evaluator on the same held-out rows. TRL is installed only for this
benchmark (`trl==1.16.0`); DistillKit is not on the package index (pip finds no distribution), so it has no row.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from distill.throughput import peak_rss_gib

ROOT = Path(__file__).resolve().parents[1]
TRL = "trl==1.16.0"


def run_cascade(spec: dict) -> dict:
    """Our trainer on the spec's settings; returns tokens/s and peak RSS."""
    from distill.config import TrainConfig
    from distill.train import Trainer

    config = TrainConfig.model_validate(spec["config"])
    trainer = Trainer(config, progress=True)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    trainer.export(Path(spec["out"]) / "student")
    return {"train_s": seconds, "tokens": trainer.step * trainer.tokens_per_step, "peak_rss_gib": peak_rss_gib()}


def run_trl(spec: dict) -> dict:
    """TRL's GKDTrainer on the same rows, order, batch, steps and optimiser settings."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from distill.config import TrainConfig
    from distill.data import BatchSampler, build_tokens
    from distill.model_io import load_model, save_model

    config = TrainConfig.model_validate(spec["config"])
    rows = build_tokens(config.data, config.teacher)["train"]
    sampler = BatchSampler(rows, config.batch_size, config.grad_accum, 1, config.seed)
    steps = -(-config.tokens // (sampler.sequences_per_step * config.data.seq_len))
    order = torch.cat([sampler.indices(s, m) for s in range(steps) for m in range(config.grad_accum)])
    dataset = Dataset.from_dict({"input_ids": rows[order].tolist()})  # our batches, in our order

    def collate(examples: list[dict]) -> dict:
        ids = torch.tensor([e["input_ids"] for e in examples])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    class InOrder(GKDTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    optim = config.optim
    args = GKDConfig(
        output_dir=str(Path(spec["out"]) / "trl"), per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum, max_steps=steps, learning_rate=optim.lr,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": optim.min_lr_ratio},
        warmup_steps=int(steps * optim.warmup_fraction), weight_decay=optim.weight_decay, adam_beta1=optim.betas[0],
        adam_beta2=optim.betas[1], max_grad_norm=optim.grad_clip, bf16=spec["bf16"], use_cpu=True,
        lmbda=0.0, beta=0.0, temperature=1.0, seed=config.seed, logging_steps=10, save_strategy="no",
        report_to=[], dataloader_num_workers=0, max_length=config.data.seq_len, remove_unused_columns=False,
        gradient_checkpointing=False,  # SFTConfig turns it on by default; ours recomputes nothing but the loss
    )
    student, teacher = load_model(Path(config.student)), load_model(Path(config.teacher))  # type: ignore[arg-type]
    trainer = InOrder(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                      data_collator=collate, processing_class=AutoTokenizer.from_pretrained(config.student))
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    save_model(trainer.model, Path(spec["out"]) / "student", Path(config.student))
    return {"train_s": seconds, "tokens": steps * sampler.sequences_per_step * config.data.seq_len,
            "peak_rss_gib": peak_rss_gib()}


def _child(which: str, spec_path: Path) -> dict:
    """Run one trainer in a fresh process (its own peak RSS)."""
    result = Path(str(spec_path) + f".{which}.json")
    subprocess.run([sys.executable, "-m", "distill.compare_trl", "--child", which, "--spec", str(spec_path)],
                   cwd=ROOT, check=True)
    return json.loads(result.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill.compare_trl", description=__doc__)
    parser.add_argument("--recipe", type=Path, default=ROOT / "distill" / "recipes" / "smollm2-general.yaml")
    parser.add_argument("--tokens", type=int, default=40_960, help="training tokens for each trainer")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench")
    parser.add_argument("--child", choices=["cascade", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.spec.read_text())
        result = (run_cascade if args.child == "cascade" else run_trl)(spec)
        Path(str(args.spec) + f".{args.child}.json").write_text(json.dumps(result))
        return 0

    from distill.cascade import load_recipe, pruned_start, train_config
    from distill.common import device, resolve_precision
    from distill.corpus import prepare_sources
    from models.registry import cascade_home

    recipe = load_recipe(args.recipe)
    prepare_sources(recipe.data)
    parent, pruned = pruned_start(recipe, cascade_home() / "bench" / "vs-trl")
    work = cascade_home() / "bench" / "vs-trl"
    # the loss both trainers compute: forward KL, temperature 1, no cross-entropy; our fastest settings otherwise
    settings = recipe.train.model_copy(update={"loss": recipe.train.loss.model_copy(
        update={"divergence": "forward_kl", "temperature": 1.0, "ce_weight": 0.0})})
    rows: list[dict] = []
    for label, which, extra in (("cascade (fused loss)", "cascade", {"fused_loss": "on"}),
                                ("cascade (chunked loss)", "cascade", {"fused_loss": "off"}),
                                (f"TRL {TRL.split('==')[1]} GKDTrainer (lmbda 0, beta 0)", "trl", {})):
        out = work / which / extra.get("fused_loss", "")
        # no evaluation or checkpoint until the last step (TRL's run saves nothing and evaluates nothing)
        config = train_config(settings, student=pruned, teacher=parent, eval_teacher=parent, out_dir=out / "run",
                              data=recipe.data, tokens=args.tokens, seed=recipe.seed, eval={"every": 10**9},
                              checkpoint={"every": 10**9}, **extra)
        spec_path = work / f"{label.split()[0]}-{extra.get('fused_loss', 'trl')}.spec.json"
        bf16 = resolve_precision(config.precision, device()) == "bfloat16"
        spec_path.write_text(json.dumps({"config": config.model_dump(mode="json"), "out": str(out), "bf16": bf16}))
        result = _child(which, spec_path)
        result |= {"setting": label, "scores": _score(out / "student", config)}
        rows.append(result)
        print(f"{label}: {result['tokens'] / result['train_s']:.1f} tokens/s, peak RSS {result['peak_rss_gib']:.2f} "
              f"GiB, held-out KL {result['scores']['val_kl']:.3f}", flush=True)
    _write(rows, recipe.name, parent, args.tokens, args.out)
    return 0


def _score(student: Path, config) -> dict[str, float]:
    """The same evaluator on the same held-out rows for every trained student."""
    from distill.train import Trainer

    return Trainer(config.model_copy(update={"student": str(student), "out_dir": str(student.parent / "score")}),
                   progress=False).evaluate()


def _write(rows: list[dict], recipe: str, parent: Path, tokens: int, out: Path) -> None:
    from models.checkpoint import write_text_atomic

    lines = [
        "# cascade vs TRL: the same distillation", "",
        f"`make bench-distill-trl` (`distill/compare_trl.py`) on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        f": recipe `{recipe}`'s first stage, teacher {parent.name}, {tokens:,} training tokens, the same rows in the "
        "same order, forward KL at temperature 1. Each trainer in its own process (peak RSS = VmHWM); held-out "
        "scores by the same evaluator. Differences left: HF's schedule starts warm-up at lr 0 and decays the "
        "(tied) embedding, ours does neither; our timed run includes one evaluation and one checkpoint at the end. "
        "DistillKit: not on the package index, no row.", "",
        "| trainer | tokens/s | peak RSS GiB | held-out KL | perplexity | top-1 agreement |",
        "|---|---:|---:|---:|---:|---:|",
        *[f"| {r['setting']} | {r['tokens'] / r['train_s']:.1f} | {r['peak_rss_gib']:.2f} | "
          f"{r['scores']['val_kl']:.3f} | {r['scores']['val_ppl']:.1f} | {r['scores']['val_top1_agree']:.3f} |"
          for r in rows], "",
    ]
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "distill-vs-trl.md", "\n".join(lines))
    write_text_atomic(out / "distill-vs-trl.json", json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
