"""Serving LoRA adapters beside the model (Engine(loras=...), `sobre serve --lora-modules`): decode tok/s of a
batch whose rows use two adapters, one, or none, against the base model alone and against an engine on one
adapter merged into the weights (`--adapter`: no per-row work, one adapter per server). bench/engine.py's random
DeepSeek-V3, rank-16 adapters on every linear layer PEFT's all-linear names (kv_b_proj included: absorbed MLA
adds its adapters' terms through the rank, lora.MultiLoRA.absorbed_q / absorbed_o) or, --no-kv-b, on all but
kv_b_proj. Greedy, fp32, the engines taking turns (--rounds), best of the rounds.
    python bench/multilora.py [--batch 16] [--prompt 128] [--new 64] [--rounds 3] [--no-kv-b]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import sobre
from sobre import lora
from sobre.engine import Engine
from sobre.parallel import keep_freed_memory

sys.path.insert(0, str(Path(__file__).parent))
from engine import CFG  # noqa: E402  the engine benchmark's model


def rate(eng: Engine, prompts: list[list[int]], loras: list[str | None], new: int) -> float:
    """Decode tok/s (after each row's first token) of prompts decoded together, row i with adapter loras[i]."""
    for p, a in zip(prompts, loras):
        eng.add_request(p, max_new_tokens=new, lora=a)
    eng.step()  # the prefill and first tokens
    t0, n = time.perf_counter(), 0
    while eng.has_work():
        n += len(eng.step())
    eng.collect()
    return n / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-kv-b", action="store_true", help="adapters on every target but kv_b_proj")
    a = ap.parse_args()
    keep_freed_memory()
    torch.manual_seed(0)
    names = tuple(t for t in lora.TARGETS if t != "kv_b_proj") if a.no_kv_b else ()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = sobre.save(sobre.init_weights(sobre.Transformer(sobre.Config.from_hf(CFG)), std=0.05), tmp / "base")
        for i in range(2):
            m = sobre.load(base)
            lora.add_lora(m, rank=a.rank, names=names, seed=i)
            with torch.no_grad():
                for ad in lora.adapters(m).values():
                    ad.lora_B.normal_(std=0.02)
            lora.save_adapter(m, tmp / f"ad{i}", str(base))
            if i == 0:
                merged = Engine(lora.merge(m), max_batch=a.batch)
        folders = {f"ad{i}": tmp / f"ad{i}" for i in range(2)}
        plain = Engine(sobre.load(base), max_batch=a.batch)
        multi = Engine(sobre.load(base), max_batch=a.batch, loras=folders)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, CFG["vocab_size"], (a.batch, a.prompt), generator=g).tolist()
    B = a.batch
    cases = {"the base model alone (no adapters loaded)": (plain, [None] * B),
             "one adapter merged into the weights (--adapter)": (merged, [None] * B),
             "adapters loaded, every row on the base model": (multi, [None] * B),
             "every row on one adapter": (multi, ["ad0"] * B),
             "half the rows on each of two adapters": (multi, ["ad0", "ad1"] * (B // 2))}
    best = dict.fromkeys(cases, 0.0)
    for _ in range(a.rounds):
        for name, (eng, which) in cases.items():
            best[name] = max(best[name], rate(eng, prompts, which, a.new))
    where = "all but kv_b_proj" if a.no_kv_b else "all-linear, kv_b_proj included"
    print(f"bench/engine.py's random DeepSeek-V3, rank-{a.rank} adapters ({where}); B={B}, {a.prompt}-token prompts, "
          f"{a.new} new tokens, fp32, {torch.get_num_threads()} threads, best of {a.rounds}")
    print("| rows | decode tok/s | vs the base model alone |")
    print("|---|---|---|")
    for name, r in best.items():
        print(f"| {name} | {r:.0f} | {r / best[next(iter(best))]:.2f}x |")


if __name__ == "__main__":
    main()
