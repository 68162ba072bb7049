"""Checkpoint loading: sobre.load vs transformers from_pretrained on the same random DeepSeek-V3 checkpoint.

Each loader runs in its own fresh process; we report wall time and peak RSS (VmHWM), measured in this run.
    python bench/load.py [--gb 1.0]
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import sobre

LOADERS = {
    "sobre": "import sobre; m = sobre.load(sys.argv[1], dtype=torch.float32)",
    "transformers": "from transformers import AutoModelForCausalLM; "
                    "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)",
}
PROBE = """
import sys, time, torch
t0 = time.perf_counter()
{load}
dt = time.perf_counter() - t0
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(dt, peak)
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0, help="approximate fp32 checkpoint size")
    args = ap.parse_args()
    experts = max(4, int(32 * args.gb))
    cfg = sobre.preset("debug", vocab_size=32000, dim=512, n_layers=9, n_heads=8, inter_dim=1024,
                       n_routed_experts=experts - experts % 4, moe_inter_dim=640, n_expert_groups=4,
                       n_limited_groups=2, q_lora_rank=256, kv_lora_rank=256, qk_nope_head_dim=64,
                       qk_rope_head_dim=32, v_head_dim=64, n_mtp_layers=0)
    with tempfile.TemporaryDirectory() as tmp:
        with torch.device("meta"):
            model = sobre.Transformer(cfg)
        model = model.to_empty(device="cpu")
        for p in model.parameters():
            p.data.normal_(0, 0.02)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        sobre.save(model, Path(tmp) / "ckpt", shard_bytes=512 << 20)
        del model
        rows = []
        for name, load in LOADERS.items():
            out = subprocess.run([sys.executable, "-c", PROBE.format(load=load), str(Path(tmp) / "ckpt")],
                                 capture_output=True, text=True, check=True).stdout.split()
            rows.append((name, float(out[0]), int(out[1])))
    print(f"checkpoint: {weights / 1e9:.2f} GB fp32 DeepSeek-V3-style ({cfg.n_routed_experts} experts x 8 MoE layers)")
    print("| loader | seconds | peak RSS GB | peak / weights | time vs transformers |")
    print("|---|---|---|---|---|")
    base = rows[-1][1]
    for name, sec, peak in rows:
        print(f"| {name} | {sec:.2f} | {peak / 1e9:.2f} | {peak / weights:.2f}x | {base / sec:.2f}x |")


if __name__ == "__main__":
    main()
