"""One MoE layer's forward at decode-to-prefill token counts: sobre vs transformers' DeepseekV3MoE.

The same random checkpoint (bench/engine.py's config: 16 experts top-4, hidden 256, expert width 128), layer 1 of
each, no_grad, fp32 (or --dtype bfloat16: both layers' weights and inputs), best of several runs. sobre picks its
CPU path from the rows per expert (one token: routed on the host, moe.Gate.one, then experts.one_token, no sort;
on these small experts, pairs at most the experts: experts.bagged, embedding bags; more tokens in fp32:
experts.every_expert, every expert on every token; else experts.Groups: a loop over the active experts, one
zero-padded bmm (the pairs placed there in token order, experts.padded), oneDNN expert by expert, or
torch._grouped_mm, whose bf16 layout pads each expert's rows to a multiple of 128); the next seven columns force
each layout of the routed experts at every size, to show what the choice buys (the padded bmm twice: with the few
largest experts' rows past C in matmuls of their own, as sobre pads in fp32, and with C the largest count, as before
session 47 and in bf16). The last row routes every token to expert 0 first (both layers' router bias), the skew of a
batch of one prompt's samples.
    python bench/moe.py [--dtype bfloat16]
"""

import argparse
import tempfile
import time

import torch
from engine import CFG

import sobre
from sobre import experts as M
from sobre import linear as L
from sobre.parallel import keep_freed_memory


def best_ms(fns: dict, repeat=15, inner=20) -> dict:
    """Best ms per call of each fn, the fns taking turns (this CPU's speed drifts between runs)."""
    best = {}
    for _ in range(repeat):
        for name, fn in fns.items():
            fn()
            t = time.perf_counter()
            for _ in range(inner):
                fn()
            best[name] = min(best.get(name, 1e9), (time.perf_counter() - t) / inner * 1e3)
    return best


class forced:
    """sobre's MoE with its CPU layout rule changed while it runs (experts.LOOP_EXPERTS, PAD_SLACK, whether
    the routed experts may take oneDNN's layout at any rows, and whether the padded layout may overflow; the
    shared expert keeps its own path; every=True: experts.every_expert at any token count in fp32, bags=True:
    experts.bagged at any, else neither). One token takes the layout too (experts.ONE_TOKEN off: the router's tensor
    path, then sorted)."""

    def __init__(self, moe, loop: float, pad: int, dnn: bool = False, overflow: bool = True, every: bool = False,
                 bags: bool = False):
        self.moe, self.loop, self.pad, self.dnn, self.overflow = moe, loop, pad, dnn, overflow
        self.every, self.bags = every, bags

    def __call__(self, x):
        was = (M.LOOP_EXPERTS, M.PAD_SLACK, M.onednn, M.OVERFLOW_ROWS, M.ONE_TOKEN, M.SMALL_EXPERT_PARAMS,
               M.EVERY_EXPERT_MACS, M.BAG_PAIRS)
        M.LOOP_EXPERTS, M.PAD_SLACK, M.ONE_TOKEN = self.loop, self.pad, False
        M.SMALL_EXPERT_PARAMS = (1 << 62) if self.every or self.bags else 0
        M.EVERY_EXPERT_MACS = (1 << 62) if self.every else 0
        M.BAG_PAIRS = float("inf") if self.bags else 0.0
        # (oneDNN's layout forced on any CPU: sobre itself takes it on AMD CPUs only, linear.ONEDNN)
        M.onednn = lambda a, b, macs=0: self.dnn and L.onednn(a, b, L.ONEDNN_MACS, force=True)
        if not self.overflow:  # an overflow then costs more than any padding: C = the largest count
            M.OVERFLOW_ROWS = 1 << 30
        try:
            return self.moe(x)
        finally:
            (M.LOOP_EXPERTS, M.PAD_SLACK, M.onednn, M.OVERFLOW_ROWS, M.ONE_TOKEN, M.SMALL_EXPERT_PARAMS,
             M.EVERY_EXPERT_MACS, M.BAG_PAIRS) = was


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    dtype = getattr(torch, ap.parse_args().dtype)
    keep_freed_memory()  # as sobre's engines and runs do; the baseline shares it (bench/README.md)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    logging.set_verbosity_error()
    torch.manual_seed(0)
    model = sobre.init_weights(sobre.Transformer(sobre.Config.from_hf(CFG)), std=0.05).eval()
    with tempfile.TemporaryDirectory() as tmp:
        sobre.save(model, tmp)
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).eval()
    model.to(dtype)
    ours, theirs = model.layers[1].ffn, hf.model.layers[1].mlp
    layouts = {"loop": forced(ours, 1.0, 0), "padded": forced(ours, 0.0, 1 << 30),
               "no overflow": forced(ours, 0.0, 1 << 30, overflow=False),
               "grouped": forced(ours, 0.0, -(1 << 30)), "onednn": forced(ours, 0.0, -(1 << 30), True),
               "every": forced(ours, 0.0, 0, every=True), "bags": forced(ours, 0.0, 0, bags=True)}
    E, K = CFG["n_routed_experts"], CFG["num_experts_per_tok"]
    print(f"one MoE layer ({E} experts top-{K}, hidden 256, expert width 128, 1 shared), {dtype}, "
          f"{torch.get_num_threads()} threads")
    print("| tokens | rows per expert (mean / max) | sobre path | sobre ms | loop forced | padded bmm forced | "
          "padded, C = max, forced | _grouped_mm forced | oneDNN forced | every expert forced | bags forced | "
          "transformers ms | "
          "sobre / transformers |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    skew = torch.zeros(E)
    skew[0] = 1.0  # the last row: every token's first choice is expert 0, as a decode batch of one prompt's samples
    with torch.no_grad():
        for n, skewed in [(n, False) for n in (1, 2, 4, 16, 64, 256, 1024)] + [(64, True)]:
            ours.gate.bias.copy_(skew if skewed else 0)
            theirs.gate.e_score_correction_bias.copy_(skew if skewed else 0)
            x = torch.randn(1, n, CFG["hidden_size"], generator=g).to(dtype)
            if dtype == torch.float32:
                assert (ours(x) - theirs(x)).abs().max() < 1e-4  # same layer, same output
            else:  # bf16 rounding flips router ties (both libraries 1-6% off fp32): the layouts agree with the loop
                # (to bf16's rounding: one token's sum takes the shared expert in fp32, the loop adds it in bf16)
                torch.testing.assert_close(ours(x), layouts["loop"](x), rtol=0.02, atol=0.02)
            counts = ours.last_load.tolist()
            top = max(counts)
            ws = ours.experts.w1, ours.experts.w2, ours.experts.w3
            idx = torch.as_tensor(ours.last_idx)  # (a list where one token was routed on the host)
            path = M.inference_path(x[0], idx, E, *ws)  # (the rule itself, on this step's routes)
            path = path.__name__.replace("_", " ") if path else {
                "loop": "loop", "padded": "padded bmm", "grouped": "_grouped_mm", "onednn": "oneDNN"}[
                M.Groups(counts, x[0], ws[0]).mode]
            t = best_ms({"a": lambda x=x: ours(x), **{k: lambda x=x, f=f: f(x) for k, f in layouts.items()},
                         "b": lambda x=x: theirs(x)})
            a, b = t["a"], t["b"]
            label = f"{n} skewed" if skewed else n
            print(f"| {label} | {n * K / E:.1f} / {top} | {path} | {a:.3f} | {t['loop']:.3f} | {t['padded']:.3f} | "
                  f"{t['no overflow']:.3f} | {t['grouped']:.3f} | {t['onednn']:.3f} | {t['every']:.3f} | "
                  f"{t['bags']:.3f} | {b:.3f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
