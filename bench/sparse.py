"""Sparse attention vs full attention at long context: NSA and DSA (sobre.sparse) against
torch's fused `scaled_dot_product_attention` with the same heads and dims, measured in the same run.

    python bench/sparse.py [--sizes 4096 8192 16384 32768] [--reps 2] [--kinds nsa dsa] [--max-train-len N]
    python bench/sparse.py --engine [--sizes ...]   # NSA decode in sobre's engine: paged compressed blocks vs afresh

Per context length: prefill forward, prefill forward+backward, and one decode step at the end of the context
(the cache already built), each the best of --reps runs; peak memory is the extra resident memory of each
case, measured in its own process. NSA: 16 query heads in one GQA group of 16 (as the paper's 64 heads in
4 groups), head dim 64, the paper's l=32, d=16, l'=64, n=16, w=512. DSA: 16 heads over a 256 + 32 latent
(V3.2's layout, scaled down), an 8-head x 64-dim indexer, top-k 2048; its full-attention twin is the same
latent attention (one shared K/V head) without selection.
"""

import argparse
import multiprocessing as mp
import resource
import time

import torch
import torch.nn.functional as F

NSA = dict(B=1, Hq=16, Hkv=1, D=64)
NSA_KW = dict(block=32, stride=16, select=64, top_n=16, window=512)
DSA = dict(B=1, H=16, r=256, rd=32, Hi=8, Di=64, topk=2048)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def inputs(kind: str, S: int, T: int, grad: bool):
    g = torch.Generator().manual_seed(S)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).requires_grad_(grad)

    if kind == "nsa":
        from sobre.sparse import Compressor
        B, Hq, Hkv, D = NSA["B"], NSA["Hq"], NSA["Hkv"], NSA["D"]
        l = NSA_KW["block"]  # noqa: E741
        cmp = [Compressor(rnd(l, D, scale=0.1), rnd(l * D, D, scale=(l * D) ** -0.5), rnd(D, D, scale=D**-0.5))
               for _ in range(2)]
        gates = torch.rand(B, T, Hq, 3, generator=g).requires_grad_(grad)
        return rnd(B, T, Hq, D), rnd(B, S, Hkv, D), rnd(B, S, Hkv, D), gates, *cmp
    B, H, r, rd, Hi, Di = (DSA[k] for k in ("B", "H", "r", "rd", "Hi", "Di"))
    return (rnd(B, T, H, r + rd, scale=0.1), rnd(B, S, r + rd), torch.randn(B, T, Hi, Di, generator=g),
            torch.randn(B, S, Di, generator=g), torch.rand(B, T, Hi, generator=g) * Hi**-0.5)


def full(kind, args):
    """The dense baseline: fused causal attention over every earlier token."""
    T, S = args[0].shape[1], args[1].shape[1]
    causal = None if T == S else torch.ones(T, S, dtype=torch.bool).tril(S - T)
    if kind == "nsa":
        q, k, v = (t.transpose(1, 2) for t in args[:3])
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, is_causal=causal is None, enable_gqa=True)
        return o.transpose(1, 2)
    q, kv = args[:2]  # values = the latent with its rope dims riding along (equal head dims keep SDPA fused)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), kv[:, None], kv[:, None], attn_mask=causal,
                                       is_causal=causal is None, enable_gqa=True)
    return o.transpose(1, 2)[..., :DSA["r"]]


def sparse(kind, args, decode: bool):
    from sobre.sparse import dsa_attention, nsa_attention, nsa_sparse
    if kind == "dsa":
        return dsa_attention(*args, rank=DSA["r"], topk=DSA["topk"])
    if not decode:
        return nsa_attention(*args, **NSA_KW)
    q, k, v, gates, cmp_k, cmp_v = args  # decode reads the model's cache layout: heads-first K/V + compressed
    return nsa_sparse(q, *decode, gates, k.shape[1] - 1, **NSA_KW)


def case(kind: str, impl: str, mode: str, S: int, reps: int, out):
    """One measurement, in its own process: (best seconds, extra peak MB)."""
    torch.manual_seed(0)
    grad = mode == "fwd+bwd"
    T = 1 if mode == "decode" else S
    args = inputs(kind, S, T, grad)
    cache = None
    if kind == "nsa" and impl == "sparse" and mode == "decode":
        from sobre.sparse import compress
        k, v, (cmp_k, cmp_v) = args[1], args[2], args[4:]
        pad = -S % NSA_KW["select"]
        cache = tuple(t for t in (F.pad(k, (0, 0, 0, 0, 0, pad)).transpose(1, 2).contiguous(),
                                  F.pad(v, (0, 0, 0, 0, 0, pad)).transpose(1, 2).contiguous(),
                                  compress(k, cmp_k, NSA_KW["block"], NSA_KW["stride"]).transpose(1, 2),
                                  compress(v, cmp_v, NSA_KW["block"], NSA_KW["stride"]).transpose(1, 2)))
    base = rss_mb()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        with torch.set_grad_enabled(grad):
            o = full(kind, args) if impl == "full" else sparse(kind, args, cache or False)
            if grad:
                o.square().mean().backward()
        best = min(best, time.perf_counter() - t0)
        del o
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.put((best, max(peak - base, 0.0)))


def measure(kind, impl, mode, S, reps):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=case, args=(kind, impl, mode, S, reps, q))
    p.start()
    res = q.get()
    p.join()
    return res


def engine_decode(S: int, block: int, new: int = 16) -> float:
    """ms per decode step of sobre's engine on a small random NSA model (the preset "debug" sizes, l=32, d=16,
    l'=64, n=16, w=512) after an S-token prompt. block 64: compressed blocks kept in the engine's pool, decode
    reading the window, chosen and compressed blocks from it; block 60 (the stride does not divide it): the
    reference twin, gathering the row's K/V and compressing every block afresh each step."""
    from sobre import Transformer, init_weights, preset
    from sobre.engine import Engine
    model = init_weights(Transformer(preset("debug", attn_type="nsa", max_seq_len=S + new + 64))).eval()
    eng = Engine(model, max_batch=1, block=block, cache_tokens=S + new + 128)
    eng.add_request(torch.randint(3, model.config.vocab_size, (S,)).tolist(), max_new_tokens=new)
    eng.step()  # the prefill
    t0, n = time.perf_counter(), 0
    while eng.has_work():
        n += len(eng.step())
    return (time.perf_counter() - t0) / n * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="*", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--kinds", nargs="*", default=["nsa", "dsa"])
    ap.add_argument("--modes", nargs="*", default=["prefill", "fwd+bwd", "decode"])
    ap.add_argument("--max-train-len", type=int, default=32768, help="fwd+bwd only up to this context")
    ap.add_argument("--quick", action="store_true", help="4k and 8k only, one rep")
    ap.add_argument("--engine", action="store_true", help="NSA decode in the engine: paged compressed blocks vs "
                    "compressing afresh each step")
    a = ap.parse_args()
    sizes, reps = ([4096, 8192], 1) if a.quick else (a.sizes, a.reps)
    if a.engine:
        print("| NSA engine decode | context | paged (window, chosen, compressed) | gathered, compressed afresh | "
              "speed-up |")
        print("|---|---|---|---|---|")
        for S in sizes:
            kept, fresh = (min(engine_decode(S, b) for _ in range(reps)) for b in (64, 60))
            print(f"| ms / token | {S} | {kept:.2f} | {fresh:.2f} | {fresh / kept:.1f}x |", flush=True)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; best of {reps}")
    print("| attention | context | mode | full | sparse | speed-up | full peak MB | sparse peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in a.kinds:
        for S in sizes:
            for mode in a.modes:
                if mode == "fwd+bwd" and S > a.max_train_len:
                    continue
                r = reps if mode != "decode" else max(reps, 5)
                (tf, mf), (ts, ms) = (measure(kind, impl, mode, S, r) for impl in ("full", "sparse"))
                fmt = (lambda t: f"{t * 1e3:.2f} ms") if mode == "decode" else (lambda t: f"{t:.2f} s")
                print(f"| {kind.upper()} | {S} | {mode} | {fmt(tf)} | {fmt(ts)} | {tf / ts:.1f}x | {mf:.0f} | "
                      f"{ms:.0f} |", flush=True)


if __name__ == "__main__":
    main()
