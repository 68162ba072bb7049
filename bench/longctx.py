"""Long-context retrieval: small models with full attention, NSA and DSA learn to find a needle 4k tokens back.

    python bench/longctx.py [--len 4096] [--schedule 32:200:64,...] [--attn full nsa dsa] [--span 1]

A sequence is random filler (tokens 2..127) with `--span` marker tokens (128..255) hidden at random places,
then a cue token and the markers again: the model must recall them in order (loss and accuracy on those
tokens only; with --span 1 it is passkey retrieval). Only attention over the whole context solves it: the
needle may sit 4k tokens back, far outside NSA's 512-token window. Training follows a length curriculum from
32 tokens (every model gets the same batches; the learning rate follows sqrt(batch) as the batch shrinks);
every model is then evaluated on the same 64 fresh sequences of --len tokens. Prints a markdown table.
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F

from sobre.config import parse_overrides, preset
from sobre.model import Transformer, init_weights
from sobre.parallel import keep_freed_memory

FILLER, MARKS, CUE = (2, 128), (128, 256), 1  # token ranges, the cue token
VOCAB = 256


def batch(n: int, length: int, span: int, g: torch.Generator):
    """tokens [n, length]: filler, `span` distinct marker tokens planted at random places (in order), then the
    cue token and the markers again; the model predicts x[:, -span:] from the positions before them."""
    x = torch.randint(*FILLER, (n, length), generator=g)
    for i in range(n):
        s = torch.randperm(MARKS[1] - MARKS[0], generator=g)[:span] + MARKS[0]
        at = torch.randperm(length - span - 1, generator=g)[:span].sort().values
        x[i, at] = s
        x[i, -span:] = s
    x[:, -span - 1] = CUE
    return x


def model_for(attn: str, length: int, overrides=()) -> Transformer:
    kw = dict(vocab_size=VOCAB, dim=128, inter_dim=256, n_layers=2, n_heads=4, max_seq_len=length,
              n_routed_experts=0, n_mtp_layers=0, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32,
              qk_rope_head_dim=16, v_head_dim=32, rope_theta=100000.0)
    if attn == "nsa":  # the paper's block sizes and window; 4 query heads share one K/V head (one block choice)
        kw.update(attn_type="nsa", n_kv_heads=1)
    if attn == "dsa":
        kw.update(attn_type="dsa", index_topk=256, index_n_heads=4, index_head_dim=32)
    if attn != "full":
        kw.update(parse_overrides(overrides))
    return init_weights(Transformer(preset("debug", **kw)), seed=0)


def span_loss(model, x, span: int):
    """Cross-entropy and accuracy on the recalled span tokens, plus DSA's indexer KL (0 for the others)."""
    logits = model(x)[:, -span - 1:-1]  # [n, span, V]
    y = x[:, -span:]
    kls = [m.indexer_loss for m in model.modules() if getattr(m, "indexer_loss", None) is not None]
    kl = sum(kls) / len(kls) if kls else torch.zeros(())
    return F.cross_entropy(logits.flatten(0, 1), y.flatten()), (logits.argmax(-1) == y).float().mean(), kl


def train(attn: str, a, log) -> dict:
    torch.manual_seed(0)
    model = model_for(attn, a.len, a.overrides).train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    plan = [tuple(int(v) for v in st.split(":")) for st in a.schedule.split(",")]  # (length, steps, batch)
    todo = [(L, B) for L, n, B in plan for _ in range(n)]
    g, t0 = torch.Generator().manual_seed(1), time.perf_counter()
    for step, (length, bsz) in enumerate(todo):
        for group in opt.param_groups:  # linear warm-up, then lr ~ sqrt(batch): longer phases have fewer answers
            group["lr"] = a.lr * min(1.0, (step + 1) / a.warmup) * (bsz / todo[0][1]) ** 0.5
        loss, acc, kl = span_loss(model, batch(bsz, length, a.span, g), a.span)
        opt.zero_grad()
        (loss + kl).backward()  # the indexer KL reaches only the DSA indexers (their inputs are detached)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        row = dict(attn=attn, step=step, len=length, loss=round(loss.item(), 4), acc=round(acc.item(), 3),
                   kl=round(kl.item(), 4), s=round(time.perf_counter() - t0, 1))
        log.write(json.dumps(row) + "\n")
        if step % 25 == 0 or step == len(todo) - 1:
            print(row, flush=True)
    out = {"minutes": (time.perf_counter() - t0) / 60, **evaluate(model, a)}
    print(f"{attn}: held-out accuracy {out['acc']:.3f} at {a.len} tokens after {out['minutes']:.1f} min", flush=True)
    return out


@torch.no_grad()
def evaluate(model, a) -> dict:
    model.eval()
    x = batch(a.eval, a.len, a.span, torch.Generator().manual_seed(2))  # the same held-out set for every model
    accs = torch.stack([span_loss(model, x[i:i + 4], a.span)[1] for i in range(0, a.eval, 4)])
    return {"acc": accs.mean().item()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--len", type=int, default=4096, help="evaluation length (and the model's max_seq_len)")
    ap.add_argument("--schedule", default="32:200:64,128:100:32,512:60:16,1024:40:8,2048:30:4,4096:30:2",
                    help="length curriculum LENGTH:STEPS:BATCH,...")
    ap.add_argument("--span", type=int, default=1, help="marker tokens planted and recalled in order")
    ap.add_argument("--lr", type=float, default=3e-3, help="at the first phase's batch; scaled by sqrt(batch)")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--eval", type=int, default=64, help="held-out sequences")
    ap.add_argument("--attn", nargs="*", default=["full", "nsa", "dsa"])
    ap.add_argument("--log", default="longctx.jsonl", help="per-step metrics (JSONL)")
    ap.add_argument("--overrides", nargs="*", default=(), help="Config fields for the sparse models, KEY=VALUE")
    a = ap.parse_args()
    keep_freed_memory()  # as sobre's engines and runs do; the baseline shares it (bench/README.md)
    with open(a.log, "w") as log:
        rows = {attn: train(attn, a, log) for attn in a.attn}
    print(f"\n| attention | held-out recall accuracy at {a.len} tokens | train minutes |\n|---|---|---|")
    for attn, r in rows.items():
        print(f"| {attn} | {r['acc']:.3f} | {r['minutes']:.1f} |")


if __name__ == "__main__":
    main()
