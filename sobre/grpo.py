"""GRPO (DeepSeekMath / R1) with the Dr. GRPO and DAPO variants, rollouts on sobre's batched engine.

Each step: P prompts x G completions sampled by the engine -> verifiable rewards -> group-relative
advantages -> mu epochs of the clipped policy-gradient loss over the completion tokens, optionally with a
k3 KL penalty toward the frozen starting model (beta, default 0 as in DAPO / Dr. GRPO).

The loss variants (grpo, dr_grpo, dapo, luspo: the per-token clipped surrogate normalised four ways; DAPO also
with clip-higher, dynamic sampling and overlong filtering; cispo: MiniMax-M1's clipped importance weights; sapo
and vespo: soft gates in place of the clip), two-sided clipping, GSPO's sequence-level ratios, DeepSeek-V3.2's
unbiased KL and off-policy sequence masking, and the update's forward are in objective.py; the optimizer steps
on a batch of rollouts in update.py.
MoE: routers are frozen by default (router_bias_update 0: expert choice stays the one pretraining balanced);
set router_bias_update > 0 to keep aux-loss-free balancing running on the rollout tokens.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import parallel
from .linear import native_bf16
from .lora import TuneArgs, add_lora
from .moe import moe_layers
from .objective import IMPORTANCE, ROLLOUT_IS, SCALES, VARIANTS, Surrogate, decoupled_advantages
from .report import plot_grpo
from .rewards import overlong_penalty
from .rollout import CastWeights, Rollout, evaluate_task, sample_groups
from .sampling import ParamError, SamplingParams
from .sft import adapter_base, start_model
from .tasks import get_task, load_reward
from .train import (
    RunArgs,
    adamw,
    checkpoints,
    end_step,
    export,
    indexers_to_train,
    learn_indexers,
    load_checkpoint,
    lr_at,
    open_run,
    param_groups,
    require_positive,
    truncate_metrics,
)
from .update import (
    group_advantages,
    mini_batch_steps,
    policy_step,
    reuse_logits,
    sampler_logprobs,
    sync_reference,
    weighed,
)

AGGREGATIONS = ("sum", "normalize_then_sum")  # --reward-aggregation
BUILTIN_TERMS = 3  # a completion's reward terms before the --rewards functions' (_terms)


# ---- the run --------------------------------------------------------------------------------------
@dataclass
class GRPOArgs(TuneArgs, RunArgs):  # --bf16 autocasts the update; the parameters stay fp32
    VERB = "grpo"
    out: str = "runs/grpo"  # the run folder (metrics, eval, completions, plots, checkpoints, model/)
    init: str = ""  # sobre run folder, HF model directory or Hub id; empty = a fresh --preset model
    preset: str = "debug"  # a fresh model's sizes: debug | tiny | small
    task: str = "countdown"  # a built-in task or a .jsonl of {"prompt", "answer"}
    reward: str = ""  # module:function scoring (completion, answer) in place of the task's own check
    steps: int = 50  # optimizer steps (each on its own rollouts)
    prompts: int = 8  # P prompts per step
    group: int = 8  # G completions per prompt
    max_new_tokens: int = 96  # a completion's length at most
    temperature: float = 1.0  # the rollouts' sampling (and the update's log-probs: logits / temperature)
    top_p: float = 1.0  # (as top_k)
    top_k: int = 0  # (as TRL's: the rollouts' sampling; the update's log-probs are the temperature's alone)
    min_p: float = 0.0  # (as top_k)
    # rollouts on bf16 copies of the weights, refreshed each step (as TRL's generation under its --bf16 autocast):
    # the bf16-rounded policy samples; held-out evaluations stay fp32. Measured on a CPU with native bf16: 64 rows
    # 1.24x faster, 8 rows 0.93x, one row 0.53x (README, GRPO)
    rollout_bf16: bool = False
    # --rollout-bf16: each token's loss weighed by pi / pi_bf16 of its rollout (TRL's vLLM importance sampling and
    # its default: the sequence's ratio, the sequence left out where it falls outside [rollout_is_min,
    # rollout_is_max]). Modes:
    rollout_is: str = "sequence_mask"  # none | token_truncate | token_mask | sequence_truncate | sequence_mask
    rollout_is_min: float = 0.0  # the ratios' lower bound (0: none)
    rollout_is_max: float = 3.0  # the ratios' upper bound (*_truncate: clipped to it; *_mask: left out above it)
    loss: str = "grpo"  # grpo | dr_grpo | dapo | cispo | sapo | luspo | vespo (objective.py says what each is)
    importance: str = "token"  # token | sequence (GSPO: one ratio a completion, the mean of its log-ratios)
    scale_rewards: str = ""  # group | batch | none (empty: the loss's own, none for dr_grpo, group for the others)
    epsilon_low: float = 0.2  # the ratio's clip range below 1
    epsilon_high: float = 0.0  # 0: epsilon_low, or 0.28 (clip-higher) with --loss dapo; --loss cispo: the ratio's
    #   own upper bound (0: 5, ScaleRL's and TRL's)
    delta: float = 0.0  # two-sided clipping (INTELLECT-2): the unclipped ratio capped at delta > 1 (0: off)
    beta: float = 0.0  # k3 KL toward the starting model
    # TR-DPO's moving reference (TRL's sync_ref_model): every N steps the KL's reference := ref_mixup x the policy
    # + (1 - ref_mixup) x the reference (0: the starting model throughout; the reference is then checkpointed)
    ref_sync_steps: int = 0
    ref_mixup: float = 0.6  # (as ref_sync_steps; TRL's ref_model_mixup_alpha)
    # --beta's KL term weighed by the ratio pi / pi_old (DeepSeek-V3.2's unbiased KL estimate; TRL's
    # use_bias_correction_kl, on by default as there): its gradient is the reverse KL's, even at ratio 1
    kl_correction: bool = True
    # DeepSeek-V3.2's off-policy sequence masking (TRL's off_policy_mask_threshold; 0: off): a completion of negative
    # advantage whose mean log-ratio log pi_sampler - log pi exceeds this (e.g. 0.5) leaves the policy loss; the
    # sampler is the policy before the update, or --rollout-bf16's copy
    off_policy_mask: float = 0.0
    # an entropy bonus (TRL's entropy_coef): the loss minus this x the mean entropy over the completion tokens
    # trained (those --top-entropy-quantile keeps); completions of advantage 0 then train too
    entropy_coef: float = 0.0
    # Skywork-OR1's adaptive entropy control (TRL's use_adaptive_entropy): the bonus applies only while the last
    # step's mean entropy (`entropy`) is at most --entropy-target, and its coefficient, from --entropy-coef, moves
    # by --entropy-coef-delta a step, up at or below the target and down above it, within --entropy-coef-range
    adaptive_entropy: bool = False
    entropy_target: float = 0.2  # --adaptive-entropy's target mean entropy, nats
    entropy_coef_delta: float = 0.005  # (as entropy_target)
    entropy_coef_range: tuple[float, float] = (0.0, 1.0)  # (as entropy_target)
    sapo_temperatures: tuple[float, float] = (1.0, 1.05)  # --loss sapo: the gate's temperature for tokens of
    #   positive advantage, and of the rest (TRL's defaults)
    vespo_gamma: tuple[float, float, float, float] = (2.0, 3.0, 3.0, 2.0)  # --loss vespo: k and lambda of phi(w) for
    #   advantages >= 0, then for negative ones (TRL's defaults)
    mu: int = 1  # optimisation epochs per batch of rollouts (old log-probs kept from before the first)
    # optimizer steps per batch of rollouts (TRL's steps_per_generation, PPO's mini-batches): the step's groups
    # split into this many mini-batches, one step each (in each of --mu epochs), every loss normalised over its own
    # mini-batch, the ratios against the log-probs of the policy that sampled them
    steps_per_generation: int = 1
    micro_batch: int = 64  # completions per forward/backward (the defaults: a whole step, 8 x 8, in one)
    dynamic_sampling: bool = False  # always on with --loss dapo
    top_entropy_quantile: float = 1.0  # rho < 1: only the batch's top-rho tokens by entropy in the policy loss
    #   ("Beyond the 80/20 rule": 0.2; TRL's), taken from the policy before the update (1: every token)
    max_attempts: int = 3  # dynamic sampling: at most max_attempts x prompts problems drawn a step
    overlong_filter: bool = False  # truncated completions leave the loss (always on with --loss dapo)
    overlong_buffer: int = 0  # soft overlong punishment over the last N tokens (0 = off)
    format_weight: float = 0.1  # reward = correct + format_weight * well-formed + overlong penalty
    rewards: tuple[str, ...] = ()  # more reward terms, module:function (completion, reference answer) -> float each
    reward_weights: tuple[float, ...] = ()  # --rewards' weights in the reward, in order (empty: 1 each)
    # how the terms (correct, format, overlong penalty, --rewards) make the advantages: sum (weighed, then
    # normalised as --scale-rewards says) or normalize_then_sum (GDPO, TRL's multi_objective_aggregation: each term
    # normalised in its group, then weighed and summed, the sum normalised over the batch)
    reward_aggregation: str = "sum"
    router_bias_update: float = 0.0  # MoE: aux-loss-free balancing on the rollout tokens (0: routers frozen)
    # DeepSeek-V3.2's Keep Routing (MoE): the update's forwards route every token to the experts its rollout's
    # sampling routed it to (the engine records them; the gate's weights still train), so that rounding apart
    # between the engine's batched decode and the update's forward cannot move a token to other experts
    keep_routing: bool = False
    # DeepSeek-V3.2's Keep Sampling Mask: with --top-k / --top-p / --min-p, each token's log-probs in the update (the
    # policy's, the reference's) renormalised over the tokens its sampling kept, as they were drawn
    keep_sampling_mask: bool = False
    lr: float = 1e-4  # peak learning rate
    min_lr_ratio: float = 1.0  # the schedule's last learning rate, a share of the peak (1: constant)
    warmup: int = 0  # steps of linear warmup
    weight_decay: float = 0.0  # AdamW's
    eval_every: int = 10  # steps between held-out evaluations (eval.jsonl)
    eval_problems: int = 64  # held-out problems each time
    eval_samples: int = 1  # held-out pass@1 greedy (1), or R1's: the mean over k samples at T 0.6, top-p 0.95
    save_every: int = 25  # steps between checkpoints (and one at the end)
    keep: int = 2  # checkpoints kept
    log_completions: int = 64  # completions a step written to completions.jsonl, in draw order (0: none)

    @property
    def dynamic(self) -> bool:  # dynamic sampling: asked for, or DAPO's
        return self.dynamic_sampling or self.loss == "dapo"

    @property
    def entropy_bonus(self) -> bool:  # an entropy bonus in the loss (maybe 0 some steps, when adaptive)
        return self.entropy_coef > 0 or self.adaptive_entropy

    def surrogate(self) -> Surrogate:
        eps_high = self.epsilon_high or (0.28 if self.loss == "dapo" else 5.0 if self.loss == "cispo"
                                         else self.epsilon_low)
        return Surrogate(self.loss, self.epsilon_low, eps_high, self.importance, self.delta, self.beta,
                         self.kl_correction, self.off_policy_mask, self.sapo_temperatures, self.vespo_gamma)

    def validate(self):
        if self.loss not in VARIANTS:
            raise ValueError(f"--loss must be one of {VARIANTS}, got {self.loss!r}")
        if self.importance not in IMPORTANCE:
            raise ValueError(f"--importance must be one of {IMPORTANCE}, got {self.importance!r}")
        if self.rollout_is not in ROLLOUT_IS:
            raise ValueError(f"--rollout-is must be one of {ROLLOUT_IS}, got {self.rollout_is!r}")
        if not 0 <= self.rollout_is_min < self.rollout_is_max:
            raise ValueError(f"--rollout-is-min / --rollout-is-max must satisfy 0 <= min < max, got "
                             f"{self.rollout_is_min}, {self.rollout_is_max}")
        if self.reward_aggregation not in AGGREGATIONS:
            raise ValueError(f"--reward-aggregation must be one of {AGGREGATIONS}, got {self.reward_aggregation!r}")
        if self.reward_weights and len(self.reward_weights) != len(self.rewards):
            raise ValueError(f"--reward-weights gives {len(self.reward_weights)} weights for {len(self.rewards)} "
                             f"--rewards functions")
        for spec in self.rewards:
            load_reward(spec)  # (a missing module or function: an error before the model loads)
        if self.scale_rewards not in ("",) + SCALES:
            raise ValueError(f"--scale-rewards must be one of {SCALES}, got {self.scale_rewards!r}")
        require_positive(self, "steps", "prompts", "group", "max_new_tokens", "mu", "micro_batch", "max_attempts",
                         "save_every", "eval_every", "eval_samples", "steps_per_generation")
        if self.group < 2:
            raise ValueError("--group must be >= 2: advantages are relative to the group")
        if self.temperature <= 0:
            raise ValueError("--temperature must be > 0: a group of greedy completions has no spread")
        try:  # the rollouts' sampling, checked as the engine checks it, before a model loads
            SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p)
        except ParamError as e:
            raise ValueError(f"--{e.param.replace('_', '-')}: {e}") from None
        self.check_ranges()
        if not 0 < self.top_entropy_quantile <= 1:
            raise ValueError(f"--top-entropy-quantile must be in (0, 1], got {self.top_entropy_quantile}")
        if self.loss == "cispo" and 0 < self.epsilon_high <= 1:
            raise ValueError(f"--epsilon-high with --loss cispo bounds the ratio itself (ScaleRL's 5): give it > 1 "
                             f"(0: 5), not {self.epsilon_high}")
        if self.delta and (self.delta <= 1 or self.loss in ("cispo", "sapo", "vespo")):
            raise ValueError(f"--delta caps the clipped ratio of grpo / dr_grpo / dapo / luspo above 1: give delta > 1 "
                             f"(0: off), not {self.delta} with --loss {self.loss}")
        lo, hi = (self.entropy_coef_range + (0.0, 0.0))[:2]
        if self.entropy_coef < 0 or self.entropy_coef_delta < 0 or self.entropy_target < 0 or not 0 <= lo <= hi:
            raise ValueError(f"--entropy-coef, --entropy-coef-delta and --entropy-target must be >= 0 and "
                             f"--entropy-coef-range MIN MAX within 0 <= MIN <= MAX, got {self.entropy_coef}, "
                             f"{self.entropy_coef_delta}, {self.entropy_target}, {self.entropy_coef_range}")
        if self.ref_sync_steps < 0 or not 0 < self.ref_mixup <= 1:
            raise ValueError(f"--ref-sync-steps must be >= 0 and --ref-mixup in (0, 1], got {self.ref_sync_steps}, "
                             f"{self.ref_mixup}")
        if self.ref_sync_steps and (not self.beta or self.lora_rank):
            raise ValueError("--ref-sync-steps moves the KL's reference: it needs --beta > 0, and a model of its own "
                             "(with --lora-rank the reference is the model with its adapters off)")
        if self.off_policy_mask < 0:
            raise ValueError(f"--off-policy-mask is a threshold on a mean log-ratio: give >= 0 (0: off), not "
                             f"{self.off_policy_mask}")
        if len(self.sapo_temperatures) != 2 or min(self.sapo_temperatures) <= 0:
            raise ValueError(f"--sapo-temperatures takes two temperatures > 0, got {self.sapo_temperatures}")
        k_pos, lam_pos, k_neg, lam_neg = (self.vespo_gamma + (0.0,) * 4)[:4]
        if len(self.vespo_gamma) != 4 or min(k_pos, k_neg) < 0 or min(lam_pos, lam_neg) <= 0:
            raise ValueError(f"--vespo-gamma takes k_pos lambda_pos k_neg lambda_neg, k >= 0 and lambda > 0, got "
                             f"{self.vespo_gamma}")
        if self.loss == "vespo" and weighed(self) and self.rollout_is.startswith("sequence"):
            raise ValueError(f"--loss vespo weighs each sequence itself, from its tokens' importance weights: give "
                             f"--rollout-is token_truncate or token_mask, not {self.rollout_is}")
        self.check_lora(self.init)
        if self.lora_rank and self.router_bias_update:
            raise ValueError("--router-bias-update with --lora-rank: the adapter cannot carry the router biases")


def grpo(a: GRPOArgs) -> Path:
    """The run; under torchrun data parallel: each rank holds the whole model, samples its share of the step's
    prompts (--prompts split over the ranks) on its own engine and updates on its groups, the losses carrying the
    whole step's normalisers and the gradients summed (parallel.sync_grads); each rank evaluates its share of the
    held-out problems; rank 0 logs and saves.
    a.fsdp: the update on blocks sharded over the ranks (FSDP2; the reference model's too), the rollouts and
    evaluations on a whole copy of the weights refreshed after every update (parallel.copy_whole, TRL's vLLM
    weight sync in one process): a replica's weights per rank, not its gradients and AdamW's moments, and those
    freed during the update (parallel.release_whole, TRL's vLLM sleep mode)."""
    a.validate()
    dynamic, overlong = a.dynamic, a.overlong_filter or a.loss == "dapo"
    rank, world, device = parallel.init(a.device)
    a.check_fsdp(world)
    share = parallel.split_over(a.prompts, "--prompts")
    run = open_run(a)
    task = get_task(a.task, a.reward or None)
    model, tok = parallel.rank_zero_first(lambda: start_model(a.init, a.preset, run, a.seed, device=str(device),
                                                              **a.frozen_int8()))
    model.mtp.requires_grad_(False)  # rollouts are plain decoding: the MTP module is carried along unchanged
    learn_indexers(model, False)  # (--indexer-kl: the update's training forwards make it, update.indexer_kls)
    indexers_to_train(model, a.indexer_kl)
    if a.lora_rank:  # the KL's reference is then the model with its adapters off: no copy
        add_lora(model, a.lora_rank, a.lora_alpha, a.lora_dropout, a.lora_targets, a.seed)
    ref = (model if a.lora_rank else copy.deepcopy(model).eval().requires_grad_(False)) if a.beta else None
    policy = model  # the weights the rollouts and held-out evaluations run on
    if a.fsdp:  # (its parameters keep requires_grad: --rollout-bf16's copies follow those that train)
        policy = copy.deepcopy(model).eval()
        parallel.apply_fsdp(model, root=False)
        if ref is not None and ref is not model:  # (LoRA's reference is the model itself)
            parallel.apply_fsdp(ref, root=False)
    opt = adamw(param_groups(model, a.weight_decay), a.lr, betas=(0.9, 0.99))
    control = {"coef": a.entropy_coef, "entropy": math.inf}  # --adaptive-entropy's state (checkpointed)
    start = load_checkpoint(checkpoints(run)[-1], model, opt, control) if a.resume and checkpoints(run) else 0
    if "ref" in control and (moved := control.pop("ref")) and a.ref_sync_steps:  # the reference as it had moved
        parallel.load_whole_state(ref, moved)

    def state() -> dict:  # what a checkpoint keeps beyond the weights and the optimizer's state
        return control | ({"ref": parallel.whole_state(ref)} if a.ref_sync_steps else {})
    if a.fsdp and start:
        parallel.copy_whole(policy, model)
    weights = CastWeights(policy, torch.bfloat16) if a.rollout_bf16 else nullcontext(policy)
    if a.rollout_bf16 and next(model.parameters()).device.type == "cpu" and not native_bf16() and rank == 0:
        warnings.warn("--rollout-bf16 on a CPU without native bf16 (AVX512-BF16, AMX): its bf16 products are "
                      "emulated, and rollouts run far slower than in fp32", stacklevel=2)
    moes = moe_layers(model.layers)  # (V3's and V4's; the MTP module sits out)
    if a.keep_routing and not moes:
        raise ValueError(f"--keep-routing keeps a MoE model's routing: {a.init or a.preset!r} is a dense model")
    reuse = reuse_logits(policy, a)
    log = None
    if rank == 0:
        (run / "config.json").write_text(json.dumps({"grpo": asdict(a), "model": model.config.to_dict(),
                                                     "world": world}, indent=2) + "\n")
        for name in ("metrics.jsonl", "completions.jsonl"):
            truncate_metrics(run / name, start)
        truncate_metrics(run / "eval.jsonl", start if start else -1)
        log = open(run / "metrics.jsonl", "a")

    def held_out(step: int) -> float:  # (every rank samples its share of the problems; rank 0 writes)
        r = evaluate_task(policy, tok, task, a.eval_problems, a.eval_samples, max_new_tokens=a.max_new_tokens,
                          seed=a.seed, ranks=True)["pass@1"]
        if rank == 0:
            _append(run / "eval.jsonl", {"step": step, "pass@1": r})
        return r

    evaluate = bool(task.problems("test", 1, a.seed))  # (a small .jsonl task may hold out none of its rows)
    if rank == 0 and not evaluate:
        tqdm.write(f"task {task.name!r} holds out no problems: no held-out evaluation (eval.jsonl)")
    if start == 0 and evaluate:
        held_out(0)
    scores, terms = {}, {}  # id(group) -> its rewards [G], its reward terms [G, K], this step's
    extra = [load_reward(spec) for spec in a.rewards]
    term_weights = [1.0, a.format_weight, 1.0, *(a.reward_weights or [1.0] * len(extra))]
    decoupled = a.reward_aggregation == "normalize_then_sum"

    def accept(g: list[Rollout]) -> bool:  # a finished group: scored; kept unless dynamic sampling drops it
        t = [_terms(x, a, extra) for x in g]
        terms[id(g)] = torch.tensor(t, dtype=torch.float64)
        scores[id(g)] = r = torch.tensor([sum(w * v for w, v in zip(term_weights, row)) for row in t])
        return not dynamic or bool((terms[id(g)].std(0) > 0).any() if decoupled else r.std() > 0)

    for step in tqdm(range(start, a.steps), initial=start, total=a.steps, desc=f"grpo ({a.loss})", unit="step",
                     disable=rank > 0):
        t0 = time.perf_counter()
        # dynamic sampling: up to max_attempts x prompts problems, a group of equal rewards replaced by the next
        # problem as soon as it is in (rollout.sample_groups); each rank draws from every world-th of them
        problems = [p for k in range(a.max_attempts if dynamic else 1)
                    for p in task.problems("train", a.prompts, f"{a.seed}/{step}/{k}")][rank::world]
        scores.clear()
        terms.clear()
        with weights as m:
            groups, drawn = sample_groups(m, tok, task, problems, a.group, share, accept, a.max_new_tokens,
                                          a.temperature, a.top_p, seed=(a.seed * 1_000_003 + step) * 8 * world + rank,
                                          top_k=a.top_k, min_p=a.min_p, keep_logits=reuse,
                                          keep_logprobs=sampler_logprobs(a), keep_routing=a.keep_routing,
                                          keep_sampling_mask=a.keep_sampling_mask)
        seen = [(g, scores[id(g)]) for _, g in groups]
        kept = [(g, scores[id(g)]) for ok, g in groups if ok]
        t_roll = time.perf_counter() - t0
        flat = [x for g, _ in seen for x in g]
        rewards = torch.cat(parallel.gather_objects(torch.cat([r for _, r in seen])))  # every rank's
        n, correct, form, length, truncated, n_kept, drawn = parallel.all_sum(
            len(flat), sum(x.correct for x in flat), sum(x.format for x in flat), sum(len(x.ids) for x in flat),
            sum(x.truncated for x in flat), len(kept), drawn)
        rec = {"step": step + 1, "reward_mean": rewards.mean().item(), "reward_std": rewards.std().item(),
               "accuracy": correct / n, "format": form / n, "completion_length": length / n,
               "truncated": truncated / n, "groups_kept": int(n_kept), "groups_drawn": int(drawn)}
        if extra:  # each --rewards function's mean over the step's completions (every rank's)
            sums = parallel.all_sum(*(float(sum(terms[id(g)][:, BUILTIN_TERMS + k].sum() for g, _ in seen))
                                      for k in range(len(extra))))
            rec |= {f"reward_{f.__name__}": v / n for f, v in zip(extra, sums)}
        for g in opt.param_groups:
            g["lr"] = a.lr * lr_at(a, step)
        adv = group_advantages(kept, a) if not decoupled else decoupled_advantages(
            torch.stack([terms[id(g)] for g, _ in kept]) if kept else torch.zeros(0, a.group, len(term_weights),
                                                                                  dtype=torch.float64),
            torch.tensor(term_weights, dtype=torch.float64)).flatten().float()
        if a.log_completions:
            rows = sum(parallel.gather_objects(_completion_rows(step + 1, problems, groups, scores, kept, adv, a,
                                                                tuple(f.__name__ for f in extra), terms)), [])
            if rank == 0:
                with open(run / "completions.jsonl", "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in rows[:a.log_completions])
        bonus = control["coef"] if not a.adaptive_entropy or control["entropy"] <= a.entropy_target else 0.0
        if a.entropy_bonus:
            rec["entropy_coef"] = bonus  # (the coefficient this step's loss took)
        if n_kept:
            if a.fsdp:  # (the rollouts' whole weights: not held through the update, gathered again after it)
                parallel.release_whole(policy, model)
            rec.update(policy_step(model, ref, opt, moes, kept, a, overlong, reuse, adv, bonus)
                       if a.steps_per_generation == 1 else mini_batch_steps(model, ref, opt, moes, kept, a, overlong,
                                                                            adv, bonus))
            if a.fsdp:
                parallel.copy_whole(policy, model)
            if a.adaptive_entropy and "entropy" in rec:  # Skywork-OR1: up at or below the target, down above
                control["entropy"] = rec["entropy"]
                lo, hi = a.entropy_coef_range
                step_by = a.entropy_coef_delta if rec["entropy"] <= a.entropy_target else -a.entropy_coef_delta
                control["coef"] = min(max(control["coef"] + step_by, lo), hi)
        if a.ref_sync_steps and (step + 1) % a.ref_sync_steps == 0:
            sync_reference(ref, model, a.ref_mixup)
        for x in flat:  # the kept logits rows go before the next step's rollouts keep theirs
            x.logits = None
        rec.update({"rollout_s": t_roll, "update_s": time.perf_counter() - t0 - t_roll,
                    "samples_per_s": n / (time.perf_counter() - t0)})
        if evaluate and ((step + 1) % a.eval_every == 0 or step + 1 == a.steps):
            rec["heldout_pass@1"] = held_out(step + 1)
        end_step(log, rec, run, step, a, model, opt, rank, state)
    if rank == 0:
        log.close()
        export(policy, run, plot_grpo, a, base=adapter_base(a.init))
    parallel.finish()
    return run


def _terms(x: Rollout, a: GRPOArgs, extra: list) -> list[float]:
    """A completion's reward terms: correctness, format, the overlong penalty, then each --rewards function's."""
    return [x.correct, x.format, overlong_penalty(len(x.ids), a.max_new_tokens, a.overlong_buffer),
            *(float(f(x.text, x.reference)) for f in extra)]


def _completion_rows(step: int, problems, groups, scores: dict, kept, adv: torch.Tensor, a: GRPOArgs,
                     names: tuple[str, ...] = (), terms: dict | None = None) -> list[dict]:
    """The first a.log_completions of this step's completions (in draw order) as JSONL rows, as TRL's
    log_completions table: the problem, its answer, the completion text, reward, correctness, format, length, whether
    it ran to the limit, whether its group was kept and the advantage its group gave it (None: the group dropped; a
    truncated one leaves the loss under overlong filtering, one of advantage 0 carries no gradient). kept: the
    step's kept [(group, rewards)], adv their advantages, as policy_step takes them; names: the --rewards
    functions', whose values (terms: id(group) -> its reward terms [G, K]) are logged too."""
    adv = dict(zip((id(x) for g, _ in kept for x in g), adv.tolist()))
    rows = []
    for problem, (ok, g) in zip(problems, groups):  # (groups come back in draw order: problems[i] is group i's)
        if len(rows) >= a.log_completions:
            break
        rows += [{"step": step, "prompt": problem.prompt, "answer": problem.answer, "completion": x.text,
                  "reward": r, "correct": x.correct, "format": x.format, "length": len(x.ids),
                  "truncated": x.truncated, "kept": ok, "advantage": adv.get(id(x))}
                 | {f"reward_{name}": float(terms[id(g)][i, BUILTIN_TERMS + k]) for k, name in enumerate(names)}
                 for i, (x, r) in enumerate(zip(g, scores[id(g)].tolist()))]
    return rows[:a.log_completions]


def _append(path: Path, row: dict):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
