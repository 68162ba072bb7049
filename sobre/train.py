"""Pretraining: AdamW, warmup + cosine/WSD, grad clipping and accumulation, DeepSeek-V3's auxiliary-loss-free
balancing (+ the small sequence-wise balance loss) and the MTP loss; checkpoints that resume bit-exactly.

Run folder: config.json (the run's arguments and model config), tokenizer/, data/, metrics.jsonl (one object
per optimizer step), checkpoints/ckpt-NNNNNNN.pt (last K), loss.png, expert_load.png, model/ (HF export).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import save
from .config import preset
from .data import Batches, build, builtin_docs, file_docs
from .engine import generate
from .model import MoE, Transformer, init_weights
from .stats import model_stats
from .tokenizer import bytes_per_token, load_tokenizer, train_tokenizer


@dataclass
class TrainArgs:
    out: str = "runs/pretrain"
    preset: str = "debug"
    steps: int = 200
    save_every: int = 50
    keep: int = 3
    resume: bool = False
    seed: int = 0
    batch_size: int = 8
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay, last 20% decays)
    weight_decay: float = 0.1
    clip: float = 1.0
    bf16: bool = False  # autocast matmuls to bf16 (params and optimizer stay fp32)
    mtp_weight: float = 0.3  # lambda
    balance_alpha: float = 1e-4  # sequence-wise balance loss
    bias_update: float = 1e-3  # gamma of aux-loss-free balancing
    eval_every: int = 50
    eval_batches: int = 4
    sample_every: int = 100
    data: tuple[str, ...] = ()  # user files (.txt/.jsonl/.parquet); empty = built-in corpus
    data_bytes: int = 2 << 20  # size of the built-in corpus
    vocab_size: int = 0  # 0 = the preset's
    threads: int = 0

    def validate(self):
        for k in ("steps", "save_every", "keep", "batch_size", "seq_len", "grad_accum"):
            if getattr(self, k) <= 0:
                raise ValueError(f"--{k.replace('_', '-')} must be positive, got {getattr(self, k)}")
        if self.schedule not in ("cosine", "wsd"):
            raise ValueError(f"--schedule must be cosine or wsd, got {self.schedule!r}")


def lr_at(a: TrainArgs, step: int) -> float:
    """Multiplier of a.lr at optimizer step `step` (0-based)."""
    if step < a.warmup:
        return (step + 1) / a.warmup
    progress = (step - a.warmup) / max(a.steps - a.warmup, 1)
    if a.schedule == "wsd":
        decay = max(0.0, (progress - 0.8) / 0.2)
        return 1 - (1 - a.min_lr_ratio) * decay
    return a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: Transformer, weight_decay: float):
    """No weight decay on norms, biases and embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or "embed" in name or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def losses(model: Transformer, x, y, a: TrainArgs) -> dict:
    """Main cross-entropy, MTP cross-entropy (mean over depths) and the balance term."""
    h = model.hidden(x)
    out = {"ce": F.cross_entropy(model.head(h).flatten(0, 1).float(), y.flatten())}
    mtp = model.mtp_logits(h, x) if model.mtp and a.mtp_weight else []
    out["mtp"] = sum(F.cross_entropy(lg.flatten(0, 1).float(), y[:, k:].flatten())
                     for k, lg in enumerate(mtp, start=1)) / len(mtp) if mtp else torch.zeros(())
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    out["balance"] = sum(m.balance_loss for m in moes) if moes else torch.zeros(())
    out["total"] = out["ce"] + a.mtp_weight * out["mtp"] + a.balance_alpha * out["balance"]
    return out


def update_router_bias(loads: dict, gamma: float):
    """Aux-loss-free balancing: raise the bias of under-loaded experts by gamma, lower over-loaded ones."""
    for moe, load in loads.items():
        load = load.float()
        moe.gate.bias += gamma * torch.sign(load.mean() - load)


def matmul_peak_flops() -> float:
    """Measured fp32 matmul throughput of this machine, the denominator of the MFU estimate."""
    a = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone
    a @ a
    t0 = time.perf_counter()
    for _ in range(5):
        a @ a
    return 5 * 2 * 1024**3 / (time.perf_counter() - t0)


def prepare(a: TrainArgs, run: Path):
    """Tokenizer and tokenised data of the run (made once, reused on resume)."""
    tok = load_tokenizer(run / "tokenizer")
    if tok is None:
        docs = list(builtin_docs(a.data_bytes, a.seed) if not a.data else
                    (d for f in a.data for d in file_docs(f)))
        vocab = a.vocab_size or preset(a.preset).vocab_size
        tok = train_tokenizer((d for i, d in enumerate(docs) if i % 50 != 49), vocab, run / "tokenizer")
        bpt = bytes_per_token(tok, [d for i, d in enumerate(docs) if i % 50 == 49])
        (run / "tokenizer" / "stats.json").write_text(json.dumps({"heldout_bytes_per_token": bpt}) + "\n")
    if not (run / "data" / "manifest.json").exists():
        docs = builtin_docs(a.data_bytes, a.seed) if not a.data else (d for f in a.data for d in file_docs(f, tok))
        build(docs, tok, run / "data")
    return tok


def checkpoints(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("ckpt-*.pt"))


def save_checkpoint(run: Path, step: int, model, opt, keep: int):
    d = run / "checkpoints"
    d.mkdir(exist_ok=True)
    state = {"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state()}
    tmp = d / f".ckpt-{step:07d}.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, d / f"ckpt-{step:07d}.pt")  # atomic: a kill leaves the old checkpoint or the new one
    for old in checkpoints(run)[:-keep]:
        old.unlink()


def load_checkpoint(path: Path, model, opt) -> int:
    try:
        state = torch.load(path, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
    except Exception as e:
        raise ValueError(f"{path}: corrupted or incompatible checkpoint ({type(e).__name__}: {e}); delete it "
                         "to resume from the one before") from None
    return state["step"]


def pretrain(a: TrainArgs) -> Path:
    a.validate()
    run = Path(a.out)
    if a.threads:
        torch.set_num_threads(a.threads)
    if run.exists() and (run / "metrics.jsonl").exists() and not a.resume and checkpoints(run):
        raise ValueError(f"{run} already holds a run; pass --resume to continue it or choose another --out")
    run.mkdir(parents=True, exist_ok=True)
    tok = prepare(a, run)
    torch.manual_seed(a.seed)
    cfg = preset(a.preset, vocab_size=tok.vocab_size, max_seq_len=max(preset(a.preset).max_seq_len, a.seq_len),
                 bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, seed=a.seed)
    (run / "config.json").write_text(json.dumps({"train": asdict(a), "model": cfg.to_dict()}, indent=2) + "\n")
    model = init_weights(Transformer(cfg)).train()
    opt = torch.optim.AdamW(param_groups(model, a.weight_decay), lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    train = Batches(run / "data", "train", a.seq_len, a.batch_size, a.seed)
    val = Batches(run / "data", "val", a.seq_len, a.batch_size, a.seed)
    start = 0
    if a.resume and checkpoints(run):
        start = load_checkpoint(checkpoints(run)[-1], model, opt)
    _truncate_metrics(run / "metrics.jsonl", start)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    flops_tok = 3 * model_stats(cfg, ctx=a.seq_len)["flops_per_token"]
    peak = matmul_peak_flops()
    log = open(run / "metrics.jsonl", "a")
    bar = tqdm(range(start, a.steps), initial=start, total=a.steps, desc="pretrain", unit="step")
    for step in bar:
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = a.lr * lr_at(a, step)
        loads = {m: torch.zeros_like(m.gate.bias) for m in moes}
        parts = {"ce": 0.0, "mtp": 0.0, "balance": 0.0}
        for micro in range(a.grad_accum):
            x, y = train.batch(step * a.grad_accum + micro)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
                out = losses(model, x, y, a)
            (out["total"] / a.grad_accum).backward()
            for k in parts:
                parts[k] += out[k].item() / a.grad_accum
            for m in moes:
                loads[m] += m.last_load
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            update_router_bias(loads, a.bias_update)
        dt = time.perf_counter() - t0
        ntok = a.batch_size * a.seq_len * a.grad_accum
        rec = {"step": step + 1, "loss": parts["ce"], "mtp_loss": parts["mtp"], "balance_loss": parts["balance"],
               "lr": opt.param_groups[0]["lr"], "grad_norm": gnorm, "tokens_per_s": ntok / dt,
               "mfu": ntok * flops_tok / dt / peak,
               "expert_load_max_over_mean": [float(v.max() / v.float().mean()) for v in loads.values()]}
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            rec["val_loss"] = evaluate(model, val, a.eval_batches)
            rec["val_bpb"] = rec["val_loss"] / math.log(2) / val.bytes_per_token
        if (step + 1) % a.sample_every == 0 or step + 1 == a.steps:
            rec["sample"] = sample_text(model, tok)
        log.write(json.dumps(rec) + "\n")
        log.flush()
        bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
        if (step + 1) % a.save_every == 0 or step + 1 == a.steps:
            save_checkpoint(run, step + 1, model, opt, a.keep)
    log.close()
    model.eval()
    save(model, run / "model", tokenizer_dir=run / "tokenizer")
    from .report import plot_training
    plot_training(run)
    return run


def _truncate_metrics(path: Path, step: int):
    """Drop metric lines past the checkpoint we resume from (a killed run may have logged further)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in lines))


@torch.no_grad()
def evaluate(model: Transformer, val: Batches, n_batches: int) -> float:
    was = model.training
    model.eval()
    total = [F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten()).item() for x, y in val.sequential(n_batches)]
    model.train(was)
    return sum(total) / len(total)


def sample_text(model: Transformer, tok, prompt: str = "Question: What is 12 + 7?\n<think>\n", n: int = 32) -> str:
    was = model.training
    model.eval()
    ids = list(generate(model, tok.encode(prompt), max_new_tokens=n))
    model.train(was)
    return tok.decode(ids)
