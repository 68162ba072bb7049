"""Decode steps as straight-line tensor code: the engine's fast path on the CPU for a few sequences' plain steps
(B <= MAX_SEQS), the speculative verify of a few (MAX_TOKENS rows) and a lone sequence's MTP drafts.

One token through a small model is overhead-bound: a MoE layer of bench/engine.py's model runs 95 tensor ops
behind ~15 nn.Module calls, and a copy of the model narrowed to hidden 32 takes most of the full width's step.
DecodePlan runs the same step (DeepSeek-V2/V3-style models: MLA whose projections fold, MoE or dense FFNs, fp32 on
the CPU, no autograd) on weights prepared once, with fewer ops:
- MLA folded as absorb.py folds it, attn_norm's and q_norm's scales folded into W_a's and W_q's columns and the
  softmax scale into W_q's rows: a norm is x * rsqrt(mean(x^2) + eps) before its product;
- rope as one product with a [rd, rd] rotation made once a step for every layer (q's heads and k in one);
- the new latent row written into the pool in place, attention over the sequence's rows as two products (a slice
  of the pool where its blocks run in order, else its blocks gathered);
- the residual added by the output products (addmm), the shared expert's and each routed expert's down product
  accumulated with its routing weight (addmm's alpha), where the module path concatenates the K + 1 outputs and
  weighs them in a [1, K + 1] x [K + 1, D] product. Routing is moe.Gate.one's (on the host).
A MoE layer of one token takes 72 ops. bench/engine.py's model at B=1: a step 1.4x faster than the module path on
a 2-core AVX2 EPYC (bench/RESULTS.md, session 59). Several rows (at most MAX_TOKENS: a few sequences' tokens, a
speculative verify's 1 + drafts tokens of one, an MTP layer catching up on the accepted ones) take the same code
with a rotation per row (one batched product), each sequence's rows against its own keys (a causal mask over a
sequence's new rows), the rows' new latents written by slot, and the MoE's rows routed on the host (Gate.rows) and
run as MoE.forward runs them (experts.bagged); an MTP layer's enorm and hnorm scales are folded into its eh_proj.
B = 2 / 4 / 8 sequences: a step 1.28x / 1.18x / 1.07x the module path's (session 60). The sum orders differ from
the module path's: equal to fp32 rounding, not bit for bit. Its twin: the module path (Transformer.hidden /
mtp_hidden over a paged.PagedBatch), tests/test_plan.py.

The prepared weights are checked at every step against what they were made from (each module read, each weight's
address and version counter): a replaced module (add_lora, int8), a load into new memory or an in-place edit makes
the plan prepare them again, or stand down (DecodePlan.prepare -> None) where the model no longer qualifies.
"""

from __future__ import annotations

import contextlib
import operator
from itertools import chain

import torch
import torch.nn.functional as F
from torch import nn

from . import absorb
from .linear import Linear
from .model import MLA, Block, MTPLayer, RMSNorm, Transformer, inverse_rms
from .moe import MLP, Experts, Gate, MoE

VERSION = operator.attrgetter("_version")
ON = True  # a few sequences' decode steps and speculative verifies, a lone one's MTP drafts through DecodePlan
MAX_TOKENS = 16  # a planned call takes at most this many tokens (a speculative verify, an MTP layer's catch-up)
MAX_SEQS = 8  # ... and a decode step at most this many sequences (B = 2 / 4 / 8: 1.28x / 1.18x / 1.07x the modules)


def unsupported(model: nn.Module) -> str | None:
    """Why DecodePlan cannot run this model (None: it can)."""
    c = getattr(model, "config", None)
    p = next(model.parameters(), None)
    if type(model) is not Transformer or p is None:
        return "not a sobre.Transformer (DeepSeek-V4 has its own step)"
    if not c.is_mla or c.attn_type != "full" or not absorb.foldable(c):
        return "the plan runs MLA with full attention whose projections fold (absorb.foldable)"
    if p.device.type != "cpu" or p.dtype != torch.float32:
        return "the plan runs fp32 on the CPU"
    for layer in model.layers:
        if why := unsupported_block(layer):
            return why
    return None


def unsupported_block(layer: nn.Module) -> str | None:
    attn, ffn = layer._modules.get("attn"), layer._modules.get("ffn")
    if type(layer) is not Block or type(attn) is not MLA or type(layer.attn_norm) is not RMSNorm \
            or type(layer.ffn_norm) is not RMSNorm or type(attn.kv_norm) is not RMSNorm \
            or attn.c.q_lora_rank and type(attn.q_norm) is not RMSNorm \
            or any(type(m) is not Linear for n in absorb.PROJECTIONS[bool(attn.c.q_lora_rank)]
                   if (m := attn._modules[n]) is not None):
        return "a layer whose modules are not plain (LoRA, int8, FP8 or another stand-in)"
    if type(ffn) is MoE:
        if type(ffn.gate) is not Gate or type(ffn.experts) is not Experts or ffn.experts.rows() is None \
                or ffn.shared is not None and plain_mlp(ffn.shared) is None:
            return "a MoE layer whose modules are not plain"
    elif plain_mlp(ffn) is None:
        return "an FFN that is not a plain MLP without bias"
    return None


def unsupported_mtp(mtp: nn.Module) -> str | None:
    """Why DecodePlan.mtp cannot run this MTP layer (None: it can)."""
    if type(mtp) is not MTPLayer or any(type(n) is not RMSNorm for n in (mtp.enorm, mtp.hnorm, mtp.norm)) \
            or type(mtp.eh_proj) is not Linear or mtp.eh_proj.bias is not None:
        return "an MTP layer whose modules are not plain"
    return unsupported_block(mtp.block)


def plain_mlp(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """An MLP's (w1^T, w3^T, w2^T) [D, I], [D, I], [I, D] as views, or None where it is not plain."""
    if type(m) is not MLP or any(type(lin) is not Linear or lin.bias is not None for lin in (m.w1, m.w2, m.w3)):
        return None
    return m.w1.weight.t(), m.w3.weight.t(), m.w2.weight.t()


class DecodePlan:
    """Steps over an engine's pool (module docstring). plan.batch(seqs, tokens) -> the final hiddens [B, D] of one
    token of each sequence at its length (normed: the head's input); plan.verify(seqs, tokens) [B, T, D] for T
    tokens of each (a speculative verify); plan.mtp(seq, k, h, tokens) MTP layer k's draft step. Each writes the
    sequences' cache rows and advances them, as the module path's PagedBatch does; None where it cannot (the
    module path runs)."""

    def __init__(self, model: Transformer, pool):
        self.model, self.pool = model, pool
        self.made = None  # (*state(), (prepared layers, prepared MTP layers)): what they were made from, and they
        self.watching = None  # watched()
        self.kept = None  # held(): the prepared weights, checked once for several calls
        self.rot = None  # [MAX_TOKENS, rd, rd] rotations of this call's positions (rewritten in place each call)
        self.causal = {}  # T -> [T, 1, T - 1] True where a new row's key is past it
        self.new_slots = None  # the last step's new rows' pool rows (a slice, or a tensor in row order)

    def watched(self) -> tuple[list[dict], list[dict], list[torch.Tensor], list[torch.Tensor]]:
        """The module and parameter dicts the steps read through (those holding entries, those holding none), the
        parameters in them, and those the prepared weights are made from (the folded projections' and their
        norms', the MTP layers' input projections')."""
        m = self.model
        mods = [m, m.embed, m.layers, m.mtp]
        folded = []
        for mtp in m.mtp:
            mods += [mtp, *mtp._modules.values()]
            folded += [t for mod in mtp._modules.values() if mod is not None and type(mod) is not Block
                       and (t := mod._parameters.get("weight")) is not None]  # (the norms' and eh_proj's)
        for layer in [*m.layers, *(getattr(mtp, "block", None) for mtp in m.mtp)]:
            if type(layer) is not Block:
                continue
            attn, ffn = layer._modules["attn"], layer._modules["ffn"]
            mods += [layer, *layer._modules.values(), *attn._modules.values(), *ffn._modules.values(),
                     *getattr(ffn._modules.get("shared"), "_modules", {}).values()]
            folded += [t for name, mod in [("", layer.attn_norm), *attn._modules.items()]
                       if mod is not None and name != "kv_norm" and (t := mod._parameters.get("weight")) is not None]
        dicts = [d for mod in mods if mod is not None for d in (mod._modules, mod._parameters)]
        return ([d for d in dicts if d], [d for d in dicts if not d],
                [t for d in dicts for t in d.values() if isinstance(t, torch.Tensor)], folded)

    def state(self) -> tuple[list, list]:
        """What the watched dicts hold (compared by identity), and each parameter's address, each folded one's
        version counter and how many entries the dicts that held none now hold (the dicts walked in C: ~67 us
        a call for bench/mtp.py's 15 blocks, ~91 as a list comprehension over all ~580)."""
        full, empty, tensors, folded = self.watching
        return (list(chain.from_iterable(map(dict.values, full))),
                [*map(torch.Tensor.data_ptr, tensors), *map(VERSION, folded), sum(map(len, empty))])

    @contextlib.contextmanager
    def held(self):
        """`with plan.held():` the weights checked once for every call inside (a speculative step's MTP drafts
        and verify, between which nothing edits the model: state() reads ~230 tensors, ~0.1 ms a call)."""
        self.kept = self.prepare()
        try:
            yield
        finally:
            self.kept = None

    def prepare(self) -> tuple[list, list] | None:
        """The prepared layers and MTP layers (made again when state() changed; an MTP layer that is not plain:
        None), or None where the model does not qualify."""
        if self.kept is not None:
            return self.kept
        try:
            if self.made is not None:
                objs, nums = self.state()
                old = self.made
                if old[1] == nums and len(old[0]) == len(objs) and all(map(operator.is_, old[0], objs)):
                    return old[2]
            self.watching = self.watched()
            m = self.model
            self.made = *self.state(), None if unsupported(m) else (
                [self.layer(b) for b in m.layers], [None if unsupported_mtp(t) else self.mtp_layer(t) for t in m.mtp])
        except RuntimeError:  # an inference tensor among the weights (no version counter): not planned
            return None
        return self.made[2]

    def layer(self, block: Block) -> dict:
        attn, ffn, c = block.attn, block.ffn, block.attn.c
        with torch.no_grad():
            w_a, w_q, w_o = absorb.fold(attn)
            H, r, dr = c.n_heads, c.kv_lora_rank, c.qk_rope_head_dim
            w_a = w_a * block.attn_norm.weight  # [out, D]: the norm's scale on its columns
            if c.q_lora_rank:
                w_q = w_q * attn.q_norm.weight * c.softmax_scale
            else:  # the query's rows lead W_a
                w_a = torch.cat([w_a[:H * (r + dr)] * c.softmax_scale, w_a[H * (r + dr):]])
            out = dict(w_a=w_a.t(), w_q=None if w_q is None else w_q.t(), w_o=w_o.t(), kv_norm=attn.kv_norm.weight,
                       ffn_norm=block.ffn_norm.weight, moe=None, mlp=None)
        if type(ffn) is MoE:
            w1, w2, w3 = ffn.experts.rows()  # each expert's [I, D], [D, I], [I, D] (views)
            out.update(moe=ffn, experts=(w1, w3, [w.t() for w in w2]),
                       mlp=plain_mlp(ffn.shared) if ffn.shared else None)
        else:
            out.update(mlp=plain_mlp(ffn))
        return out

    def mtp_layer(self, mtp: MTPLayer) -> dict:
        with torch.no_grad():  # enorm's and hnorm's scales on eh_proj's columns: [2 D, D]
            eh = (mtp.eh_proj.weight * torch.cat([mtp.enorm.weight, mtp.hnorm.weight])).t()
        return dict(eh=eh, block=self.layer(mtp.block), norm=mtp.norm)

    def rotation(self, lengths: list[int], T: int) -> torch.Tensor:
        """[R, rd, rd] R with x @ R[i] = apply_rope(x) at new row i's position (T from each length on; half-split
        pairs: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)), their 2 rd non-zeros rewritten in place from a
        table of them by position (twice Rope's tables)."""
        if self.rot is None:
            rope = self.model.rope
            h = rope.cos.shape[1]
            i, d = torch.arange(h), 2 * h
            self.rot = torch.zeros(MAX_TOKENS, d, d)
            self.rot_rows = self.rot.view(MAX_TOKENS, d * d)
            self.rot_at = torch.cat([i * d + i, (i + h) * d + i + h, i * d + i + h, (i + h) * d + i])
            self.trig = torch.cat([rope.cos, rope.cos, rope.sin, -rope.sin], 1)  # [max_seq_len, 2 rd]
        if len(lengths) == 1:
            self.rot_rows[:T, self.rot_at] = self.trig[lengths[0]:lengths[0] + T]
        else:  # row i * T + j: sequence i's position lengths[i] + j
            pos = lengths if T == 1 else [n + j for n in lengths for j in range(T)]
            self.rot_rows[:len(pos), self.rot_at] = self.trig[pos]
        return self.rot

    def rows(self, seqs: list, lengths: list[int], T: int) -> tuple:
        """Where the pool holds the new rows of each sequence (T tokens from its length on, rows i * T ..)
        -> (their slots: a slice where they are consecutive, else a tensor; per sequence (its rows' range among
        the new ones, its keys 0 .. length + T - 1: a slice where its blocks run in order, else the blocks to
        gather, and its length))."""
        blk, slots, segs = self.pool.block, [], []
        for i, (s, pos) in enumerate(zip(seqs, lengths)):
            S = pos + T
            nb = (S - 1) // blk + 1
            used = s.blocks[:nb]
            first = used[0]
            if used == list(range(first, first + nb)):
                keys = slice(first * blk, first * blk + S)
                slots += range(first * blk + pos, first * blk + S)
            else:
                keys = torch.tensor(used)
                slots += [used[p // blk] * blk + p % blk for p in range(pos, S)]
            segs.append((i * T, (i + 1) * T, keys, pos))
        run = range(slots[0], slots[0] + len(slots))
        return slice(run.start, run.stop) if slots == list(run) else torch.tensor(slots), segs

    def batch(self, seqs: list, tokens: list[int]) -> torch.Tensor | None:
        """One token of each sequence (a decode step of a few) -> their final hiddens [B, D] (normed)."""
        return self.step(seqs, tokens, 1)

    def verify(self, seqs: list, tokens: list[list[int]]) -> torch.Tensor | None:
        """A speculative verify of several sequences: each one's T tokens (the pending one and its drafts) ->
        their final hiddens [B, T, D] (normed), the sequences advanced."""
        T = len(tokens[0])
        h = self.step(seqs, [t for row in tokens for t in row], T)
        return None if h is None else h.view(len(seqs), T, -1)

    def step(self, seqs: list, tokens: list[int], T: int) -> torch.Tensor | None:
        """T tokens of each sequence, tokens in row order (sequence i's at rows i * T ..) -> final hiddens
        [R, D]."""
        made, R = self.prepare(), len(tokens)
        if made is None or not 0 < R <= MAX_TOKENS:
            return None
        m, D = self.model, self.model.config.dim
        lengths = [s.length for s in seqs]
        rot, where = self.rotation(lengths, T), self.rows(seqs, lengths, T)
        self.new_slots = where[0]
        x = m.embed.weight[tokens[0]].view(1, D) if R == 1 else m.embed.weight[tokens]  # [R, D]
        for i, p in enumerate(made[0]):
            x = self.block(p, x, self.pool.slots[i][0], where, rot)
        for s in seqs:
            s.advance(T)
        return m.norm(x)

    def mtp(self, seq, k: int, h: torch.Tensor, tokens: list[int], last: bool = False) -> torch.Tensor | None:
        """MTP layer k's step (as Transformer.mtp_hidden): h [T, D] the hiddens of layer k - 1 (k = 0: the main
        model's) at positions seq.mtp_length[k] .., tokens the T tokens at those positions + k + 1 -> its normed
        hiddens [T, D] (last=True: the last row's [1, D], the FFN on it alone), seq's layer-k length advanced."""
        made, T = self.prepare(), len(tokens)
        if made is None or made[1][k] is None or not 0 < T <= MAX_TOKENS:
            return None
        m, c, pos, mp = self.model, self.model.config, seq.mtp_length[k], made[1][k]
        eps = c.norm_eps
        rot, where = self.rotation([pos], T), self.rows([seq], [pos], T)
        e = m.embed.weight[tokens]  # [T, D]
        x = torch.mm(torch.cat([e * inverse_rms(e, eps), h * inverse_rms(h, eps)], 1), mp["eh"])
        x = self.block(mp["block"], x, self.pool.slots[c.n_layers + k][0], where, rot, last)
        seq.advance(T, k)
        return mp["norm"](x)

    def block(self, p: dict, x: torch.Tensor, cache: torch.Tensor, where: tuple, rot: torch.Tensor,
              last: bool = False) -> torch.Tensor:
        """One layer over the new rows x [R, D] (rows() says where they and each sequence's keys are; their latent
        rows written into cache [n_blocks * blk, r + rd]) -> [R, D] (last=True: [1, D], the last row's FFN)."""
        c = self.model.config
        H, r, dr, qr = c.n_heads, c.kv_lora_rank, c.qk_rope_head_dim, c.q_lora_rank
        eps, R = c.norm_eps, x.shape[0]
        a = torch.mm(x * inverse_rms(x, eps), p["w_a"])  # [R, qr + r + rd] or [R, H * (r + rd) + r + rd]
        if qr:
            q_a, kv, k_pe = a.split([qr, r, dr], dim=-1)
            q = torch.mm(q_a * inverse_rms(q_a, eps), p["w_q"])
        else:
            q, kv, k_pe = a.split([H * (r + dr), r, dr], dim=-1)
        q = q.view(R, H, r + dr)  # each head's latent query, then its rope part
        pe = torch.cat([q[:, :, r:], k_pe.view(R, 1, dr)], 1)  # [R, H + 1, rd]: the heads' and the key's
        pe = torch.mm(pe.view(H + 1, dr), rot[0]).view(1, H + 1, dr) if R == 1 else torch.bmm(pe, rot[:R])
        new, segs = where
        rows = cache[new] if type(new) is slice else torch.empty(R, r + dr)  # [R, r + rd]
        torch.mul(kv * inverse_rms(kv, eps), p["kv_norm"], out=rows[:, :r])
        rows[:, r:] = pe[:, H]
        if type(new) is not slice:
            cache.index_copy_(0, new, rows)
        q[:, :, r:] = pe[:, :H]
        o = torch.empty(R, H * r) if len(segs) > 1 else None
        for lo, hi, keys, pos in segs:  # each sequence's rows against its own keys
            T, S = hi - lo, pos + hi - lo
            keys = cache[keys] if type(keys) is slice else \
                cache.view(-1, self.pool.block, r + dr).index_select(0, keys).view(-1, r + dr)[:S]  # [S, r + rd]
            scores = torch.mm(q[lo:hi].reshape(T * H, r + dr), keys.t())  # [T H, S] (the scale is in W_q)
            if T > 1:  # a new row sees the keys up to its own
                if T not in self.causal:
                    self.causal[T] = torch.ones(T, T - 1, dtype=torch.bool).triu().view(T, 1, T - 1)
                scores.view(T, H, S)[:, :, pos + 1:].masked_fill_(self.causal[T], float("-inf"))
            if o is None:
                o = torch.mm(scores.softmax(-1), keys[:, :r]).view(T, H * r)
            else:
                torch.mm(scores.softmax(-1), keys[:, :r], out=o[lo:hi].view(T * H, r))
        x = torch.addmm(x, o, p["w_o"])
        if last and R > 1:
            x = x[-1:]
        xn = (x * inverse_rms(x, eps)).mul_(p["ffn_norm"])
        if p["mlp"] is not None:  # the dense FFN or the shared expert, the residual added by its down product
            w1, w3, w2 = p["mlp"]
            out = torch.addmm(x, F.silu(torch.mm(xn, w1)).mul_(torch.mm(xn, w3)), w2)
        else:
            out = x
        moe = p["moe"]
        if moe is not None and xn.shape[0] == 1:
            weights, experts = moe.gate.one(xn)
            moe.last_idx = [experts]
            w1, w3, w2 = p["experts"]
            for w, e in zip(weights, experts):
                h = F.silu(F.linear(xn, w1[e])).mul_(F.linear(xn, w3[e]))
                out = torch.addmm(out, h, w2[e], alpha=w)
        elif moe is not None:  # a few rows: routed on the host, the experts as MoE.forward runs them (experts.bagged)
            routes = moe.gate.rows(xn)
            experts = torch.tensor([e for _, e in routes])
            moe.last_idx = experts
            out = out + moe.experts(xn, torch.tensor([w for w, _ in routes]), experts)
        return out
