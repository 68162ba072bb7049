"""GRPO's objective: group-relative advantages, the clipped policy-gradient surrogate and its variants, the k3 KL
penalty, the importance weights of rollouts sampled by other weights, and the update's forward (each completion
token's log-prob, its prompt run once for the group: SharedPrefix). grpo.py runs the steps.

Loss variants (normalisation of the per-token clipped surrogate):
  grpo     mean over each completion's tokens, then over completions; advantages (r - mean) / std
  dr_grpo  sum over all tokens / (completions x max_new_tokens); advantages r - mean (no std scaling)
  dapo     sum over all tokens / number of tokens; std-scaled advantages; clip-higher (epsilon_high 0.28),
           dynamic sampling (drop groups whose rewards are all equal, sample more) and overlong filtering
  cispo    MiniMax-M1's: each token's log-prob times its advantage and its ratio, the ratio clipped at epsilon_high
           (an upper bound on the ratio itself, ScaleRL's 5 by default, as TRL's) and taken as a constant, so every
           token keeps a gradient; normalised as dapo
  sapo     Qwen's Soft Adaptive Policy Optimization: the clip replaced by a smooth gate, -sigmoid(tau (r - 1)) 4 / tau
           A per token (tau: one temperature for positive advantages, another for the rest); normalised as grpo
  luspo    Length-Unbiased Sequence Policy Optimization: grpo's clipped surrogate summed over each completion's
           tokens, then averaged over completions (GSPO's, --importance sequence, scaled by length)
  vespo    Variational Sequence-Level Soft Policy Optimization: -phi(w) A log p per token, phi(w) = e^l w^k e^-lw
           (a Gamma shape, phi(1) = 1, no gradient) of the sequence's ratio w (the product of its tokens', the
           rollouts' importance weights included), k and l by the advantage's sign; normalised as dapo
two-sided clipping (delta, INTELLECT-2's, as TRL's): the unclipped ratio capped at delta, so a token of negative
advantage whose ratio grew far is not pushed without bound.
DeepSeek-V3.2's two stabilisers (as TRL's use_bias_correction_kl and off_policy_mask_threshold): the k3 KL term
weighed by the ratio pi / pi_old (kl_correction: its gradient is then (log pi - log ref) grad log pi, the reverse
KL's own, where plain k3's is biased), and off-policy sequence masking (off_policy > 0: a completion of negative
advantage whose mean log-ratio log pi_sampler - log pi over its tokens exceeds it leaves the policy loss).
importance "sequence" (GSPO, Qwen's, as TRL's importance_sampling_level): every token of a completion takes its
sequence's ratio exp(mean_t(logp - old_logp)), clipped as one (GSPO runs epsilons of ~3e-4 / 4e-4); at mu = 1 its
gradient equals the token-level one (each ratio is 1 where it is taken), so it changes the later epochs only.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from . import parallel
from .attention import causal
from .host import int_rows, ints
from .loss import head_logprobs, head_weighted_logprobs
from .model import Cache, Transformer
from .moe import moe_layers

if TYPE_CHECKING:
    from .rollout import Rollout

VARIANTS = ("grpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
SCALES = ("group", "batch", "none")  # what the advantages are divided by: their group's reward std, the batch's, none
IMPORTANCE = ("token", "sequence")  # the ratio each token's surrogate takes: its own, or its sequence's (GSPO)
# --rollout-bf16: how the rollouts, sampled from the bf16 copy, are weighed toward the policy trained (TRL's vLLM
# importance sampling modes): no weight, or the ratio per token / per sequence clipped to or masked outside a range
ROLLOUT_IS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
LOG_FLOOR = -18.420680743952367  # log(1e-8): VESPO's floor on log-ratios (TRL's, as the paper's code)


@dataclass(frozen=True)
class Surrogate:
    """The policy loss's settings (GRPOArgs.surrogate(): its flags' meaning there)."""
    variant: str = "grpo"  # VARIANTS
    eps_low: float = 0.2
    eps_high: float = 0.2  # cispo: the ratio's own upper bound
    importance: str = "token"  # IMPORTANCE
    delta: float = 0.0  # two-sided clipping (0: off)
    beta: float = 0.0  # the KL term's weight
    kl_correction: bool = False  # the KL term times the ratio (DeepSeek-V3.2's unbiased estimate)
    off_policy: float = 0.0  # off-policy sequence masking's threshold (0: off)
    sapo: tuple[float, float] = (1.0, 1.05)  # sapo's gate temperatures: advantage > 0, <= 0
    vespo: tuple[float, float, float, float] = (2.0, 3.0, 3.0, 2.0)  # vespo's k, l for advantage >= 0, then < 0


# ---- the math (tested against hand-computed values) -----------------------------------------------
def advantages(rewards: torch.Tensor, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """rewards [P, G] -> group-relative advantages [P, G]: r - mean(group), divided by the std (unbiased, as TRL)
    of its group (scale "group"), of the whole batch ("batch": TRL's scale_rewards="batch") or by nothing
    ("none": Dr. GRPO's). A group of equal rewards gets exactly 0 (its mean can round off them)."""
    if scale not in SCALES:
        raise ValueError(f"reward scaling must be one of {SCALES}, got {scale!r}")
    adv = (rewards - rewards.mean(1, keepdim=True)).masked_fill((rewards == rewards[:, :1]).all(1, keepdim=True), 0)
    if scale == "none":
        return adv
    return adv / ((rewards.std(1, keepdim=True) if scale == "group" else rewards.std()) + eps)


def decoupled_advantages(terms: torch.Tensor, weights: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GDPO's (TRL's multi_objective_aggregation="normalize_then_sum"): terms [P, G, K] (each completion's K reward
    terms) -> advantages [P, G]: each term normalised in its group ((r - mean) / (std + eps), unbiased std; a term
    equal across the group gives 0), weighed and summed, then normalised over the batch, every rank's."""
    norm = (terms - terms.mean(1, keepdim=True)) / (terms.std(1, keepdim=True) + eps)
    s = (norm.masked_fill((terms == terms[:, :1]).all(1, keepdim=True), 0) * weights).sum(-1)  # [P, G]
    every = torch.cat(parallel.gather_objects(s.flatten()))
    return (s - every.mean()) / (every.std() + eps)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1 >= 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def policy_loss(logp, old_logp, adv, mask, s: Surrogate, n_seqs: int, n_tokens: int, max_len: int,
                ref_logp=None, weight=None, kept=None, sampled=None) -> tuple[torch.Tensor, dict]:
    """The policy loss over completion tokens. logp/old_logp/ref_logp/mask [N, T], adv [N]. n_seqs, n_tokens are
    the whole batch's (micro-batch losses then add up to the batch loss). s.importance "token": each token's own
    ratio; "sequence" (GSPO): each token its sequence's, exp of the mean log-ratio over its tokens. weight [N, T]
    (rollout_weights): each token's surrogate times it, the KL term not (as TRL; vespo: in its sequence ratio
    instead); kept [N, T] (0 / 1, high_entropy) likewise. sampled [N, T]: the log-probs the rollouts were drawn
    with, for off-policy masking (None: old_logp's policy drew them). Returns (loss, sums of stats)."""
    m = mask.to(logp.dtype)
    log_ratio = logp - old_logp
    if s.importance == "sequence":
        ratio = torch.exp((log_ratio * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1))
        ratio = ratio.expand_as(logp)  # [N, T]: one ratio a sequence
    elif s.importance == "token":
        ratio = torch.exp(log_ratio)
    else:
        raise ValueError(f"importance must be one of {IMPORTANCE}, got {s.importance!r}")
    a = adv[:, None]
    low = high = torch.zeros_like(mask)
    if s.variant == "cispo":  # (the clipped ratio a constant: the gradient is the log-prob's, weighed)
        per_tok = -ratio.clamp(max=s.eps_high).detach() * a * logp
        high = ratio > s.eps_high
    elif s.variant == "sapo":  # (at ratio 1 the gate's slope is 1: the gradient of -A r)
        tau = torch.where(a > 0, s.sapo[0], s.sapo[1])
        per_tok = -torch.sigmoid(tau * (ratio - 1)) * (4 / tau) * a
    elif s.variant == "vespo":
        per_tok = -gamma_weights(log_ratio, mask, adv, weight, s.vespo) * a * logp
        weight = None  # (taken into its sequence ratio)
    else:
        per_tok = -torch.min((ratio.clamp(max=s.delta) if s.delta else ratio) * a,
                             ratio.clamp(1 - s.eps_low, 1 + s.eps_high) * a)
        low, high = ratio < 1 - s.eps_low, ratio > 1 + s.eps_high
    stats = {}
    if s.off_policy:  # keep a completion unless its advantage is negative and its sampler's drifted from pi
        drift = (((old_logp if sampled is None else sampled) - logp.detach()) * m).sum(1) / m.sum(1).clamp(min=1)
        keep = (adv >= 0) | (drift <= s.off_policy)
        per_tok = per_tok * keep[:, None]
        stats["off_policy_masked"] = float((~keep).sum())
    if weight is not None:
        per_tok = per_tok * weight
    if kept is not None:
        per_tok = per_tok * kept
    kl = kl_k3(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    if s.kl_correction and ref_logp is not None:
        kl = kl * ratio
    if s.beta:
        per_tok = per_tok + s.beta * kl
    loss = (per_tok * token_weights(mask, s.variant, n_seqs, n_tokens, max_len)).sum()
    with torch.no_grad():
        stats |= {"clip_low": ((low & (a < 0)) * m).sum().item(), "clip_high": ((high & (a > 0)) * m).sum().item(),
                  "kl": (kl * m).sum().item()}
        if weight is not None:
            stats |= {"is_weight": (weight * m).sum().item(), "is_masked": ((weight == 0) & mask).sum().item()}
        if kept is not None:
            stats["entropy_kept"] = (kept * m).sum().item()
    return loss, stats


@torch.no_grad()
def gamma_weights(log_ratio, mask, adv, weight, shape: tuple[float, float, float, float]) -> torch.Tensor:
    """VESPO's weights [N, 1]: phi(w) = exp(l + k log w - l w) of each sequence's ratio w = exp(sum of its tokens'
    log-ratios, each clamped to +-20, plus the logs of the rollouts' importance weights [N, T] where given,
    floored at log 1e-8), k, l = shape[:2] where the advantage is >= 0, else shape[2:]; 0 where not finite."""
    m = mask.to(log_ratio.dtype)
    log_w = (log_ratio.clamp(-20, 20) * m).sum(1, keepdim=True)
    if weight is not None:
        log_w = log_w + (weight.log().clamp(LOG_FLOOR, 20) * m).sum(1, keepdim=True)
    log_w = log_w.clamp(LOG_FLOOR, 20)
    pos = adv[:, None] >= 0
    k = torch.where(pos, shape[0], shape[2])
    lam = torch.where(pos, shape[1], shape[3]).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * log_w.exp()).nan_to_num(0.0, 0.0, 0.0)


def rollout_weights(old_logp, sampled, mask, mode: str, low: float, high: float) -> torch.Tensor:
    """Importance weights [N, T] of rollouts drawn from another policy than the one trained (--rollout-bf16's bf16
    copy: TRL's correction of vLLM's rollouts). old_logp [N, T]: the trained policy's log-probs of the tokens before
    the update, sampled [N, T]: the sampler's; 0 on padding. The ratio pi_old / pi_sampler per token (token_*) or
    its product over the sequence (sequence_*, each token its sequence's); *_truncate clips it to [low, high],
    *_mask zeroes it outside (low 0: no lower bound)."""
    m = mask.to(old_logp.dtype)
    d = (old_logp - sampled) * m
    if mode.startswith("sequence"):
        d = d.sum(1, keepdim=True)
    r = torch.exp(d)
    if mode.endswith("truncate"):
        r = r.clamp(low, high)
    elif mode.endswith("mask"):
        r = r.masked_fill((r < low) | (r > high), 0.0)
    else:
        raise ValueError(f"rollout importance sampling must be one of {ROLLOUT_IS[1:]}, got {mode!r}")
    return r.expand_as(m) * m


def high_entropy(entropies: list[torch.Tensor], masks: list[torch.Tensor], quantile: float) -> list[torch.Tensor]:
    """The batch's top-`quantile` completion tokens by entropy ("Beyond the 80/20 rule", TRL's
    top_entropy_quantile): each micro-batch's [N, T] 1.0 where a token's entropy is at least the (1 - quantile)
    quantile (linear interpolation, as torch.quantile) of every token of the batch, every rank's (a collective
    under torchrun: every rank calls it), else 0."""
    mine = torch.cat([e[m].float().cpu() for e, m in zip(entropies, masks)]) if entropies else torch.zeros(0)
    every = torch.cat(parallel.gather_objects(mine)).sort().values
    if not len(every):
        return [torch.zeros_like(m, dtype=torch.float32) for m in masks]
    pos = (1 - quantile) * (len(every) - 1)  # (a sort, not torch.quantile: that stops at 2^24 values)
    lo = int(pos)
    threshold = every[lo] + (pos - lo) * (every[min(lo + 1, len(every) - 1)] - every[lo])
    return [((e >= threshold.to(e.device, e.dtype)) & m).float() for e, m in zip(entropies, masks)]


def token_weights(mask, variant: str, n_seqs: int, n_tokens: int, max_len: int) -> torch.Tensor:
    """Each completion token's weight in the loss [N, T] (0 on padding): grpo and sapo 1 / (its sequence's length
    * n_seqs), dapo, cispo and vespo 1 / n_tokens, dr_grpo 1 / (n_seqs * max_len), luspo 1 / n_seqs."""
    m = mask.float()
    if variant in ("grpo", "sapo"):
        return m / m.sum(1, keepdim=True).clamp(min=1) / n_seqs
    if variant in ("dapo", "cispo", "vespo"):
        return m / max(n_tokens, 1)
    if variant == "luspo":
        return m / n_seqs
    if variant == "dr_grpo":
        return m / (n_seqs * max_len)
    raise ValueError(f"loss must be one of {VARIANTS}, got {variant!r}")


def float_rows(rows: list[list[float]], mask: torch.Tensor) -> torch.Tensor:
    """Each completion's per-token values right-padded with 0 like mask [N, T]."""
    T = mask.shape[1]
    return torch.tensor([r + [0.0] * (T - len(r)) for r in rows], dtype=torch.float32, device=mask.device)


def completion_mask(batch: list[Rollout], device) -> torch.Tensor:
    """[N, T]: True at each completion's tokens, right-padded to the longest."""
    T = max(len(r.ids) for r in batch)
    return torch.arange(T, device=device) < ints([len(r.ids) for r in batch], device)[:, None]


class SharedPrefix(Cache):
    """The model's cache protocol for prompts and their completions: the prompts [P, Lp] (right-padded to the
    longest) run once, then the completions [N, T] (row i continuing prompt of[i]) attend to their own prompt's
    K/V (or MLA latents), gathered per row, and to their causal prefix; gradients flow back into the prompts'
    forward. Pad keys are masked; padding after a prompt's last token never reaches its real tokens (causal)."""

    def __init__(self, lengths: list[int], of: list[int], device, max_len: int):
        super().__init__(max_len)  # (NSA allocates its per-layer state for max_len positions)
        self.padded = len(set(lengths)) > 1
        self.lengths = ints(lengths, device)  # [P]
        self.of = ints(of, device)  # [N]
        self.keep = None  # the completions' forward: flat rows whose output is read (Block runs their FFN only)

    def positions(self, tokens):  # prompts: 0..Lp-1; completion token t of row i: len(prompt of[i]) + t
        if not self.length:
            return super().positions(tokens)
        return self.lengths[self.of][:, None] + torch.arange(tokens.shape[1], device=tokens.device)

    def mask(self, tokens):  # prompts: causal; completions: [N, 1, T, Lp + T] (or [T, Lp + T] without padding)
        if not self.length or not self.padded:
            return super().mask(tokens)
        T = tokens.shape[1]
        own = torch.arange(self.length, device=tokens.device) < self.lengths[self.of][:, None]  # [N, Lp]
        return torch.cat([own[:, None].expand(-1, T, -1), causal(T, T, tokens.device).expand(len(own), T, T)],
                         -1)[:, None]

    def update(self, layer_id: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.length:
            self.bufs[layer_id] = new
            return new
        return tuple(torch.cat([p.index_select(0, self.of), n], 1) for p, n in zip(self.bufs[layer_id], new))


def routes_of(spans: list[tuple[Rollout, int, int]], L: int) -> torch.Tensor:
    """Keep Routing: the experts of a forward's rows [MoE layers, len(spans) * L, K], span (rollout, first
    position, count) i in rows i * L .. i * L + count of its rollout's kept routing (Rollout.routes), the rest of
    each span's L rows (padding, read by no token of a completion) routed to experts 0..K-1."""
    rows = []
    for r, lo, n in spans:
        if r.routes is None or r.routes.shape[1] < lo + n:
            raise ValueError(f"a rollout's kept routing covers {0 if r.routes is None else r.routes.shape[1]} "
                             f"positions, its forward {lo + n} (sample it with keep_routing=True)")
        t = r.routes[:, lo:lo + n]
        pad = torch.arange(t.shape[2], dtype=t.dtype, device=t.device).expand(t.shape[0], L - n, -1)
        rows.append(torch.cat([t, pad], 1))
    return torch.stack(rows, 1).flatten(1, 2)


@contextmanager
def replaying(model: Transformer, routes: torch.Tensor | None):
    """The model's MoE layers (model.layers' order, as the engine records them) route the next forward's rows to
    routes [layers, rows, K] (None: their own choice) while in the block."""
    layers = moe_layers(model.layers) if routes is not None else []
    for m, r in zip(layers, routes if routes is not None else ()):
        m.replay = r
    try:
        yield
    finally:
        for m in layers:
            m.replay = None


def token_logprobs(model: Transformer, batch: list[Rollout], entropy: bool = False, temperature: float = 1.0,
                   shared: bool = True, coef: torch.Tensor | None = None, reuse: bool = False,
                   bonus: torch.Tensor | None = None, replay: bool = False, masked: bool = False):
    """Log-probs of each completion's tokens under the model's sampling distribution (logits / temperature, the policy
    the rollouts came from): [N, T] (right-padded), mask [N, T], and the entropy of that distribution at each
    completion position [N, T] (0 on padding and where not asked; a statistic, no gradient). shared=True: each
    distinct prompt runs once and its completions attend to it (SharedPrefix; prompts of different lengths together
    under plain attention, one such forward per prompt length under V4's and DSA's, whose compressed blocks or
    indexer would read the padding; never NSA, whose per-layer state has a row per sequence of the forward);
    shared=False: every row is prompt + completion, padded (the reference the test compares to). coef [N, T] (a loss
    linear in the log-probs, with these coefficients): a fourth value, that loss, whose gradients the head makes in
    its forward (loss.head_weighted_logprobs); the log-probs then carry none. reuse (with coef): the head takes each
    rollout's kept logits rows (Rollout.logits) as its logits instead of computing them (update.reuse_logits says
    when). bonus [N, T] (an entropy bonus, GRPO's --entropy-coef): with coef, that loss adds sum bonus x entropy,
    its gradients made in the head too; without, the entropies returned carry gradients (the caller adds the term).
    replay (DeepSeek-V3.2's Keep Routing): every MoE layer routes each position to the experts its rollout's
    sampling routed it to (Rollout.routes). masked (DeepSeek-V3.2's Keep Sampling Mask): each token's distribution
    over the tokens its sampling's top-k / top-p / min-p kept (Rollout.floors) only."""
    dev = next(model.parameters()).device
    c = model.config
    mask = completion_mask(batch, dev)
    T = mask.shape[1]
    prompts = list(dict.fromkeys(tuple(r.prompt) for r in batch))  # distinct, in order
    lengths = [len(p) for p in prompts]
    if shared and c.attn_type != "nsa" and len(set(lengths)) > 1 and (c.attn_type != "full"
                                                                      or c.arch == "deepseek_v4"):
        return _by_prompt_length(model, batch, mask, coef, bonus, entropy=entropy, temperature=temperature,
                                 reuse=reuse, replay=replay, masked=masked)
    tgt = int_rows([r.ids + [0] * (T - len(r.ids)) for r in batch], dev)  # [N, T]
    if shared and c.attn_type != "nsa":
        row = {p: i for i, p in enumerate(prompts)}
        of = [row[tuple(r.prompt)] for r in batch]
        cache = SharedPrefix(lengths, of, dev, max(lengths) + T)
        L = max(lengths)
        firsts = [batch[of.index(i)] for i in range(len(prompts))]  # (a prompt's routing: its first rollout's)

        def read(used: torch.Tensor, spans: list) -> torch.Tensor | None:  # used [rows, L]: the next forward's
            #   positions read; -> their kept routing, where replayed
            cache.keep = None if bool(used.all()) else used.flatten().nonzero()[:, 0]  # (the others' FFNs left out)
            routes = routes_of(spans, used.shape[1]) if replay else None  # (cut alike: the FFNs route those rows)
            return routes if routes is None or cache.keep is None else routes[:, cache.keep]

        # a prompt's own positions (not the padding after a shorter one, which no completion attends to)
        with replaying(model, read(cache.lengths[:, None] > torch.arange(L, device=dev),
                                   [(r, 0, len(r.prompt)) for r in firsts])):
            h = model.hidden(int_rows([list(p) + [0] * (L - len(p)) for p in prompts], dev), cache)
        last = h[torch.arange(len(prompts), device=dev), cache.lengths - 1]  # [P, D]: predicts token 0
        h = last.index_select(0, cache.of)[:, None]  # [N, 1, D]
        if T > 1:  # token t > 0 is predicted at completion position t - 1
            # positions t whose token t + 1 exists: the rest (each row's last token, the padding after it) is
            # attended by none of these (causal)
            with replaying(model, read(mask[:, 1:], [(r, len(r.prompt), len(r.ids) - 1) for r in batch])):
                h = torch.cat([h, model.hidden(tgt[:, :-1], cache)], 1)  # [N, T, D]
    else:
        seqs = [r.prompt + r.ids for r in batch]
        L = max(len(s) for s in seqs)
        x = int_rows([s + [0] * (L - len(s)) for s in seqs], dev)  # [N, L]
        pos = int_rows([[len(r.prompt) - 1 + t for t in range(T)] for r in batch], dev).clamp(max=L - 1)
        with replaying(model, routes_of([(r, 0, len(s) - 1) for r, s in zip(batch, seqs)], L) if replay else None):
            h = model.hidden(x)  # [N, L, D]
        h = h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1]))  # [N, T, D]
    # the head at the completion tokens only (not the padding), in row chunks: no [N, T, V] logits
    # (loss.head_logprobs); log-probs 0 on the padding
    rows = mask.flatten().nonzero()[:, 0]
    h, t = h.flatten(0, 1).index_select(0, rows), tgt.flatten().index_select(0, rows)
    floors = None
    if masked:
        if any(r.floors is None or len(r.floors) != len(r.ids) for r in batch):
            raise ValueError("a rollout without a sampling floor for each token (sample it with keep_sampling_mask)")
        floors = float_rows([r.floors for r in batch], mask).flatten().index_select(0, rows)
    graded = bonus is not None and coef is None  # (the entropies' gradients through autograd)
    if coef is None:
        lp, ents = head_logprobs(h, model.head.weight, t, temperature, entropy, graded, floors)
    else:
        given = [row for r in batch for row in r.logits] if reuse else None  # (in rows' order: row by row)
        linear, lp, ents = head_weighted_logprobs(h, model.head.weight, t, coef.flatten().index_select(0, rows),
                                                  temperature, entropy, given,
                                                  None if bonus is None else bonus.flatten().index_select(0, rows),
                                                  floors)
    logp = lp.new_zeros(mask.numel()).index_add(0, rows, lp).view(mask.shape)  # [N, T]
    ent = lp.new_zeros(mask.numel()).index_add(0, rows, ents if graded else ents.detach()).view(mask.shape) \
        if entropy or bonus is not None else torch.zeros_like(logp, requires_grad=False)
    return (logp, mask, ent) + ((linear,) if coef is not None else ())


def _by_prompt_length(model: Transformer, batch: list[Rollout], mask: torch.Tensor, coef, bonus, **kw):
    """token_logprobs' shared forward where prompts of different lengths cannot share one: a forward per prompt
    length (each its rows' coef and bonus), the results put back in the batch's row order [N, T]."""
    T = mask.shape[1]
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(batch):
        groups.setdefault(len(r.prompt), []).append(i)
    parts, order = [], []
    for rows in groups.values():
        idx = ints(rows, mask.device)
        t = max(len(batch[i].ids) for i in rows)
        part = token_logprobs(model, [batch[i] for i in rows], coef=None if coef is None else coef[idx, :t],
                              bonus=None if bonus is None else bonus[idx, :t], **kw)
        parts.append(part)
        order += rows
    back = ints(order, mask.device).argsort()  # the batch's row i among the groups' rows, in order
    logp, ent = (torch.cat([F.pad(p[k], (0, T - p[k].shape[1])) for p in parts])[back] for k in (0, 2))
    return (logp, mask, ent) + ((sum(p[3] for p in parts),) if coef is not None else ())
