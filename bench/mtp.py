"""MTP speculative decoding with a trained MTP module: plain vs speculative greedy decode on the same engine.

    python bench/mtp.py MODEL [MODEL ...] [--prompts 8] [--new 64] [--drafts 1 2]

MODEL: an exported sobre model folder with its MTP module (`sobre pretrain` writes RUN/model), V3- or V4-style;
--drafts: speculative engines drafting this many tokens a step (at most the model's MTP layers; default all).
Prompts: the first 32 tokens of reasoning documents the built-in corpus generates with a seed training did not
use (same distribution, new problems). B = 1, each prompt alone, fp32; tok/s over the new tokens including the
prefill (the same for both), best of 4 passes, plain and speculative passes alternating (this shared CPU's speed
drifts by +-15% within a minute); acceptance = accepted drafts / drafts checked (a draft after a rejected
one is not checked); tokens / step = tokens a speculative step emits (1 + the drafts accepted).
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
    ap.add_argument("--drafts", type=int, nargs="*", help="draft tokens a step (default: one per MTP layer)")
    args = ap.parse_args()
    keep_freed_memory()  # as sobre's engines and runs do; the baseline shares it (bench/README.md)
    print(f"greedy, B=1, {args.prompts} prompts of 32 tokens, {args.new} new tokens each; fp32, "
          f"{torch.get_num_threads()} threads")
    print("| model | arch | drafts | plain tok/s | speculative tok/s | speed-up | acceptance | tokens / step |")
    print("|---|---|---|---|---|---|---|---|")
    for path in args.models:
        plain = Engine.from_pretrained(path, dtype=torch.float32)
        specs = [Engine.from_pretrained(path, dtype=torch.float32, speculative=k) for k in args.drafts or [True]]
        stream = problem_stream(seed=12345)
        prompts = [plain.tokenizer.encode(next(stream).text())[:32] for _ in range(args.prompts)]
        for e in [plain, *specs]:
            e.generate([prompts[0]], max_new_tokens=8)  # warm up
            e.spec_stats = dict.fromkeys(e.spec_stats, 0)
        best = [0.0] * (1 + len(specs))
        for _ in range(4):
            best = [max(b, rate(e, prompts, args.new)) for b, e in zip(best, [plain, *specs])]
        for e, b in zip(specs, best[1:]):
            st = e.spec_stats
            acc, per = st["accepted"] / max(st["drafted"], 1), 1 + st["accepted"] / max(st["verified"], 1)
            print(f"| {path} | {plain.model.config.arch} | {e.drafts} | {best[0]:.1f} | {b:.1f} | {b / best[0]:.2f}x "
                  f"| {acc:.0%} | {per:.2f} |")


if __name__ == "__main__":
    main()
