"""Decode speed: sobre's Engine vs transformers `generate` on the same random DeepSeek-V3 checkpoint.

Both run greedy, in the same process, same dtype and threads. Decode speed excludes prefill: every
token is timestamped (sobre: per engine step; transformers: a streamer) and we time first -> last token.
Decode ms/token by context: sobre's contexts each on an engine of the same model, their steps taken in turns
(step_ms: a drifting CPU moves them alike); transformers' `generate` per context, the contexts in turn.
    python bench/engine.py [--quick] [--dtype float32|bfloat16] [--device cuda]
"""

import argparse
import statistics
import tempfile
import time
from unittest import mock

import torch

import sobre
from sobre import absorb, plan
from sobre.engine import Engine
from sobre.parallel import keep_freed_memory

CFG = dict(model_type="deepseek_v3", vocab_size=8192, hidden_size=256, intermediate_size=768,
           moe_intermediate_size=128, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
           n_shared_experts=1, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
           first_k_dense_replace=1, kv_lora_rank=64, q_lora_rank=96, qk_rope_head_dim=32, qk_nope_head_dim=32,
           v_head_dim=32, max_position_embeddings=8192, routed_scaling_factor=2.5, num_nextn_predict_layers=1,
           tie_word_embeddings=False)
NARROWED = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "kv_lora_rank", "q_lora_rank",
            "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")  # the floor row's model: these / 8


class Clock:
    """transformers streamer that timestamps every token; put() first receives the prompt."""

    def __init__(self):
        self.times = []

    def put(self, value):
        value.cpu()  # (on a GPU: the step is done when its token is read back)
        self.times.append(time.perf_counter())

    def end(self):
        pass


def decode_rate(times, counts):
    """Tokens/s after the step that emitted the first tokens (the prefill's last step: a long prompt is prefilled
    in chunks, one a step, emitting nothing before): times[i] ends a step that emitted counts[i]."""
    first = next(i for i, c in enumerate(counts) if c)
    return sum(counts[first + 1:]) / (times[-1] - times[first])


def sobre_rate(engine, prompts: torch.Tensor, n: int) -> float:
    """Decode tok/s of the engine on prompts [B, L], n new tokens each."""
    for p in prompts.tolist():
        engine.add_request(p, max_new_tokens=n)
    times, counts = [], []
    while engine.has_work():
        counts.append(len(engine.step()))
        times.append(time.perf_counter())
    engine.collect()
    return decode_rate(times, counts)


def step_ms(engines: dict[int, Engine], n: int, vocab: int, g: torch.Generator) -> dict[int, float]:
    """Decode ms a step of one sequence at each context (context -> an engine, all sharing one model): a prompt of
    that many tokens each, then n decode steps taken in turns, one engine's step then the next's (this CPU's speed
    drifts within seconds: turns a few ms apart see the same machine). The median step of each."""
    for ctx, e in engines.items():
        e.add_request(torch.randint(2, vocab, (ctx,), generator=g).tolist(), max_new_tokens=n + 1)
        while not e.step():  # the prompt, in chunks, until its first token
            pass
    times = {ctx: [] for ctx in engines}
    for i in range(n):
        for ctx, e in (engines.items() if i % 2 else reversed(engines.items())):  # (each goes first in turn)
            t = time.perf_counter()
            e.step()
            times[ctx].append(time.perf_counter() - t)
    for e in engines.values():
        while e.has_work():
            e.step()
        e.collect()
    return {ctx: 1e3 * statistics.median(t) for ctx, t in times.items()}


def hf_rate(hf, prompts: torch.Tensor, n: int) -> float:
    """Decode tok/s of transformers' greedy generate on prompts [B, L], n new tokens each."""
    clock = Clock()
    with torch.no_grad():
        hf.generate(prompts, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, streamer=clock)
    return decode_rate(clock.times[1:], [len(prompts)] * (len(clock.times) - 1))  # times[0] is the prompt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="shorter prompts and contexts (smoke run)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--compile", action="store_true",
                    help="also time Engine(compile=True) (its B=1 and largest compiled batch)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (TF32 off: the fp32 rows stay fp32)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    keep_freed_memory()  # as sobre's engines and runs do; the baseline shares it (bench/README.md)
    dtype = getattr(torch, args.dtype)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    logging.set_verbosity_error()

    torch.manual_seed(0)
    model = sobre.init_weights(sobre.Transformer(sobre.Config.from_hf(CFG)), std=0.05)
    with tempfile.TemporaryDirectory() as tmp:
        sobre.save(model, tmp)
        ours = Engine.from_pretrained(tmp, dtype=dtype, device=dev, max_batch=16, cache_tokens=16 * 700 + 8192)
        # the untrained MTP head: drafting every step (min_acceptance=0: the verify's cost), and by default (a
        # sequence stops drafting once its drafts prove rarely accepted, after speculative.PROBATION verifies)
        specs = {m: Engine.from_pretrained(tmp, dtype=dtype, device=dev, max_batch=1, cache_tokens=8192,
                                           speculative=True, min_acceptance=m) for m in (0.0, 0.3)}
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(dev).eval()
        compiled = args.compile and Engine.from_pretrained(tmp, dtype=dtype, device=dev, max_batch=16,
                                                           cache_tokens=16 * 700 + 8192, compile=True)
    g = torch.Generator().manual_seed(0)

    def prompts(B, L):
        return torch.randint(2, CFG["vocab_size"], (B, L), generator=g)

    def gen_sobre(B, L, n, engine=None):
        return sobre_rate(engine or ours, prompts(B, L), n)

    def gen_hf(B, L, n):
        return hf_rate(hf, prompts(B, L).to(dev), n)

    def paired(B, L, n, repeat=3):  # best tok/s of sobre and of transformers, taking turns (the CPU drifts)
        a = b = 0.0
        for _ in range(repeat):
            a, b = max(a, gen_sobre(B, L, n)), max(b, gen_hf(B, L, n))
        return a, b

    plen, n = (128, 32) if args.quick else (512, 128)
    print(f"random DeepSeek-V3: vocab 8192, hidden 256, 4 layers, 16 experts top-4, kv_lora 64, q_lora 96; "
          f"{args.dtype}, " + (torch.cuda.get_device_name(dev) if dev.type == "cuda" else
                               f"{torch.get_num_threads()} threads"))
    print("| measure | sobre | transformers | sobre / transformers |")
    print("|---|---|---|---|")
    rates = {}  # B -> (sobre, transformers) tok/s
    for B in (1, 16):
        a, b = rates[B] = paired(B, plen, n)
        print(f"| decode tok/s, B={B}, {plen}-token prompt, {n} new | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
    ctxs = (256, 1024) if args.quick else (256, 1024, 4096)
    # sobre: an engine a context on the same model, their decode steps in turns (step_ms), best of 3 rounds;
    # transformers' generate cannot take turns a step: its contexts in turn, each round (best ms/token of 3)
    engines = {ctx: Engine(ours.model, max_batch=1, cache_tokens=ctx + 256) for ctx in ctxs}
    growth = dict.fromkeys(ctxs, (float("inf"), float("inf")))  # best ms/token of sobre, transformers
    for _ in range(3):
        ms = step_ms(engines, 96, CFG["vocab_size"], g)
        for ctx in ctxs:
            growth[ctx] = (min(growth[ctx][0], ms[ctx]), min(growth[ctx][1], 1e3 / gen_hf(1, ctx, 48)))
    for ctx, (a, b) in growth.items():
        print(f"| decode ms/token at context {ctx} | {a:.2f} | {b:.2f} | {b / a:.2f}x faster |")
    lo, hi = min(growth), max(growth)
    print(f"| decode time growth {lo} -> {hi} | {growth[hi][0] / growth[lo][0]:.2f}x | "
          f"{growth[hi][1] / growth[lo][1]:.2f}x | |")
    # the op overhead under a step: the same model narrowed to hidden 32 (every dimension / 8: the same layers,
    # experts and ops, its 0.6 MiB of weights in cache), B=1, taking turns with the full width
    narrow_cfg = {k: v // 8 if k in NARROWED else v for k, v in CFG.items()}
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        sobre.save(sobre.init_weights(sobre.Transformer(sobre.Config.from_hf(narrow_cfg)), std=0.05), tmp)
        narrow = Engine.from_pretrained(tmp, dtype=dtype, device=dev, max_batch=1, cache_tokens=plen + n + 64)
    full, thin, b_one = 0.0, 0.0, rates[1][1]
    for _ in range(3):
        full = max(full, gen_sobre(1, plen, n))
        thin = max(thin, sobre_rate(narrow, torch.randint(2, narrow_cfg["vocab_size"], (1, plen), generator=g), n))
    mib = sum(p.numel() * p.element_size() for p in narrow.model.parameters()) / 2**20
    print(f"| decode ms/token, B=1, the same model narrowed to hidden 32 ({mib:.1f} MiB of weights: the ops' own "
          f"cost) | {1e3 / thin:.2f} | full width {1e3 / full:.2f}; transformers {1e3 / b_one:.2f} | "
          f"{full / thin:.2f} of the full width's step, {b_one / thin:.2f} of transformers' |")
    for B in (1, 4):  # a few sequences' step as straight-line code (plan.py) against the module path, in turns
        planned = modules = 0.0
        for _ in range(3):
            planned = max(planned, gen_sobre(B, plen, n))
            with mock.patch.object(plan, "ON", False):
                modules = max(modules, gen_sobre(B, plen, n))
        print(f"| decode tok/s, B={B}, the step as straight-line code (plan.py) | {planned:.1f} | "
              f"module path {modules:.1f} | {planned / modules:.2f}x vs the module path |")
    if absorb.foldable(ours.model.config):  # the module path's folded MLA projections (absorb.py) against the
        folded = unfolded = 0.0  # unfolded absorbed path, in turns (FOLD_GROWTH 0: nothing folds)
        with mock.patch.object(plan, "ON", False):
            for _ in range(3):
                folded = max(folded, gen_sobre(1, plen, n))
                with mock.patch.object(absorb, "FOLD_GROWTH", 0.0):
                    unfolded = max(unfolded, gen_sobre(1, plen, n))
        print(f"| decode tok/s, B=1, module path, MLA projections folded (absorb.py) | {folded:.1f} | unfolded "
              f"{unfolded:.1f} | {folded / unfolded:.2f}x vs unfolded |")
    for m, spec in specs.items():
        plain = rate = 0.0
        for _ in range(3):  # plain and speculative taking turns
            plain, rate = max(plain, gen_sobre(1, plen, n)), max(rate, gen_sobre(1, plen, n, engine=spec))
        acc = spec.spec_stats["accepted"] / max(spec.spec_stats["drafted"], 1)
        how = "drafting every step" if m == 0 else f"min_acceptance {m}: drafting stops"
        print(f"| MTP speculative decode tok/s, B=1 (untrained MTP head: acceptance {acc:.0%}; {how}) | {rate:.1f} | "
              f"plain sobre {plain:.1f} | {rate / plain:.2f}x vs plain |")
    if compiled:  # batches above compiled_batch (here 4) decode eagerly
        compiled.warm_up()  # compiles the B=1 and B>1 graphs
        for B in (1, compiled.compiled_batch):
            a = e = b = 0.0  # all three again, taking turns: this CPU's speed drifts over a run
            for _ in range(3):
                a, e, b = (max(a, gen_sobre(B, plen, n, engine=compiled)), max(e, gen_sobre(B, plen, n)),
                           max(b, gen_hf(B, plen, n)))
            print(f"| decode tok/s, B={B}, Engine(compile=True) | {a:.1f} | {b:.1f} | {a / b:.2f}x "
                  f"(eager sobre {e:.1f}; compiled / eager {a / e:.2f}x) |")
    c = ours.model.config
    per_tok = (c.kv_lora_rank + c.qk_rope_head_dim) * c.n_layers * dtype.itemsize
    print(f"| cache bytes/token | {ours.pool.bytes_per_token:g} | {per_tok} (latent, re-expanded each step) | "
          f"= (kv_lora_rank + qk_rope_head_dim) x layers x {dtype.itemsize} B |")


if __name__ == "__main__":
    main()
