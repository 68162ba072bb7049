"""The engine's paged cache: a pool of fixed-size blocks every sequence's cache rows live in (as vLLM and
FlashMLA page theirs), one forward's view of it in the model's cache protocol (PagedBatch), and the decode step
compiled over it (compiled_decode).

MLA models keep the latent c_kv [kv_lora_rank] and the rope key k_pe [qk_rope_head_dim] per token and layer,
dense models K/V, DSA the indexer key beside, NSA also its compressed entries per block; deepseek_v4 keeps
per-block compressed entries plus per-sequence rings (v4cache). Block 0 is a zero "null" block that padded
positions of a ragged batch read from (and that masks then hide). Prefix-cache keys live here too: every block
filled entirely with prompt tokens is keyed by a sha256 chained over the prompt up to its end.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import sparse, v4cache
from .host import int_rows, ints
from .model import Transformer

if TYPE_CHECKING:
    from .request import Sequence

BLOCK = 64


class PagedPool:
    """Per-layer slot arrays [n_blocks * block, ...] and a free list of blocks (block 0 stays reserved)."""

    def __init__(self, model: Transformer, n_blocks: int, block: int = BLOCK, lanes: int = 64):
        c = model.config
        p = next(model.parameters())
        self.config, self.block, self.n_blocks, self.device = c, block, n_blocks, p.device
        if c.arch == "deepseek_v4":  # compressed entries by block, windows and projections per lane (v4cache)
            self.slots, self.rings = v4cache.storage(c, n_blocks, block, lanes, p.dtype, p.device)
        else:
            shapes = [(c.kv_lora_rank + c.qk_rope_head_dim,)] if c.is_mla else [(c.kv_heads, c.dense_head_dim)] * 2
            if c.attn_type == "dsa":
                shapes.append((c.index_head_dim,))  # the lightning indexer's key per token
            self.slots = [[torch.zeros(n_blocks * block, *s, dtype=p.dtype, device=p.device) for s in shapes]
                          for _ in range(c.n_layers + c.n_mtp_layers)]
            self.rings = []
        # NSA: compressed K/V entries paged like the tokens, entry i in the block of its last token
        # i * stride + nsa_block - 1 (so a block's entries depend on its own and earlier tokens only: shareable by
        # the prefix cache), at row i + entry_shift of the per-block entry rows
        self.per_block = block // c.nsa_stride if c.attn_type == "nsa" and block % c.nsa_stride == 0 else 0
        self.entry_shift = (c.nsa_block - 1) // c.nsa_stride if self.per_block else 0
        self.compressed = [[torch.zeros(n_blocks * self.per_block, c.kv_heads, c.dense_head_dim, dtype=p.dtype,
                                        device=p.device) for _ in range(2)] for _ in range(c.n_layers)] \
            if self.per_block else []
        self.routes: list[torch.Tensor] = []  # keep_routes: per MoE layer each slot's experts [n_slots, K]
        self.free = list(range(n_blocks - 1, 0, -1))
        self.lanes = list(range(lanes - 1, -1, -1))  # a running sequence's row in the rings
        self.users = [0] * n_blocks  # sequences holding each block
        self.cached: dict[bytes, int] = {}  # prefix key -> block
        self.key_of: dict[int, bytes] = {}
        self.idle: OrderedDict[bytes, int] = OrderedDict()  # cached blocks nobody holds, least recently freed first
        # deepseek_v4: a lane's ring rows at a cached block's end (the MTP layer's too when speculative), least
        # recently used first, at most as many bytes as the blocks themselves (a lane's rings weigh ~11 blocks'
        # entries for the debug model)
        self.rings_at: OrderedDict[bytes, list[torch.Tensor]] = OrderedDict()
        # per token of context (what grows with it), and per running sequence (fixed: the rings)
        self.bytes_per_token = sum(t[0].numel() * t.element_size() * (t.shape[0] // n_blocks)
                                   for layer in self.slots[:c.n_layers] + self.compressed for t in layer) / block
        self.lane_bytes = sum(t[0].numel() * t.element_size() for layer in self.rings for t in layer)
        self.max_rings_at = max(1, int(self.bytes_per_token * block * n_blocks // self.lane_bytes)) if self.rings else 0

    def keep_routes(self, layers: int, k: int):
        """Room for the experts each of `layers` MoE layers routes every slot's token to (Engine(keep_routing=True)):
        paged with the cache, so the prefix cache, a prompt's twins and moved blocks carry them along."""
        self.routes = [torch.zeros(self.n_blocks * self.block, k, dtype=torch.int16, device=self.device)
                       for _ in range(layers)]

    def store_routes(self, slots: torch.Tensor | slice, layers: list):
        """keep_routes: the experts each MoE layer of `layers` routed the rows of the forward just made to (their
        last_idx [R, K]), stored at the rows' slots (their pool rows [B, T] in row order, or a slice of them)."""
        slots = slots if type(slots) is slice else slots.flatten()
        for store, m in zip(self.routes, layers):
            store[slots] = torch.as_tensor(m.last_idx, device=self.device).to(store.dtype)

    def first_slots(self, seq: Sequence, n: int) -> torch.Tensor:
        """The pool rows of seq's positions 0..n-1 [n]."""
        return paged_rows(self.block_table([seq], n), torch.arange(n, device=self.device)[None], self.block)[0]

    def routes_of(self, seq: Sequence) -> torch.Tensor:
        """keep_routes: the experts of every position seq's cache holds [layers, seq.length, K]."""
        slots = self.first_slots(seq, seq.length)
        return torch.stack([store[slots] for store in self.routes])

    def copy_prompt(self, src: Sequence, dst: Sequence):
        """dst's cache gets src's prompt entries (every layer, and the kept routing), as if dst had been prefilled
        itself (a prompt's twins: n samples, GRPO's groups)."""
        n = len(src.prompt)
        a, b = self.first_slots(src, n), self.first_slots(dst, n)
        if self.rings:
            v4cache.copy_prompt(self, src, dst, n)
        for layer in ([] if self.rings else self.slots) + [self.routes]:
            for t in layer:
                t[b] = t[a]
        dst.length = n

    def keep_run(self, s: Sequence, running: list[Sequence]):
        """s leaves a run of blocks (run()): the run's last running sequence moves its cache into s's blocks and
        takes them, so the rows still running stay a run, read as views of the pool (one sequence's cache copied
        once instead of every row's blocks gathered at every later step). Not for blocks shared or keyed by the
        prefix cache, nor NSA's or V4's per-block entries and rings."""
        if not s.blocks or self.rings or self.compressed:
            return
        rows = sorted(running + [s], key=lambda x: x.blocks[0])
        last = rows[-1]
        if last is s or len(last.blocks) != len(s.blocks) or last.params.max_new_tokens - len(last.out) <= 1 or \
                self.run(rows, len(s.blocks)) is None or \
                any(self.users[b] > 1 or b in self.key_of for b in s.blocks + last.blocks):
            return
        src, dst = (torch.tensor(x.blocks, device=self.device) for x in (last, s))
        for layer in self.slots + [self.routes]:
            for t in layer:
                blocks = t.view(self.n_blocks, self.block, *t.shape[1:])
                blocks[dst] = blocks[src]
        s.blocks, last.blocks = last.blocks, s.blocks

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block)

    def run(self, seqs: list[Sequence], nb: int) -> tuple[int, int] | None:
        """(first, step) when row b's blocks among the first nb are blocks first + b * step, first + b * step + 1,
        ... (sequences admitted together reserve consecutive blocks in turn: a GRPO group, a batch of prompts),
        so that a read of every row's nb blocks is a strided view of the pool (PagedStep.read); else None."""
        first = seqs[0].blocks[0] if seqs[0].blocks else 0
        step = seqs[1].blocks[0] - first if len(seqs) > 1 and seqs[1].blocks else nb
        if first < 1 or step < 1 or first + (len(seqs) - 1) * step + nb > self.n_blocks:
            return None
        for b, s in enumerate(seqs):
            start = first + b * step
            own = s.blocks[:nb]
            if not own or own[0] != start or own != list(range(start, start + len(own))):
                return None
        return first, step

    def block_table(self, seqs: list[Sequence], n_tokens: int) -> torch.Tensor:
        """[B, blocks_for(n_tokens)]: each sequence's blocks covering n_tokens, padded with the null block 0."""
        nb = self.blocks_for(n_tokens)
        return int_rows([s.blocks[:nb] + [0] * (nb - len(s.blocks[:nb])) for s in seqs], self.device)

    def available(self) -> int:
        """Blocks a reservation may take: free ones and cached ones no sequence holds (evicted on demand)."""
        return len(self.free) + len(self.idle)

    def reserve(self, seq: Sequence, n_tokens: int):
        need = self.blocks_for(n_tokens) - len(seq.blocks)
        if need > self.available():
            raise RuntimeError("cache pool exhausted")
        for _ in range(max(need, 0)):
            if not self.free:  # evict the least recently freed cached block
                key, b = self.idle.popitem(last=False)
                del self.cached[key], self.key_of[b]
                self.rings_at.pop(key, None)
                self.free.append(b)
            b = self.free.pop()
            self.users[b] += 1
            seq.blocks.append(b)
        if seq.lane is None:
            seq.lane = self.lanes.pop()

    def release(self, seq: Sequence):
        """Give back seq's blocks, last first: under eviction a cached prompt loses its tail before its head,
        and a head is what later prompts can still match."""
        for b in reversed(seq.blocks):
            self.users[b] -= 1
            if not self.users[b]:
                if b in self.key_of:
                    self.idle[self.key_of[b]] = b
                else:
                    self.free.append(b)
        seq.blocks = []
        if seq.lane is not None:
            self.lanes.append(seq.lane)
            seq.lane = None

    def prefix_keys(self, prompt: list[int], ahead: int = 0, salt: str = "") -> list[bytes]:
        """One key per full block of the prompt: sha256 chained over the tokens up to the block's end, and the
        `ahead` tokens after it (an MTP draft layer's row at a position depends on the next token too), from
        `salt` (a LoRA adapter's name: its rows differ from the base model's)."""
        keys, h = [], hashlib.sha256(salt.encode())

        def digest(x):
            return np.array(x, dtype=np.int64).tobytes()

        for end in range(self.block, len(prompt) - ahead + 1, self.block):
            h.update(digest(prompt[end - self.block:end]))
            key = h.copy()
            key.update(digest(prompt[end:end + ahead]))
            keys.append(key.digest())
        return keys

    def match(self, seq: Sequence, keys: list[bytes]) -> int:
        """Give seq the cached blocks its prompt (keys: prefix_keys of it) starts with, leaving >= 1 token to
        prefill (NSA: with the compressed entries those blocks hold; deepseek_v4: up to the last block whose ring
        rows are kept, restored into seq's lane); -> tokens reused."""
        hits = []
        for key in keys[:(len(seq.prompt) - 1) // self.block]:
            if key not in self.cached:
                break
            hits.append(key)
        while self.rings and hits and hits[-1] not in self.rings_at:
            hits.pop()
        for key in hits:
            self.idle.pop(key, None)
            b = self.cached[key]
            self.users[b] += 1
            seq.blocks.append(b)
        n = len(hits) * self.block
        if self.per_block:  # a block keeps the entries ending in it: those its tokens complete
            seq.entries = sparse.n_complete(n, self.config.nsa_block, self.config.nsa_stride)
        if self.rings and hits:
            self.restore_rings(seq, hits[-1], n)
        return n

    def restore_rings(self, seq: Sequence, key: bytes, n: int):
        """deepseek_v4: seq's lane (taken now) gets the ring rows kept at the end of the cached block `key`,
        as if seq had prefilled its first n tokens itself."""
        if seq.lane is None:
            seq.lane = self.lanes.pop()
        self.rings_at.move_to_end(key)
        lane = torch.tensor([seq.lane], device=self.device)
        for ring, rows in zip((r for layer in self.rings for r in layer), self.rings_at[key]):
            pos = torch.arange(n - len(rows), n, device=self.device)
            v4cache.ring_write(ring, lane, pos[None], rows[None])

    def remember(self, seq: Sequence, keys: list[bytes]):
        """Key seq's full prompt blocks (just prefilled; keys: prefix_keys of its prompt) for later prompts
        (deepseek_v4: with the ring rows its prefill kept at their ends)."""
        for i, (key, b) in enumerate(zip(keys, seq.blocks)):
            if key not in self.cached and b not in self.key_of:
                self.cached[key], self.key_of[b] = b, key
            rows = seq.rings_at.get((i + 1) * self.block)
            if rows is not None and key in self.cached and key not in self.rings_at:  # (rows: the prefix's alone)
                self.rings_at[key] = rows
                if len(self.rings_at) > self.max_rings_at:
                    self.rings_at.popitem(last=False)
        seq.rings_at = {}


def paged_rows(table: torch.Tensor, idx: torch.Tensor, size: int) -> torch.Tensor:
    """Rows of a pool paged in blocks of `size` rows: idx [B, X] (each sequence's own positions, or entry numbers)
    through the block table [B, nb] -> [B, X]."""
    return table.gather(1, idx // size) * size + idx % size


class PagedStep:
    """One decode step (a new token per row at positions pos [B, 1]) over the pool's per-layer slot arrays, from
    tensors alone: what Engine(compile=True) traces, with batch size and context dynamic (no sequences, no
    host-side lengths). Every row reads all its blocks (table [B, nb]); the mask hides keys past its position.
    Reads gather whole blocks ([B, nb, 64, ...], one index per block, not per token)."""

    run = None  # PagedBatch: (first, step) of the rows' blocks when in a run (PagedPool.run)
    folds = None  # an engine's batch: its folded MLA projections by layer (absorb.py; None: the unfolded path)

    def __init__(self, layers: list[list[torch.Tensor]], table: torch.Tensor, pos: torch.Tensor, block: int):
        self.layers, self.table, self.pos, self.block = layers, table, pos, block
        self.S = table.shape[1] * block
        self.slot_new = self.slots(pos)
        keys = torch.arange(self.S, device=pos.device)
        self._mask = (keys <= pos[..., None]).unsqueeze(1)  # [B, 1, 1, S]

    def positions(self, tokens):
        return self.pos

    def mask(self, tokens):  # [B, 1, T, S] or None for a lone sequence starting at 0 (plain causal)
        return self._mask

    def slots(self, pos: torch.Tensor) -> torch.Tensor:
        """Pool rows of each sequence's positions pos [B, X]."""
        return paged_rows(self.table, pos, self.block)

    def write(self, layer_id: int, *new: torch.Tensor):
        for pool, t in zip(self.layers[layer_id], new):
            pool[self.slot_new.flatten()] = t.reshape(-1, *t.shape[2:]).to(pool.dtype)

    def read(self, layer_id: int, n: int) -> tuple[torch.Tensor, ...]:
        """Every row's entries [B, S, ...] of the layer's first n slot arrays: whole blocks gathered, or with the
        rows' blocks in a run (PagedPool.run) a strided view of the pool, nothing copied. Either way a row's
        positions past its own blocks read blocks of no concern to it (the null block, or the next row's), which
        the mask hides."""
        B, pools = self.table.shape[0], self.layers[layer_id][:n]
        if self.run is not None:
            first, step = self.run
            return tuple(pool.as_strided((B, self.S, *pool.shape[1:]), (step * self.block * pool.stride(0),
                                                                        *pool.stride()), first * self.block
                                         * pool.stride(0)) for pool in pools)
        rows = self.table.flatten()  # index_select: 2.5x pool[table] on CPU (one-off timing)
        return tuple(pool.view(-1, self.block, *pool.shape[1:]).index_select(0, rows).view(B, -1, *pool.shape[1:])
                     [:, :self.S] for pool in pools)

    def update(self, layer_id: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.write(layer_id, *new)
        return self.read(layer_id, len(new))

    def advance(self, T: int):  # the engine advances its sequences itself
        pass


class PagedBatch(PagedStep):
    """One forward over B sequences with T new tokens each, in the model's cache protocol
    (positions / mask / update / advance). `mtp`: MTP layer k's forward, from that layer's own lengths."""

    def __init__(self, pool: PagedPool, seqs: list[Sequence], T: int, mtp: int | None = None):
        self.pool, self.seqs, self.T, self.mtp = pool, seqs, T, mtp
        self.layers, self.block = pool.slots, pool.block
        dev = pool.device
        lengths = [s.length if mtp is None else s.mtp_length[mtp] for s in seqs]
        self.ends = [n + T for n in lengths]  # each row's keys after this forward (host-side: no device sync)
        self.S = max(self.ends)
        self.table = pool.block_table(seqs, self.S)
        self.run = pool.run(seqs, self.table.shape[1])
        self.pos = ints(lengths, dev)[:, None] + torch.arange(T, device=dev)[None]  # [B, T]
        self.slot_new = self.slots(self.pos)
        # [B, 1, T, S]: causal within the new tokens, nothing past a sequence's end (padding reads block 0); None
        # (plain causal) where every row ends at S and the tokens are one or the whole sequence: a lone sequence's
        # decode step, which hides nothing, or a fresh prompt (a speculative verify of a few tokens keeps its mask,
        # made once for every layer)
        self._mask = None
        if min(self.ends) < self.S or 1 < T < self.S:
            key_pos = torch.arange(self.S, device=dev)[None, None]  # [1, 1, S]
            self._mask = ((key_pos <= self.pos[..., None]) & (key_pos < ints(self.ends, dev)[:, None, None])
                          ).unsqueeze(1)
        self.entries = None  # NSA: per row, (compressed entries already stored, entries complete after this forward)
        if pool.compressed and mtp is None:
            c = pool.config
            self.entries = [(s.entries, sparse.n_complete(e, c.nsa_block, c.nsa_stride))
                            for s, e in zip(seqs, self.ends)]

    def last_position(self) -> int:  # the last new token's position (host-side: no device sync)
        return self.S - 1

    def nsa(self, layer_id: int, q, k, v, gates, cmp, kw) -> torch.Tensor:
        """NSA over the pool (q [B, T, Hq, D], gates [B, T, Hq, 3], the new k/v [B, T, Hkv, hd]) -> [B, T, Hq, Dv].
        Decode reads the window, the chosen blocks and the kept compressed blocks from the pool; prompts gather
        each row's K/V. The reference twin (a pool block the stride does not divide: no compressed blocks
        kept) gathers and compresses every block afresh at every step."""
        if self.entries is None:
            k, v = self.update(layer_id, k, v)  # [B, S, Hkv, hd]
            return torch.cat([sparse.nsa_attention(q[b:b + 1], k[b:b + 1, :e], v[b:b + 1, :e], gates[b:b + 1], *cmp,
                                                   **kw) for b, e in enumerate(self.ends)])
        self.write(layer_id, k, v)
        kc, vc = self.compressed(layer_id, *cmp)  # [B, N, Hkv, hd]
        n = [n1 for _, n1 in self.entries]
        if self.T == 1:
            return sparse.nsa_paged_decode(q[:, 0], gates[:, 0], *self.pool.slots[layer_id], self.slots, kc, vc,
                                           ints(n, q.device), self.pos[:, 0], **kw)[:, None]
        k, v = self.read(layer_id, 2)
        return torch.cat([sparse.nsa_compressed(q[b:b + 1], k[b:b + 1, :e], v[b:b + 1, :e], kc[b:b + 1, :n[b]],
                                                vc[b:b + 1, :n[b]], gates[b:b + 1], **kw)
                          for b, e in enumerate(self.ends)])

    def compressed(self, layer_id: int, cmp_k, cmp_v) -> tuple[torch.Tensor, torch.Tensor]:
        """NSA: the compressed K/V entries of every row [B, N, Hkv, hd] (row b's first entries[b][1] valid),
        compressing from the pool's tokens only the blocks this forward completes."""
        c, (kp, vp), store = self.pool.config, self.pool.slots[layer_id], self.pool.compressed[layer_id]
        for tok, rows in self.entry_rows[0]:
            for entries, x, cmp in zip(store, (kp, vp), (cmp_k, cmp_v)):
                entries[rows] = sparse.compress(x[tok][None], cmp, c.nsa_block, c.nsa_stride)[0].to(entries.dtype)
        return tuple(entries[self.entry_rows[1]] for entries in store)

    @cached_property
    def entry_rows(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """NSA, the same for every layer of this forward: per row completing entries, (the pool rows of the
        tokens they cover, their own pool rows), and the pool rows of every row's entries [B, N]."""
        c, per, shift, dev = self.pool.config, self.pool.per_block, self.pool.entry_shift, self.pool.device
        new = []
        for b, (n0, n1) in enumerate(self.entries):
            if n1 > n0:  # entries n0.. cover tokens n0 * stride .. (n1 - 1) * stride + block
                table = self.table[b:b + 1]
                tok = torch.arange(n0 * c.nsa_stride, (n1 - 1) * c.nsa_stride + c.nsa_block, device=dev)
                own = torch.arange(n0 + shift, n1 + shift, device=dev)
                new.append((paged_rows(table, tok[None], self.pool.block)[0], paged_rows(table, own[None], per)[0]))
        every = torch.arange(shift, self.table.shape[1] * per, device=dev).expand(len(self.seqs), -1)
        return new, paged_rows(self.table, every, per)

    def advance(self, T: int):
        for s in self.seqs:
            s.advance(T, self.mtp)
        for s, (_, n1) in zip(self.seqs, self.entries or ()):
            s.entries = n1


def compiled_decode(model: Transformer, pool: PagedPool, unsupported: str | None):
    """torch.compile'd decode step: (tokens [B, 1], the B running sequences) -> logits [B, V], traced over the
    pool's tensors alone (PagedStep, DeepSeek-V4: v4cache.V4Step). One graph for B = 1 and one for B > 1,
    any context: dynamic shapes without duck sizing (which would tie B to a block count when they happen to be
    equal), block tables null-padded to sizes dynamo does not specialise (it does 0 and 1: at least 2 blocks, and
    2 entries of every compressed layer); the routed experts gathered per (token, expert) pair
    (experts.dispatch); the weights frozen in as constants (inductor's freezing), so the model must not change
    afterwards: GRPO's rollout engines stay eager."""
    if unsupported:
        raise ValueError(unsupported)
    import torch._dynamo.config as dynamo
    from torch.fx.experimental import _config as fx_config
    c, block = model.config, pool.block
    # an eager MoE dispatch (FP8 experts) breaks the graph in every block, each then compiled on its own
    n = c.n_layers + c.n_mtp_layers
    dynamo.recompile_limit = max(dynamo.recompile_limit, 4 * n)
    dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 16 * n)
    rates = [c.compress_rate(t) for t in c.layer_types if t != "sliding"] if c.arch == "deepseek_v4" else []
    min_tokens = 2 * max([block, *rates])

    def step(tokens, pos, table, lanes, slots, rings):
        cache = v4cache.V4Step(rings, slots, table, pos, lanes, block) if rings else \
            PagedStep(slots, table, pos, block)
        return model.head(model.hidden(tokens, cache)[:, -1])

    # the weights are frozen in, so guards on the modules' attributes go too (guard checks: 0.6 -> 0.2 ms per step)
    compiled = torch.compile(step, dynamic=True, options={
        "freezing": True, "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})

    def run(tokens, seqs):
        dev = tokens.device
        pos = ints([s.length for s in seqs], dev)[:, None]
        table = pool.block_table(seqs, max(max(s.length for s in seqs) + 1, min_tokens))
        lanes = ints([s.lane or 0 for s in seqs], dev)
        with fx_config.patch(use_duck_shape=False), dynamo.patch(specialize_int=True, specialize_float=True):
            return compiled(tokens, pos, table, lanes, pool.slots, pool.rings)

    return run
