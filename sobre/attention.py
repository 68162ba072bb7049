"""Dense attention of the cache-free forwards. Inference (and GPUs) run fused SDPA; CPU training keeps the
softmax instead, while its [B, H, T, S] scores fit a budget.

Why: PyTorch's CPU flash-attention backward is slow. At B=8, H=8, T=256 (the training benchmark) its forward
took 5 ms and its backward 25-35 ms per layer; materialising the scores, four batched matmuls (AMX in bf16) and
the fused softmax backward do forward and backward in 12-14 ms in bf16 and 24 ms in fp32 (against 28-44 ms).
In fp32 the queries go in blocks of CAUSAL_BLOCK, each against the keys up to its last query's own (every mask
here is causal: what lies above the diagonal is never seen, checked): at T = 256 a quarter of the scores is never
made (forward + backward per layer 35 -> 25 ms). bf16 keeps one block: oneDNN's bf16 kernels ran the split shapes
no faster, and the split gradients of k and v would round once per block.
The twin is F.scaled_dot_product_attention (tests/test_attention.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCORES_BUDGET = 1 << 25  # the most score elements (B*H*T*S) a layer may keep for its backward (64 MB in bf16)
CAUSAL_BLOCK = 128  # fp32: queries a block (64 ran alike at T = 256)


def attend(q, k, v, mask, scale, every_key: bool = False):
    """q [B, T, H, dq], k [B, S, H, dq], v [B, S, H, dv]; mask [B|1, 1, T, S] or [T, S] bool (every query sees at
    least one key: causal and document masks keep the diagonal), or None (causal, the queries at the last T of the
    S positions: one query sees every key; every_key=True: every query does) -> [B, T, H, dv]."""
    B, T, H, dq = q.shape
    S = k.shape[1]
    if mask is None and 1 < T != S and not every_key:  # (one query needs none)
        mask = causal(T, S, q.device)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if grad and q.device.type == "cpu" and B * H * T * S <= SCORES_BUDGET and not every_key:
        # (mask None here: T == S, or one query, whose [1, 1] zero bias broadcasts over the keys)
        bias = causal_bias(T, q.device) if mask is None else torch.where(mask, 0.0, float("-inf"))
        return _Softmax.apply(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bias, scale).transpose(1, 2)
    # MLA has dv < dq: V is zero-padded to dq, since the fused (flash) SDPA kernels want one head dim and the
    # fallback materialises the scores (2.3x slower prefill on a 2-core CPU)
    dv = v.size(-1)
    if dv < dq:
        v = F.pad(v, (0, dq - dv))
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, is_causal=mask is None and T > 1 and not every_key,
                                       scale=scale)
    return o.transpose(1, 2)[..., :dv]


def attend_grouped(q, k, v, mask, scale):
    """attend() for grouped-query heads without repeating K/V per query head: q [B, T, H, d], k/v [B, S, Hkv, d]
    (H = G * Hkv, head h reads KV head h // G), mask as attend's. Each KV head's G query heads go in
    as G * T query rows, the mask repeated G times. At decode (B=16, 14 / 2 heads, 134 keys) one layer took 0.17
    ms against 1.33 ms for repeat_interleave + SDPA (0.32 ms with SDPA's enable_gqa); at 1024 keys 1.3 vs 44 ms.
    The twin is repeat_interleave + attend (tests/test_attention.py)."""
    B, T, H, d = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    q = q.view(B, T, Hkv, G, d).permute(0, 3, 1, 2, 4).reshape(B, G * T, Hkv, d)  # rows (g, t)
    if mask is None and T > 1:  # (the G * T rows are not in causal order: the mask is made whole)
        mask = causal(T, k.shape[1], q.device)
    if mask is not None:
        mask = (mask if mask.dim() == 4 else mask[None, None]).repeat(1, 1, G, 1)  # [B|1, 1, G*T, S]
    o = attend(q, k, v, mask, scale, every_key=mask is None)  # [B, G*T, Hkv, dv]
    return o.view(B, G, T, Hkv, -1).permute(0, 2, 3, 1, 4).reshape(B, T, H, -1)


def causal(T: int, S: int, device) -> torch.Tensor:
    """[T, S] bool: queries at the last T of S positions see the keys up to their own (what a mask of None means)."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)


def causal_bias(T: int, device) -> torch.Tensor:
    """[T, T]: 0 on and below the diagonal, -inf above."""
    return torch.full((T, T), float("-inf"), device=device).triu_(1)


class _Softmax(torch.autograd.Function):
    """softmax(q k^T * scale + bias) v with the probabilities kept for the backward, in q's dtype (under bf16 the
    scores round to bf16 and the softmax runs in fp32, as transformers' eager attention). Query rows [s, e) see
    keys [0, e + S - T) at most: blocks of rows skip the keys no row of theirs sees."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale):  # q/k [B, H, T|S, dq], v [B, H, S, dv], bias [T, S] or [B|1, 1, T, S]
        B, H, T, dq = q.shape
        S, dt = k.shape[2], q.dtype
        blocks = _blocks(bias, T, S, dt)
        with torch.autocast(q.device.type, enabled=False):
            q, k, v = q.reshape(B * H, T, dq), k.to(dt).reshape(B * H, S, dq), v.to(dt).reshape(B * H, S, -1)
            bias, ps, os = bias.to(dt), [], []
            for s, e, ke in blocks:
                if bias.dim() == 2:  # the bias added inside the matmul (a [T, S] add over the heads cost 2 ms more)
                    scores = torch.baddbmm(bias[s:e, :ke], q[:, s:e], k[:, :ke].transpose(1, 2), alpha=scale)
                else:
                    scores = torch.add(bias[..., s:e, :ke], torch.bmm(q[:, s:e], k[:, :ke].transpose(1, 2))
                                       .view(B, H, e - s, ke), alpha=scale)
                ps.append(scores.view(B * H, e - s, ke).softmax(-1))
                os.append(torch.bmm(ps[-1], v[:, :ke]))  # [B*H, e - s, dv]
        ctx.save_for_backward(q, k, v, *ps)
        ctx.scale, ctx.blocks = scale, blocks
        return (os[0] if len(os) == 1 else torch.cat(os, 1)).view(B, H, T, -1)

    @staticmethod
    def backward(ctx, do):  # (autograd casts each gradient to its input's dtype)
        q, k, v, *ps = ctx.saved_tensors
        B, H, T, dv = do.shape
        do = do.to(ps[0].dtype).reshape(B * H, T, dv)
        grad_q, grad_k, grad_v = [], None, None
        for (s, e, ke), p in reversed(list(zip(ctx.blocks, ps))):  # the last block sees every key: it sets them
            d = do[:, s:e]
            ds = torch._softmax_backward_data(torch.bmm(d, v[:, :ke].transpose(1, 2)), p, -1, p.dtype)
            grad_q.append(torch.bmm(ds, k[:, :ke]))
            if grad_k is None:
                grad_v, grad_k = torch.bmm(p.transpose(1, 2), d), torch.bmm(ds.transpose(1, 2), q[:, s:e])
            else:
                grad_v[:, :ke].baddbmm_(p.transpose(1, 2), d)
                grad_k[:, :ke].baddbmm_(ds.transpose(1, 2), q[:, s:e])
        grad_q = grad_q[0] if len(grad_q) == 1 else torch.cat(grad_q[::-1], 1)
        return (grad_q.mul_(ctx.scale).view(B, H, T, -1), grad_k.mul_(ctx.scale).view(B, H, -1, k.shape[-1]),
                grad_v.view(B, H, -1, dv), None, None)


def _blocks(bias: torch.Tensor, T: int, S: int, dtype: torch.dtype) -> list[tuple[int, int, int]]:
    """(first row, end row, end key) of each block of queries, a block's keys ending after its last query's causal
    position (S - T + row). One block but in fp32, or where the bias lets a query see a key past its causal
    position (no mask of sobre's does: checked, not assumed)."""
    blocks = [(s, min(s + CAUSAL_BLOCK, T), min(S, S - T + s + CAUSAL_BLOCK)) for s in range(0, T, CAUSAL_BLOCK)]
    if dtype != torch.float32 or len(blocks) == 1 or \
            not all(bool(bias[..., s:e, ke:].isneginf().all()) for s, e, ke in blocks):
        return [(0, T, S)]
    return blocks
