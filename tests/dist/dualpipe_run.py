"""Run under torchrun (4 ranks): 1F1B, ZB1P and DualPipe executed over gloo point-to-point on a tiny
4-chunk MLP; every chunk's gradient (DualPipe: both copies summed) and the loss against one process."""

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch import nn

from sobre.dualpipe import dualpipe, execute, one_f_one_b, sync_copies
from sobre.parallel import init

rank, P, _ = init()
M, B, D = 8, 3, 16
torch.manual_seed(0)
model = [nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(P)]  # chunk s = stage s
x = torch.randn(2, M, B, D)  # [direction, micro-batch, rows, D]
y = torch.randn(2, M, B, D)


def loss_fn(out, target):
    return (out - target).pow(2).sum()


def reference(directions, per_direction):
    ref = copy.deepcopy(model)
    total = 0.0
    for d in directions:
        for mb in range(per_direction):
            h = x[d, mb]
            for c in ref:
                h = c(h)
            loss = loss_fn(h, y[d, mb])
            loss.backward()
            total += loss.item()
    return ref, total


result = {}
for name in ("1F1B", "ZB1P", "DualPipe"):
    dual = name == "DualPipe"
    per_direction = M // 2 if dual else M
    ops = (dualpipe(P, M) if dual else one_f_one_b(P, M, zero_bubble=name == "ZB1P"))[rank]
    chunks = {0: copy.deepcopy(model[rank])}
    if dual:
        chunks[1] = copy.deepcopy(model[P - 1 - rank])
    directions = (0, 1) if dual else (0,)
    inputs = {(d, mb): x[d, mb] for d in directions for mb in range(per_direction)}
    targets = {(d, mb): y[d, mb] for d in directions for mb in range(per_direction)}
    loss = torch.tensor(execute(ops, chunks, inputs, targets, loss_fn, (B, D)))
    if dual:
        sync_copies(chunks)
    dist.all_reduce(loss)
    ref, ref_loss = reference(directions, per_direction)
    diff = 0.0
    for d, c in chunks.items():
        s = rank if d == 0 else P - 1 - rank
        for p, q in zip(c.parameters(), ref[s].parameters()):
            diff = max(diff, (p.grad - q.grad).abs().max().item())
    diff = torch.tensor(diff)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    result[name] = {"grad_diff": diff.item(), "loss": loss.item(), "ref_loss": ref_loss}
if rank == 0:
    json.dump(result, open(sys.argv[1], "w"))
dist.barrier()
dist.destroy_process_group()
