"""Routed experts' compute: dispatch (token, expert) pairs to stacked expert weights and back.

`dispatch` sorts the pairs by expert and runs an FFN over the rows; `Groups` decides how those rows meet the
stacked weights [E, out, in]: a loop over the active experts, zero-padded rows and one bmm per matmul,
torch._grouped_mm, or (traced by torch.compile) every row with its own gathered copy of its expert's weights.
`looped_mm` is the reference twin of every layout.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .host import ints
from .linear import dnn, grad_weight, grouped_linear, linear, onednn, windows
from .loss import matmul_dtype


def dispatch(x, w, idx, n_experts: int, ffn, traceable: bool = False, swiglu=None):
    """Grouped dispatch: sort the N*K (token, expert) pairs by expert, ffn(rows, groups) over them (groups: a
    Groups layout), weigh each by its routing weight and sum back per token.
    x [N, D], w/idx [N, K]. traceable=True (ffn takes a Groups): under torch.compile without autograd, when the
    pairs number at most the experts (a decode step of one or a few tokens), each pair multiplies its own
    gathered copy of its expert's weights: static shapes, no host sync, so the step compiles to one graph.
    Otherwise eager (host-side counts). swiglu (w1, w2, w3: ffn is grouped_ffn over them): in Groups' oneDNN
    layout the gather, the weighing and the sum back run inside GroupedSwiGLU, window by window; CPU inference
    of one token skips the sort (one_token); on small experts (small_experts), pairs at most the experts run as
    embedding bags (bagged), more tokens up to EVERY_EXPERT_MACS (fp32) every expert on every token (every_expert);
    past those, where the counts take Groups' padded layout, the pairs go there unsorted (padded)."""
    if traceable and torch.compiler.is_compiling() and not torch.is_grad_enabled() and idx.numel() <= n_experts:
        N, K = idx.shape  # (pairs in token order: nothing to sort)
        out = ffn(x.repeat_interleave(K, dim=0), Groups.gathered(idx.flatten()))  # [N*K, D]
        return (out.view(N, K, -1) * w.unsqueeze(-1)).sum(1).to(x.dtype)
    if swiglu is not None and x.device.type == "cpu" and not torch.is_grad_enabled():
        if (path := inference_path(x, idx, n_experts, *swiglu)) is not None:
            return path(x, w, idx, *swiglu)
        return eager_dispatch(x, w, idx, n_experts, ffn, swiglu, place=True)
    return eager_dispatch(x, w, idx, n_experts, ffn, swiglu)


def inference_path(x, idx, n_experts: int, w1, w2, w3):
    """The function serving these tokens' routed experts in CPU inference (dispatch has checked the device and
    autograd): one_token, bagged or every_expert; None: eager_dispatch (place=True: where the counts take the
    padded layout, `padded`, else sorted)."""
    if ONE_TOKEN and idx.shape[0] == 1:
        return one_token
    if not small_experts(x, w1, w2, w3):
        return None
    if idx.numel() <= BAG_PAIRS * n_experts:
        return bagged
    macs = x.shape[0] * (w1.numel() + w2.numel() + w3.numel())
    return every_expert if x.dtype == torch.float32 and macs <= EVERY_EXPERT_MACS else None


ONE_TOKEN = True  # CPU inference: one token's MoE routed on the host (moe.MoE), unsorted (one_token); False: sorted


def one_token(x, w, idx, w1, w2, w3, shared=None):
    """dispatch of one token without autograd on the CPU (a B=1 decode step): x [1, D]; w / idx [1, K], or the
    token's K routing weights and experts as lists (moe.Gate.one); w1 / w2 / w3 stacked, or as lists of the
    experts' matrices (moe.Experts.rows); shared: a shared expert (a module) whose output joins the sum. Each chosen
    expert's SwiGLU on the row, then the K (+ 1) results weighed (the shared by 1) and summed as one [1, K] x [K, D]
    product in fp32, instead of sorting, counting, gathering and adding back the token's K pairs (~19 ops fewer a
    layer: a B=1 step of bench/engine.py's model 6% faster; bench/moe.py's 1-token row against the sorted loop).
    moe.MoE routes a B=1 step's token on the host and calls it with lists (a B=1 step ~9% faster again, session
    57). Its twin: eager_dispatch (tests/test_model.py)."""
    if isinstance(idx, torch.Tensor):
        w, idx = w[0].tolist(), idx[0].tolist()
    ys = [linear(F.silu(linear(x, w1[e])) * linear(x, w3[e]), w2[e]) for e in idx]  # K x [1, D]
    if shared is not None:
        ys.append(shared(x))
        w = [*w, 1.0]
    return (torch.tensor([w], dtype=torch.float32) @ torch.cat(ys).float()).to(x.dtype)


SMALL_EXPERT_PARAMS = 1 << 21  # CPU inference: small experts, a layer's routed experts holding at most this many
#   parameters (8 MiB in fp32: every_expert reads all of them each step, bagged an expert's again for each of its
#   pairs; session 52 named it EVERY_EXPERT_PARAMS) ...
EVERY_EXPERT_MACS = 50_000_000  # ... every_expert while the tokens x those parameters (its multiply-adds) are at most
#   this many
BAG_PAIRS = 1.0  # small experts: bagged while the (token, expert) pairs are at most this many times the experts


def small_experts(x, w1, w2, w3) -> bool:
    """Whether these are small experts that `bagged` and `every_expert` serve (dispatch has checked the device and
    autograd): at most SMALL_EXPERT_PARAMS, fp32 or bf16 like x, stored as stacked_weight lays them out (their
    products and bags need no copy), plain tensors (not DTensor shards). bench/engine.py's experts: 16 x 3 x 256 x 128
    = 1.6M parameters."""
    return (x.dtype == w1.dtype == w2.dtype == w3.dtype and x.dtype in (torch.float32, torch.bfloat16)
            and w1.numel() + w2.numel() + w3.numel() <= SMALL_EXPERT_PARAMS
            and all(type(t) in (torch.Tensor, nn.Parameter) and t.stride() == (t.shape[1] * t.shape[2], 1, t.shape[1])
                    for t in (w1, w2, w3)))  # [E, out, in] stored [E, in, out] contiguous


def bagged(x, w, idx, w1, w2, w3):
    """Routed experts of a few tokens on small experts without autograd on the CPU, their (token, expert) pairs at
    most the experts (a speculative verify, the MTP layers' catch-up, a decode batch of 2-4 on 16 experts top-4),
    as embedding bags: x @ w1[e]^T is the sum of the rows of w1[e]^T [D, F] (its stored layout) weighed by x's
    values, so every pair's gate and up products are one bag each of one F.embedding_bag over the stacked experts
    viewed as [E * D, F] rows, and each token's down products, weighed by its routing weights and summed over its
    experts, one bag of w2 viewed as [E * F, D]: x [N, D], w / idx [N, K], w1 / w3 [E, F, D], w2 [E, D, F] ->
    [N, D]. Each pair's rows are read once, where every_expert reads all E experts' (the bags run on both cores,
    a loop over the pairs' products on one). bench/engine.py's experts at 3 tokens, in a speculative engine: 302 us
    a layer where every_expert took 350 (the speculative step 5% faster); one token keeps one_token (by bags a
    B=1 step ran 4-8% slower in fp32, with one bag a token or one a pair for the down products; bench/RESULTS.md,
    session 55). Its twin: eager_dispatch (tests/test_model.py)."""
    (N, K), (E, F_, D), dev = idx.shape, w1.shape, x.device
    rows = torch.add(steps(D, 1, dev), idx.reshape(-1, 1), alpha=D).view(-1)  # [N * K * D] rows of w1^T / w3^T
    xs = x.unsqueeze(1).expand(N, K, D).reshape(-1)  # each row's weight: its token's input value
    bags = steps(N * K * D, D, dev)  # one bag a pair
    gate = F.embedding_bag(rows, w1.transpose(1, 2).reshape(E * D, F_), bags, mode="sum", per_sample_weights=xs)
    up = F.embedding_bag(rows, w3.transpose(1, 2).reshape(E * D, F_), bags, mode="sum", per_sample_weights=xs)
    h = F.silu(gate).mul_(up).mul_(w.reshape(-1, 1))  # [N * K, F], each pair's weighed by its routing weight
    rows = torch.add(steps(F_, 1, dev), idx.reshape(-1, 1), alpha=F_).view(-1)  # [N * K * F] rows of w2^T
    return F.embedding_bag(rows, w2.transpose(1, 2).reshape(E * F_, D), steps(N * K * F_, K * F_, dev), mode="sum",
                           per_sample_weights=h.view(-1))  # [N, D]: one bag a token, its K experts' rows


@functools.lru_cache(maxsize=64)
def steps(end: int, step: int, device: torch.device) -> torch.Tensor:
    """torch.arange(0, end, step) on device, made once (bagged's row offsets and bag starts; read only)."""
    return torch.arange(0, end, step, device=device)


def every_expert(x, w, idx, w1, w2, w3):
    """Routed experts of a few tokens on the CPU, every expert on every token: each expert's SwiGLU intermediate of
    each token, weighed by its routing weight (0 where the token did not choose the expert), projected back and
    summed over the experts. x [N, D], w / idx [N, K], w1 / w3 [E, I, D], w2 [E, D, I] (stacked_weight's layout)
    -> [N, D]. Reads all E experts' weights in three streaming bmm's where the sorted dispatch makes three small
    products per active expert plus the sort, gather and add back: a MoE layer of bench/engine.py's model at 2-16
    tokens 0.6-0.8x the time with the weights out of cache (a speculative verify of 3 tokens, decode batches of
    2-31); with layers of more than ~8 MiB of experts reading them all costs more than it saves, and past
    EVERY_EXPERT_MACS the E / K times the multiply-adds do (bench/RESULTS.md, session 52). (An unchosen expert's
    intermediate is weighed by 0, so one that overflowed would reach the sum: in fp32 with finite weights and
    inputs none does.) Its twin: eager_dispatch (tests/test_model.py)."""
    E = w1.shape[0]
    xe = x.expand(E, *x.shape)  # [E, N, D]
    gate, up = torch.bmm(xe, w1.transpose(1, 2)), torch.bmm(xe, w3.transpose(1, 2))  # [E, N, I] each
    weight = x.new_zeros(x.shape[0], E).scatter_(1, idx, w).t()  # [E, N]: 0 where not chosen
    h = F.silu(gate).mul_(up).mul_(weight[:, :, None])  # [E, N, I]
    return torch.bmm(h, w2.transpose(1, 2)).sum(0)  # [E, N, D] summed over the experts (a [N, E * I] x [E * I, D]
    #   mm: 7-14% slower at 2-24 tokens)


@torch.compiler.disable  # eager under torch.compile: host-side counts (torch 2.13 has no fp32 fake _grouped_mm)
def eager_dispatch(x, w, idx, n_experts: int, ffn, swiglu=None, place: bool = False):
    """The sorted dispatch (dispatch's docstring); place=True (CPU inference, swiglu given): where the counts
    take Groups' padded layout, the pairs placed there in token order instead (`padded`)."""
    K = idx.shape[1]
    flat = idx.flatten()
    counts = torch.bincount(flat, minlength=n_experts).tolist()
    groups = Groups(counts, x, swiglu[0]) if swiglu is not None else counts
    if place and groups.mode == "padded":
        return padded(x, w, idx, groups, *swiglu)
    order = flat.argsort(stable=True)  # [N*K] pairs grouped by expert
    token = order // K
    rw = w.flatten().index_select(0, order)  # [N*K] routing weights of the sorted pairs
    if swiglu is not None and groups.mode == "onednn":
        return GroupedSwiGLU.apply(x, *swiglu, counts, token, rw)
    # index_select, not x[token]: its backward is an index_add_ (CPU: 7x faster than indexing's index_put_)
    out = ffn(x.index_select(0, token), groups) * rw.unsqueeze(-1)  # (w fp32: the weighted sum in fp32, rounded once)
    return torch.zeros_like(x, dtype=out.dtype).index_add_(0, token, out).to(x.dtype)


def padded(x, w, idx, g: Groups, w1, w2, w3):
    """eager_dispatch in Groups' padded layout (CPU inference, its mode decided from the counts), without the
    sort: each (token, expert) pair's row in the layout computed in token order (its place among its expert's
    pairs by a cumulative count), the tokens written there, the SwiGLU through the layout, each pair's result read
    back and weighed and summed per token in one [1, K] x [K, D] product a token (in w's dtype, fp32). x [N, D],
    w / idx [N, K] -> [N, D]. The sort, the gather of the sorted rows, the layout's own row list (made on the host)
    and the add back per token cost ~15 ops: the routed experts of 64 tokens on 16 experts 1.00 -> 0.69 ms with
    the weights in cache, bench/moe.py's 64-token MoE layer 1.22 -> 1.07 ms, a decode step of 64 sequences on the
    tiny preset 3.5-5% faster (bench/RESULTS.md, session 56). Its twin: the sorted dispatch through the same
    layout (eager_dispatch; tests/test_model.py)."""
    (N, K), D, flat = idx.shape, x.shape[1], idx.flatten()
    rank = F.one_hot(flat, g.E).cumsum(0).gather(1, flat[:, None])[:, 0].sub_(1)  # [N*K]: 0, 1, ... per expert
    dest = torch.add(rank, flat, alpha=g.C)  # row e * C + rank; past C, the expert's overflow rows
    if g.overflow:
        dest = torch.where(rank < g.C, dest, ints(g.shift, x.device).index_select(0, flat) + rank)
    t = x.new_zeros(g.rows, D)
    t[dest.view(N, K)] = x[:, None].expand(N, K, D)
    out = g.mm(F.silu(g.mm(t, w1)).mul_(g.mm(t, w3)), w2).index_select(0, dest).view(N, K, D)
    return torch.bmm(w.unsqueeze(1), out.to(w.dtype))[:, 0].to(x.dtype)


def grouped_ffn(xs, counts: list[int] | Groups, w1, w2, w3):
    """SwiGLU of rows already sorted by expert: rows [sum(counts), D], counts[e] rows for expert e."""
    g = Groups.of(counts, xs, w1)
    if g.mode == "onednn":
        return GroupedSwiGLU.apply(xs, w1, w2, w3, g.counts)
    t = g.pack(xs)
    return g.unpack(g.mm(F.silu(g.mm(t, w1)) * g.mm(t, w3), w2))


class GroupedSwiGLU(torch.autograd.Function):
    """grouped_ffn in Groups' oneDNN layout (fp32 CPU, rows enough): expert by expert over its window of rows
    (linear.windows), the three products on oneDNN and SwiGLU's elementwise work on the window while it is in
    cache, one result gathered (a cat) instead of three; the backward by hand, alike, the weight gradients over the
    window too, with the other experts' rows of one factor zeroed (a NaN in such a row would reach this expert's
    gradient: it reaches the loss anyway). Layer by layer (grouped_linear's products with autograd's elementwise ops
    between) each of the six full-size results is cut from windows and gathered, and the elementwise ops read
    and write full-size tensors out of cache. Its twin: the looped SwiGLU (tests/test_linear.py).
    Routed (token, rw given: dispatch's pairs): x [N, D] holds the tokens, the rows are x[token], each row's
    SwiGLU is weighed by rw before its last product and the results are added back per token -> [N, D], all
    window by window: no [N*K, D] rows gathered, weighed or summed out of cache (nor their gradients)."""

    @staticmethod
    def forward(ctx, x, w1, w2, w3, counts, token=None, rw=None):  # x [N, D] or rows [R, D]; w1 / w3 [E, I, D]
        routed = token is not None  # w2 [E, D, I]; token / rw [R]
        wins = windows(counts, len(token) if routed else x.shape[0])
        out = torch.zeros_like(x, dtype=w2.dtype) if routed else None
        outs, kept = [], []
        for e, start, m, lo, hi in wins:
            rows = x.index_select(0, token[start:start + m]) if routed else x[start:start + m]
            a, b = dnn(rows, w1[e]), dnn(rows, w3[e])  # [m, I] each
            h = F.silu(a) * b
            y = dnn(h.mul_(rw[start:start + m, None]) if routed else h, w2[e])[lo:hi]
            if routed:
                out.index_add_(0, token[start + lo:start + hi], y)
            else:
                outs.append(y)
            kept += [a, b]
        ctx.save_for_backward(x, w1, w2, w3, token, rw, *kept)
        ctx.wins = wins
        if routed:
            return out
        return torch.cat(outs) if outs else x.new_zeros(0, w2.shape[1])

    @staticmethod
    def backward(ctx, g):  # g like the output
        x, w1, w2, w3, token, rw, *kept = ctx.saved_tensors
        routed = token is not None
        g1, g2, g3 = (torch.zeros_like(w) for w in (w1, w2, w3))  # (in the weights' layout: stacked_weight's or not)
        gx = torch.zeros_like(x) if routed else []
        grw = torch.zeros_like(rw) if routed and ctx.needs_input_grad[6] else None
        for (e, start, m, lo, hi), a, b in zip(ctx.wins, kept[0::2], kept[1::2]):
            pairs = token[start:start + m] if routed else None
            rows = x.index_select(0, pairs) if routed else x[start:start + m]
            gy = g.index_select(0, pairs) if routed else g[start:start + m]
            dh = dnn(gy, w2[e].t())  # [m, I]: d loss / d (SwiGLU, weighed)
            sig = torch.sigmoid(a)
            silu = a * sig
            h = silu * b
            if routed:
                if grw is not None:  # d loss / d rw: the row's unweighed SwiGLU . dh
                    grw[start + lo:start + hi] = (dh[lo:hi] * h[lo:hi]).sum(-1)
                dh.mul_(rw[start:start + m, None])
                h.mul_(rw[start:start + m, None])
            db = dh * silu
            da = dh.mul_(b).mul_(sig * (1 + a * (1 - sig)))  # silu'(a) = sig(a) (1 + a (1 - sig(a)))
            gr = (dnn(da, w1[e].t()) + dnn(db, w3[e].t()))[lo:hi]
            if routed:
                gx.index_add_(0, token[start + lo:start + hi], gr)
            else:
                gx.append(gr)
            for t in (h, da, db):  # the other experts' rows zeroed: the weight gradients sum over the window
                t[:lo], t[hi:] = 0, 0
            g1[e], g3[e], g2[e] = grad_weight(da, rows), grad_weight(db, rows), grad_weight(gy, h)
        if not routed:
            gx = torch.cat(gx) if gx else torch.zeros_like(x)
        return gx, g1, g2, g3, None, None, grw


def stacked_weight(w: torch.Tensor) -> nn.Parameter:
    """Stacked expert weights w [E, out, in] as a Parameter stored [E, in, out]: each expert's matrix transposed
    in memory, so the bmm's of the padded layout read contiguous [in, out] matrices (on CPU a bmm with transposed
    weights ran 1.5-1.8x slower; a MoE layer at 16-64 decode tokens 1.2x faster). torch._grouped_mm and F.linear
    of one expert take either layout alike; loads, `.to` and `clone` keep it (they preserve strides); FSDP2 takes
    contiguous parameters only (parallel.apply_fsdp lays them out plainly: the all-gathered ones are anyway)."""
    return nn.Parameter(w.transpose(1, 2).contiguous().transpose(1, 2))


LOOP_EXPERTS = 0.5  # CPU inference: a loop over the active experts while at most this fraction of them have rows
PAD_SLACK = 16  # CPU inference: experts' rows zero-padded into one bmm while padding adds at most this many rows a
#   expert (E * largest count <= rows + PAD_SLACK * E; in bf16 also up to _grouped_mm's ALIGN_ROWS-aligned rows)
OVERFLOW_ROWS = 32  # padded layout: an expert's rows past the cap C cost its own three matmuls, as much as this many
#   padded rows (3 x ~12 us a call against ~1.2 us a row of the three bmm's, bench/moe.py's shapes)
ALIGN_ROWS = 128  # CPU bf16 _grouped_mm: each expert's rows zero-padded to a multiple of this many


class Groups:
    """How rows sorted by expert (counts[e] rows for expert e) meet the stacked expert weights w [E, out, in].
    torch._grouped_mm runs all experts in one call (CPU and CUDA). On CPU it runs one matmul per expert, empty ones
    included, and is slow at a few rows per expert, so CPU inference instead loops over the active experts when at
    most half have rows (a B=1 decode step, a speculative verify of 2 tokens: the padded bmm reads every expert's
    weights), or holds the rows zero-padded as [E, C, in] (batched decode, short prefills) so each matmul is one bmm
    (2-4x faster with the weights in cache, 1.1-1.4x for a whole MoE layer: `python bench/moe.py`) while the
    padding stays small (the routed experts' dispatch fills it unsorted: `padded`). C is the largest count, or in
    fp32 below oneDNN's rows (decode batches) less where the few experts with more rows take the rest in matmuls
    of their own (padded_rows: the least work counted in rows; a
    skewed 64-token layer 1.27 -> 1.15 ms, GRPO rollouts of 64 x 64 tokens 3% faster; at 512 tokens it would pad
    where oneDNN runs the layer in 0.8x the time); padded while that work is at most rows + PAD_SLACK * E, or in
    bf16 (C the largest count) E * C no more rows than _grouped_mm's aligned layout (below) would multiply (bf16
    rollouts of 64 x 64 tokens: 1.95 -> 1.71 s, paired in a one-off script, where skewed routing had sent their
    decode steps to 128 rows an expert; one layer alone, `bench/moe.py --dtype bfloat16`'s skewed row, the two
    layouts forced are within its noise). (256 x 128 experts,
    their weights stored transposed, stacked_weight: padded / _grouped_mm SwiGLU time 0.70 at 256 rows evenly
    spread, 0.79 with E * C = 1.9 x rows, 1.4 at 3.8 x, 2.1 at 6.3 x; 0.83 at 1024 rows evenly spread: _grouped_mm
    pays ~15 us a matmul call, per expert, that the bmm saves; padding costs compute per row.) Traced by
    torch.compile (Groups.gathered, a decode step of a few tokens): each row with its own gathered copy of its
    expert's weights. fp32 on an AMD CPU with AVX-512 (linear.ONEDNN) from ONEDNN_MACS an expert on average
    (training, long prefills): each expert's rows on oneDNN, in windows of a few sizes (GroupedSwiGLU for the SwiGLU,
    linear.grouped_linear for one product: V4's experts; a MoE layer's forward + backward 1.4x faster than through
    _grouped_mm, training 1.45x -> 1.49-1.58x transformers in bench/train.py; on an Intel CPU _grouped_mm, MKL).
    _grouped_mm in bf16 on CPU (bf16 weights, or autocast, which would leave it in fp32, so the rows and weights are
    cast here) pads each expert's rows to a multiple of ALIGN_ROWS: oneDNN builds a kernel per matmul shape, and the
    row counts change every step (unaligned, a training MoE layer ran 2.5x slower than in fp32). Elementwise work
    between matmuls runs on any layout (padding rows stay zero through SwiGLU). Without _grouped_mm: the loop (under
    autograd over unbound weights: indexing a stacked parameter per expert would make autograd allocate a full-size
    gradient for every expert)."""

    def __init__(self, counts: list[int], xs: torch.Tensor, w: torch.Tensor):
        self.counts, self.E = counts, len(counts)
        grad = torch.is_grad_enabled() and (xs.requires_grad or w.requires_grad)
        cpu_inference = xs.device.type == "cpu" and not grad
        self.cast = matmul_dtype(xs, w)  # autocast's, where it is on (autocast leaves _grouped_mm in fp32)
        self.aligned = xs.device.type == "cpu" and self.cast == torch.bfloat16
        # rows _grouped_mm multiplies per expert: bf16 on CPU pads each expert's to a multiple of ALIGN_ROWS
        rows = [-(-n // ALIGN_ROWS) * ALIGN_ROWS for n in counts] if self.aligned else counts
        dnn_rows = onednn(xs, w, sum(counts) * w.shape[1] * w.shape[2] // max(self.E, 1))  # fp32, rows enough
        if cpu_inference and sum(1 for n in counts if n) <= LOOP_EXPERTS * len(counts):
            self.mode = "loop"
        elif cpu_inference and (C := padded_rows(counts, max(sum(counts) + PAD_SLACK * self.E, sum(rows)),
                                                  overflow=not (self.aligned or dnn_rows))) is not None:
            self.mode, self.C = "padded", C  # expert e's rows past C: its overflow, after the E * C padded rows
            self.overflow, at = [], self.E * C  # (expert, its first layout row, rows)
            for e, n in enumerate(counts):
                if n > C:
                    self.overflow.append((e, at, n - C))
                    at += n - C
            self.rows, self.device = at, xs.device
        elif dnn_rows:
            self.mode = "onednn"  # fp32 CPU, from ONEDNN_MACS an expert on average
        elif hasattr(torch, "_grouped_mm") and xs.dtype in (torch.float32, torch.bfloat16):
            self.mode = "grouped"
            if self.aligned:
                starts = [sum(rows[:e]) for e in range(self.E)]
                self.dest = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, counts)]).to(xs.device)
                counts = rows
            self.offs = ints(counts, xs.device).cumsum(0).to(torch.int32)
        else:
            self.mode = "loop"
        self.unbind = grad

    @functools.cached_property
    def shift(self) -> list[int]:
        """The padded layout with overflow: expert e's row j >= C sits at layout row shift[e] + j (its overflow's
        first row minus C; 0 for the experts that do not overflow)."""
        shift = [0] * self.E
        for e, first, _ in self.overflow:
            shift[e] = first - self.C
        return shift

    @functools.cached_property
    def dest(self) -> torch.Tensor:
        """The padded layout's row of each row sorted by expert: expert e's row j at e * C + j, past C at
        shift[e] + j (made when first packed: `padded` places the pairs without it)."""
        return ints([e * self.C + j if j < self.C else self.shift[e] + j for e, n in enumerate(self.counts)
                     for j in range(n)], self.device)

    @classmethod
    def of(cls, counts: list[int] | Groups, xs: torch.Tensor, w: torch.Tensor) -> Groups:
        return counts if isinstance(counts, Groups) else cls(counts, xs, w)

    @classmethod
    def gathered(cls, experts: torch.Tensor) -> Groups:
        """Each row with its own copy of its expert's weights (experts [R]: the rows' experts, a tensor, rows in
        any order): one bmm over [R, 1, in] rows, static shapes (dispatch under torch.compile)."""
        g = cls.__new__(cls)
        g.mode, g.experts, g.counts, g.unbind = "gathered", experts, None, False
        return g

    def pack(self, xs):  # [sum(counts), in] -> this layout
        if self.mode == "padded":  # [E * C + overflow rows, in]
            return xs.new_zeros(self.rows, xs.shape[1]).index_copy_(0, self.dest, xs)
        if self.mode == "grouped" and self.aligned:
            xs = xs.to(self.cast)
            return xs.new_zeros(int(self.offs[-1]), xs.shape[1]).index_copy(0, self.dest, xs)
        return xs.unsqueeze(1) if self.mode == "gathered" else xs

    def unpack(self, t):  # this layout -> [sum(counts), out]
        if self.mode == "padded" or self.mode == "grouped" and self.aligned:
            return t.index_select(0, self.dest)
        return t.squeeze(1) if self.mode == "gathered" else t

    def mm(self, t, w):  # each expert's rows @ w[e].T, in this layout
        if self.mode == "padded":  # one bmm over the padded rows, one matmul per expert's overflow
            EC = self.E * self.C
            out = t.new_empty(t.shape[0], w.shape[1])
            torch.bmm(t[:EC].view(self.E, self.C, t.shape[1]), w.transpose(1, 2),
                      out=out[:EC].view(self.E, self.C, w.shape[1]))
            for e, start, m in self.overflow:
                torch.mm(t[start:start + m], w[e].t(), out=out[start:start + m])
            return out
        if self.mode == "gathered":  # (gathered from the transposed view: contiguous [R, in, out] copies)
            return torch.bmm(t, w.transpose(1, 2)[self.experts])
        if self.mode == "onednn":
            return grouped_linear(t, w, self.counts)
        if self.mode == "grouped":
            out = torch._grouped_mm(t.to(self.cast), w.to(self.cast).transpose(1, 2), offs=self.offs)
            if out.requires_grad:
                out.register_hook(lambda g: g.contiguous())  # its backward wants a dense gradient
            return out
        return looped_mm(t, w, self.counts, self.unbind)


def padded_rows(counts: list[int], budget: int, overflow: bool = True) -> int | None:
    """The rows C each expert gets in Groups' padded layout: the C of the least work, counted in rows, E * C padded
    rows + each overflowing expert's rows past C + OVERFLOW_ROWS for its own matmuls (overflow=False: C = the
    largest count); None where that work exceeds budget rows."""
    s, E = sorted(counts, reverse=True) or [0], len(counts)
    C, work, above = s[0], E * s[0], 0
    for j in range(1, E if overflow else 1):  # C = s[j]: the j largest experts overflow
        above += s[j - 1]
        w = E * s[j] + above - j * s[j] + OVERFLOW_ROWS * j
        if w < work:
            C, work = s[j], w
    return C if work <= budget else None


def looped_mm(xs, w, counts: list[int], unbind: bool = False):
    """The reference twin of every Groups layout: one matmul per active expert; unbind=True indexes the unbound
    weights (under autograd: no full-size gradient allocated per indexed expert)."""
    ws = w.unbind(0) if unbind else w
    outs, start = [], 0
    for e, n in enumerate(counts):
        if n:
            outs.append(linear(xs[start:start + n], ws[e]))
            start += n
    return torch.cat(outs) if outs else xs.new_zeros(0, w.shape[1])


def per_expert(xs, counts: list[int], ffn):
    """Rows sorted by expert (counts[e] for expert e) through ffn(rows, e) one active expert at a time, back in
    order: the loop of the experts whose weights are kept quantised (fp8, int8), each read for its own rows only."""
    outs, start = [], 0
    for e, n in enumerate(counts):
        if n:
            outs.append(ffn(xs[start:start + n], e))
            start += n
    return torch.cat(outs) if outs else xs[:0]


def expert_load(idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens per expert [E] of the choices idx [N, K] (a fixed-size count: no graph break under compile)."""
    flat = idx.flatten()
    return flat.new_zeros(n_experts).index_add_(0, flat, torch.ones_like(flat))


class RoutedLoad:
    """The MoE layers' `last_load`: tokens per expert [E] of the last forward, counted from its choices `last_idx`
    [N, K] when read (training's balancing and statistics read it; a decode step does not: 4 ops a layer fewer,
    a B=1 step of bench/engine.py's model 1-5% faster in alternating runs)."""

    last_idx: torch.Tensor | list[list[int]] | None = None
    n_experts: int

    @property
    def last_load(self) -> torch.Tensor | None:  # (last_idx: a list where moe.MoE routed one token on the host)
        idx = self.last_idx
        return None if idx is None else expert_load(torch.as_tensor(idx), self.n_experts)
