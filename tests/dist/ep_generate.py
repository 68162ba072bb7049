"""Run under torchrun (2 ranks): the engine with experts sharded over the ranks (EPLB placement with
redundant copies of the hot experts) against the same model in one process."""

import json
import sys

import torch
import torch.distributed as dist

import sobre
from sobre.engine import Engine
from sobre.model import Transformer, init_weights
from sobre.parallel import ExpertParallel, expert_parallel_inference, init

rank, world, _ = init()
cfg = sobre.preset("debug", n_routed_experts=6, n_activated_experts=2, n_expert_groups=1, n_limited_groups=1,
                   n_dense_layers=0, n_mtp_layers=0)
model = init_weights(Transformer(cfg), std=0.1, seed=0).eval()
with torch.no_grad():
    for layer in model.layers:
        layer.ffn.gate.bias.copy_(torch.tensor([1.0, 0.5, 0, 0, 0, 0]))  # experts 0 and 1 are hot
g = torch.Generator().manual_seed(1)
prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 17, 9)]
full = torch.randint(3, cfg.vocab_size, (2, 24), generator=g)

with torch.no_grad():
    ref_logits = model(full)
ref_greedy = Engine(model).generate(prompts, max_new_tokens=12)
ref_sampled = Engine(model).generate(prompts, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)

placement = expert_parallel_inference(model, redundant=2, calibrate=sum(prompts, []))
with torch.no_grad():
    logits = model(full)
greedy = Engine(model).generate(prompts, max_new_tokens=12)
sampled = Engine(model).generate(prompts, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)

shards = [m for m in model.modules() if isinstance(m, ExpertParallel)]
with torch.no_grad():
    model(torch.tensor([sum(prompts, [])]))
slot_load = torch.stack([s.last_slot_load for s in shards])  # [layers, slots], this rank's share of tokens
dist.all_reduce(slot_load)
result = {
    "logits_diff": (logits - ref_logits).abs().max().item(),
    "greedy_equal": greedy == ref_greedy,
    "sampled_equal": sampled == ref_sampled,
    "slots_per_rank": [s.w1.shape[0] for s in shards],
    "placement": placement.tolist(),
    "hot_copies": [int(s.count[:2].min()) for s in shards],
    "copies_used": [all(row[p == e].min() > 0 for e in (0, 1))  # the two hot experts
                    for row, p in zip(slot_load, placement)],
}
if rank == 0:
    json.dump(result, open(sys.argv[1], "w"))
dist.barrier()
dist.destroy_process_group()
