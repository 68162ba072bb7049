"""GRPO's optimizer steps on a batch of scored rollouts: the advantages, which path the loss takes (the linear
surrogate, the rollouts' own logits), the update itself (mu epochs, micro-batches, the KL's reference, the entropy
mask and bonus, the rollouts' weights, FSDP's idle passes), mini-batches (--steps-per-generation) and the moving
reference. grpo.py runs the steps; objective.py holds the math and the update's forward.

With beta = 0 a completion whose advantage is 0 (every completion of a group with equal rewards) has no
gradient, so the update leaves it out (the normalisers still count it; `signal` logs the share that trains;
`entropy` is the mean over the completions the update ran). TRL trains on them all.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from . import parallel
from .lora import disabled
from .model import Transformer
from .objective import (
    advantages,
    completion_mask,
    float_rows,
    high_entropy,
    policy_loss,
    rollout_weights,
    token_logprobs,
    token_weights,
)
from .rollout import Rollout
from .train import indexers_to_train, update_router_bias

if TYPE_CHECKING:
    from .grpo import GRPOArgs

LINEAR_SURROGATE = True  # mu = 1, beta = 0: the head's gradients made in its forward (False: the general path)
REUSE_LOGITS = True  # ... on the rollouts' own logits where they are the update's (reuse_logits; False: computed)
REUSE_BYTES = 1 << 30  # at most this much of the rollouts' logits kept for the update (fp32 rows of V)
SKIP_ZERO_ADVANTAGE = True  # beta = 0: completions with advantage 0 leave the update (False: every one trained)
SUMMED = ("loss", "clip_low", "clip_high", "kl", "entropy", "is_weight", "is_masked", "entropy_kept",
          "off_policy_masked", "indexer_kl")  # policy_step's statistics that add up over the ranks (the last five
#   where the rollouts are weighed, the tokens or completions masked, the indexers trained)
PER_SEEN = ("is_weight", "is_masked", "entropy_kept")  # ... those that are means over the tokens trained
PER_SEQ = ("off_policy_masked",)  # ... and over the batch's completions

@torch.no_grad()
def sync_reference(ref: Transformer, model: Transformer, alpha: float):
    """TR-DPO's soft update of the KL's reference (TRL's sync_ref_model): ref := alpha model + (1 - alpha) ref,
    parameter by parameter (under --fsdp shard by shard: both are sharded alike)."""
    theirs = dict(model.named_parameters())
    for name, r in ref.named_parameters():
        parallel.local(r).lerp_(parallel.local(theirs[name]), alpha)


def group_advantages(kept: list[tuple[list[Rollout], torch.Tensor]], a: GRPOArgs) -> torch.Tensor:
    """[G * n] the advantages of the kept groups' completions, in order, under the run's reward scaling (under
    torchrun the batch's std, scale "batch", is every rank's kept rewards': every rank calls this each step)."""
    scale = a.scale_rewards or ("none" if a.loss == "dr_grpo" else "group")
    rewards = torch.stack([r for _, r in kept]) if kept else torch.zeros(0, a.group)
    if scale == "batch" and parallel.rank_world()[1] > 1:
        every = torch.cat(parallel.gather_objects(rewards))
        return (advantages(rewards, "none") / (every.std() + 1e-4)).flatten() if kept else torch.zeros(0)
    return advantages(rewards, scale).flatten() if kept else torch.zeros(0)


def linear_surrogate(a: GRPOArgs) -> bool:
    """One epoch, no KL: every ratio is 1 when the gradient is taken, where the clipped surrogate is linear in the
    log-probs (d loss / d logp = -advantage * token weight), so the head makes its gradients in the forward; not
    where the update reads the rollouts' own log-probs (their weights, or the drift that masks off-policy
    completions, need the log-probs first)."""
    return LINEAR_SURROGATE and a.mu == 1 and a.steps_per_generation == 1 and not a.beta and not sampler_logprobs(a)


def weighed(a: GRPOArgs) -> bool:
    """Whether the update weighs the rollouts toward the trained policy (rollout_weights): sampled on bf16 copies."""
    return a.rollout_bf16 and a.rollout_is != "none"


def sampler_logprobs(a: GRPOArgs) -> bool:
    """Whether the rollouts keep the log-probs they were drawn with (Rollout.sampled): for the update's rollout
    weights or for off-policy masking, where another policy than the one trained drew them (--rollout-bf16)."""
    return weighed(a) or a.rollout_bf16 and a.off_policy_mask > 0


def reuse_logits(model: Transformer, a: GRPOArgs) -> bool:
    """Whether the rollouts keep their logits rows for the update's head to take (loss.head_weighted_logprobs:
    its forward matmul skipped): where they are the update's own logits up to rounding, i.e. the linear surrogate
    (mu = 1, beta = 0: one epoch, on the weights the rollouts sampled from), fp32 weights sampled and trained
    in fp32 (no --rollout-bf16, no --bf16 autocast), no dropout in the update (--lora-dropout), and at most
    REUSE_BYTES of rows (every token that can be drawn a step: a [V] row each). The two forwards round apart by
    ~1e-6, so a near-tie of expert scores (or of DSA / NSA's top-k) may go either way in either, as between any
    two forwards."""
    drawn = a.prompts * (a.max_attempts if a.dynamic else 1) * a.group
    return (REUSE_LOGITS and linear_surrogate(a) and not a.bf16 and not a.rollout_bf16
            and not (a.lora_rank and a.lora_dropout) and all(p.dtype == torch.float32 for p in model.parameters())
            and drawn * a.max_new_tokens * model.config.vocab_size * 4 <= REUSE_BYTES)


def mini_batch_steps(model, ref, opt, moes, kept, a: GRPOArgs, overlong: bool, adv: torch.Tensor, bonus: float) -> dict:
    """--steps-per-generation K: the kept groups in K mini-batches (in order, as even as whole groups split), an
    optimizer step on each (policy_step, one epoch), through --mu epochs; every completion's old log-probs first,
    from the policy that sampled it (each later step is off-policy: its ratios move). Returns the means of the
    statistics of the steps that trained. Under torchrun each rank splits its own groups (every rank runs K x mu
    steps)."""
    olds = old_logprobs(model, [x for g, _ in kept for x in g], a)
    bounds = [round(j * len(kept) / a.steps_per_generation) for j in range(a.steps_per_generation + 1)]
    once, runs = replace(a, mu=1), []
    for _ in range(a.mu):
        for lo, hi in zip(bounds, bounds[1:]):
            runs.append(policy_step(model, ref, opt, moes, kept[lo:hi], once, overlong, False,
                                    adv[lo * a.group:hi * a.group], bonus, olds))
    runs = [r for r in runs if "grad_norm" in r] or runs[:1]  # (a mini-batch of nothing to train: no step)
    return {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}


@torch.no_grad()
def old_logprobs(model, batch: list[Rollout], a: GRPOArgs) -> dict[int, list[float]]:
    """Each completion's log-probs under the model as it is (id(rollout) -> [len(ids)]), in micro-batches as the
    update's forwards (under FSDP every rank as many: idle_passes)."""
    fsdp = parallel.sharded(model)
    chunks = [batch[i:i + a.micro_batch] for i in range(0, len(batch), a.micro_batch)]
    olds = {}
    model.train()  # (as the update's own passes: LoRA dropout on)
    with torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16, enabled=a.bf16):
        for mb in chunks:
            logp, mask, _ = token_logprobs(model, mb, temperature=a.temperature, shared=not fsdp,
                                           replay=a.keep_routing, masked=a.keep_sampling_mask)
            olds |= {id(x): row[m].tolist() for x, row, m in zip(mb, logp.float(), mask)}
        idle_passes(model, max(parallel.gather_objects(len(chunks))) - len(chunks) if fsdp else 0, a.temperature)
    return olds


def policy_step(model, ref, opt, moes, kept, a: GRPOArgs, overlong: bool, reuse: bool = False,
                adv: torch.Tensor | None = None, bonus: float | None = None, olds: dict | None = None) -> dict:
    """mu epochs of one optimizer step each over the kept groups; reuse: the linear surrogate's head takes the
    rollouts' logits (reuse_logits); adv: their completions' advantages (None: group_advantages'); bonus: the
    entropy bonus's coefficient (None: a.entropy_coef; --adaptive-entropy's for the step); olds: each completion's
    old log-probs (old_logprobs, id -> list), taken before an earlier mini-batch moved the policy. Under torchrun
    every rank calls it, on its own groups (maybe none): the normalisers and statistics are every rank's, the
    gradients summed before each step. An FSDP-sharded model (and reference): every rank runs as many forwards as
    the rank of most micro-batches (their blocks' all-gathers and reduce-scatters are collective), one that has
    run out taking a one-token pass that adds nothing (idle_passes), and each pass is one forward of its padded rows
    (token_logprobs' shared=False: a shared prompt's two forwards gather each block twice, a micro-batch of
    one-token completions once); each rank's loss weighs world times, FSDP averaging its blocks' gradients."""
    adv = group_advantages(kept, a) if adv is None else adv
    batch = [x for g, _ in kept for x in g]
    use = [not (overlong and x.truncated) for x in batch]
    batch, adv = [x for x, u in zip(batch, use) if u], adv[torch.tensor(use, dtype=torch.bool)]
    adv = adv.to(next(model.parameters()).device)
    # the normalisers: the whole batch's (every rank's)
    n_seqs, n_tokens, signal = map(int, parallel.all_sum(len(batch), sum(len(x.ids) for x in batch),
                                                         int((adv != 0).sum())))
    if not n_seqs:
        return {"loss": 0.0}
    bonus = a.entropy_coef if bonus is None else bonus
    if SKIP_ZERO_ADVANTAGE and not a.beta and not a.router_bias_update and not a.entropy_bonus:
        # beta = 0: a completion with advantage 0 (a group of equal rewards) has a zero surrogate at every ratio,
        # so no gradient: left out of the forward and backward. With none left (on any rank), the shortest stays
        # in, so the step (zero gradients; AdamW's moments decay) touches the parameters the full step would.
        keep = [i for i, v in enumerate(adv.tolist()) if v]
        if not signal:  # the first shortest of the batch (every rank's, in rank order), kept by its rank
            mine = min(((len(x.ids), i) for i, x in enumerate(batch)), default=(math.inf, -1))
            every = [n for n, _ in parallel.gather_objects(mine)]
            keep = [mine[1]] if every.index(min(every)) == parallel.rank_world()[0] else []
        batch, adv = [batch[i] for i in keep], adv[keep]
    seen_tokens = parallel.all_sum(sum(len(x.ids) for x in batch))[0]  # (in the forward: the entropy's denominator)
    # micro-batches of micro_batch completions, each prompt in one forward (token_logprobs)
    chunks = [list(range(i, min(i + a.micro_batch, len(batch)))) for i in range(0, len(batch), a.micro_batch)]
    fsdp, world = parallel.sharded(model), parallel.rank_world()[1]
    idle = max(parallel.gather_objects(len(chunks))) - len(chunks) if fsdp else 0  # FSDP: the passes others run
    weigh = world if fsdp else 1  # (FSDP averages the blocks' gradients: each rank's loss weighs world times)
    # --indexer-kl: W x the mean over every rank's micro-batches of each one's mean KL (its layers and forwards)
    indexed = indexers_to_train(model, a.indexer_kl)
    n_chunks = parallel.all_sum(len(chunks))[0] if indexed else 1
    model.train()
    old = ref_lp = None

    def amp():  # --bf16: every log-prob of the update under the same autocast (ratios start at 1)
        return torch.autocast(adv.device.type, dtype=torch.bfloat16, enabled=a.bf16)

    masking = a.top_entropy_quantile < 1
    keep = ents = None
    if a.mu > 1 or a.beta or masking:
        with torch.no_grad(), amp():
            if a.mu > 1 or masking:  # (the old log-probs and the entropies in one pass)
                passes = [token_logprobs(model, [batch[i] for i in c], entropy=masking, temperature=a.temperature,
                                         shared=not fsdp, replay=a.keep_routing, masked=a.keep_sampling_mask)
                          for c in chunks]
                old = [p[0] for p in passes] if a.mu > 1 and olds is None else None
                if masking:  # (these entropies are also epoch 0's statistic: its forward leaves them out)
                    ents = [p[2] for p in passes]
                    keep = high_entropy(ents, [p[1] for p in passes], a.top_entropy_quantile)
                idle_passes(model, idle, a.temperature)
            if a.beta:
                with disabled(ref) if ref is model else nullcontext():
                    ref_lp = [token_logprobs(ref, [batch[i] for i in c], temperature=a.temperature,
                                             shared=not fsdp, masked=a.keep_sampling_mask)[0] for c in chunks]
                idle_passes(ref, idle, a.temperature)
    if olds is not None:  # (--steps-per-generation: from the policy that sampled them)
        old = [float_rows([olds[id(batch[i])] for i in c], completion_mask([batch[i] for i in c], adv.device))
               for c in chunks]
    linear, weigh_rollouts, sampler = linear_surrogate(a), weighed(a), sampler_logprobs(a)
    acting = parallel.all_sum(sum(float(k.sum()) for k in keep))[0] if keep else seen_tokens  # (the bonus's)
    objective = a.surrogate()
    sums = {"loss": 0.0, "clip_low": 0.0, "clip_high": 0.0, "kl": 0.0, "entropy": 0.0, "grad_norm": 0.0}
    if weigh_rollouts:
        sums |= {"is_weight": 0.0, "is_masked": 0.0}
    if masking:
        sums["entropy_kept"] = 0.0
    if a.off_policy_mask:
        sums["off_policy_masked"] = 0.0
    if indexed:
        sums["indexer_kl"] = 0.0
    for epoch in range(a.mu):
        loads = {m: torch.zeros(m.n_experts, device=m.gate.weight.device) for m in moes} \
            if a.router_bias_update else {}  # (every token the epoch's forwards route, where balancing reads them)
        for j, c in enumerate(chunks):
            mb = [batch[i] for i in c]
            coef = entropy_bonus = None
            if linear:
                w = token_weights(completion_mask(mb, adv.device), a.loss, n_seqs, n_tokens, a.max_new_tokens)
                coef = -adv[list(c), None] * w * weigh * (keep[j] if keep else 1)
            if bonus:  # - bonus x the mean entropy over the tokens it acts on
                entropy_bonus = completion_mask(mb, adv.device) * (keep[j] if keep else 1) * (-bonus * weigh
                                                                                             / max(acting, 1))
            kls = []  # (one a layer and forward)
            with amp(), counted(loads), indexer_kls(indexed, kls):
                logp, mask, ent, *surrogate = token_logprobs(model, mb, entropy=epoch == 0 and not masking,
                                                             shared=not fsdp,
                                                             temperature=a.temperature, coef=coef,
                                                             reuse=reuse, bonus=entropy_bonus,
                                                             replay=a.keep_routing, masked=a.keep_sampling_mask)
            before = old[j] if old else logp.detach()
            drawn = float_rows([x.sampled for x in mb], mask) if sampler else None  # (the sampler's log-probs)
            weight = rollout_weights(before, drawn, mask, a.rollout_is, a.rollout_is_min,
                                     a.rollout_is_max) if weigh_rollouts else None
            loss, st = policy_loss(logp, before, adv[list(c)], mask, objective, n_seqs, n_tokens, a.max_new_tokens,
                                   ref_lp[j] if ref_lp else None, weight, keep[j] if keep else None, drawn)
            kl = sum(kls) / len(kls) if kls else torch.zeros(())  # the micro-batch's mean indexer KL
            indexer_term = a.indexer_kl * kl * weigh / n_chunks
            if linear:
                (surrogate[0] + indexer_term).backward()
            else:
                (loss * weigh + (0 if entropy_bonus is None else (ent * entropy_bonus).sum()) + indexer_term).backward()
            sums["loss"] += loss.item() / a.mu
            if indexed:
                sums["indexer_kl"] += float(kl.detach()) / n_chunks / a.mu
            for k, v in st.items():  # (the rollouts' weights, the entropy mask: means over the tokens trained)
                sums[k] += v / (seen_tokens if k in PER_SEEN else n_seqs if k in PER_SEQ else n_tokens) / a.mu
            if epoch == 0:
                sums["entropy"] += (ents[j] if ents else ent).sum().item() / seen_tokens
        with amp():
            idle_passes(model, idle, a.temperature, backward=True)
        parallel.sync_grads(model, average=fsdp)
        sums["grad_norm"] += (parallel.clip_grad_norm_(model, a.max_grad_norm, world) if fsdp else
                              float(torch.nn.utils.clip_grad_norm_(model.parameters(), a.max_grad_norm))) / a.mu
        opt.step()
        opt.zero_grad(set_to_none=True)
        if loads:
            parallel.all_reduce_(loads.values())
            with torch.no_grad():
                update_router_bias(loads, a.router_bias_update)
    model.eval()
    summed = [k for k in SUMMED if k in sums]
    for k, v in zip(summed, parallel.all_sum(*(sums[k] for k in summed))):
        sums[k] = v
    sums["clip_fraction"] = sums["clip_low"] + sums["clip_high"]
    sums["signal"] = signal / n_seqs  # the share of completions with a nonzero advantage
    return sums


def idle_passes(model: Transformer, n: int, temperature: float, backward: bool = False):
    """n passes of one token that change nothing (backward: gradients of zero), for a rank of an FSDP-sharded model
    with fewer micro-batches than another: its blocks join every rank's all-gathers (and reduce-scatters)."""
    for _ in range(n):
        logp = token_logprobs(model, [Rollout([0], [0], "", False, 0.0, 0.0, None)], temperature=temperature,
                              shared=False)[0]
        if backward:
            (logp.sum() * 0).backward()


@contextmanager
def indexer_kls(indexed: list, kls: list):
    """The forwards inside make the sparse-attention indexers' KL to the main attention (learn_indexer on there
    only; indexed: train.indexed_layers) and append it to kls, one a layer and forward: a micro-batch's prompts run
    apart from its completions (one of each per prompt length under DSA and V4), each forward's KL its own."""
    def keep(mod, args, out):  # (a forward hook)
        if mod.indexer_loss is not None:
            kls.append(mod.indexer_loss)
            mod.indexer_loss = None

    hooks = [m.register_forward_hook(keep) for m in indexed]
    for m in indexed:
        m.learn_indexer, m.indexer_loss = True, None
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for m in indexed:
            m.learn_indexer = False


@contextmanager
def counted(loads: dict):
    """Every forward of the MoE layers keyed in loads adds its tokens per expert there ([E] each), inside the
    block: the update's forwards of a micro-batch (its prompts' and its completions', one of each per prompt length
    where they take several) count every token routed, each prompt once."""
    def count(mod, args, out):  # (a forward hook: returns None, the output unchanged)
        loads[mod].add_(mod.last_load)

    hooks = [m.register_forward_hook(count) for m in loads]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
