"""DeepSeek-V4 decode: sobre's Engine vs transformers `generate` on the same random V4 checkpoint (saved by
transformers' own save_pretrained), and the cache bytes per token of V4 vs V3 from the engines' allocations.

Greedy, fp32, same process and threads; decode time excludes prefill (first -> last token, as bench/engine.py);
the best of 3 runs each, sobre and transformers alternating.
    python bench/v4.py [--quick] [--compile]   # --compile: Engine(compile=True) too (B=1 graph compiled first)
    python bench/v4.py --long [--sizes 4096 8192]   # long forwards: chunked vs dense reference attention

--long times sobre's own model forward (prefill) and forward + backward (training, the CSA indexers' KL
included) at T tokens with attention in chunks of 1024 queries (v4.ATTN_CHUNK, CSA gathering each query's top-k
past 4 x k entries) against one dense masked chunk (the reference), each in its own process (best of 2, extra
peak memory beside it).
"""

import argparse
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

import sobre
from sobre.engine import Engine
from sobre.parallel import keep_freed_memory

sys.path.insert(0, str(Path(__file__).parent))
from engine import CFG as V3  # noqa: E402
from engine import Clock, decode_rate, sobre_rate  # noqa: E402

V4 = dict(vocab_size=8192, hidden_size=256, moe_intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
          head_dim=64, q_lora_rank=96, n_routed_experts=16, num_experts_per_tok=4, sliding_window=128, o_groups=2,
          o_lora_rank=64, index_n_heads=8, index_head_dim=32, index_topk=256, partial_rotary_factor=0.5,
          hc_mult=4, layer_types=["sliding_attention", "compressed_sparse_attention",
                                  "heavily_compressed_attention", "compressed_sparse_attention"],
          compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
          max_position_embeddings=40960)
HF_MAX = 8192  # transformers' V4 prefill scores every key densely: ~40 GB at 32k, past this machine


def long_case(T: int, chunk: int, grad: bool, out):
    """One long forward (+ backward) in its own process -> (best seconds of 2, extra peak MB)."""
    import transformers

    import sobre.v4
    sobre.v4.ATTN_CHUNK = chunk
    if chunk >= T:  # the reference: one chunk, CSA as a mask over every entry
        sobre.v4.CSA_GATHER = 1 << 30
    c = sobre.Config.from_hf(transformers.DeepseekV4Config(**V4).to_dict()).replace(n_mtp_layers=0)
    m = sobre.v4.init_weights(sobre.v4.V4Transformer(c), std=0.05, seed=0).train(grad)
    x = torch.randint(0, V4["vocab_size"], (1, T), generator=torch.Generator().manual_seed(0))
    base, best = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        with torch.set_grad_enabled(grad):
            y = m(x)
            if grad:
                kl = [a.indexer_loss for a in m.modules() if isinstance(a, sobre.v4.Attention) and a.kind == "csa"]
                (y.square().mean() + sum(kl)).backward()
        best = min(best, time.perf_counter() - t0)
        del y
    out.put((best, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024))


def long_forwards(sizes, max_dense_train: int):
    ctx = mp.get_context("spawn")
    print(f"sobre's V4 model (this config), B=1, fp32, {torch.get_num_threads()} threads; attention in chunks of "
          f"1024 queries vs one dense chunk")
    print("| tokens | mode | dense | chunked | speed-up | dense / chunked peak MB |")
    print("|---|---|---|---|---|---|")
    for T in sizes:
        for grad in (False, True):
            res = []
            for chunk in (T, 1024):
                if chunk == T and grad and T > max_dense_train:
                    res.append(None)  # the dense scores and their gradients: ~8 GB at 4096, x4 per doubling
                    continue
                q = ctx.Queue()
                p = ctx.Process(target=long_case, args=(T, chunk, grad, q))
                p.start()
                res.append(q.get())
                p.join()
            (tc, mc), mode = res[1], "fwd+bwd" if grad else "prefill"
            if res[0] is None:
                print(f"| {T} | {mode} | not run (memory) | {tc:.2f} s | | - / {mc:.0f} |", flush=True)
                continue
            td, md = res[0]
            print(f"| {T} | {mode} | {td:.2f} s | {tc:.2f} s | {td / tc:.1f}x | {md:.0f} / {mc:.0f} |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="short contexts (smoke run)")
    ap.add_argument("--long", action="store_true", help="long forwards: chunked vs dense attention")
    ap.add_argument("--compile", action="store_true", help="also time Engine(compile=True)")
    ap.add_argument("--sizes", type=int, nargs="*", default=[4096, 8192])
    ap.add_argument("--max-dense-train", type=int, default=4096, help="--long: dense fwd+bwd only up to this T")
    args = ap.parse_args()
    keep_freed_memory()  # as sobre's engines and runs do; the baseline shares it (bench/README.md)
    if args.long:
        return long_forwards(args.sizes, args.max_dense_train)
    import transformers
    from transformers.utils import logging
    logging.set_verbosity_error()
    torch.manual_seed(0)
    hf = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**V4)).eval()
    with torch.no_grad():  # transformers zero-inits several V4 weights: give every one a scale
        for name, p in hf.named_parameters():
            p.copy_(torch.randn(p.shape) * (0.5 if p.dim() == 1 else 0.05) + (1 if "norm" in name else 0))
    ctxs = (512, 1024) if args.quick else (1024, 8192, 32768)
    n = 16 if args.quick else 32
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = Engine.from_pretrained(tmp, dtype=torch.float32, max_batch=1, cache_tokens=max(ctxs) + 2 * n)
    compiled = args.compile and Engine(ours.model, max_batch=1, cache_tokens=max(ctxs) + 2 * n, compile=True)
    if compiled:
        t0 = time.perf_counter()
        compiled.generate([[0, 0]], max_new_tokens=3)  # compiles the B=1 graph (one for every context)
        print(f"compiled the B=1 decode step in {time.perf_counter() - t0:.0f} s")
    g = torch.Generator().manual_seed(0)

    def sobre_ms(L, engine=ours):
        return 1e3 / sobre_rate(engine, torch.randint(2, V4["vocab_size"], (1, L), generator=g), n)

    hf_bytes = {}  # context -> transformers' cache bytes after generate

    def hf_ms(L):
        clock = Clock()
        with torch.no_grad():
            out = hf.generate(torch.randint(2, V4["vocab_size"], (1, L), generator=g), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=0, streamer=clock,
                              return_dict_in_generate=True)
        hf_bytes[L] = cache_bytes(out.past_key_values)
        return 1e3 / decode_rate(clock.times[1:], [1] * (len(clock.times) - 1))

    print(f"random DeepSeek-V4: vocab 8192, hidden 256, 4 layers (sliding, CSA 4, HCA 128, CSA 4), window 128, "
          f"hc 4, 16 experts top-4; fp32, {torch.get_num_threads()} threads, {n} new tokens")
    print("| measure | sobre | transformers | sobre / transformers |")
    print("|---|---|---|---|")
    for L in ctxs:
        if L > HF_MAX:
            a = min(sobre_ms(L) for _ in range(2))
            print(f"| decode ms/token at context {L} | {a:.2f} | not run (dense prefill) | |")
            if compiled:
                a = min(sobre_ms(L, compiled) for _ in range(2))
                print(f"| decode ms/token at context {L}, Engine(compile=True) | {a:.2f} | not run | |")
            continue
        runs = [(sobre_ms(L), hf_ms(L), compiled and sobre_ms(L, compiled)) for _ in range(3)]  # alternating:
        a, b = min(r[0] for r in runs), min(r[1] for r in runs)  # this CPU's speed drifts
        print(f"| decode ms/token at context {L} | {a:.2f} | {b:.2f} | {b / a:.2f}x faster |")
        if compiled:
            e = min(r[2] for r in runs)
            print(f"| decode ms/token at context {L}, Engine(compile=True) | {e:.2f} | {b:.2f} | {b / e:.2f}x faster "
                  f"(compiled / eager {a / e:.2f}x) |")
    pool = ours.pool  # entries grow with the context; window and projection rings are fixed per sequence
    for L in [L for L in ctxs if L in hf_bytes]:
        ctx = L + n
        mine = pool.bytes_per_token * ctx + pool.lane_bytes
        print(f"| cache KiB of one sequence at context {ctx} | {mine / 1024:.0f} | {hf_bytes[L] / 1024:.0f} | "
              f"transformers / sobre = {hf_bytes[L] / mine:.2f} |")
    v3 = Engine(sobre.Transformer(sobre.Config.from_hf({**V3, "num_nextn_predict_layers": 0})), cache_tokens=64)
    b4, b3 = pool.bytes_per_token, v3.pool.bytes_per_token
    print(f"| engine cache bytes per token of context (allocated, all layers) | V4 {b4:g} (+ {pool.lane_bytes} per "
          f"sequence) | V3 {b3:g} (bench/engine.py's model) | V4 / V3 = {b4 / b3:.3f} |")


def cache_bytes(cache) -> int:
    """Bytes of every distinct tensor a transformers cache holds (V4's K=V share storage: counted once)."""
    seen, stack, visited = {}, [cache], set()
    while stack:
        obj = stack.pop()
        if id(obj) in visited:
            continue
        visited.add(id(obj))
        if isinstance(obj, torch.Tensor):
            seen[obj.data_ptr()] = obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            stack += obj.values()
        elif isinstance(obj, (list, tuple)):
            stack += obj
        elif hasattr(obj, "__dict__"):
            stack += vars(obj).values()
    return sum(seen.values())


if __name__ == "__main__":
    main()
