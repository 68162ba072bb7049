"""One sampling step, logits -> token ids: sobre's `sampling.sample` vs transformers' logits warpers + softmax +
torch.multinomial (what `generate(do_sample=True)` runs per step), on the same fp32 logits, in the same run.

sobre decides top-k / top-p / min-p among each row's best tokens (TOP_CANDIDATES of them, or the largest top-k
when every row sets one below that; one topk) when they hold every token the row keeps, else sorts the vocabulary
(`sampling.sorted_filter`, the reference twin: its column sends every row there), and draws with one uniform per
row (inverse CDF). Logits are Gaussian with the given std per row ("std 6": top-p 0.95 keeps a few hundred
tokens; "std 1": near-flat, thousands kept, so top-p falls back to the sort).
The last column counts the rows whose kept tokens differ between sobre's and transformers' filters, and the most
tokens one such row differs by (top-p's boundary token: the two sum the probabilities in opposite orders).
    python bench/sampling.py [--vocab 32000 129280] [--batch 1 64]
"""

import argparse

import torch
from moe import best_ms
from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from sobre import sampling
from sobre.parallel import keep_freed_memory
from sobre.sampling import SamplingParams

CASES = {  # name -> SamplingParams fields
    "temperature 0.7": dict(temperature=0.7),
    "top-p 0.95": dict(temperature=0.7, top_p=0.95),
    "top-k 50": dict(temperature=0.7, top_k=50),
    "top-k 50, top-p 0.9": dict(temperature=0.7, top_k=50, top_p=0.9),
    "min-p 0.05": dict(temperature=0.7, min_p=0.05),
}


def warpers(kw: dict) -> list:
    """transformers' processors for these settings, in generate's order."""
    out = [TemperatureLogitsWarper(kw["temperature"])]
    if kw.get("top_k"):
        out.append(TopKLogitsWarper(kw["top_k"]))
    if kw.get("top_p", 1.0) < 1:
        out.append(TopPLogitsWarper(kw["top_p"]))
    if kw.get("min_p"):
        out.append(MinPLogitsWarper(kw["min_p"]))
    return out


def hf_filter(logits, procs):
    for p in procs:
        logits = p(None, logits)
    return logits


def hf_sample(logits, procs):
    return torch.multinomial(hf_filter(logits, procs).softmax(dim=-1), 1)[:, 0]


def sorted_sample(logits, params):
    """sobre's reference twin: every row through one sort of the vocabulary (sampling.sorted_filter), then the draw."""
    scaled = logits / logits.new_tensor([p.temperature for p in params])[:, None]
    return sampling.draw(sampling.sorted_filter(scaled, params).softmax(dim=-1), torch.rand(len(params)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 129280])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--std", type=float, nargs="+", default=[6.0, 1.0])
    a = ap.parse_args()
    keep_freed_memory()
    print(f"\nsampling step, fp32, {torch.get_num_threads()} threads: ms per call (best of turns)")
    print("| vocab | batch | logits | filters | sobre ms | sobre, full sort forced | transformers ms | "
          "sobre / transformers | rows kept differently (most tokens) |")
    print("|---|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for V in a.vocab:
        for B in a.batch:
            for std in a.std:
                logits = torch.randn(B, V, generator=g) * std
                for name, kw in CASES.items():
                    print(f"| {V} | {B} | std {std:g} | {name} | {row(logits, kw)}", flush=True)


def row(logits, kw: dict) -> str:
    """The timing columns for one case."""
    B, V = logits.shape
    params, procs = [SamplingParams(**kw)] * B, warpers(kw)
    ours, theirs = sampling.filter_logits(logits, params).isfinite(), hf_filter(logits, procs).isfinite()
    diff = (ours != theirs).sum(1)  # tokens kept by one side only, per row
    ms = best_ms({"sobre": lambda: sampling.sample(logits, params), "sorted": lambda: sorted_sample(logits, params),
                  "hf": lambda: hf_sample(logits, procs)}, repeat=5, inner=min(20, max(1, 2000 // (B * V // 1000 + 1))))
    return (f"{ms['sobre']:.3f} | {ms['sorted']:.3f} | {ms['hf']:.3f} | **{ms['hf'] / ms['sobre']:.2f}x** | "
            f"{int((diff > 0).sum())} ({int(diff.max())}) |")


if __name__ == "__main__":
    main()
