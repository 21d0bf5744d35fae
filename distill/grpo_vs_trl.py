"""cascade's GRPO against TRL's GRPOTrainer on the same run (part of `make bench-grpo`).

The arithmetic GRPO recipe on the bundled model: the same prompts (our rendered prompt text, in our order: TRL's
sampler is told not to shuffle), group size, completion length, temperature 1 with no top-p/top-k, reward (our
arithmetic verifier on the completion), beta 0, clip 0.2/0.28, learning rate, schedule and steps. TRL samples with
`model.generate` (its vLLM modes need CUDA), normalises the loss per token of the batch (`dapo`, ours per group's
tokens) and scales advantages by the group's std (`scale_rewards="group"`, its default; ours: Magistral's
minibatch normalisation, `batch` in TRL's terms, which we set for it). Each trainer runs in its own process (peak
RSS); the trained models are scored by the same greedy held-out arithmetic check. TRL is a dev dependency only.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from distill.compare_trl import child_result, result_path, run_cascade
from distill.posttrain_vs_trl import _hf_args, _order
from distill.throughput import peak_rss_gib
from models.checkpoint import write_text_atomic


def ordered_prompts(config) -> tuple[int, list[str]]:
    """(steps, the prompt text of every row our run reads, in our order)."""
    from distill.data import load_splits
    from distill.objectives.grpo import prompt_end
    from models.registry import get_model
    from models.tokenizers import load_tokenizer

    rows, _ = load_splits(config.data, config.data_model())
    steps, order = _order(config, len(rows))
    tok = load_tokenizer(get_model(config.data_model()))
    return steps, [tok.decode(rows.ids[r, : prompt_end(rows.targets[r])].tolist()) for r in order.tolist()]


def run_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from distill.config import TrainConfig
    from distill.model_io import load_model, save_model
    from distill.verifiers import VERIFIERS

    config = TrainConfig.model_validate(spec["config"])
    g = config.grpo
    out = Path(spec["out"])
    steps, prompts = ordered_prompts(config)
    tokenizer = AutoTokenizer.from_pretrained(config.student)
    tokenizer.padding_side = "left"

    def arithmetic(prompts: list[str], completions: list[str], **_: object) -> list[float]:
        return [VERIFIERS["arithmetic"](p, c) or 0.0 for p, c in zip(prompts, completions, strict=True)]

    hf = _hf_args(config, steps, out, bf16=False)
    hf |= {"per_device_train_batch_size": config.batch_size * g.group_size, "lr_scheduler_type": "constant_with_warmup",
           "lr_scheduler_kwargs": {}}
    args = GRPOConfig(**hf, num_generations=g.group_size, max_completion_length=g.new_tokens,
                      temperature=g.temperature, top_p=1.0, top_k=0, beta=0.0, epsilon=g.epsilon_low,
                      epsilon_high=g.epsilon_high, loss_type="dapo", scale_rewards="batch", shuffle_dataset=False,
                      num_iterations=1, use_vllm=False)
    model = load_model(Path(config.student))
    dataset = Dataset.from_list([{"prompt": p} for p in prompts])
    trainer = GRPOTrainer(model=model, reward_funcs=[arithmetic], args=args, train_dataset=dataset,
                          processing_class=tokenizer)
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    output = trainer.train()
    wall = time.perf_counter() - started
    save_model(trainer.model, out / "student", Path(config.student))
    logs = [log for log in trainer.state.log_history if "reward" in log]
    return {"train_s": output.metrics["train_runtime"], "wall_s": wall, "steps": steps,
            "rewards": [log["reward"] for log in logs], "peak_rss_gib": peak_rss_gib()}


def compare(work: Path) -> dict:
    """Both trainers on the arithmetic GRPO recipe's first `steps` steps; each result reused when its spec is the
    same."""
    from distill.arithmetic import accuracy, problems
    from distill.components.metrics import read_metrics
    from distill.grpo_bench import GRPO_RECIPE, step_times
    from distill.posttrain import load_posttrain_recipe, run_config

    recipe = load_posttrain_recipe(GRPO_RECIPE, "grpo")
    config = run_config(recipe, work / "cascade")
    spec = {"config": config.model_dump(mode="json"), "out": str(work / "cascade")}
    ours = child_result("cascade", spec, work / "cascade.spec.json", "distill.grpo_vs_trl")
    metrics = read_metrics(work / "cascade" / "train" / "metrics.jsonl")
    ours |= {"rewards": [m["batch_reward_mean"] for m in metrics if "batch_reward_mean" in m],
             "train_s": [m for m in metrics if "elapsed_s" in m][-1]["elapsed_s"], "times": step_times(metrics),
             "steps": len([m for m in metrics if "loss" in m])}
    trl_spec = {"config": config.model_dump(mode="json"), "out": str(work / "trl")}
    theirs = child_result("trl", trl_spec, work / "trl.spec.json", "distill.grpo_vs_trl")
    held = problems("heldout")
    ours["accuracy"] = accuracy(work / "cascade" / "student", held)
    theirs["accuracy"] = accuracy(work / "trl" / "student", held)
    return {"cascade": ours, "trl": theirs, "before": accuracy(config.student, held)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill.grpo_vs_trl", description=__doc__)
    parser.add_argument("--child", choices=["cascade", "trl"], required=True)
    parser.add_argument("--spec", type=Path, required=True)
    args = parser.parse_args(argv)
    spec = json.loads(args.spec.read_text())
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    result = (run_cascade if args.child == "cascade" else run_trl)(spec)
    write_text_atomic(result_path(args.spec, args.child), json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
