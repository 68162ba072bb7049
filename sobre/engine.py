"""Inference engine: a paged cache pool shared by all sequences, continuous batching, full sampling.

MLA models cache only the latent c_kv [kv_lora_rank] and the rope key k_pe [qk_rope_head_dim] per token and
layer; decode runs absorbed attention on them. Dense models cache K/V. The pool is cut into blocks of 64
tokens (as FlashMLA); a sequence owns a list of blocks. Block 0 is a zero "null" block that padded
positions of a ragged batch read from (and that masks then hide).

    eng = Engine(model, tokenizer)
    rid = eng.add_request([1, 2, 3], temperature=0.7, seed=1)
    while eng.has_work():
        for ev in eng.step(): ...          # (rid, token, finished) events, for streaming
    eng.collect()                           # finished requests
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .model import Transformer
from .sampling import SamplingParams, apply_penalties, sample, top_logprobs

BLOCK = 64


class PagedPool:
    """Per-layer slot arrays [n_blocks * block, ...] and a free list of blocks (block 0 stays reserved)."""

    def __init__(self, model: Transformer, n_blocks: int, block: int = BLOCK):
        c = model.config
        p = next(model.parameters())
        shapes = [(c.kv_lora_rank + c.qk_rope_head_dim,)] if c.is_mla else [(c.kv_heads, c.dense_head_dim)] * 2
        self.block, self.n_blocks = block, n_blocks
        self.slots = [[torch.zeros(n_blocks * block, *s, dtype=p.dtype, device=p.device) for s in shapes]
                      for _ in range(c.n_layers + c.n_mtp_layers)]
        self.free = list(range(n_blocks - 1, 0, -1))
        self.bytes_per_token = sum(t[0].numel() * t.element_size() for t in self.slots[0]) * c.n_layers

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block)

    def reserve(self, seq: Sequence, n_tokens: int):
        need = self.blocks_for(n_tokens) - len(seq.blocks)
        if need > len(self.free):
            raise RuntimeError("cache pool exhausted")
        seq.blocks += [self.free.pop() for _ in range(max(need, 0))]

    def release(self, seq: Sequence):
        self.free += seq.blocks
        seq.blocks = []


class PagedBatch:
    """One forward over B sequences with T new tokens each, in the model's cache protocol
    (positions / mask / update / advance). `mtp` selects the MTP layers' own lengths."""

    def __init__(self, pool: PagedPool, seqs: list[Sequence], T: int, mtp: bool = False):
        self.pool, self.seqs, self.T, self.mtp = pool, seqs, T, mtp
        dev = pool.slots[0][0].device
        starts = torch.tensor([s.mtp_length if mtp else s.length for s in seqs], device=dev)
        ends = starts + T
        S = int(ends.max())
        nb = max(len(s.blocks) for s in seqs)
        table = torch.tensor([s.blocks + [0] * (nb - len(s.blocks)) for s in seqs], device=dev)  # [B, nb]
        key_pos = torch.arange(S, device=dev)[None]  # [1, S]
        valid = key_pos < ends[:, None]  # [B, S]
        slot_all = table.gather(1, (key_pos // pool.block).expand(len(seqs), -1)) * pool.block + key_pos % pool.block
        self.slot_all = torch.where(valid, slot_all, 0)  # padding reads the null slot
        self.pos = starts[:, None] + torch.arange(T, device=dev)[None]  # [B, T]
        self.slot_new = self.slot_all.gather(1, self.pos)  # [B, T]
        fresh = len(seqs) == 1 and int(starts[0]) == 0
        self._mask = None if fresh else ((key_pos[:, None] <= self.pos[..., None]) & valid[:, None]).unsqueeze(1)

    def positions(self, tokens):
        return self.pos

    def mask(self, tokens):  # [B, 1, T, S] or None for a lone sequence starting at 0 (plain causal)
        return self._mask

    def update(self, layer_id: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = []
        for pool, t in zip(self.pool.slots[layer_id], new):
            pool[self.slot_new.flatten()] = t.reshape(-1, *t.shape[2:]).to(pool.dtype)
            out.append(pool[self.slot_all])  # [B, S, ...]
        return tuple(out)

    def advance(self, T: int):
        for s in self.seqs:
            if self.mtp:
                s.mtp_length += T
            else:
                s.length += T


@dataclass
class Sequence:
    rid: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    out: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    length: int = 0  # tokens whose K/V sit in the cache
    mtp_length: int = 0
    pending: int | None = None  # sampled, not yet fed to the model
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    text: str = ""
    seen: torch.Tensor | None = None  # [V] bool: prompt + output (repetition penalty)
    counts: torch.Tensor | None = None  # [V] output token counts (presence / frequency penalties)


@dataclass
class Event:
    rid: int
    token: int
    finished: bool
    finish_reason: str | None = None


class Engine:
    def __init__(self, model: Transformer, tokenizer=None, max_batch: int = 64, cache_tokens: int | None = None,
                 block: int = BLOCK):
        self.model, self.tokenizer, self.max_batch = model.eval(), tokenizer, max_batch
        c = model.config
        cache_tokens = cache_tokens or min(c.max_seq_len * 8, 1 << 16)
        self.pool = PagedPool(model, 1 + -(-cache_tokens // block), block)
        self.device = next(model.parameters()).device
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.finished: dict[int, Sequence] = {}
        self.next_id = 0

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device=None, **kw) -> Engine:
        from .checkpoint import load, resolve
        from .tokenizer import load_tokenizer
        path = resolve(path)
        return cls(load(path, dtype=dtype, device=device), load_tokenizer(path), **kw)

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, prompt: list[int], params: SamplingParams | None = None, **kw) -> int:
        params = params or SamplingParams(**kw)
        c = self.model.config
        if not prompt:
            raise ValueError("empty prompt")
        if min(prompt) < 0 or max(prompt) >= c.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {c.vocab_size})")
        if len(prompt) >= c.max_seq_len:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit the context of {c.max_seq_len} "
                             "(max_position_embeddings) with room for one new token")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (Engine(model, tokenizer))")
        need = self.pool.blocks_for(min(len(prompt) + params.max_new_tokens, c.max_seq_len))
        if need > self.pool.n_blocks - 1:
            raise ValueError(f"request needs {need} cache blocks, the pool has {self.pool.n_blocks - 1}; "
                             "raise cache_tokens")
        seq = Sequence(self.next_id, list(prompt), params,
                       torch.Generator(self.device).manual_seed(params.seed) if params.seed is not None else None)
        if params.repetition_penalty != 1 or params.presence_penalty or params.frequency_penalty:
            seq.seen = torch.zeros(c.vocab_size, dtype=torch.bool, device=self.device)
            seq.seen[prompt] = True
            seq.counts = torch.zeros(c.vocab_size, device=self.device)
        self.next_id += 1
        self.waiting.append(seq)
        return seq.rid

    def cancel(self, rid: int):
        for q in (self.waiting, self.running):
            for s in q:
                if s.rid == rid:
                    q.remove(s)
                    self._finish(s, "cancelled")
                    return

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def collect(self) -> dict[int, Sequence]:
        done, self.finished = self.finished, {}
        return done

    # ---- the step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Admit and prefill waiting requests (each alone: no padding), then decode one token for every
        running sequence in one batched forward."""
        events: list[Event] = []
        c = self.model.config
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            total = min(len(seq.prompt) + seq.params.max_new_tokens, c.max_seq_len)
            if self.pool.blocks_for(total) > len(self.pool.free):
                break  # wait until running sequences free their blocks
            self.waiting.pop(0)
            self.pool.reserve(seq, total)
            c.attn_impl = "naive"  # prefill: expand K/V once and use fused SDPA
            h = self.model.hidden(torch.tensor([seq.prompt], device=self.device), PagedBatch(self.pool, [seq],
                                                                                               len(seq.prompt)))
            self.running.append(seq)
            events += self._sample([seq], self.model.head(h[:, -1]))
        live = [s for s in self.running if s.pending is not None]
        if live:
            c.attn_impl = "absorb"  # decode: attention in the latent space, nothing re-expanded
            tokens = torch.tensor([[s.pending] for s in live], device=self.device)
            h = self.model.hidden(tokens, PagedBatch(self.pool, live, 1))
            events += self._sample(live, self.model.head(h[:, -1]))
        return events

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Event]:
        logits = logits.float()  # [B, V]
        params = [s.params for s in seqs]
        if any(s.seen is not None for s in seqs):
            V = logits.shape[-1]
            seen = torch.stack([s.seen if s.seen is not None else logits.new_zeros(V, dtype=torch.bool)
                                for s in seqs])
            counts = torch.stack([s.counts if s.counts is not None else logits.new_zeros(V) for s in seqs])
            logits = apply_penalties(logits, seen, counts, params)
        tokens = sample(logits, params, [s.generator for s in seqs])
        want = [s.params.logprobs for s in seqs]
        if any(n is not None for n in want):
            chosen, vals, ids = top_logprobs(logits, tokens, max(n or 0 for n in want))
        events = []
        for i, s in enumerate(seqs):
            tok = int(tokens[i])
            s.out.append(tok)
            s.pending = tok
            if s.params.logprobs is not None:
                n = s.params.logprobs
                s.logprobs.append((float(chosen[i]), dict(zip(ids[i, :n].tolist(), vals[i, :n].tolist()))))
            if s.seen is not None:
                s.seen[tok] = True
                s.counts[tok] += 1
            reason = self._stop_reason(s, tok)
            if reason:
                self.running.remove(s)
                self._finish(s, reason)
            events.append(Event(s.rid, tok, reason is not None, reason))
        return events

    def _stop_reason(self, s: Sequence, tok: int) -> str | None:
        if tok in s.params.stop_token_ids:
            return "stop"
        if s.params.stop:
            s.text = self.tokenizer.decode(s.out)
            hits = [s.text.find(x) for x in s.params.stop if x in s.text]
            if hits:
                s.text = s.text[:min(hits)]  # the stop string itself is not part of the answer
                return "stop"
        if len(s.out) >= s.params.max_new_tokens or len(s.prompt) + len(s.out) >= self.model.config.max_seq_len:
            return "length"
        return None

    def _finish(self, s: Sequence, reason: str):
        s.finish_reason, s.pending = reason, None
        self.pool.release(s)
        self.finished[s.rid] = s

    # ---- convenience ---------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], **kw) -> list[list[int]]:
        """New tokens for each prompt (same sampling keywords for all), batched."""
        rids = [self.add_request(p, **kw) for p in prompts]
        done: dict[int, Sequence] = {}
        while self.has_work():
            self.step()
            done.update(self.collect())
        return [done[r].out for r in rids]

    def stream(self, prompt: list[int], **kw):
        """Yield the new tokens of one prompt as they come."""
        rid = self.add_request(prompt, **kw)
        while self.has_work():
            for ev in self.step():
                if ev.rid == rid:
                    yield ev.token
        self.finished.pop(rid, None)


def generate(model: Transformer, prompt: list[int], max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop: tuple[int, ...] = (), **kw):
    """Stream the new tokens of one prompt (a one-request Engine)."""
    eng = Engine(model, max_batch=1, cache_tokens=min(len(prompt) + max_new_tokens, model.config.max_seq_len))
    yield from eng.stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, seed=seed, stop_token_ids=stop, **kw)
