"""Plots (matplotlib PNG) of a run folder's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run: Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_training(run: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(run)
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in rows], label="train loss")
    if any(r.get("mtp_loss") for r in rows):
        ax.plot(steps, [r["mtp_loss"] for r in rows], label="MTP loss", alpha=0.7)
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(Path(run) / "loss.png", dpi=100)
    plt.close(fig)
    loads = [r["expert_load_max_over_mean"] for r in rows if r.get("expert_load_max_over_mean")]
    if loads:
        fig, ax = plt.subplots(figsize=(7, 4))
        for i in range(len(loads[0])):
            ax.plot(steps[-len(loads):], [row[i] for row in loads], label=f"MoE layer {i}")
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_xlabel("step")
        ax.set_ylabel("expert load: max / mean")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(Path(run) / "expert_load.png", dpi=100)
        plt.close(fig)


def plot_grpo(run: Path):
    """Reward and accuracy per GRPO step, held-out pass@1 at each evaluation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(run)
    if not rows:
        return
    path = Path(run) / "eval.jsonl"
    evals = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["reward_mean"] for r in rows], label="reward (mean)", alpha=0.7)
    ax.plot(steps, [r["accuracy"] for r in rows], label="train accuracy", alpha=0.7)
    if evals:
        ax.plot([e["step"] for e in evals], [e["pass@1"] for e in evals], "o-", label="held-out pass@1 (greedy)")
    ax.set_xlabel("GRPO step")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(Path(run) / "reward.png", dpi=100)
    plt.close(fig)
