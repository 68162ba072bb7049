"""Chunked prefill: what a long prompt arriving mid-stream costs the sequences already decoding.

bench/engine.py's random DeepSeek-V3 (vocab 8192, hidden 256, 4 layers, 16 experts top-4); --streams sequences
decode greedily (64-token prompts) when a --long-token prompt arrives. Per prefill_chunk setting (the largest:
the whole prompt in one forward, as before chunked prefill), in the same run, the engines taking turns
(--rounds): the longest gap between two tokens of the running streams while the long prompt is prefilled (their
worst inter-token latency; until its second token: the step after its first holds a speculative engine's MTP
catch-up), the long prompt's time to first token, and the wall time until every sequence is done. Medians over
the rounds. --speculative: every engine drafts with the model's MTP layer (min_acceptance 0: always).
    python bench/chunked.py [--long 4096] [--streams 4] [--chunks 512 1024 8192] [--rounds 3] [--speculative]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import sobre
from sobre.engine import Engine
from sobre.parallel import keep_freed_memory

sys.path.insert(0, str(Path(__file__).parent))
from engine import CFG  # noqa: E402  the engine benchmark's model


def run(eng: Engine, streams: list[list[int]], long: list[int], new: int) -> tuple[float, float, float]:
    """-> (worst gap between two tokens of a running stream, the long prompt's TTFT, total) in seconds."""
    rids = [eng.add_request(p, max_new_tokens=new) for p in streams]
    eng.step()  # the streams are decoding
    last = dict.fromkeys(rids, time.perf_counter())
    t0 = time.perf_counter()
    rl, gaps, ttft, seen = eng.add_request(long, max_new_tokens=8), [], None, 0
    while eng.has_work():
        events = eng.step()
        now = time.perf_counter()
        for e in events:
            if e.rid in last:
                if seen < 2:  # (while the long prompt comes in, the step of its last chunk and the one after)
                    gaps.append(now - last[e.rid])
                last[e.rid] = now
        if seen < 2 and any(e.rid == rl for e in events):
            seen += 1
            ttft = ttft or now - t0
    eng.collect()
    return max(gaps), ttft, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--long", type=int, default=4096, help="tokens of the prompt that arrives")
    ap.add_argument("--streams", type=int, default=4, help="sequences decoding when it arrives")
    ap.add_argument("--new", type=int, default=256, help="tokens each stream generates")
    ap.add_argument("--chunks", type=int, nargs="+", default=[512, 1024, 8192], help="prefill_chunk settings")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--speculative", action="store_true", help="MTP speculative decoding in every engine")
    a = ap.parse_args()
    keep_freed_memory()
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    torch.manual_seed(0)
    cfg = {k: v for k, v in CFG.items() if k != "model_type"}
    if a.speculative:  # (transformers saves no MTP layer: bench/engine.py's model, saved by sobre)
        model = sobre.init_weights(sobre.Transformer(sobre.Config.from_hf(CFG)), std=0.05).eval()
    else:
        with tempfile.TemporaryDirectory() as tmp:
            DeepseekV3ForCausalLM(DeepseekV3Config(**cfg)).save_pretrained(tmp)
            model = sobre.load(tmp)
    g = torch.Generator().manual_seed(0)
    streams = [torch.randint(0, CFG["vocab_size"], (64,), generator=g).tolist() for _ in range(a.streams)]
    long = torch.randint(0, CFG["vocab_size"], (a.long,), generator=g).tolist()
    spec = dict(speculative=True, min_acceptance=0.0) if a.speculative else {}
    engines = {c: Engine(model, max_batch=a.streams + 1, prefill_chunk=c, **spec) for c in a.chunks}
    results = {c: [] for c in a.chunks}
    for _ in range(a.rounds):
        for c, eng in engines.items():
            results[c].append(run(eng, streams, long, a.new))
    print(f"{a.streams} streams decoding, a {a.long}-token prompt arrives; fp32, {torch.get_num_threads()} threads, "
          f"{'MTP speculative, ' if a.speculative else ''}medians of {a.rounds} rounds")
    print("| prefill_chunk | streams' worst inter-token gap | long prompt's TTFT | all done |")
    print("|---|---|---|---|")
    for c in a.chunks:
        gap, ttft, total = (statistics.median(r[i] for r in results[c]) for i in range(3))
        whole = " (whole prompt)" if c >= a.long else ""
        print(f"| {c}{whole} | {gap * 1e3:.0f} ms | {ttft:.2f} s | {total:.2f} s |")


if __name__ == "__main__":
    main()
