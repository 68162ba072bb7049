"""AdamW vs Muon at equal tokens: `sobre pretrain` of the same preset, data, seed, schedule and learning rate with
each optimizer, for the V3-style model and its V4 twin. Prints validation loss at every evaluation and the
final train loss (mean of the last 10 steps) as a table, and writes the curves to OUT/muon.png.
    python bench/muon.py [--preset tiny] [--steps 200] [--archs deepseek_v3 deepseek_v4] [--out runs/bench-muon]
Muon (sobre/optim.py) orthogonalises the update of every hidden matrix (stacked experts one by one) and scales
it to AdamW's RMS, so one --lr serves both; embeddings, head, norms and biases stay on AdamW in both runs.
"""

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import matplotlib

from sobre.parallel import keep_freed_memory
from sobre.report import read_metrics
from sobre.train import TrainArgs, pretrain


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--archs", nargs="+", default=["deepseek_v3", "deepseek_v4"])
    p.add_argument("--out", default="runs/bench-muon")
    a = p.parse_args()
    keep_freed_memory()  # as sobre's engines and runs do; the baseline shares it (bench/README.md)
    out = Path(a.out)
    runs, minutes = {}, {}
    first = out / f"{a.archs[0]}-adamw"
    for arch in a.archs:
        for opt in ("adamw", "muon"):
            run = out / f"{arch}-{opt}"
            shutil.rmtree(run, ignore_errors=True)
            if run != first:  # the same tokenizer and token shards for every run (prepare() reuses them)
                for d in ("tokenizer", "data"):
                    shutil.copytree(first / d, run / d)
            t0 = time.perf_counter()
            pretrain(TrainArgs(out=str(run), preset=a.preset, arch=arch, optimizer=opt, steps=a.steps,
                               batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr, eval_every=max(a.steps // 5, 1),
                               sample_every=10 * a.steps, save_every=a.steps))
            minutes[arch, opt] = (time.perf_counter() - t0) / 60
            runs[arch, opt] = read_metrics(run)
    evals = sorted({r["step"] for rows in runs.values() for r in rows if "val_loss" in r})
    tokens = a.steps * a.batch_size * a.seq_len
    print(f"\n{a.preset} preset, {a.steps} steps x {a.batch_size} x {a.seq_len} tokens ({tokens:,}), lr {a.lr}, "
          "cosine schedule, same data and seed")
    print("| model | optimizer | " + " | ".join(f"val loss @ {s}" for s in evals) + " | train loss (last 10) | "
          "minutes |")
    print("|---|---|" + "---|" * len(evals) + "---|---|")
    for (arch, opt), rows in runs.items():
        val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
        last = statistics.mean(r["loss"] for r in rows[-10:])
        print(f"| {arch} | {opt} | " + " | ".join(f"{val[s]:.3f}" if s in val else "" for s in evals)
              + f" | {last:.3f} | {minutes[arch, opt]:.1f} |")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (arch, opt), rows in runs.items():
        line = ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], alpha=0.35, lw=0.8)[0]
        ax.plot([r["step"] for r in rows if "val_loss" in r], [r["val_loss"] for r in rows if "val_loss" in r],
                "o-", color=line.get_color(), label=f"{arch} {opt} (val)")
    ax.set(xlabel="step", ylabel="loss", title="AdamW vs Muon at equal tokens (faint: train loss)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "muon.png", dpi=100)
    print(f"curves: {out / 'muon.png'}")


if __name__ == "__main__":
    sys.exit(main())
