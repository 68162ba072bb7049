"""Dense attention of the cache-free forwards. Inference (and GPUs) run fused SDPA; CPU training keeps the
softmax instead, while its [B, H, T, S] scores fit a budget.

Why: PyTorch's CPU flash-attention backward is slow. At B=8, H=8, T=256 (the training benchmark) its forward
took 5 ms and its backward 25-35 ms per layer; materialising the scores, four batched matmuls (AMX in bf16) and
the fused softmax backward do forward and backward in 12-14 ms in bf16 and 24 ms in fp32 (against 28-44 ms).
The twin is F.scaled_dot_product_attention (tests/test_attention.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCORES_BUDGET = 1 << 25  # the most score elements (B*H*T*S) a layer may keep for its backward (64 MB in bf16)


def attend(q, k, v, mask, scale):
    """q [B, T, H, dq], k [B, S, H, dq], v [B, S, H, dv]; mask [B|1, 1, T, S] or [T, S] bool (every query sees at
    least one key: causal and document masks keep the diagonal), or None (causal, T == S) -> [B, T, H, dv]."""
    B, T, H, dq = q.shape
    S = k.shape[1]
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if grad and q.device.type == "cpu" and B * H * T * S <= SCORES_BUDGET:
        bias = causal_bias(T, q.device) if mask is None else torch.where(mask, 0.0, float("-inf"))
        return _Softmax.apply(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bias, scale).transpose(1, 2)
    # MLA has dv < dq: V is zero-padded to dq, since the fused (flash) SDPA kernels want one head dim and the
    # fallback materialises the scores (2.3x slower prefill on a 2-core CPU)
    dv = v.size(-1)
    if dv < dq:
        v = F.pad(v, (0, dq - dv))
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, is_causal=mask is None, scale=scale)
    return o.transpose(1, 2)[..., :dv]


def causal_bias(T: int, device) -> torch.Tensor:
    """[T, T]: 0 on and below the diagonal, -inf above."""
    return torch.full((T, T), float("-inf"), device=device).triu_(1)


class _Softmax(torch.autograd.Function):
    """softmax(q k^T * scale + bias) v with the probabilities kept for the backward, in q's dtype (under bf16 the
    scores round to bf16 and the softmax runs in fp32, as transformers' eager attention)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale):  # q/k [B, H, T|S, dq], v [B, H, S, dv], bias [T, S] or [B|1, 1, T, S]
        B, H, T, dq = q.shape
        S, dt = k.shape[2], q.dtype
        with torch.autocast(q.device.type, enabled=False):
            q, k, v = q.reshape(B * H, T, dq), k.to(dt).reshape(B * H, S, dq), v.to(dt).reshape(B * H, S, -1)
            if bias.dim() == 2:  # the bias added inside the matmul (a [T, S] add over the heads cost 2 ms more)
                scores = torch.baddbmm(bias.to(dt), q, k.transpose(1, 2), alpha=scale)
            else:
                scores = torch.add(bias.to(dt), torch.bmm(q, k.transpose(1, 2)).view(B, H, T, S), alpha=scale)
            p = scores.view(B * H, T, S).softmax(-1)
            o = torch.bmm(p, v)  # [B*H, T, dv]
        ctx.save_for_backward(q, k, v, p)
        ctx.scale = scale
        return o.view(B, H, T, -1)

    @staticmethod
    def backward(ctx, do):  # (autograd casts each gradient to its input's dtype)
        q, k, v, p = ctx.saved_tensors
        B, H, T, dv = do.shape
        do = do.to(p.dtype).reshape(B * H, T, dv)
        grad_v = torch.bmm(p.transpose(1, 2), do)
        ds = torch._softmax_backward_data(torch.bmm(do, v.transpose(1, 2)), p, -1, p.dtype)  # [B*H, T, S]
        grad_q = torch.bmm(ds, k).mul_(ctx.scale)
        grad_k = torch.bmm(ds.transpose(1, 2), q).mul_(ctx.scale)
        return grad_q.view(B, H, T, -1), grad_k.view(B, H, -1, k.shape[-1]), grad_v.view(B, H, -1, dv), None, None
