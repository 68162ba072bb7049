"""DeepSeek-V4: hybrid sliding-window / CSA / HCA attention, mHC residual streams, hash-routed MoE.

A readable reference of the architecture as transformers' `deepseek_v4` implements it (logit parity is tested
in tests/test_v4.py). Every layer attends over a sliding window of raw tokens; CSA layers add compressed
entries (one per `compress_rate_csa` tokens, overlapping windows) of which a lightning indexer keeps the top-k
per query; HCA layers add all causal entries of a heavy compression (one per `compress_rate_hca` tokens).
One K=V head is shared by all query heads, the rope slice is the *trailing* `qk_rope_head_dim` channels and
the output's rope slice is rotated back (so each entry contributes by relative position), every head has a
learned attention sink, and the output projection is grouped low-rank. The residual is `hc_mult` streams
mixed by manifold-constrained hyper-connections (Sinkhorn-projected doubly-stochastic mixing).

Tensor names are transformers' (`model.` prefix dropped), so HF checkpoints map one to one.
Rope: sliding layers use plain rope (`rope_theta`); CSA/HCA layers and the compressed entries use
`compress_rope_theta` with the config's rope scaling (YaRN), cos/sin unscaled.
"""

from __future__ import annotations

import numpy
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import Config
from .experts import Groups, RoutedLoad, dispatch, stacked_weight
from .linear import Linear, dense_weight
from .model import RMSNorm as V3RMSNorm
from .model import head_loss, positions, rope_inv_freq
from .moe import sequence_balance_loss
from .sparse import visible

CSA_GATHER = 4  # long forwards: CSA gathers each query's top-k entries once there are more than 4 x k
ATTN_CHUNK = 1024  # queries per chunk of a long forward's attention (each chunk sees a window band + entries)

# kept in fp32 whatever the model dtype (as transformers keeps them): mHC maps, sinks, compressor position
# biases, the router's balancing bias and every norm weight
FP32 = ("attn_hc.", "ffn_hc.", "hc_head.", "sinks", "position_bias", "e_score_correction_bias", "norm.weight")


class RMSNorm(V3RMSNorm):
    """V4's norm: normalise and scale in fp32 (the weight stays fp32), cast once at the end; in fp32 the V3 norm's
    paths (CPU training: its backward by hand)."""

    def forward(self, x):
        return self.fp32(x.float(), self.weight.float()).to(x.dtype)


def unit_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS normalisation without a weight, computed in fp32."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def rope_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the trailing 2 * cos.shape[-1] channels of x [..., D] in interleaved pairs, in place order.
    cos/sin broadcast against x[..., :1] with a last dim of rd/2."""
    rd = 2 * cos.shape[-1]
    cos, sin = cos.to(x.dtype).float(), sin.to(x.dtype).float()  # tables in the model dtype, as transformers
    x1, x2 = x[..., -rd::2].float(), x[..., -rd + 1::2].float()
    rot = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([x[..., :-rd], rot.to(x.dtype)], dim=-1)


class Rope2(nn.Module):
    """cos/sin [T, rd/2] for the "main" (sliding layers) and "compress" (CSA/HCA layers, entries) ropes."""

    def __init__(self, c: Config):
        super().__init__()
        main = rope_inv_freq(c.replace(rope_type="default"))[0]
        comp = rope_inv_freq(c.replace(rope_theta=c.compress_rope_theta))[0]  # cos/sin unscaled (factor 1)
        self.register_buffer("main", main, persistent=False)
        self.register_buffer("compress", comp, persistent=False)

    def forward(self, pos: torch.Tensor, kind: str):  # pos [...] -> cos, sin [..., rd/2]
        ang = pos[..., None].float() * getattr(self, kind)
        return ang.cos(), ang.sin()


class Compressor(nn.Module):
    """One gated-pooled entry per `rate` tokens. overlap (CSA): entry w pools window w-1's first half-channels
    and window w's second half over 2*rate slots; else (HCA) window w alone. kv_norm, then rope at w*rate.
    The per-token projections are what a cache keeps; entries are pooled from them."""

    def __init__(self, c: Config, rate: int, dim: int, overlap: bool):
        super().__init__()
        self.rate, self.dim, self.overlap = rate, dim, overlap
        width = 2 * dim if overlap else dim
        self.kv_proj = Linear(c.dim, width, bias=False)
        self.gate_proj = Linear(c.dim, width, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(rate, width))
        self.kv_norm = RMSNorm(dim, c.norm_eps)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # x [B, T, D] -> 2 x [B, T, width]
        return self.kv_proj(x), self.gate_proj(x)

    def pool(self, kv: torch.Tensor, gate: torch.Tensor, rope: Rope2, first=0, prev=None) -> torch.Tensor:
        """Projections [B, S, width] of the tokens from window `first` on (an int, or [B] per sequence) ->
        entries of the S // rate complete windows [B, n, d], roped at their first token. Overlap: prev =
        window first-1's (kv, gate) [B, rate, width] (None: -inf gates, as before window 0)."""
        B, S, _ = kv.shape
        m, d, n = self.rate, self.dim, S // self.rate
        if n == 0:  # (empty, but from every parameter: their gradients zeros, not missing, as where windows pool:
            #   data-parallel ranks and FSDP's reduce-scatter then sum the same parameters)
            return self.kv_norm(kv[:, :0, :d] + gate[:, :0, :d] + self.position_bias[:0, :d])
        kv = kv[:, :n * m].view(B, n, m, kv.shape[-1])
        gate = gate[:, :n * m].view(B, n, m, gate.shape[-1]) + self.position_bias
        if self.overlap:  # slots [0, m): the previous window's first half; [m, 2m): the window's own second half
            if prev is None:
                lead_kv = kv.new_zeros(B, 1, m, d)
                lead_gate = gate.new_full((B, 1, m, d), float("-inf"))
            else:
                lead_kv, lead_gate = prev[0][:, None, :, :d], (prev[1] + self.position_bias)[:, None, :, :d]
            kv = torch.cat([torch.cat([lead_kv, kv[:, :-1, :, :d]], 1), kv[..., d:]], dim=2)  # [B, n, 2m, d]
            gate = torch.cat([torch.cat([lead_gate, gate[:, :-1, :, :d]], 1), gate[..., d:]], dim=2)
        pooled = (kv * gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)).sum(dim=2)
        w = torch.as_tensor(first, device=kv.device).reshape(-1, 1) + torch.arange(n, device=kv.device)  # [B|1, n]
        cos, sin = rope(w * m, "compress")
        return rope_tail(self.kv_norm(pooled), cos, sin)


class Indexer(Compressor):
    """CSA's lightning indexer: its own small overlapping compressor gives keys [B, N, Di]; queries come from
    the attention's q latent; score(t, s) = sum_h w_th * relu(q_th . k_s)."""

    def __init__(self, c: Config):
        super().__init__(c, c.compress_rate_csa, c.index_head_dim, overlap=True)
        self.c = c
        self.q_b_proj = Linear(c.q_lora_rank, c.index_n_heads * c.index_head_dim, bias=False)
        self.scorer = nn.Module()
        self.scorer.weights_proj = Linear(c.dim, c.index_n_heads, bias=False)

    def select(self, x, q_lat, pos, rope, visible, k) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries x/q_lat [B, T, .] at pos [B, T], keys k [B, N, Di] -> (each query's top-k compressed entries
        [B, T, k], whether each is visible [B, T, k], the fp32 scores [B, T, N] with -inf where not visible)."""
        c = self.c
        B, T, _ = x.shape
        cos, sin = rope(pos, "compress")
        q = rope_tail(self.q_b_proj(q_lat).view(B, T, c.index_n_heads, -1), cos[:, :, None], sin[:, :, None])
        s = torch.einsum("bthd,bnd->bthn", q.float(), k.float()).relu() * c.index_head_dim**-0.5
        w = self.scorer.weights_proj(x).float() * c.index_n_heads**-0.5  # [B, T, Hi]
        score = (s * w[..., None]).sum(2).masked_fill(~visible, float("-inf"))  # [B, T, N]
        top = score.topk(torch.sym_min(c.index_topk, score.shape[-1]), dim=-1).indices  # (no guard on N)
        return top, visible.gather(-1, top), score


def indexer_kl(target_scores: torch.Tensor, index_scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """KL(main attention over the visible entries, summed over heads || the indexer's softmax), averaged over
    queries that see an entry: V3.2's indexer loss, on V4's compressed entries. target_scores [B, H, T, N]
    (detached), index_scores [B, T, N], visible [B, T, N]."""
    rows = visible.any(-1)  # [B, T]
    if not rows.any():
        return index_scores.new_zeros(())
    p = target_scores.masked_fill(~visible[:, None], float("-inf")).softmax(-1).nan_to_num().mean(1)  # [B, T, N]
    logq = index_scores.masked_fill(~visible, float("-inf")).log_softmax(-1)
    kl = torch.where(visible, p * (p.clamp_min(1e-30).log() - logq.clamp_min(-1e30)), 0.0).sum(-1)
    return kl[rows].mean()


class Attention(nn.Module):
    def __init__(self, c: Config, kind: str, layer_id: int):
        super().__init__()
        self.c, self.kind, self.layer_id = c, kind, layer_id
        H, D = c.n_heads, c.head_dim
        self.q_a_proj = Linear(c.dim, c.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(c.q_lora_rank, c.norm_eps)
        self.q_b_proj = Linear(c.q_lora_rank, H * D, bias=False)
        self.kv_proj = Linear(c.dim, D, bias=False)
        self.kv_norm = RMSNorm(D, c.norm_eps)
        self.o_a_proj = Linear(H * D // c.o_groups, c.o_groups * c.o_lora_rank, bias=False)  # per group
        self.o_b_proj = Linear(c.o_groups * c.o_lora_rank, c.dim, bias=False)
        self.sinks = nn.Parameter(torch.zeros(H))
        self.indexer_loss = None  # CSA training forwards: the indexer's KL to the main attention
        self.learn_indexer = True  # (train.learn_indexers: off where no loss reads it)
        if kind != "sliding":
            self.compressor = Compressor(c, c.compress_rate(kind), D, overlap=kind == "csa")
            if kind == "csa":
                self.compressor.indexer = Indexer(c)

    def forward(self, x, pos, rope, see, cache=None) -> torch.Tensor:
        """x [B, T, dim] at positions pos [B, T]; see [B|1, T, S] bool: the cached + new tokens each query may
        read (causal, valid). Scores under masks: over all of them up to ATTN_CHUNK queries (the reference),
        past that chunk by chunk over the band of rows each chunk sees (recomputed in the backward pass).
        -> [B, T, dim]"""
        if hasattr(cache, "split"):  # packed documents (sft.Packed): windows pool within one document, see its
            #   [S, L, L] mask (streams); positions -1 past a document's end: no entry, no query
            return cache.merge(self(cache.split(x), cache.doc_pos, rope, see))
        c = self.c
        B, T, _ = x.shape
        H, D, G = c.n_heads, c.head_dim, c.o_groups
        cos, sin = rope(pos, "main" if self.kind == "sliding" else "compress")  # [B, T, rd/2]
        q_lat = self.q_a_norm(self.q_a_proj(x))
        q = rope_tail(unit_rms(self.q_b_proj(q_lat).view(B, T, H, D), c.norm_eps), cos[:, :, None], sin[:, :, None])
        new = [rope_tail(self.kv_norm(self.kv_proj(x)), cos, sin)]  # [B, T, D]: key and value alike
        if self.kind != "sliding":
            new += self.compressor.project(x)
            if self.kind == "csa":  # the indexer sees detached inputs: only its KL loss trains it (V3.2's recipe)
                new += self.compressor.indexer.project(x.detach())
        if hasattr(cache, "context"):  # the engine's incremental cache (v4cache.V4Batch)
            kv, see, ent, causal, keys = cache.context(self, new, rope)
        else:
            kv, see, ent, causal, keys = self.context(new, pos, rope, see, cache)
        if self.kind == "csa" and (torch.compiler.is_compiling()
                                   or T * min(c.index_topk, keys.shape[1]) < keys.shape[1]):
            # decode: gather each query's top-k entries, O(k) not O(N) per step (compiled: at any N, one graph)
            top, chosen, score = self.compressor.indexer.select(x.detach(), q_lat.detach(), pos, rope, causal, keys)
            if self.training and self.learn_indexer:
                self.indexer_loss = self.indexer_kl(q, ent, score, causal)
            mine = ent[torch.arange(B, device=x.device)[:, None, None], top]  # [B, T, k, D]
            o = self.attend(q, kv, see, mine, chosen)
        else:  # many queries (training, prefill): the entries shared, in chunks of queries past ATTN_CHUNK
            spans = [(c0, min(c0 + ATTN_CHUNK, T)) for c0 in range(0, T, ATTN_CHUNK)]
            grad = torch.is_grad_enabled() and q.requires_grad and len(spans) > 1
            parts = [checkpoint(self.queries, *args, use_reentrant=False) if grad else self.queries(*args)
                     for args in ((q, x, q_lat, pos, rope, kv, see, ent, causal, keys, c0, c1, len(spans) > 1)
                                  for c0, c1 in spans)]
            o = torch.cat([p[0] for p in parts], 1)
            if self.kind == "csa" and self.training and self.learn_indexer:  # the KL averaged over every query
                #   that sees an entry
                kl, rows = zip(*[p[1:] for p in parts])
                self.indexer_loss = kl[0] if len(kl) == 1 else sum(k * r for k, r in zip(kl, rows)) / max(
                    sum(rows), 1)
        o = rope_tail(o, cos[:, :, None], -sin[:, :, None])  # rotate back
        o = o.reshape(B, T, G, H * D // G)
        w = dense_weight(self.o_a_proj, o.dtype)
        w = w.view(G, c.o_lora_rank, -1)  # group g: its own [o_lora_rank, H*D/G] block (FP8: dequantised)
        return self.o_b_proj(torch.einsum("btgi,gri->btgr", o, w).flatten(2))

    def queries(self, q, x, q_lat, pos, rope, kv, see, ent, causal, keys, c0: int, c1: int, narrow: bool):
        """Attention of the queries c0..c1 over the rows they see (narrow: only the columns some query of the
        chunk sees, a window's band) and the entries (HCA: the causal ones; CSA: each query's top-k, gathered
        once the entries outnumber CSA_GATHER x k, else as a mask over the shared ones). -> (o [B, C, H, D], the
        CSA indexer's KL and the queries it averages over, when training)."""
        q, see = q[:, c0:c1], see[:, c0:c1]
        if narrow:
            cols = see.flatten(0, 1).any(0).nonzero()
            lo, hi = (int(cols[0]), int(cols[-1]) + 1) if len(cols) else (0, 1)
            kv, see = kv[:, lo:hi], see[..., lo:hi]
        kl = rows = None
        if ent is not None:
            causal = causal[:, c0:c1]
            if self.kind == "csa":
                top, chosen, score = self.compressor.indexer.select(x[:, c0:c1].detach(), q_lat[:, c0:c1].detach(),
                                                                    pos[:, c0:c1], rope, causal, keys)
                if self.training and self.learn_indexer:
                    kl, rows = self.indexer_kl(q, ent, score, causal), int(causal.any(-1).sum())
                if ent.shape[1] > CSA_GATHER * top.shape[-1]:  # few chosen of many: gather each query's own
                    mine = ent[torch.arange(len(q), device=q.device)[:, None, None], top]  # [B, C, k, D]
                    return self.attend(q, kv, see, mine, chosen), kl, rows
                causal = torch.zeros_like(causal).scatter_(-1, top, chosen)
            kv, see = torch.cat([kv, ent], dim=1), torch.cat([see.expand(len(q), -1, -1), causal], dim=-1)
        return self.attend(q, kv, see), kl, rows

    def attend(self, q, kv, see, mine=None, chosen=None):
        """q [B, T, H, D] over the rows kv [B, S, D] where see [B|1, T, S], plus (CSA, gathered) each query's own
        entries mine [B, T, k, D] where chosen [B, T, k], and the per-head sink -> [B, T, H, D]."""
        B, T, H, D = q.shape
        s = torch.einsum("bthd,bsd->bhts", q, kv)  # [B, H, T, S]
        if mine is not None:
            s = torch.cat([s, torch.einsum("bthd,btkd->bhtk", q, mine)], dim=-1)  # [B, H, T, S + k]
            see = torch.cat([see.expand(B, -1, -1), chosen], dim=-1)
        s = (s * D**-0.5).float().masked_fill(~see[:, None], float("-inf"))
        s = torch.cat([s, self.sinks.float().view(1, H, 1, 1).expand(B, H, T, 1)], dim=-1)
        p = s.softmax(-1)[..., :-1].to(kv.dtype)  # the sink takes its share of the mass, then is dropped
        if mine is None:
            return torch.einsum("bhts,bsd->bthd", p, kv)
        S = kv.shape[1]  # window + chosen entries accumulated in fp32 and rounded once, as one product would be
        return (torch.einsum("bhts,bsd->bthd", p[..., :S].float(), kv.float())
                + torch.einsum("bhtk,btkd->bthd", p[..., S:].float(), mine.float())).to(kv.dtype)

    @staticmethod
    def indexer_kl(q, ent, score, causal) -> torch.Tensor:
        """The CSA indexer's loss toward the main attention (q [B, T, H, D]) over the entries ent [B, N, D]."""
        return indexer_kl(torch.einsum("bthd,bnd->bhtn", q, ent).detach().float() * q.shape[-1]**-0.5, score, causal)

    def context(self, new, pos, rope, see, cache=None):
        """The simple twin of v4cache.V4Batch.context: every token's rows kept (model.Cache) and every window
        pooled afresh. -> (K=V rows [B, S, D], see [B, T, S] (causal, valid, within the window), entries
        [B, N, D] | None, causal [B, T, N] | None, indexer keys [B, N, Di] | None)."""
        rows = cache.update(self.layer_id, *new) if cache is not None else new  # [B, S, .] each
        kv, S = rows[0], rows[0].shape[1]
        near = (pos[..., None] - torch.arange(S, device=kv.device)) < self.c.sliding_window  # [B, T, S]
        see = see & near
        if self.kind == "sliding":
            return kv, see, None, None, None
        ent = self.compressor.pool(rows[1], rows[2], rope)  # [B, N, D]
        causal = torch.arange(ent.shape[1], device=kv.device) < ((pos + 1) // self.compressor.rate)[..., None]
        keys = self.compressor.indexer.pool(rows[3], rows[4], rope) if self.kind == "csa" else None
        return kv, see, ent, causal, keys


class HyperConnection(nn.Module):
    """mHC: from the N streams, pre (collapse weights), post (expand weights) and comb (stream mixing,
    Sinkhorn-projected to doubly stochastic)."""

    def __init__(self, c: Config):
        super().__init__()
        self.c, N = c, c.hc_mult
        self.fn = nn.Parameter(torch.zeros((2 + N) * N, N * c.dim))
        self.base = nn.Parameter(torch.zeros((2 + N) * N))
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, h: torch.Tensor):  # h [B, T, N, D] -> post [B, T, N], comb [B, T, N, N], x [B, T, D]
        c, N = self.c, self.c.hc_mult
        mix = F.linear(unit_rms(h.flatten(2).float(), c.norm_eps), self.fn.float())
        scale = torch.cat([self.scale[:1].expand(N), self.scale[1:2].expand(N), self.scale[2:].expand(N * N)])
        pre, post, comb = (mix * scale + self.base).split([N, N, N * N], dim=-1)
        pre = pre.sigmoid() + c.hc_eps
        post = 2 * post.sigmoid()
        comb = sinkhorn(comb.view(*comb.shape[:-1], N, N).softmax(-1) + c.hc_eps, c.hc_sinkhorn_iters, c.hc_eps)
        return post, comb, (pre[..., None] * h).sum(2).to(h.dtype)


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Positive [..., N, N] -> near doubly stochastic: columns normalised, then (iters - 1) x (rows, columns), each
    divided by its sum + eps (transformers' order). A decode step's few rows on the CPU (no autograd) take the
    same float32 arithmetic in numpy, whose per-call cost is about half of torch's on tiny arrays: this is ~120
    calls per hyper-connection, 8 of them per step of the debug V4 (tested equal to the torch path)."""
    if comb.device.type == "cpu" and comb.numel() <= 1024 and not (torch.is_grad_enabled() and comb.requires_grad) \
            and not torch.compiler.is_compiling():
        a, e = comb.float().numpy(force=True), numpy.float32(eps)
        a = a / (a.sum(-2, keepdims=True) + e)
        for _ in range(iters - 1):
            a = a / (a.sum(-1, keepdims=True) + e)
            a = a / (a.sum(-2, keepdims=True) + e)
        return torch.from_numpy(a).to(comb.dtype)
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return comb


def hc_apply(h, post, comb, out):
    """New streams: post-weighted block output plus the comb-mixed old streams. h [B, T, N, D], out [B, T, D]."""
    return post.to(h.dtype)[..., None] * out[..., None, :] + comb.to(h.dtype).transpose(-1, -2) @ h


class HyperHead(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.c, N = c, c.hc_mult
        self.hc_fn = nn.Parameter(torch.zeros(N, N * c.dim))
        self.hc_base = nn.Parameter(torch.zeros(N))
        self.hc_scale = nn.Parameter(torch.ones(1))

    def forward(self, h):  # [B, T, N, D] -> [B, T, D]
        mix = F.linear(unit_rms(h.flatten(2).float(), self.c.norm_eps), self.hc_fn.float())
        pre = (mix * self.hc_scale + self.hc_base).sigmoid() + self.c.hc_eps
        return (pre[..., None] * h).sum(2).to(h.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    if limit:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return F.silu(gate) * up


class MLP(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.limit = c.swiglu_limit
        self.gate_proj = Linear(c.dim, c.moe_inter_dim, bias=False)
        self.up_proj = Linear(c.dim, c.moe_inter_dim, bias=False)
        self.down_proj = Linear(c.moe_inter_dim, c.dim, bias=False)

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), self.limit))


class Router(nn.Module):
    """sqrt(softplus) (or sigmoid / softmax) scores; experts = top-k of score + bias, or tid2eid[token] in hash
    layers; weights = the chosen scores renormalised, times route_scale."""

    def __init__(self, c: Config, hashed: bool):
        super().__init__()
        self.c, self.hashed = c, hashed
        self.weight = nn.Parameter(torch.zeros(c.n_routed_experts, c.dim))
        if hashed:
            self.register_buffer("tid2eid", torch.zeros(c.vocab_size, c.n_activated_experts, dtype=torch.long))
        else:
            self.register_buffer("e_score_correction_bias", torch.zeros(c.n_routed_experts))

    @property
    def bias(self) -> torch.Tensor | None:  # the balancing bias training nudges (none in hash layers)
        return None if self.hashed else self.e_score_correction_bias

    def forward(self, x, tokens, idx=None):  # x [N, D], tokens [N] -> weights [N, k], experts [N, k], scores
        #   [N, E]; idx [N, k]: the experts given (Keep Routing's replay), their weights from these scores
        logits = F.linear(x, self.weight)  # in the model dtype (transformers does not upcast the router)
        f = self.c.score_func
        scores = F.softplus(logits).sqrt() if f == "sqrtsoftplus" else logits.sigmoid() if f == "sigmoid" \
            else logits.softmax(-1)
        if idx is not None:
            idx = idx.to(x.device, torch.long)
        elif self.hashed:
            idx = self.tid2eid[tokens]
        else:
            idx = (scores + self.e_score_correction_bias).topk(self.c.n_activated_experts, dim=-1).indices
        w = scores.gather(1, idx)
        return w / (w.sum(-1, keepdim=True) + 1e-20) * self.c.route_scale, idx, scores


class Experts(nn.Module):
    """Routed experts, transformers' layout: gate_up_proj [E, 2I, D] (gate and up fused), down_proj [E, D, I] (stored
    transposed: experts.stacked_weight)."""

    def __init__(self, E: int, D: int, inter: int, limit: float):
        super().__init__()
        self.limit = limit
        self.gate_up_proj = stacked_weight(torch.zeros(E, 2 * inter, D))
        self.down_proj = stacked_weight(torch.zeros(E, D, inter))

    def forward(self, x, w, idx):  # x [N, D], w/idx [N, K] -> [N, D]
        return dispatch(x, w, idx, self.gate_up_proj.shape[0],
                        lambda xs, counts: self.grouped(xs, counts, self.gate_up_proj, self.down_proj), traceable=True)

    def grouped(self, xs, counts: list[int] | Groups, gate_up, down):  # rows sorted by expert -> clipped SwiGLU
        return grouped_swiglu(xs, counts, gate_up, down, self.limit)


def grouped_swiglu(xs, counts: list[int] | Groups, gate_up, down, limit: float):
    """Clipped SwiGLU experts on rows sorted by expert (counts[e] rows for expert e, or a Groups layout):
    gate_up [E, 2I, D] (gate and up stacked), down [E, D, I]."""
    grp = Groups.of(counts, xs, gate_up)
    g, u = grp.mm(grp.pack(xs), gate_up).chunk(2, dim=-1)
    return grp.unpack(grp.mm(swiglu(g, u, limit), down))


class MoE(RoutedLoad, nn.Module):
    def __init__(self, c: Config, hashed: bool):
        super().__init__()
        E, D, inter = c.n_routed_experts, c.dim, c.moe_inter_dim
        self.c = c
        self.gate = Router(c, hashed)
        self.experts = Experts(E, D, inter, c.swiglu_limit)
        self.shared_experts = MLP(c)
        self.n_experts = E  # (last_load: tokens per expert in the last forward, for balancing and EPLB)
        self.balance_loss = None  # training forwards of learned-routing layers
        self.replay = None  # [N, K]: the experts the next forward's rows go to (Keep Routing: GRPO's update)

    def forward(self, x, tokens):  # x [B, T, D], tokens [B, T]
        flat = x.flatten(0, 1)
        w, idx, scores = self.gate(flat, tokens.flatten(), self.replay)
        self.last_idx = idx
        if self.training:
            self.balance_loss = torch.zeros((), device=x.device) if self.gate.hashed else \
                sequence_balance_loss(idx, scores.float(), x.shape[0], x.shape[1])
        out = self.experts(flat, w.to(flat.dtype), idx)  # twin: reference.v4_moe
        return out.view_as(x) + self.shared_experts(x)


class Layer(nn.Module):
    def __init__(self, c: Config, i: int):  # i >= n_layers: an MTP module's layer (sliding window, learned routing)
        super().__init__()
        self.self_attn = Attention(c, c.layer_types[i] if i < c.n_layers else "sliding", i)
        self.mlp = MoE(c, hashed=i < c.n_hash_layers)
        self.input_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.post_attention_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.attn_hc, self.ffn_hc = HyperConnection(c), HyperConnection(c)

    def forward(self, h, tokens, pos, rope, see, cache, last: bool = False):  # h [B, T, N, D]
        post, comb, x = self.attn_hc(h)
        h = hc_apply(h, post, comb, self.self_attn(self.input_layernorm(x), pos, rope, see, cache))
        if last:  # the FFN of the last position only
            h, tokens = h[:, -1:], tokens[:, -1:]
        keep = getattr(cache, "keep", None)  # [n] flat rows whose output is read (GRPO's update: no padding)
        if keep is not None:  # the FFN on those rows only (one sequence of n); the others keep their streams
            flat = h.flatten(0, 1)  # [B T, N, D]
            hk, tk = flat.index_select(0, keep)[None], tokens.flatten().index_select(0, keep)[None]
            post, comb, x = self.ffn_hc(hk)
            return flat.index_copy(0, keep, hc_apply(hk, post, comb, self.mlp(self.post_attention_layernorm(x),
                                                                              tk))[0]).view_as(h)
        post, comb, x = self.ffn_hc(h)
        return hc_apply(h, post, comb, self.mlp(self.post_attention_layernorm(x), tokens))


class MTPLayer(nn.Module):
    """Multi-token prediction module k, as DeepSeek ships V4's (and SGLang runs it): the previous depth's streams
    h [B, T, N, D] (depth 1: the main model's, before its hyper head) and the embedding of the token k ahead go
    through one sliding-window layer as h_proj(hnorm(h)) + e_proj(enorm(emb)) (the embedding added to every
    stream); its own hyper head and norm feed the shared lm_head."""

    def __init__(self, c: Config, layer_id: int):
        super().__init__()
        self.enorm, self.hnorm = RMSNorm(c.dim, c.norm_eps), RMSNorm(c.dim, c.norm_eps)
        self.e_proj = Linear(c.dim, c.dim, bias=False)
        self.h_proj = Linear(c.dim, c.dim, bias=False)
        self.block = Layer(c, layer_id)
        self.hc_head = HyperHead(c)
        self.norm = RMSNorm(c.dim, c.norm_eps)

    def forward(self, h, emb, tokens, pos, rope, see, cache=None, last: bool = False):  # -> streams [B, T, N, D],
        x = self.h_proj(self.hnorm(h)) + self.e_proj(self.enorm(emb))[:, :, None]  # normed [B, T, D] (last: T = 1)
        x = self.block(x, tokens, pos, rope, see, cache, last=last)
        return x, self.norm(self.hc_head(x))


class V4Transformer(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(Layer(c, i) for i in range(c.n_layers))
        self.hc_head = HyperHead(c)
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.lm_head = Linear(c.dim, c.vocab_size, bias=False)
        self.rope = Rope2(c)
        self.mtp = nn.ModuleList(MTPLayer(c, c.n_layers + k) for k in range(c.n_mtp_layers))  # (transformers has none)

    def hidden(self, tokens: torch.Tensor, cache=None) -> torch.Tensor:
        """tokens [B, T] -> final hidden states [B, T, D]. A cache (model.Cache or the engine's paged batch)
        says where the new tokens sit, keeps what attention needs (model.Cache: every token's rows;
        v4cache.V4Batch: windows, pooled entries) and advances afterwards."""
        return self.norm(self.hc_head(self.streams(tokens, cache)))

    def streams(self, tokens: torch.Tensor, cache=None) -> torch.Tensor:
        """tokens [B, T] -> the last layer's mHC streams [B, T, N, D] (before the hyper head)."""
        B, T = tokens.shape
        pos = positions(tokens, cache, self.config.max_seq_len)
        if hasattr(cache, "context"):  # the engine's incremental cache masks each layer itself
            see = None
        elif hasattr(cache, "split"):  # packed documents (sft.Packed): each a row of its own, attended alone
            ok, L = cache.valid, cache.valid.shape[1]  # [S, L]
            see = ok[:, :, None] & ok[:, None] & visible(None, L, L, tokens.device)  # [S, L, L]
        else:
            S = int(pos.max()) + 1 if cache is None else cache.length + T
            see = visible(cache.mask(tokens) if cache is not None else None, T, S, tokens.device)  # [B|1, T, S]
        h = self.embed_tokens(tokens)
        h = h[:, :, None].expand(-1, -1, self.config.hc_mult, -1).contiguous()  # [B, T, N, D]
        for layer in self.layers:
            h = layer(h, tokens, pos, self.rope, see, cache)
        if cache is not None:
            cache.advance(T)
        return h

    @property
    def head(self) -> nn.Linear:  # model.head(h) and model.head.weight, as model.Transformer's
        return self.lm_head

    @property
    def embed(self) -> nn.Embedding:  # (as model.Transformer's)
        return self.embed_tokens

    def hidden_state(self, tokens, cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden [B, T, D], the MTP draft's input: the last layer's streams [B, T, N, D])."""
        h = self.streams(tokens, cache)
        return self.norm(self.hc_head(h)), h

    def mtp_hidden(self, h: torch.Tensor, tokens: torch.Tensor, cache, k: int = 0, last: bool = False):
        """Incremental first MTP module (the engine's draft model): h [B, T, N, D] main streams at positions i,
        tokens [B, T] the tokens at i + 1 -> the MTP hiddens [B, T, D] that predict i + 2 (last=True: [B, 1, D],
        the last position's, as the model's mtp_hidden). V4 drafts one token: a second module would read the
        first's streams, which this does not return (k > 0 is refused)."""
        if k:
            raise ValueError("deepseek_v4 drafts one token a step (its first MTP module)")
        pos = positions(tokens, cache, self.config.max_seq_len)
        _, x = self.mtp[0](h, self.embed_tokens(tokens), tokens, pos, self.rope, None, cache, last=last)
        cache.advance(tokens.shape[1])
        return x

    def forward(self, tokens: torch.Tensor, cache=None, mtp: bool = False, targets: torch.Tensor | None = None):
        """tokens [B, T] -> logits [B, T, V]; with mtp=True also the MTP modules' logits (see mtp_hiddens); with
        targets, the cross-entropies instead (as model.Transformer.forward)."""
        h = self.streams(tokens, cache)
        x = self.norm(self.hc_head(h))
        xs = self.mtp_hiddens(h, tokens) if mtp else []
        if targets is not None:
            return head_loss(self.lm_head, x, targets), [head_loss(self.lm_head, y, targets[:, k:]) for k, y in
                                                         enumerate(xs, start=1)]
        return (self.lm_head(x), [self.lm_head(y) for y in xs]) if mtp else self.lm_head(x)

    def mtp_hiddens(self, h: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Training-time MTP over full sequences, as model.Transformer's: h = self.streams(tokens); depth k at
        position i predicts t[i+k+1] from depth k-1's streams at i and emb(t[i+k]): hiddens [B, T-k, D]. Its
        one layer is a sliding window, so positions 0.. give what the true ones (k..) would (relative RoPE)."""
        out = []
        for k, layer in enumerate(self.mtp, start=1):
            T = h.shape[1] - 1
            nxt = tokens[:, k:k + T]
            pos = torch.arange(T, device=h.device).expand(h.shape[0], -1)
            h, x = layer(h[:, :T], self.embed_tokens(nxt), nxt, pos, self.rope, visible(None, T, T, h.device))
            out.append(x)
        return out


def init_weights(model: V4Transformer, std: float = 0.02, seed: int | None = None) -> V4Transformer:
    """Fresh weights: normal(std) matrices (mHC maps included), unit norms and mHC scales, zero biases, sinks
    and position biases; hash layers get a fixed random table of distinct experts per token."""
    c = model.config
    g = torch.Generator().manual_seed(c.seed if seed is None else seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in name or name.endswith("scale") else 0.0)
            elif name.endswith("position_bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
        for m in model.modules():
            if isinstance(m, Router) and m.hashed:
                table = torch.rand(c.vocab_size, c.n_routed_experts, generator=g).argsort(-1)  # a permutation per token
                m.tid2eid.copy_(table[:, :m.tid2eid.shape[1]])
    return model
