"""Absorbed MLA with its projections folded: inference weights for the latent-space attention of small models.

Absorbed attention (model.MLA, attn_impl "absorb") multiplies each head's query by W_UK and each head's latent
output by W_UV at every step: two bmm's and their permutes a layer, beside the separate q_a and kv_a products of
the same input. Folded once into the projections around them, a layer's decode needs three products:
    W_a [q_lora_rank + r + rd, D]  = [wq_a; wkv_a]                  (without q_lora: [W_q; wkv_a], from x)
    W_q [H * (r + rd), q_lora_rank] = per head [W_UK^T wq_b_nope; wq_b_rope]   q already in the latent space
    W_o [D, H * r]                  = per head wo_h W_UV_h                       straight from the latent output
with the rope dims of an interleaved checkpoint reordered in the weights (apply_rope then has nothing to
permute). Decode on a 2-core Intel Xeon, folded vs not in alternating runs of one process (bench/RESULTS.md,
session 51): bench/engine.py's model B=1 +8-12%, B=16 +4-6%; the tiny preset B=1 +13%, the small one +10% (B=16
within the noise); a GRPO rollout of bench/grpo.py 1-4%.

Folding trades bytes for products: W_q and W_o hold H * r columns where the plain ones hold H * dn and H * dv.
That pays where the latent rank is small (sobre's presets, the benchmark's shapes: 1.2-1.4x the parameters they
replace); DeepSeek-V2 / V3's shapes (r = 512 against dn = dv = 128) would take 2.8-3.4x, at sizes where decode
reads its weights from memory (not measured: no such model fits here): layers fold up to FOLD_GROWTH. An
engine (engine.Engine's `folds`) folds each layer when it first decodes and keeps the fold for its lifetime
(`folded`): a model changed under a running engine needs a new one, as each GRPO rollout makes. The twin is the
unfolded absorbed path (tests/test_model.py).
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import causal
from .config import Config
from .linear import Linear

FOLD_GROWTH = 1.5  # fold a layer while its folded W_q and W_o hold at most this many times the parameters of the
#   wq_b (or wq), wkv_b and wo they stand in for (presets 1.2-1.4x: folded; V2-Lite 2.8x, V3 3.4x: not)


def foldable(c: Config) -> bool:
    """Whether MLA layers of this config fold within FOLD_GROWTH."""
    H, dn, dr, dv, r = c.n_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
    q_in = c.q_lora_rank or c.dim
    folded = H * (r + dr) * q_in + c.dim * H * r
    plain = H * (dn + dr) * q_in + H * (dn + dv) * r + c.dim * H * dv
    return folded <= FOLD_GROWTH * plain


def folded(attn: nn.Module, folds: dict | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None:
    """(W_a, W_q or None without q_lora, W_o) of an MLA layer, from folds (an engine's: {layer: its fold}; None:
    not folded), made there on first use; None where the layer does not fold: a gradient wanted, under
    torch.compile, DSA, a projection that is not a plain Linear (FP8, int8, LoRA), a sharded or inference-mode
    weight, or past FOLD_GROWTH. An engine folds the weights as they are when it first decodes (rollouts make an
    engine each: GRPO folds the policy of the step); besides, every call (~3 us) checks each projection module
    and its weight's address, version counter and dtype and refolds on a change (a load, in-place edits; not a
    fused optimizer's step, which leaves the version counter as it was), the fold holding the weights it was made
    from, so no new weight can take their address while it lives."""
    if folds is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    ms = [attn._modules[name] for name in PROJECTIONS[bool(attn.c.q_lora_rank)]]
    state = [FOLD_GROWTH]
    for m in ms:
        w = m._parameters.get("weight")
        state += (m, None) if w is None else (m, w.data_ptr(), w._version, w.dtype)
    made = folds.get(attn)  # (state, the weights it was made from, the folded weights or None)
    if made is None or made[0] != state:
        ok = attn.c.attn_type != "dsa" and foldable(attn.c) and all(
            type(m) is Linear and type(m.weight.data) is torch.Tensor and not torch.is_inference(m.weight) for m in ms)
        held = [w.detach() for m in ms if (w := m._parameters.get("weight")) is not None]
        made = folds[attn] = (state, held, fold(attn) if ok else None)
    return made[2]


PROJECTIONS = {True: ("wq_a", "wq_b", "wkv_a", "wkv_b", "wo"), False: ("wq", "wkv_a", "wkv_b", "wo")}  # by q_lora


def fold(attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The folded weights (module docstring), multiplied in fp32 and rounded once to the layer's dtype."""
    c = attn.c
    H, dn, dr, dv, r = c.n_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
    # rope dims in the order apply_rope leaves them (interleaved pairs -> evens then odds)
    rope = torch.cat([torch.arange(0, dr, 2), torch.arange(1, dr, 2)]) if c.rope_interleave else torch.arange(dr)
    rope = rope.to(attn.wo.weight.device)
    with torch.no_grad():
        wq = (attn.wq_b if c.q_lora_rank else attn.wq).weight.float().view(H, dn + dr, -1)  # [H, dn + rd, in]
        w_uk, w_uv = attn.wkv_b.weight.float().view(H, dn + dv, r).split([dn, dv], dim=1)  # [H, dn, r], [H, dv, r]
        w_q = torch.cat([torch.einsum("hdr,hdi->hri", w_uk, wq[:, :dn]), wq[:, dn:].index_select(1, rope)], dim=1)
        w_q = w_q.reshape(H * (r + dr), -1)
        w_kv = attn.wkv_a.weight.float()
        w_kv = torch.cat([w_kv[:r], w_kv[r:].index_select(0, rope)])  # [r + rd, D]
        w_a = torch.cat([attn.wq_a.weight.float() if c.q_lora_rank else w_q, w_kv])
        wo = attn.wo.weight.float().view(c.dim, H, dv)
        w_o = torch.einsum("dhv,hvr->dhr", wo, w_uv).reshape(c.dim, H * r)
    dtype = attn.wo.weight.dtype
    return w_a.to(dtype), w_q.to(dtype) if c.q_lora_rank else None, w_o.to(dtype)


def latent_attend(q, kv_pe, mask, r: int, scale: float) -> torch.Tensor:
    """Absorbed MLA's attention: queries q [B, T, H, r + rd] against the cached latents and rope keys kv_pe
    [B, S, r + rd] (mask [T, S] or [B, 1, T, S]; None: causal, the queries at the last T of the S positions: one
    query sees every key) -> the heads' latent outputs [B, T, H, r]."""
    B, T, H, d = q.shape
    S = kv_pe.shape[1]
    scores = torch.bmm(q.reshape(B, T * H, d), kv_pe.transpose(1, 2)).view(B, T, H, S)
    if mask is None and T == 1:  # (a lone sequence's decode step: nothing to hide; scaled in fp32, as the
        scores = scores.float().mul_(scale)  # bias's sum below leaves them: bf16 scores are not rounded again)
    else:
        if mask is None:
            mask = causal(T, S, q.device)
        mask = mask.transpose(-2, -3) if mask.dim() == 4 else mask.unsqueeze(1)  # -> [B|1, T, 1, S]
        # an additive -inf bias, scaled scores added in one op (CPU: a masked_fill broadcast over the heads took
        # ~90 us at B=64, the bias ~20)
        scores = torch.add(torch.where(mask, 0.0, float("-inf")), scores, alpha=scale)
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.bmm(probs.view(B, T * H, S), kv_pe[..., :r]).view(B, T, H, r)
