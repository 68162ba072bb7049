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
With `slack` s the rings hold s more rows, so a forward may also continue a sequence by up to s + 1 tokens
(speculative decoding verifies [pending, draft]): every window it completes is still in the ring. A rejected
draft's rows are simply overwritten by the next forward (nothing reads past a sequence's length). MTP
modules' layers (sliding window) get rings too, after the main layers'.
"""

from __future__ import annotations

import torch

from .config import Config


def storage(c: Config, n_blocks: int, block: int, lanes: int, dtype, device, slack: int = 0) -> tuple[list, list]:
    """(entries, rings) per layer, MTP layers last. entries: [n_blocks * per_block + 1, width] (compressor, + CSA
    indexer keys; the last row takes the pooled rows of windows that are not complete yet); rings: window K=V
    ring, then the (kv, gate) projection rings of the compressor (and of the CSA indexer); `slack` more rows
    each."""
    entries, rings = [], []
    for kind in list(c.layer_types) + ["sliding"] * c.n_mtp_layers:
        z = lambda *s: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
        rings.append([z(lanes, c.sliding_window + slack, c.head_dim)])
        entries.append([])
        if kind == "sliding":
            continue
        rate = c.compress_rate_csa if kind == "csa" else c.compress_rate_hca
        if block % rate and rate % block:
            raise ValueError(f"deepseek_v4 engine cache: block {block} and compress rate {rate} must divide one "
                             "another")
        rows = n_blocks * max(block // rate, 1) + 1
        R, dims = (2 * rate, [c.head_dim, c.index_head_dim]) if kind == "csa" else (rate, [c.head_dim])
        for d in dims:
            width = 2 * d if kind == "csa" else d
            entries[-1].append(z(rows, d))
            rings[-1] += [z(lanes, R + slack, width), z(lanes, R + slack, width)]
    return entries, rings


def entry_rows(table: torch.Tensor, w: torch.Tensor, rate: int, block: int) -> torch.Tensor:
    """Row in the entries storage of entry w (window w's last token sits in block table[b, p // block]).
    table [B, nb], w [B, N] -> [B, N]."""
    p = (w + 1) * rate - 1
    per_block = max(block // rate, 1)
    return table.gather(1, (p // block).clamp_max(table.shape[1] - 1)) * per_block + (p % block) // rate


def ring_read(ring: torch.Tensor, lanes: torch.Tensor, last: torch.Tensor, n: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The n rows (default: all R the ring holds) ending at position `last` [B] of each lane, oldest first
    -> rows [B, n, ...], positions [B, n] (negative: none)."""
    R = ring.shape[1]
    n = n or R
    pos = last[:, None] - n + 1 + torch.arange(n, device=ring.device)  # [B, n]
    return ring[lanes[:, None], pos % R], pos


def ring_write(ring: torch.Tensor, lanes: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor):
    """Store rows [B, T, ...] at positions pos [B, T]: only the last R of them stay."""
    R = ring.shape[1]
    keep = slice(max(pos.shape[1] - R, 0), None)
    ring[lanes[:, None], pos[:, keep] % R] = rows[:, keep].to(ring.dtype)


class V4Batch:
    """One engine forward of a V4 model over B running sequences: T new tokens each, either a prefill from
    position 0 or a continuation by at most 1 + the pool's ring slack tokens (a decode step: 1; speculative
    verify: 2). Same protocol as engine.PagedBatch (positions / mask / advance; `mtp`: the MTP layers' own
    lengths) plus `context`, which v4.Attention calls instead of `update`."""

    def __init__(self, pool, seqs, T: int, mtp: bool = False):
        self.pool, self.seqs, self.T, self.mtp = pool, seqs, T, mtp
        self.lengths = lengths = [s.mtp_length if mtp else s.length for s in seqs]
        self.prefill = T > 1 + pool.slack
        if self.prefill and any(lengths):
            raise ValueError(f"deepseek_v4 engine: a forward of {T} tokens must start at position 0 (continuing a "
                             f"sequence takes at most {1 + pool.slack})")
        self.end = max(lengths) + T  # tokens the longest sequence will hold
        dev = pool.device
        self.pos = torch.tensor(lengths, device=dev)[:, None] + torch.arange(T, device=dev)  # [B, T]
        self.lanes = torch.tensor([s.lane for s in seqs], device=dev)
        self.table = pool.block_table(seqs, self.end)

    def positions(self, tokens):
        return self.pos

    def mask(self, tokens):
        return None  # each layer builds its own from positions

    def advance(self, T: int):
        for s in self.seqs:
            if self.mtp:
                s.mtp_length += T
            else:
                s.length += T

    def context(self, attn, new: list[torch.Tensor], rope):
        """new: this forward's K=V rows [B, T, D], then the compressor's (kv, gate) and the CSA indexer's
        projections [B, T, width] -> (kv [B, L, D], see [B, T, L], entries [B, N, D] | None,
        causal [B, T, N] | None, indexer keys [B, N, Di] | None)."""
        c, pos, lanes, T = attn.c, self.pos, self.lanes, self.T
        rings, entries = self.pool.rings[attn.layer_id], self.pool.slots[attn.layer_id]
        ring_write(rings[0], lanes, pos, new[0])
        if not self.prefill:  # decode / verify: the window's K=V rows come from the ring
            kv, kpos = ring_read(rings[0], lanes, pos[:, -1], c.sliding_window + T - 1)  # [B, L, D], [B, L]
            kpos, q = kpos[:, None], pos[..., None]  # [B, 1, L], [B, T, 1]
            see = (kpos >= 0) & (kpos <= q) & (q - kpos < c.sliding_window)  # [B, T, L]
        else:  # prefill from 0: the new rows themselves
            kv, q = new[0], torch.arange(T, device=pos.device)
            see = ((q[None] <= q[:, None]) & (q[:, None] - q[None] < c.sliding_window))[None]  # [1, T, T]
        if attn.kind == "sliding":
            return kv, see, None, None, None
        comp = attn.compressor
        ent = self._entries(comp, rope, new[1:3], rings[1:3], entries[0])
        keys = self._entries(comp.indexer, rope, new[3:5], rings[3:5], entries[1]) if attn.kind == "csa" else None
        causal = torch.arange(ent.shape[1], device=pos.device) < ((pos + 1) // comp.rate)[..., None]  # [B, T, N]
        return kv, see, ent, causal, keys

    def _entries(self, comp, rope, new, rings, store) -> torch.Tensor:
        """Pool the windows this forward completes into `store`, keep the projections the next windows need
        in the rings, and read every entry the sequences have: -> [B, N, d]."""
        m, pos, lanes, blk = comp.rate, self.pos, self.lanes, self.pool.block
        for ring, t in zip(rings, new):
            ring_write(ring, lanes, pos, t)
        if not self.prefill:  # each new token may complete a window: pool it from the rings
            R = 2 * m if comp.overlap else m
            for t in range(self.T):
                if all((n + t + 1) % m for n in self.lengths):
                    continue  # token t completes no sequence's window (known on the host: no device sync)
                (kv, kpos), (gate, _) = (ring_read(r, lanes, pos[:, t], R) for r in rings)  # [B, R, width]
                gate = gate.masked_fill((kpos < 0)[..., None], float("-inf"))  # before position 0: nothing
                w = (pos[:, t] + 1) // m - 1  # [B] the window token t may complete
                prev = (kv[:, :m], gate[:, :m]) if comp.overlap else None
                pooled = comp.pool(kv[:, -m:], gate[:, -m:], rope, first=w.clamp_min(0), prev=prev)  # [B, 1, d]
                done = (pos[:, t] + 1) % m == 0
                rows = torch.where(done, entry_rows(self.table, w.clamp_min(0)[:, None], m, blk)[:, 0], len(store) - 1)
                store[rows] = pooled[:, 0].to(store.dtype)
        else:
            pooled = comp.pool(*new, rope)  # [B, n, d]: windows 0..n-1
            n = pooled.shape[1]
            rows = entry_rows(self.table, torch.arange(n, device=pos.device).expand(len(lanes), n), m, blk)
            store[rows.flatten()] = pooled.flatten(0, 1).to(store.dtype)
        N = self.end // m
        w = torch.arange(N, device=pos.device).expand(len(lanes), N)
        return store[entry_rows(self.table, w, m, blk)]  # [B, N, d] (past a sequence's own: masked)


def copy_prompt(pool, src, dst, n: int):
    """dst gets src's cache of its first n tokens (entries by block, rings by lane), as if prefilled itself."""
    nb = pool.blocks_for(n)
    for entries, rings in zip(pool.slots, pool.rings):
        for t in entries:
            pb = (t.shape[0] - 1) // pool.n_blocks  # entry rows per block
            a, b = (torch.tensor(s.blocks[:nb], device=t.device)[:, None] * pb + torch.arange(pb, device=t.device)
                    for s in (src, dst))
            t[b.flatten()] = t[a.flatten()]
        for ring in rings:
            ring[dst.lane] = ring[src.lane]
