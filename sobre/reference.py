"""Slow, obviously-correct twins of the fast paths. Used by tests and benchmarks only.

The naive MLA path (expand K/V through wkv_b) is the twin of the absorbed one and lives beside it in
model.MLA, switched by Config.attn_impl, as in DeepSeek's reference code.
"""

import torch
import torch.nn.functional as F


def moe_routed(experts, x, w, idx):
    """Per-token loop twin of moe.Experts.forward. x [N, D], w/idx [N, K] -> [N, D] (summed in fp32)."""
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            h = F.silu(experts.w1[e] @ x[t]) * (experts.w3[e] @ x[t])
            y[t] += w[t, j] * (experts.w2[e] @ h)
    return y.to(x.dtype)


def v4_moe(moe, x, w, idx):
    """Per-expert loop twin of v4.MoE's grouped routed experts. x [N, D], w/idx [N, K] -> [N, D]."""
    out = torch.zeros_like(x)
    for e in idx.unique().tolist():
        rows, slot = (idx == e).nonzero(as_tuple=True)
        g, u = F.linear(x[rows], moe.experts.gate_up_proj[e]).chunk(2, dim=-1)
        if moe.c.swiglu_limit:
            g, u = g.clamp(max=moe.c.swiglu_limit), u.clamp(-moe.c.swiglu_limit, moe.c.swiglu_limit)
        y = F.linear(F.silu(g) * u, moe.experts.down_proj[e])
        out.index_add_(0, rows, y * w[rows, slot, None].to(y.dtype))
    return out


def fp8_dequant(w, scale_inv, block=(128, 128)):
    """Twin of fp8.dequantize: every element times the scale of its block, one at a time by blocks."""
    out = torch.empty(w.shape, dtype=torch.float32)
    for bi in range(scale_inv.shape[0]):
        for bj in range(scale_inv.shape[1]):
            rows = slice(bi * block[0], (bi + 1) * block[0])
            cols = slice(bj * block[1], (bj + 1) * block[1])
            out[rows, cols] = w[rows, cols].float() * scale_inv[bi, bj]
    return out


def mtp_loss(model, x, y):
    """Twin of train.losses' MTP term for depth 1, one position at a time: position i of the MTP module sees
    the main model's hidden h[i] and the embedding of the next token x[i + 1], and predicts y[i + 1]."""
    h = model.hidden(x)
    layer, T = model.mtp[0], x.shape[1] - 1
    total = 0.0
    for i in range(T):
        prefix = torch.arange(1, i + 2)[None].expand(x.shape[0], -1)  # positions of the tokens x[1..i+1]
        g = layer(h[:, :i + 1], model.embed(x[:, 1:i + 2]), model.rope(prefix), None)
        total = total + F.cross_entropy(model.head(g[:, -1]), y[:, i + 1], reduction="sum")
    return total / (x.shape[0] * T)
