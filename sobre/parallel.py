"""Parallelism, applied from outside an unmodified model (as torchtitan): torchrun initialisation, FSDP2
data parallel (`fully_shard` per block) and expert parallel (each rank owns E / world experts; tokens go to
their experts and back with two all-to-alls). gloo on CPU, NCCL on GPU."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd

from .model import Experts, MoE, Transformer, grouped_ffn


def init() -> tuple[int, int, torch.device]:
    """(rank, world, device); a plain `python` run is rank 0 of 1."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cpu")
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


class ExpertParallel(nn.Module):
    """Drop-in for model.Experts holding only this rank's slice of the experts."""

    def __init__(self, experts: Experts, group=None):
        super().__init__()
        self.group = group
        self.world, rank = dist.get_world_size(group), dist.get_rank(group)
        E = experts.w1.shape[0]
        if E % self.world:
            raise ValueError(f"expert parallel: {E} experts do not divide over {self.world} ranks")
        self.n_experts, self.local = E, E // self.world
        lo = rank * self.local
        self.w1 = nn.Parameter(experts.w1.detach()[lo:lo + self.local].clone())
        self.w2 = nn.Parameter(experts.w2.detach()[lo:lo + self.local].clone())
        self.w3 = nn.Parameter(experts.w3.detach()[lo:lo + self.local].clone())

    def forward(self, x, w, idx):  # x [N, D], w/idx [N, K] with global expert ids -> [N, D]
        N, K = idx.shape
        flat = idx.flatten()
        order = flat.argsort(stable=True)  # pairs grouped by expert, hence by owning rank
        token = order // K
        counts = torch.bincount(flat, minlength=self.n_experts)  # [world * local]: what we send, per expert
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)  # [source rank, local expert]
        send = counts.view(self.world, self.local).sum(1).tolist()
        recv = recv_counts.view(self.world, self.local).sum(1).tolist()
        group = self.group or dist.group.WORLD
        got = all_to_all_single_autograd(x[token], recv, send, group)  # [sum(recv), D], differentiable
        # received rows come in [source][local expert] blocks: regroup by expert, run, restore the order
        expert_of_row = torch.arange(self.local, device=x.device).repeat(self.world).repeat_interleave(recv_counts)
        perm = expert_of_row.argsort(stable=True)
        out = grouped_ffn(got[perm], recv_counts.view(self.world, self.local).sum(0).tolist(),
                          self.w1, self.w2, self.w3)
        out = out[perm.argsort()]
        back = all_to_all_single_autograd(out, send, recv, group)  # [N*K, D]
        back = back * w.flatten()[order].unsqueeze(-1)
        return torch.zeros_like(x).index_add(0, token, back)


def apply_expert_parallel(model: Transformer, group=None) -> Transformer:
    """Swap every MoE's experts for this rank's slice."""
    for m in model.modules():
        if isinstance(m, MoE):
            m.experts = ExpertParallel(m.experts, group)
    return model


def apply_fsdp(model: Transformer):
    """FSDP2: shard every block, then the rest (embedding, head, final norm) at the root. Expert-parallel
    slices are already split over ranks: FSDP leaves them alone."""
    from torch.distributed.fsdp import fully_shard
    ignored = {p for m in model.modules() if isinstance(m, ExpertParallel) for p in m.parameters()} or None
    for block in list(model.layers) + list(model.mtp):
        fully_shard(block, ignored_params=ignored)
    fully_shard(model, ignored_params=ignored)
    return model


def scale_expert_grads(model: nn.Module, world: int):
    """Expert-parallel grads sum every rank's tokens; data-parallel grads are averaged. Match them."""
    for m in model.modules():
        if isinstance(m, ExpertParallel):
            for p in m.parameters():
                if p.grad is not None:
                    p.grad.div_(world)


def clip_grad_norm_(model: nn.Module, max_norm: float, world: int) -> float:
    """Global grad norm over FSDP-sharded (DTensor), rank-local expert and replicated params; clips in place."""
    from torch.distributed.tensor import DTensor
    expert_ids = {id(p) for m in model.modules() if isinstance(m, ExpertParallel) for p in m.parameters()}
    split, whole = torch.zeros(()), torch.zeros(())  # squares of disjoint per-rank pieces / of full copies
    for p in model.parameters():
        if p.grad is None:
            continue
        if isinstance(p.grad, DTensor):
            split += p.grad.to_local().float().pow(2).sum().cpu()
        elif id(p) in expert_ids:
            split += p.grad.float().pow(2).sum().cpu()
        else:
            whole += p.grad.float().pow(2).sum().cpu()
    if world > 1:
        dist.all_reduce(split)
    norm = float((split + whole).sqrt())
    if norm > max_norm:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(max_norm / (norm + 1e-6))
    return norm


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Model and optimizer state as full, unsharded CPU tensors keyed by parameter name, the same for any
    world size (expert-parallel slices are gathered back into [E, ...] tensors). Valid on rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    opts_ = getattr(opt, "optimizers", opt)  # optim.Optimizers (Muon + AdamW): checkpoint them together
    msd, osd = get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, opts_, options=opts)
    for name, m in model.named_modules():
        if isinstance(m, ExpertParallel):  # every rank joins each gather; rank 0 keeps the result
            for w in ("w1", "w2", "w3"):
                key, p = f"{name}.{w}", getattr(m, w)
                full = _gather(p.detach(), m.group)
                if msd:
                    msd[key] = full
                state = opt.state.get(p, {})
                for k in sorted(state):
                    if torch.is_tensor(state[k]) and state[k].dim() > 0:
                        full = _gather(state[k], m.group)
                        if msd:
                            osd["state"][key][k] = full
    return msd, osd


def load_full_state(model: nn.Module, opt: torch.optim.Optimizer, msd: dict, osd: dict):
    """Inverse of full_state, on every rank: each rank keeps its shard / expert slice."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    msd, osd = dict(msd), {"state": {k: dict(v) for k, v in osd["state"].items()}, "param_groups": osd["param_groups"]}
    for name, m in model.named_modules():
        if isinstance(m, ExpertParallel):
            lo = dist.get_rank(m.group) * m.local
            for w in ("w1", "w2", "w3"):
                key = f"{name}.{w}"
                msd[key] = msd[key][lo:lo + m.local]
                for k, v in osd["state"].get(key, {}).items():
                    if torch.is_tensor(v) and v.dim() > 0:
                        osd["state"][key][k] = v[lo:lo + m.local]
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, msd, options=opts)
    set_optimizer_state_dict(model, getattr(opt, "optimizers", opt), osd, options=opts)


def _gather(t: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts).cpu()
