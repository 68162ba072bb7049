"""Decode of a dense R1-Distill-style model (Qwen2 layout, random weights): sobre's engine vs transformers'
generate, fp32 and bf16, at B=1 (and --batches), in the same run. The shape defaults to Qwen2-0.5B's
(DeepSeek-R1-Distill-Qwen-1.5B: --hidden 1536 --inter 8960 --layers 28 --heads 12). At B=1 a step reads every
weight once: in bf16 sobre's linear layers multiply one row as a matrix-vector product (sobre/linear.py),
transformers' go through F.linear; batches run bf16 matmuls on the CPU's AMX units where it has them.
    python bench/dense.py [--hidden 896 --inter 4864 --layers 24 --heads 14 --kv-heads 2] [--new 64] [--rounds 3]
                          [--batches 1 16] [--int8] [--rule auto|mv|linear|both]
--int8 adds sobre with weight-only int8 (sobre/int8.py), timed against transformers' faster dtype.
--rule: how sobre multiplies one bf16 row (sobre.linear.BF16_ROW): auto (the product this CPU runs faster, timed
once a process), mv or linear forced, or both forced in turns beside transformers (a row each).
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

import sobre
from sobre.engine import Engine
from sobre.parallel import keep_freed_memory

sys.path.insert(0, str(Path(__file__).parent))
from engine import hf_rate, sobre_rate  # noqa: E402


def add_shape_flags(ap):
    """The dense model's shape (default: Qwen2-0.5B's, the R1-Distill-Qwen layout)."""
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--inter", type=int, default=4864)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--heads", type=int, default=14)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=151936)


def random_qwen2(a) -> sobre.Transformer:
    """A random Qwen2-layout model of add_shape_flags' shape (tied head, as Qwen2-0.5B)."""
    cfg = dict(model_type="qwen2", vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.inter,
               num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
               max_position_embeddings=4096, rope_theta=1e6, tie_word_embeddings=True, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    return sobre.init_weights(sobre.Transformer(sobre.Config.from_hf(cfg)), std=0.02)


def main():
    ap = argparse.ArgumentParser()
    add_shape_flags(ap)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="sobre and transformers take turns this many times")
    ap.add_argument("--batches", type=int, nargs="+", default=[1], help="sequences decoded together")
    ap.add_argument("--int8", action="store_true", help="also sobre with int8 weights (Engine(int8=True))")
    ap.add_argument("--rule", choices=("auto", "mv", "linear", "both"), default="auto",
                    help="one bf16 row's product in sobre (sobre.linear.BF16_ROW)")
    a = ap.parse_args()
    keep_freed_memory()  # as sobre's engines do; the baseline shares it (bench/README.md)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    logging.set_verbosity_error()
    model = random_qwen2(a)
    n_params = sum(p.numel() for p in model.parameters())
    prompts = torch.randint(2, a.vocab, (max(a.batches), a.prompt), generator=torch.Generator().manual_seed(0))
    print(f"random Qwen2-layout model: {n_params / 1e9:.2f}B parameters (hidden {a.hidden}, {a.layers} layers, "
          f"vocab {a.vocab}); {a.prompt}-token prompts, {a.new} new tokens each, greedy; {torch.get_num_threads()} "
          f"threads; best of {a.rounds} turns each")
    print("| dtype | batch | sobre tok/s | transformers tok/s | sobre / transformers |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        sobre.save(model, tmp, dtype=torch.bfloat16)
        del model
        rows = {}
        for dtype in (torch.float32, torch.bfloat16):
            eng = Engine.from_pretrained(tmp, dtype=dtype, max_batch=max(a.batches),
                                         cache_tokens=max(a.batches) * (a.prompt + a.new + 64))
            hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).eval()
            rules = [None] if dtype == torch.float32 or a.rule == "auto" else \
                ["mv", "linear"] if a.rule == "both" else [a.rule]
            for B in a.batches:
                ours, theirs = {r: [] for r in rules}, []
                for _ in range(a.rounds):  # sobre (each rule) and transformers take turns
                    for r in rules:
                        sobre.linear.BF16_ROW = r or sobre.linear.BF16_ROW
                        ours[r].append(sobre_rate(eng, prompts[:B], a.new))
                    theirs.append(hf_rate(hf, prompts[:B], a.new))
                for r in rules:
                    rows[dtype, B] = max(ours[r]), max(theirs)
                    name = str(dtype).removeprefix("torch.") + (f", one row: {r}" if r else "")
                    print(f"| {name} | {B} | {rows[dtype, B][0]:.1f} | "
                          f"{rows[dtype, B][1]:.1f} | {rows[dtype, B][0] / rows[dtype, B][1]:.2f}x |")
            del eng, hf
        if a.rule == "auto":
            print(f"(one bf16 row's product on this CPU, timed: {sobre.linear.bf16_row_op()})")
        for B in a.batches:
            f32, b16 = rows[torch.float32, B], rows[torch.bfloat16, B]  # (with --rule both: linear's)
            print(f"| bf16 / fp32 | {B} | {b16[0] / f32[0]:.2f}x | {b16[1] / f32[1]:.2f}x | |")
        if a.int8:  # no int8 baseline in transformers itself: against its faster dtype, and sobre's fp32 again,
            eng = Engine.from_pretrained(tmp, dtype=torch.float32, int8=True, max_batch=max(a.batches),  # in turns
                                         cache_tokens=max(a.batches) * (a.prompt + a.new + 64))
            f32 = Engine.from_pretrained(tmp, dtype=torch.float32, max_batch=max(a.batches),
                                         cache_tokens=max(a.batches) * (a.prompt + a.new + 64))
            for B in a.batches:
                q, f = [], []
                for _ in range(a.rounds):
                    q.append(sobre_rate(eng, prompts[:B], a.new))
                    f.append(sobre_rate(f32, prompts[:B], a.new))
                best = max(rows[torch.float32, B][1], rows[torch.bfloat16, B][1])
                print(f"| int8 weights (`--int8`), fp32 activations | {B} | {max(q):.1f} | {best:.1f} (its faster "
                      f"dtype) | {max(q) / best:.2f}x ({max(q) / max(f):.2f}x sobre fp32 in the same turns) |")


if __name__ == "__main__":
    main()
