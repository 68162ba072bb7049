"""MTP speculative decoding with a trained MTP module: plain vs speculative greedy decode on the same engine.

    python bench/mtp.py MODEL [MODEL ...] [--prompts 8] [--new 64]

MODEL: an exported sobre model folder with its MTP module (`sobre pretrain` writes RUN/model), V3- or V4-style.
Prompts: the first 32 tokens of reasoning documents the built-in corpus generates with a seed training did not
use (same distribution, new problems). B = 1, each prompt alone, fp32; tok/s over the new tokens including the
prefill (the same for both), best of 4 passes, plain and speculative passes alternating (this shared CPU's speed
drifts by +-15% within a minute); acceptance = accepted drafts / drafted.
"""

import argparse
import time

import torch

from sobre.engine import Engine
from sobre.parallel import keep_freed_memory
from sobre.tasks import problem_stream


def rate(engine: Engine, prompts: list[list[int]], new: int) -> float:
    t0, n = time.perf_counter(), 0
    for p in prompts:
        n += len(engine.generate([p], max_new_tokens=new)[0])
    return n / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    args = ap.parse_args()
    keep_freed_memory()  # as sobre's engines and runs do; the baseline shares it (bench/README.md)
    print(f"greedy, B=1, {args.prompts} prompts of 32 tokens, {args.new} new tokens each; fp32, "
          f"{torch.get_num_threads()} threads")
    print("| model | arch | plain tok/s | speculative tok/s | speed-up | acceptance |")
    print("|---|---|---|---|---|---|")
    for path in args.models:
        plain = Engine.from_pretrained(path, dtype=torch.float32)
        spec = Engine.from_pretrained(path, dtype=torch.float32, speculative=True)
        stream = problem_stream(seed=12345)
        prompts = [plain.tokenizer.encode(next(stream).text())[:32] for _ in range(args.prompts)]
        for e in (plain, spec):
            e.generate([prompts[0]], max_new_tokens=8)  # warm up
        a = b = 0.0
        for _ in range(4):
            a, b = max(a, rate(plain, prompts, args.new)), max(b, rate(spec, prompts, args.new))
        acc = spec.spec_stats["accepted"] / max(spec.spec_stats["drafted"], 1)
        print(f"| {path} | {plain.model.config.arch} | {a:.1f} | {b:.1f} | {b / a:.2f}x | {acc:.0%} |")


if __name__ == "__main__":
    main()
