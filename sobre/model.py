"""DeepSeek-V3 Transformer (and its V2 / Qwen2 / Llama relatives), read top to bottom.

RMSNorm -> RoPE (+YaRN / llama3) -> MLA (naive | absorb; + DSA indexer), GQA or NSA -> SwiGLU FFN or
DeepSeekMoE (moe.py) -> MTP.
Shapes: B batch, T new tokens, S cached+new tokens, H heads, D hidden, E experts, K experts per token.
The model knows nothing about parallelism, checkpoints or sampling.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import absorb, sparse
from .attention import attend, attend_grouped, causal
from .config import Config
from .linear import Linear, dense_weight, linear
from .loss import head_cross_entropy
from .moe import MLP, MoE

EPS = {}  # RMSNorm's eps -> a 0-dim CPU tensor of it (its inference path adds it in an addcmul)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # normalise in fp32, scale in the input dtype (as the reference code)
        dev, w = x.device.type, self.weight  # (a parameter read through nn.Module costs ~1.6 us: once)
        if torch.is_autocast_enabled(dev):  # out in autocast's dtype: every matmul reading it would cast it
            return self.fp32(x.float(), w.float()).to(torch.get_autocast_dtype(dev))
        if x.dtype == w.dtype == torch.float32:
            if dev == "cpu" and not torch.is_grad_enabled():  # inference: the mean square from the norm, one
                # full-size result written where F.rms_norm's CPU composite writes three (x^2, x * s, * w) into
                # memory the weights streamed through have left cold: B=64 decode steps 1.4-2% faster, B=1 alike
                # (bench/RESULTS.md, session 53); eps + norm^2 / D in one addcmul (5 ops where 7 were)
                return (x * inverse_rms(x, self.eps)).mul_(w)
            return self.fp32(x, w)  # (a decode step has 17 of them)
        return w * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def fp32(self, x, weight):
        """x and weight in fp32, under autograd or not: on the CPU (not traced) _RMSNormCPU, else F.rms_norm."""
        if x.device.type == "cpu" and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return _RMSNormCPU.apply(x, weight, self.eps)
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)


def inverse_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x^2) + eps) over the last dim of a fp32 CPU x -> [..., 1]: eps + norm^2 / D in one addcmul."""
    n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    e = EPS.get(eps)
    if e is None:
        e = EPS[eps] = torch.tensor(eps, dtype=torch.float32, device="cpu")
    return torch.addcmul(e, n, n, value=1 / x.shape[-1]).rsqrt_()


class _RMSNormCPU(torch.autograd.Function):
    """RMSNorm in fp32 on the CPU with its backward by hand: y = x r w, r = 1 / rms(x) [..., 1]; with
    x^ = x r, dL/dw = sum g x^ and dL/dx = r (g w - x^ mean(g w x^)). F.rms_norm's CPU composite differentiates
    through its six ops (pow, mean, add, rsqrt, two products), ten full-size products and sums in its backward
    where this takes five, and keeps x^ and r where it kept x, x^2 and x r: a [4032, 256] norm's forward + backward
    7.7 -> 5.4 ms; GRPO's update on the tiny preset (4032 completion tokens, 17 norms) 1.2-1.6% faster, paired
    steps (bench/RESULTS.md, session 56). Its twin: F.rms_norm (tests/test_model.py)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)  # (fp32 under autocast, both passes)
    def forward(ctx, x, weight, eps: float):
        r = inverse_rms(x, eps)
        xn = x * r
        ctx.save_for_backward(xn, weight, r)
        return xn * weight

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        xn, w, r = ctx.saved_tensors
        gw = (g * xn).flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None
        gx = None
        if ctx.needs_input_grad[0]:
            gn = g * w
            mean = torch.linalg.vecdot(gn, xn).unsqueeze(-1).div_(xn.shape[-1])  # [..., 1]
            gx = torch.addcmul(gn, xn, mean, value=-1).mul_(r)
        return gx, gw, None


# ---- rotary embeddings -------------------------------------------------------------------------
def rope_inv_freq(c: Config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rd/2] and the cos/sin magnitude (YaRN's attention factor)."""
    d, base = c.rope_dim, c.rope_theta
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    if c.rope_type == "yarn":
        def corr_dim(n_rot):
            return d * math.log(c.original_seq_len / (n_rot * 2 * math.pi)) / (2 * math.log(base))
        lo = max(math.floor(corr_dim(c.beta_fast)), 0)
        hi = min(math.ceil(corr_dim(c.beta_slow)), d - 1)
        ramp = ((torch.arange(d // 2, dtype=torch.float32) - lo) / max(hi - lo, 1e-3)).clamp(0, 1)
        inv = inv / c.rope_factor * ramp + inv * (1 - ramp)  # interpolate low freqs, keep high ones
        return inv, c.rope_magnitude
    if c.rope_type == "llama3":
        wavelen = 2 * math.pi / inv
        lo_wl, hi_wl = c.original_seq_len / c.low_freq_factor, c.original_seq_len / c.high_freq_factor
        scaled = torch.where(wavelen > lo_wl, inv / c.rope_factor, inv)
        smooth = (c.original_seq_len / wavelen - c.low_freq_factor) / (c.high_freq_factor - c.low_freq_factor)
        mid = (1 - smooth) * scaled / c.rope_factor + smooth * scaled
        inv = torch.where((wavelen >= hi_wl) & (wavelen <= lo_wl), mid, scaled)
    return inv, 1.0


class Rope(nn.Module):
    """cos/sin tables for every position up to max_seq_len, looked up by position id."""

    def __init__(self, c: Config):
        super().__init__()
        inv, mag = rope_inv_freq(c)
        ang = torch.outer(torch.arange(c.max_seq_len, dtype=torch.float32), inv)  # [max_seq_len, rd/2]
        self.register_buffer("cos", ang.cos() * mag, persistent=False)
        self.register_buffer("sin", ang.sin() * mag, persistent=False)
        self.interleave = c.rope_interleave

    def forward(self, pos: torch.Tensor):  # pos [B, T] -> cos, sin [B, T, 1, rd], as apply_rope takes them
        cos, sin = self.cos[pos].unsqueeze(2), self.sin[pos].unsqueeze(2)
        return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x [B, T, H, rd] by Rope's tables. Interleaved checkpoints pair (x0,x1),(x2,x3)...; others pair x[i],
    x[i+rd/2]. The output is always in half-split order: q and k get the same permutation, so q.k is unchanged.
    With halves (x1, x2): (x1 cos - x2 sin, x2 cos + x1 sin) = x * [cos, cos] + (x2, x1) * [-sin, sin]."""
    if interleave:
        x = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
    if x.dtype == cos.dtype == torch.float32:  # 3 ops where 4 (a decode step has one a layer; bf16 keeps the
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)  # reference's roundings: the sum's own)
    return x * cos.to(x.dtype) + x.roll(x.shape[-1] // 2, -1) * sin.to(x.dtype)


# ---- attention -----------------------------------------------------------------------------------
class MLA(nn.Module):
    """Multi-head latent attention. Only the latent c_kv [r] and the shared rope key k_pe [rd] are cached,
    side by side in one [r + rd] vector per token."""

    def __init__(self, c: Config, layer_id: int):
        super().__init__()
        self.c, self.layer_id = c, layer_id
        H, dq = c.n_heads, c.qk_head_dim
        if c.q_lora_rank:
            self.wq_a = Linear(c.dim, c.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(c.q_lora_rank, c.norm_eps)
            self.wq_b = Linear(c.q_lora_rank, H * dq, bias=False)
        else:
            self.wq = Linear(c.dim, H * dq, bias=False)
        self.wkv_a = Linear(c.dim, c.kv_lora_rank + c.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(c.kv_lora_rank, c.norm_eps)
        self.wkv_b = Linear(c.kv_lora_rank, H * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.wo = Linear(H * c.v_head_dim, c.dim, bias=False)
        if c.attn_type == "dsa":
            self.indexer = Indexer(c)
            self.dense_warmup = False  # DSA training stage 1: dense attention, only the indexer learns
            self.indexer_loss = None
            self.learn_indexer = True  # training forwards make its KL (train.learn_indexers: off where unread)

    def forward(self, x, rope, mask, cache=None):
        c = self.c
        if c.attn_impl == "absorb" and (weights := absorb.folded(self, getattr(cache, "folds", None))) is not None:
            return self.folded(x, rope, mask, cache, *weights)
        B, T, _ = x.shape
        H, dn, dr, dv = c.n_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        q_lat = self.q_norm(self.wq_a(x)) if c.q_lora_rank else None  # [B, T, q_lora_rank]
        q = self.wq_b(q_lat) if c.q_lora_rank else self.wq(x)
        q_nope, q_pe = q.view(B, T, H, dn + dr).split([dn, dr], dim=-1)
        kv, k_pe = self.wkv_a(x).split([c.kv_lora_rank, dr], dim=-1)
        pe = apply_rope(torch.cat([q_pe, k_pe.unsqueeze(2)], dim=2), *rope, c.rope_interleave)  # q and k at once
        q_pe, k_pe = pe[:, :, :H], pe[:, :, H]  # [B, T, H, rd], [B, T, rd]
        kv_pe = torch.cat([self.kv_norm(kv), k_pe], dim=-1)  # [B, T, r + rd]: all MLA caches per token
        # (q_idx, k_idx, w_idx); the indexer's inputs are detached: only its KL loss trains it (V3.2's recipe)
        idx = self.indexer(x.detach(), q_lat.detach(), rope) if c.attn_type == "dsa" else None
        if cache is not None:
            kv_pe, *k_idx = cache.update(self.layer_id, kv_pe, *idx[1:2] if idx else ())  # [B, S, r + rd]
            idx = (idx[0], k_idx[0], idx[2]) if idx else None
        S, r = kv_pe.shape[1], c.kv_lora_rank
        w = dense_weight(self.wkv_b, x.dtype)
        w_uk, w_uv = w.view(H, dn + dv, r).split([dn, dv], dim=1)  # [H, dn, r], [H, dv, r]
        if idx is not None:  # DSA: attend to the indexer's top-k (everything visible during the dense warm-up)
            see = None if mask is None else sparse.visible(mask, T, S, x.device)  # [B|1, T, S]; None: causal
            kw = dict(rank=r, topk=c.index_topk, scale=c.softmax_scale, see=see)
            dense = self.training and self.dense_warmup  # the warm-up stage: plain MLA below
            if self.training and self.learn_indexer:  # its KL to the main attention: the only loss reaching it
                q_full = torch.cat([torch.einsum("bthd,hdr->bthr", q_nope, w_uk), q_pe], dim=-1).detach()
                self.indexer_loss = sparse.indexer_kl(q_full, kv_pe.detach(), *idx, dense=dense, **kw)
            if not dense:  # latent attention over the chosen rows, whatever attn_impl says (the fast path
                # in prefill, training and decode alike; sparse.dsa_reference is its twin)
                q_full = torch.cat([torch.einsum("bthd,hdr->bthr", q_nope, w_uk), q_pe], dim=-1)  # [B, T, H, r + rd]
                o = torch.einsum("bthr,hvr->bthv", sparse.dsa_attention(q_full, kv_pe, *idx, **kw), w_uv)
                return self.wo(o.reshape(B, T, H * dv))
        if c.attn_impl == "naive":
            kv, k_pe = kv_pe[..., :r], kv_pe[..., r:]  # [B, S, r], [B, S, rd]: every cached key
            k_nope, v = self.wkv_b(kv).view(B, S, H, dn + dv).split([dn, dv], dim=-1)
            k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(B, S, H, dr)], dim=-1)
            o = attend(torch.cat([q_nope, q_pe], dim=-1), k, v, mask, c.softmax_scale)
        else:
            # absorb W_UK into the query and W_UV into the output: attention runs on the r-dim latent,
            # one [r + rd]-wide dot product per cached token (FlashMLA's layout)
            q_lat = torch.bmm(q_nope.permute(2, 0, 1, 3).reshape(H, B * T, dn), w_uk)  # [H, B*T, r]
            q_lat = q_lat.view(H, B, T, r).permute(1, 2, 0, 3)  # [B, T, H, r]
            lora_rows = getattr(self.wkv_b, "active", False)  # rows with their own LoRA on kv_b (lora.MultiLoRA)
            if lora_rows:
                q_lat = q_lat + self.wkv_b.absorbed_q(q_nope)
            o_lat = absorb.latent_attend(torch.cat([q_lat, q_pe], dim=-1), kv_pe, mask, r, c.softmax_scale)
            o = torch.bmm(o_lat.view(B * T, H, r).transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [B*T, H, dv]
            if lora_rows:
                o = o + self.wkv_b.absorbed_o(o_lat, dn).view(B * T, H, dv)
        return self.wo(o.reshape(B, T, H * dv))

    def folded(self, x, rope, mask, cache, w_a, w_q, w_o):
        """The absorbed path on the folded weights (absorb.py; an engine's cache hands them over): three products
        a layer, the same attention."""
        c = self.c
        B, T, _ = x.shape
        H, dr, r = c.n_heads, c.qk_rope_head_dim, c.kv_lora_rank
        if c.q_lora_rank:
            q_a, kv, k_pe = linear(x, w_a).split([c.q_lora_rank, r, dr], dim=-1)
            q = linear(self.q_norm(q_a), w_q)
        else:
            q, kv, k_pe = linear(x, w_a).split([H * (r + dr), r, dr], dim=-1)
        q = q.view(B, T, H, r + dr)  # the absorbed query: latent part, then rope part (in half-split order)
        pe = apply_rope(torch.cat([q[..., r:], k_pe.unsqueeze(2)], dim=2), *rope, interleave=False)
        kv_pe, = cache.update(self.layer_id, torch.cat([self.kv_norm(kv), pe[:, :, H]], dim=-1))  # [B, S, r + rd]
        o_lat = absorb.latent_attend(torch.cat([q[..., :r], pe[:, :, :H]], dim=-1), kv_pe, mask, r, c.softmax_scale)
        return linear(o_lat.view(B, T, H * r), w_o)


class Indexer(nn.Module):
    """DSA's lightning indexer, as transformers' DeepseekV32Indexer: Hi ReLU heads over the compressed query,
    one LayerNorm'd key per token with half-split RoPE on its first rd dims, per-head weights from x.
    Returns q_idx [B, T, Hi, Di], k_idx [B, T, Di], w_idx [B, T, Hi] (the scales folded into w_idx)."""

    def __init__(self, c: Config):
        super().__init__()
        self.c = c
        self.wq_b = Linear(c.q_lora_rank, c.index_n_heads * c.index_head_dim, bias=False)
        self.wk = Linear(c.dim, c.index_head_dim, bias=False)
        self.k_norm = nn.LayerNorm(c.index_head_dim, eps=1e-6)
        self.weights_proj = Linear(c.dim, c.index_n_heads, bias=False)

    def forward(self, x, q_lat, rope):
        c = self.c
        B, T, _ = x.shape
        Hi, Di, rd = c.index_n_heads, c.index_head_dim, c.qk_rope_head_dim
        q = self.wq_b(q_lat).view(B, T, Hi, Di)
        k = self.k_norm(self.wk(x)).unsqueeze(2)  # [B, T, 1, Di]
        q = torch.cat([apply_rope(q[..., :rd], *rope, False), q[..., rd:]], dim=-1)
        k = torch.cat([apply_rope(k[..., :rd], *rope, False), k[..., rd:]], dim=-1).squeeze(2)
        return q, k, self.weights_proj(x).float() * (Hi * Di) ** -0.5


class GQA(nn.Module):
    """Grouped-query attention of the dense students (Qwen2 / Llama / Qwen3, whose q and k heads are each
    RMS-normed before RoPE)."""

    def __init__(self, c: Config, layer_id: int):
        super().__init__()
        self.c, self.layer_id = c, layer_id
        hd = c.dense_head_dim
        self.wq = Linear(c.dim, c.n_heads * hd, bias=c.qkv_bias)
        self.wk = Linear(c.dim, c.kv_heads * hd, bias=c.qkv_bias)
        self.wv = Linear(c.dim, c.kv_heads * hd, bias=c.qkv_bias)
        self.wo = Linear(c.n_heads * hd, c.dim, bias=c.o_bias)
        if c.qk_norm:
            self.q_head_norm, self.k_head_norm = RMSNorm(hd, c.norm_eps), RMSNorm(hd, c.norm_eps)

    def forward(self, x, rope, mask, cache=None):
        c = self.c
        B, T, _ = x.shape
        hd = c.dense_head_dim
        q, k = self.wq(x).view(B, T, c.n_heads, hd), self.wk(x).view(B, T, c.kv_heads, hd)
        if c.qk_norm:
            q, k = self.q_head_norm(q), self.k_head_norm(k)
        q, k = apply_rope(q, *rope, c.rope_interleave), apply_rope(k, *rope, c.rope_interleave)
        v = self.wv(x).view(B, T, c.kv_heads, hd)
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v)  # [B, S, Hkv, hd]
        rep = c.n_heads // c.kv_heads
        # inference: K/V heads not repeated, masked or at a lone sequence's decode step (None, T < S); a whole
        # prompt (None, T == S) goes to SDPA's causal kernel
        if rep > 1 and (mask is not None or T < k.shape[1]) and not torch.is_grad_enabled():
            o = attend_grouped(q, k, v, mask, c.softmax_scale)
        else:
            o = attend(q, k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2), mask, c.softmax_scale)
        return self.wo(o.reshape(B, T, c.n_heads * hd))


class NSA(nn.Module):
    """Native sparse attention (sparse.nsa_attention) on grouped-query heads: RoPE'd q/k, per-head sigmoid gates
    for the compressed / selected / window branches, MLP compressors for keys and values. With model.Cache
    the decode state is the raw K/V heads-first plus the compressed blocks, extended as blocks complete."""

    def __init__(self, c: Config, layer_id: int):
        super().__init__()
        self.c, self.layer_id = c, layer_id
        hd, H, Hkv = c.dense_head_dim, c.n_heads, c.kv_heads
        self.wq = Linear(c.dim, H * hd, bias=False)
        self.wk = Linear(c.dim, Hkv * hd, bias=False)
        self.wv = Linear(c.dim, Hkv * hd, bias=False)
        self.wo = Linear(H * hd, c.dim, bias=False)
        self.gate = Linear(c.dim, H * 3)  # init_weights starts it at the window branch (bias -2, -2, +2)
        self.cmp_k, self.cmp_v = BlockCompressor(c.nsa_block, hd), BlockCompressor(c.nsa_block, hd)

    def forward(self, x, rope, mask, cache=None):
        if hasattr(cache, "split"):  # packed documents (sft.Packed): blocks pool and select within one document
            return cache.merge(self(cache.split(x), tuple(map(cache.split, rope)), None))
        c = self.c
        B, T, _ = x.shape
        hd, H, Hkv = c.dense_head_dim, c.n_heads, c.kv_heads
        q = apply_rope(self.wq(x).view(B, T, H, hd), *rope, c.rope_interleave)
        k = apply_rope(self.wk(x).view(B, T, Hkv, hd), *rope, c.rope_interleave)
        v = self.wv(x).view(B, T, Hkv, hd)
        gates = self.gate(x).view(B, T, H, 3).sigmoid()
        kw = dict(block=c.nsa_block, stride=c.nsa_stride, select=c.nsa_select, top_n=c.nsa_top_n,
                  window=c.nsa_window, scale=c.softmax_scale)
        cmp = (self.cmp_k.weights(), self.cmp_v.weights())
        if cache is None:
            o = sparse.nsa_attention(q, k, v, gates, *cmp, **kw)
        elif hasattr(cache, "layer_state"):
            o = self.decode(q, k, v, gates, cache, kw)
        else:  # the engine's paged batch: rows at their own positions (paged.PagedBatch.nsa)
            o = cache.nsa(self.layer_id, q, k, v, gates, cmp, kw)
        return self.wo(o.reshape(B, T, H * hd))

    def decode(self, q, k, v, gates, cache, kw):
        c = self.c
        B, T, Hkv, hd = k.shape
        st, t0 = cache.layer_state(self.layer_id), cache.length
        if not st:  # raw K/V heads-first in whole selection blocks, compressed blocks as they complete
            L = -(-cache.max_len // c.nsa_select) * c.nsa_select
            N = sparse.n_complete(cache.max_len, c.nsa_block, c.nsa_stride)
            st.update(k=k.new_zeros(B, Hkv, L, hd), v=k.new_zeros(B, Hkv, L, hd), kc=k.new_zeros(B, Hkv, N, hd),
                      vc=k.new_zeros(B, Hkv, N, hd), n=0)
        st["k"][:, :, t0:t0 + T] = k.transpose(1, 2)
        st["v"][:, :, t0:t0 + T] = v.transpose(1, 2)
        n = sparse.n_complete(t0 + T, c.nsa_block, c.nsa_stride)
        if n > st["n"]:
            lo, hi = st["n"] * c.nsa_stride, (n - 1) * c.nsa_stride + c.nsa_block
            for name, cmp in (("k", self.cmp_k), ("v", self.cmp_v)):
                new = sparse.compress(st[name][:, :, lo:hi].transpose(1, 2), cmp.weights(), c.nsa_block, c.nsa_stride)
                st[name + "c"][:, :, st["n"]:n] = new.transpose(1, 2)
            st["n"] = n
        return sparse.nsa_sparse(q, st["k"], st["v"], st["kc"][:, :, :n], st["vc"][:, :, :n], gates, t0, **kw)


class BlockCompressor(nn.Module):
    """NSA's phi: a block of `block` keys (or values) plus a learned intra-block position embedding, flattened,
    through a two-layer MLP to one vector."""

    def __init__(self, block: int, d: int):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(block, d))
        self.w1 = nn.Parameter(torch.empty(block * d, d))
        self.w2 = nn.Parameter(torch.empty(d, d))

    def weights(self) -> sparse.Compressor:
        return sparse.Compressor(self.pos, self.w1, self.w2)


# ---- blocks and the model -----------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, c: Config, layer_id: int):
        super().__init__()
        self.attn_norm = RMSNorm(c.dim, c.norm_eps)
        self.attn = MLA(c, layer_id) if c.is_mla else NSA(c, layer_id) if c.attn_type == "nsa" else GQA(c, layer_id)
        self.ffn_norm = RMSNorm(c.dim, c.norm_eps)
        self.ffn = MoE(c) if c.is_moe_layer(layer_id) else MLP(c.dim, c.inter_dim, c.mlp_bias)

    def forward(self, x, rope, mask, cache=None, last: bool = False):  # last: the FFN of the last position only
        x = x + self.attn(self.attn_norm(x), rope, mask, cache)
        if last:
            x = x[:, -1:]
        keep = getattr(cache, "keep", None)  # [n] flat rows of x whose output is read (GRPO's update: no padding)
        if keep is not None:  # the FFN on those rows only; the others keep the residual (nothing reads them)
            flat = x.reshape(-1, x.shape[-1])
            y = self.ffn(self.ffn_norm(flat.index_select(0, keep)[None]))[0]  # [n, D] (one sequence of n)
            return flat.index_add(0, keep, y.to(flat.dtype)).view(x.shape)
        return x + self.ffn(self.ffn_norm(x))


class MTPLayer(nn.Module):
    """Multi-token prediction module k: h_k = Block(eh_proj([enorm(emb(t_{i+k})); hnorm(h_{k-1})]))."""

    def __init__(self, c: Config, layer_id: int):
        super().__init__()
        self.enorm = RMSNorm(c.dim, c.norm_eps)
        self.hnorm = RMSNorm(c.dim, c.norm_eps)
        self.eh_proj = Linear(2 * c.dim, c.dim, bias=False)
        self.block = Block(c, layer_id)
        self.norm = RMSNorm(c.dim, c.norm_eps)  # shared_head.norm; the head itself is the model's

    def forward(self, h, emb, rope, mask, cache=None, last: bool = False):  # h, emb [B, T, D] -> [B, T | 1, D]
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        return self.norm(self.block(x, rope, mask, cache, last=last))


class Transformer(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.config = c
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.n_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.head = Linear(c.dim, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.head.weight = self.embed.weight
        self.mtp = nn.ModuleList(MTPLayer(c, c.n_layers + k) for k in range(c.n_mtp_layers))
        self.rope = Rope(c)

    def hidden(self, tokens, cache=None):
        """tokens [B, T] -> final-normed hidden states [B, T, D]. A cache (model.Cache or the engine's paged
        batch) says where the new tokens sit (positions, mask), stores their K/V and advances afterwards."""
        pos = positions(tokens, cache, self.config.max_seq_len)
        rope, mask = self.rope(pos), cache.mask(tokens) if cache is not None else None
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, rope, mask, cache)
        if cache is not None:
            cache.advance(tokens.shape[1])
        return self.norm(x)

    def forward(self, tokens: torch.Tensor, cache=None, mtp: bool = False, targets: torch.Tensor | None = None):
        """tokens [B, T] -> logits [B, T, V] of the main head; with mtp=True also the MTP heads' logits. With
        targets [B, T]: (mean cross-entropy, [MTP depth k's against targets[:, k:]]) instead, no logits made
        (loss.head_cross_entropy). Training calls this once, so wrappers such as FSDP see the whole computation."""
        h = self.hidden(tokens, cache)
        xs = self.mtp_hiddens(h, tokens) if mtp else []
        if targets is not None:
            return head_loss(self.head, h, targets), [head_loss(self.head, x, targets[:, k:]) for k, x in
                                                      enumerate(xs, start=1)]
        return (self.head(h), [self.head(x) for x in xs]) if mtp else self.head(h)

    def hidden_state(self, tokens, cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden [B, T, D], the MTP draft's input at the same positions): here the hidden itself."""
        h = self.hidden(tokens, cache)
        return h, h

    def mtp_hidden(self, h: torch.Tensor, tokens: torch.Tensor, cache, k: int = 0, last: bool = False):
        """Incremental MTP module k (0-based; the engine's draft model). h [B, T, D] are the hiddens of module
        k - 1 (k = 0: the main model's) at positions i, tokens [B, T] the tokens at i + k + 1; returns the MTP
        hiddens that predict i + k + 2 [B, T, D], or (last=True: the last module's draft reads no other row)
        only the last position's [B, 1, D]: every row's attention entry is cached, the FFN runs on one row."""
        pos = cache.positions(tokens)
        out = self.mtp[k](h, self.embed(tokens), self.rope(pos), cache.mask(tokens), cache, last=last)
        cache.advance(tokens.shape[1])
        return out

    def mtp_logits(self, h: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
        return [self.head(x) for x in self.mtp_hiddens(h, tokens)]

    def mtp_hiddens(self, h: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Training-time MTP over full sequences. h [B, T, D] = self.hidden(tokens). Depth k (1-based) at
        position i combines h_{k-1}[i] with emb(t[i+k]) and predicts t[i+k+1]: hiddens [B, T-k, D] ([B, 0, D] past
        the sequence: T <= k)."""
        out = []
        for k, layer in enumerate(self.mtp, start=1):
            T = max(h.shape[1] - 1, 0)
            pos = torch.arange(k, k + T, device=h.device).expand(h.shape[0], -1)
            h = layer(h[:, :T], self.embed(tokens[:, k:k + T]), self.rope(pos), None)
            out.append(h)
        return out


def head_loss(head: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of head(h) [..., V] against targets [...], the logits never made whole (an int8 head,
    inference only: its logits in fp32)."""
    if not head.weight.is_floating_point():  # int8.Int8Linear (evaluation of an int8 model)
        return F.cross_entropy(head(h).flatten(0, -2).float(), targets.flatten())
    return head_cross_entropy(h.flatten(0, -2), head.weight, targets.flatten())


def positions(tokens: torch.Tensor, cache, max_seq_len: int) -> torch.Tensor:
    """[B, T] positions of the new tokens (from the cache, else 0..T-1); a clear error past the context."""
    pos = cache.positions(tokens) if cache is not None else \
        torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
    if not torch.compiler.is_compiling():  # (the engine checks before decode; its batch knows the last on the host)
        last = cache.last_position() if hasattr(cache, "last_position") else int(pos.max())
        if last >= max_seq_len:
            raise ValueError(f"sequence of {last + 1} tokens exceeds the model's context of {max_seq_len} "
                             f"(max_position_embeddings)")
    return pos


class Cache:
    """Contiguous per-layer cache for B sequences that advance together. MLA layers store (c_kv, k_pe),
    dense layers (k, v). The engine's paged batch (paged.PagedBatch) offers the same four methods."""

    def __init__(self, max_len: int):
        self.max_len, self.length, self.bufs = max_len, 0, {}

    def positions(self, tokens):  # [B, T] positions of the new tokens
        return torch.arange(self.length, self.length + tokens.shape[1], device=tokens.device).expand(
            tokens.shape[0], -1)

    def mask(self, tokens):  # [T, S] new tokens see the whole cache plus their causal prefix (None: plain causal)
        if not self.length:
            return None
        T = tokens.shape[1]
        return causal(T, self.length + T, tokens.device)

    def update(self, layer_id: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        T = new[0].shape[1]
        if self.length + T > self.max_len:
            raise ValueError(f"cache of {self.max_len} tokens is full")
        if layer_id not in self.bufs:
            self.bufs[layer_id] = [t.new_zeros(t.shape[0], self.max_len, *t.shape[2:]) for t in new]
        end = self.length + T
        for buf, t in zip(self.bufs[layer_id], new):
            buf[:, self.length:end] = t
        return tuple(buf[:, :end] for buf in self.bufs[layer_id])

    def layer_state(self, layer_id: int) -> dict:
        """Free-form per-layer decode state (NSA keeps its own K/V layout and compressed blocks here)."""
        return self.bufs.setdefault(("state", layer_id), {})

    def advance(self, T: int):
        self.length += T


def build_model(c: Config):
    """The model class for a config: Transformer, or v4.V4Transformer for deepseek_v4."""
    if c.arch == "deepseek_v4":
        from .v4 import V4Transformer
        return V4Transformer(c)
    return Transformer(c)


def init_weights(model: Transformer, std: float = 0.02, seed: int | None = None) -> Transformer:
    """Fresh weights: normal(std) matrices, unit norms, zero biases (deterministic under `seed`)."""
    if model.config.arch == "deepseek_v4":
        from .v4 import init_weights as v4_init
        return v4_init(model, std, seed)
    g = torch.Generator().manual_seed(model.config.seed if seed is None else seed)
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name.endswith("attn.gate.weight"):  # NSA: gates start at the sliding window (sigmoid 0.12, 0.12,
                p.zero_()  # 0.88): the compressed/selected branches are noise until their keys mean something, and
            elif name.endswith("attn.gate.bias"):  # with them open from step 0 retrieval tasks never leave chance
                p.copy_(torch.tensor([-2.0, -2.0, 2.0]).repeat(p.numel() // 3))
            elif p.dim() == 1:
                p.fill_(1.0 if "norm" in name else 0.0)
            elif ".cmp_" in name and not name.endswith("pos"):  # NSA compressor MLP: keep the key scale
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model
