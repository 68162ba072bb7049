"""`sobre speedrun`: the whole pipeline on built-in defaults, ending in a report card.

Stages so far: build a DeepSeek-V3-style model -> export it as an HF checkpoint -> reload it with sobre and
with transformers and compare logits (naive and absorbed MLA) -> greedy generation in both -> report.
Tokenizer training, pretraining, SFT, GRPO and distillation join as their stages land.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import load, save
from .config import preset
from .engine import generate
from .model import Transformer, init_weights
from .stats import model_stats


def speedrun(out: Path, preset_name: str = "tiny", seed: int = 0) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    results: dict = {"preset": preset_name, "seed": seed}
    log = open(out / "metrics.jsonl", "w")

    def record(stage, **kw):
        kw = {"stage": stage, **kw}
        results[stage] = kw
        log.write(json.dumps(kw) + "\n")
        log.flush()

    cfg = preset(preset_name, seed=seed)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    x = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(seed))
    prompt = x[0, :16].tolist()
    bar = tqdm(total=5, desc="speedrun", unit="stage")

    model = init_weights(Transformer(cfg), std=0.1).eval()
    s = model_stats(cfg)
    record("build", params=s["params"], active_params=s["active_params"], kv_latent_bytes=s["kv"]["latent"],
           kv_naive_bytes=s["kv"]["naive"])
    bar.update()

    t0 = time.perf_counter()
    path = save(model, out / "model")
    reloaded = load(path)
    with torch.no_grad():
        ref = model(x)
        record("export", seconds=round(time.perf_counter() - t0, 3), path=str(path),
               reload_max_diff=(reloaded(x) - ref).abs().max().item())
        bar.update()
        reloaded.config.attn_impl = "absorb"
        record("absorb", max_diff=(reloaded(x) - ref).abs().max().item())
        bar.update()

    t0 = time.perf_counter()
    ours = list(generate(model, prompt, max_new_tokens=32))
    record("generate", tokens=len(ours), tok_per_s=round(len(ours) / (time.perf_counter() - t0), 1))
    bar.update()

    try:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging
        logging.set_verbosity_error()  # it would list our MTP tensors, which it does not use, as unexpected
    except ImportError:
        record("transformers", skipped="transformers is not installed (pip install 'sobre[test]')")
    else:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            diff = (hf(x).logits - ref).abs().max().item()
            hf_gen = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, len(prompt):].tolist()
        record("transformers", logits_max_diff=diff, logit_scale=ref.abs().max().item(),
               greedy_tokens_equal=hf_gen == ours)
    bar.update()
    bar.close()
    log.close()
    report(out, results)
    return results


def report(out: Path, r: dict):
    b, t = r["build"], r["transformers"]
    lines = [f"# sobre speedrun report ({r['preset']}, seed {r['seed']})", "",
             "| stage | result |", "|---|---|",
             f"| build | {b['params']:,} params, {b['active_params']:,} active/token; KV cache "
             f"{b['kv_latent_bytes']} B/token latent vs {b['kv_naive_bytes']} B/token full K/V |",
             f"| export + reload | max logit diff {r['export']['reload_max_diff']:.2e} ({r['export']['path']}) |",
             f"| absorbed MLA vs naive | max logit diff {r['absorb']['max_diff']:.2e} |",
             f"| generate | {r['generate']['tokens']} tokens at {r['generate']['tok_per_s']} tok/s (greedy) |"]
    if "skipped" in t:
        lines.append(f"| transformers parity | skipped: {t['skipped']} |")
    else:
        lines.append(f"| transformers parity | max logit diff {t['logits_max_diff']:.2e} (scale "
                     f"{t['logit_scale']:.1f}); greedy tokens equal: {t['greedy_tokens_equal']} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
