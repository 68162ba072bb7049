"""Training throughput: sobre vs transformers' DeepseekV3 on the same config and batch, in the same run
(forward + backward + fused AdamW step, fp32 and bf16 autocast, no MTP in either; each computes the loss as its
trainer does: sobre without materialising the logits, loss.head_cross_entropy), then sobre's `pretrain` with 1
vs 2 processes. The fp32 rows come with their floor: each step's matmul FLOPs (counted by torch's
FlopCounterMode) at this CPU's best fp32 matmul rate over a few of the step's shapes (MKL's or oneDNN's), the
time no eager step can beat without doing fewer FLOPs.
    python bench/train.py [--steps 10] [--no-scaling] [--device cuda]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from math import prod
from pathlib import Path

import torch
import torch.nn.functional as F

import sobre
from sobre.parallel import keep_freed_memory
from sobre.train import compile_blocks

sys.path.insert(0, str(Path(__file__).parent))
from engine import CFG  # noqa: E402  the engine benchmark's model

B, T = 8, 256
DEV = torch.device("cpu")


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize(DEV)


def step_times(runs, steps, bf16=False):
    """Median seconds of a training step for each (model, loss_fn): loss_fn(inputs, targets) -> loss, backward,
    AdamW (fused: the default of `sobre pretrain` and of transformers' Trainer on torch >= 2.8). The models take
    turns, one step each on the same batch, so a drifting machine slows them alike."""
    opts = [torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True) for model, _ in runs]
    g = torch.Generator().manual_seed(0)
    times = [[] for _ in runs]
    for _ in range(steps + 2):
        x = torch.randint(0, CFG["vocab_size"], (B, T + 1), generator=g).to(DEV)
        for (_, loss_fn), opt, t in zip(runs, opts, times):
            sync()
            t0 = time.perf_counter()
            with torch.autocast(DEV.type, dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(x[:, :-1], x[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            t.append(time.perf_counter() - t0)
    return [statistics.median(t[2:]) for t in times]  # the first two warm up


def matmul_flops(loss_fn, x) -> float:
    """FLOPs of the matmuls in one forward + backward (FlopCounterMode, which leaves out torch._grouped_mm and
    the in-place addmm_: counted here as 2 x multiply-adds)."""
    from torch.utils.flop_counter import FlopCounterMode
    aten = torch.ops.aten

    def addmm(_, a, b, *args, out_shape=None, **kw):
        return 2 * a[0] * a[1] * b[1]

    def grouped(a, b, *args, out_shape=None, **kw):  # [m, k] x [E, k, n], or groups along k: [m, K] x [K, n]
        return 2 * a[0] * a[1] * b[-1] if len(a) == 2 else 2 * prod(out_shape) * a[-1]

    onednn, sobre.linear.ONEDNN = sobre.linear.ONEDNN, False  # (the counter does not see oneDNN's products: the
    try:  # same products through F.linear and torch.mm instead)
        with FlopCounterMode(display=False, custom_mapping={aten._grouped_mm: grouped, aten.addmm_: addmm}) as fc:
            loss_fn(x[:, :-1], x[:, 1:]).backward()
    finally:
        sobre.linear.ONEDNN = onednn
    return fc.get_total_flops()


def best_matmul_rate(reps: int = 10) -> float:
    """FLOP/s of this device's fastest fp32 matmul among some of the step's shapes (the head's, the dense MLP's, an
    expert's), best of reps; on the CPU the best of torch.mm (MKL) and, where sobre.linear uses it (AMD CPUs:
    linear.ONEDNN), oneDNN."""
    best, D, F_, V = 0.0, CFG["hidden_size"], CFG["intermediate_size"], CFG["vocab_size"]
    for m, k, n in ((B * T, D, V), (B * T, D, F_), (B * T, F_, D), (512, D, CFG["moe_intermediate_size"])):
        a, b = torch.randn(m, k, device=DEV), torch.randn(k, n, device=DEV)
        bt = b.t().contiguous()
        products = [lambda a=a, b=b: a @ b]
        if DEV.type == "cpu" and sobre.linear.ONEDNN:
            products.append(lambda a=a, bt=bt: sobre.linear.dnn(a, bt))
        for product in products:
            for _ in range(reps):
                sync()
                t0 = time.perf_counter()
                product()
                sync()
                best = max(best, 2 * m * k * n / (time.perf_counter() - t0))
    return best


def scaling(steps):
    """tokens/s of `sobre pretrain` (tiny preset, B=8, T=256) with 1 and 2 processes on the same data."""
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // 2))}
    with tempfile.TemporaryDirectory() as tmp:
        rates = {}
        for procs in (1, 2):
            run = Path(tmp) / f"p{procs}"
            args = ["-m", "sobre", "pretrain", "--preset", "tiny", "--out", str(run), "--steps", str(steps),
                    "--save-every", str(steps), "--batch-size", str(B), "--seq-len", str(T), "--eval-every", "1000",
                    "--sample-every", "1000", "--data-bytes", str(2 << 20)]
            if procs == 1:
                cmd = [sys.executable] + args
            else:
                run.mkdir()
                for d in ("tokenizer", "data"):  # the same tokenised data as the 1-process run
                    os.symlink(Path(tmp) / "p1" / d, run / d)
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                       "--no-python", sys.executable] + args
            subprocess.run(cmd, check=True, capture_output=True, env=env if procs > 1 else os.environ)
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            rates[procs] = statistics.median(r["tokens_per_s"] for r in rows[2:])
    return rates


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-scaling", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time sobre with its blocks torch.compile'd")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (TF32 off: the fp32 rows stay fp32)")
    args = ap.parse_args()
    global DEV
    DEV = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    keep_freed_memory()  # as sobre's engines and runs do; the baseline shares it (bench/README.md)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    logging.set_verbosity_error()
    cfg = dict(CFG, num_nextn_predict_layers=0)
    torch.manual_seed(0)
    ours = sobre.init_weights(sobre.Transformer(sobre.Config.from_hf(cfg)), std=0.05).train()
    with tempfile.TemporaryDirectory() as tmp:
        sobre.save(ours, tmp)
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).to(DEV).train()
    ours.to(DEV)
    print(f"random DeepSeek-V3 (bench/engine.py config, no MTP), B={B}, T={T}, AdamW, " +
          (torch.cuda.get_device_name(DEV) if DEV.type == "cuda" else f"{torch.get_num_threads()} threads"))
    print("| measure | sobre | transformers | sobre / transformers |")
    print("|---|---|---|---|")
    hf_fp32 = None
    def sobre_loss(x, y):  # as `sobre pretrain` computes it: the head's cross-entropy in row chunks
        return ours(x, targets=y)[0]

    def hf_loss(x, y):  # (HF's own loss_function upcasts the logits to fp32 the same way)
        return F.cross_entropy(hf(x).logits.flatten(0, 1).float(), y.flatten())

    for bf16 in (False, True):
        a, b = step_times([(ours, sobre_loss), (hf, hf_loss)], args.steps, bf16)
        hf_fp32 = hf_fp32 or b
        print(f"| training tokens/s (fwd + bwd + step), {'bf16 autocast' if bf16 else 'fp32'} | {B * T / a:.0f} | "
              f"{B * T / b:.0f} | {b / a:.2f}x |")
        if not bf16:
            x = torch.randint(0, CFG["vocab_size"], (B, T + 1)).to(DEV)
            flops = [matmul_flops(f, x) for f in (sobre_loss, hf_loss)]
            ours.zero_grad(set_to_none=True)
            hf.zero_grad(set_to_none=True)
            rate = best_matmul_rate()
            floors = [f / rate for f in flops]
            print(f"| fp32 matmul floor: the step's GFLOP at this {DEV.type.upper()}'s best fp32 matmul rate "
                  f"({rate / 1e9:.0f} GFLOP/s) | {flops[0] / 1e9:.1f} GFLOP, {B * T / floors[0]:.0f} tok/s "
                  f"(step = {a / floors[0]:.2f}x the floor) | {flops[1] / 1e9:.1f} GFLOP, "
                  f"{B * T / floors[1]:.0f} tok/s (step = {b / floors[1]:.2f}x the floor) | |")
    if args.compile:  # the first two steps (compiling) are left out of the median, as every warm-up
        compile_blocks(ours)
        a, = step_times([(ours, sobre_loss)], args.steps)
        print(f"| the same, fp32, `--compile` (each block torch.compile'd) | {B * T / a:.0f} | {B * T / hf_fp32:.0f} | "
              f"{hf_fp32 / a:.2f}x |")
    if not args.no_scaling:
        r = scaling(args.steps + 2)
        print(f"| `sobre pretrain --preset tiny` tokens/s, 1 vs 2 processes (gloo, same cores) | {r[1]:.0f} | "
              f"{r[2]:.0f} (2 procs) | {r[2] / r[1]:.2f}x scaling |")


if __name__ == "__main__":
    main()
