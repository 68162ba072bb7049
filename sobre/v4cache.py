"""DeepSeek-V4's engine cache: decode reads O(window + compressed entries), not O(context).

What V4 attention needs of the past, per layer and running sequence:
  - the K=V rows of the last `sliding_window` tokens                 -> a ring per lane [lanes, W, D]
  - the compressor's (and CSA indexer's) per-token kv/gate projections of the windows not yet pooled
    (CSA pools window w with window w-1's first half: the last 2 * rate tokens; HCA: the last rate)
                                                                      -> rings per lane [lanes, R, width]
  - the pooled entries (one per `rate` tokens), and CSA's indexer keys -> paged with the engine's token
    blocks: entry w lives in the block that holds its window's last token, at slot (pos % block) // rate
A lane is a running sequence's row in the rings (the engine has max_batch of them). An entry is pooled once,
when its window completes, so a decode step pools at most one entry per compressed layer and reads the ring
plus the entries. Per-token cost at long context: (D + Di) / rate (CSA) or D / rate (HCA) values per layer,
where the simple twin (the model.Cache path of v4.Attention) keeps every token's rows and re-pools all
windows each step; tests/test_v4.py checks both against full forwards.
A forward reads the rings (the rows before its first new token) before it writes its own rows, so it may
hold any number of new tokens from any position: a whole prompt or a chunk of one, a decode step, a
speculative verify of [pending, draft]. A rejected draft's rows are simply overwritten by the next forward
(nothing reads past a sequence's length). MTP modules' layers (sliding window) get rings too, after the main
layers'. Under the engine's prefix cache a prompt's prefill (V4Batch keep=True) also copies out what its rings
hold at each of its full blocks' ends (speculative: the MTP layer's catch-up on the prompt appends its ring's,
in the rings' order); a later prompt matching those blocks gets them written into its lane.
"""

from __future__ import annotations

import torch

from .config import Config
from .host import ints


def storage(c: Config, n_blocks: int, block: int, lanes: int, dtype, device) -> tuple[list, list]:
    """(entries, rings) per layer, MTP layers last. entries: [n_blocks * per_block, width] (compressor, + CSA
    indexer keys); rings: window K=V ring, then the (kv, gate) projection rings of the compressor (and of the
    CSA indexer)."""
    entries, rings = [], []
    for kind in list(c.layer_types) + ["sliding"] * c.n_mtp_layers:
        z = lambda *s: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
        rings.append([z(lanes, c.sliding_window, c.head_dim)])
        entries.append([])
        if kind == "sliding":
            continue
        rate = c.compress_rate(kind)
        if block % rate and rate % block:
            raise ValueError(f"deepseek_v4 engine cache: block {block} and compress rate {rate} must divide one "
                             "another")
        rows = n_blocks * max(block // rate, 1)
        R, dims = (2 * rate, [c.head_dim, c.index_head_dim]) if kind == "csa" else (rate, [c.head_dim])
        for d in dims:
            width = 2 * d if kind == "csa" else d
            entries[-1].append(z(rows, d))
            rings[-1] += [z(lanes, R, width), z(lanes, R, width)]
    return entries, rings


def entry_rows(table: torch.Tensor, w: torch.Tensor, rate: int, block: int) -> torch.Tensor:
    """Row in the entries storage of entry w (window w's last token sits in block table[b, p // block]).
    table [B, nb], w [B, N] -> [B, N]."""
    p = (w + 1) * rate - 1
    per_block = max(block // rate, 1)
    return table.gather(1, (p // block).clamp_max(table.shape[1] - 1)) * per_block + (p % block) // rate


def ring_read(ring: torch.Tensor, lanes: torch.Tensor, last: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n (<= R, the ring's length) rows ending at position `last` [B] of each lane, oldest first
    -> rows [B, n, ...], positions [B, n] (negative: none)."""
    R = ring.shape[1]
    pos = last[:, None] - n + 1 + torch.arange(n, device=ring.device)  # [B, n]
    return ring[lanes[:, None], pos % R], pos


def ring_write(ring: torch.Tensor, lanes: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor):
    """Store rows [B, T, ...] at positions pos [B, T]: only the last R of them stay."""
    R = ring.shape[1]
    keep = slice(max(pos.shape[1] - R, 0), None)
    ring[lanes[:, None], pos[:, keep] % R] = rows[:, keep].to(ring.dtype)


class V4Step:
    """One decode step from tensors alone (what Engine(compile=True) traces): B sequences with a new token at
    positions pos [B, 1], their ring lanes [B] and block tables [B, nb] (null-padded). Same protocol as
    paged.PagedStep (positions / mask / advance, a no-op: the engine advances its sequences) plus `context`,
    which v4.Attention calls instead of `update`. Every layer reads what the rings hold from before the new
    tokens, then writes the new tokens' rows. Every row pools the window its token would complete and stores the
    entry only if it does (elsewhere the row written keeps its value), then reads all the entries its blocks
    hold (the causal mask hides those past it): static shapes, nothing decided on the host."""

    def __init__(self, rings: list, slots: list, table: torch.Tensor, pos: torch.Tensor, lanes: torch.Tensor,
                 block: int):
        self.rings, self.slots, self.table, self.pos, self.lanes, self.block = rings, slots, table, pos, lanes, block

    def positions(self, tokens):
        return self.pos

    def mask(self, tokens):
        return None  # each layer builds its own from positions

    def advance(self, T: int):
        pass

    def context(self, attn, new: list[torch.Tensor], rope):
        """new: this forward's K=V rows [B, T, D], then the compressor's (kv, gate) and the CSA indexer's
        projections [B, T, width] -> (kv [B, L, D], see [B, T, L], entries [B, N, D] | None,
        causal [B, T, N] | None, indexer keys [B, N, Di] | None)."""
        pos, W = self.pos, attn.c.sliding_window
        rings, entries = self.rings[attn.layer_id], self.slots[attn.layer_id]
        kv, kpos = self._with_past(rings[0], new[0], W - 1)  # the window before the new tokens, then them
        q, kpos = pos[..., None], kpos[:, None]  # [B, T, 1], [B, 1, L]
        see = (kpos >= 0) & (kpos <= q) & (q - kpos < W)  # [B, T, L]
        if attn.kind == "sliding":
            return kv, see, None, None, None
        comp = attn.compressor
        ent = self._entries(comp, rope, new[1:3], rings[1:3], entries[0])
        keys = self._entries(comp.indexer, rope, new[3:5], rings[3:5], entries[1]) if attn.kind == "csa" else None
        causal = torch.arange(ent.shape[1], device=pos.device) < ((pos + 1) // comp.rate)[..., None]  # [B, T, N]
        return kv, see, ent, causal, keys

    def _with_past(self, ring, rows, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The n rows a lane's ring holds before the new ones, then the new rows [B, T, ...] (stored in the ring
        afterwards): -> [B, n + T, ...] and their positions [B, n + T] (negative: none)."""
        old, opos = ring_read(ring, self.lanes, self.pos[:, 0] - 1, n)
        ring_write(ring, self.lanes, self.pos, rows)
        return torch.cat([old, rows.to(old.dtype)], 1), torch.cat([opos, self.pos], 1)

    def _entries(self, comp, rope, new, rings, store) -> torch.Tensor:
        """Pool the windows the new tokens complete into `store` (a token at position p completes window
        (p + 1) / rate - 1 when rate divides p + 1), keep the projections the next windows need in the rings,
        and read every entry the sequences have: -> [B, N, d]."""
        m = comp.rate
        R = 2 * m if comp.overlap else m  # the rows one entry pools (CSA: the previous window's too)
        (kv, kpos), (gate, _) = (self._with_past(r, t, R - 1) for r, t in zip(rings, new))  # [B, R - 1 + T, .]
        gate = gate.masked_fill((kpos < 0)[..., None], float("-inf"))  # before position 0: nothing
        self._pool(comp, rope, kv, gate, store)
        N = self._n_entries(m)
        w = torch.arange(N, device=kv.device).expand(kv.shape[0], N)
        return store[entry_rows(self.table, w, m, self.block)]  # [B, N, d] (past a sequence's own: masked)

    def _pool(self, comp, rope, kv, gate, store):
        """One new token per row, so kv/gate [B, R, width] are the R rows ending at it: every row pools its
        window, stored only where the token completes it."""
        m, p = comp.rate, self.pos[:, -1]
        done = (p + 1) % m == 0  # [B]
        w = ((p + 1) // m - 1).clamp_min(0)
        rows = entry_rows(self.table, w[:, None], m, self.block)[:, 0]
        store[rows] = torch.where(done[:, None], pool_window(comp, rope, kv, gate, w).to(store.dtype), store[rows])

    def _n_entries(self, m: int) -> int:
        return self.table.shape[1] * self.block // m


class V4Batch(V4Step):
    """One engine forward of a V4 model over B running sequences: T new tokens each, from each sequence's own
    length on (a prompt or a chunk of one, a decode step, a speculative verify); `mtp`: MTP layer k's forward,
    from that layer's own lengths. Which windows the new tokens complete is known on the host from the lengths:
    only those pool."""

    def __init__(self, pool, seqs, T: int, mtp: int | None = None, keep: bool = False):
        self.seqs, self.T, self.mtp = seqs, T, mtp
        self.lengths = [s.length if mtp is None else s.mtp_length[mtp] for s in seqs]
        # keep=True: the prompt's block ends among the new tokens whose ring rows the prefix cache keeps (the last
        # max_rings_at of the prompt: it would drop earlier ones at once)
        blk, most = pool.block, pool.max_rings_at
        self.ring_ends = None if not keep else [
            list(range(max(n // blk + 1, len(s.prompt) // blk - most + 1) * blk, min(n + T, len(s.prompt)) + 1, blk))
            for s, n in zip(seqs, self.lengths)]
        self.end = max(self.lengths) + T  # tokens the longest sequence will hold
        dev = pool.device
        super().__init__(pool.rings, pool.slots, pool.block_table(seqs, self.end),
                         ints(self.lengths, dev)[:, None] + torch.arange(T, device=dev),  # [B, T]
                         ints([s.lane for s in seqs], dev), pool.block)

    def advance(self, T: int):
        for s in self.seqs:
            s.advance(T, self.mtp)

    def _with_past(self, ring, rows, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        kv, kpos = super()._with_past(ring, rows, n)  # row i of kv holds position length - n + i
        for b, ends in enumerate(self.ring_ends or ()):  # what the ring holds before a block end e: e - n .. e - 1
            for e in ends:
                i = e - self.lengths[b]
                self.seqs[b].rings_at.setdefault(e, []).append(kv[b, i:i + n].clone())
        return kv, kpos

    def _pool(self, comp, rope, kv, gate, store):
        m, pos = comp.rate, self.pos
        R = 2 * m if comp.overlap else m
        done = [(b, t) for b, n in enumerate(self.lengths) for t in range(self.T) if (n + t + 1) % m == 0]
        if done:  # (no device sync)
            b, t = (ints(x, pos.device) for x in zip(*done))
            rows = t[:, None] + torch.arange(R, device=pos.device)  # the R rows ending at token t
            kv, gate = kv[b[:, None], rows], gate[b[:, None], rows]  # [n, R, width]
            w = (pos[b, t] + 1) // m - 1  # [n]
            store[entry_rows(self.table[b], w[:, None], m, self.block)[:, 0]] = \
                pool_window(comp, rope, kv, gate, w).to(store.dtype)

    def _n_entries(self, m: int) -> int:
        return self.end // m


def pool_window(comp, rope, kv: torch.Tensor, gate: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Entry w [n] of each row from the R projection rows kv/gate [n, R, width] ending at its window's last token
    (CSA: the previous window's m rows first) -> [n, d]."""
    m = comp.rate
    prev = (kv[:, :m], gate[:, :m]) if comp.overlap else None
    return comp.pool(kv[:, -m:], gate[:, -m:], rope, first=w, prev=prev)[:, 0]


def copy_prompt(pool, src, dst, n: int):
    """dst gets src's cache of its first n tokens (entries by block, rings by lane), as if prefilled itself."""
    nb = pool.blocks_for(n)
    for entries, rings in zip(pool.slots, pool.rings):
        for t in entries:
            pb = t.shape[0] // pool.n_blocks  # entry rows per block
            a, b = (torch.tensor(s.blocks[:nb], device=t.device)[:, None] * pb + torch.arange(pb, device=t.device)
                    for s in (src, dst))
            t[b.flatten()] = t[a.flatten()]
        for ring in rings:
            ring[dst.lane] = ring[src.lane]
