"""DeepSeekMoE: the router (Gate), the routed experts (Experts, stacked weights; their compute in experts.py), the
shared expert and the dense layers' SwiGLU (MLP), and MoE, which joins them. Shapes: N tokens, D hidden, E
experts, K experts per token, I an expert's hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import experts as X
from .config import Config
from .experts import Groups, RoutedLoad, dispatch, grouped_ffn, stacked_weight
from .linear import Linear


class MLP(nn.Module):
    def __init__(self, dim: int, inter: int, bias: bool = False):
        super().__init__()
        self.w1 = Linear(dim, inter, bias=bias)  # gate
        self.w2 = Linear(inter, dim, bias=bias)  # down
        self.w3 = Linear(dim, inter, bias=bias)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Gate(nn.Module):
    """Router. V3: sigmoid scores, `bias` (e_score_correction_bias) shifts selection only, groups ranked by
    their top-2 sum. V2: softmax scores, greedy or groups ranked by their best expert."""

    def __init__(self, c: Config):
        super().__init__()
        self.c = c
        self.weight = nn.Parameter(torch.empty(c.n_routed_experts, c.dim))
        # aux-loss-free balancing bias: updated from measured load, never by gradients
        self.register_buffer("bias", torch.zeros(c.n_routed_experts, dtype=torch.float32)
                             if c.topk_method == "noaux_tc" else None)

    def forward(self, x, idx=None):  # x [N, D] -> weights [N, K], indices [N, K], scores [N, E] (all fp32, as the
        #   reference); idx [N, K]: the experts given (Keep Routing's replay), their weights from these scores
        c = self.c
        logits = F.linear(x.float(), self.weight.float())  # [N, E], routed in fp32 like the reference
        scores = logits.sigmoid() if c.score_func == "sigmoid" else logits.softmax(dim=-1)
        idx = self.choose(scores) if idx is None else idx.to(x.device, torch.long)
        w = scores.gather(1, idx)
        if c.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * c.route_scale, idx, scores  # (expert outputs are weighed and summed in fp32: bf16 rounds less)

    def choose(self, scores):  # [N, E] -> the K experts of each row [N, K]
        c = self.c
        choice = scores if self.bias is None else scores + self.bias
        if c.n_expert_groups > 1 and c.topk_method != "greedy":
            grouped = choice.view(-1, c.n_expert_groups, c.n_routed_experts // c.n_expert_groups)
            if c.topk_method == "noaux_tc":
                group_score = grouped.topk(2, dim=-1).values.sum(-1)  # [N, G]
            else:
                group_score = grouped.amax(dim=-1)
            keep = group_score.topk(c.n_limited_groups, dim=-1).indices  # [N, topk_group]
            group_mask = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep, False)
            choice = grouped.masked_fill(group_mask.unsqueeze(-1), float("-inf")).flatten(1)
        return choice.topk(c.n_activated_experts, dim=-1).indices

    def one(self, x) -> tuple[list[float], list[int]]:
        """forward's routing of one token x [1, D] without autograd, chosen on the host: its K weights and experts
        as lists. The scores (and biased scores) come over in one copy and Python ranks the groups and experts,
        where forward's grouping, top-k, gather and normalisation take ~15 small ops (a MoE layer of bench/engine.py's
        model 80 -> 35 us). The same choices (ties aside: forward's topk breaks them as it may, this by the lower
        index), the weights from the same fp32 scores in float64. Its twin: forward (tests/test_model.py)."""
        return self.rows(x)[0]

    def rows(self, x) -> list[tuple[list[float], list[int]]]:
        """one's routing of each row of x [N, D] (a speculative verify's few tokens): [(weights, experts)] * N."""
        c = self.c
        logits = F.linear(x.float(), self.weight.float())  # [N, E]
        scores = logits.sigmoid() if c.score_func == "sigmoid" else logits.softmax(dim=-1)
        bias = self.bias
        rows = (scores if bias is None else torch.cat([scores, scores + bias], 1)).tolist()
        E, G, K = c.n_routed_experts, c.n_expert_groups, c.n_activated_experts
        n = E // G
        out = []
        for row in rows:
            s, choice = (row, row) if bias is None else (row[:E], row[E:])
            experts = range(E)
            if G > 1 and c.topk_method != "greedy":
                groups = [sorted(choice[g * n:(g + 1) * n]) for g in range(G)]
                rank = [v[-1] + v[-2] if c.topk_method == "noaux_tc" else v[-1] for v in groups]
                keep = sorted(sorted(range(G), key=rank.__getitem__, reverse=True)[:c.n_limited_groups])
                experts = [e for g in keep for e in range(g * n, (g + 1) * n)]
            idx = sorted(experts, key=choice.__getitem__, reverse=True)[:K]
            w = [s[e] for e in idx]
            total = sum(w) + 1e-20 if c.norm_topk_prob else 1.0
            out.append(([v / total * c.route_scale for v in w], idx))
        return out


class Experts(nn.Module):
    """All routed experts stacked: w1/w3 [E, I, D], w2 [E, D, I] (stored transposed: experts.stacked_weight)."""

    def __init__(self, c: Config):
        super().__init__()
        E, D, Inter = c.n_routed_experts, c.dim, c.moe_inter_dim
        self.w1 = stacked_weight(torch.empty(E, Inter, D))
        self.w2 = stacked_weight(torch.empty(E, D, Inter))
        self.w3 = stacked_weight(torch.empty(E, Inter, D))
        self._rows = None  # (the weights' addresses, rows())

    def rows(self) -> tuple[list, list, list] | None:
        """w1, w2, w3 as lists of their experts' matrices (views, made again when a weight's storage moves: a load
        into new tensors, .to()), for experts.one_token: indexing the stacked weights took ~3 us a matrix, 12 a
        token's layer. None where they are not plain tensors (a DTensor shard)."""
        ws = self.w1, self.w2, self.w3
        if any(type(t) not in (torch.Tensor, nn.Parameter) for t in ws):
            return None
        key = [t.data_ptr() for t in ws]  # (the views hold the storage: no other tensor can take its address)
        if self._rows is None or self._rows[0] != key:
            self._rows = key, tuple(list(t.detach().unbind(0)) for t in ws)
        return self._rows[1]

    def forward(self, x, w, idx):
        """x [N, D], w/idx [N, K] -> [N, D]. Its per-token twin is reference.moe_routed."""
        ws = self.w1, self.w2, self.w3
        return dispatch(x, w, idx, self.w1.shape[0], lambda xs, groups: self.grouped(xs, groups, *ws),
                        traceable=True, swiglu=ws)

    def grouped(self, xs, counts: list[int] | Groups, w1, w2, w3):
        """The experts' FFN on rows sorted by expert, with the given (possibly sharded) stacked weights: the
        contract expert parallel uses (parameters stacked on dim 0, in named_parameters order)."""
        return grouped_ffn(xs, counts, w1, w2, w3)


def sequence_balance_loss(idx: torch.Tensor, scores: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """V3's sequence-wise balance term sum_i f_i P_i, averaged over sequences (the trainer weighs it by alpha).
    idx [B*T, K] chosen experts, scores [B*T, E] router scores."""
    E, K = scores.shape[-1], idx.shape[1]
    hits = torch.zeros(B * T, E, device=idx.device).scatter_(1, idx, 1.0).view(B, T, E)
    f = hits.sum(1) * E / (K * T)  # [B, E]
    p = (scores / scores.sum(-1, keepdim=True)).view(B, T, E).mean(1)  # [B, E]
    return (f * p).sum(-1).mean()


class MoE(RoutedLoad, nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.gate = Gate(c)
        self.experts = Experts(c)
        self.shared = MLP(c.dim, c.moe_inter_dim * c.n_shared_experts) if c.n_shared_experts else None
        self.n_experts = c.n_routed_experts  # (last_load: tokens per expert in the last forward)
        self.balance_loss = None  # set by training-mode forwards
        self.replay = None  # [N, K]: the experts the next forward's rows go to (Keep Routing: GRPO's update)

    def forward(self, x):  # [B, T, D]
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        experts = self.experts
        if (x.shape[0] == 1 and X.ONE_TOKEN and not self.training and x.device.type == "cpu" and self.replay is None
                and not torch.is_grad_enabled() and not torch.compiler.is_compiling() and type(experts) is Experts
                and (rows := experts.rows()) is not None):  # a B=1 decode step: routed on the host, no sort
            w, idx = self.gate.one(x)
            self.last_idx = [idx]
            return X.one_token(x, w, idx, *rows, shared=self.shared).view(shape)
        w, idx, scores = self.gate(x, self.replay)
        self.last_idx = idx
        if self.training:
            self.balance_loss = sequence_balance_loss(idx, scores, shape[0], shape[1])
        y = experts(x, w, idx)
        if self.shared is not None:
            y = y + self.shared(x)
        return y.view(shape)


def moe_layers(module: nn.Module) -> list[nn.Module]:
    """Every MoE layer under module (this file's MoE, v4.MoE): a router `gate`, routed `experts` (stacked
    weights + `grouped`, or an expert-parallel / FP8 stand-in) and `last_load`."""
    return [m for m in module.modules() if hasattr(m, "last_load") and hasattr(m, "experts")]
