"""Sampling completions for task prompts on the batched engine, scoring them, and what is built on that:
pass@k / maj@k evaluation (`sobre eval`) and rejection sampling into an SFT set (`sobre rejection-sample`)."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path

import torch

from . import parallel
from .checkpoint import kept_fp32
from .config import at_least_one
from .engine import Engine
from .model import Transformer
from .rewards import extract_answer, format_reward, value
from .sft import encode_turns, pack, val_loss
from .stats import kv_bytes_per_token
from .tasks import Problem, Task
from .tokenizer import Tokenizer

DEFAULT_BATCH = 256  # sequences an engine runs at once for rollouts (more where they are cheap: rollout_batch)
ROLLOUT_BYTES = 1 << 30


@dataclass
class Rollout:
    prompt: list[int]  # prompt token ids
    ids: list[int]  # completion token ids (ending with end-of-sentence unless truncated)
    text: str  # completion text, special tokens kept
    truncated: bool  # stopped by max_new_tokens, not by end-of-sentence
    correct: float
    format: float
    answer: str | None
    logits: list[torch.Tensor] | None = None  # sample_groups(keep_logits=True): the raw logits row [V] of each id
    sampled: list[float] | None = None  # sample_groups(keep_logprobs=True): each id's log-prob where it was drawn
    # sample_groups(keep_routing=True): the experts each MoE layer routed prompt + ids[:-1] to [layers, positions, K]
    routes: torch.Tensor | None = None
    floors: list[float] | None = None  # sample_groups(keep_sampling_mask=True): each id's sampling floor
    reference: str = ""  # the problem's reference answer (what reward functions score the text against)


def prompt_ids(tok: Tokenizer, problem: Problem) -> list[int]:
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": problem.prompt}]))


def rollouts(model: Transformer, tok: Tokenizer, task: Task, problems: list[Problem], n: int,
             max_new_tokens: int = 128, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             max_batch: int | None = None, top_k: int = 0, min_p: float = 0.0) -> list[list[Rollout]]:
    """n completions per problem, all problems batched on one engine (on the model's device). Reproducible for the
    same arguments: the draws come from the global generator (the device's), seeded here, in the engine's fixed
    batch order."""
    return [g for _, g in sample_groups(model, tok, task, problems, n, len(problems), max_new_tokens=max_new_tokens,
                                        temperature=temperature, top_p=top_p, seed=seed, max_batch=max_batch,
                                        top_k=top_k, min_p=min_p)[0]]


def rollouts_over_ranks(model: Transformer, tok: Tokenizer, task: Task, problems: list[Problem], n: int,
                        max_new_tokens: int = 128, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                        ranks: bool = True) -> list[list[Rollout]]:
    """rollouts(); ranks, under torchrun (every rank calls it): each rank samples every world-th problem with its
    own seed (seed * world + rank), and every rank gets every problem's group, in the problems' order."""
    rank, world = parallel.rank_world() if ranks else (0, 1)
    mine = problems[rank::world]
    groups = rollouts(model, tok, task, mine, n, max_new_tokens, temperature, top_p, seed=seed * world + rank) \
        if mine else []
    every = parallel.gather_objects(groups)
    return [every[i % world][i // world] for i in range(len(problems))]  # problem i: rank i % world's


@torch.no_grad()
def sample_groups(model: Transformer, tok: Tokenizer, task: Task, problems: list[Problem], n: int, want: int,
                  accept=None, max_new_tokens: int = 128, temperature: float = 1.0, top_p: float = 1.0,
                  seed: int = 0, max_batch: int | None = None, top_k: int = 0, min_p: float = 0.0,
                  keep_logits: bool = False, keep_logprobs: bool = False, keep_routing: bool = False,
                  keep_sampling_mask: bool = False) -> tuple[list[tuple[bool, list[Rollout]]], int]:
    """Groups of n completions of problems taken in order, `want` groups in play on one engine: the first want
    problems' requests go in at once; each group, once all its completions are in, goes to accept(group) -> bool
    (None: all accepted), and a refused group's place goes at once to the next problem (DAPO's dynamic sampling
    without rounds: the replacement decodes beside the others' longer completions, continuous batching), until
    want groups are accepted or the problems run out. Which problems are drawn depends only on which groups are
    refused, never on which finish first. Returns ([(accepted, group)] in draw order, problems drawn).
    max_batch: the engine's (None: rollout_batch's). Reproducible for the same arguments: the draws come from the
    global generator (the device's), seeded here, in the engine's fixed batch order. keep_logits: each Rollout
    carries the model's raw logits row of each of its tokens (Engine(keep_logits=True)); keep_logprobs: each
    token's log-prob under the distribution it was drawn from (Engine(keep_logprobs=True)); keep_routing: the
    experts every MoE layer routed each of its positions to (Engine(keep_routing=True)); keep_sampling_mask: each
    token's sampling floor (Engine(keep_sampling_mask=True))."""
    if not problems:
        raise ValueError(f"task {task.name!r}: no problems to sample (a .jsonl task holds out ~10% of its rows)")
    prompts = [prompt_ids(tok, p) for p in problems]
    longest = max(len(p) for p in prompts) + max_new_tokens
    if longest > model.config.max_seq_len:
        raise ValueError(f"prompt + max_new_tokens = {longest} tokens exceeds the model's context of "
                         f"{model.config.max_seq_len}")
    was = model.training
    first = min(want, len(prompts))  # groups in play from the start
    in_play = first * n
    if max_batch is None:
        max_batch = rollout_batch(model, in_play, longest + 64)
    eng = Engine(model, tok, max_batch=max_batch, cache_tokens=min(in_play, max_batch) * (longest + 64),
                 keep_logits=keep_logits, keep_logprobs=keep_logprobs, keep_routing=keep_routing,
                 keep_sampling_mask=keep_sampling_mask)
    owner, outs, done = {}, [[] for _ in problems], []  # request -> problem; each problem's finished requests
    drawn = 0

    def draw():
        nonlocal drawn
        for _ in range(n):
            rid = eng.add_request(prompts[drawn], max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_p=top_p, top_k=top_k, min_p=min_p, stop_token_ids=(tok.eos_id,))
            owner[rid] = drawn
        drawn += 1

    cuda = [eng.device] if eng.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # the caller's random stream is left as it was
        torch.manual_seed(seed)
        while drawn < first:
            draw()
        while eng.has_work():
            eng.step()
            for rid, s in sorted(eng.collect().items(), key=itemgetter(0)):
                i = owner[rid]
                outs[i].append((rid, s))
                if len(outs[i]) < n:
                    continue
                group = [_rollout(tok, task, problems[i], prompts[i], q) for _, q in sorted(outs[i], key=itemgetter(0))]
                ok = accept is None or accept(group)
                done.append((i, ok, group))
                if not ok and drawn < len(problems):
                    draw()
    model.train(was)
    return [(ok, group) for _, ok, group in sorted(done, key=itemgetter(0))], drawn


def rollout_batch(model: Transformer, seqs: int, tokens: int) -> int:
    """The engine batch for seqs sequences of up to `tokens` tokens: all of them at once where their caches and a
    step's [B, vocab] logits and sampling temporaries fit ROLLOUT_BYTES, at least DEFAULT_BATCH (DeepSeek-V4: that,
    its rings held per lane). On the CPU one batch runs faster than a queue: the 800 samples of the speedrun's
    evaluation (100 problems x 8, up to 128 tokens, tiny preset) in 6.1-6.8 s at once against 8.7-9.2 s 256 at a
    time (three alternating pairs, a one-off script)."""
    c = model.config
    if c.arch == "deepseek_v4":
        return DEFAULT_BATCH
    size = next(model.parameters()).element_size()
    per_seq = kv_bytes_per_token(c, size)["latent"] * tokens + 16 * c.vocab_size
    return max(DEFAULT_BATCH, min(seqs, int(ROLLOUT_BYTES // per_seq)))


def _rollout(tok: Tokenizer, task: Task, problem: Problem, prompt: list[int], s) -> Rollout:
    text = tok.decode(s.out)
    return Rollout(prompt, s.out, text, s.finish_reason == "length", float(task.correct(text, problem.answer)),
                   format_reward(text), extract_answer(text), s.logits or None, s.sampled or None, s.routes,
                   s.floors or None, problem.answer)


class CastWeights:
    """`with CastWeights(model, torch.bfloat16) as m:` the model's weights as dtype copies inside the block (each
    parameter's data swapped for its copy, then put back), as sobre.load(dtype=...) would give them: what that keeps
    in fp32 (checkpoint.kept_fp32: the routers, DeepSeek-V4's fp32 names) stays as it is, buffers too. The copies
    are made once; those of the parameters that train (requires_grad) are copied again at each entry and freed at
    each exit (not held through GRPO's update). GRPO's --rollout-bf16: rollouts on bf16 weights while the update
    trains the fp32 ones, as TRL's generation under its bf16 autocast."""

    def __init__(self, model: Transformer, dtype: torch.dtype):
        keep = {id(t) for t in kept_fp32(model)}
        self.model, self.params = model, [p for p in model.parameters()
                                          if p.is_floating_point() and p.dtype != dtype and id(p) not in keep]
        self.copies = [p.detach().to(dtype) for p in self.params]
        self.saved = None

    def __enter__(self) -> Transformer:
        if self.saved is not None:
            raise RuntimeError("CastWeights is already entered")
        with torch.no_grad():
            for p, c in zip(self.params, self.copies):
                if p.requires_grad:
                    parallel.reclaim(c).copy_(p)  # (freed at the last exit)
        self.saved = [p.data for p in self.params]
        for p, c in zip(self.params, self.copies):
            p.data = c
        return self.model

    def __exit__(self, *exc):
        for p, d, c in zip(self.params, self.saved, self.copies):
            p.data = d
            if p.requires_grad:
                parallel.release(c)
        self.saved = None


# ---- evaluation ---------------------------------------------------------------------------------
# evaluate_task's defaults with several samples: DeepSeek-R1's pass@1 / pass@k setting (its paper: "a sampling
# temperature of 0.6 and a top-p value of 0.95 to generate k responses", pass@1 the mean correctness over them)
SAMPLED_EVAL_TEMPERATURE, SAMPLED_EVAL_TOP_P = 0.6, 0.95


def eval_temperature(samples: int, temperature: float | None) -> float:
    """The temperature an evaluation of `samples` completions per problem runs at (None: greedy for one sample,
    SAMPLED_EVAL_TEMPERATURE for several); ValueError where several would all be the same greedy completion."""
    if temperature is None:
        return 0.0 if samples == 1 else SAMPLED_EVAL_TEMPERATURE
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if samples > 1 and temperature == 0:
        raise ValueError(f"samples={samples} at temperature 0: greedy completions are all the same, so pass@k and "
                         f"maj@k would equal pass@1; sample at a temperature > 0 (R1 reports pass@k at "
                         f"{SAMPLED_EVAL_TEMPERATURE})")
    return temperature


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def maj_at_k(group: list[Rollout]) -> float:
    """Correctness of the most common final answer (values compared exactly where they parse)."""
    answers = [r for r in group if r.answer is not None]
    if not answers:
        return 0.0
    key = [(str(value(r.answer)) if value(r.answer) is not None else r.answer.strip().lower()) for r in answers]
    top = Counter(key).most_common(1)[0][0]
    return next(r.correct for r, k in zip(answers, key) if k == top)


def sign_test(a: list[float], b: list[float]) -> dict:
    """Two models on the same problems (a[i], b[i]: problem i's correct samples, as many drawn for each): on how
    many a did better ("better"), worse ("worse"), and the exact two-sided sign test's p-value over those problems
    (ties left out; McNemar's exact test for one greedy sample each): how likely a split this uneven is if neither
    model were better."""
    if len(a) != len(b):
        raise ValueError(f"the two evaluations cover different problems: {len(a)} vs {len(b)}")
    better, worse = sum(x > y for x, y in zip(a, b)), sum(x < y for x, y in zip(a, b))
    n = better + worse
    tail = sum(math.comb(n, i) for i in range(min(better, worse) + 1)) / 2**n
    return {"better": better, "worse": worse, "p": min(1.0, 2 * tail)}


def eval_top_p(temperature: float, top_p: float | None) -> float:
    """The nucleus an evaluation samples from (None: SAMPLED_EVAL_TOP_P when sampling, else 1)."""
    if top_p is None:
        return SAMPLED_EVAL_TOP_P if temperature > 0 else 1.0
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    return top_p


def evaluate_task(model: Transformer, tok: Tokenizer, task: Task, n_problems: int = 64, samples: int = 1,
                  temperature: float | None = None, max_new_tokens: int = 128, seed: int = 0, split: str = "test",
                  loss: bool = False, top_p: float | None = None, ranks: bool = False) -> dict:
    """Held-out pass@1 (mean over samples), pass@k for k = 2, 4, ... up to samples, maj@samples, format rate,
    mean completion length and "solved" (each problem's correct samples, for sign_test); loss=True: also
    val_loss / val_bpb of the reference solutions (reference_loss). temperature / top_p None: greedy for one
    sample, R1's SAMPLED_EVAL_TEMPERATURE / SAMPLED_EVAL_TOP_P for several (greedy samples would all be the same
    completion). ranks (every torchrun rank calls it): each rank samples every world-th problem with its own seed
    (seed * world + rank), every rank gets the figures of them all."""
    at_least_one(n_problems=n_problems, samples=samples, max_new_tokens=max_new_tokens)
    temperature = eval_temperature(samples, temperature)
    top_p = eval_top_p(temperature, top_p)
    problems = task.problems(split, n_problems, seed)
    groups = rollouts_over_ranks(model, tok, task, problems, samples, max_new_tokens, temperature, top_p, seed, ranks)
    n = samples
    out = {"task": task.name, "problems": len(problems), "samples": n, "temperature": temperature, "top_p": top_p,
           "pass@1": sum(sum(r.correct for r in g) / n for g in groups) / len(groups)}
    k = 2
    while k <= n:
        out[f"pass@{k}"] = sum(pass_at_k(n, int(sum(r.correct for r in g)), k) for g in groups) / len(groups)
        k *= 2
    if n > 1:
        out[f"maj@{n}"] = sum(maj_at_k(g) for g in groups) / len(groups)
    flat = [r for g in groups for r in g]
    out["format"] = sum(r.format for r in flat) / len(flat)
    out["mean_length"] = sum(len(r.ids) for r in flat) / len(flat)
    out["solved"] = [int(sum(r.correct for r in g)) for g in groups]
    return out | (reference_loss(model, tok, problems, split=ranks) if loss else {})


def reference_loss(model: Transformer, tok: Tokenizer, problems: list[Problem], batch_size: int = 16,
                   split: bool = False) -> dict:
    """Teacher-forced loss of the problems' reference solutions after their prompts (the SFT trace: <think> the
    worked steps </think>, the answer, end-of-sentence): val_loss, nats per target token, and val_bpb, bits per
    byte of the target text (the end-of-sentence token's loss counts, its bytes do not). Solutions longer than
    the model's context are left out. split: every torchrun rank calls it and takes its share (val_loss's)."""
    fits = [(ids, m) for p in problems for ids, m in encode_turns(tok, p.messages())
            if len(ids) <= model.config.max_seq_len]
    if not fits:
        raise ValueError(f"no reference solution fits the model's context of {model.config.max_seq_len} tokens")
    X, Y, D, _ = pack(fits, max(len(ids) for ids, _ in fits) - 1, tok.pad_id)
    dev = next(model.parameters()).device
    nats = val_loss(model, X.to(dev), Y.to(dev), D.to(dev), batch_size, split)  # mean over the target tokens
    targets = [[t for t, keep in zip(ids[1:], m[1:]) if keep] for ids, m in fits]
    n_bytes = sum(len(tok.decode([t for t in ts if t != tok.eos_id]).encode()) for ts in targets)
    return {"val_loss": nats, "val_bpb": nats * sum(map(len, targets)) / math.log(2) / max(n_bytes, 1)}


# ---- rejection sampling (R1 stage 3) ---------------------------------------------------------------
def rejection_sample(model: Transformer, tok: Tokenizer, task: Task, n_problems: int, samples: int,
                     out: Path, temperature: float = 1.0, max_new_tokens: int = 128, seed: int = 0,
                     per_problem: int = 1) -> dict:
    """Sample `samples` completions per train problem, keep up to `per_problem` distinct verified-correct and
    well-formed ones, write them as chat JSONL ({"messages": [...]}) for `sobre sft --data`. Under torchrun (every
    rank calls it): each rank samples every world-th problem with its own seed, rank 0 writes them all in order."""
    at_least_one(n_problems=n_problems, samples=samples, max_new_tokens=max_new_tokens, per_problem=per_problem)
    problems = task.problems("train", n_problems, seed)
    groups = rollouts_over_ranks(model, tok, task, problems, samples, max_new_tokens, temperature, seed=seed)
    rows = []  # each problem's kept completions
    for p, g in zip(problems, groups):
        seen = []
        for r in g:
            body = r.text.split(tok.eos_token)[0] if tok.eos_token else r.text
            if r.correct > 0 and r.format > 0 and not r.truncated and body not in seen and len(seen) < per_problem:
                seen.append(body)
        rows.append([{"messages": [{"role": "user", "content": p.prompt},
                                   {"role": "assistant", "content": "<think>\n" + body}]} for body in seen])
    out = Path(out)
    if parallel.rank_world()[0] == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for kept in rows for row in kept)
    return {"problems": len(problems), "samples": len(problems) * samples, "solved": sum(map(bool, rows)),
            "kept": sum(map(len, rows)), "file": str(out)}
