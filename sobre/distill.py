"""Distillation (DeepSeek-R1 -> R1-Distill-Qwen/Llama): the teacher answers train problems, its verified-correct
reasoning traces become the student's SFT set, and optionally the student also matches the teacher's top-k
next-token distribution on those traces (forward KL, Hinton-style temperature).

    loss = (1 - logit_weight) * CE(student, trace) + logit_weight * tau^2 * KL(teacher_topk / tau || student / tau)

The student is a fresh dense Qwen2/Llama-style model (default) or small MoE built with the teacher's
tokenizer, or an existing checkpoint (`--init`), whose tokenizer must then equal the teacher's.
Run folder: traces-<task>.jsonl (the teacher's kept traces), config.json, metrics.jsonl, loss.png, model/.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import parallel
from .model import Transformer
from .rollout import rejection_sample
from .sft import Packed, SFTArgs, fit, read_examples, split_rows, start_model, target_logits, task_examples
from .tasks import get_task
from .tokenizer import Tokenizer
from .train import open_run, require_positive


@dataclass
class DistillArgs(SFTArgs):
    VERB = "distill"
    out: str = "runs/distill"  # the run folder (the teacher's traces, metrics, checkpoints, model/)
    teacher: str = ""  # sobre run folder, HF directory or Hub id
    arch: str = "qwen2"  # the fresh student's type (qwen2 / llama / qwen3 dense, or deepseek_v3: a small MoE)
    preset: str = "tiny"  # the fresh student's sizes
    task: tuple[str, ...] = ("countdown",)
    examples: int = 512  # train problems per task the teacher answers
    samples: int = 4  # teacher completions per problem (the first verified one is kept)
    temperature: float = 0.6  # the teacher's sampling
    max_new_tokens: int = 128  # a teacher completion's length at most
    with_reference: bool = False  # also train on the tasks' own reference traces (with the teacher's logits)
    logit_weight: float = 0.5  # 0 = SFT on the traces only
    top_k: int = 32  # teacher logits kept per position
    kd_temperature: float = 1.0  # the logit distillation's softmax temperature

    def validate(self):
        super().validate()
        require_positive(self, "samples", "max_new_tokens", "top_k")


def same_vocab(a: Tokenizer, b: Tokenizer) -> bool:
    return a.tok.get_vocab(with_added_tokens=True) == b.tok.get_vocab(with_added_tokens=True)


@torch.no_grad()
def teacher_topk(teacher: Transformer, X, D, k: int, batch: int = 16):
    """Top-k logits and their token ids of the teacher at every position of the packed rows: [N, T, k] each."""
    vals, ids = [], []
    for i in range(0, len(X), batch):
        v, j = teacher(X[i:i + batch], cache=Packed(D[i:i + batch])).float().topk(k, dim=-1)
        vals.append(v)
        ids.append(j)
    return torch.cat(vals), torch.cat(ids)


def kd_loss(student_logprobs, t_vals, t_ids, tau: float = 1.0) -> torch.Tensor:
    """Forward KL(teacher || student) over the teacher's top-k tokens (teacher renormalised over them), mean over
    the positions, scaled by tau^2. student_logprobs [M, V] = log_softmax(student logits / tau) (at tau = 1 the
    cross-entropy's own), t_vals/t_ids [M, k]."""
    p = F.softmax(t_vals / tau, -1)  # [M, k]
    logq = student_logprobs.gather(-1, t_ids)  # [M, k]
    return (p * (p.clamp_min(1e-30).log() - logq)).sum(-1).mean() * tau**2


def distill(a: DistillArgs) -> Path:
    if not a.teacher:
        raise ValueError("--teacher is required (a sobre run folder, an HF model directory or a Hub id)")
    a.validate()
    rank, world, device = parallel.init(a.device)  # under torchrun: data parallel (sft.fit and the traces)
    a.check_world(world)
    run = open_run(a)

    def models():
        teacher, tok = start_model(a.teacher, device=str(device))
        return teacher, tok, *start_model(a.init, a.preset, run, a.seed, a.arch, tok, str(device), **a.frozen_int8())

    teacher, tok, student, s_tok = parallel.rank_zero_first(models)
    teacher.eval()
    if not same_vocab(tok, s_tok):
        raise ValueError(f"tokenizer mismatch: the student ({a.init}) and the teacher ({a.teacher}) have different "
                         "vocabularies; logit distillation compares distributions token by token. Start a fresh "
                         "student (no --init) to use the teacher's tokenizer")
    examples = [ex for f in a.data for ex in read_examples(f, tok)]
    for name in a.task:
        traces = run / f"traces-{name.replace(':', '_')}.jsonl"
        if not traces.exists():  # the teacher's verified answers, made once (kept on resume; under torchrun
            # every rank samples its share of the problems, rank 0 writes them)
            r = rejection_sample(teacher, tok, get_task(name), a.examples, a.samples, traces.with_suffix(".tmp"),
                                 a.temperature, a.max_new_tokens, a.seed)
            if rank == 0:
                traces.with_suffix(".tmp").rename(traces)
                print(f"teacher solved {r['solved']}/{r['problems']} {name} problems; {r['kept']} traces kept")
        parallel.barrier()  # (the others read the traces once rank 0 has them)
        examples += read_examples(traces, tok)
        if a.with_reference:
            examples += task_examples(tok, name, a.examples, a.seed, a.direct)
    if not examples:
        raise ValueError("the teacher solved none of the problems: no traces to distil (try more --samples, or "
                         "--with-reference to distil the teacher's logits on the tasks' own traces)")
    data, val, dropped = split_rows(examples, a, tok)
    X, Y, D = data = tuple(t.to(next(student.parameters()).device) for t in data)
    if not a.logit_weight:
        return fit(student, tok, run, a, data, val, dropped)
    t_vals, t_ids = teacher_topk(teacher, X, D, a.top_k)
    del teacher

    def loss_fn(model, rows):
        logits, keep = target_logits(model, X[rows], Y[rows], D[rows])  # [M, V], [B, T]
        logp = F.log_softmax(logits.float(), -1)  # one log-softmax for both terms at tau = 1 (the default)
        ce = F.nll_loss(logp, Y[rows][keep])
        tau = a.kd_temperature
        logq = logp if tau == 1 else F.log_softmax(logits.float() / tau, -1)
        # the teacher's distribution at the positions whose next token is a target
        kd = kd_loss(logq, t_vals[rows][keep], t_ids[rows][keep], tau)
        return (1 - a.logit_weight) * ce + a.logit_weight * kd

    return fit(student, tok, run, a, data, val, dropped, loss_fn)
