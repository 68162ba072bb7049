"""`sobre speedrun`: the whole pipeline on built-in defaults, ending in a report card.

Stages so far: train a BPE tokenizer and pretrain a DeepSeek-V3-style model (MLA, MoE with aux-loss-free
balancing, MTP) on the built-in offline corpus -> export it as an HF checkpoint -> check transformers gives
the same logits and greedy tokens -> answer a question with the engine, plain and with MTP speculative
decoding (acceptance of the trained MTP head) -> report.md. SFT, GRPO and distillation join as they land.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .checkpoint import load
from .engine import Engine
from .report import read_metrics
from .stats import model_stats
from .tokenizer import load_tokenizer
from .train import TrainArgs, pretrain

QUESTION = "Question: What is 12 + 7?\n<think>\n"


def speedrun(out: Path, preset_name: str = "tiny", seed: int = 0, steps: int = 300) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"preset": preset_name, "seed": seed}
    log = open(out / "metrics.jsonl", "w")

    def record(stage, **kw):
        results[stage] = kw
        log.write(json.dumps({"stage": stage, **kw}) + "\n")
        log.flush()

    t0 = time.perf_counter()
    run = pretrain(TrainArgs(out=str(out / "pretrain"), preset=preset_name, steps=steps, seed=seed,
                             save_every=max(steps // 3, 1), eval_every=max(steps // 6, 1),
                             sample_every=max(steps // 3, 1), seq_len=256, batch_size=8,
                             warmup=max(steps // 15, 1), data_bytes=4 << 20, resume=True))
    rows = read_metrics(run)
    tok_stats = json.loads((run / "tokenizer" / "stats.json").read_text())
    val = [r for r in rows if "val_loss" in r]
    record("pretrain", minutes=round((time.perf_counter() - t0) / 60, 2), steps=steps, first_loss=rows[0]["loss"],
           final_loss=rows[-1]["loss"], val_loss=val[-1]["val_loss"], val_bpb=val[-1]["val_bpb"],
           tokens_per_s=round(sum(r["tokens_per_s"] for r in rows[1:]) / max(len(rows) - 1, 1)),
           tokenizer_bytes_per_token=round(tok_stats["heldout_bytes_per_token"], 3),
           expert_load_max_over_mean=rows[-1]["expert_load_max_over_mean"])

    model_dir = run / "model"
    model, tok = load(model_dir, dtype=torch.float32), load_tokenizer(model_dir)
    s = model_stats(model.config)
    x = torch.tensor([tok.encode(QUESTION + "12 + 7 = 19")])
    try:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging
        logging.set_verbosity_error()  # it would list our MTP tensors, which it does not use, as unexpected
    except ImportError:
        record("transformers", skipped="transformers is not installed (pip install 'sobre[test]')")
    else:
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        prompt = tok.encode(QUESTION)
        with torch.no_grad():
            ref = model(x)
            diff = (hf(x).logits - ref).abs().max().item()
            hf_gen = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, len(prompt):].tolist()
        ours = Engine(model).generate([prompt], max_new_tokens=24)[0]
        record("transformers", logits_max_diff=diff, logit_scale=ref.abs().max().item(),
               greedy_tokens_equal=hf_gen == ours)

    prompt = tok.encode(QUESTION)
    rates = {}
    for spec in (False, True):
        eng = Engine(model, tok, speculative=spec)
        eng.generate([prompt], max_new_tokens=8)  # warm up
        t0 = time.perf_counter()
        answer = eng.generate([prompt], max_new_tokens=64)[0]
        rates[spec] = len(answer) / (time.perf_counter() - t0)
        if spec:
            acc = eng.spec_stats["accepted"] / max(eng.spec_stats["drafted"], 1)
    record("generate", answer=tok.decode(answer), tok_per_s=round(rates[False], 1),
           speculative_tok_per_s=round(rates[True], 1), mtp_acceptance=round(acc, 3),
           speculative_speedup=round(rates[True] / rates[False], 2), params=s["params"],
           active_params=s["active_params"], kv_latent_bytes=s["kv"]["latent"], kv_naive_bytes=s["kv"]["naive"])
    log.close()
    report(out, results)
    return results


def report(out: Path, r: dict):
    p, g, t = r["pretrain"], r["generate"], r["transformers"]
    lines = [f"# sobre speedrun report ({r['preset']}, seed {r['seed']})", "",
             "| stage | result |", "|---|---|",
             f"| tokenizer | byte-level BPE, {p['tokenizer_bytes_per_token']} bytes/token on held-out text |",
             f"| pretrain | {p['steps']} steps in {p['minutes']} min at {p['tokens_per_s']} tok/s; loss "
             f"{p['first_loss']:.2f} -> {p['final_loss']:.2f}; val loss {p['val_loss']:.3f} "
             f"({p['val_bpb']:.3f} bits/byte); expert load max/mean {p['expert_load_max_over_mean']} |",
             f"| model | {g['params']:,} params, {g['active_params']:,} active/token; KV cache {g['kv_latent_bytes']} "
             f"B/token latent vs {g['kv_naive_bytes']} B/token full K/V |"]
    if "skipped" in t:
        lines.append(f"| transformers parity | skipped: {t['skipped']} |")
    else:
        lines.append(f"| transformers parity | max logit diff {t['logits_max_diff']:.2e} (scale "
                     f"{t['logit_scale']:.1f}); greedy tokens equal: {t['greedy_tokens_equal']} |")
    lines += [f"| generate | {g['tok_per_s']} tok/s; MTP speculative {g['speculative_tok_per_s']} tok/s "
              f"({g['speculative_speedup']}x, acceptance {g['mtp_acceptance']:.0%}) |",
              "", "Sample answer to `What is 12 + 7?`:", "", "```", QUESTION + g["answer"], "```",
              "", "Plots: `pretrain/loss.png`, `pretrain/expert_load.png`."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
