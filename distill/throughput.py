"""Training throughput per setting, on the real teacher and its first pruned student: which settings make the most
tokens per second here, so the long recipe spends its time on tokens. `make bench-distill-speed` ->
docs/bench/distill-throughput.{md,json}.

Each setting trains a few steps from the same pruned start on the same text; the rate is taken between the second
and the last step (the first pays for allocation and warm-up). An offline teacher's cache is built before its
run and timed apart: it is paid once per row for every run and stage that reads the same rows.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from distill.cascade import load_recipe, plan_recipe, pruned_start
from distill.components.metrics import read_metrics
from distill.config import TrainConfig
from distill.data import DataConfig, SourceConfig
from distill.train import Trainer
from models.checkpoint import write_text_atomic
from models.registry import cascade_home

ROOT = Path(__file__).resolve().parents[1]

# (label, settings over the baseline); the baseline is the old default recipe's: 128-token rows, batch 8
SETTINGS: list[tuple[str, dict]] = [
    ("baseline: seq 128 x 8, bf16 autocast, live teacher, chunked loss", {}),
    ("float32 (no autocast)", {"precision": "float32"}),
    ("fused linear loss", {"fused_loss": "on"}),
    ("seq 256 x 4", {"seq_len": 256, "batch_size": 4}),
    ("seq 512 x 2", {"seq_len": 512, "batch_size": 2}),
    ("seq 128 x 16", {"batch_size": 16}),
    ("fused linear loss, seq 256 x 4", {"fused_loss": "on", "seq_len": 256, "batch_size": 4}),
    ("fused linear loss, seq 128 x 16", {"fused_loss": "on", "batch_size": 16}),
    ("offline teacher (top-64 cache)", {"teacher_top_k": 64}),
    ("seq 512 x 2, offline teacher", {"seq_len": 512, "batch_size": 2, "teacher_top_k": 64}),
    # on-policy: each step samples 192 tokens after a 64-token prompt per row through vLLM (a child process) and
    # pushes the weights first; tokens/step counts whole rows like the others, the loss covers the sampled part
    ("on-policy gkd (mix 1), fused, seq 256 x 4", {"objective": "gkd", "fused_loss": "on", "seq_len": 256,
                                                   "batch_size": 4, "on_policy": {"prompt_tokens": 64}}),
]


def _steady_rate(metrics: list[dict]) -> float:
    """Tokens/s between step 2 and the last step, from the log's cumulative rate."""
    steps = [m for m in metrics if "tokens_per_s" in m]
    first, last = steps[1], steps[-1]
    t_first, t_last = first["tokens"] / first["tokens_per_s"], last["tokens"] / last["tokens_per_s"]
    return (last["tokens"] - first["tokens"]) / (t_last - t_first)


def measure(student: Path, teacher: Path, out: Path, steps: int, label: str, change: dict) -> dict:
    seq_len = change.get("seq_len", 128)
    data = DataConfig(sources=[SourceConfig(kind="shakespeare")], seq_len=seq_len, val_sequences=8)
    values = {"student": str(student), "teacher": str(teacher), "out_dir": str(out), "data": data,
              "batch_size": 8, "tokens": 1, "eval": {"every": 10_000}, "checkpoint": {"every": 10_000}}
    values |= {k: v for k, v in change.items() if k != "seq_len"}
    config = TrainConfig.model_validate(values)
    tokens_per_step = config.batch_size * config.grad_accum * seq_len
    config = config.model_copy(update={"tokens": steps * tokens_per_step})
    started = time.perf_counter()
    trainer = Trainer(config, progress=False)  # builds the offline teacher's cache here, if any
    setup_s = time.perf_counter() - started
    trainer.train()
    rate = _steady_rate(read_metrics(out / "metrics.jsonl"))
    print(f"{label}: {rate:.1f} tokens/s (set-up {setup_s:.0f} s)", flush=True)
    return {"setting": label, "change": change, "tokens_per_step": tokens_per_step, "steps": steps,
            "tokens_per_s": round(rate, 1), "setup_s": round(setup_s, 1),
            "peak_rss_gib": round(peak_rss_gib(), 2)}


def peak_rss_gib() -> float:
    """This process's peak resident memory (VmHWM), GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def write_report(rows: list[dict], meta: dict, out: Path) -> None:
    base = rows[0]["tokens_per_s"]
    best = max(rows, key=lambda r: r["tokens_per_s"])
    lines = [
        "# Distillation throughput per setting", "",
        f"`make bench-distill-speed` (`distill/throughput.py`) on {meta['date']}: teacher {meta['teacher']}, "
        f"student {meta['student']} (its first stage's pruned start), {meta['steps']} steps per setting, "
        f"{meta['threads']} threads, {meta['machine']}. Rate between the second and the last step; the offline "
        "teacher's cache is built in the set-up (once per row, shared by every run reading those rows).", "",
        "| setting | tokens/step | tokens/s | vs baseline | set-up s |", "|---|---:|---:|---:|---:|",
        *[f"| {r['setting']} | {r['tokens_per_step']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.2f}x | "
          f"{r['setup_s']:.0f} |" for r in rows], "",
        f"Fastest: **{best['setting']}** ({best['tokens_per_s']:.1f} tokens/s, {best['tokens_per_s'] / base:.2f}x "
        "the baseline). ±10-15% between runs on this 2-core machine.", "",
    ]
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "distill-throughput.md", "\n".join(lines))
    write_text_atomic(out / "distill-throughput.json", json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill.throughput", description=__doc__)
    parser.add_argument("--recipe", type=Path, default=ROOT / "distill" / "recipes" / "smollm2-cascade.yaml")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--only", nargs="*", help="labels (prefixes) of the settings to run")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe)
    work = cascade_home() / "bench" / "throughput"
    parent_dir, pruned = pruned_start(recipe, work)
    parent, plans = plan_recipe(recipe)
    rows = []
    for i, (label, change) in enumerate(SETTINGS):
        if args.only and not any(label.startswith(p) for p in args.only):
            continue
        rows.append(measure(pruned, parent_dir, work / f"run-{i}", args.steps, label, change))
    previous = args.out / "distill-throughput.json"
    if args.only and previous.is_file():  # a partial run updates its rows of the last full report
        measured = {r["setting"] for r in rows}
        kept = {r["setting"]: r for r in json.loads(previous.read_text())["rows"] if r["setting"] not in measured}
        by_label = {r["setting"]: r for r in rows} | kept
        rows = [by_label[label] for label, _ in SETTINGS if label in by_label]
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "teacher": parent.name,
            "student": f"{plans[0].stage.name} ({plans[0].target.describe()})", "steps": args.steps,
            "threads": torch.get_num_threads(), "machine": platform.machine()}
    write_report(rows, meta, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
