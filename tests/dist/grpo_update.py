"""Run under torchrun (2 ranks): GRPO's update over data-parallel ranks, each with its share of the groups, on
whole replicas and on FSDP2-sharded blocks, against the same update over every group in one process (computed here
first, before the process group starts)."""

import copy
import json
import sys
from pathlib import Path

import torch

import sobre
from sobre.grpo import GRPOArgs
from sobre.moe import moe_layers
from sobre.parallel import apply_fsdp, copy_whole, finish, init
from sobre.rollout import Rollout
from sobre.update import group_advantages, mini_batch_steps, policy_step

sys.path.insert(0, str(Path(__file__).parent.parent))
from conftest import v4_model  # noqa: E402

V4 = v4_model(seed=0, vocab_size=64)  # (DeepSeek-V4: 3 hash-routed MoE layers, then a learned one)


def groups(truncated=(), equal=(), kept=False, c=None):
    """Four prompts x 3 completions of 1-5 tokens (rank 0 takes groups 0-1, rank 1 groups 2-3); the groups in
    `truncated` ran to the limit, those in `equal` have equal rewards (advantage 0); kept: each rollout carries a
    routing (random experts of config c's MoE layers, its prompt's alike in its group, as the engine's twins) and
    sampling floors."""
    g = torch.Generator().manual_seed(1)
    c = c or sobre.preset("debug")
    layers = c.n_layers if c.arch == "deepseek_v4" else sum(c.is_moe_layer(i) for i in range(c.n_layers))

    def routes(n):
        return torch.rand(layers, n, c.n_routed_experts, generator=g).argsort(-1)[..., :c.n_activated_experts]

    out = []
    for i, prompt in enumerate([[5, 6, 7], [9, 3], [4, 4, 8, 1], [7, 2, 2]]):
        rows = [Rollout(prompt, torch.randint(10, 60, (1 + (i + j) % 5,), generator=g).tolist(), "", i in truncated,
                        1.0 if i in equal else float((i + j) % 2) + 0.1 * j, 1.0, None) for j in range(3)]
        if kept:
            first = routes(len(prompt))
            for r in rows:
                r.routes = torch.cat([first, routes(len(r.ids) - 1)], 1).to(torch.int16)
                r.floors = (torch.rand(len(r.ids), generator=g) * 0.2 - 0.1).tolist()  # (tempered logits ~ +-0.2)
        out.append((rows, torch.tensor([r.correct for r in rows])))
    return out


CASES = {  # name: (GRPOArgs overrides, overlong filter, groups)
    "grpo": (dict(), False, groups()),
    "dapo_batch_scale": (dict(loss="dapo", scale_rewards="batch"), False, groups()),
    "dr_grpo_mu2": (dict(loss="dr_grpo", mu=2), False, groups()),
    "router_bias": (dict(router_bias_update=1e-2), False, groups()),
    "rank1_all_truncated": (dict(loss="dapo"), True, groups(truncated=(2, 3))),
    "rank1_no_signal": (dict(), False, groups(equal=(2, 3))),
    "no_signal_anywhere": (dict(), False, groups(equal=(0, 1, 2, 3))),
    # micro-batches of 2: rank 0 runs 3, rank 1 (group 3 truncated, filtered) 2; old log-probs and the KL's reference
    "micro_batch_2": (dict(loss="dapo", micro_batch=2), True, groups(truncated=(3,))),
    "beta_mu2": (dict(beta=0.05, mu=2, micro_batch=4), False, groups()),
    # the top 40% of the tokens by entropy: the threshold over every rank's tokens
    "entropy_top40": (dict(loss="dapo", top_entropy_quantile=0.4, micro_batch=4), False, groups()),
    # an entropy bonus over the kept half of every rank's tokens (its mean's count: every rank's), rank 1 no signal
    "entropy_bonus": (dict(entropy_coef=0.1, top_entropy_quantile=0.5, micro_batch=4), False, groups(equal=(2, 3))),
    # DeepSeek-V3.2's Keep Routing and Keep Sampling Mask over two epochs (FSDP: the padded forward's rows)
    "keep_routing_mask": (dict(keep_routing=True, keep_sampling_mask=True, mu=2, micro_batch=4), False,
                          groups(kept=True)),
    # --steps-per-generation 2 over two epochs: each rank splits its own groups, so the k-th step holds every rank's
    # k-th group (one process: its groups in the order 0, 2, 1, 3)
    "mini_batches": (dict(loss="dapo", steps_per_generation=2, mu=2, group=3), False, groups()),
    # DeepSeek-V4: kept routing and its learned layer's balancing bias over two epochs (replicas: a shared-prompt
    # forward per prompt length, the prompts being of 2-4 tokens)
    "v4_routing_bias": (dict(keep_routing=True, router_bias_update=1e-2, mu=2, micro_batch=4), False,
                        groups(kept=True, c=V4.config)),
}
ONE_ORDER = {"mini_batches": [0, 2, 1, 3]}  # the groups' order in one process, where the ranks split them otherwise


def is_bias(name: str) -> bool:  # a router's balancing bias (V3's gate.bias, V4's gate.e_score_correction_bias)
    return name.endswith(("gate.bias", "gate.e_score_correction_bias"))


def step(model, kept, overrides, overlong, fsdp=False):
    m = copy.deepcopy(model)
    a = GRPOArgs(max_new_tokens=5, **overrides)
    ref = copy.deepcopy(model).requires_grad_(False) if a.beta else None
    if fsdp:  # the blocks sharded over the ranks (the reference's too), as grpo --fsdp
        apply_fsdp(m, root=False)
        if ref is not None:
            apply_fsdp(ref, root=False)
    moes = moe_layers(m.layers)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    stats = policy_step(m, ref, opt, moes, kept, a, overlong) if a.steps_per_generation == 1 else \
        mini_batch_steps(m, ref, opt, moes, kept, a, overlong, group_advantages(kept, a), 0.0)
    if fsdp:
        whole = copy.deepcopy(model)
        copy_whole(whole, m)
        m = whole
    return stats, {n: t.detach().clone() for n, t in m.state_dict().items()}


torch.manual_seed(0)
V3 = sobre.init_weights(sobre.Transformer(sobre.preset("debug")), std=0.05)
MODEL = {name: V4 if name.startswith("v4") else V3 for name in CASES}
one = {name: step(MODEL[name], [kept[i] for i in ONE_ORDER.get(name, range(4))], kw, overlong)  # one process
       for name, (kw, overlong, kept) in CASES.items()}

rank, world, _ = init()
result = {}
for fsdp in (False, True):
    for name, (kw, overlong, kept) in CASES.items():
        model = MODEL[name]
        stats, state = step(model, kept[rank * 2:(rank + 1) * 2], kw, overlong, fsdp)
        ref_stats, ref_state = one[name]
        moved = max((ref_state[k] - model.state_dict()[k]).abs().max().item() for k in ref_state)
        bias = max((ref_state[k] - model.state_dict()[k]).abs().max().item() for k in ref_state if is_bias(k))
        diff = {k: (state[k] - ref_state[k]).abs().max().item() for k in state}
        result[name + " fsdp" * fsdp] = {"state": max(v for k, v in diff.items() if not is_bias(k)),
                                         "bias": max(v for k, v in diff.items() if is_bias(k)),
                                         "moved": moved, "bias_moved": bias,
                                         "stats": {k: (stats.get(k), ref_stats.get(k)) for k in ref_stats}}
if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(result, f)
finish()  # (a process that leaves with its process group alive may abort in gloo's threads)
