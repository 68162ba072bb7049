"""Run under torchrun (2 ranks): an expert-parallel MoE against the same MoE in one process."""

import json
import sys

import torch
import torch.distributed as dist

import sobre
from sobre.moe import MoE
from sobre.parallel import ExpertParallel, init

rank, world, _ = init()
cfg = sobre.preset("debug", n_routed_experts=8, n_activated_experts=2, n_expert_groups=2, n_limited_groups=1)
g = torch.Generator().manual_seed(0)
moe = MoE(cfg)
with torch.no_grad():
    for p in moe.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    moe.gate.bias.copy_(torch.randn(8, generator=g) * 0.1)
x = torch.randn(4, 6, cfg.dim, generator=g)  # the global batch, the same on every rank

ref = moe(x)  # one process holds every expert
ref.pow(2).sum().backward()
ref_grads = {n: p.grad.clone() for n, p in moe.named_parameters()}
moe.zero_grad()

lo, hi = rank * 4 // world, (rank + 1) * 4 // world
local = ExpertParallel(moe.experts)
moe.experts = local
out = moe(x[lo:hi])
out.pow(2).sum().backward()
def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


diff = {"out": rel(out, ref[lo:hi])}
e0 = rank * local.local
for w in ("w1", "w2", "w3"):
    diff[w] = rel(getattr(local, w).grad, ref_grads[f"experts.{w}"][e0:e0 + local.local])
gate = moe.gate.weight.grad.clone()
dist.all_reduce(gate)  # each rank saw part of the tokens
diff["gate"] = rel(gate, ref_grads["gate.weight"])
if rank == 0:
    json.dump(diff, open(sys.argv[1], "w"))
dist.barrier()  # no rank tears the group down while another still has collectives in flight
dist.destroy_process_group()
