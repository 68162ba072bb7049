"""Sizes computed from a Config alone (no weights needed): parameters, active parameters per token,
FLOPs per token and KV-cache bytes per token. `sobre info` prints these."""

from __future__ import annotations

from .config import Config


def v4_attn_params(c: Config, kind: str) -> int:
    """One DeepSeek-V4 attention: low-rank q, one K=V head, grouped low-rank output, sinks, + its compressor(s)."""
    D, H, hd, qr = c.dim, c.n_heads, c.head_dim, c.q_lora_rank

    def compressor(rate, d, overlap):  # kv_proj + gate_proj + position_bias + kv_norm
        w = 2 * d if overlap else d
        return 2 * D * w + rate * w + d

    n = D * qr + qr + qr * H * hd + D * hd + hd + H * hd * c.o_lora_rank + c.o_groups * c.o_lora_rank * D + H
    if kind == "csa":
        n += compressor(c.compress_rate_csa, hd, True) + compressor(c.compress_rate_csa, c.index_head_dim, True)
        n += qr * c.index_n_heads * c.index_head_dim + D * c.index_n_heads  # indexer q_b_proj, weights_proj
    if kind == "hca":
        n += compressor(c.compress_rate_hca, hd, False)
    return n


def attn_params(c: Config, layer: int = 0) -> int:
    D, H = c.dim, c.n_heads
    if c.arch == "deepseek_v4":  # an MTP module's layer (layer >= n_layers) is a sliding-window one
        return v4_attn_params(c, c.layer_types[layer] if layer < c.n_layers else "sliding")
    if c.is_mla:
        q = D * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * H * c.qk_head_dim if c.q_lora_rank \
            else D * H * c.qk_head_dim
        kv = D * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank \
            + c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim)
        # DSA's lightning indexer: wq_b, wk, k_norm (LayerNorm), weights_proj
        indexer = c.q_lora_rank * c.index_n_heads * c.index_head_dim + D * c.index_head_dim \
            + 2 * c.index_head_dim + D * c.index_n_heads if c.attn_type == "dsa" else 0
        return q + kv + H * c.v_head_dim * D + indexer
    hd, kvh = c.dense_head_dim, c.kv_heads
    bias = (H + 2 * kvh) * hd if c.qkv_bias else 0
    # NSA: branch gates (with bias) + two block compressors (intra-block positions, two-layer MLP)
    nsa = (D + 1) * H * 3 + 2 * (c.nsa_block * hd + c.nsa_block * hd * hd + hd * hd) if c.attn_type == "nsa" else 0
    norms = 2 * hd if c.qk_norm else 0  # qwen3's per-head q / k RMSNorms
    return D * H * hd + 2 * D * kvh * hd + bias + H * hd * D + (D if c.o_bias else 0) + nsa + norms


def ffn_params(c: Config, layer: int) -> tuple[int, int]:
    """(total, active per token) parameters of one layer's FFN."""
    D = c.dim
    if not c.is_moe_layer(layer):
        n = 3 * D * c.inter_dim + ((2 * c.inter_dim + D) if c.mlp_bias else 0)
        return n, n
    expert = 3 * D * c.moe_inter_dim
    shared = expert * (1 if c.arch == "deepseek_v4" else c.n_shared_experts)  # V4: one shared expert, always
    gate = c.n_routed_experts * D
    return gate + shared + expert * c.n_routed_experts, gate + shared + expert * c.n_activated_experts


def layer_rows(c: Config) -> list[dict]:
    rows = []
    for i in range(c.n_layers + c.n_mtp_layers):
        tot, act = ffn_params(c, i)
        a = attn_params(c, i if c.arch == "deepseek_v4" else min(i, c.n_layers - 1)) + 2 * c.dim
        if c.arch == "deepseek_v4":  # + two mHC maps (fn, base, scale) per layer
            N = c.hc_mult
            a += 2 * ((2 + N) * N * (N * c.dim + 1) + 3)
        extra = 0
        if i >= c.n_layers:  # MTP: enorm, hnorm, norm, eh_proj (V4: e_proj + h_proj, and its own hyper head)
            extra = 3 * c.dim + 2 * c.dim * c.dim
            if c.arch == "deepseek_v4":
                extra += c.hc_mult * (c.hc_mult * c.dim + 1) + 1
        rows.append(dict(layer=i, kind=("mtp " if i >= c.n_layers else "") + ("moe" if c.is_moe_layer(i) else "dense"),
                         attn=a, ffn=tot, params=a + tot + extra, active=a + act + extra))
    return rows


def v4_cache_values(c: Config, ctx: int) -> int:
    """Values a DeepSeek-V4 cache holds at context ctx: every layer's window of K=V rows, CSA layers' compressed
    entries + indexer keys (one per compress_rate_csa tokens), HCA layers' entries (one per compress_rate_hca)."""
    n = 0
    for kind in c.layer_types:
        n += min(ctx, c.sliding_window) * c.head_dim
        if kind == "csa":
            n += ctx // c.compress_rate_csa * (c.head_dim + c.index_head_dim)
        if kind == "hca":
            n += ctx // c.compress_rate_hca * c.head_dim
    return n


def kv_bytes_per_token(c: Config, dtype_bytes: int = 2, ctx: int = 4096) -> dict:
    """Cache bytes per token over all main layers: full K/V (naive) vs what sobre caches (MLA: the latent,
    + DSA's indexer key; NSA: K/V + a compressed K/V pair every nsa_stride tokens)."""
    if c.arch == "deepseek_v4":  # naive: every token's K=V row in every layer; cached: amortised at ctx
        full, latent = c.head_dim, v4_cache_values(c, ctx) / ctx / c.n_layers
    elif c.is_mla:
        full = c.n_heads * (c.qk_head_dim + c.v_head_dim)
        latent = c.kv_lora_rank + c.qk_rope_head_dim + (c.index_head_dim if c.attn_type == "dsa" else 0)
    else:
        full = latent = 2 * c.kv_heads * c.dense_head_dim
        if c.attn_type == "nsa":
            latent = full + full / c.nsa_stride
    return {"naive": full * c.n_layers * dtype_bytes, "latent": latent * c.n_layers * dtype_bytes,
            "naive_values_per_layer": full, "latent_values_per_layer": latent}


def model_stats(c: Config, ctx: int = 4096) -> dict:
    rows = layer_rows(c)
    main = [r for r in rows if r["layer"] < c.n_layers]
    embed = c.vocab_size * c.dim
    head = 0 if c.tie_embeddings else c.vocab_size * c.dim
    top = c.dim + (c.hc_mult * (c.hc_mult * c.dim + 1) + 1 if c.arch == "deepseek_v4" else 0)  # norm, hyper head
    params = embed + head + top + sum(r["params"] for r in main)
    active = embed + head + top + sum(r["active"] for r in main)
    # forward FLOPs: 2 per active matmul weight (the embedding is a lookup) + attention over ctx/2 on average
    qk = c.qk_head_dim if c.is_mla else c.dense_head_dim
    v = c.v_head_dim if c.is_mla else c.dense_head_dim
    if c.arch == "deepseek_v4":
        qk = v = c.head_dim
    keys = ctx // 2  # per query on average; sparse attention reads fewer (plus DSA's indexer over all of them)
    if c.attn_type == "nsa":
        keys = min(keys, c.nsa_window) + min(keys, c.nsa_top_n * c.nsa_select) + keys // c.nsa_stride
    if c.arch == "deepseek_v4":  # per layer: the window + its compressed entries (CSA: the indexer's top-k)
        keys = sum(min(ctx // 2, c.sliding_window) + (min(ctx // 2 // c.compress_rate_csa, c.index_topk) if t == "csa"
                   else ctx // 2 // c.compress_rate_hca if t == "hca" else 0) for t in c.layer_types) / c.n_layers
    attn_flops = 2 * c.n_layers * c.n_heads * (qk + v) * min(keys, c.index_topk if c.attn_type == "dsa" else keys)
    if c.attn_type == "dsa":
        attn_flops += 2 * c.n_layers * c.index_n_heads * c.index_head_dim * ctx // 2
    if c.arch == "deepseek_v4":  # the CSA indexers score every compressed entry
        attn_flops += 2 * c.layer_types.count("csa") * c.index_n_heads * c.index_head_dim * ctx // 2 \
            // c.compress_rate_csa
    return dict(params=params, active_params=active, mtp_params=sum(r["params"] for r in rows[c.n_layers:]),
                flops_per_token=2 * (active - embed) + attn_flops, ctx=ctx,
                kv=kv_bytes_per_token(c, ctx=ctx), layers=rows)
