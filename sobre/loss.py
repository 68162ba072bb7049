"""The LM head's cross-entropy (pretraining, SFT) and per-token log-probs (GRPO) without the [N, V] logits
(as Liger's fused linear cross-entropy).

Rows go through in chunks: each chunk's logits, loss and gradients are computed together in the forward (the
head's three matmuls, nothing recomputed), and the backward only scales the kept gradients. The plain path,
F.cross_entropy(F.linear(h, w).float(), y), materialises the logits, their log-softmax and its gradient, each
[N, V] in fp32 (67 MB apiece at 2048 x 8192, 1.2 GB at 2048 x 151936); the chunks keep none of them, at about
the plain path's speed. A chunk has at least MIN_ROWS rows: each chunk reads the whole [V, D] head and adds into
its fp32 gradient, so a few rows a chunk make a large vocabulary's head memory-bound (Qwen2's 151936 x 896: 6
rows a chunk, as CHUNK_LOGITS alone gave it, took 15.1 s for 256 rows; 256 a chunk 2.0 s, the plain path 2.1 s,
on a 2-core AVX2 EPYC). The twins are the plain paths (tests/test_model.py).
"""

from __future__ import annotations

import torch

from .linear import grad_input, grad_weight_t, linear, onednn

CHUNK_LOGITS = 1 << 21  # logits per chunk (8 MB in fp32): more rows than MIN_ROWS where V < 8192
MIN_ROWS = 256  # rows a chunk at least (V 8192, 2048 rows: 0.39 s at 128 a chunk, 0.27 s at 256, plain 0.28 s)
KEEP_GRADS = 1 << 24  # bf16 dL/dlogits kept for one weight-gradient matmul (32 MB)
EXP_FLOOR = -87.0  # CPU exp of anything below ~-87.3 (a denormal result) or of -inf takes a slow path, 10-150x
#   slower (one-off timing): exponents <= 0 are clamped to it first: e^-87 = 1.6e-38, nothing next to the max's 1


def head_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the head logits h @ weight.T (computed in fp32) against targets.
    h [N, D], weight [V, D], targets [N] (every row has one) -> scalar."""
    return _HeadCE.apply(h, weight, targets, None, 1.0, False)[0]


def head_weighted_logprobs(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor,
                           temperature: float = 1.0, entropy: bool = False, logits: list[torch.Tensor] | None = None,
                           bonus: torch.Tensor | None = None, floors: torch.Tensor | None = None):
    """sum_i coef[i] * log p(targets[i]) under softmax(h @ weight.T / temperature) (fp32), with its gradients made
    in the forward as head_cross_entropy's (three matmuls; head_logprobs' backward recomputes the logits: four),
    for a loss linear in the log-probs with coefficients known beforehand (GRPO's surrogate at ratio 1).
    h [N, D], weight [V, D], targets / coef [N] -> (that sum, the log-probs [N] and the entropies [N] when asked
    (else [0]), these two without gradient). logits: h @ weight.T already computed, as N rows [V] (the rollout
    engine's, of the same weights: update.reuse_logits): the head's forward matmul is skipped, two remain. bonus [N]:
    the sum also adds bonus[i] * H_i, each row's entropy (GRPO's entropy bonus: negative coefficients), its
    gradients made too. floors [N]: each row's softmax over the tokens whose tempered logit is at least its floor
    (and its target) only (Keep Sampling Mask: the tokens its sampling kept)."""
    return _HeadCE.apply(h, weight, targets, -coef, temperature, entropy or bonus is not None, logits,
                         bonus, floors)  # (sum -coef_i * CE_i + bonus_i * H_i)


class _HeadCE(torch.autograd.Function):
    """sum_i row_weights[i] * CE_i (row_weights None: the mean) + bonus[i] * H_i (bonus None: none), the log-probs and
    (entropy) entropies; given_logits (N rows [V], or None): the logits, not computed again."""

    @staticmethod
    def forward(ctx, h, weight, targets, row_weights, temperature, entropy, given_logits=None, bonus=None,
                floors=None):
        N, V = h.shape[0], weight.shape[0]
        if given_logits is not None and len(given_logits) != N:
            raise ValueError(f"{len(given_logits)} logits rows for {N} rows of h")
        step = max(MIN_ROWS, CHUNK_LOGITS // V)
        want_h, want_w = ctx.needs_input_grad[:2]
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        lp = torch.empty(N, dtype=torch.float32, device=h.device)
        ent = torch.empty(N if entropy else 0, dtype=torch.float32, device=h.device)
        mm = matmul_dtype(h, weight)  # the gradients' matmuls run in the forward matmul's dtype
        w, hm = weight.to(mm), h.to(mm)  # cast once, not per chunk
        grads = _Grads(hm, w, want_h, want_w, step, h.dtype)
        for i in range(0, N, step):
            rows = slice(i, i + step)
            yc = targets[rows]
            if given_logits is None:
                logits = linear(hm[rows], w).float()  # [n, V]
            else:  # (stacked: a copy, changed in place below)
                logits = torch.stack(given_logits[rows]).float()
            if temperature != 1:
                logits.div_(temperature)
            p, lp[rows], ents = _softmax_parts(logits, yc, entropy, None if floors is None else floors[rows])
            if entropy:
                ent[rows] = ents
            scale = None if row_weights is None else row_weights[rows].float()
            loss -= lp[rows].sum() if scale is None else (lp[rows] * scale).sum()
            if bonus is not None:
                loss += (ents * bonus[rows].float()).sum()
            if want_h or want_w:  # d(sum_i w_i CE_i)/d(logits_i) = w_i (softmax_i - onehot_i) / temperature
                f = (torch.full_like(yc, 1 / (N * temperature), dtype=p.dtype) if scale is None
                     else scale / temperature)[:, None]
                more = None if bonus is None else _entropy_grad(p, logits, bonus[rows].float() / temperature)
                d = p.mul_(f).scatter_add_(1, yc[:, None], -f)
                grads.add(d if more is None else d.add_(more), rows)
        grad_h, grad_w = grads.done()
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if want_w else None)
        ctx.mark_non_differentiable(lp, ent)
        return (loss / N if row_weights is None else loss), lp, ent

    @staticmethod
    def backward(ctx, grad_out, _lp, _ent):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_out if grad_h is not None else None,
                grad_w * grad_out if grad_w is not None else None, None, None, None, None, None, None, None)


def head_logprobs(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                  entropy: bool = False, entropy_grad: bool = False,
                  floors: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of targets under softmax(h @ weight.T / temperature) (fp32) -> [N], and (entropy=True) each
    row's entropy [N] (a statistic without gradient, or with entropy_grad one). h [N, D], weight [V, D], targets
    [N]. Chunked as head_cross_entropy, but the loss on top is the caller's (GRPO's clipped ratios), so the
    backward recomputes each chunk's logits: four matmuls instead of three, and no [N, V] tensor kept between the
    two passes. floors [N]: as head_weighted_logprobs'."""
    return _HeadLogprobs.apply(h, weight, targets, temperature, entropy or entropy_grad, entropy_grad, floors)


class _HeadLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, temperature, entropy, entropy_grad=False, floors=None):
        N, V = h.shape[0], weight.shape[0]
        step = max(MIN_ROWS, CHUNK_LOGITS // V)
        lp = torch.empty(N, dtype=torch.float32, device=h.device)
        ent = torch.empty(N if entropy else 0, dtype=torch.float32, device=h.device)
        mm = matmul_dtype(h, weight)  # (under autocast bf16: the backward repeats the matmuls so)
        w = weight.to(mm)
        for i in range(0, N, step):
            logits = linear(h[i:i + step].to(mm), w).float().div_(temperature)
            _, lp[i:i + step], ents = _softmax_parts(logits, targets[i:i + step], entropy,
                                                     None if floors is None else floors[i:i + step])
            if entropy:
                ent[i:i + step] = ents
        ctx.save_for_backward(h, weight, targets)
        ctx.temperature, ctx.mm, ctx.step, ctx.entropy_grad, ctx.floors = temperature, mm, step, entropy_grad, floors
        if not entropy_grad:
            ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    def backward(ctx, g, g_ent):  # d lp_i / d logits_i = (onehot(y_i) - softmax_i) / temperature
        h, weight, targets = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[:2]
        w, hm = weight.to(ctx.mm), h.to(ctx.mm)
        grads = _Grads(hm, w, want_h, want_w, ctx.step, h.dtype)
        for i in range(0, h.shape[0], ctx.step):
            gc = g[i:i + ctx.step].float()
            logits = linear(hm[i:i + ctx.step], w).float().div_(ctx.temperature)
            dropped = None if ctx.floors is None else _keep_sampled(logits, ctx.floors[i:i + ctx.step],
                                                                    targets[i:i + ctx.step])
            p = _masked_softmax(logits, dropped)[0]
            more = _entropy_grad(p, logits, g_ent[i:i + ctx.step].float()) if ctx.entropy_grad else None
            d = p.mul_(-gc[:, None])  # -g softmax
            d[torch.arange(len(gc), device=d.device), targets[i:i + ctx.step]] += gc
            grads.add((d if more is None else d.add_(more)).div_(ctx.temperature), slice(i, i + ctx.step))
        grad_h, grad_w = grads.done()
        return grad_h, grad_w.to(weight.dtype) if want_w else None, None, None, None, None, None


def _entropy_grad(p: torch.Tensor, z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """g_i * dH_i / dz_i = -g_i p_i (z_i - sum_j p_ij z_ij) [n, V], each row's entropy H_i of softmax(z_i) (p [n, V]
    that softmax, z the logits it took, clamped as _softmax leaves them: what the clamp moved has p ~ 0), g [n].
    Written into z's memory."""
    return z.sub_(torch.linalg.vecdot(p, z)[:, None]).mul_(p).mul_(-g[:, None])


def _softmax_parts(logits: torch.Tensor, targets: torch.Tensor, entropy: bool, floor: torch.Tensor | None = None):
    """A chunk's logits [n, V] (fp32, clamped in place) -> (softmax [n, V], the targets' log-probs [n], the
    entropies [n] (or None)). The softmax is ATen's row-wise kernel (each row's max, exp and sum while the row is
    in cache); its largest entry is 1 / sum(exp(z - max)), so the log-sum-exp is max - log(that) (>= 1/V: no
    digits lost), with no second exp and no branch on the values (no host sync on a GPU). Five passes over [n, V]
    (max, clamp, softmax, its max, the entropy's dot product) where max, shift, clamp, exp, sum and the entropy's
    product and sum took seven. floor [n]: _keep_sampled first."""
    zy = logits.gather(1, targets[:, None])[:, 0]  # (before the clamp: a target's log-prob may lie below it)
    p, m = _masked_softmax(logits, None if floor is None else _keep_sampled(logits, floor, targets))
    lse = m - p.amax(-1).log()
    ent = lse - torch.linalg.vecdot(p, logits) if entropy else None  # H = lse - sum(softmax * z)
    return p, zy - lse, ent


def _keep_sampled(logits: torch.Tensor, floor: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Keep Sampling Mask: each row of logits [n, V] (tempered) below its floor [n] set to -inf, in place, but its
    target's (which its sampling kept: a recomputed logit may round under the floor) -> those dropped [n, V]. The
    softmax's clamp lifts them to the row's max + EXP_FLOOR; their probability is then set to 0 (_masked_softmax)."""
    dropped = (logits < floor.to(logits.dtype)[:, None]).scatter_(1, targets[:, None], False)
    logits.masked_fill_(dropped, float("-inf"))
    return dropped


def _masked_softmax(logits: torch.Tensor, dropped: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """_softmax, the dropped tokens' probabilities exactly 0: their e^-87 shares, scaled by a loss's coefficients,
    turn denormal, and the gradients' products over denormals ran 18x slower (a GRPO update 11 s, not 0.6)."""
    p, m = _softmax(logits)
    return (p, m) if dropped is None else (p.masked_fill_(dropped, 0.0), m)


def _softmax(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(logits) [n, V], each row's max [n]), the logits [n, V] first clamped in place to at least their
    row's max + EXP_FLOOR (no exponent in exp's slow range; what it drops is below e^-87 of the max)."""
    m = logits.amax(-1, keepdim=True)
    return torch.softmax(logits.clamp_(min=m + EXP_FLOOR), -1), m[:, 0]


def matmul_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype F.linear(h, weight) computes in: autocast's, where it is on for their device."""
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(h.dtype, weight.dtype)


class _Grads:
    """grad_h's rows (in grad_dtype, h's own) and grad_w (fp32) from each chunk's dL/dlogits d [n, V] (fp32),
    given in row order (h [N, D] and w [V, D] already in the matmuls' dtype; a None gradient is not wanted).
    fp32: grad_w accumulates in place, chunk by chunk. bf16: the d's are kept, cast (up to KEEP_GRADS), for two
    matmuls over all their rows (AMX runs a few large ones faster than many small; a [V, D] product per chunk,
    cast to fp32 and added, cost more than the products)."""

    def __init__(self, h, w, want_h: bool, want_w: bool, step: int, grad_dtype: torch.dtype):
        self.h, self.w, self.done_rows = h, w, 0
        self.grad_h = torch.empty_like(h, dtype=grad_dtype) if want_h else None
        # fp32 on oneDNN (AMD CPUs with AVX-512: linear.ONEDNN): grad_w accumulates transposed, [D, V], the layout
        # oneDNN writes (linear.grad_weight_t), turned once in done(); elsewhere [V, D] with addmm_, no second copy
        self.transposed = want_w and onednn(h, w)
        shape = w.shape[::-1] if self.transposed else w.shape
        self.grad_w = torch.zeros(shape, dtype=torch.float32, device=w.device) if want_w else None
        keep = want_w and w.dtype != torch.float32
        rows = min(h.shape[0], max(step, KEEP_GRADS // w.shape[0]))
        self.kept = torch.empty(rows, w.shape[0], dtype=w.dtype, device=w.device) if keep else None
        self.n = 0  # rows in kept

    def add(self, d, rows: slice):
        if self.kept is not None:  # both gradients when the kept rows are flushed
            if self.n + len(d) > len(self.kept):
                self._flush()
            self.kept[self.n:self.n + len(d)].copy_(d)  # cast where it is kept
            self.n += len(d)
            return
        d = d.to(self.w.dtype)
        if self.grad_h is not None:
            self.grad_h[rows] = grad_input(d, self.w).to(self.grad_h.dtype)
        if self.transposed:
            grad_weight_t(d, self.h[rows], acc=self.grad_w)
        elif self.grad_w is not None:
            self.grad_w.addmm_(d.t(), self.h[rows])

    def _flush(self):
        rows, d = slice(self.done_rows, self.done_rows + self.n), self.kept[:self.n]
        if self.grad_h is not None:
            self.grad_h[rows] = (d @ self.w).to(self.grad_h.dtype)
        self.grad_w += (d.t() @ self.h[rows]).float()
        self.done_rows, self.n = self.done_rows + self.n, 0

    def done(self):
        if self.n:
            self._flush()
        return self.grad_h, self.grad_w.t().contiguous() if self.transposed else self.grad_w
