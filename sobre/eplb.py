"""EPLB: DeepSeek's expert-parallel load balancer, with its interface and semantics.

    phy2log, log2phy, logcnt = rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)

weight [layers, experts] is each logical expert's measured load. The balancer gives the hottest experts extra
replicas (num_replicas - experts of them per layer) and places the num_replicas physical experts on
num_gpus GPUs (num_replicas / num_gpus each) so that the heaviest GPU carries as little as possible:

- hierarchical policy (when num_nodes divides num_groups; for prefill): pack whole expert groups onto nodes
  (group-limited routing then keeps a token's traffic inside few nodes), replicate hot experts within each
  node, pack the node's physical experts onto its GPUs;
- global policy (otherwise; for decode): one group, one node: replicate globally, pack onto GPUs.

Packing is greedy: items by load, heaviest first, each into the lightest pack that still has room (every pack
takes the same number of items). Replication repeatedly adds a replica to the expert with the highest load
per replica. Returns
  phy2log [layers, num_replicas]          the logical expert each physical slot holds (GPU g holds slots
                                          g * num_replicas / num_gpus ... (g + 1) * num_replicas / num_gpus - 1)
  log2phy [layers, experts, R + 1]        each expert's physical slots, -1 padded (R = redundant replicas)
  logcnt  [layers, experts]               replicas per logical expert
"""

from __future__ import annotations

import torch


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [X, n] -> (pack [X, n], rank within the pack [X, n]); n / num_packs items per pack."""
    rows, n = weight.shape
    per_pack = n // num_packs
    if per_pack == 1:
        idx = torch.arange(n).expand(rows, n).clone()
        return idx, torch.zeros_like(idx)
    pack, rank = torch.full((rows, n), -1, dtype=torch.int64), torch.full((rows, n), -1, dtype=torch.int64)
    for r in range(rows):
        load, count = [0.0] * num_packs, [0] * num_packs
        for item in weight[r].sort(descending=True).indices.tolist():
            p = min((i for i in range(num_packs) if count[i] < per_pack), key=load.__getitem__)
            pack[r, item], rank[r, item] = p, count[p]
            load[p] += float(weight[r, item])
            count[p] += 1
    return pack, rank


def replicate(weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [X, n] -> (phy2log [X, num_phy], replica rank [X, num_phy], count [X, n]): slots n.. go one at a
    time to the expert whose load per replica is highest."""
    rows, n = weight.shape
    phy2log = torch.arange(num_phy).repeat(rows, 1)
    rank = torch.zeros(rows, num_phy, dtype=torch.int64)
    count = torch.ones(rows, n, dtype=torch.int64)
    r = torch.arange(rows)
    for slot in range(n, num_phy):
        hot = (weight / count).max(dim=-1).indices
        phy2log[:, slot], rank[:, slot] = hot, count[r, hot]
        count[r, hot] += 1
    return phy2log, rank, count


def inverse(perm: torch.Tensor) -> torch.Tensor:
    """Row-wise inverse of permutations [X, n]."""
    inv = torch.empty_like(perm)
    inv.scatter_(1, perm, torch.arange(perm.shape[1]).expand_as(perm))
    return inv


def hierarchical(weight: torch.Tensor, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int):
    """-> (phy2log, replica rank, logcnt) for weight [L, n]; the global policy is num_groups = num_nodes = 1."""
    L, n = weight.shape
    group_size, groups_per_node = n // num_groups, num_groups // num_nodes
    per_node, phy_per_gpu = n // num_nodes, num_phy // num_gpus
    # 1. groups -> nodes. "mlog" numbers the logical experts node by node in their packed order
    group_pack, group_rank = balanced_packing(weight.view(L, num_groups, group_size).sum(-1), num_nodes)
    log2mlog = (((group_pack * groups_per_node + group_rank) * group_size)[..., None]
                + torch.arange(group_size)).flatten(-2)  # [L, n]
    mlog2log = inverse(log2mlog)
    # 2. replicate within each node: one row per (layer, node)
    node_load = weight.gather(-1, mlog2log).view(L * num_nodes, per_node)
    phy2mlog, phyrank, mlogcnt = replicate(node_load, num_phy // num_nodes)
    # 3. each node's physical experts -> its GPUs
    phy_load = (node_load / mlogcnt).gather(-1, phy2mlog)
    pack, rank = balanced_packing(phy_load, num_gpus // num_nodes)
    pphy2phy = inverse(pack * phy_per_gpu + rank)  # final slot -> slot in the node's replica list
    pphy2mlog = phy2mlog.gather(-1, pphy2phy).view(L, num_nodes, -1)
    pphy2mlog = (pphy2mlog + torch.arange(0, n, per_node).view(1, -1, 1)).flatten(-2)  # node-local -> global
    return (mlog2log.gather(-1, pphy2mlog), phyrank.gather(-1, pphy2phy).view(L, -1),
            mlogcnt.view(L, -1).gather(-1, log2mlog))


def rebalance_experts(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int):
    """DeepSeek's `eplb.rebalance_experts`: see the module docstring."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be [layers, experts], got shape {tuple(weight.shape)}")
    L, n = weight.shape
    for name, big, small in (("num_replicas", num_replicas, num_gpus), ("num_gpus", num_gpus, num_nodes),
                             ("experts", n, num_groups)):
        if small <= 0 or big % small:
            raise ValueError(f"{name}={big} must be a multiple of {small} "
                             "(replicas of GPUs, GPUs of nodes, experts of groups)")
    if num_replicas < n:
        raise ValueError(f"num_replicas={num_replicas} < {n} experts: every expert needs a slot")
    weight = weight.float().cpu()
    if num_groups % num_nodes == 0:
        phy2log, rank, logcnt = hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, rank, logcnt = hierarchical(weight, num_replicas, 1, 1, num_gpus)
    width = num_replicas - n + 1
    log2phy = torch.full((L, n, width), -1, dtype=torch.int64)
    log2phy.view(L, -1).scatter_(-1, phy2log * width + rank, torch.arange(num_replicas).expand(L, -1))
    return phy2log, log2phy, logcnt


def gpu_loads(weight: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """[layers, num_gpus] load per GPU when each expert's load splits evenly over its replicas."""
    per_replica = (weight.float() / logcnt).gather(-1, phy2log)  # [L, num_replicas]
    return per_replica.view(weight.shape[0], num_gpus, -1).sum(-1)


def naive_gpu_loads(weight: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """[layers, num_gpus] load per GPU without EPLB: experts in order, one copy each, split as evenly as possible."""
    n = weight.shape[1]
    cuts = [g * n // num_gpus for g in range(num_gpus + 1)]
    return torch.stack([weight[:, a:b].float().sum(-1) for a, b in zip(cuts, cuts[1:])], dim=-1)


def imbalance(loads: torch.Tensor) -> torch.Tensor:
    """max / mean load per layer (1.0 = perfectly balanced)."""
    return loads.max(-1).values / loads.mean(-1)


def run_loads(path, last: int = 0) -> torch.Tensor:
    """[moe layers, experts] tokens routed to each expert, summed over a training run's metrics.jsonl (the last
    `last` steps; 0 = all), or read from a JSON file holding that matrix."""
    import json
    from pathlib import Path
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
        if not p.exists():
            raise FileNotFoundError(f"{p.parent}: no metrics.jsonl (expected a `sobre pretrain` run folder)")
        rows = [r["expert_load"] for r in map(json.loads, p.read_text().splitlines()) if r.get("expert_load")]
        if not rows:
            raise ValueError(f"{p}: no expert_load records (a dense model, or a run from before they were logged)")
        return torch.tensor(rows[-last:] if last else rows, dtype=torch.float64).sum(0)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such run folder or JSON file")
    try:
        w = torch.tensor(json.loads(p.read_text()), dtype=torch.float64)
    except (ValueError, TypeError):
        raise ValueError(f"{p}: expected a JSON [layers][experts] matrix of expert loads") from None
    return w if w.dim() == 2 else w[None]
