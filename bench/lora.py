"""Fine-tuning a dense R1-Distill-style model (Qwen2 layout, random weights) on the CPU: every weight (AdamW) vs
LoRA adapters (rank 16, alpha 32, every linear layer of the blocks), sobre vs transformers (+ peft for LoRA), fp32;
and sobre's LoRA on the model's weights in int8 (`sft --int8`).
Each setting runs in its own process, so each peak memory (max RSS: weights, gradients, optimizer state,
activations, and the freed memory malloc keeps, sobre.parallel.keep_freed_memory) is its own; "in use between
steps" is the RSS after the last step with malloc's free memory given back (malloc_trim): what the run holds.
Shape default: Qwen2-0.5B's.
    python bench/lora.py [--hidden 896 --inter 4864 --layers 24 --heads 14 --kv-heads 2] [--seq 256] [--steps 3]
"""

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import sobre
from sobre.parallel import keep_freed_memory

sys.path.insert(0, str(Path(__file__).parent))
from dense import add_shape_flags, random_qwen2  # noqa: E402

RANK, ALPHA = 16, 32
SETTINGS = ("sobre full", "sobre LoRA", "sobre LoRA, int8 weights", "transformers full", "transformers + peft LoRA")


def worker(setting: str, path: str, seq: int, steps: int) -> dict:
    """Load the checkpoint at `path`, take `steps` AdamW steps on one random row of seq tokens; the first is a
    warm-up. -> seconds a step (median of the rest), trainable parameters, peak RSS."""
    keep_freed_memory()
    x = torch.randint(2, 1000, (1, seq + 1), generator=torch.Generator().manual_seed(0))
    if setting.startswith("sobre"):
        from sobre.lora import add_lora
        from sobre.model import head_loss
        from sobre.train import adamw, param_groups
        int8 = "int8" in setting  # (sft --int8: the frozen weights in int8, the head kept)
        model = sobre.load(path, dtype=torch.float32, int8=int8, int8_skip=("head",)).train()
        if "LoRA" in setting:
            add_lora(model, RANK, ALPHA)
        opt = adamw(param_groups(model, 0.0), 1e-4)

        def loss():
            return head_loss(model.head, model.hidden(x[:, :-1]), x[:, 1:])
    else:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
        if "LoRA" in setting:
            from peft import LoraConfig, get_peft_model
            model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear"))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)

        def loss():
            return model(input_ids=x, labels=x).loss
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    rest = sorted(times[1:])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # what is still in use between steps, without malloc's kept free memory
    live = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    return {"s_per_step": rest[len(rest) // 2], "trainable": sum(p.numel() for p in model.parameters()
                                                                 if p.requires_grad), "peak_gb": peak, "live_gb": live}


def main():
    ap = argparse.ArgumentParser()
    add_shape_flags(ap)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="AdamW steps a setting; the first is a warm-up")
    ap.add_argument("--worker", choices=SETTINGS, help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.path, a.seq, a.steps)))
        return
    model = random_qwen2(a)
    n = sum(p.numel() for p in model.parameters())
    print(f"random Qwen2-layout model: {n / 1e9:.2f}B parameters (hidden {a.hidden}, {a.layers} layers, vocab "
          f"{a.vocab}); one {a.seq}-token row a step, AdamW, fp32; LoRA rank {RANK}, alpha {ALPHA} on q/k/v/o/gate/"
          f"up/down; {torch.get_num_threads()} threads; median of {a.steps - 1} steps after a warm-up")
    print("| setting | trainable params | s / step | peak memory (max RSS) | in use between steps |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        sobre.save(model, tmp)
        del model
        rows = {}
        for s in SETTINGS:
            out = subprocess.run([sys.executable, __file__, "--worker", s, "--path", tmp, "--seq", str(a.seq),
                                  "--steps", str(a.steps)], capture_output=True, text=True)
            if out.returncode:
                print(f"| {s} | failed: {out.stderr.strip().splitlines()[-1]} | | | |")
                continue
            r = rows[s] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {s} | {r['trainable'] / 1e6:.1f}M | {r['s_per_step']:.2f} | {r['peak_gb']:.2f} GB | "
                  f"{r['live_gb']:.2f} GB |", flush=True)
    for mine, theirs in (("sobre LoRA", "transformers + peft LoRA"), ("sobre full", "transformers full"),
                         ("sobre LoRA", "sobre full"), ("sobre LoRA, int8 weights", "sobre LoRA")):
        if mine in rows and theirs in rows:
            print(f"{mine} vs {theirs}: {rows[theirs]['s_per_step'] / rows[mine]['s_per_step']:.2f}x the speed, "
                  f"{rows[mine]['peak_gb'] / rows[theirs]['peak_gb']:.2f}x the memory")


if __name__ == "__main__":
    main()
