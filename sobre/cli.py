"""`sobre <verb>`: info, convert, generate, chat, tokenizer-train, pretrain, sft, grpo, distill, eval,
rejection-sample, speedrun."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import torch

from . import parallel
from .flags import (
    ADAPTER_HELP,
    DTYPES,
    INT8_HELP,
    REWARD_HELP,
    add_dataclass_flags,
    add_decode_flags,
    add_device_flag,
    add_sampling_flags,
    at_least,
    lora_module,
    port,
    positive_float,
    sampling_args,
    token_ids,
)
from .parallel import pick_device


def human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def cmd_info(args):
    from .checkpoint import resolve
    from .config import Config
    from .stats import model_stats
    path = Path(args.path)
    c = Config.load(path if path.suffix == ".json" else resolve(path))
    s = model_stats(c, ctx=args.ctx)
    kv = s["kv"]
    print(f"{c.arch}: {c.n_layers} layers (+{c.n_mtp_layers} MTP), hidden {c.dim}, {c.n_heads} heads, "
          f"vocab {c.vocab_size}, context {c.max_seq_len}")
    if c.attn_type == "nsa":
        print(f"attention: NSA, {c.kv_heads} K/V heads; compressed blocks {c.nsa_block} / stride {c.nsa_stride}, "
              f"top-{c.nsa_top_n} blocks of {c.nsa_select}, window {c.nsa_window}")
    if c.attn_type == "dsa":
        print(f"attention: MLA + DSA, indexer {c.index_n_heads} heads x {c.index_head_dim}, top-{c.index_topk} tokens")
    if c.arch == "deepseek_v4":
        kinds = "/".join(str(c.layer_types.count(k)) for k in ("sliding", "csa", "hca"))
        print(f"attention: {kinds} sliding/CSA/HCA layers, 1 K=V head x {c.head_dim}, window {c.sliding_window}, "
              f"CSA 1/{c.compress_rate_csa} + top-{c.index_topk}, HCA 1/{c.compress_rate_hca}; mHC x{c.hc_mult}; "
              f"first {c.n_hash_layers} MoE layers hash-routed")
    if c.n_routed_experts:
        print(f"MoE: {c.n_routed_experts} routed experts (top-{c.n_activated_experts}, {c.n_expert_groups} groups "
              f"-> {c.n_limited_groups}), {c.n_shared_experts} shared, first {c.n_dense_layers} layers dense")
    print(f"params total          {human(s['params'])}  ({s['params']:,}; MTP module {human(s['mtp_params'])} more)")
    print(f"params active/token   {human(s['active_params'])}  ({s['active_params']:,})")
    print(f"FLOPs/token (fwd)     {human(s['flops_per_token'])}  (2 x active matmul params + attention at "
          f"ctx {args.ctx})")
    v4 = c.arch == "deepseek_v4"
    print(f"KV cache/token (bf16) naive K/V {human(kv['naive'], 'B')} ({kv['naive_values_per_layer']} values/layer)"
          f"  {'cached' if c.attn_type == 'nsa' or v4 else 'latent'} {human(kv['latent'], 'B')} "
          f"({kv['latent_values_per_layer']:.4g} values/layer{f' at ctx {args.ctx}' if v4 else ''})"
          f"  -> {kv['naive'] / kv['latent']:.1f}x smaller")
    print(f"\n{'layers':>9} {'kind':<10} {'attn':>9} {'ffn':>9} {'params':>9} {'active':>9}")
    rows = s["layers"]
    i = 0
    while i < len(rows):  # collapse runs of identical layers
        j = i
        same = ("kind", "attn", "ffn", "params", "active")
        while j + 1 < len(rows) and all(rows[j + 1][k] == rows[i][k] for k in same):
            j += 1
        r = rows[i]
        span = f"{i}" if i == j else f"{i}-{j}"
        print(f"{span:>9} {r['kind']:<10} {human(r['attn']):>9} {human(r['ffn']):>9} {human(r['params']):>9} "
              f"{human(r['active']):>9}")
        i = j + 1
    if args.json:
        print(json.dumps({k: v for k, v in s.items() if k != "layers"}))


def cmd_eplb(args):
    from .eplb import gpu_loads, imbalance, naive_gpu_loads, rebalance_experts, run_loads
    w = run_loads(args.run, args.last)
    L, n = w.shape
    replicas = args.replicas or -(-n // args.gpus) * args.gpus + args.gpus  # + one redundant expert per GPU
    phy2log, _, logcnt = rebalance_experts(w, replicas, args.groups, args.nodes, args.gpus)
    before = imbalance(naive_gpu_loads(w, args.gpus))
    after = imbalance(gpu_loads(w, phy2log, logcnt, args.gpus))
    policy = "hierarchical" if args.groups % args.nodes == 0 and args.groups > 1 else "global"
    print(f"EPLB ({policy}): {L} MoE layers x {n} experts -> {replicas} replicas on {args.gpus} GPUs "
          f"({args.nodes} nodes, {args.groups} groups); GPU load max/mean before -> after")
    per_gpu = replicas // args.gpus
    for i in range(L):
        gpus = " | ".join(" ".join(str(e) for e in phy2log[i, g * per_gpu:(g + 1) * per_gpu].tolist())
                          for g in range(args.gpus))
        print(f"layer {i}: {before[i]:.2f} -> {after[i]:.2f}   experts per GPU: {gpus}")
    print(f"mean over layers: {before.mean():.2f} -> {after.mean():.2f}")


def cmd_dualpipe(args):
    from .dualpipe import Times, dualpipe, plot, simulate, table
    times = Times(args.F, args.B, args.W, args.FB)
    P, M = args.ranks, args.micro_batches
    print(f"pipeline schedules, {P} ranks, {M} micro-batches, F={times.F} B={times.B} W={times.W} "
          f"F&B={times.F + times.B if times.FB is None else times.FB} (simulated; formula from DualPipe's README)")
    print(f"{'method':<10} {'bubble':>8} {'formula':>8} {'params':>7} {'activation':>11} {'makespan':>9}")
    for r in table(P, M, times):
        print(f"{r['method']:<10} {r['bubble']:>8.2f} {r['bubble_formula']:>8.2f} {r['params']:>6}x "
              f"{r['activation']:>11} {r['makespan']:>9.2f}")
    if args.plot:
        plot(simulate(dualpipe(P, M), times, dualpipe=True), args.plot)
        print(f"wrote {args.plot}")


def cmd_convert(args):
    from .checkpoint import load, resolve, save
    src = resolve(args.src)
    if Path(args.dst).resolve() == Path(src).resolve():
        raise ValueError(f"{args.dst} is the source checkpoint: convert writes a new folder (give another DST)")
    model = load(src, dtype=DTYPES[args.dtype], adapter=args.adapter)
    out = save(model, args.dst, shard_bytes=int(args.shard_gb * (1 << 30)), tokenizer_dir=src)
    print(f"wrote {out} ({args.dtype}{', adapter ' + args.adapter + ' merged' if args.adapter else ''})")


def cmd_generate(args):
    from .checkpoint import load, resolve
    from .engine import Engine
    from .linear import inference_dtype
    from .schema import check_schema
    from .tokenizer import TextStream, eos_ids, load_tokenizer
    schema = None
    if args.json_schema:  # (a bad file or schema: one line, before the model loads)
        try:
            schema = json.loads(Path(args.json_schema).read_text())
            check_schema(schema)
        except (OSError, ValueError) as e:
            sys.exit(f"--json-schema {args.json_schema}: {e}")
    if args.int8 and args.expert_parallel:
        raise ValueError("--int8 with --expert-parallel: expert parallel shards the routed experts' stacked "
                         "weights, which int8 replaces; use one or the other")
    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve(args.path)
    device = "cpu" if args.expert_parallel else pick_device(args.device)  # expert parallel: each rank's, below
    model = load(path, dtype=DTYPES[args.dtype] if args.dtype else inference_dtype(path, device), device=device,
                 fp8=args.fp8, int8=args.int8, mtp=args.speculative, adapter=args.adapter)
    tok = load_tokenizer(path)
    if args.ids:
        prompt = args.ids
    elif args.prompt is not None:
        if tok is None:
            sys.exit(f"{path}: no tokenizer.json; pass token ids with --ids 1,2,3")
        prompt = tok.encode(args.prompt, add_special_tokens=True) if args.suffix is None else \
            tok.fim_prompt(args.prompt, args.suffix)
    else:
        sys.exit("give --prompt TEXT or --ids 1,2,3")
    if args.suffix is not None and (tok is None or args.ids):
        sys.exit("--suffix (fill in the middle) needs a text --prompt and the model's tokenizer.json")
    if (args.json or schema) and (tok is None or args.ids):
        sys.exit("--json and --json-schema need a text --prompt and the model's tokenizer.json")
    stop = eos_ids(model.config)
    rank = _expert_parallel(model, args, prompt) if args.expert_parallel else 0
    t0, out = time.perf_counter(), []
    text = TextStream(tok) if tok and not args.ids else None
    eng = Engine.for_prompt(model, tok, len(prompt), args.max_new_tokens, speculative=args.speculative,
                            compile=args.compile, min_acceptance=args.min_acceptance, draft_vocab=args.draft_vocab)
    for t in eng.stream(prompt, max_new_tokens=args.max_new_tokens, min_tokens=args.min_tokens,
                        **sampling_args(args, path), seed=args.seed,
                        stop_token_ids=stop, presence_penalty=args.presence_penalty,
                        frequency_penalty=args.frequency_penalty, json=args.json, json_schema=schema):
        out.append(t)
        if rank == 0:
            print(text.feed(t) if text else f"{t} ", end="", flush=True)
    dt = time.perf_counter() - t0
    if rank == 0:
        print(text.flush() if text else "", end="")  # (a partial character held back at the end)
        spec = eng.spec_summary()
        print(f"\n[{len(out)} tokens in {dt:.2f}s, {len(out) / dt:.1f} tok/s{'; ' + spec if spec else ''}]",
              file=sys.stderr)
    if args.expert_parallel:
        parallel.finish()  # no rank leaves while another still has collectives in flight


def _expert_parallel(model, args, prompt) -> int:
    """Shard the experts over the torchrun ranks (EPLB placement for redundant experts); every rank runs the
    same requests, so a sampling seed is drawn on rank 0 and shared. Returns this rank."""
    import torch.distributed as dist

    from .eplb import run_loads
    from .parallel import expert_parallel_inference, init
    rank, world, device = init(args.device)
    model.to(device)
    if world < 2:
        sys.exit("--expert-parallel runs under torchrun: torchrun --nproc-per-node N -m sobre generate ...")
    if args.seed is None:
        seed = torch.randint(0, 2**31 - 1, (1,))
        dist.broadcast(seed, 0)
        args.seed = int(seed)
    loads = run_loads(args.expert_loads) if args.expert_loads else None
    placement = expert_parallel_inference(model, args.redundant_experts, loads, calibrate=prompt)
    if rank == 0:
        E = model.config.n_routed_experts
        slots = E + args.redundant_experts
        where = ""
        if placement is not None:
            hot = (torch.bincount(placement[0], minlength=E) > 1).nonzero().flatten().tolist()
            where = f"; EPLB replicated experts {hot} in layer 0"
        print(f"[expert parallel: {E} experts in {slots} slots over {world} ranks{where}]", file=sys.stderr)
    return rank


CHAT_SAMPLING = {"temperature": 0.6, "top_p": 0.95}  # DeepSeek-R1's recommended (where the checkpoint sets none)


def cmd_chat(args):
    """Interactive chat (chat.talk): streamed tokens, reasoning dimmed (or collapsed to a counter with /think)."""
    from .chat import talk
    from .checkpoint import resolve
    from .engine import Engine
    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve(args.path)
    sampling = sampling_args(args, path, **CHAT_SAMPLING)
    eng = Engine.from_pretrained(path, dtype=DTYPES[args.dtype] if args.dtype else None, max_batch=1,
                                 device=pick_device(args.device), speculative=args.speculative, fp8=args.fp8,
                                 int8=args.int8, compile=args.compile, min_acceptance=args.min_acceptance,
                                 draft_vocab=args.draft_vocab, adapter=args.adapter)
    if eng.tokenizer is None:
        sys.exit(f"{args.path}: no tokenizer.json; chat needs one")
    talk(eng, sampling, args.system, not args.hide_reasoning, not args.no_think, args.max_new_tokens)


def cmd_tokenizer_train(args):
    from .data import builtin_docs, file_docs
    from .tokenizer import bytes_per_token, train_tokenizer
    docs = list(builtin_docs(args.max_bytes) if not args.input else (d for f in args.input for d in file_docs(f)))
    held = [d for i, d in enumerate(docs) if i % 50 == 49]
    tok = train_tokenizer((d for i, d in enumerate(docs) if i % 50 != 49), args.vocab_size, args.out)
    held_out = (f"held-out compression {bytes_per_token(tok, held):.2f} bytes/token over {len(held)} documents"
                if held else "no held-out compression: fewer than 50 documents (every 50th is held out)")
    print(f"wrote {args.out}/tokenizer.json ({tok.vocab_size} tokens); {held_out}")


def run_dataclass(args, cls, fn, what: str):
    a = cls(**{f: tuple(v) if isinstance(v := getattr(args, f), list) else v for f in cls.__dataclass_fields__})
    run = fn(a)
    if int(os.environ.get("RANK", 0)) == 0:  # under torchrun: one line, not one per process
        print(f"run folder: {run} ({what})")


def cmd_eval(args):
    from .rollout import eval_temperature, eval_top_p, evaluate_task
    from .sft import start_model
    from .tasks import get_task
    args.temperature = eval_temperature(args.samples, args.temperature)  # (bad arguments: an error before loading)
    args.top_p = eval_top_p(args.temperature, args.top_p)
    tasks = [get_task(name, args.reward or None) for name in args.task]
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, _, device = parallel.init(args.device)  # (under torchrun each rank samples its share of the problems)
    model, tok = parallel.rank_zero_first(lambda: start_model(args.path, device=str(device), int8=args.int8,
                                                              adapter=args.adapter))
    if rank == 0:
        print(f"{'task':<14} {'problems':>8} {'samples':>7}  metrics")
    for task in tasks:
        r = evaluate_task(model.eval(), tok, task, args.n, args.samples, args.temperature, args.max_new_tokens,
                          args.seed, loss=True, top_p=args.top_p, ranks=True)
        if rank > 0:
            continue
        scores = "  ".join(f"{k} {v:.3f}" for k, v in r.items() if k.startswith(("pass@", "maj@", "format")))
        print(f"{r['task']:<14} {r['problems']:>8} {r['samples']:>7}  {scores}  mean length {r['mean_length']:.1f}"
              f"  val loss {r['val_loss']:.3f} ({r['val_bpb']:.3f} bits/byte)")
        if args.json:
            print(json.dumps(r))
    parallel.finish()


def cmd_rejection_sample(args):
    from .rollout import rejection_sample
    from .sft import start_model
    from .tasks import get_task
    rank, _, device = parallel.init(args.device)  # (under torchrun each rank samples its share of the problems)
    model, tok = parallel.rank_zero_first(lambda: start_model(args.path, device=str(device), adapter=args.adapter))
    r = rejection_sample(model.eval(), tok, get_task(args.task, args.reward or None), args.n, args.samples,
                         Path(args.out), args.temperature, args.max_new_tokens, args.seed, args.keep)
    parallel.finish()
    if rank == 0:
        print(f"kept {r['kept']} verified completions for {r['solved']}/{r['problems']} problems "
              f"({r['samples']} samples) -> {r['file']} (train on it: sobre sft --data {r['file']})")


def cmd_speedrun(args):
    from .speedrun import speedrun
    speedrun(Path(args.out), args.preset, args.seed, args.steps, args.force, args.eval_problems, args.minutes,
             args.device, args.nproc, args.precision)


def cmd_verify(args):
    from .manifest import verify
    try:
        problems = verify(Path(args.path))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(str(e))
    for p in problems:
        print(p)
    print(f"{args.path}: " + ("OK, every file matches manifest.json" if not problems else
                              f"{len(problems)} problem(s)"), file=sys.stderr)
    sys.exit(1 if problems else 0)


def cmd_report(args):
    from .speedrun import report
    try:
        print(report(Path(args.path)))
    except FileNotFoundError as e:
        sys.exit(f"{args.path}: not a finished speedrun folder ({e.filename} is missing)")


def cmd_serve(args):
    import logging

    import uvicorn

    from .checkpoint import resolve
    from .sampling import generation_defaults
    from .serve import create_app
    from .worker import EngineProcess
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    path = resolve(args.path)
    defaults = generation_defaults(path) if args.generation_config == "auto" else {}  # (a bad file: before loading)
    if args.compile:
        print("sobre serve: compiling the decode step", file=sys.stderr)
    # the engine runs in its own process (its Python between ops never waits for the event loop's GIL), with
    # every core: the HTTP side uses about half a core at concurrency 16 (bench/serve.py, 2 cores: 1 thread gives
    # 5.2-5.3x concurrency 1's tokens/s, 2 threads 6.2-6.5x; with the engine in the server's process, 1 thread
    # had served 3x the tokens of 2)
    name = args.served_model_name or (args.path if not Path(args.path).exists() else Path(path).name)
    loras = dict(args.lora_modules)
    if len(loras) < len(args.lora_modules) or name in loras:
        raise ValueError(f"--lora-modules: each adapter needs a name of its own, apart from the model's ({name!r})")
    eng = EngineProcess(path, threads=args.threads or os.cpu_count() or 1, warm_up=args.compile,
                        dtype=DTYPES[args.dtype] if args.dtype else None, max_batch=args.max_batch,
                        device=pick_device(args.device), cache_tokens=args.cache_tokens, speculative=args.speculative,
                        fp8=args.fp8, int8=args.int8, compile=args.compile, prefix_cache=not args.no_prefix_cache,
                        min_acceptance=args.min_acceptance, draft_vocab=args.draft_vocab,
                        prefill_chunk=args.prefill_chunk, adapter=args.adapter, loras=loras)
    app = create_app(eng, name, args.api_key, args.max_queue, args.timeout, defaults, tuple(args.allowed_origins))
    print(f"sobre serve: {name} on http://{args.host}:{args.port} (chat page at /, API at /v1)", file=sys.stderr)
    if defaults:
        print("sobre serve: sampling defaults from generation_config.json: "
              + ", ".join(f"{k}={v}" for k, v in defaults.items()) + " (--generation-config none: OpenAI's)",
              file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="warning")
    app.state.server.loop.close()


TORCHRUN_VERBS = ("pretrain", "sft", "grpo", "distill", "rejection-sample", "eval")  # data parallel over processes


def main(argv=None):
    p = argparse.ArgumentParser(prog="sobre", description="sobre: an open, frugal DeepSeek-style LLM system")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    s = sub.add_parser("info", help="parameters, active parameters, FLOPs and KV-cache size of a model")
    s.add_argument("path", help="model directory, config.json or Hugging Face Hub id")
    s.add_argument("--ctx", type=at_least(1), default=4096, help="context length for the attention FLOPs term")
    s.add_argument("--json", action="store_true", help="also print the numbers as one JSON line")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("eplb", help="expert-parallel placement (DeepSeek's EPLB) from a run's measured expert loads")
    s.add_argument("run", help="a `sobre pretrain` run folder (metrics.jsonl) or a JSON [layers][experts] load matrix")
    s.add_argument("--gpus", type=at_least(1), default=4)
    s.add_argument("--nodes", type=at_least(1), default=1)
    s.add_argument("--groups", type=at_least(1), default=1,
                   help="expert groups (hierarchical policy when nodes divide it)")
    s.add_argument("--replicas", type=at_least(0), default=0, help="physical experts (default: experts + one per GPU)")
    s.add_argument("--last", type=at_least(0), default=0, help="use the last N steps' loads (default: the whole run)")
    s.set_defaults(fn=cmd_eplb)

    s = sub.add_parser("dualpipe", help="DualPipe / 1F1B / ZB1P pipeline schedules: simulated bubbles and memory")
    s.add_argument("--ranks", type=int, default=8, help="pipeline ranks (even for DualPipe)")
    s.add_argument("--micro-batches", type=int, default=20, help="micro-batches (even, >= 2 * ranks)")
    s.add_argument("--F", type=positive_float, default=1.0, help="time of a forward chunk")
    s.add_argument("--B", type=positive_float, default=2.0, help="time of a full backward chunk")
    s.add_argument("--W", type=float, default=1.0, help="time of its weight-gradient part")
    s.add_argument("--FB", type=positive_float, default=None, help="time of an overlapped F&B pair (default F + B)")
    s.add_argument("--plot", help="write the DualPipe timeline to this PNG")
    s.set_defaults(fn=cmd_dualpipe)

    s = sub.add_parser("convert", help="re-save a checkpoint (e.g. FP8 -> bf16) as a plain HF directory")
    s.add_argument("src", help="model directory or Hub id")
    s.add_argument("dst", help="output directory")
    s.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    s.add_argument("--shard-gb", type=positive_float, default=4.0, help="max shard size in GiB")
    s.add_argument("--adapter", metavar="DIR", help=ADAPTER_HELP + " (the merged model is written)")
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser("generate", help="continue a prompt (greedy or sampled)")
    s.add_argument("path", help="model directory or Hub id")
    s.add_argument("--prompt", help="text prompt (needs the model's tokenizer.json)")
    s.add_argument("--suffix", help="fill in the middle: the text after the hole, --prompt the text before it (the "
                   "model writes the middle; DeepSeek's FIM tokens)")
    s.add_argument("--ids", type=token_ids, help="comma-separated prompt token ids instead of text")
    s.add_argument("--max-new-tokens", type=at_least(1), default=64)
    s.add_argument("--min-tokens", type=at_least(0), default=0, help="tokens before a stop token may end the text")
    add_sampling_flags(s)
    s.add_argument("--presence-penalty", type=float, default=0.0)
    s.add_argument("--frequency-penalty", type=float, default=0.0)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--json", action="store_true", help="JSON mode: the answer is one JSON object (needs --prompt)")
    s.add_argument("--json-schema", metavar="FILE", help="structured output: one JSON object satisfying the JSON "
                   "schema in FILE (sobre.schema's keywords; needs --prompt)")
    add_decode_flags(s)
    s.add_argument("--threads", type=at_least(0), default=0, help="torch CPU threads (0 = torch's default)")
    s.add_argument("--expert-parallel", action="store_true",
                   help="shard the MoE experts over torchrun ranks (all-to-all dispatch)")
    s.add_argument("--redundant-experts", type=int, default=0,
                   help="extra expert copies per layer, placed by EPLB (with --expert-parallel)")
    s.add_argument("--expert-loads", help="EPLB loads: a `sobre pretrain` run folder or a JSON [layers][experts] "
                   "matrix (default: measured on the prompt)")
    add_device_flag(s)
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("chat", help="interactive chat in the terminal (streamed, reasoning shown dimmed)")
    s.add_argument("path", help="model directory or Hub id (with tokenizer.json)")
    s.add_argument("--system", default="", help="system prompt")
    s.add_argument("--max-new-tokens", type=at_least(1), default=1024)
    add_sampling_flags(s, **CHAT_SAMPLING)
    s.add_argument("--hide-reasoning", action="store_true", help="collapse reasoning to a token counter")
    s.add_argument("--no-think", action="store_true", help="do not open the answer with <think>")
    add_decode_flags(s)
    s.add_argument("--threads", type=at_least(0), default=0)
    add_device_flag(s)
    s.set_defaults(fn=cmd_chat)

    s = sub.add_parser("verify", help="check a checkpoint's files against its manifest.json (sha256)")
    s.add_argument("path", help="model directory written by sobre")
    s.set_defaults(fn=cmd_verify)

    s = sub.add_parser("report", help="print a speedrun folder's report card")
    s.add_argument("path", help="the speedrun's --out folder")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("serve", help="OpenAI/DeepSeek-compatible API + web chat page (continuous batching)")
    s.add_argument("path", help="model directory or Hub id (with tokenizer.json)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=port, default=8000)
    s.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1/*")
    s.add_argument("--allowed-origins", nargs="*", default=["*"], metavar="ORIGIN",
                   help="web origins whose pages may call the API (CORS; default any, as vLLM; no value: none)")
    s.add_argument("--served-model-name", default=None, help="default: the model folder's name")
    s.add_argument("--max-batch", type=at_least(1), default=64, help="sequences decoded together")
    s.add_argument("--max-queue", type=at_least(1), default=256, help="waiting requests before 503 + Retry-After")
    s.add_argument("--no-prefix-cache", action="store_true",
                   help="do not reuse the cache of shared prompt prefixes (on by default where the model allows)")
    s.add_argument("--timeout", type=positive_float, default=600.0, help="seconds per request")
    s.add_argument("--cache-tokens", type=at_least(1), default=None, help="KV-cache pool size in tokens")
    s.add_argument("--prefill-chunk", type=at_least(1), default=1024, metavar="N",
                   help="a longer prompt is prefilled N tokens a step, the running streams decoding between its "
                   "chunks (chunked prefill; bench/chunked.py)")
    s.add_argument("--generation-config", choices=("auto", "none"), default="auto",
                   help="auto: the sampling values of the checkpoint's generation_config.json are the defaults of "
                   "requests that leave them unset (as vLLM); none: OpenAI's defaults")
    add_decode_flags(s)
    s.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=DIR", type=lora_module,
                   help="PEFT LoRA adapters served beside the model, each request's `model` picking one by NAME "
                   "or the base model (vLLM's multi-LoRA; --adapter merges one instead)")
    s.add_argument("--threads", type=at_least(0), default=0, help="the engine's torch CPU threads (0: every core)")
    add_device_flag(s)
    s.set_defaults(fn=cmd_serve)

    from .distill import DistillArgs, distill
    from .grpo import GRPOArgs, grpo
    from .sft import SFTArgs, sft
    from .train import TrainArgs, pretrain
    for verb, cls, fn, about, what in (  # the training verbs: a dataclass's fields as flags, and its function
            ("pretrain", TrainArgs, pretrain, "pretrain a DeepSeek-V3-style model (MLA, MoE, MTP) from scratch",
             "metrics.jsonl, loss.png, expert_load.png, checkpoints/, model/"),
            ("sft", SFTArgs, sft, "supervised fine-tuning on chat JSONL and/or task reasoning traces",
             "metrics.jsonl, loss.png, model/"),
            ("grpo", GRPOArgs, grpo, "GRPO / Dr. GRPO / DAPO with verifiable rewards, rollouts on the engine",
             "metrics.jsonl, eval.jsonl, completions.jsonl, reward.png, model/"),
            ("distill", DistillArgs, distill, "distil a teacher's verified reasoning (and top-k logits) into a student",
             "traces-*.jsonl, metrics.jsonl, model/")):
        s = sub.add_parser(verb, help=about)
        add_dataclass_flags(s, cls)
        s.set_defaults(fn=functools.partial(run_dataclass, cls=cls, fn=fn, what=what))

    s = sub.add_parser("eval", help="held-out pass@1 / pass@k / maj@k and reference-solution loss on reasoning tasks")
    s.add_argument("path", help="model directory, sobre run folder or Hub id")
    s.add_argument("--task", nargs="+", default=["countdown"], help="built-in task names or .jsonl files")
    s.add_argument("--reward", default="", help=REWARD_HELP)
    s.add_argument("--n", "--problems", dest="n", type=at_least(1), default=64,
                   help="held-out problems per task (--problems under torchrun, whose own flags take --n)")
    s.add_argument("--samples", type=at_least(1), default=1, help="completions per problem (pass@k, maj@k)")
    s.add_argument("--temperature", type=float, default=None,
                   help="default: 0 (greedy) for one sample, 0.6 (R1's pass@1 / pass@k setting) for several")
    s.add_argument("--top-p", type=float, default=None, help="default: 0.95 (R1's) when sampling")
    s.add_argument("--max-new-tokens", type=at_least(1), default=128)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=at_least(0), default=0)
    s.add_argument("--json", action="store_true", help="also print each task's numbers as JSON")
    s.add_argument("--int8", action="store_true", help=INT8_HELP)
    s.add_argument("--adapter", metavar="DIR", help=ADAPTER_HELP)
    add_device_flag(s)
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("rejection-sample", help="sample, keep verified-correct completions, write an SFT set")
    s.add_argument("path", help="model directory, sobre run folder or Hub id")
    s.add_argument("--task", default="countdown")
    s.add_argument("--reward", default="", help=REWARD_HELP)
    s.add_argument("--out", required=True, help="output JSONL")
    s.add_argument("--n", "--problems", dest="n", type=at_least(1), default=256,
                   help="train problems (--problems under torchrun, whose own flags take --n for theirs)")
    s.add_argument("--samples", type=at_least(1), default=8, help="completions per problem")
    s.add_argument("--keep", type=at_least(1), default=1, help="distinct correct completions kept per problem")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--max-new-tokens", type=at_least(1), default=128)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--adapter", metavar="DIR", help=ADAPTER_HELP)
    add_device_flag(s)
    s.set_defaults(fn=cmd_rejection_sample)

    s = sub.add_parser("tokenizer-train", help="train a byte-level BPE tokenizer with DeepSeek's special tokens")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--input", nargs="*", default=(), help=".txt/.jsonl/.parquet files (default: built-in corpus)")
    s.add_argument("--vocab-size", type=int, default=4096)
    s.add_argument("--max-bytes", type=at_least(1), default=4 << 20, help="size of the built-in corpus sample")
    s.set_defaults(fn=cmd_tokenizer_train)

    s = sub.add_parser("speedrun", help="the end-to-end pipeline on built-in defaults")
    s.add_argument("--out", default="runs/speedrun", help="run folder")
    s.add_argument("--preset", default="tiny", help="model preset: debug, tiny, small (for a GPU)")
    s.add_argument("--steps", type=at_least(1), default=None,
                   help="pretraining steps; the other stages scale with it (default: the 300-step recipe, cut "
                        "where this machine would not finish it within --minutes)")
    s.add_argument("--minutes", type=positive_float, default=30.0,
                   help="wall-time budget the default run is sized to (ignored with --steps)")
    s.add_argument("--eval-problems", type=at_least(1), default=100, help="held-out problems per evaluation")
    s.add_argument("--force", action="store_true", help="redo finished stages")
    s.add_argument("--seed", type=int, default=0)
    add_device_flag(s)
    s.add_argument("--nproc", type=at_least(1), default=1,
                   help="the training stages in N torchrun processes (one per GPU with cuda): pretraining FSDP2 "
                        "at N x the batch, sft / grpo / distill data parallel on the same batch")
    s.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="the training stages' matmuls: bf16 autocast (fp32 weights and optimizer) or fp32; auto: "
                        "bf16 where a timed training step runs 1.2x faster so (GPUs, CPUs with AMX)")
    s.set_defaults(fn=cmd_speedrun)

    args = p.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not (args.verb in TORCHRUN_VERBS or getattr(
            args, "expert_parallel", False)):
        sys.exit(f"sobre {args.verb}: error: runs in one process, not under torchrun (torchrun runs "
                 f"{', '.join(TORCHRUN_VERBS)}, and generate --expert-parallel)")
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"sobre {args.verb}: error: {e}")


if __name__ == "__main__":
    main()
