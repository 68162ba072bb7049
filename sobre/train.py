"""Pretraining: AdamW, warmup + cosine/WSD, grad clipping and accumulation, DeepSeek-V3's auxiliary-loss-free
balancing (+ the small sequence-wise balance loss) and the MTP loss; checkpoints that resume bit-exactly.

Run folder: config.json (the run's arguments and model config), tokenizer/, data/, metrics.jsonl (one object
per optimizer step), checkpoints/ckpt-NNNNNNN.pt (last K), loss.png, expert_load.png, model/ (HF export).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from . import checkpoint, lora, parallel
from .checkpoint import save
from .config import DENSE_ARCHS, Config, parse_overrides, preset
from .data import Batches, build, builtin_docs, file_docs
from .engine import generate
from .linear import native_bf16
from .model import MLA, Transformer, build_model, init_weights
from .moe import moe_layers
from .optim import Muon, Optimizers, muon_params
from .stats import model_stats
from .tokenizer import bytes_per_token, load_tokenizer, train_tokenizer


@dataclass
class RunArgs:
    """The flags every training verb (pretrain, sft, grpo, distill) shares, with the same defaults."""
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay, last 20% decays)
    clip: float = 1.0  # max global grad norm (0: no clipping; the norm is logged either way)
    bf16: bool = False  # autocast matmuls to bf16 (params and optimizer stay fp32)
    resume: bool = False  # go on from the run folder's last checkpoint (--out), exactly where it stopped
    seed: int = 0  # the initialisation, data order and sampling draws
    threads: int = 0  # torch's CPU threads (0: torch's default)
    device: str = "auto"  # auto (the GPU when torch sees one) | cpu | cuda | cuda:N | mps; torchrun: each rank's GPU
    push_to_hub: str = ""  # a Hub repo id (org/name): the exported model uploaded there at the end (needs a token)
    hub_private: bool = False  # (--push-to-hub) a repo it creates is private
    VERB = "pretrain"  # (the sobre verb these flags belong to: the model card names it)

    @property
    def max_grad_norm(self) -> float:
        return self.clip or math.inf  # (--clip 0: no clipping, as transformers' max_grad_norm 0)

    def check_ranges(self):
        """ValueError naming the first flag of a training verb outside its range (RANGES; flags it lacks skipped):
        a negative loss weight, clip range or KL coefficient would train without a word."""
        for k, (lo, hi, closed) in RANGES.items():
            v = getattr(self, k, None)
            if v is not None and not (lo <= v <= hi and (closed or v != lo)):
                flag, low = f"--{k.replace('_', '-')}", "[" if closed else "("
                raise ValueError(f"{flag} must be in {low}{lo:g}, {hi:g}], got {v}" if hi != math.inf else
                                 f"{flag} must be {'>=' if closed else '>'} {lo:g}, got {v}")


# flag -> (low, high, low included) for check_ranges; counts that must be positive are checked by require_positive
RANGES = {**dict.fromkeys(("lr", "warmup", "weight_decay", "clip", "mtp_weight", "balance_alpha", "bias_update",
                           "router_bias_update", "beta", "format_weight", "overlong_buffer", "dsa_warmup", "threads",
                           "vocab_size", "epsilon_high", "log_completions", "indexer_kl"), (0, math.inf, True)),
          **dict.fromkeys(("min_lr_ratio", "val_share", "direct", "logit_weight", "fim_rate"), (0, 1, True)),
          "epsilon_low": (0, 1, False), "kd_temperature": (0, math.inf, False)}


@dataclass
class TrainArgs(RunArgs):
    out: str = "runs/pretrain"  # the run folder (metrics, plots, checkpoints, the model in model/)
    preset: str = "debug"  # the model's sizes: debug | tiny | small
    steps: int = 200  # optimizer steps
    save_every: int = 50  # steps between checkpoints (and one at the end)
    keep: int = 3  # checkpoints kept
    batch_size: int = 8  # sequences a step (split over torchrun's processes)
    seq_len: int = 128  # tokens a sequence
    grad_accum: int = 1  # micro-batches a step
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the schedule's last learning rate, a share of the peak
    warmup: int = 20  # steps of linear warmup
    weight_decay: float = 0.1  # AdamW's (norms, biases and embeddings excepted)
    optimizer: str = "adamw"  # adamw | muon (hidden matrices, experts too; AdamW for embeddings, head, norms)
    mtp_weight: float = 0.3  # lambda
    balance_alpha: float = 1e-4  # sequence-wise balance loss
    bias_update: float = 1e-3  # gamma of aux-loss-free balancing
    eval_every: int = 50  # steps between validation losses
    eval_batches: int = 4  # validation batches each time
    sample_every: int = 100  # steps between sampled texts in metrics.jsonl ("sample")
    data: tuple[str, ...] = ()  # user files (.txt/.jsonl/.parquet); empty = built-in corpus
    data_bytes: int = 2 << 20  # size of the built-in corpus
    fim_rate: float = 0.1  # share of training documents written fill-in-the-middle (PSM; DeepSeek-V3's 0.1)
    vocab_size: int = 0  # 0 = the preset's
    expert_parallel: bool = False  # under torchrun: experts split over ranks (all-to-all dispatch)
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, more compute
    compile: bool = False  # torch.compile each block's training forward (0-7% on a 2-core CPU; meant for GPUs)
    arch: str = "deepseek_v3"  # deepseek_v3 (with --attn) | deepseek_v4 (the preset's V4 twin: CSA/HCA, mHC, hash
    #   MoE) | qwen2 / llama / qwen3 (the preset's dense twin, as the distilled students)
    attn: str = "full"  # full | nsa (Native Sparse Attention) | dsa (DeepSeek Sparse Attention = deepseek_v32)
    dsa_warmup: int = 0  # DSA stage 1: steps of dense attention in which only the indexer trains
    model_overrides: tuple[str, ...] = ()  # Config fields as KEY=VALUE, e.g. nsa_window=256 index_topk=512

    def validate(self):
        require_positive(self, "steps", "save_every", "keep", "batch_size", "seq_len", "grad_accum", "eval_every",
                         "eval_batches", "sample_every", "data_bytes")
        self.check_ranges()
        if self.schedule not in ("cosine", "wsd"):
            raise ValueError(f"--schedule must be cosine or wsd, got {self.schedule!r}")
        if self.attn not in ("full", "nsa", "dsa"):
            raise ValueError(f"--attn must be full, nsa or dsa, got {self.attn!r}")
        if self.dsa_warmup and self.attn != "dsa":
            raise ValueError("--dsa-warmup trains the DSA indexer: use it with --attn dsa")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"--optimizer must be adamw or muon, got {self.optimizer!r}")
        if self.optimizer == "muon" and self.expert_parallel:
            raise ValueError("--optimizer muon does not run with --expert-parallel yet")
        self.arch = {"v3": "deepseek_v3", "v4": "deepseek_v4"}.get(self.arch, self.arch)  # --arch v4 as the issue
        if self.arch not in ("deepseek_v3", "deepseek_v4", *DENSE_ARCHS):
            raise ValueError(f"--arch must be deepseek_v3 (v3), deepseek_v4 (v4), qwen2, llama or qwen3, got "
                             f"{self.arch!r}")
        if self.arch != "deepseek_v3" and self.attn != "full":
            raise ValueError(f"--attn picks a deepseek_v3 attention; {self.arch} brings its own")

    def model_config(self, **fields) -> Config:
        """The preset with the run's attention choice and --model-overrides applied (fields: vocab, tokens...)."""
        base = preset(self.preset)
        if self.arch != "deepseek_v3":
            return preset(self.preset, arch=self.arch, **fields, **parse_overrides(self.model_overrides))
        kw = {"attn_type": self.attn}
        if self.attn == "nsa":  # NSA shares its block choice within a group of query heads
            kw["n_kv_heads"] = max(1, base.n_heads // 4)
        return preset(self.preset, **fields, **kw, **parse_overrides(self.model_overrides))


def require_positive(args, *fields: str):
    """ValueError naming the first of `fields` of a run's arguments that is not positive, as its CLI flag."""
    for k in fields:
        if getattr(args, k) <= 0:
            raise ValueError(f"--{k.replace('_', '-')} must be positive, got {getattr(args, k)}")


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
    """No weight decay on norms, biases and embeddings; frozen parameters left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "embed" in name or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def losses(model: Transformer, x, y, a: TrainArgs) -> dict:
    """Main cross-entropy, MTP cross-entropy (mean over depths), the balance term and DSA's indexer KL (which
    reaches only the indexers: they see detached inputs)."""
    indexed = indexed_layers(model)
    for m in indexed:
        m.indexer_loss = None
    ce, mtp = model(x, mtp=bool(model.mtp and a.mtp_weight), targets=y)  # (the logits never made whole)
    out = {"ce": ce, "mtp": sum(mtp) / len(mtp) if mtp else torch.zeros(())}
    moes = moe_layers(model)
    out["balance"] = sum(m.balance_loss for m in moes) if moes else torch.zeros(())
    out["indexer"] = mean_indexer_kl(indexed)
    out["total"] = out["ce"] + a.mtp_weight * out["mtp"] + a.balance_alpha * out["balance"] + out["indexer"]
    return out


def indexed_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention modules whose training forwards make a sparse-attention indexer's KL (`indexer_loss`): DSA's
    MLA, V4's attention (its CSA layers make one)."""
    return [m for m in model.modules() if hasattr(m, "indexer_loss")]


def indexers_to_train(model: torch.nn.Module, weight: float) -> list[torch.nn.Module]:
    """--indexer-kl W's layers (none for W = 0); a model without an indexer refused."""
    indexed = indexed_layers(model) if weight else []
    if weight and not indexed:
        raise ValueError("--indexer-kl: the model has no sparse-attention indexer (DSA, DeepSeek-V4's CSA layers)")
    return indexed


def mean_indexer_kl(indexed: list[torch.nn.Module]) -> torch.Tensor:
    """The mean of the KLs the last forward made in those modules (0 where none)."""
    kls = [m.indexer_loss for m in indexed if m.indexer_loss is not None]
    return sum(kls) / len(kls) if kls else torch.zeros(())


def learn_indexers(model: torch.nn.Module, on: bool):
    """Whether training forwards make the sparse-attention indexers' KL to the main attention (DSA's MLA, V4's CSA
    layers: a product over every visible key, as dense attention's scores): losses() reads it; SFT, distillation
    and GRPO train no indexer unless told to (--indexer-kl), and turn it off rather than make it and drop it
    (GRPO's update turns it on for its training forwards only: update.indexer_kls)."""
    for m in indexed_layers(model):
        m.learn_indexer = on


def set_dsa_warmup(model: Transformer, on: bool):
    """DSA's two stages: warm-up (on) runs dense attention and trains only the indexers; then sparse attention
    and every parameter trains (the indexers still learn only from their KL)."""
    for name, p in model.named_parameters():
        p.requires_grad_(not on or ".indexer." in name)
    for m in model.modules():
        if isinstance(m, MLA) and hasattr(m, "indexer"):
            m.dense_warmup = on


def update_router_bias(loads: dict, gamma: float):
    """Aux-loss-free balancing: raise the bias of under-loaded experts by gamma, lower over-loaded ones."""
    for moe, load in loads.items():
        load, bias = load.float(), moe.gate.bias
        if bias is not None:  # (V4's hash-routed layers have none: their experts are fixed per token)
            bias += gamma * torch.sign(load.mean() - load)


def matmul_peak_flops(device: torch.device, bf16: bool = False) -> float:
    """Measured matmul throughput of one device (fp32, or bf16 when training autocasts to it), the denominator of
    the MFU estimate: 1024^2 matmuls on a CPU, 8192^2 on a GPU. A CPU without bf16 arithmetic of its own emulates
    it ~30x slower: 256^2 there (six 1024^2 products took 14.7 s of a bf16 run's start on a 2-core AVX2 EPYC)."""
    n = 8192 if device.type != "cpu" else 1024 if not bf16 or native_bf16() else 256
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone
    a = a.to(device, torch.bfloat16 if bf16 else torch.float32)
    a @ a
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    t0 = time.perf_counter()
    for _ in range(5):
        a @ a
    sync()
    return 5 * 2 * n**3 / (time.perf_counter() - t0)


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
        build(docs, tok, run / "data", fim_rate=a.fim_rate, seed=a.seed)
    return tok


def checkpoints(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("ckpt-*.pt"))


def save_checkpoint(run: Path, step: int, model, opt, keep: int, rank: int = 0, extra=None):
    """Full (unsharded) state, the same file for any world size; written by rank 0. A LoRA run's holds the
    adapters only (its frozen model comes back from --init). extra() -> a trainer's own state (values and whole
    tensors; every rank calls it)."""
    msd, osd = parallel.full_state(model, opt)
    extra = extra() if extra else {}
    if rank:
        return
    d = run / "checkpoints"
    d.mkdir(exist_ok=True)
    adapter_only = bool(lora.adapters(model))
    state = {"step": step, "optimizer": osd, "rng": torch.get_rng_state(), "adapter_only": adapter_only,
             "extra": extra}
    if adapter_only:
        state["base"] = lora.fingerprint(model, msd)  # (msd: the whole weights, where FSDP shards them)
        msd = {k: v for k, v in msd.items() if ".lora_" in k}
    state["model"] = msd
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    tmp = d / f".ckpt-{step:07d}.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, d / f"ckpt-{step:07d}.pt")  # atomic: a kill leaves the old checkpoint or the new one
    for old in checkpoints(run)[:-keep]:
        old.unlink()


def load_checkpoint(path: Path, model, opt, extra: dict | None = None) -> int:
    """The step a checkpoint was saved at, its state loaded into model and opt (and the trainer's own into extra)."""
    try:
        state = torch.load(path, weights_only=True)
        msd, adapter_only = state["model"], state.get("adapter_only")
        if adapter_only:  # the frozen weights stay as loaded from --init
            if odd := sorted({n for n, _ in model.named_parameters() if ".lora_" in n} ^ msd.keys()):
                raise ValueError(f"its adapters and this run's differ at {odd[0]} (another --lora-targets?)")
            if not torch.equal(state["base"], lora.fingerprint(model)):
                raise ValueError("its adapters were trained on another model than this run's --init")
        parallel.load_full_state(model, opt, msd, state["optimizer"], strict=not adapter_only)
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and len(state["cuda_rng"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if extra is not None:
            extra.update(state.get("extra", {}))
    except Exception as e:
        raise ValueError(f"{path}: corrupted or incompatible checkpoint ({type(e).__name__}: {e}); delete it "
                         "to resume from the one before") from None
    return state["step"]


def open_run(a: RunArgs) -> Path:
    """The run folder a.out of a training verb; refuses to overwrite a run that has checkpoints unless resuming,
    or to start one on a device this machine lacks (a --device value); warns where --bf16 would be emulated."""
    cpu = parallel.pick_device(a.device).type == "cpu"
    if cpu:
        parallel.keep_freed_memory()
    if a.bf16 and cpu and not native_bf16():
        warnings.warn("--bf16 on a CPU without native bf16 (AVX512-BF16, AMX): autocast emulates it, and a training "
                      "step runs far slower than in fp32 (an AVX2 EPYC: 22 s vs 0.69 s a step of the tiny preset)",
                      stacklevel=2)
    run = Path(a.out)
    if a.threads:
        torch.set_num_threads(a.threads)
    if (run / "metrics.jsonl").exists() and checkpoints(run) and not a.resume:
        raise ValueError(f"{run} already holds a run; pass --resume to continue it or choose another --out")
    if a.push_to_hub and parallel.rank_world()[0] == 0:  # (a missing token fails now, not after the training)
        a.push_to_hub = checkpoint.hub_repo(a.push_to_hub, a.hub_private)
    run.mkdir(parents=True, exist_ok=True)
    return run


def end_step(log, rec: dict, run: Path, step: int, a, model, opt, rank: int = 0, extra=None):
    """One metrics line per optimizer step (log is None off rank 0); a checkpoint every a.save_every steps and
    at the end (every rank joins it, rank 0 writes it; with the trainer's own state, extra)."""
    if log:
        log.write(json.dumps(rec) + "\n")
        log.flush()
    if (step + 1) % a.save_every == 0 or step + 1 == a.steps:
        save_checkpoint(run, step + 1, model, opt, a.keep, rank, extra)


def adamw(groups: list[dict], lr: float, betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW (eps 1e-8), fused (one kernel over every parameter: the step 3x faster than foreach's on a 2-core
    CPU, 6 vs 19 ms for the tiny preset) where torch has it: CPU or CUDA, and not FSDP's DTensors mixed with
    expert parallel's plain tensors."""
    params = [p for g in groups for p in g["params"]]
    fused = params[0].device.type in ("cpu", "cuda") and len({type(p.data) for p in params}) == 1
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, fused=fused or None)


def make_optimizer(model, a: TrainArgs):
    """AdamW (betas 0.9 / 0.95), or Muon on the hidden matrices + AdamW on the rest (--optimizer muon)."""
    groups = param_groups(model, a.weight_decay)
    if a.optimizer == "adamw":
        return adamw(groups, a.lr)
    muon, _ = muon_params(model)
    ids = {id(p) for p in muon}
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in ids]} for g in groups]
    return Optimizers(Muon(muon, lr=a.lr, weight_decay=a.weight_decay),
                      adamw([g for g in rest if g["params"]], a.lr))


def export(model: Transformer, run: Path, plot, a: RunArgs, base: str = "") -> Path:
    """The trained model as an HF checkpoint in run/model (with the run's tokenizer and a model card of the run),
    then the run's plots, then (--push-to-hub) the upload. LoRA adapters go to run/adapter in PEFT's format (for
    the model `base`), then merge into run/model (adapters on int8 weights: into `base` loaded afresh in fp32)."""
    if adapters := lora.adapters(model):
        lora.save_adapter(model, run / "adapter", base)
        int8 = any(not m.base.weight.is_floating_point() for m in adapters.values())
        model = checkpoint.load(base, dtype=torch.float32, adapter=run / "adapter") if int8 else lora.merge(model)
    init = getattr(a, "init", "")
    save(model.eval(), run / "model", tokenizer_dir=run / "tokenizer", base_model=init,
         about=training_card(run, a.VERB, init))
    plot(run)
    if a.push_to_hub:
        print(f"pushed {run / 'model'} to the Hub: {checkpoint.push(run, a.push_to_hub)}")
    return run


def training_card(run: Path, verb: str, init: str) -> str:
    """The model card's training section: the verb, the model it started from, the last step's logged numbers."""
    rows = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    last = json.loads(rows[-1]) if rows else {}
    nums = {k: v for k, v in last.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    table = "".join(f"| {k} | {v:.6g} |\n" for k, v in nums.items())
    start = f"`{init}`" if init else "a freshly initialised model"
    return (f"\n## Training\n\nTrained with `sobre {verb}` from {start} (the command line: manifest.json).\n"
            + (f"\nThe last step's metrics (metrics.jsonl):\n\n| metric | value |\n|---|---|\n{table}" if nums else ""))


def pretrain(a: TrainArgs) -> Path:
    """Train; under torchrun each rank takes its slice of every global batch (FSDP2, optionally EP)."""
    a.validate()
    rank, world, device = parallel.init(a.device)
    parallel.split_over(a.batch_size, "--batch-size")
    run = open_run(a)
    tok = parallel.rank_zero_first(lambda: prepare(a, run))  # (the others find rank 0's tokenizer and data)
    torch.manual_seed(a.seed)
    cfg = a.model_config(vocab_size=tok.vocab_size, max_seq_len=max(preset(a.preset).max_seq_len, a.seq_len),
                         bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, seed=a.seed)
    model = init_weights(build_model(cfg)).to(device).train()
    if a.activation_checkpointing:
        _checkpoint_blocks(model)
    if a.compile:
        compile_blocks(model)
    if world > 1:
        if a.expert_parallel:
            parallel.apply_expert_parallel(model)
        parallel.apply_fsdp(model)
    elif a.expert_parallel:
        raise ValueError("--expert-parallel needs several processes: run under torchrun --nproc_per_node N")
    opt = make_optimizer(model, a)
    train = Batches(run / "data", "train", a.seq_len, a.batch_size, a.seed)
    val = Batches(run / "data", "val", a.seq_len, a.batch_size, a.seed)
    start = load_checkpoint(checkpoints(run)[-1], model, opt) if a.resume and checkpoints(run) else 0
    if rank == 0:
        (run / "config.json").write_text(json.dumps({"train": asdict(a), "model": cfg.to_dict(), "world": world},
                                                    indent=2) + "\n")
        truncate_metrics(run / "metrics.jsonl", start)
    moes = moe_layers(model)
    flops_tok = 3 * model_stats(cfg, ctx=a.seq_len)["flops_per_token"]
    peak = matmul_peak_flops(device, a.bf16) * world
    log = open(run / "metrics.jsonl", "a") if rank == 0 else None
    rows = slice(rank * a.batch_size // world, (rank + 1) * a.batch_size // world)
    bar = tqdm(range(start, a.steps), initial=start, total=a.steps, desc="pretrain", unit="step", disable=rank > 0)
    for step in bar:
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = a.lr * lr_at(a, step)
        loads = {m: torch.zeros(m.gate.weight.shape[0], device=m.gate.weight.device) for m in moes}
        parts = torch.zeros(4)
        if a.dsa_warmup:
            set_dsa_warmup(model, step < a.dsa_warmup)
        for micro in range(a.grad_accum):
            x, y = (t[rows].to(device) for t in train.batch(step * a.grad_accum + micro))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.bf16):
                out = losses(model, x, y, a)
            (out["total"] / a.grad_accum).backward()
            parts += torch.stack([out[k].detach().float().cpu() for k in ("ce", "mtp", "balance", "indexer")]
                                 ) / a.grad_accum
            for m in moes:
                loads[m] += m.last_load
        if world > 1:
            dist.all_reduce(parts)
            parts /= world
            for load in loads.values():
                dist.all_reduce(load)
        parallel.scale_expert_grads(model, world)
        gnorm = parallel.clip_grad_norm_(model, a.max_grad_norm, world)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            if step >= a.dsa_warmup:  # the warm-up trains the indexers alone
                update_router_bias(loads, a.bias_update)
        dt = time.perf_counter() - t0
        ntok = a.batch_size * a.seq_len * a.grad_accum
        rec = {"step": step + 1, "loss": parts[0].item(), "mtp_loss": parts[1].item(),
               "balance_loss": parts[2].item(), "lr": opt.param_groups[0]["lr"], "grad_norm": gnorm,
               "tokens_per_s": ntok / dt, "mfu": ntok * flops_tok / dt / peak,
               "expert_load_max_over_mean": [float(v.max() / v.float().mean()) for v in loads.values()],
               "expert_load": [[round(float(x)) for x in v] for v in loads.values()]}  # tokens per expert (EPLB)
        if a.attn == "dsa" or "csa" in cfg.layer_types:
            rec["indexer_kl"] = parts[3].item()
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            rec["val_loss"] = evaluate(model, val, a.eval_batches, rows, device)
            rec["val_bpb"] = rec["val_loss"] / math.log(2) / val.bytes_per_token
        if world == 1 and ((step + 1) % a.sample_every == 0 or step + 1 == a.steps):
            rec["sample"] = sample_text(model, tok)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
        end_step(log, rec, run, step, a, model, opt, rank)
    msd, _ = parallel.full_state(model, opt)
    if rank == 0:
        log.close()
        final = build_model(cfg)
        final.load_state_dict(msd)
        from .report import plot_training
        export(final, run, plot_training, a)
    parallel.finish()
    return run


def blocks(model: Transformer) -> list[torch.nn.Module]:
    """The model's transformer blocks, the MTP modules' included."""
    return list(model.layers) + [m.block for m in model.mtp]


def _checkpoint_blocks(model: Transformer):
    """Activation checkpointing, applied from outside: each block's forward is recomputed in backward."""
    from torch.utils.checkpoint import checkpoint
    for block in blocks(model):
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def compile_blocks(model: Transformer):
    """--compile, applied from outside (after activation checkpointing, before FSDP, as torchtitan does): each
    block's cache-free forwards (training, evaluation; SFT's `stateless` packed-document mask too) run
    torch.compile'd, one graph per block, the routed experts' dispatch eagerly (experts.dispatch). Forwards with a
    cache (sampling, the engine, GRPO's shared-prompt update) stay eager: their per-layer cache lookups would
    recompile each block once per layer."""
    for block in blocks(model):
        block.forward = _compiled_without_cache(block.forward)


def _compiled_without_cache(forward):
    compiled = torch.compile(forward)
    def run(*args, **kw):  # every block call passes its cache last among its positional arguments
        cache = args[-1]
        return (compiled if cache is None or getattr(cache, "stateless", False) else forward)(*args, **kw)
    return run


def truncate_metrics(path: Path, step: int):
    """Drop metric lines past the checkpoint we resume from (a killed run may have logged further)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in lines))


@torch.no_grad()
def evaluate(model: Transformer, val: Batches, n_batches: int, rows=slice(None), device="cpu") -> float:
    """Mean validation cross-entropy over the first n_batches (each rank its rows, then averaged)."""
    was = model.training
    model.eval()
    total = torch.tensor([F.cross_entropy(model(x[rows].to(device)).flatten(0, 1).float(), y[rows].to(device).flatten())
                          .item() for x, y in val.sequential(n_batches)]).mean()
    if dist.is_initialized():
        dist.all_reduce(total)
        total /= dist.get_world_size()
    model.train(was)
    return total.item()


def sample_text(model: Transformer, tok, prompt: str = "Question: What is 12 + 7?\n<think>\n", n: int = 32) -> str:
    was = model.training
    model.eval()
    ids = list(generate(model, tok.encode(prompt), max_new_tokens=n))
    model.train(was)
    return tok.decode(ids)
