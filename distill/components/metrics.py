"""The run's record: one JSON line per step in metrics.jsonl (rank 0 writes), a progress bar, the throughput over
this process's steps, and loss.png (and rewards.png for RL runs) at the end. A resumed run cuts the log back to its
checkpoint, so no step is recorded twice."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tqdm import tqdm

from distill.common import is_rank0


class MetricsLogger:
    def __init__(self, out: Path, total_steps: int, tokens_per_step: int, progress: bool = True) -> None:
        self.path, self.out = out / "metrics.jsonl", out
        self.total_steps, self.tokens_per_step, self.progress = total_steps, tokens_per_step, progress
        self.bar: tqdm | None = None
        self.elapsed = 0.0  # training wall time, summed over resumed runs

    def start(self, step: int, elapsed: float = 0.0) -> None:
        """Begin at `step` (0: a new log; later: the log as it was at that checkpoint)."""
        if is_rank0():
            if step == 0:
                self.path.unlink(missing_ok=True)
            else:
                _truncate(self.path, step)
        self.elapsed, self._elapsed_before = elapsed, elapsed
        self.start_clock(step)
        self.bar = tqdm(total=self.total_steps, initial=step, desc=f"train {self.out.name}", unit="step",
                        disable=not self.progress or not is_rank0())

    def start_clock(self, step: int) -> None:
        """Training time counts from here (after the run's first evaluation, so tokens/s is training's alone)."""
        self._started, self._start_step = time.perf_counter(), step

    def step_done(self, step: int) -> float:
        """Account for a finished step; returns tokens/s over this process's steps so far."""
        run_time = time.perf_counter() - self._started
        self.elapsed = self._elapsed_before + run_time
        return (step - self._start_step) * self.tokens_per_step / max(run_time, 1e-9)

    def log(self, record: dict) -> None:
        if is_rank0():
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.bar is not None and "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            self.bar.update()

    def close(self, title: str) -> None:
        if self.bar is not None:
            self.bar.close()
        if is_rank0() and self.path.is_file():
            from distill.plots import plot_rewards, plot_training

            metrics = read_metrics(self.path)
            plot_training(metrics, self.out / "loss.png", title)
            plot_rewards(metrics, self.out / "rewards.png", title)  # RL runs only


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate(path: Path, step: int) -> None:
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
