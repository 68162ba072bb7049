"""Post-training costs: each of sobre's cheaper paths beside its reference twin, timed in the same run on a fresh
tiny model (medians of --reps, the two interleaved so that a machine's drift hits both alike):
  SFT step            sft.sft_loss (the LM head at target positions only, through loss.head_cross_entropy)
                      vs logits and cross-entropy over every position
  distillation loss   one log-softmax for the cross-entropy and the KL term (tau = 1) vs one each
  sampled rollout     inverse-CDF draws (sampling.draw) vs a torch.multinomial per row, G x 128 new tokens
  GRPO update         objective.token_logprobs + backward over 8 prompts x 8 completions of 8-128 tokens: each prompt
                      once, its completions attending to it, FFNs and head on the positions whose output is read
                      (no padding) vs every row prompt + completion, right-padded (shared=False, its twin)
  GRPO update's head  the same batch under the linear surrogate (mu = 1, beta = 0: loss.head_weighted_logprobs),
                      the head on the rollouts' own logits (update.reuse_logits) vs computing them again
    python bench/posttrain.py [--reps 5] [--group 64]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sobre.engine
from sobre.distill import kd_loss
from sobre.engine import Engine
from sobre.objective import completion_mask, token_logprobs
from sobre.parallel import keep_freed_memory
from sobre.rollout import Rollout, prompt_ids
from sobre.sampling import SamplingParams, filter_logits
from sobre.sft import IGNORE, Packed, SFTArgs, sft_loss, split_rows, start_model, task_examples
from sobre.tasks import get_task
from sobre.train import param_groups


def compare(ref, ours, reps: int) -> tuple[float, float]:
    """Median seconds of ref(i) and ours(i) over i = 1..reps, run alternately (i = 0 warms both up)."""
    times = ([], [])
    for i in range(reps + 1):
        for fn, t in zip((ref, ours), times):
            t0 = time.perf_counter()
            fn(i)
            if i:
                t.append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def sft_steps(model, X, Y, D, reps: int) -> dict:
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-4)

    def full_loss(x, y, d):  # the reference: logits at every position, padding and prompts ignored
        return F.cross_entropy(model(x, cache=Packed(d)).flatten(0, 1), y.flatten(), ignore_index=IGNORE)

    def step(loss_fn, i):  # both variants see the same batches
        rows = torch.arange(16) + 16 * i % (len(X) - 16)
        loss_fn(X[rows], Y[rows], D[rows]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.train()
    return {"SFT step, 16 x 256 packed rows": compare(lambda i: step(full_loss, i),
                                                      lambda i: step(lambda *r: sft_loss(model, *r), i), reps)}


def distill_losses(V: int, reps: int) -> dict:
    g = torch.Generator().manual_seed(0)
    M, k = 2970, 32  # target positions of a 16 x 256 batch of arithmetic traces, the teacher's top-k
    logits = torch.randn(M, V, generator=g, requires_grad=True)
    y, t_ids = torch.randint(0, V, (M,), generator=g), torch.randint(0, V, (M, k), generator=g)
    t_vals = torch.randn(M, k, generator=g)

    def separate():  # the reference: the cross-entropy and the KL term each take their own log-softmax
        logq = F.log_softmax(logits / 1.0, -1)
        (F.cross_entropy(logits, y) + kd_loss(logq, t_vals, t_ids)).backward()

    def shared():
        logp = F.log_softmax(logits, -1)
        (F.nll_loss(logp, y) + kd_loss(logp, t_vals, t_ids)).backward()

    return {f"distillation loss fwd+bwd, {M} positions x {V}": compare(lambda i: separate(), lambda i: shared(),
                                                                          reps)}


def multinomial_sample(logits, params, generators=None):
    """The reference sampler: one torch.multinomial per sampled row, with the row's own generator."""
    logits = logits.float()
    out = logits.argmax(dim=-1)
    for i, p in enumerate(params):
        if p.temperature > 0:
            probs = filter_logits(logits[i:i + 1], [p]).softmax(dim=-1)[0]
            out[i] = torch.multinomial(probs, 1, generator=generators[i] if generators else None)[0]
    return out


def rollouts(model, tok, group: int, reps: int) -> dict:
    prompt = tok.encode("Question: What is 12 + 7?\n<think>\n")
    model.eval()

    def roll(sampler):
        sobre.engine.sample = sampler
        eng = Engine(model, tok, max_batch=group)
        for g in range(group):
            eng.add_request(prompt, SamplingParams(temperature=1.0, max_new_tokens=128, seed=g, stop_token_ids=()))
        with torch.no_grad():
            while eng.has_work():
                eng.step()

    ours = sobre.engine.sample
    try:
        return {f"sampled rollout, {group} x 128 tokens": compare(lambda i: roll(multinomial_sample),
                                                                  lambda i: roll(ours), reps)}
    finally:
        sobre.engine.sample = ours


def grpo_update(model, tok, reps: int) -> dict:
    """token_logprobs' forward and backward over a GRPO batch whose completions end at different lengths."""
    g = torch.Generator().manual_seed(0)
    prompts = [prompt_ids(tok, p) for p in get_task("countdown").problems("train", 8)]
    V = model.config.vocab_size
    batch = [Rollout(p, torch.randint(3, V, (int(torch.randint(8, 129, (), generator=g)),), generator=g).tolist(),
                     "", False, 0.0, 0.0, None) for p in prompts for _ in range(8)]
    model.train()

    def update(shared):
        logp, mask, _ = token_logprobs(model, batch, shared=shared)
        logp[mask].sum().backward()
        model.zero_grad(set_to_none=True)

    with torch.no_grad():  # the rollouts' logits rows: a full forward's at each completion position
        for x in batch:
            x.logits = list(model(torch.tensor([x.prompt + x.ids[:-1]]))[0, len(x.prompt) - 1:].unbind(0))
    coef = torch.randn(len(batch), generator=g)[:, None] * completion_mask(batch, "cpu") * 1e-3  # [N, T]

    def linear_update(reuse):
        *_, surrogate = token_logprobs(model, batch, entropy=True, coef=coef, reuse=reuse)
        surrogate.backward()
        model.zero_grad(set_to_none=True)

    lengths = [len(x.ids) for x in batch]
    name = f"64 completions of {min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / len(lengths):.0f})"
    return {f"GRPO update fwd+bwd, {name}": compare(lambda i: update(False), lambda i: update(True), reps),
            "GRPO update fwd+bwd, linear surrogate, head on the rollouts' logits":
                compare(lambda i: linear_update(False), lambda i: linear_update(True), reps)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--group", type=int, default=64)
    a = ap.parse_args()
    keep_freed_memory()  # as sobre's engines and runs do; the baseline shares it (bench/README.md)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model, tok = start_model("", "tiny", Path(tmp), arch="deepseek_v3")
    (X, Y, D), _, _ = split_rows(task_examples(tok, "arithmetic:1", 3000, 0, 0.5), SFTArgs(), tok)
    rows = {**sft_steps(model, X, Y, D, a.reps), **distill_losses(model.config.vocab_size, a.reps),
            **rollouts(model, tok, a.group, max(a.reps // 2, 2)), **grpo_update(model, tok, a.reps)}
    print(f"post-training costs, fresh tiny model (vocab {model.config.vocab_size}), fp32, "
          f"{torch.get_num_threads()} threads, median of {a.reps}")
    print("| | reference | sobre | speed-up |\n|---|---|---|---|")
    for name, (ref, ours) in rows.items():
        print(f"| {name} | {ref * 1e3:.0f} ms | {ours * 1e3:.0f} ms | {ref / ours:.2f}x |")


if __name__ == "__main__":
    main()
