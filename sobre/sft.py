"""Supervised fine-tuning (R1's cold start and stage 3): chat conversations or task-generated reasoning traces,
loss on assistant tokens only, packed rows with per-document positions and attention, the pretraining
machinery for checkpoints, exact resume, metrics and plots.

Run folder: config.json, tokenizer/, metrics.jsonl, checkpoints/, loss.png, model/ (HF export).
The MTP module is carried along unchanged (no MTP loss on packed rows); MoE router biases keep balancing.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import parallel
from .attention import causal
from .checkpoint import load, resolve
from .config import preset
from .data import builtin_docs
from .lora import TuneArgs, add_lora
from .model import Transformer, build_model, head_loss, init_weights
from .moe import moe_layers
from .parallel import pick_device
from .report import plot_training
from .tasks import get_task
from .tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from .train import (
    RunArgs,
    adamw,
    checkpoints,
    compile_blocks,
    end_step,
    export,
    indexers_to_train,
    learn_indexers,
    load_checkpoint,
    lr_at,
    mean_indexer_kl,
    open_run,
    param_groups,
    require_positive,
    truncate_metrics,
    update_router_bias,
)

IGNORE = -100


# ---- the starting model -------------------------------------------------------------------------
def start_model(init: str, preset_name: str = "debug", run: Path | None = None, seed: int = 0,
                arch: str = "deepseek_v3", tokenizer: Tokenizer | None = None, device: str = "cpu",
                int8: bool = False, adapter: str | None = None, int8_skip: tuple[str, ...] = ()) \
        -> tuple[Transformer, Tokenizer]:
    """The model a post-training run starts from, in fp32 on `device` (a --device value): `init` (a sobre run
    folder, an HF directory or a Hub id), else a fresh `preset_name` model of type `arch` with `tokenizer` or one
    trained on the built-in corpus. The tokenizer is kept in run/tokenizer (reused on resume). int8=True (`init`
    only): its weights in int8 (but int8_skip's modules); adapter: a PEFT LoRA adapter merged into them
    (checkpoint.load)."""
    dev = pick_device(device)
    if init:
        path = resolve(init)
        tok = load_tokenizer(path)
        if tok is None:
            raise ValueError(f"{path} has no tokenizer.json; post-training needs the model's tokenizer")
        if run is not None and not (run / "tokenizer").exists():
            tok.save(run / "tokenizer")
        return load(path, dtype=torch.float32, device=dev, int8=int8, adapter=adapter, int8_skip=int8_skip), tok
    if tokenizer is not None and not (run / "tokenizer").exists():
        tokenizer.save(run / "tokenizer")
    tok = load_tokenizer(run / "tokenizer") or train_tokenizer(builtin_docs(1 << 20, seed),
                                                               preset(preset_name).vocab_size, run / "tokenizer")
    torch.manual_seed(seed)
    cfg = preset(preset_name, arch=arch, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                 seed=seed)
    return init_weights(Transformer(cfg)).to(dev), tok


def adapter_base(init: str) -> str:
    """What a LoRA adapter trained from --init names as its base model: the Hub id, or the local HF directory."""
    return str(resolve(init).resolve()) if init and Path(init).exists() else init


# ---- examples: prompt tokens (no loss) + completion tokens (loss) ---------------------------------
def encode_turns(tok: Tokenizer, messages: list[dict]) -> list[tuple[list[int], list[bool]]]:
    """One (ids, loss mask) example per assistant turn, rendered with the tokenizer's chat template: the
    earlier turns are the prompt; the turn itself, up to its end-of-sentence token, is the target. The
    reasoning goes inside <think> (from the content itself or a DeepSeek-API-style `reasoning_content`)."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") != "assistant":
            continue
        prompt = tok.apply_chat_template(messages[:i], add_generation_prompt=True)
        content = m.get("content")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}]: assistant content must be a string")
        if m.get("reasoning_content"):
            content = f"<think>\n{m['reasoning_content']}\n</think>\n\n{content}"
        if prompt.endswith("<think>\n"):  # the template opened the reasoning block already
            content = content.removeprefix("<think>\n") if content.startswith("<think>") else "</think>\n\n" + content
        p, c = tok.encode(prompt), tok.encode(content) + [tok.eos_id]
        out.append((p + c, [False] * len(p) + [True] * len(c)))
    return out


def task_examples(tok: Tokenizer, task: str, n: int, seed: int = 0, direct: float = 0.0) \
        -> list[tuple[list[int], list[bool]]]:
    """The reasoning traces of n train problems of a task, as SFT examples; a seeded `direct` share of them
    answers without the worked steps (an empty <think> block)."""
    rng = random.Random(f"direct/{seed}")
    return [ex for p in get_task(task).problems("train", n, seed)
            for ex in encode_turns(tok, p.messages(think=rng.random() >= direct))]


def read_examples(path: str | Path, tok: Tokenizer) -> list[tuple[list[int], list[bool]]]:
    """JSONL of {"messages": [...]} or {"prompt", "completion"} rows."""
    path, out = Path(path), []
    if not path.exists():
        raise FileNotFoundError(f"SFT data {path} does not exist")
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            if "messages" in d:
                msgs = d["messages"]
            else:
                msgs = [{"role": "user", "content": d["prompt"]}, {"role": "assistant", "content": d["completion"]}]
            turns = encode_turns(tok, msgs)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{n}: expected {{'messages': [...]}} or {{'prompt', 'completion'}} ({e})") \
                from None
        if not turns:
            raise ValueError(f"{path}:{n}: no assistant turn to learn from")
        out += turns
    return out


def pack(examples, seq_len: int, pad_id: int, packing: bool = True):
    """Examples -> rows (inputs [N, T], targets [N, T] with IGNORE off the loss, doc ids [N, T]); examples
    are placed whole, first fit, and never see each other (see Packed). Longer examples are dropped."""
    rows, fill = [], []
    dropped = 0
    for ids, mask in examples:
        if len(ids) > seq_len + 1:
            dropped += 1
            continue
        x, y = ids[:-1], [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
        r = next((r for r, used in enumerate(fill) if packing and used + len(x) <= seq_len), None)
        if r is None:
            rows.append([])
            fill.append(0)
            r = len(rows) - 1
        rows[r].append((x, y))
        fill[r] += len(x)
    if not rows:
        raise ValueError(f"no example fits --seq-len {seq_len} (dropped {dropped})")
    X = torch.full((len(rows), seq_len), pad_id)
    Y = torch.full((len(rows), seq_len), IGNORE)
    D = torch.full((len(rows), seq_len), -1)
    for r, docs in enumerate(rows):
        at = 0
        for d, (x, y) in enumerate(docs):
            X[r, at:at + len(x)], Y[r, at:at + len(y)], D[r, at:at + len(x)] = torch.tensor(x), torch.tensor(y), d
            at += len(x)
    return X, Y, D, dropped


class Packed:
    """The model's cache protocol used for attention structure only: positions restart at each document and
    a token attends to the earlier tokens of its own document (padding, doc -1, only to itself). Attention that
    pools or selects blocks of positions (NSA, DeepSeek-V4's compressed attention) cannot take a mask for that:
    it runs over the documents as rows of their own (split / merge), each attended as if it came alone."""

    stateless = True  # no per-layer state: blocks compiled by train.compile_blocks run compiled with it
    length = 0  # (no cached tokens before these: V4's forward reads it)

    def __init__(self, docs: torch.Tensor):  # docs [B, T]
        self.docs = docs
        B, T = docs.shape
        d = docs.flatten()
        first = torch.ones_like(d, dtype=torch.bool)  # a run of one document (or of padding) starts here
        first[1:] = d[1:] != d[:-1]
        first[::T] = True
        starts = first.nonzero()[:, 0]
        ends = torch.cat([starts[1:], starts.new_tensor([B * T])])
        real = d[starts] >= 0
        if real.any():  # (rows of padding alone: taken as they are)
            starts, ends = starts[real], ends[real]
        n = ends - starts  # [S] each document's length
        j = torch.arange(int(n.max()), device=d.device)
        self.valid = j < n[:, None]  # [S, L]: a document's positions; past them its last token repeats
        self.rows = starts[:, None] + torch.minimum(j, n[:, None] - 1)  # [S, L] their flat positions in [B T]
        self.doc_pos = j.masked_fill(~self.valid, -1)  # [S, L] positions in the document (-1 past its end)
        self.src, self.dst = self.valid.flatten().nonzero()[:, 0], self.rows[self.valid]

    def split(self, x):  # [B, T, ...] -> [S, L, ...]: each document a row of its own
        return x.flatten(0, 1)[self.rows]

    def merge(self, y):  # [S, L, ...] -> [B, T, ...], padding's rows 0
        B, T = self.docs.shape
        return y.new_zeros(B * T, *y.shape[2:]).index_put((self.dst,), y.flatten(0, 1)[self.src]).view(
            B, T, *y.shape[2:])

    def positions(self, tokens):
        T = self.docs.shape[1]
        idx = torch.arange(T, device=self.docs.device).expand_as(self.docs)
        start = torch.where(torch.cat([torch.ones_like(self.docs[:, :1], dtype=torch.bool),
                                       self.docs[:, 1:] != self.docs[:, :-1]], 1), idx, 0).cummax(1).values
        return idx - start

    def mask(self, tokens):  # [B, 1, T, T]
        T = self.docs.shape[1]
        same = self.docs[:, :, None] == self.docs[:, None, :]
        return (same & causal(T, T, self.docs.device))[:, None]

    def update(self, layer_id, *new):
        return new

    def advance(self, T):
        pass


def target_logits(model: Transformer, x, y, docs) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y, docs [B, T] packed rows -> logits [M, V] at the M positions that have a target, and that mask
    keep [B, T]: the head (a small model's largest matmul) skips prompts and padding, a quarter of the positions."""
    keep = y != IGNORE
    return model.head(model.hidden(x, cache=Packed(docs))[keep]), keep


def sft_loss(model: Transformer, x, y, docs) -> torch.Tensor:
    """Mean cross-entropy at the target positions, the head's logits never made whole (loss.head_cross_entropy;
    target_logits is its plain twin, what distillation needs)."""
    keep = y != IGNORE
    h = model.hidden(x, cache=Packed(docs))[keep]  # [M, D]
    return head_loss(model.head, h, y[keep]) if len(h) else h.sum() * 0  # (prompts only: no signal)


# ---- the run --------------------------------------------------------------------------------------
@dataclass
class SFTArgs(TuneArgs, RunArgs):  # --lora-rank: the router biases stay as they are (the adapter cannot carry them)
    VERB = "sft"
    out: str = "runs/sft"  # the run folder (metrics, plots, checkpoints, the model in model/)
    init: str = ""  # sobre run folder, HF model directory or Hub id; empty = a fresh --preset model
    preset: str = "debug"  # a fresh model's sizes: debug | tiny | small
    arch: str = "deepseek_v3"  # a fresh model's type: deepseek_v3 (MLA, MoE, MTP) or dense qwen2 / llama / qwen3
    data: tuple[str, ...] = ()  # chat JSONL files
    task: tuple[str, ...] = ()  # task traces (train split) to add, e.g. countdown arithmetic
    examples: int = 2000  # traces per task
    direct: float = 0.0  # share of the task traces that answer straight away, with an empty <think> block
    steps: int = 200  # optimizer steps
    batch_size: int = 16  # rows a step (split over torchrun's processes)
    seq_len: int = 256  # tokens a row
    packing: bool = True  # several conversations a row, each attending to itself only
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the schedule's last learning rate, a share of the peak
    warmup: int = 10  # steps of linear warmup
    weight_decay: float = 0.0  # AdamW's
    bias_update: float = 1e-3  # aux-loss-free balancing keeps running
    val_share: float = 0.05  # conversations held out for the validation loss
    eval_every: int = 50  # steps between validation losses
    save_every: int = 100  # steps between checkpoints (and one at the end)
    keep: int = 2  # checkpoints kept
    compile: bool = False  # torch.compile each block's training forward (as pretrain --compile)

    def validate(self):
        require_positive(self, "steps", "batch_size", "seq_len", "examples", "eval_every", "save_every", "keep")
        self.check_ranges()
        self.check_lora(self.init)

    def check_world(self, world: int):
        """What the torchrun processes need: a batch they split, and --fsdp only among several of them."""
        parallel.split_over(self.batch_size, "--batch-size")
        self.check_fsdp(world)


def sft(a: SFTArgs, tokenizer: Tokenizer | None = None) -> Path:
    """Fine-tune; a fresh model (no a.init) uses `tokenizer` when given, else trains one."""
    if not a.data and not a.task:
        raise ValueError("nothing to train on: give --data FILE.jsonl and/or --task NAME")
    a.validate()
    _, world, device = parallel.init(a.device)
    a.check_world(world)
    run = open_run(a)
    model, tok = parallel.rank_zero_first(lambda: start_model(a.init, a.preset, run, a.seed, a.arch, tokenizer,
                                                              str(device), **a.frozen_int8()))
    examples = [ex for f in a.data for ex in read_examples(f, tok)]
    for name in a.task:
        examples += task_examples(tok, name, a.examples, a.seed, a.direct)
    return fit(model, tok, run, a, *split_rows(examples, a, tok))


def split_rows(examples, a: SFTArgs, tok: Tokenizer):
    """Shuffle, hold out a.val_share of the examples, pack both parts: (train (X, Y, D), val or None, dropped)."""
    random.Random(a.seed).shuffle(examples)
    n_val = max(1, int(len(examples) * a.val_share)) if len(examples) > 1 else 0
    X, Y, D, dropped = pack(examples[n_val:], a.seq_len, tok.pad_id, a.packing)
    val = pack(examples[:n_val], a.seq_len, tok.pad_id, a.packing)[:3] if n_val else None
    return (X, Y, D), val, dropped


def fit(model: Transformer, tok: Tokenizer, run: Path, a, data, val, dropped: int = 0, loss_fn=None) -> Path:
    """The fine-tuning loop shared by SFT and distillation: batches of packed rows data = (X, Y, D), AdamW with
    the pretraining schedule, checkpoints every a.save_every steps (exact resume), metrics.jsonl, loss.png and
    the HF export in run/model. loss_fn(model, rows) -> loss (default: the SFT loss of those rows): the mean over
    the rows' target positions (Y != IGNORE). The rows move to the model's device once; `rows` index them there.
    Under torchrun each rank takes its slice of every batch, its loss weighed by its share of the batch's target
    positions, and the ranks' gradients summed (parallel.sync_grads): one process's step on the whole batch.
    a.fsdp: the blocks sharded over the ranks (FSDP2, whose reduce-scatter averages their gradients: each rank's
    loss then weighs world times more, the replicated embedding, head and norm's gradients averaged too)."""
    rank, world = parallel.rank_world()
    dev = next(model.parameters()).device
    X, Y, D = (t.to(dev) for t in data)
    val = val and tuple(t.to(dev) for t in val)
    loss_fn = loss_fn or (lambda model, rows: sft_loss(model, X[rows], Y[rows], D[rows]))
    if model.config.max_seq_len < a.seq_len:
        raise ValueError(f"--seq-len {a.seq_len} exceeds the model's context of {model.config.max_seq_len}")
    model.train().mtp.requires_grad_(False)
    indexed = indexers_to_train(model, a.indexer_kl)
    learn_indexers(model, bool(indexed))  # (made only where the loss reads it)
    if a.lora_rank:
        add_lora(model, a.lora_rank, a.lora_alpha, a.lora_dropout, a.lora_targets, a.seed)
    if a.compile:
        compile_blocks(model)
    fsdp = world > 1 and a.fsdp
    if fsdp:
        parallel.apply_fsdp(model, root=False)
    opt = adamw(param_groups(model, a.weight_decay), a.lr)
    start = load_checkpoint(checkpoints(run)[-1], model, opt) if a.resume and checkpoints(run) else 0
    if rank == 0:
        (run / "config.json").write_text(json.dumps({type(a).__name__: asdict(a), "model": model.config.to_dict(),
                                                     "rows": len(X), "dropped_too_long": dropped, "world": world},
                                                    indent=2) + "\n")
        truncate_metrics(run / "metrics.jsonl", start)
    moes = moe_layers(model.layers)  # (V3's and V4's; the MTP module sits out)
    log = open(run / "metrics.jsonl", "a") if rank == 0 else None
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(a.seed))
    share = slice(rank * a.batch_size // world, (rank + 1) * a.batch_size // world)
    for step in tqdm(range(start, a.steps), initial=start, total=a.steps, desc=run.name, unit="step",
                     disable=rank > 0):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = a.lr * lr_at(a, step)
        rows = order[(torch.arange(a.batch_size) + step * a.batch_size) % len(X)][share].to(dev)
        mine = int((Y[rows] != IGNORE).sum())
        ntok = int(parallel.all_sum(mine)[0])
        loss, kl, ran = torch.zeros(()), torch.zeros(()), bool(mine) or world == 1 or fsdp
        if ran:  # (a rank whose rows hold no target joins the gradients' sum with zeros; FSDP's blocks all run)
            for m in indexed:
                m.indexer_loss = None
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.bf16):
                loss = loss_fn(model, rows) * (mine / ntok if world > 1 else 1)
            if indexed:  # the layers' mean KL (over a rank's rows: each rank 1 / world of the batch's)
                kl = mean_indexer_kl(indexed) / world
            ((loss + a.indexer_kl * kl) * (world if fsdp else 1)).backward()
        parallel.sync_grads(model, average=fsdp)
        gnorm = parallel.clip_grad_norm_(model, a.max_grad_norm, world) if fsdp else \
            float(torch.nn.utils.clip_grad_norm_(model.parameters(), a.max_grad_norm))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if a.bias_update and moes and not a.lora_rank:
            loads = {m: m.last_load if ran else torch.zeros(m.n_experts, dtype=torch.long, device=dev)
                     for m in moes}
            parallel.all_reduce_(loads.values())
            with torch.no_grad():
                update_router_bias(loads, a.bias_update)
        rec = {"step": step + 1, "loss": parallel.all_sum(loss.item())[0], "lr": opt.param_groups[0]["lr"],
               "grad_norm": gnorm, "target_tokens": ntok,
               "tokens_per_s": a.batch_size * a.seq_len / (time.perf_counter() - t0)}
        if indexed:
            rec["indexer_kl"] = parallel.all_sum(float(kl.detach()))[0]
        if val is not None and ((step + 1) % a.eval_every == 0 or step + 1 == a.steps):
            rec["val_loss"] = val_loss(model, *val, a.batch_size, split=not fsdp)  # (FSDP: every rank all of it)
        end_step(log, rec, run, step, a, model, opt, rank)
    if fsdp:  # the whole model, gathered from the shards (every rank joins)
        msd, _ = parallel.full_state(model, opt)
        if rank == 0:
            model = build_model(model.config)
            if a.lora_rank:
                add_lora(model, a.lora_rank, a.lora_alpha, a.lora_dropout, a.lora_targets, a.seed)
            model.load_state_dict(msd)
    if rank == 0:
        log.close()
        export(model, run, plot_training, a, base=adapter_base(a.init))
    parallel.finish()
    return run


@torch.no_grad()
def val_loss(model: Transformer, X, Y, D, batch_size: int, split: bool = False) -> float:
    """Mean cross-entropy over the target positions of the rows; split (every rank calls it, under torchrun):
    each rank takes every world-th batch of them, the sums then added up."""
    rank, world = parallel.rank_world() if split else (0, 1)
    was = model.training
    model.eval()
    total = n = 0
    for i in range(rank * batch_size, len(X), world * batch_size):
        y = Y[i:i + batch_size]
        k = int((y != IGNORE).sum())
        total += sft_loss(model, X[i:i + batch_size], y, D[i:i + batch_size]).item() * k
        n += k
    model.train(was)
    total, n = parallel.all_sum(total, n) if split else (total, n)
    return total / n if n else math.nan

