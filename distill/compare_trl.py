"""cascade's trainer against TRL's GKD trainer on the same distillation: `make bench-distill-trl` ->
docs/bench/distill-vs-trl.{md,json}.

Same teacher, same pruned student start (the recipe's first stage), same token rows in the same order, same batch,
steps, optimiser settings and loss (forward KL at temperature 1, no cross-entropy; TRL's GKD with `lmbda=0`
(no student generations) and `beta=0` is exactly that). Each trainer runs in its own process, so peak RSS is its
own; both students are then scored by the same evaluator on the same held-out rows. TRL (`trl==1.16.0`) is a dev
dependency, never a runtime one: this benchmark and tests/test_compare_trl.py use it. DistillKit is not on the
package index (pip finds no distribution), so it has no row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from distill.components.metrics import read_metrics
from distill.throughput import peak_rss_gib
from models.checkpoint import write_text_atomic

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
    wall = time.perf_counter() - started
    trainer.export(Path(spec["out"]) / "student")
    return {"wall_s": wall, "peak_rss_gib": peak_rss_gib()}


def loop_seconds(metrics: Path) -> dict[str, float]:
    """Our training loop's time alone, from the metrics log: the last step's tokens/s counts from after the first
    evaluation to the last optimiser step (the run evaluates nowhere else), as TRL's `train_runtime` does."""
    steps = [m for m in read_metrics(metrics) if "loss" in m]
    last = steps[-1]
    return {"train_s": last["tokens"] / last["tokens_per_s"], "tokens": last["tokens"],
            "losses": [m["loss"] for m in steps]}


def run_trl(spec: dict) -> dict:
    """TRL's GKDTrainer on the same rows, order, batch, steps and optimiser settings."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # GKD lives in trl.experimental: we know, and pin it
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
        lmbda=0.0, beta=0.0, temperature=1.0, seed=config.seed, logging_steps=1, save_strategy="no",
        report_to=[], dataloader_num_workers=0, max_length=config.data.seq_len, remove_unused_columns=False,
        gradient_checkpointing=False,  # SFTConfig turns it on by default; ours recomputes nothing but the loss
    )
    student, teacher = load_model(Path(config.student)), load_model(Path(config.teacher))  # type: ignore[arg-type]
    trainer = InOrder(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                      data_collator=collate, processing_class=AutoTokenizer.from_pretrained(config.student))
    started = time.perf_counter()
    output = trainer.train()
    wall = time.perf_counter() - started
    save_model(trainer.model, Path(spec["out"]) / "student", Path(config.student))
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]  # one per step (4 decimals)
    return {"train_s": output.metrics["train_runtime"], "wall_s": wall, "losses": losses,
            "tokens": steps * sampler.sequences_per_step * config.data.seq_len, "peak_rss_gib": peak_rss_gib()}


def result_path(spec_path: Path, which: str) -> Path:
    """Where a child writes its result: beside the spec it ran."""
    return Path(f"{spec_path}.{which}.json")


def child_result(which: str, spec: dict, spec_path: Path, module: str = "distill.compare_trl",
                 non_default: dict | None = None) -> dict:
    """Run one trainer in a fresh process (`python -m module --child which --spec spec_path`: its own peak RSS),
    which writes result_path(spec_path, which); or reuse its result for the same spec (a rerun after
    a later row failed, or to re-score): settings added to the code since keep their defaults (`non_default`: the
    spec without default values), as for a recipe's finished stages."""
    from distill.config import same_settings

    result = result_path(spec_path, which)
    if (result.exists() and spec_path.exists()
            and same_settings(json.loads(spec_path.read_text()), spec, spec if non_default is None else non_default)):
        print(f"{which}: reusing {result}", flush=True)
        return json.loads(result.read_text())
    result.unlink(missing_ok=True)
    write_text_atomic(spec_path, json.dumps(spec))
    subprocess.run([sys.executable, "-m", module, "--child", which, "--spec", str(spec_path)], cwd=ROOT, check=True)
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
        write_text_atomic(result_path(args.spec, args.child), json.dumps(result))
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
    bf16_head = settings.loss.model_copy(update={"head_matmul": "bfloat16"})
    for label, which, key, extra in (
            ("cascade (fused loss)", "cascade", "on", {"fused_loss": "on"}),
            ("cascade (chunked loss)", "cascade", "off", {"fused_loss": "off"}),
            ("cascade (fused loss, bf16 head products)", "cascade", "bf16-head", {"fused_loss": "on",
                                                                                  "loss": bf16_head}),
            (f"TRL {TRL.split('==')[1]} GKDTrainer (lmbda 0, beta 0)", "trl", "trl", {})):
        out = work / which / ("" if which == "trl" else key)
        # no evaluation or checkpoint until the last step (TRL's run saves nothing and evaluates nothing)
        config = train_config(settings, student=pruned, teacher=parent, eval_teacher=parent, out_dir=out / "run",
                              data=recipe.data, tokens=args.tokens, seed=recipe.seed, eval={"every": 10**9},
                              checkpoint={"every": 10**9}, **extra)
        spec_path = work / f"{label.split()[0]}-{key}.spec.json"
        bf16 = resolve_precision(config.precision, device()) == "bfloat16"
        spec = {"config": config.model_dump(mode="json"), "out": str(out), "bf16": bf16}
        result = child_result(which, spec, spec_path, non_default=spec | {
            "config": config.model_dump(mode="json", exclude_defaults=True)})
        if "scores" not in result:  # scored once per trained student, kept with its result for reruns
            result["scores"] = _score(out / "student", config)
            write_text_atomic(result_path(spec_path, which), json.dumps(result))
        if which == "cascade":  # derived from the run's own metrics log each time, never stored twice
            result |= loop_seconds(out / "run" / "metrics.jsonl")
        # when the student was written: rows reused from an earlier run were timed at another hour
        finished = max(f.stat().st_mtime for f in (out / "student").glob("*.safetensors"))
        result |= {"setting": label, "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(finished))}
        rows.append(result)
        print(f"{label}: {result['tokens'] / result['train_s']:.1f} tokens/s, peak RSS {result['peak_rss_gib']:.2f} "
              f"GiB, held-out KL {result['scores']['val_kl']:.3f}", flush=True)
    shape = json.loads((pruned / "config.json").read_text())
    head = head_matmul_ms(settings.batch_size * recipe.data.seq_len, shape["hidden_size"], shape["vocab_size"])
    _write(rows, recipe.name, parent, args.tokens, args.out, head)
    return 0


def _score(student: Path, config) -> dict[str, float]:
    """The same evaluator on the same held-out rows for every trained student."""
    from distill.train import Trainer

    return Trainer(config.model_copy(update={"student": str(student), "out_dir": str(student.parent / "score")}),
                   progress=False).evaluate()


def _loss(row: dict, at: int) -> str:
    return f"{row['losses'][at]:.4f}" if row.get("losses") else "-"


def head_matmul_ms(tokens: int, hidden: int, vocab: int, repeats: int = 3) -> dict:
    """Milliseconds for one LM-head product at the run's shape in fp32 and bf16: the part of a distillation step
    whose precision differs between the trainers."""
    import torch

    torch.manual_seed(0)
    x, w = torch.randn(tokens, hidden), torch.randn(vocab, hidden) * 0.05
    result: dict = {"tokens": tokens, "hidden": hidden, "vocab": vocab}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = x.to(dtype), w.to(dtype)
        a @ b.T  # warm-up
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b.T
        result[f"{str(dtype).removeprefix('torch.')}_ms"] = (time.perf_counter() - started) / repeats * 1000
    return result


def _write(rows: list[dict], recipe: str, parent: Path, tokens: int, out: Path, head: dict) -> None:
    lines = [
        "# cascade vs TRL: the same distillation", "",
        f"`make bench-distill-trl` (`distill/compare_trl.py`) on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        f": recipe `{recipe}`'s first stage, teacher {parent.name}, {tokens:,} training tokens, the same rows in the "
        "same order, forward KL at temperature 1. Each trainer in its own process (peak RSS = VmHWM); held-out "
        "scores by the same evaluator. Differences left: HF's schedule starts warm-up at lr 0 and decays the "
        "(tied) embedding, ours does neither. tokens/s is each training loop alone (TRL's `train_runtime`; ours from "
        "after the run's first evaluation to its last step); `wall_s` in the JSON adds our two evaluations and "
        "checkpoint. "
        "DistillKit: not on the package index, no row.", "",
        "| trainer | tokens/s | peak RSS GiB | step-1 loss | last loss | held-out KL | perplexity | top-1 agreement "
        "| measured |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        *[f"| {r['setting']} | {r['tokens'] / r['train_s']:.1f} | {r['peak_rss_gib']:.2f} | "
          f"{_loss(r, 0)} | {_loss(r, -1)} | {r['scores']['val_kl']:.3f} | {r['scores']['val_ppl']:.1f} | "
          f"{r['scores']['val_top1_agree']:.3f} | {r.get('measured_at', '-')} |" for r in rows], "",
        "The same step-1 loss is the check that both compute the same thing on the same batch and weights "
        "(tests/test_compare_trl.py asserts it, and the whole loss curve, on micro models in fp32). A rerun reuses "
        "a row whose spec is unchanged: rows timed at different hours differ by this 2-core machine's drift too "
        "(±10-20%), so compare speeds measured together.", "",
        f"The language-model head product ([{head['tokens']} tokens x {head['hidden']}] x [{head['hidden']} x "
        f"{head['vocab']}], four a step: student logits, their two gradients, teacher logits) takes "
        f"{head['float32_ms']:.0f} ms in fp32 and {head['bfloat16_ms']:.0f} ms in bf16 here. Our fused loss keeps "
        "them in fp32 unless `loss.head_matmul: bfloat16`; TRL, under bf16 autocast, runs them in bf16 and rounds "
        "the logits to bf16 before its log-softmax.", "",
    ]
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "distill-vs-trl.md", "\n".join(lines))
    write_text_atomic(out / "distill-vs-trl.json", json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
