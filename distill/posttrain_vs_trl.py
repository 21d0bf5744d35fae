"""cascade's post-training against TRL's trainers on the same runs (part of `make bench-posttrain`).

SFT: the arithmetic SFT recipe; TRL's SFTTrainer gets our rendered, packed rows (the same ids, the same assistant-
token labels, the same restarting position ids) in our order through a collator, so both train on identical
batches and the loss is the same mean CE per assistant token. DPO: the arithmetic preference recipe with the plain
DPO loss (logistic, beta as the recipe, no NLL term); TRL's DPOTrainer gets the same training pairs (our split, in
our order, conversational) and tokenizes them with the same chat template. Same batch, steps and optimiser
settings; each trainer runs in its own process (peak RSS = VmHWM), no evaluation or checkpoint until the end; the
trained models are then scored by the same evaluator and the same greedy arithmetic check. TRL (`trl==1.16.0`) is a
dev dependency only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

from distill.compare_trl import TRL, child_result, loop_seconds, result_path, run_cascade
from distill.throughput import peak_rss_gib
from models.checkpoint import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]


def _order(config, rows: int):
    """Our batches' row ids in order: what TRL reads sequentially."""
    import torch

    from distill.data import BatchSampler

    sampler = BatchSampler(torch.zeros(rows, 1), config.batch_size, config.grad_accum, 1, config.seed)
    row_tokens = 2 * config.data.seq_len if config.objective == "prefer" else config.data.seq_len
    steps = math.ceil(config.tokens / (sampler.sequences_per_step * row_tokens))
    return steps, torch.cat([sampler.indices(s, m) for s in range(steps) for m in range(config.grad_accum)])


def _hf_args(config, steps: int, out: Path, bf16: bool) -> dict:
    optim = config.optim
    return dict(output_dir=str(out / "trl"), per_device_train_batch_size=config.batch_size,
                gradient_accumulation_steps=config.grad_accum, max_steps=steps, learning_rate=optim.lr,
                lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": optim.min_lr_ratio},
                warmup_steps=int(steps * optim.warmup_fraction), weight_decay=optim.weight_decay,
                adam_beta1=optim.betas[0], adam_beta2=optim.betas[1], max_grad_norm=optim.grad_clip, bf16=bf16,
                use_cpu=True, seed=config.seed, logging_steps=1, save_strategy="no", report_to=[],
                dataloader_num_workers=0, remove_unused_columns=False, gradient_checkpointing=False)


def run_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    from distill.config import TrainConfig
    from distill.data import load_splits
    from distill.model_io import load_model, save_model

    config = TrainConfig.model_validate(spec["config"])
    out = Path(spec["out"])
    tokenizer = AutoTokenizer.from_pretrained(config.student)
    model = load_model(Path(config.student))
    if config.objective == "sft":
        from trl import SFTConfig, SFTTrainer

        rows, _ = load_splits(config.data, config.data_model())
        steps, order = _order(config, len(rows))
        dataset = Dataset.from_dict({"row": order.tolist()})

        def collate(examples: list[dict]) -> dict:
            batch = rows.batch(torch.tensor([e["row"] for e in examples]), torch.device("cpu"))
            labels = batch.ids.masked_fill(~rows.targets[batch.rows], -100)  # HF shifts inside the model
            return {"input_ids": batch.ids, "labels": labels, "position_ids": batch.positions}

        trainer_cls, args = SFTTrainer, SFTConfig(**_hf_args(config, steps, out, spec["bf16"]), packing=False,
                                                 dataset_kwargs={"skip_prepare_dataset": True}, max_length=None)
        extra = {"data_collator": collate}
    else:
        from trl import DPOConfig, DPOTrainer

        pairs = training_pairs(config)
        steps, order = _order(config, len(pairs))
        dataset = Dataset.from_list([pairs[i] for i in order.tolist()])
        trainer_cls, args = DPOTrainer, DPOConfig(**_hf_args(config, steps, out, spec["bf16"]),
                                                  beta=config.prefer.beta, loss_type=["sigmoid"],
                                                  max_length=config.data.seq_len)
        extra = {}

    class InOrder(trainer_cls):  # type: ignore[misc, valid-type]
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    trainer = InOrder(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, **extra)
    started = time.perf_counter()
    output = trainer.train()
    wall = time.perf_counter() - started
    save_model(trainer.model, out / "student", Path(config.student))  # where run_cascade writes ours
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    row_tokens = (2 if config.objective == "prefer" else 1) * config.data.seq_len
    return {"train_s": output.metrics["train_runtime"], "wall_s": wall, "losses": losses, "peak_rss_gib":
            peak_rss_gib(), "tokens": steps * config.batch_size * config.grad_accum * row_tokens}


def training_pairs(config) -> list[dict]:
    """Our training split of the pair records, conversational, in our row order (distill/pair_data.py)."""
    from distill.chat_data import seeded_order, source_files
    from distill.data import jsonl_records

    named = [(f"{name}:{n}", record) for name, path in source_files(config.data)
             for n, record in jsonl_records(path)]
    train = [record for _, record in seeded_order(named, config.data.seed)[config.data.val_pairs:]]

    def turns(value, role: str) -> list[dict]:
        return [{"role": role, "content": value}] if isinstance(value, str) else value

    return [{"prompt": turns(r["prompt"], "user"), "chosen": turns(r["chosen"], "assistant"),
             "rejected": turns(r["rejected"], "assistant")} for r in train]


def compare(kind: str, config, work: Path, bf16: bool) -> list[dict]:
    """Both trainers on `config` (eval and checkpoints moved to the end), each scored the same way."""
    from distill.arithmetic import accuracy, problems

    config = config.model_copy(update={"eval": config.eval.model_copy(update={"every": 10**9}),
                                       "checkpoint": config.checkpoint.model_copy(update={"every": 10**9})})
    rows = []
    for which, label in (("cascade", "cascade"), ("trl", f"TRL {TRL.split('==')[1]} "
                                                        f"{'SFTTrainer' if kind == 'sft' else 'DPOTrainer'}")):
        out = work / kind / which
        run = config.model_copy(update={"out_dir": str(out / "run")})
        spec = {"config": run.model_dump(mode="json"), "out": str(out), "bf16": bf16}
        spec_path = work / f"{kind}-{which}.spec.json"
        result = child_result(which, spec, spec_path, "distill.posttrain_vs_trl",
                              spec | {"config": run.model_dump(mode="json", exclude_defaults=True)})
        if which == "cascade":
            result |= loop_seconds(out / "run" / "metrics.jsonl")
        if "scores" not in result:
            result["scores"] = score(out / "student", run)
            task = config.data.task
            result["heldout_accuracy"] = accuracy(out / "student", problems("heldout", task.digits, task.seed))
            write_text_atomic(result_path(spec_path, which), json.dumps(result))
        rows.append(result | {"setting": label})
        print(f"{kind} {label}: {result['tokens'] / result['train_s']:.1f} tokens/s, peak RSS "
              f"{result['peak_rss_gib']:.2f} GiB, last loss {result['losses'][-1]:.4f}", flush=True)
    return rows


def score(model: Path, config) -> dict[str, float]:
    """The same evaluator on the same held-out rows (a preference run keeps its reference: the start)."""
    from distill.train import Trainer

    update: dict = {"student": str(model), "out_dir": str(model.parent / "score")}
    if config.objective == "prefer":
        update["prefer"] = config.prefer.model_copy(update={"reference": config.prefer.reference or config.student})
    return Trainer(config.model_copy(update=update), progress=False).evaluate()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill.posttrain_vs_trl", description=__doc__)
    parser.add_argument("--child", choices=["cascade", "trl"], required=True)
    parser.add_argument("--spec", type=Path, required=True)
    args = parser.parse_args(argv)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    spec = json.loads(args.spec.read_text())
    result = (run_cascade if args.child == "cascade" else run_trl)(spec)
    write_text_atomic(result_path(args.spec, args.child), json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
