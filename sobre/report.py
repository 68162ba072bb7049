"""Plots (matplotlib PNG) of a run folder's metrics.jsonl (pretraining, SFT, distillation) and eval.jsonl
(GRPO)."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run: Path, name: str = "metrics.jsonl") -> list[dict]:
    path = Path(run) / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _figure(size=(7, 4)):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(figsize=size)


def _write(fig, path: Path):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _save(fig, ax, path: Path, xlabel: str, ylabel: str | None = None):
    """A line plot's labels, legend and grid, then the PNG."""
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    _write(fig, path)


def plot_training(run: Path):
    """loss.png (train, MTP and val loss) and, for MoE models, expert_load.png (max / mean load per layer)."""
    rows = read_metrics(run)
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, ax = _figure()
    ax.plot(steps, [r["loss"] for r in rows], label="train loss")
    if any(r.get("mtp_loss") for r in rows):
        ax.plot(steps, [r["mtp_loss"] for r in rows], label="MTP loss", alpha=0.7)
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    _save(fig, ax, Path(run) / "loss.png", "step", "cross-entropy (nats)")
    loads = [r["expert_load_max_over_mean"] for r in rows if r.get("expert_load_max_over_mean")]
    if loads:
        fig, ax = _figure()
        for i in range(len(loads[0])):
            ax.plot(steps[-len(loads):], [row[i] for row in loads], label=f"MoE layer {i}")
        ax.axhline(1.0, color="k", lw=0.5)
        _save(fig, ax, Path(run) / "expert_load.png", "step", "expert load: max / mean")


def plot_grpo(run: Path):
    """reward.png: reward and accuracy per GRPO step, held-out pass@1 at each evaluation."""
    rows, evals = read_metrics(run), read_metrics(run, "eval.jsonl")
    if not rows:
        return
    fig, ax = _figure()
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["reward_mean"] for r in rows], label="reward (mean)", alpha=0.7)
    ax.plot(steps, [r["accuracy"] for r in rows], label="train accuracy", alpha=0.7)
    if evals:
        ax.plot([e["step"] for e in evals], [e["pass@1"] for e in evals], "o-", label="held-out pass@1 (greedy)")
    _save(fig, ax, Path(run) / "reward.png", "GRPO step")


def expert_loads(model, ids: list[int], chunk: int = 256) -> list[list[float]]:
    """Share of routed (token, expert) pairs per expert, per MoE layer [layers][experts], measured on ids."""
    import torch

    from .moe import moe_layers
    moes = moe_layers(model.layers)  # the main layers (not MTP)
    totals = [0] * len(moes)
    was = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(ids) - 1, chunk):
            model(torch.tensor([ids[i:i + chunk]], device=next(model.parameters()).device))
            totals = [t + m.last_load.float().cpu() for t, m in zip(totals, moes)]
    model.train(was)
    return [(t / t.sum()).tolist() for t in totals]


def plot_expert_heatmap(loads: list[list[float]], path: Path):
    """expert_heatmap.png: MoE layer x expert, each cell the expert's share of its layer's routed tokens."""
    fig, ax = _figure((7, 0.5 + 0.45 * len(loads)))
    E = len(loads[0])
    im = ax.imshow([[x * E for x in row] for row in loads], aspect="auto", cmap="viridis", vmin=0)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    fig.colorbar(im, ax=ax, label="load / uniform share")
    _write(fig, path)
