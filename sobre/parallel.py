"""Parallelism, applied from outside an unmodified model (as torchtitan): torchrun initialisation, FSDP2
data parallel (`fully_shard` per block), post-training's data parallel over whole replicas (summed gradients) and
expert parallel (each rank owns E / world experts; tokens go to their experts and back with two all-to-alls).
gloo on CPU, NCCL on GPU."""

from __future__ import annotations

import copy
import ctypes
import functools
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from .experts import stacked_weight
from .model import Transformer
from .moe import moe_layers


def pick_device(name: str = "auto") -> torch.device:
    """A --device value: `auto` (the GPU when torch sees one, else the CPU) or a torch device name (cpu, cuda,
    cuda:N, mps); a device this machine does not have is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device name: use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA GPU here (a CPU-only torch build, or no GPU); "
                         "use --device cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: Apple's MPS backend is not available here")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: sobre runs on cpu, cuda or mps")
    return dev


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory in the process for the next allocation, as MALLOC_MMAP_MAX_=0
    MALLOC_TRIM_THRESHOLD_=2147483647 in the environment would; True when set. By default glibc maps every
    large allocation (above 128 KB, a threshold that rises to at most 32 MB) fresh from the kernel and unmaps
    it when freed, and trims the heap's free top, so a [256, 4096] fp32 temporary made each step page-faults
    its 1024 pages again every time; on the 2-core VMs measured here that can cost more than the arithmetic
    (bench/grpo.py's update, the two settings taking turns in one process: 1.38 -> 0.90 s). Memory freed
    stays reserved by the process (up to 2 GiB of heap top; above that glibc trims as before). Called by CPU
    engines and runs; nothing changes off Linux/glibc, or when the environment sets MALLOC_MMAP_MAX_ or
    MALLOC_TRIM_THRESHOLD_ itself, or SOBRE_KEEP_FREED_MEMORY=0."""
    env = os.environ
    if (sys.platform != "linux" or env.get("SOBRE_KEEP_FREED_MEMORY") == "0"
            or "MALLOC_MMAP_MAX_" in env or "MALLOC_TRIM_THRESHOLD_" in env):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no libc.so.6)
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def init(device: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world, device); a plain `python` run is rank 0 of 1 on `device` (pick_device). Under torchrun
    each rank takes the GPU of its LOCAL_RANK (NCCL) unless --device cpu (gloo)."""
    if "RANK" not in os.environ:
        return 0, 1, pick_device(device)
    cuda = pick_device(device).type == "cuda"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # on GPUs the small host-side reductions (losses, seeds, norms) take gloo
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


# ---- data parallel over whole replicas (post-training: sft, distill, grpo) -------------------------------
# Every rank holds the whole model (the engine's rollouts need it), takes its share of each batch, and its loss
# carries the whole batch's normalisers, so the ranks' gradients summed are the whole batch's gradient: the
# replicas take the same optimizer steps and stay equal (DDP's semantics, without wrapping the model).
BUCKET = 1 << 25  # elements an all-reduce of gradients takes at once (128 MB of fp32)


def rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def split_over(n: int, flag: str) -> int:
    """This rank's share of a per-step count given by `flag` (a clear error when the processes do not divide it)."""
    world = rank_world()[1]
    if n % world:
        raise ValueError(f"{flag} {n} does not split over {world} processes")
    return n // world


def all_sum(*xs: float) -> list[float]:
    """Each value summed over the ranks (as given in one process)."""
    if rank_world()[1] == 1:
        return list(xs)
    t = torch.tensor(xs, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(x) -> list:
    """[rank 0's x, rank 1's, ...] ([x] in one process)."""
    world = rank_world()[1]
    if world == 1:
        return [x]
    out = [None] * world
    dist.all_gather_object(out, x)
    return out


def all_reduce_(tensors) -> None:
    """Sum each tensor over the ranks in place (router loads, gradients), BUCKET elements a collective."""
    tensors = list(tensors)
    if rank_world()[1] == 1 or not tensors:
        return
    bucket: list[torch.Tensor] = []  # consecutive tensors of one device and dtype, `size` elements
    size = 0
    for t in tensors + [None]:
        if bucket and (t is None or t.device != bucket[0].device or t.dtype != bucket[0].dtype
                       or size + t.numel() > BUCKET):
            flat = torch.cat([b.flatten() for b in bucket])
            dist.all_reduce(flat)
            for b, part in zip(bucket, flat.split([b.numel() for b in bucket])):
                b.copy_(part.view_as(b))
            bucket, size = [], 0
        if t is not None:
            bucket.append(t)
            size += t.numel()


def sync_grads(model: nn.Module, average: bool = False) -> None:
    """Sum (average) every rank's gradients of replicated parameters (data parallel over replicas; nothing in one
    process; FSDP-sharded parameters' are its reduce-scatter's, an average). A trainable parameter no
    rank's backward reached keeps no gradient; one that some rank's did gets zeros where the others' did not
    (a rank with no rows this step joins with zeros)."""
    from torch.distributed.tensor import DTensor
    if rank_world()[1] == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad and not isinstance(p, DTensor)]  # (not FSDP's)
    reached = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
    dist.all_reduce(reached)
    live = [p for p, n in zip(params, reached.tolist()) if n]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_(p.grad for p in live)
    if average:
        for p in live:
            p.grad.div_(rank_world()[1])


def barrier() -> None:
    """Every rank waits for the others here (nothing in one process)."""
    if rank_world()[1] > 1:
        dist.barrier()


def rank_zero_first(fn):
    """fn() on rank 0, then on the others: what it writes to the shared run folder (a tokenizer, a Hub download)
    is made once and read by the rest."""
    rank = rank_world()[0]
    out = fn() if rank == 0 else None
    barrier()
    return fn() if rank else out


def finish() -> None:
    """The end of a torchrun run: every rank waits for rank 0 (its export), then leaves the process group."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class ExpertParallel(nn.Module):
    """Drop-in for a routed-experts module (moe.Experts, v4.Experts: stacked [E, ...] parameters and a
    `grouped(rows, counts, *weights)` method) holding only this rank's physical experts, under the same
    parameter names. Tokens go to the rank holding their expert and back with two all-to-alls.

    placement (phy2log [slots], e.g. one layer of EPLB's rebalance_experts) names the logical expert in each
    physical slot, slots / world consecutive slots per rank; default: slot e holds expert e (no redundancy).
    A token's pair for expert e goes to replica (token index % replicas of e), so a hot expert's tokens spread
    over its copies. Redundant copies are for inference: training keeps one copy of each expert.
    replicated_input: every rank holds the same tokens (the engine runs one batch on every rank); each rank
    dispatches its 1/world share and the outputs are all-gathered (inference only)."""

    def __init__(self, experts: nn.Module, group=None, placement=None, replicated_input=False):
        super().__init__()
        if not hasattr(experts, "grouped"):
            raise ValueError(f"expert parallel shards stacked bf16/fp32 experts, not {type(experts).__name__} "
                             "(load the model without --fp8)")
        self.group, self.replicated_input = group, replicated_input
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.names = [n for n, _ in experts.named_parameters()]
        weight = getattr(experts, self.names[0])
        E = weight.shape[0]
        placement = torch.arange(E) if placement is None else torch.as_tensor(placement, dtype=torch.long).cpu()
        if placement.numel() % self.world:
            raise ValueError(f"expert parallel: {placement.numel()} physical experts do not divide over "
                             f"{self.world} ranks")
        count = torch.bincount(placement, minlength=E)
        if placement.min() < 0 or len(count) > E or (count == 0).any():
            raise ValueError(f"expert parallel: the placement must hold each of the {E} experts at least once")
        self.n_experts, self.n_slots, self.local = E, placement.numel(), placement.numel() // self.world
        mine = placement[self.rank * self.local:(self.rank + 1) * self.local]
        for n in self.names:  # (stacked [E, out, in] weights keep their transposed storage)
            t = getattr(experts, n).detach()[mine]
            setattr(self, n, stacked_weight(t) if t.dim() == 3 else nn.Parameter(t.clone()))
        impl = copy.copy(experts)  # the experts' FFN without their weights (it gets this rank's slices)
        impl._parameters = {}
        self.grouped = impl.grouped
        by_expert = placement.argsort(stable=True)  # slots grouped by the expert they hold
        first = count.cumsum(0) - count
        j = torch.minimum(torch.arange(int(count.max()))[None], count[:, None] - 1)  # pad with the last copy
        replicas = by_expert[first[:, None] + j]  # [E, max copies]: the slots holding each expert
        self.register_buffer("replicas", replicas.to(weight.device), persistent=False)
        self.register_buffer("count", count.to(weight.device), persistent=False)

    @torch.compiler.disable  # eager under --compile, as experts.dispatch: host-side counts, collectives
    def forward(self, x, w, idx):  # x [N, D], w/idx [N, K] with logical expert ids -> [N, D]
        if not self.replicated_input:
            return self._dispatch(x, w, idx, 0)
        sizes = [len(c) for c in torch.arange(x.shape[0]).tensor_split(self.world)]
        lo, n = sum(sizes[:self.rank]), sizes[self.rank]
        y = x.new_zeros(max(sizes), x.shape[1])
        y[:n] = self._dispatch(x[lo:lo + n], w[lo:lo + n], idx[lo:lo + n], lo)
        parts = [torch.empty_like(y) for _ in range(self.world)]
        dist.all_gather(parts, y, group=self.group)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    def _dispatch(self, x, w, idx, first_token: int):
        N, K = idx.shape
        token_id = torch.arange(first_token, first_token + N, device=idx.device).unsqueeze(1)
        slot = self.replicas[idx, token_id % self.count[idx]].flatten()  # [N*K] physical slot of each pair
        order = slot.argsort(stable=True)  # pairs grouped by slot, hence by owning rank
        token = order // K
        counts = torch.bincount(slot, minlength=self.n_slots)  # [world * local]: what we send, per slot
        self.last_slot_load = counts.detach()  # this rank's pairs per physical slot (replica use, stats)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)  # [source rank, local slot]
        send = counts.view(self.world, self.local).sum(1).tolist()
        recv = recv_counts.view(self.world, self.local).sum(1).tolist()
        got = _AllToAll.apply(x.index_select(0, token), recv, send, self.group)  # [sum(recv), D]
        # received rows come in [source][local slot] blocks: regroup by slot, run, restore the order
        slot_of_row = torch.arange(self.local, device=x.device).repeat(self.world).repeat_interleave(recv_counts)
        perm = slot_of_row.argsort(stable=True)
        out = self.grouped(got.index_select(0, perm), recv_counts.view(self.world, self.local).sum(0).tolist(),
                           *(getattr(self, n) for n in self.names))
        out = out.index_select(0, perm.argsort())
        back = _AllToAll.apply(out, send, recv, self.group)  # [N*K, D]
        back = back * w.flatten().index_select(0, order).unsqueeze(-1)
        return torch.zeros_like(x, dtype=back.dtype).index_add(0, token, back).to(x.dtype)


def _exchange(x, recv: list[int], send: list[int], group):
    """Rows x [sum(send), D] leave in `send` blocks (one per rank) and arrive in `recv` blocks."""
    out = x.new_empty(sum(recv), x.shape[1])
    dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """_exchange whose gradient takes the way back (a blocking collective: functional collectives' async
    work left gloo aborting at exit now and then)."""

    @staticmethod
    def forward(ctx, x, recv, send, group):
        ctx.route = (send, recv, group)
        return _exchange(x, recv, send, group)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, *ctx.route), None, None, None


def apply_expert_parallel(model: Transformer, group=None, placement=None, replicated_input=False) -> Transformer:
    """Swap every MoE's experts for this rank's slice. placement: one phy2log row per MoE of the main layers
    (MTP layers keep one copy of each expert); None = no redundant experts."""
    main = moe_layers(model.layers)
    if placement is not None and len(placement) != len(main):
        raise ValueError(f"expert placement has {len(placement)} rows for {len(main)} MoE layers")
    rows = {id(m): p for m, p in zip(main, placement if placement is not None else [None] * len(main))}
    moes = moe_layers(model)
    if not moes:
        raise ValueError("expert parallel: the model has no MoE layers")
    for m in moes:
        m.experts = ExpertParallel(m.experts, group, rows.get(id(m)), replicated_input)
    return model


def expert_parallel_inference(model: Transformer, redundant: int = 0, loads=None, calibrate: list[int] = ()):
    """Shard a loaded model's experts over the torchrun ranks for the engine (every rank runs the same batch).
    With `redundant` extra physical experts per layer, EPLB places them from `loads` ([moe layers, experts]:
    a training run's expert_load or a JSON matrix, see eplb.run_loads) or, without loads, from the loads
    measured on the `calibrate` token ids. Returns the placement (phy2log [layers, slots])."""
    from .eplb import rebalance_experts
    from .report import expert_loads
    world = dist.get_world_size()
    E = model.config.n_routed_experts
    placement = None
    if redundant:
        if loads is None:
            if len(calibrate) < 2:
                raise ValueError("redundant experts need expert loads (--expert-loads) or a prompt to measure")
            loads = expert_loads(model, list(calibrate))
        loads = torch.as_tensor(loads, dtype=torch.float64)
        if loads.shape[-1] != E:
            raise ValueError(f"expert loads have {loads.shape[-1]} experts per layer; the model has {E}")
        placement, _, _ = rebalance_experts(loads, E + redundant, 1, 1, world)
    apply_expert_parallel(model, placement=placement, replicated_input=True)
    return placement


def apply_fsdp(model: Transformer, root: bool = True):
    """FSDP2: shard every block, then the rest (embedding, head, final norm) at the root. Expert-parallel
    slices are already split over ranks: FSDP leaves them alone. FSDP2 takes contiguous parameters only: stacked
    expert weights (stored transposed, experts.stacked_weight) are laid out plainly first. root=False
    (post-training, whose losses call the model's parts, not its forward): the blocks alone; the embedding, head
    and norm stay replicated (sync_grads)."""
    from torch.distributed.fsdp import fully_shard
    ignored = {p for m in model.modules() if isinstance(m, ExpertParallel) for p in m.parameters()} or None
    for p in model.parameters():
        if p not in (ignored or ()) and not p.is_contiguous():
            p.data = p.data.contiguous()
    for block in list(model.layers) + list(model.mtp):  # (resharded after each forward even where a block is
        #   its own root, root=False: FSDP2 keeps a root's weights whole until a backward, and a no-grad forward
        #   of GRPO's reference has none)
        fully_shard(block, ignored_params=ignored, reshard_after_forward=True)
    if root:
        fully_shard(model, ignored_params=ignored)
    return model


def sharded(model: nn.Module) -> bool:
    """Whether FSDP2 shards any of the model's parameters (DTensors)."""
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())


def whole(t: torch.Tensor) -> torch.Tensor:
    """t, or the whole tensor of an FSDP2 shard (all-gathered: every rank calls it)."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def copy_whole(dst: nn.Module, src: nn.Module) -> None:
    """dst's parameters and buffers := src's whole ones, by name: each FSDP2 shard of src all-gathered, its
    replicated tensors copied (every rank calls it); src's frozen parameters (a LoRA run's model, the MTP module)
    are left as dst holds them, a copy made before src was sharded. GRPO's rollouts on sharded weights: a whole
    copy refreshed after every update, as TRL syncs vLLM's weights."""
    theirs = dict(src.named_parameters()) | dict(src.named_buffers())
    for name, t in list(dst.named_parameters()) + list(dst.named_buffers()):
        s = theirs[name]
        if not isinstance(s, nn.Parameter) or s.requires_grad:
            reclaim(t).copy_(whole(s))  # (released through an update: its memory again)


def release_whole(dst: nn.Module, src: nn.Module) -> None:
    """Free the memory of dst's parameters that copy_whole refreshes from src (those src trains) until copy_whole
    fills them again: GRPO's whole copy of the weights is not held through the update (TRL's vLLM sleep mode)."""
    theirs = dict(src.named_parameters())
    for name, t in dst.named_parameters():
        if theirs[name].requires_grad:
            release(t)


def release(t: torch.Tensor) -> None:
    """Free t's memory (its shape kept; its values gone until reclaim gives the memory back and they are written)."""
    t.untyped_storage().resize_(0)


def reclaim(t: torch.Tensor) -> torch.Tensor:
    """t with memory again where release freed it (its values to be written), else t as it is."""
    if t.untyped_storage().nbytes() == 0 < t.numel():
        t.untyped_storage().resize_((t.storage_offset() + t.numel()) * t.element_size())
    return t


def local(t: torch.Tensor) -> torch.Tensor:
    """t, or this rank's shard of an FSDP2-sharded t (its storage: written in place, the DTensor changes)."""
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


def whole_state(module: nn.Module) -> dict:
    """module's state dict as whole CPU tensors (each FSDP2 shard all-gathered: every rank calls it)."""
    return {k: whole(v).detach().cpu() for k, v in module.state_dict().items()}


@torch.no_grad()
def load_whole_state(module: nn.Module, state: dict):
    """The inverse of whole_state, on every rank: an FSDP2-sharded tensor takes its own shard of the whole one."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    for k, t in module.state_dict().items():
        src = state[k].to(t.device, t.dtype)
        t.copy_(distribute_tensor(src, t.device_mesh, t.placements) if isinstance(t, DTensor) else src)


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
    dev = next((p.grad.device for p in model.parameters() if p.grad is not None), torch.device("cpu"))
    split, whole = torch.zeros((), device=dev), torch.zeros((), device=dev)  # squares of disjoint per-rank pieces /
    for p in model.parameters():  # of full copies (summed on the device: one host sync, not one per parameter)
        if p.grad is None:
            continue
        if isinstance(p.grad, DTensor):
            split += p.grad.to_local().float().pow(2).sum()
        elif id(p) in expert_ids:
            split += p.grad.float().pow(2).sum()
        else:
            whole += p.grad.float().pow(2).sum()
    split, whole = split.cpu(), whole.cpu()
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
            for w in m.names:
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


def load_full_state(model: nn.Module, opt: torch.optim.Optimizer, msd: dict, osd: dict, strict: bool = True):
    """Inverse of full_state, on every rank: each rank keeps its shard / expert slice. strict=False: msd may hold
    some of the model's tensors only (a LoRA run's adapters), the rest left as they are."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    msd, osd = dict(msd), {"state": {k: dict(v) for k, v in osd["state"].items()}, "param_groups": osd["param_groups"]}
    for name, m in model.named_modules():
        if isinstance(m, ExpertParallel):
            lo = dist.get_rank(m.group) * m.local
            for w in m.names:
                key = f"{name}.{w}"
                msd[key] = msd[key][lo:lo + m.local]
                for k, v in osd["state"].get(key, {}).items():
                    if torch.is_tensor(v) and v.dim() > 0:
                        osd["state"][key][k] = v[lo:lo + m.local]
    opts = StateDictOptions(full_state_dict=True, strict=strict)
    set_model_state_dict(model, msd, options=opts)
    set_optimizer_state_dict(model, getattr(opt, "optimizers", opt), osd, options=opts)


def _gather(t: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts).cpu()
