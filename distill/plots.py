"""PNG plots of training curves (matplotlib, headless)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_curves(series: dict[str, list[tuple[float, float]]], out: Path, title: str, ylabel: str,
                xlabel: str = "tokens", logy: bool = False) -> Path:
    """One line per label."""
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for label, points in series.items():
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, out)


def save_figure(fig: plt.Figure, out: Path) -> Path:
    """Written to a temporary file and renamed, so a reader never sees half a PNG."""
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def plot_training(metrics: list[dict], out: Path, title: str) -> Path:
    """Training loss per step and validation cross-entropy / KL at each evaluation, against tokens."""
    series = {
        "train loss": [(m["tokens"], m["loss"]) for m in metrics if "loss" in m],
        "val cross-entropy": [(m["tokens"], m["val_ce"]) for m in metrics if "val_ce" in m],
        "val KL(teacher||student)": [(m["tokens"], m["val_kl"]) for m in metrics if "val_kl" in m],
    }
    return plot_curves(series, out, title, "nats per token")


def plot_rewards(metrics: list[dict], out: Path, title: str) -> Path | None:
    """RL runs: the sampled reward per step, the share of groups that taught nothing, and the held-out greedy reward
    at each evaluation, against steps (None when the run logged no reward)."""
    if not any("batch_reward_mean" in m for m in metrics):
        return None
    series = {
        "sampled reward (mean)": [(m["step"], m["batch_reward_mean"]) for m in metrics if "batch_reward_mean" in m],
        "groups with equal rewards": [(m["step"], m["batch_zero_std_groups"]) for m in metrics
                                      if "batch_zero_std_groups" in m],
        "held-out greedy reward": [(m["step"], m["val_reward"]) for m in metrics if "val_reward" in m],
    }
    return plot_curves(series, out, title, "reward / share", xlabel="step")
