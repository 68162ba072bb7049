"""Pipeline schedules and a simulator: 1F1B, ZB1P (zero-bubble ZB-H1) and DeepSeek's DualPipe.

A model is cut into P chunks (stages). 1F1B and ZB1P put chunk s on rank s and push M micro-batches through
it in one direction. DualPipe (DeepSeek-V3 report, deepseek-ai/DualPipe) keeps two copies of the chunks —
direction 0 runs chunk s on rank s, direction 1 runs it on rank P-1-s — and feeds M/2 micro-batches from each
end, so every rank's steady state pairs a forward of one direction with a backward of the other; the pair
runs as one overlapped "F&B" op (DeepSeek hides the MoE all-to-all of one under the compute of the other).

A schedule is, per rank, the ordered list of ops it runs. Each op is a tuple of parts; a part is
(kind, direction, micro-batch) with kind
  F  forward of this rank's chunk              B  full backward (input and weight gradients)
  I  backward for the input only (zero bubble)  W  the weight gradient that I left for later
and an op of two parts is an overlapped F&B pair. `simulate` runs the lists with given op times (in any
unit), honouring the dependencies (F after the previous stage's F; B/I after the next stage's B/I and this
stage's F; W after this stage's I), and reports per-rank bubble (idle time inside the makespan) and peak
activation memory (micro-batch chunks held from F until their full B or W). A schedule that cannot run
(deadlock) or that runs an F/B/W twice or never raises ValueError. `execute` runs one rank's op list for
real over torch.distributed point-to-point (gloo on CPU, NCCL on GPU) and `sync_copies` sums the gradients of
DualPipe's two copies of each chunk; a test checks the gradients against one process.

    sobre dualpipe --ranks 8 --micro-batches 20      # the DualPipe README's comparison table, simulated
"""

from __future__ import annotations

from dataclasses import dataclass

Part = tuple[str, int, int]  # (kind, direction, micro-batch)
Op = tuple[Part, ...]


def one_f_one_b(P: int, M: int, zero_bubble: bool = False) -> list[list[Op]]:
    """1F1B (Megatron) or, with zero_bubble, ZB-H1 (Qi et al. 2023): rank i runs, for x = 0, 1, ...,
    F_x then B_{x-(P-1-i)} (1F1B) or F_x, I_{x-(P-1-i)}, W_{x-(P-1)} (ZB-H1, same peak memory)."""
    _check(P, M)
    ranks = []
    for i in range(P):
        ops = []
        for x in range(M + P - 1):
            for kind, mb in (("F", x), ("I" if zero_bubble else "B", x - (P - 1 - i)),
                             ("W", x - (P - 1)) if zero_bubble else ("", -1)):
                if kind and 0 <= mb < M:
                    ops.append(((kind, 0, mb),))
        ranks.append(ops)
    return ranks


def dualpipe(P: int, M: int) -> list[list[Op]]:
    """DeepSeek's DualPipe for P ranks (even) and M micro-batches (even, >= 2P), M/2 per direction. The eight
    phases follow deepseek-ai/DualPipe; 'near' is the direction that enters the pipeline at this rank's end
    (direction 0 for ranks < P/2), 'far' the other."""
    _check(P, M)
    if P % 2 or M % 2 or M < 2 * P:
        raise ValueError(f"DualPipe needs an even number of ranks and an even M >= 2 * ranks; got P={P}, M={M}")
    return [_dualpipe_rank(P, M, r) for r in range(P)]


def _dualpipe_rank(P: int, M: int, r: int) -> list[Op]:
    H, C = P // 2, M // 2
    h = min(r, P - 1 - r)  # distance from the nearer end
    near, far = (0, 1) if r < H else (1, 0)
    middle = h == H - 1
    nxt = {("F", near): 0, ("F", far): 0, ("B", near): 0, ("B", far): 0}
    pending_w: list[Part] = []  # weight gradients left by I ops, run first in, first out
    ops: list[Op] = []

    def part(kind, d, split=False):
        mb = nxt[kind, d]
        nxt[kind, d] += 1
        if kind == "B" and split:
            pending_w.append(("W", d, mb))
            return ("I", d, mb)
        return (kind, d, mb)

    def w():
        return (pending_w.pop(0),)

    ops += [(part("F", near),) for _ in range(2 * (H - h - 1))]  # 1: near forwards
    for _ in range(h + 1):  # 2: near and far forwards
        ops += [(part("F", near),), (part("F", far),)]
    for _ in range(H - h - 1):  # 3: zero-bubble backward of the far direction, its W, a far forward
        ops += [(part("B", far, split=True),), w(), (part("F", far),)]
    for i in range(C - P + h + 1):  # 4: steady state, two overlapped F&B pairs
        if i == 0 and middle:  # DualPipe does not overlap the middle ranks' first pair (smaller bubble)
            ops += [(part("F", near),), (part("B", far),)]
        else:
            ops.append((part("F", near), part("B", far)))
        ops.append((part("F", far), part("B", near)))
    for _ in range(H - h - 1):  # 5
        ops += [(part("B", far),), (part("F", far), part("B", near))]
    split = False
    for i in range(h + 1):  # 6: backwards of both directions; the later half leaves W for later
        split |= i == (h + 1) // 2 and h % 2 == 1
        ops.append((part("B", far, split),))
        split |= i == (h + 1) // 2 and h % 2 == 0
        ops.append((part("B", near, split),))
    for _ in range(H - h - 1):  # 7
        ops += [w(), (part("B", near, split=True),)]
    ops += [w() for _ in range(len(pending_w))]  # 8: the rest of the weight gradients
    return ops


@dataclass
class Times:
    """Op durations: forward F, full backward B (= input part + W), weight part W, overlapped pair FB."""
    F: float = 1.0
    B: float = 2.0
    W: float = 1.0
    FB: float | None = None  # default F + B: overlap hides communication, not compute

    def __post_init__(self):
        if not (self.F > 0 and 0 <= self.W < self.B and (self.FB is None or self.FB > 0)):
            raise ValueError(f"op times need F > 0, 0 <= W < B and FB > 0; got F={self.F} B={self.B} W={self.W} "
                             f"FB={self.FB}")

    def of(self, op: Op) -> float:
        if len(op) == 2:
            return self.F + self.B if self.FB is None else self.FB
        return {"F": self.F, "B": self.B, "I": self.B - self.W, "W": self.W}[op[0][0]]


@dataclass
class Result:
    makespan: float
    bubble: list[float]  # per rank: makespan - busy time
    peak_activations: list[int]  # per rank, in micro-batch chunks
    timeline: list[list[tuple[float, float, Op]]]  # per rank: (start, end, op)


def simulate(schedule: list[list[Op]], times: Times, dualpipe: bool = False) -> Result:
    """Run every rank's op list in order, each op as soon as its rank is free and its inputs exist."""
    P = len(schedule)

    def rank_of(d, stage):  # direction 1 runs chunk `stage` on rank P-1-stage
        return stage if d == 0 else P - 1 - stage

    def stage_of(d, r):
        return r if d == 0 else P - 1 - r

    done: dict[tuple[str, int, int, int], float] = {}  # (kind, direction, mb, stage) -> finish time
    clock, pos = [0.0] * P, [0] * P
    timeline: list[list] = [[] for _ in range(P)]
    live, peak = [0] * P, [0] * P

    def deps(r, part):
        kind, d, mb = part
        s = stage_of(d, r)
        if kind == "F":
            return [("F", d, mb, s - 1)] if s > 0 else []
        if kind == "W":
            return [("I", d, mb, s)]
        need = [("F", d, mb, s)]
        if s < P - 1:
            need.append(("grad", d, mb, s + 1))  # the next stage's input gradient (from B or I)
        return need

    total = sum(len(ops) for ops in schedule)
    finished = 0
    while finished < total:
        progress = False
        for r in range(P):
            while pos[r] < len(schedule[r]):
                op = schedule[r][pos[r]]
                need = [k for p in op for k in deps(r, p)]
                if not all(k in done for k in need):
                    break
                start = max([clock[r]] + [done[k] for k in need])
                end = start + times.of(op)
                for kind, d, mb in op:
                    key = (kind, d, mb, stage_of(d, r))
                    if key in done:
                        raise ValueError(f"rank {r} runs {kind} of micro-batch {mb} (direction {d}) twice")
                    done[key] = end
                    if kind in "BI":
                        done["grad", d, mb, stage_of(d, r)] = end
                    live[r] += {"F": 1, "B": -1, "W": -1, "I": 0}[kind]
                    peak[r] = max(peak[r], live[r])
                timeline[r].append((start, end, op))
                clock[r], pos[r] = end, pos[r] + 1
                finished += 1
                progress = True
        if not progress:
            stuck = {r: schedule[r][pos[r]] for r in range(P) if pos[r] < len(schedule[r])}
            raise ValueError(f"schedule deadlocks; next ops per rank: {stuck}")
    _check_complete(schedule, done, dualpipe)
    makespan = max(clock)
    busy = [sum(times.of(op) for op in ops) for ops in schedule]
    return Result(makespan, [makespan - b for b in busy], peak, timeline)


def _check_complete(schedule, done, dualpipe):
    """Every (direction, micro-batch) ran F and a full backward (B, or I + W) once on every stage."""
    P = len(schedule)
    directions = (0, 1) if dualpipe else (0,)
    per_direction = sum(1 for ops in schedule for op in ops for p in op if p[0] == "F") // (P * len(directions))
    for d in directions:
        for mb in range(per_direction):
            for s in range(P):
                has_b = ("B", d, mb, s) in done
                has_split = ("I", d, mb, s) in done and ("W", d, mb, s) in done
                if ("F", d, mb, s) not in done or has_b == has_split:
                    raise ValueError(f"micro-batch {mb} (direction {d}) is not forwarded and backwarded once "
                                     f"on stage {s}")


def table(P: int, M: int, times: Times) -> list[dict]:
    """The DualPipe README's comparison: bubble (simulated max over ranks, and the README's formula),
    parameters per rank (in chunks) and peak activation memory (in micro-batch chunks)."""
    F, B, W = times.F, times.B, times.W
    FB = F + B if times.FB is None else times.FB
    rows = []
    for name, sched, formula, params in (
            ("1F1B", one_f_one_b(P, M), (P - 1) * (F + B), 1),
            ("ZB1P", one_f_one_b(P, M, zero_bubble=True), (P - 1) * (F + B - 2 * W), 1),
            ("DualPipe", dualpipe(P, M), (P / 2 - 1) * (FB + B - 3 * W), 2)):
        res = simulate(sched, times, dualpipe=name == "DualPipe")
        rows.append({"method": name, "bubble": max(res.bubble), "bubble_formula": formula, "params": params,
                     "activation": max(res.peak_activations), "makespan": res.makespan})
    return rows


def _check(P: int, M: int):
    if P < 2 or M < 1 or not (isinstance(P, int) and isinstance(M, int)):
        raise ValueError(f"need at least 2 ranks and 1 micro-batch; got P={P}, M={M}")


def execute(ops: list[Op], chunks: dict, inputs: dict, targets: dict, loss_fn, shape, group=None) -> float:
    """Run this rank's ops: chunks {direction: the module this rank runs for it}; inputs / targets
    {(direction, mb): tensor} where that direction starts / ends; activations and gradients crossing ranks
    have `shape`. Parameter gradients accumulate in the chunks (summed over micro-batches). F&B pairs run
    one after the other (overlapping them needs streams, not a CPU). Returns the summed loss of the
    directions that end on this rank."""
    import torch
    import torch.distributed as dist
    P, r = dist.get_world_size(group), dist.get_rank(group)
    saved, pending, sends, total = {}, {}, [], 0.0

    def stage(d):
        return r if d == 0 else P - 1 - r

    def peer(d, ahead):  # the rank running the next (ahead) or previous stage of direction d
        return r + (1 if (d == 0) == ahead else -1)

    def tag(grad, d, mb):
        return (2 * grad + d) * (1 << 20) + mb

    for op in ops:
        for kind, d, mb in op:
            s = stage(d)
            if kind == "F":
                x = inputs[d, mb] if s == 0 else torch.empty(shape)
                if s > 0:
                    dist.recv(x, peer(d, False), group, tag=tag(0, d, mb))
                    x.requires_grad_()
                y = chunks[d](x)
                if s == P - 1:
                    y = loss_fn(y, targets[d, mb])
                    total += float(y.detach())
                else:
                    out = y.detach().contiguous()
                    sends.append((dist.isend(out, peer(d, True), group, tag=tag(0, d, mb)), out))
                saved[d, mb] = (x, y)
            elif kind in "BI":
                x, y = saved.pop((d, mb))
                g = None
                if s < P - 1:
                    g = torch.empty(shape)
                    dist.recv(g, peer(d, True), group, tag=tag(1, d, mb))
                if kind == "B":
                    torch.autograd.backward(y, g)  # parameter and input gradients at once
                    gx = x.grad
                else:  # input gradient now, the weight gradient (W) later from the kept graph
                    gx = torch.autograd.grad(y, x, g, retain_graph=True)[0] if s > 0 else None
                    pending[d, mb] = (y, g)
                if s > 0:
                    sends.append((dist.isend(gx.contiguous(), peer(d, False), group, tag=tag(1, d, mb)), gx))
            else:  # W
                y, g = pending.pop((d, mb))
                params = [p for p in chunks[d].parameters() if p.requires_grad]
                for p, gp in zip(params, torch.autograd.grad(y, params, g)):
                    p.grad = gp if p.grad is None else p.grad + gp
    for work, _ in sends:
        work.wait()
    return total


def sync_copies(chunks: dict, group=None):
    """DualPipe keeps chunk s on ranks s (direction 0) and P-1-s (direction 1): ranks r and P-1-r hold the same
    two chunks, so they swap gradients and each adds its partner's copy to its own."""
    import torch
    import torch.distributed as dist
    P, r = dist.get_world_size(group), dist.get_rank(group)
    partner = P - 1 - r
    flat = [torch.cat([p.grad.flatten() for p in chunks[d].parameters()]) for d in (0, 1)]
    theirs = [torch.empty_like(f) for f in flat]
    works = [dist.isend(flat[d], partner, group, tag=d) for d in (0, 1)]
    for d in (0, 1):
        dist.recv(theirs[d], partner, group, tag=d)
    for w in works:
        w.wait()
    for d in (0, 1):  # my copy of direction d's chunk is the partner's copy for the other direction
        i = 0
        for p in chunks[d].parameters():
            p.grad += theirs[1 - d][i:i + p.numel()].view_as(p)
            i += p.numel()


def plot(res: Result, path: str):
    """Timeline PNG: one row per rank, forwards light, backwards dark, W grey, overlapped pairs outlined;
    direction 1 hatched, micro-batch numbers on the cells (as in DualPipe's README figure)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    P = len(res.timeline)
    fig, ax = plt.subplots(figsize=(max(8, res.makespan / 3), 0.45 * P + 1))
    colour = {"F": "#f6c28b", "B": "#7fb77e", "I": "#9fd39e", "W": "#7da7d9"}
    for r, row in enumerate(res.timeline):
        for start, end, op in row:
            width = (end - start) / len(op)
            for j, (kind, d, mb) in enumerate(op):
                x = start + j * width
                ax.barh(r, width, left=x, color=colour[kind], hatch="//" if d else None,
                        edgecolor="black" if len(op) == 2 else "white", linewidth=0.6)
                ax.text(x + width / 2, r, str(mb), ha="center", va="center", fontsize=6)
    ax.set_yticks(range(P), [f"rank {r}" for r in range(P)])
    ax.invert_yaxis()
    ax.set_xlabel("time")
    ax.set_title("DualPipe (F orange, B green, I light green, W blue; direction 1 hatched)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
