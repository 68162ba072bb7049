"""One MoE layer's forward at decode-to-prefill token counts: sobre vs transformers' DeepseekV3MoE.

The same random checkpoint (bench/engine.py's config: 16 experts top-4, hidden 256, expert width 128), layer 1
of each, no_grad, fp32, best of several runs. sobre picks its CPU path from the rows per expert (experts.Groups:
a loop over the active experts, one zero-padded bmm, or torch._grouped_mm); the third column forces
_grouped_mm wherever padded_mm would run, to show what the padded path buys.
    python bench/moe.py
"""

import tempfile
import time

import torch
from engine import CFG

import sobre
from sobre import experts as M


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


class forced_grouped:
    """sobre's MoE with padded_mm switched off (PAD_ROWS = 0) while it runs."""

    def __init__(self, moe):
        self.moe = moe

    def __call__(self, x):
        pad, M.PAD_ROWS = M.PAD_ROWS, 0
        try:
            return self.moe(x)
        finally:
            M.PAD_ROWS = pad


def main():
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    logging.set_verbosity_error()
    torch.manual_seed(0)
    model = sobre.init_weights(sobre.Transformer(sobre.Config.from_hf(CFG)), std=0.05).eval()
    with tempfile.TemporaryDirectory() as tmp:
        sobre.save(model, tmp)
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    ours, theirs = model.layers[1].ffn, hf.model.layers[1].mlp
    forced = forced_grouped(ours)
    E, K = CFG["n_routed_experts"], CFG["num_experts_per_tok"]
    print(f"one MoE layer ({E} experts top-{K}, hidden 256, expert width 128, 1 shared), fp32, "
          f"{torch.get_num_threads()} threads")
    print("| tokens | rows per expert (mean / max) | sobre path | sobre ms | sobre, _grouped_mm forced ms | "
          "transformers ms | sobre / transformers |")
    print("|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in (1, 4, 16, 64, 256, 1024):
            x = torch.randn(1, n, CFG["hidden_size"], generator=g)
            assert (ours(x) - theirs(x)).abs().max() < 1e-4  # same layer, same output
            counts = ours.last_load.tolist()
            active, top = sum(1 for c in counts if c), max(counts)
            path = "loop" if 4 * active <= E else "padded bmm" if top <= M.PAD_ROWS else "_grouped_mm"
            t = best_ms({"a": lambda x=x: ours(x), "forced": lambda x=x: forced(x), "b": lambda x=x: theirs(x)})
            a, b = t["a"], t["b"]
            print(f"| {n} | {n * K / E:.1f} / {top} | {path} | {a:.3f} | {t['forced']:.3f} | {b:.3f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
