"""DeepSeek's sparse attention: NSA and DSA, each as a short dense reference and a fast path that takes the
same arguments (tests assert they agree; bench/sparse.py times both against full attention).

NSA — Native Sparse Attention (Yuan et al., 2025). Three branches per query, mixed by per-head gates:
    o = g_cmp * attn(q, compressed blocks) + g_slc * attn(q, top-n selected blocks) + g_win * attn(q, window)

    nsa_reference(q, k, v, gates, cmp_k, cmp_v, *, block=32, stride=16, select=64, top_n=16, window=512,
                  scale=None) -> o
    nsa_attention(<the same arguments>) -> o

    q      [B, T, Hq, D]   queries of the last T of S positions (prefill: T = S; decode: T = 1)
    k      [B, S, Hkv, D]  keys of all S positions, RoPE applied; Hq % Hkv == 0 (a GQA group of Hq/Hkv heads)
    v      [B, S, Hkv, Dv]
    gates  [B, T, Hq, 3]   branch weights (the model's sigmoid outputs): compressed, selected, window
    cmp_k  Compressor(pos [block, D], w1 [block*D, D], w2 [D, D]):
           phi(x) = silu(flatten(x + pos) @ w1 / sqrt(block)) @ w2
    cmp_v  Compressor(pos [block, Dv], w1 [block*Dv, Dv], w2 [Dv, Dv])
    scale  softmax scale, default D**-0.5
    o      [B, T, Hq, Dv]

  - compressed block i covers tokens [i*stride, i*stride + block); a query at t sees it once complete
    (i*stride + block - 1 <= t). A query that sees no block yet gets zero from this branch.
  - selection block j covers tokens [j*select, (j+1)*select). Its importance for a GQA group is the compressed
    attention probability of every compressed block overlapping it, summed over the group's heads; the group
    attends to the top_n blocks (block 0 and the two local blocks — the one holding t and the one before —
    always among them), tokens after t masked.
  - the window branch sees tokens (t - window, t].

DSA — DeepSeek Sparse Attention (DeepSeek-V3.2): a lightning indexer scores every earlier token,
I[t, s] = sum_h w[t, h] * relu(q_idx[t, h] . k_idx[s]), and MLA attends (in latent space) to the top-k only.

    dsa_reference(q, kv, q_idx, k_idx, w_idx, *, rank, topk=2048, scale=None, see=None) -> o
    dsa_attention(<the same arguments>) -> o

    q      [B, T, H, r + rd]   absorbed MLA queries (q_nope @ W_UK ; q_pe) of the last T of S positions
    kv     [B, S, r + rd]      MLA's latent cache (c_kv ; k_pe); rank = r
    q_idx  [B, T, Hi, Di], k_idx [B, S, Di], w_idx [B, T, Hi]   indexer queries, keys, head weights
    see    [B|1, T, S] bool    keys each query may attend (padding, ragged batches); None = causal
    o      [B, T, H, r]        attention over c_kv; the caller applies W_UV and the output projection
  The indexer is trained by indexer_kl (the KL from the main attention to the indexer's distribution).

In sobre's engine NSA decode reads paged token slots directly (nsa_paged_decode: the window, the chosen blocks
and the compressed blocks the engine keeps; tested equal to nsa_attention through the engine).

The fast paths never build a [T, S] matrix: they run over chunks of queries (compressed scores
[chunk, S/stride], gathered blocks / tokens [chunk, top_n*select | topk]) and, under autograd, recompute each
chunk in the backward pass (activation checkpointing) so memory stays O(chunk * S / stride).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import causal
from .loss import EXP_FLOOR


class Compressor(NamedTuple):
    pos: torch.Tensor  # [block, D] intra-block position embedding
    w1: torch.Tensor  # [block * D, D]
    w2: torch.Tensor  # [D, D]


def compress(x: torch.Tensor, cmp: Compressor, block: int, stride: int) -> torch.Tensor:
    """x [B, S, H, D] -> [B, N, H, D] for the N = (S - block) // stride + 1 complete blocks (0 if S < block)."""
    B, S, H, D = x.shape
    if S < block:  # (empty, but from every parameter: their gradients zeros, not missing, as where blocks complete:
        #   data-parallel ranks and FSDP's reduce-scatter then sum the same parameters)
        return F.silu((x[:, :0, :, None] + cmp.pos).flatten(-2) @ cmp.w1) @ cmp.w2
    blocks = x.unfold(1, block, stride).transpose(-1, -2) + cmp.pos  # [B, N, H, block, D]
    return F.silu(blocks.flatten(-2) @ cmp.w1 * block**-0.5) @ cmp.w2  # the 1/sqrt(block) fan-in multiplier keeps
    # Adam's steps on w1 from swinging the output block-times harder than other layers' (mu-P style)


def n_complete(length: int, block: int, stride: int) -> int:
    """How many compressed blocks the first `length` tokens complete."""
    return (length - block) // stride + 1 if length >= block else 0


def _softmax(scores: torch.Tensor, see: torch.Tensor | None, dim: int = -1) -> torch.Tensor:
    """Softmax over dim of fp32 scores where see is True (None: everywhere); rows that see nothing give zeros
    (no NaN, in the backward pass either)."""
    if see is None:
        return scores.softmax(dim)
    empty = ~see.any(dim, keepdim=True)
    scores = scores.masked_fill(~see, float("-inf")).masked_fill(empty, 0.0)
    return scores.softmax(dim) * ~empty


def _check(q, k, v, gates):
    B, T, Hq, _ = q.shape
    if k.dim() != 4 or v.shape[:3] != k.shape[:3] or k.shape[0] != B or Hq % k.shape[2]:
        raise ValueError(f"nsa: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected q [B, T, Hq, D],"
                         f" k/v [B, S, Hkv, D] with Hq a multiple of Hkv")
    if T > k.shape[1] or gates.shape != (B, T, Hq, 3):
        raise ValueError(f"nsa: {T} queries for {k.shape[1]} keys, gates {tuple(gates.shape)} (want [B, T, Hq, 3])")


# ---- NSA: the reference --------------------------------------------------------------------------------
def _masked_attention(q, k, v, see, scale):
    """q [B, T, Hq, D], k/v [B, N, Hkv, D|Dv], see broadcastable to [B, Hq, T, N] -> o [B, T, Hq, Dv], probs."""
    G = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)
    p = _softmax(torch.einsum("bthd,bnhd->bhtn", q, k).float() * scale, see)
    return torch.einsum("bhtn,bnhd->bthd", p.to(v.dtype), v), p


def nsa_reference(q, k, v, gates, cmp_k: Compressor, cmp_v: Compressor, *, block=32, stride=16, select=64,
                  top_n=16, window=512, scale=None):
    """Dense NSA: every branch is full attention under a boolean mask (O(T*S) memory). See the module doc."""
    _check(q, k, v, gates)
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G, scale, dev = Hq // Hkv, scale or D**-0.5, q.device
    t = torch.arange(S - T, S, device=dev)[:, None]  # [T, 1] query positions
    s = torch.arange(S, device=dev)  # [S] key positions

    def phi(x, cmp):  # one block [B, block, H, D] -> [B, H, D]
        return F.silu((x.transpose(1, 2) + cmp.pos).flatten(-2) @ cmp.w1 * block**-0.5) @ cmp.w2

    n = n_complete(S, block, stride)
    kc = torch.stack([phi(k[:, i * stride:i * stride + block], cmp_k) for i in range(n)], 1) if n else \
        k.new_zeros(B, 0, Hkv, cmp_k.w2.shape[-1])
    vc = torch.stack([phi(v[:, i * stride:i * stride + block], cmp_v) for i in range(n)], 1) if n else \
        v.new_zeros(B, 0, Hkv, cmp_v.w2.shape[-1])
    ends = torch.arange(n, device=dev) * stride + block - 1
    o_cmp, p_cmp = _masked_attention(q, kc, vc, ends <= t, scale)  # p_cmp [B, Hq, T, n]

    ns = -(-S // select)
    j = torch.arange(ns, device=dev)
    starts = torch.arange(n, device=dev)[:, None] * stride
    overlap = (starts < (j + 1) * select) & (starts + block > j * select)  # [n, ns]
    imp = (p_cmp @ overlap.float()).unflatten(1, (Hkv, G)).sum(2)  # [B, Hkv, T, ns]
    cur = t // select
    imp = imp.masked_fill((j == 0) | (j == cur) | (j == cur - 1), float("inf")).masked_fill(j > cur, float("-inf"))
    top = imp.topk(min(top_n, ns), dim=-1)
    chosen = torch.zeros_like(imp, dtype=torch.bool).scatter(-1, top.indices, top.values > float("-inf"))
    see = chosen[..., s // select] & (s <= t)  # [B, Hkv, T, S]
    o_slc, _ = _masked_attention(q, k, v, see.repeat_interleave(G, 1), scale)
    o_win, _ = _masked_attention(q, k, v, (s <= t) & (s > t - window), scale)
    g = gates.unsqueeze(-1)
    return g[..., 0, :] * o_cmp + g[..., 1, :] * o_slc + g[..., 2, :] * o_win


# ---- NSA: the fast path --------------------------------------------------------------------------------
def nsa_attention(q, k, v, gates, cmp_k: Compressor, cmp_v: Compressor, *, block=32, stride=16, select=64,
                  top_n=16, window=512, scale=None):
    """Chunked NSA (same arguments and result as nsa_reference; see the module doc)."""
    _check(q, k, v, gates)
    kc, vc = compress(k, cmp_k, block, stride), compress(v, cmp_v, block, stride)
    return nsa_compressed(q, k, v, kc, vc, gates, block=block, stride=stride, select=select, top_n=top_n,
                          window=window, scale=scale)


def nsa_compressed(q, k, v, kc, vc, gates, *, block, stride, select, top_n, window, scale=None):
    """nsa_attention with the compressed blocks kc/vc [B, N, Hkv, D|Dv] given (the engine keeps them)."""
    S = k.shape[1]
    pad = -S % select  # whole selection blocks, so that they are views of the cache

    def heads_first(x):  # [B, S, H, D] -> [B, H, S + pad, D]
        return F.pad(x, (0, 0, 0, 0, 0, pad)).transpose(1, 2).contiguous()

    return nsa_sparse(q, heads_first(k), heads_first(v), kc.transpose(1, 2), vc.transpose(1, 2), gates,
                      S - q.shape[1], block=block, stride=stride, select=select, top_n=top_n, window=window,
                      scale=scale)


def nsa_sparse(q, k, v, kc, vc, gates, t0: int, *, block, stride, select, top_n, window, scale=None,
               chunk=128, select_chunk=128):
    """NSA on the decode cache's layout: k/v [B, Hkv, L, D|Dv] hold at least t0+T positions (later ones are
    never read; L % select == 0), kc/vc [B, Hkv, N, D|Dv] the compressed blocks so far. q [B, T, Hq, D] and
    gates [B, T, Hq, 3] belong to positions t0 .. t0+T-1. Returns [B, T, Hq, Dv].
    Compressed scores, the window and the block choice run per `chunk` queries, the selected branch per
    `select_chunk` (measured best at 128 both on a 2-core CPU; larger chunks spill the caches)."""
    T, scale = q.shape[1], scale or q.shape[-1] ** -0.5
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, kc, vc, gates))

    def run(fn, *args):
        return checkpoint(fn, *args, use_reentrant=False) if grad else fn(*args)

    fn = partial(_compressed_and_window, block=block, stride=stride, select=select, top_n=top_n, window=window,
                 scale=scale)
    out, idx, ok = zip(*(run(fn, q[:, c0:c0 + chunk], gates[:, c0:c0 + chunk], k, v, kc, vc, t0 + c0)
                         for c0 in range(0, T, chunk)))
    idx, ok = torch.cat(idx, 2), torch.cat(ok, 2)  # [B, Hkv, T, top_n], valid blocks first
    n = int(ok.sum(-1).max()) if ok.numel() else 0  # short contexts have fewer than top_n blocks: drop the padding
    idx, ok = idx[..., :max(n, 1)], ok[..., :max(n, 1)]
    fn = partial(_selected, select=select, scale=scale)
    slc = [run(fn, q[:, c0:c0 + select_chunk], gates[:, c0:c0 + select_chunk, :, 1], k, v,
               idx[:, :, c0:c0 + select_chunk], ok[:, :, c0:c0 + select_chunk], t0 + c0)
           for c0 in range(0, T, select_chunk)]
    return torch.cat(out, 1) + torch.cat(slc, 1)


def nsa_paged_decode(q, gates, k_pool, v_pool, slots, kc, vc, n_cmp, t, *, block, stride, select, top_n, window,
                     scale=None):
    """NSA for one new token per row that reads K/V straight from paged token slots: only the window, the chosen
    blocks and the compressed blocks, O(window + top_n * select + N) per row instead of O(context). q [B, Hq, D],
    gates [B, Hq, 3] at positions t [B]; k_pool [P, Hkv, D], v_pool [P, Hkv, Dv] every token's K/V and
    slots(pos [B, X]) -> their rows [B, X]; kc/vc [B, N, Hkv, D|Dv] compressed blocks, the first n_cmp [B] of each
    row valid. -> [B, Hq, Dv], nsa_attention's output for each row's last query."""
    B, Hq, D = q.shape
    Hkv, dev = k_pool.shape[1], q.device
    qh = (q * (scale or D**-0.5)).view(B, Hkv, Hq // Hkv, D)  # a group's rows, scaled
    heads = torch.arange(Hkv, device=dev)[:, None]

    def attend(k, v, see):  # k/v [B, Hkv, X, D|Dv], see [B, Hkv|1, X] -> [B, Hkv, G, Dv]
        return _softmax((qh @ k.transpose(-1, -2)).float(), see[:, :, None]).to(v.dtype) @ v

    def rows(pos):  # pos [B, Hkv, X] -> each head's K, V there [B, Hkv, X, D|Dv]; positions outside [0, t]
        # (masked anyway) read position 0 or t, which every row holds
        r = slots(torch.minimum(pos.clamp(min=0), t.view(B, 1, 1)).flatten(1)).view(pos.shape) * Hkv + heads
        return k_pool.flatten(0, 1)[r], v_pool.flatten(0, 1)[r]

    see = (torch.arange(kc.shape[1], device=dev) < n_cmp[:, None])[:, None]  # [B, 1, N]
    p_cmp = _softmax((qh @ kc.permute(0, 2, 3, 1)).float(), see[:, :, None])  # [B, Hkv, G, N]
    o_cmp = p_cmp.to(vc.dtype) @ vc.transpose(1, 2)
    with torch.no_grad():
        idx, ok = _choose_blocks(p_cmp.sum(2, keepdim=True), (t // select).view(B, 1, 1, 1),
                                 int(t.max()) // select + 1, block=block, stride=stride, select=select, top_n=top_n)
    pos = (idx[:, :, 0, :, None] * select + torch.arange(select, device=dev)).flatten(2)  # [B, Hkv, n * select]
    o_slc = attend(*rows(pos), ok[:, :, 0].repeat_interleave(select, -1) & (pos <= t.view(B, 1, 1)))
    pos = (t[:, None] - window + 1 + torch.arange(window, device=dev))[:, None].expand(B, Hkv, window)
    o_win = attend(*rows(pos), pos[:, :1] >= 0)
    g = gates.view(B, Hkv, -1, 3)
    return (o_cmp * g[..., :1] + o_slc * g[..., 1:2] + o_win * g[..., 2:]).view(B, Hq, -1)


def _compressed_and_window(q, gates, k, v, kc, vc, t0, *, block, stride, select, top_n, window, scale):
    """The compressed and window branches (gated, [B, C, Hq, Dv]) and the selection: block indices and their
    validity [B, Hkv, C, top_n]."""
    B, C, Hq, D = q.shape
    Hkv, Dv, dev = k.shape[1], v.shape[-1], q.device
    G, last = Hq // Hkv, t0 + C - 1
    t = torch.arange(t0, t0 + C, device=dev)  # [C] query positions
    qh = (q * scale).view(B, C, Hkv, G, D).transpose(1, 2).reshape(B, Hkv, C * G, D)  # a group's rows, scaled

    # compressed branch over the blocks complete by the chunk's last query; only the last few need a mask. Their
    # count rounded up to a multiple of 8 (later blocks masked) where kc has them: an odd count made the matmul
    # 1.6x slower on CPU
    n, n_all = min(-(-n_complete(last + 1, block, stride) // 8) * 8, kc.shape[2]), n_complete(t0 + 1, block, stride)
    sc = (qh @ kc[:, :, :n].transpose(-1, -2)).view(B, Hkv, C, G, n)
    ends = torch.arange(n_all, n, device=dev) * stride + block - 1
    sc[..., n_all:].masked_fill_((ends > t[:, None])[:, None], float("-inf"))
    p_cmp = sc.float().softmax(-1)  # [B, Hkv, C, G, n]
    if t0 < block - 1:  # queries before the first complete block see nothing: zero, not NaN
        p_cmp = torch.where((t >= block - 1)[:, None, None], p_cmp, 0.0)
    o_cmp = p_cmp.to(vc.dtype).flatten(2, 3) @ vc[:, :, :n]  # [B, Hkv, C*G, Dv]

    # block importance -> top-n selection blocks per (query, group)
    with torch.no_grad():
        idx, ok = _choose_blocks(p_cmp.sum(3), (t // select)[:, None], last // select + 1, block=block,
                                 stride=stride, select=select, top_n=top_n)

    # sliding window over (t - window, t]: fused attention under a band mask
    lo = max(0, t0 - window + 1)
    s = torch.arange(lo, last + 1, device=dev)
    band = ((s <= t[:, None]) & (s > t[:, None] - window)).repeat_interleave(G, 0)  # [C*G, keys]
    o_win = F.scaled_dot_product_attention(qh, k[:, :, lo:last + 1], v[:, :, lo:last + 1], scale=1.0,
                                           attn_mask=band if C > 1 else None)  # one query sees all of them

    g = gates.view(B, C, Hkv, G, 3).transpose(1, 2).reshape(B, Hkv, C * G, 1, 3)
    o = o_cmp * g[..., 0] + o_win * g[..., 2]  # [B, Hkv, C*G, Dv]
    return o.view(B, Hkv, C, G, Dv).transpose(1, 2).reshape(B, C, Hq, Dv), idx, ok


def _choose_blocks(p_grp, cur, ns: int, *, block, stride, select, top_n):
    """NSA's selection: p_grp [B, Hkv, C, n] the compressed attention summed over a group's heads, cur the
    selection block of each query (broadcast to [B, Hkv, C, 1]), ns the blocks there are -> the top_n blocks by
    summed probability of the compressed blocks overlapping them, block 0 and the two local ones always among
    them, later ones never: idx, ok [B, Hkv, C, top_n] (valid ones first)."""
    first = torch.arange(p_grp.shape[-1], device=p_grp.device) * stride
    imp = p_grp.new_zeros(*p_grp.shape[:-1], ns)
    for off in range((block - 1) // select + 2):  # each compressed block overlaps at most this many
        j = first // select + off
        hit = (j * select < first + block) & (j < ns)
        imp.scatter_add_(-1, j.clamp(max=ns - 1).expand_as(p_grp), p_grp * hit)
    j = torch.arange(ns, device=p_grp.device)
    imp.masked_fill_((j == 0) | (j == cur) | (j == cur - 1), float("inf"))
    imp.masked_fill_(j > cur, float("-inf"))
    top = imp.topk(min(top_n, ns), dim=-1)  # [B, Hkv, C, n_sel]
    return F.pad(top.indices, (0, top_n - top.indices.shape[-1])), \
        F.pad(top.values > float("-inf"), (0, top_n - top.indices.shape[-1]))


def _selected(q, gate, k, v, idx, ok, t0, *, select, scale, rows=4):
    """The selected branch, gated: q [B, C, Hq, D], gate [B, C, Hq], k/v [B, Hkv, L, D|Dv], idx/ok [B, Hkv, C, n]
    (blocks, valid) -> [B, C, Hq, Dv]. Outside autograd each query's n blocks are copied as whole [select, D] rows,
    `rows` queries at a time into one reused buffer (still in cache when the matmuls read it), and multiplied as
    [n*select, D] x [D, G] so each copied key feeds the group's G heads. Under autograd pairs go block by block
    (_selected_by_block): copying a chunk's keys at once, and the backward of those copies, was 2x slower."""
    B, C, Hq, D = q.shape
    Hkv, n, Dv, dev = k.shape[1], idx.shape[-1], v.shape[-1], q.device
    G, nb, R = Hq // Hkv, k.shape[2] // select, B * Hkv * C
    qh = (q * scale).view(B, C, Hkv, G, D).transpose(1, 2).reshape(R, G, D)
    gid = (torch.arange(B * Hkv, device=dev).view(B, Hkv, 1, 1) * nb + idx).view(R, n)  # [R, n] blocks of the cache
    kb, vb = k.reshape(-1, select, D), v.reshape(-1, select, Dv)  # views of the cache, one block per row
    pos = idx[..., None] * select + torch.arange(select, device=dev)  # [B, Hkv, C, n, select]
    # keys a query may not see: later ones, unused block slots (its own token is always there: no empty rows)
    hide = (pos > torch.arange(t0, t0 + C, device=dev)[:, None, None]) | ~ok[..., None]
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        o = _selected_by_block(qh, kb, vb, gid.flatten(), hide.view(R * n, select))
    else:
        o = _selected_by_query(qh, kb.flatten(1), vb.flatten(1), gid, hide.view(R, n * select, 1), rows)
    return o.view(B, Hkv, C, G, Dv).transpose(1, 2).reshape(B, C, Hq, Dv) * gate[..., None]


def _selected_by_query(q, kb, vb, gid, hide, rows):
    """q [R, G, D] scaled query rows; kb/vb [blocks, select*D|Dv]; gid [R, n] each row's blocks; hide
    [R, n*select, 1] -> [R, G, Dv]."""
    R, D, n = q.shape[0], q.shape[2], gid.shape[1]
    rows = min(rows, R)
    kbuf, vbuf = kb.new_empty(rows * n, kb.shape[1]), vb.new_empty(rows * n, vb.shape[1])
    outs = []
    for a0 in range(0, R, rows):
        m, g = min(rows, R - a0), gid[a0:a0 + rows].flatten()
        ks = torch.index_select(kb, 0, g, out=kbuf[:m * n]).view(m, -1, D)  # [m, n*select, D]
        vs = torch.index_select(vb, 0, g, out=vbuf[:m * n]).view(m, ks.shape[1], -1)
        s = torch.bmm(ks, q[a0:a0 + m].transpose(1, 2)).float()  # [m, n*select, G]
        p = s.masked_fill_(hide[a0:a0 + m], float("-inf")).softmax(1)
        outs.append(torch.bmm(vs.transpose(1, 2), p.to(vs.dtype)).transpose(1, 2))  # [m, G, Dv]
    return torch.cat(outs)


def _selected_by_block(q, kb, vb, gid, hide):
    """q [R, G, D]: R query rows (a GQA group's heads each), n pairs per row; gid [R*n] the key block of each
    pair in kb/vb [blocks, select, D|Dv]; hide [R*n, select] -> [R, G, Dv].
    Pairs sorted by block run as one grouped matmul per projection over the touched blocks (gathering queries
    is 8x less copying than gathering every query's keys). Every pair is exponentiated against its row's max,
    so partial outputs and sums just add up per row (flash attention's merge)."""
    R, G, D = q.shape
    order = gid.argsort(stable=True)
    blocks, counts = gid[order].unique_consecutive(return_counts=True)
    row = order // (gid.numel() // R)  # [P] query row of each sorted pair
    s = grouped_mm(q[row].view(-1, D), kb[blocks].transpose(1, 2), counts * G).float().view(-1, G, kb.shape[1])
    s = s.masked_fill(hide[order, None], float("-inf"))  # [P, G, select]
    with torch.no_grad():
        m = s.new_full((R, G), float("-inf")).scatter_reduce_(0, row[:, None].expand(-1, G), s.amax(-1), "amax")
    e = (s - m[row, :, None]).clamp_(min=EXP_FLOOR).exp_()  # e^-87 where hidden: nothing next to the max's 1
    o = grouped_mm(e.to(vb.dtype).view(-1, kb.shape[1]), vb[blocks], counts * G).view(-1, G * vb.shape[-1])
    out = o.new_zeros(R, o.shape[-1]).index_add(0, row, o).view(R, G, -1)
    total = e.new_zeros(R, G).index_add(0, row, e.sum(-1))
    return (out / total[..., None]).to(vb.dtype)


@torch.compiler.disable  # eager under torch.compile, as experts.dispatch (no fp32 fake _grouped_mm in torch 2.13)
def grouped_mm(a, b, counts):
    """Rows of a [M, K] in consecutive groups of counts[i] rows, each times b[i] [K, N] -> [M, N]."""
    if hasattr(torch, "_grouped_mm") and a.dtype in (torch.float32, torch.bfloat16) and \
            a.shape[-1] * a.element_size() % 16 == 0 and b.shape[-1] * b.element_size() % 16 == 0:
        return torch._grouped_mm(a, b, offs=counts.cumsum(0).to(torch.int32))
    return torch.cat([x @ w for x, w in zip(a.split(counts.tolist()), b.unbind(0))])


# ---- DSA -----------------------------------------------------------------------------------------------
def index_scores(q_idx, k_idx, w_idx):
    """Lightning indexer: q_idx [B, T, Hi, Di], k_idx [B, S, Di], w_idx [B, T, Hi] -> I [B, T, S] (fp32), in tiles
    of keys so each [T*Hi, tile] ReLU block (~2 MB) is summed over heads while still in cache. Exact ties (tokens
    every head's ReLU zeroed) go to the later token: + s * 1e-30 moves no other score (far below an ulp), so top-k
    picks the same tokens in prefill and in decode."""
    B, T, Hi, _ = q_idx.shape
    q, k = q_idx.float().flatten(1, 2), k_idx.float()  # [B, T*Hi, Di], [B, S, Di]
    w = w_idx.float().reshape(B * T, 1, Hi)
    tie = torch.arange(k.shape[1], device=k.device) * 1e-30
    tile, tiles = max(2048, (1 << 19) // (B * T * Hi)), []
    for t0 in range(0, k.shape[1], tile):
        s = (q @ k[:, t0:t0 + tile].transpose(1, 2)).relu_().view(B * T, Hi, -1)  # [B*T, Hi, tile]
        tiles.append(torch.baddbmm(tie[t0:t0 + tile].expand(B * T, 1, -1), w, s))  # the sum over heads as a matmul
    return torch.cat(tiles, -1).view(B, T, -1)


def visible(see, T: int, S: int, device) -> torch.Tensor:
    """[B|1, T, S] bool: which keys each query may see; None means causal, queries at the last T of S positions.
    A model mask [T, S] or [B, 1, T, S] is accepted as is."""
    if see is None:
        return causal(T, S, device)[None]
    return see[:, 0] if see.dim() == 4 else see if see.dim() == 3 else see[None]


def _check_dsa(q, kv, q_idx, k_idx, w_idx, rank):
    B, T = q.shape[:2]
    if kv.dim() != 3 or q.shape[-1] != kv.shape[-1] or not 0 < rank < kv.shape[-1] or T > kv.shape[1]:
        raise ValueError(f"dsa: q {tuple(q.shape)}, kv {tuple(kv.shape)}, rank {rank}: expected q [B, T, H, r+rd], "
                         f"kv [B, S, r+rd] with 0 < rank < r+rd and T <= S")
    if q_idx.shape[:2] != (B, T) or k_idx.shape[:2] != kv.shape[:2] or w_idx.shape != q_idx.shape[:3]:
        raise ValueError(f"dsa: indexer q {tuple(q_idx.shape)}, k {tuple(k_idx.shape)}, w {tuple(w_idx.shape)} "
                         f"do not match q [B, T, ...] and kv [B, S, ...]")


def dsa_reference(q, kv, q_idx, k_idx, w_idx, *, rank: int, topk: int = 2048, scale=None, see=None):
    """Dense DSA: full index scores, top-k as a boolean mask over full latent attention. See the module doc;
    see [B|1, T, S] (optional) says which keys each query may attend (default: causal)."""
    _check_dsa(q, kv, q_idx, k_idx, w_idx, rank)
    p = _softmax(torch.einsum("bthd,bsd->bths", q, kv).float() * (scale or q.shape[-1] ** -0.5),
                 dsa_mask(q_idx, k_idx, w_idx, topk=topk, see=see)[:, :, None])
    return torch.einsum("bths,bsr->bthr", p.to(kv.dtype), kv[..., :rank])


def dsa_mask(q_idx, k_idx, w_idx, *, topk: int, see=None) -> torch.Tensor:
    """[B, T, S] bool: the top-k visible keys of each query by index score (the dense form of the selection)."""
    T, S = q_idx.shape[1], k_idx.shape[1]
    see = visible(see, T, S, q_idx.device)
    scores = index_scores(q_idx, k_idx, w_idx).masked_fill(~see, float("-inf"))
    return see & torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(min(topk, S), -1).indices, True)


def dsa_attention(q, kv, q_idx, k_idx, w_idx, *, rank: int, topk: int = 2048, scale=None, see=None, chunk=None,
                  rows=2):
    """Chunked DSA (same arguments and result as dsa_reference): per chunk of queries, index scores over the
    keys it may see and their top-k token indices, then latent attention over the chosen entries: while the chunk
    sees few keys (<= 3 x topk, where on CPU a fused pass beats gathering), fused SDPA under the selection as a
    mask; past that, over gathered rows, `rows` queries at a time so their copies stay in cache. Under autograd
    each chunk is recomputed in the backward pass and gathered at once (chunk default: 128 there, else 32)."""
    _check_dsa(q, kv, q_idx, k_idx, w_idx, rank)
    T, S = q.shape[1], kv.shape[1]
    grad = torch.is_grad_enabled() and (q.requires_grad or kv.requires_grad)
    chunk = chunk or (128 if grad else 32)
    fn = partial(_dsa_chunk, rank=rank, scale=scale or q.shape[-1] ** -0.5, rows=None if grad else rows)
    outs = []
    for c0 in range(0, T, chunk):
        c1 = min(c0 + chunk, T)
        C = c1 - c0
        if see is None:  # causal: the chunk sees the prefix up to its last query (built below when needed)
            keys, vis = S - T + c1, None
        else:  # up to the last key any query of the chunk sees
            vis = visible(see, T, S, q.device)[:, c0:c1]
            seen = vis.flatten(0, 1).any(0).nonzero()
            keys = int(seen[-1]) + 1 if len(seen) else 1
            vis = vis[..., :keys]
        with torch.no_grad():  # selection is discrete: no gradient flows through the indexer here
            scores = index_scores(q_idx[:, c0:c1], k_idx[:, :keys], w_idx[:, c0:c1])  # [B, C, keys]
            if vis is None:  # only the last C keys are hidden from some query of the chunk
                scores[..., keys - C:].masked_fill_(~causal(C, C, q.device), float("-inf"))
                if keys <= 3 * topk or keys - C + 1 < topk:  # the mask form, or queries that see < topk keys
                    vis = visible(None, C, keys, q.device)
            else:
                scores.masked_fill_(~vis, float("-inf"))
            sel = scores.topk(min(topk, keys), -1, sorted=False).indices  # [B, C, k]
            if keys <= 3 * topk:
                sel = vis & torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, sel, True)  # [B, C, keys] mask
                ok = None
            else:
                sel = sel.sort(-1).values  # rows gathered in memory order
                ok = None if vis is None else vis.expand(len(sel), -1, -1).gather(-1, sel)
                ok = None if ok is None or ok.all() else ok
        dense = sel.dtype == torch.bool
        args = (q[:, c0:c1], kv[:, :keys] if dense else kv, sel, ok)  # (gathering reads rows of the whole kv)
        # under autograd the gathered copies are recomputed in the backward pass; SDPA keeps only its output
        outs.append(checkpoint(fn, *args, use_reentrant=False) if grad and not dense else fn(*args))
    return torch.cat(outs, 1)


def _dsa_chunk(q, kv, sel, ok, *, rank, scale, rows):
    """Latent attention of a chunk of queries q [B, C, H, r + rd] over kv [B, S, r + rd]: densely under the
    boolean mask sel [B, C, S], or over the rows sel [B, C, k] (token indices) picks, where ok [B, C, k]
    (None: all) is True, copying them for `rows` queries at a time into one reused buffer (None: all at once,
    as autograd needs: the backward of each copy adds into a zero tensor of kv's size)."""
    B, C, H, D = q.shape
    if sel.dtype == torch.bool:  # one fused pass; rows that see nothing give zeros, as _softmax does
        o = F.scaled_dot_product_attention(q.transpose(1, 2), kv[:, None], kv[:, None], attn_mask=sel[:, None],
                                           scale=scale, enable_gqa=True).transpose(1, 2)[..., :rank]
        return torch.where(sel.any(-1)[..., None, None], o, 0.0)
    k = sel.shape[-1]
    idx = (sel + torch.arange(B, device=q.device).view(B, 1, 1) * kv.shape[1]).flatten(0, 1)  # [B*C, k] rows of flat
    flat, qs = kv.reshape(-1, D), q.flatten(0, 1) * scale  # [B*keys, D], [B*C, H, D]
    rows = rows or B * C
    buf = kv.new_empty(rows * k, D) if rows < B * C else None
    outs = []
    for a0 in range(0, B * C, rows):
        n = min(rows, B * C - a0)
        g = torch.index_select(flat, 0, idx[a0:a0 + n].flatten(), out=None if buf is None else buf[:n * k])
        g = g.view(n, k, D)  # [n, k, r + rd]
        s = torch.bmm(g, qs[a0:a0 + n].transpose(1, 2)).float()  # [n, k, H]: each gathered row feeds every head
        p = _softmax(s, None if ok is None else ok.flatten(0, 1)[a0:a0 + n, :, None], dim=1)
        outs.append(torch.bmm(g[..., :rank].transpose(1, 2), p.to(g.dtype)).transpose(1, 2))  # [n, H, r]
    return torch.cat(outs).view(B, C, H, rank)


def indexer_kl(q, kv, q_idx, k_idx, w_idx, *, rank: int, topk: int = 2048, scale=None, see=None, dense=False,
               chunk=256):
    """DSA's indexer loss: KL(p || softmax(I)) per query, p = the main attention distribution summed over heads
    and renormalised (a constant target), over every visible token (dense warm-up) or over the indexer's own
    top-k (sparse stage). Mean over queries; the arguments are dsa_reference's. Runs in chunks of queries."""
    B, T, H, _ = q.shape
    S, scale = kv.shape[1], scale or q.shape[-1] ** -0.5
    vis_all, total = visible(see, T, S, q.device), 0.0
    for c0 in range(0, T, chunk):
        c1 = min(c0 + chunk, T)
        keys = S if see is not None else S - T + c1  # causal: only the prefix the chunk can see
        vis = vis_all[:, c0:c1, :keys]
        scores = index_scores(q_idx[:, c0:c1], k_idx[:, :keys], w_idx[:, c0:c1]).masked_fill(~vis, float("-inf"))
        if not dense:
            top = scores.topk(min(topk, keys), -1).indices
            vis = vis & torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
            scores = scores.masked_fill(~vis, float("-inf"))
        with torch.no_grad():
            s = (q[:, c0:c1].flatten(1, 2) @ kv[:, :keys].transpose(1, 2)).view(B, c1 - c0, H, keys)
            p = _softmax(s.float() * scale, vis[:, :, None]).sum(2)
            p = p / p.sum(-1, keepdim=True)
        kl = p * (p.clamp_min(1e-30).log() - scores.log_softmax(-1))
        total = total + kl.masked_fill(~vis, 0.0).sum()
    return total / (B * T)
