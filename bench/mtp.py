"""MTP speculative decoding with a trained MTP module: plain vs speculative greedy decode on the same engine.

    python bench/mtp.py MODEL [MODEL ...] [--prompts 8] [--new 64] [--drafts 1 2] [--dtype float32|bfloat16]

MODEL: an exported sobre model folder with its MTP module (`sobre pretrain` writes RUN/model), V3- or V4-style
(README's figure: `sobre pretrain --preset tiny --steps 600 --seq-len 256 --data-bytes 4194304 --model-overrides
n_layers=12 n_mtp_layers=3 --mtp-weight 0.6`, 19 minutes on 2 cores, then --drafts 3);
--drafts: speculative engines drafting this many tokens a step (at most the model's MTP layers; default all).
Prompts: the first 32 tokens of reasoning documents the built-in corpus generates with a seed training did not
use (same distribution, new problems). B = 1, each prompt alone, fp32 (--dtype); tok/s over the new tokens including the
prefill (the same for both); the plain and speculative engines take turns on every prompt (--rounds passes over the
prompts; this shared CPU's speed drifts by +-15% within a minute): the tok/s columns are the best pass, the
speed-up the median over rounds of speculative / plain in the same round; acceptance = accepted drafts / drafts
proposed (K a step, as vLLM counts);
tokens / step = tokens a speculative step emits (1 + the drafts accepted).
The last two columns, each run in the same turns: the same speculative engine with the plan off (plan.ON: its
verify and MTP drafts through the modules) and the plan's speed-up over it; the speculative engine whose drafts
score every token id (draft_vocab = V, where the default scores the first quarter: speculative.draft_vocabulary)
and the default's speed-up over it (medians of the rounds' ratios). --draft-vocab N: the speculative engines' N.
"""

import argparse
import statistics
import time
from unittest import mock

import torch

from sobre import plan
from sobre.engine import Engine
from sobre.parallel import keep_freed_memory
from sobre.tasks import problem_stream


def rates(engines: list[tuple[Engine, bool]], prompts: list[list[int]], new: int) -> list[float]:
    """tok/s of each (engine, plan.ON) over the prompts, the engines taking turns on every prompt (so that the CPU's
    drift moves them alike)."""
    secs, toks = [0.0] * len(engines), [0] * len(engines)
    for p in prompts:
        for i, (e, on) in enumerate(engines):
            with mock.patch.object(plan, "ON", on):
                t0 = time.perf_counter()
                toks[i] += len(e.generate([p], max_new_tokens=new)[0])
                secs[i] += time.perf_counter() - t0
    return [n / s for n, s in zip(toks, secs)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=6, help="passes of every engine in turn")
    ap.add_argument("--drafts", type=int, nargs="*", help="draft tokens a step (default: one per MTP layer)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weights and caches")
    ap.add_argument("--draft-vocab", type=int, default=None, help="the drafts' token ids (default: the engine's)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    keep_freed_memory()  # as sobre's engines and runs do; the baseline shares it (bench/README.md)
    print(f"greedy, B=1, {args.prompts} prompts of 32 tokens, {args.new} new tokens each; {args.dtype}, "
          f"{torch.get_num_threads()} threads")
    print("| model | arch | drafts | plain tok/s | speculative tok/s | speed-up | acceptance | tokens / step | "
          "sequences that stopped drafting | speculative on the module path tok/s (plan / modules) | "
          "drafts over all ids tok/s (draft vocabulary / all) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for path in args.models:
        plain = Engine.from_pretrained(path, dtype=dtype)
        specs = [Engine.from_pretrained(path, dtype=dtype, speculative=k, draft_vocab=args.draft_vocab)
                 for k in args.drafts or [True]]
        # the same speculative engines' steps on the module path (plan.ON off: the verify and drafts not planned)
        mods = [Engine.from_pretrained(path, dtype=dtype, speculative=e.drafts, draft_vocab=args.draft_vocab)
                for e in specs]
        V = plain.model.config.vocab_size  # ... and with drafts over every token id
        alls = [Engine.from_pretrained(path, dtype=dtype, speculative=e.drafts, draft_vocab=V) for e in specs]
        stream = problem_stream(seed=12345)
        prompts = [plain.tokenizer.encode(next(stream).text())[:32] for _ in range(args.prompts)]
        for e in [plain, *specs, *mods, *alls]:
            e.generate([prompts[0]], max_new_tokens=8)  # warm up
            e.spec_stats = dict.fromkeys(e.spec_stats, 0)
        runs = [(plain, True), *[(e, True) for e in specs], *[(e, False) for e in mods], *[(e, True) for e in alls]]
        rounds = [rates(runs, prompts, args.new) for _ in range(args.rounds)]
        best = [max(r) for r in zip(*rounds)]
        for j, e in enumerate(specs, start=1):
            m, a = j + len(specs), j + 2 * len(specs)  # its module-path twin's column, its all-ids twin's
            st, ratio = e.spec_stats, statistics.median(r[j] / r[0] for r in rounds)
            planned = statistics.median(r[j] / r[m] for r in rounds)
            narrowed = statistics.median(r[j] / r[a] for r in rounds)
            acc, per = st["accepted"] / max(st["drafted"], 1), 1 + st["accepted"] / max(st["verified"], 1)
            print(f"| {path} | {plain.model.config.arch} | {e.drafts} | {best[0]:.1f} | {best[j]:.1f} | {ratio:.2f}x "
                  f"| {acc:.0%} | {per:.2f} | {st['stopped']} of {args.prompts * args.rounds} | {best[m]:.1f} "
                  f"({planned:.2f}x) | {best[a]:.1f} ({narrowed:.2f}x) |")


if __name__ == "__main__":
    main()
