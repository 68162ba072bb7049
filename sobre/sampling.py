"""Sampling: per-request parameters, penalties, temperature / top-k / top-p / min-p, seeds and logprobs.

Order, for each row: logit bias and penalties on the raw logits -> temperature -> top-k -> top-p -> min-p ->
draw.
top-p and min-p both look at the distribution left after top-k (as in transformers).
Reported logprobs are those of the model's own distribution (raw logits, before any of the above).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .host import ints
from .schema import check_schema


class ParamError(ValueError):
    """A ValueError that names the request field at fault (param: SamplingParams' name for it), which a server
    reports as the error's `param`."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message, param)  # (both in args: it pickles across the engine's process)
        self.param = param

    def __str__(self):
        return self.args[0]


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    min_tokens: int = 0  # tokens before a stop (stop token or string) may end the completion (vLLM's)
    temperature: float = 0.0  # 0 = greedy (below 1e-5 too, as in vLLM: dividing by it would overflow)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # divides positive / multiplies negative logits of prompt+generated tokens
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings (matched on detokenized text by the engine)
    include_stop_str_in_output: bool = False  # the text a stop string ends keeps it (vLLM's)
    seed: int | None = None
    logprobs: int | None = None  # also return the top-n alternatives' logprobs per step
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before everything else (OpenAI's)
    json: bool = False  # JSON mode: the completion is one JSON object and ends with it (sobre.constrain)
    json_schema: dict | None = None  # ... that satisfies this schema (sobre.schema; implies json)
    tool_calls: dict[str, dict | None] | None = None  # the completion is one call: a name among these functions',
    #   <｜tool▁sep｜>, its arguments under its parameters' schema (None: any JSON object) (tools.CallPrefix; implies
    #   json)
    lora: str | None = None  # the LoRA adapter the request runs with, by name (Engine(loras=...)); None: the base

    def __post_init__(self):
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
            ("min_tokens", 0 <= self.min_tokens <= self.max_new_tokens, "must be in [0, max_new_tokens]"),
            ("temperature", self.temperature >= 0, "must be >= 0 (0 is greedy)"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 disables it)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0 (1 disables it)"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be in [0, 20]"),
        ]
        for name, ok, msg in checks:
            if not ok:
                raise ParamError(f"sampling parameter {name}={getattr(self, name)!r}: {msg}", name)
        if self.temperature < 1e-5:
            self.temperature = 0.0
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if any(not s for s in self.stop):
            raise ParamError("sampling parameter stop: stop strings must be non-empty", "stop")
        for name, schema in [("json_schema", self.json_schema)] + [("tool_calls", s) for s in
                                                                   (self.tool_calls or {}).values()]:
            try:
                if schema is not None:
                    check_schema(schema)
            except ValueError as e:
                raise ParamError(f"sampling parameter {name}: {e}", name) from None
        if self.json_schema is not None or self.tool_calls:
            self.json = True
        if self.min_tokens and self.json:
            raise ParamError("sampling parameter min_tokens: JSON mode ends the completion when its object "
                             "closes", "min_tokens")
        if self.logit_bias:
            self.logit_bias = {int(t): float(b) for t, b in self.logit_bias.items()}
            if any(t < 0 for t in self.logit_bias) or any(not -100 <= b <= 100 for b in self.logit_bias.values()):
                raise ParamError("sampling parameter logit_bias: token ids must be >= 0 and biases in [-100, 100]",
                                 "logit_bias")


GENERATION_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def generation_defaults(path) -> dict:
    """The sampling values a checkpoint's generation_config.json sets (DeepSeek-R1's: temperature 0.6, top_p
    0.95), for requests and flags that leave them unset, as vLLM and transformers take them ({}: none set)."""
    f = Path(path) / "generation_config.json"
    if not f.is_file():
        return {}
    try:
        cfg = json.loads(f.read_text())
    except ValueError as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None
    out = {k: cfg[k] for k in GENERATION_KEYS
           if isinstance(cfg.get(k), int | float) and not isinstance(cfg.get(k), bool)}
    try:
        SamplingParams(**out)
    except ValueError as e:
        raise ValueError(f"{f}: {e}") from None
    return out


def apply_penalties(logits: torch.Tensor, seen: torch.Tensor, generated: torch.Tensor,
                    params: list[SamplingParams]) -> torch.Tensor:
    """logits [B, V] fp32; seen [B, V] bool (prompt + generated); generated [B, V] counts of generated tokens."""
    rep = logits.new_tensor([p.repetition_penalty for p in params])[:, None]
    pres = logits.new_tensor([p.presence_penalty for p in params])[:, None]
    freq = logits.new_tensor([p.frequency_penalty for p in params])[:, None]
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    return (logits - pres * (generated > 0) - freq * generated).clamp(-1e30, 1e30)  # tiny penalties: no inf


def biased(seqs: list, logits: torch.Tensor) -> torch.Tensor:
    """The engine's sequences' (engine.Sequence: params, out, bias, seen, counts) logits [B, V] or, a verify's,
    [B, T, V] (positions len(out) + j) (fp32), plus each row's logit_bias, its stop tokens at -inf where it has
    fewer than min_tokens (the same tensor when no row has either)."""
    if any(s.bias is not None for s in seqs):
        bias = torch.stack([s.bias if s.bias is not None else logits.new_zeros(logits.shape[-1]) for s in seqs])
        logits = logits + bias.view(len(seqs), *[1] * (logits.dim() - 2), -1)
    early = [(i, s.params.min_tokens - len(s.out), s.params.stop_token_ids) for i, s in enumerate(seqs)
             if s.params.min_tokens > len(s.out) and s.params.stop_token_ids]
    if early:
        logits = logits.clone()
        for i, n, stop in early:
            if logits.dim() == 2:
                logits[i, list(stop)] = float("-inf")
            else:  # a verify row: its first n positions
                logits[i, :n, list(stop)] = float("-inf")
    return logits


def penalized(seqs: list, logits: torch.Tensor) -> torch.Tensor:
    """The scores a step samples from: logits [B, V] biased (above), then each row's repetition / presence /
    frequency penalties over its prompt and generated tokens (apply_penalties), fp32."""
    logits = biased(seqs, logits.float())  # [B, V]
    if any(s.seen is not None for s in seqs):
        V = logits.shape[-1]
        seen = torch.stack([s.seen if s.seen is not None else logits.new_zeros(V, dtype=torch.bool)
                            for s in seqs])
        counts = torch.stack([s.counts if s.counts is not None else logits.new_zeros(V) for s in seqs])
        logits = apply_penalties(logits, seen, counts, [s.params for s in seqs])
    return logits


def tempered_logprobs(seqs: list, logits: torch.Tensor, chosen: torch.Tensor,
                      floors: list[float] | None = None) -> list[float]:
    """Each row's chosen token's log-prob under logits [B, V] / its sequence's temperature (1 for greedy), before
    top-k / top-p / min-p, in one batched pass: the distribution it was drawn from (Engine(keep_logprobs=True));
    floors (sampling_floors): over the tokens at or above each row's floor only, as they were drawn."""
    t = logits.new_tensor([s.params.temperature or 1.0 for s in seqs], dtype=torch.float32)[:, None]
    scaled = logits.float() / t
    if floors is not None:
        scaled = scaled.masked_fill(scaled < scaled.new_tensor(floors)[:, None], float("-inf"))
    return (scaled.gather(1, chosen.to(logits.device)[:, None])[:, 0] - scaled.logsumexp(-1)).tolist()


def sampling_floors(seqs: list, logits: torch.Tensor, kept: torch.Tensor | None = None) -> list[float]:
    """Each row's floor under its sequence's top-k / top-p / min-p (filter_logits): halfway between the lowest
    tempered logit they keep and the highest they drop, so the tokens it may draw are those above it, and a logit
    computed again (rounding ~1e-6 apart) falls on the same side (-inf where nothing is cut). DeepSeek-V3.2's Keep
    Sampling Mask: GRPO's update renormalises its log-probs over the same tokens (Engine(keep_sampling_mask=True)).
    kept: filter_logits of these logits and rows, where sample() made it already (its `kept`)."""
    params = [s.params for s in seqs]
    if all(p.temperature == 0 or _unfiltered(p, logits.shape[1]) for p in params):
        return [float("-inf")] * len(seqs)
    temps = logits.new_tensor([p.temperature or 1.0 for p in params], dtype=torch.float32)[:, None]
    if kept is None:
        kept = filter_logits(logits.float(), [p if p.temperature > 0 else SamplingParams() for p in params])
    dropped = kept.isinf()
    low = kept.masked_fill(dropped, float("inf")).amin(-1)
    high = (logits.float() / temps).masked_fill(~dropped, float("-inf")).amax(-1)
    return torch.where(high > float("-inf"), (low + high) / 2, float("-inf")).tolist()  # (nothing dropped: -inf)


TOP_CANDIDATES = 1024  # top-k / top-p / min-p decided among each row's best this-many tokens when they hold its kept
#   set (filter_logits)


def filter_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p on logits [B, V] (rows with temperature > 0); dropped tokens -> -inf.
    Decided among each row's best tokens (one topk: TOP_CANDIDATES of them, or the largest top-k when every row
    sets one below that) when they hold every token the row keeps: top-k at most that many, or top-p's mass or
    min-p's bound reached inside them; min-p alone past them compares each probability with its bound; other rows
    sort the whole vocabulary (sorted_filter, the reference twin).
    `python bench/sampling.py` times it against the sort and transformers' warpers."""
    B, V = logits.shape
    temps = [p.temperature or 1.0 for p in params]  # (all 1, as a GRPO rollout's: no division, ~0.1 ms at B=64)
    scaled = logits if all(t == 1.0 for t in temps) else logits / logits.new_tensor(temps)[:, None]
    free = [i for i, p in enumerate(params) if _unfiltered(p, V)]
    if len(free) == B:
        return scaled  # nothing to filter: skip the sort over the vocabulary
    K = min(TOP_CANDIDATES, V)
    if all(0 < p.top_k <= K for p in params):
        K = max(p.top_k for p in params)  # (a topk of 50 costs a fifth of one of 1024 here)
    elif K == V:
        return sorted_filter(scaled, params)
    k, top_p, min_p = _limits(scaled, params)
    vals, order = scaled.topk(K, dim=-1)  # [B, K], best first
    beyond = torch.arange(K, device=logits.device)[None] >= k  # top-k
    vals_k = vals.masked_fill(beyond, float("-inf"))
    # probabilities over the row's top-k tokens: the K here when k <= K, else (top-k off) the whole vocabulary
    lse = vals_k.logsumexp(-1, keepdim=True)
    if (k > K).any():  # (a pass over the vocabulary only where some row needs it)
        lse = torch.where(k <= K, lse, scaled.logsumexp(-1, keepdim=True))
    p = (vals_k - lse).exp()
    cum = p.cumsum(dim=-1)
    drop = beyond | ((cum - p) >= top_p) | (p < min_p * p[:, :1])  # as sorted_filter
    drop[:, 0] = False
    # [B, 1]: nothing kept past K (top-k between K and V: its mass is unknown here, so those rows sort)
    held = (k <= K) | (k >= V) & ((cum[:, -1:] >= top_p) | (p[:, -1:] < min_p * p[:, :1]))
    out = torch.full_like(logits, float("-inf")).scatter(1, order, vals.masked_fill(drop, float("-inf")))
    if free:  # rows without filters beside filtered ones keep every token
        out[free] = scaled[free]
        held[free] = True
    rest = (~held[:, 0]).nonzero()[:, 0].tolist()
    # min-p alone needs no order: a bound on each probability (flat rows keep thousands of tokens past K)
    bound = [i for i in rest if params[i].top_p >= 1 and k[i, 0] >= V]
    if bound:
        p = scaled[bound].softmax(dim=-1)
        out[bound] = scaled[bound].masked_fill(p < min_p[bound] * p.amax(-1, keepdim=True), float("-inf"))
    rest = [i for i in rest if i not in bound]
    if rest:
        out[rest] = sorted_filter(scaled[rest], [params[i] for i in rest])
    return out


def sorted_filter(scaled: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """filter_logits on temperature-scaled logits [B, V] with one sort over the whole vocabulary."""
    V = scaled.shape[1]
    k, top_p, min_p = _limits(scaled, params)
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    drop = torch.arange(V, device=scaled.device)[None] >= k  # top-k
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    p = sorted_logits.softmax(dim=-1)
    drop |= (p.cumsum(dim=-1) - p) >= top_p  # top-p: the smallest prefix whose mass reaches top_p
    drop |= p < min_p * p[:, :1]  # min-p: at least min_p times the most likely token
    drop[:, 0] = False  # the most likely token always survives
    return torch.full_like(scaled, float("-inf")).scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))


def _unfiltered(p: SamplingParams, V: int) -> bool:
    return (p.top_k == 0 or p.top_k >= V) and p.top_p >= 1 and p.min_p == 0


def _limits(scaled: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, ...]:
    """Each row's top-k (the vocabulary when off), top-p (inf when off: a mass summed to 1.0 in fp32 before the
    last tokens must not drop them) and min-p as [B, 1] columns."""
    V = scaled.shape[1]
    k = ints([min(p.top_k or V, V) for p in params], scaled.device)[:, None]
    top_p = scaled.new_tensor([p.top_p if p.top_p < 1 else float("inf") for p in params])[:, None]
    return k, top_p, scaled.new_tensor([p.min_p for p in params])[:, None]


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] -> the argmax ids [...]: max's indices, the same first index on ties and 3x argmax's speed on CPU
    (torch 2.13: 51 vs 158 us for [16, 7028])."""
    return logits.max(dim=-1).indices


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None] | None = None, kept: list | None = None) -> torch.Tensor:
    """logits [B, V] (already penalized) -> token ids [B]. Greedy rows take the argmax; others draw with their
    own generator (per-request seed) so a request's tokens do not depend on its batch neighbours. kept (a list):
    where every row draws, the tempered and filtered logits it drew from [B, V] appended (sampling_floors')."""
    logits = logits.float()
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if len(rows) < len(params):
        out = greedy(logits)
    if rows:
        every = len(rows) == len(params)  # (a GRPO rollout: no row gathered, no argmax computed for nothing)
        filtered = filter_logits(logits if every else logits[rows], [params[i] for i in rows])
        if every and kept is not None:
            kept.append(filtered)
        probs = filtered.softmax(dim=-1)
        gens = [generators[i] if generators else None for i in rows]  # None: the global generator
        if all(g is None for g in gens):
            u = torch.rand(len(rows), device=probs.device)
        else:
            u = torch.stack([torch.rand((), generator=g, device=probs.device) for g in gens])
        if every:
            return draw(probs, u)
        out[rows] = draw(probs, u)
    return out


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling, all rows at once: row i takes the first token whose cumulative probability exceeds
    u[i] times the row's total (u uniform in [0, 1)). One random number a row where torch.multinomial (the
    reference, tested equal in distribution) draws one per token: 4096 of them, 0.11 ms, per row and step.
    probs [R, V] -> ids [R]; a zero-probability token is never drawn."""
    cdf = probs.cumsum(dim=-1)  # [R, V], non-decreasing
    total = cdf[:, -1:]
    v = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))  # < total: a token
    return torch.searchsorted(cdf, v, right=True)[:, 0]  # first index with cdf > v: its probability is > 0


def top_logprobs(logits: torch.Tensor, tokens: torch.Tensor, n: int):
    """Model log-probs of the chosen tokens [B] and the top-n alternatives ([B, n] values, [B, n] ids)."""
    lp = logits.float().log_softmax(dim=-1)
    chosen = lp.gather(1, tokens[:, None]).squeeze(1)
    top = lp.topk(n, dim=-1) if n else (lp[:, :0], tokens[:, None][:, :0])
    return chosen, top[0], top[1]


def probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distribution each row samples from: [B, V]; one-hot argmax for greedy rows."""
    out = filter_logits(logits.float(), params).softmax(dim=-1)
    rows = torch.tensor([p.temperature == 0 for p in params], device=logits.device)  # greedy rows
    onehot = torch.zeros_like(out).scatter_(1, greedy(logits)[:, None], 1.0)
    return torch.where(rows[:, None], onehot, out)


def speculative_accept(p: torch.Tensor, q: torch.Tensor, draft: int, generator=None) -> tuple[bool, int]:
    """Speculative sampling (Leviathan et al. 2023): keep `draft` ~ q with probability min(1, p/q), else draw
    from the normalised residual max(0, p - q). The result is distributed exactly as p. p, q: [V]."""
    if torch.rand((), generator=generator, device=p.device) * q[draft] < p[draft]:
        return True, draft
    residual = (p - q).clamp(min=0)
    if residual.sum() <= 0:
        residual = p
    return False, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
