"""Serving benchmark, like vLLM's `bench serve`: one `sobre serve` process, streaming /v1/completions clients at
concurrency 1 / 4 / 16 / 64; TTFT, TPOT, ITL (p50 / p99) and aggregate output tok/s.

The model is bench/engine.py's random DeepSeek-V3 (vocab 8192, hidden 256, 4 layers, 16 experts top-4) with a
BPE tokenizer trained on the built-in corpus; prompts are random token ids, every request generates exactly
--max-tokens tokens (ignore_eos), greedy. --shared-prefix N starts every prompt with the same N tokens (a long
system prompt); --prefix-cache off serves with `sobre serve --no-prefix-cache` (the cache is on by default);
--prefix-cache both runs a server without it, then one with it, on the same prompts, and prints both.
The clients share one aiohttp session, as in vLLM's benchmark (an httpx client cost 3x the CPU per streamed token,
taken from the cores the server runs on); the last column is the load generator's own CPU time per token.
    python bench/serve.py [--quick] [--prompt-len 128] [--max-tokens 128] [--shared-prefix 0]
                          [--prefix-cache on|off|both] [--levels 1,4,16,64]
"""

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import aiohttp
import httpx
import torch

import sobre
from sobre.data import builtin_docs
from sobre.parallel import keep_freed_memory
from sobre.tokenizer import train_tokenizer

sys.path.insert(0, os.path.dirname(__file__))
from engine import CFG  # noqa: E402


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


async def one(session, url, prompt, max_tokens):
    t0 = time.perf_counter()
    stamps, usage = [], None
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    async with session.post(url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.content:  # one SSE line at a time, as it arrives
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                usage = obj["usage"]
            elif obj["choices"] and obj["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    n = usage["completion_tokens"]
    return {"ttft": stamps[0] - t0, "tpot": (stamps[-1] - stamps[0]) / max(n - 1, 1),
            "itl": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": n}


async def level(url, concurrency, n_requests, prompts, max_tokens):
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency + 4),
                                     timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def run(p):
            async with sem:
                return await one(session, url, p, max_tokens)
        t0, cpu0 = time.perf_counter(), time.process_time()
        res = await asyncio.gather(*(run(prompts[i % len(prompts)]) for i in range(n_requests)))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    itl = [x for r in res for x in r["itl"]]
    tokens = sum(r["tokens"] for r in res)
    return {"concurrency": concurrency, "requests": n_requests, "tok_s": tokens / wall,
            "ttft_p50": pct([r["ttft"] for r in res], 50), "ttft_p99": pct([r["ttft"] for r in res], 99),
            "tpot_p50": pct([r["tpot"] for r in res], 50), "tpot_p99": pct([r["tpot"] for r in res], 99),
            "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99), "tpot_mean": statistics.mean(r["tpot"] for r in res),
            "client_us": cpu / tokens * 1e6}


def measure(model_dir, tok, args, levels, cache: bool) -> list[dict]:
    """Start `sobre serve` (prefix cache on or off), warm it up, run every concurrency level, stop it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "sobre", "serve", model_dir, "--port", str(port), "--max-batch", "64",
           "--dtype", "float32"] + (["--threads", str(args.threads)] if args.threads else []) + \
        ([] if cache else ["--no-prefix-cache"])
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        rng = random.Random(0)
        special = {tok.bos_id, tok.eos_id, tok.pad_id}
        pool = [i for i in range(tok.vocab_size) if i not in special]
        shared = [rng.choice(pool) for _ in range(args.shared_prefix)]
        prompts = [shared + [rng.choice(pool) for _ in range(args.prompt_len - len(shared))] for _ in range(64)]
        asyncio.run(level(url, 4, 4, prompts, 8))  # warm-up (with a prefix cache: the shared blocks get cached)
        return [{**asyncio.run(level(url, c, max(2 * c, 8) if not args.quick else max(c, 4), prompts,
                                     args.max_tokens)), "cache": cache} for c in levels]
    finally:
        server.terminate()
        server.wait(timeout=30)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer requests (smoke run)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="server torch threads (0: sobre serve's default)")
    ap.add_argument("--shared-prefix", type=int, default=0, help="tokens every prompt starts with")
    ap.add_argument("--prefix-cache", choices=("on", "off", "both"), default="on",
                    help="both: measure a server without the prefix cache, then one with it")
    ap.add_argument("--levels", default="", help="comma-separated concurrencies (default 1,4,16,64; quick 1,4,16)")
    args = ap.parse_args()
    keep_freed_memory()  # as sobre's engines and runs do; the baseline shares it (bench/README.md)
    levels = tuple(map(int, args.levels.split(","))) if args.levels else (1, 4, 16) if args.quick else (1, 4, 16, 64)
    modes = {"on": (True,), "off": (False,), "both": (False, True)}[args.prefix_cache]
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(builtin_docs(1 << 20), vocab_size=CFG["vocab_size"], out=tmp)
        torch.manual_seed(0)
        cfg = sobre.Config.from_hf({**CFG, "vocab_size": tok.vocab_size, "num_nextn_predict_layers": 0})
        sobre.save(sobre.init_weights(sobre.Transformer(cfg), std=0.05), tmp)
        tok.save(tmp)
        rows = [r for cache in modes for r in measure(tmp, tok, args, levels, cache)]
    print(f"\nsobre serve, {args.prompt_len}-token prompts ({args.shared_prefix} shared), {args.max_tokens} new tokens "
          f"each, greedy, fp32, server torch threads {args.threads or os.cpu_count()}\n")
    print("| concurrency | prefix cache | requests | output tok/s | vs concurrency 1 | TTFT p50 / p99 ms "
          "| TTFT p50 vs cache off | TPOT p50 / p99 ms | ITL p50 / p99 ms | client CPU us/token |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        first = next(x for x in rows if x["cache"] == r["cache"])
        off = next((x for x in rows if not x["cache"] and x["concurrency"] == r["concurrency"]), None)
        vs_off = f"{off['ttft_p50'] / r['ttft_p50']:.1f}x faster" if off and r["cache"] else "-"
        print(f"| {r['concurrency']} | {'on' if r['cache'] else 'off'} | {r['requests']} | {r['tok_s']:.1f} "
              f"| {r['tok_s'] / first['tok_s']:.2f}x | {r['ttft_p50'] * 1e3:.0f} / {r['ttft_p99'] * 1e3:.0f} "
              f"| {vs_off} | {r['tpot_p50'] * 1e3:.1f} / {r['tpot_p99'] * 1e3:.1f} "
              f"| {r['itl_p50'] * 1e3:.1f} / {r['itl_p99'] * 1e3:.1f} | {r['client_us']:.0f} |")


if __name__ == "__main__":
    main()
