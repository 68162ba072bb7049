"""The LM head's cross-entropy without the [N, V] logits (as Liger's fused linear cross-entropy).

Rows go through in chunks small enough for the CPU's caches: each chunk's logits, loss and gradients are
computed together in the forward (the head's three matmuls, nothing recomputed), and the backward only scales
the kept gradients. The plain path, F.cross_entropy(F.linear(h, w).float(), y), materialises the logits, their
log-softmax and its gradient, each [N, V] in fp32 (67 MB apiece at 2048 x 8192): on a 2-core CPU its
elementwise passes cost about as much as the head's matmuls. Its twin is that plain path (tests/test_model.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_LOGITS = 1 << 20  # logits per chunk (4 MB in fp32)


def head_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the head logits h @ weight.T (computed in fp32) against targets.
    h [N, D], weight [V, D], targets [N] (every row has one) -> scalar."""
    return _HeadCE.apply(h, weight, targets)


class _HeadCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets):
        N, V = h.shape[0], weight.shape[0]
        step = max(1, CHUNK_LOGITS // V)
        want_h, want_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, N, step):
            hc, yc = h[i:i + step], targets[i:i + step]
            out = F.linear(hc, weight)  # [n, V] (under autocast a bf16 matmul, as in the plain path)
            mm, logits = out.dtype, out.float()  # the gradients' matmuls run in the forward matmul's dtype
            lse = logits.logsumexp(-1)
            loss += (lse - logits.gather(1, yc[:, None])[:, 0]).sum()
            if want_h or want_w:  # d(mean CE)/d(logits) = (softmax - onehot) / N
                g = logits.sub_(lse[:, None]).exp_()
                g[torch.arange(len(yc), device=g.device), yc] -= 1
                g = g.div_(N).to(mm)
                if want_h:
                    grad_h[i:i + step] = (g @ weight.to(mm)).to(h.dtype)
                if want_w and mm == grad_w.dtype:
                    grad_w.addmm_(g.t(), hc)  # (accumulated in place: no [V, D] temporary per chunk)
                elif want_w:
                    grad_w += (g.t() @ hc.to(mm)).float()
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if want_w else None)
        return loss / N

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_out if grad_h is not None else None,
                grad_w * grad_out if grad_w is not None else None, None)
