"""A lone sequence's decode step as straight-line tensor code: the engine's B=1 fast path on the CPU.

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
  weighs them in a [1, K + 1] x [K + 1, D] product. Routing is model.Gate.one's (on the host).
A MoE layer takes 72 ops. bench/engine.py's model at B=1: a step 1.4x faster than the module path on a 2-core
AVX2 EPYC (bench/RESULTS.md, session 59). The sum orders differ from the module path's: equal to fp32 rounding,
not bit for bit. Its twin: the module path (Transformer.hidden over a paged.PagedBatch), tests/test_plan.py.

The prepared weights are checked at every step against what they were made from (each module read, each weight's
address and version counter): a replaced module (add_lora, int8), a load into new memory or an in-place edit makes
the plan prepare them again, or stand down (DecodePlan.prepare -> None) where the model no longer qualifies.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from . import absorb
from .linear import Linear
from .model import MLA, MLP, Block, Experts, Gate, MoE, RMSNorm, Transformer, inverse_rms

ONE_ROW = True  # the engine's B=1 decode steps through DecodePlan where the model qualifies (False: modules)


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


def plain_mlp(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """An MLP's (w1^T, w3^T, w2^T) [D, I], [D, I], [I, D] as views, or None where it is not plain."""
    if type(m) is not MLP or any(type(lin) is not Linear or lin.bias is not None for lin in (m.w1, m.w2, m.w3)):
        return None
    return m.w1.weight.t(), m.w3.weight.t(), m.w2.weight.t()


class DecodePlan:
    """The decode step of one sequence over an engine's pool (module docstring). plan(seq, token) -> the final
    hidden [1, D] of `token` at position seq.length (normed: the head's input); seq's cache rows are written and
    seq advanced, as the module path's PagedBatch does."""

    def __init__(self, model: Transformer, pool):
        self.model, self.pool = model, pool
        self.made = None  # (*state(), the prepared layers): what they were made from, and they
        self.watching = None  # watched()
        self.rot = None  # [rd, rd] rotation of this step's position (rewritten in place each step)

    def watched(self) -> tuple[list[dict], list[torch.Tensor], list[torch.Tensor]]:
        """The module and parameter dicts the step reads through, the parameters in them, and those the prepared
        weights are made from (the folded projections' and their norms')."""
        m = self.model
        mods = [m, m.embed, m.layers]
        folded = []
        for layer in m.layers:
            attn, ffn = layer._modules["attn"], layer._modules["ffn"]
            mods += [layer, *layer._modules.values(), *attn._modules.values(), *ffn._modules.values(),
                     *getattr(ffn._modules.get("shared"), "_modules", {}).values()]
            folded += [t for name, mod in [("", layer.attn_norm), *attn._modules.items()]
                       if mod is not None and name != "kv_norm" and (t := mod._parameters.get("weight")) is not None]
        dicts = [d for mod in mods if mod is not None for d in (mod._modules, mod._parameters)]
        return dicts, [t for d in dicts for t in d.values() if isinstance(t, torch.Tensor)], folded

    def state(self) -> tuple[list, list]:
        """What the watched dicts hold (compared by identity), and each parameter's address and each folded
        one's version counter."""
        dicts, tensors, folded = self.watching
        return [v for d in dicts for v in d.values()], [t.data_ptr() for t in tensors] + [t._version for t in folded]

    def prepare(self) -> list | None:
        """The prepared layers (made again when state() changed), or None where the model does not qualify."""
        try:
            if self.made is not None:
                objs, nums = self.state()
                old = self.made
                if old[1] == nums and len(old[0]) == len(objs) and all(map(operator.is_, old[0], objs)):
                    return old[2]
            self.watching = self.watched()
            self.made = *self.state(), None if unsupported(self.model) else [self.layer(b) for b in
                                                                            self.model.layers]
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

    def rotation(self, pos: int) -> torch.Tensor:
        """[rd, rd] R with x @ R = apply_rope(x) at pos (half-split pairs: (x1, x2) -> (x1 cos - x2 sin, x2 cos +
        x1 sin)), its 2 rd non-zeros rewritten in place from a table of them by position (twice Rope's tables)."""
        if self.rot is None:
            rope = self.model.rope
            h = rope.cos.shape[1]
            i, d = torch.arange(h), 2 * h
            self.rot = torch.zeros(d, d)
            self.rot_at = torch.cat([i * d + i, (i + h) * d + i + h, i * d + i + h, (i + h) * d + i])
            self.trig = torch.cat([rope.cos, rope.cos, rope.sin, -rope.sin], 1)  # [max_seq_len, 2 rd]
        self.rot.view(-1)[self.rot_at] = self.trig[pos]
        return self.rot

    def __call__(self, seq, token: int) -> torch.Tensor | None:
        layers = self.prepare()
        if layers is None:
            return None
        m, c, pool = self.model, self.model.config, self.pool
        H, r, dr, qr, D = c.n_heads, c.kv_lora_rank, c.qk_rope_head_dim, c.q_lora_rank, c.dim
        eps = c.norm_eps
        pos, blk = seq.length, pool.block
        rot = self.rotation(pos)
        nb = pos // blk + 1
        blocks = seq.blocks[:nb]
        first = blocks[0]
        run = blocks == list(range(first, first + nb))  # the sequence's rows in order in the pool: a slice
        rows = None if run else torch.tensor(blocks)
        slot = blocks[-1] * blk + pos % blk
        x = m.embed.weight[token].view(1, D)
        for i, p in enumerate(layers):
            cache = pool.slots[i][0]  # [n_blocks * blk, r + rd]
            a = torch.mm(x * inverse_rms(x, eps), p["w_a"])  # [1, qr + r + rd] or [1, H * (r + rd) + r + rd]
            if qr:
                q_a, kv, k_pe = a.split([qr, r, dr], dim=-1)
                q = torch.mm(q_a * inverse_rms(q_a, eps), p["w_q"])
            else:
                q, kv, k_pe = a.split([H * (r + dr), r, dr], dim=-1)
            q = q.view(H, r + dr)  # each head's latent query, then its rope part
            pe = torch.mm(torch.cat([q[:, r:], k_pe]), rot)  # [H + 1, rd]: the heads' and the key's, rotated
            new = cache[slot]
            torch.mul(kv * inverse_rms(kv, eps), p["kv_norm"], out=new[:r].view(1, r))
            new[r:] = pe[H]
            q[:, r:] = pe[:H]
            keys = cache[first * blk:slot + 1] if run else \
                cache.view(-1, blk, r + dr).index_select(0, rows).view(-1, r + dr)[:pos + 1]  # [S, r + rd]
            probs = torch.mm(q, keys.t()).softmax(-1)  # [H, S] (the scale is in W_q)
            x = torch.addmm(x, torch.mm(probs, keys[:, :r]).view(1, H * r), p["w_o"])
            xn = (x * inverse_rms(x, eps)).mul_(p["ffn_norm"])
            if p["mlp"] is not None:  # the dense FFN or the shared expert, the residual added by its down product
                w1, w3, w2 = p["mlp"]
                out = torch.addmm(x, F.silu(torch.mm(xn, w1)).mul_(torch.mm(xn, w3)), w2)
            else:
                out = x
            if p["moe"] is not None:
                weights, experts = p["moe"].gate.one(xn)
                p["moe"].last_idx = [experts]
                w1, w3, w2 = p["experts"]
                for w, e in zip(weights, experts):
                    h = F.silu(F.linear(xn, w1[e])).mul_(F.linear(xn, w3[e]))
                    out = torch.addmm(out, h, w2[e], alpha=w)
            x = out
        seq.advance(1)
        return m.norm(x)

