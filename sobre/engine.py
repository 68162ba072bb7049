"""Inference engine: continuous batching over the paged cache (paged.py), full sampling, MTP speculation.

MLA models cache only the latent c_kv [kv_lora_rank] and the rope key k_pe [qk_rope_head_dim] per token and
layer; decode runs absorbed attention on them, its projections folded where the latent rank is small (absorb.py;
from the weights as they are at the engine's first decode step: a model changed under a running engine needs a
new engine); on the CPU a decode step of a few sequences and a lone sequence's speculative step run as
straight-line code where the model qualifies (plan.py). Dense models cache K/V. The pool is cut into blocks of 64
tokens (as FlashMLA); a sequence owns a list of blocks.

Prefix cache (prefix_cache=True, as vLLM's automatic prefix caching): every block filled entirely with prompt
tokens is keyed by a sha256 chained over the prompt up to its end and kept after its sequence finishes (LRU,
evicted only when blocks run out). A new prompt starting with cached blocks shares them (reference counts)
and prefills only the rest; `Sequence.cached` counts the reused tokens. DeepSeek-V4 (per-sequence rings beside
the blocks): a prompt's prefill also keeps its rings' rows at each of its full blocks' ends (paged.PagedPool.
rings_at, budgeted; speculative: the MTP layer's too, when it catches up on the prompt), and a match restores
the last matched block's into the new sequence's lane.

    eng = Engine(model, tokenizer)
    rid = eng.add_request([1, 2, 3], temperature=0.7, seed=1)
    while eng.has_work():
        for ev in eng.step(): ...          # (rid, token, finished) events, for streaming
    eng.collect()                           # finished requests
"""

from __future__ import annotations

import torch

from . import lora, plan, v4cache
from .config import at_least_one
from .constrain import JsonPrefix, redraw, token_texts
from .host import ints
from .int8 import Int8Experts, Int8Linear
from .linear import inference_dtype
from .model import Transformer
from .moe import moe_layers
from .paged import BLOCK, PagedBatch, PagedPool, compiled_decode, paged_rows
from .parallel import keep_freed_memory
from .request import Event, Limits, Prefill, Sequence
from .sampling import SamplingParams, penalized, sample, sampling_floors, tempered_logprobs, top_logprobs
from .schema import SchemaPrefix
from .speculative import draft_vocabulary, speculate
from .tokenizer import eos_ids, framing_ids
from .tools import CallPrefix, has_separator, with_separator


class Engine:
    def __init__(self, model: Transformer, tokenizer=None, max_batch: int = 64, cache_tokens: int | None = None,
                 block: int = BLOCK, speculative: bool | int = False, prefix_cache: bool = False,
                 prefill_chunk: int = 1024, compile: bool = False, min_acceptance: float = 0.3,
                 draft_vocab: int | None = None, loras: dict | None = None, keep_logits: bool = False,
                 keep_logprobs: bool = False, keep_routing: bool = False, keep_sampling_mask: bool = False):
        self.model, self.tokenizer, self.max_batch = model.eval(), tokenizer, max_batch
        # each sequence keeps the model's raw logits row of every token it is given (Sequence.logits: views of the
        # step's [B, V] logits, so each step's stays alive while one of its rows is kept): GRPO's update takes
        # them as its head's logits instead of computing them again (update.reuse_logits); keep_logprobs: each
        # token's log-prob where it was drawn (Sequence.sampled, sampling.tempered_logprobs: as vLLM's logprobs
        # give TRL the sampler's policy), for GRPO's weights of rollouts sampled by other weights
        self.keep_logits, self.keep_logprobs = keep_logits, keep_logprobs
        # DeepSeek-V3.2's Keep Sampling Mask: each token's floor (sampling.sampling_floors: between the tempered
        # logits top-k / top-p / min-p kept and those they dropped, Sequence.floors), for GRPO's update to
        # renormalise over the same tokens; the kept log-probs are then the truncated distribution's
        self.keep_sampling_mask = keep_sampling_mask
        if compile and loras:
            raise ValueError("compile=True does not serve LoRA adapters (loras=): decode them eagerly")
        # LoRA adapters served beside the base model, each request its own (SamplingParams.lora; vLLM's
        # multi-LoRA): {name: PEFT adapter folder}; their layers become lora.MultiLoRA (the model is changed)
        self.loras = list(loras or {})
        self.lora_rows = None
        if loras:
            from .checkpoint import resolve
            self.lora_rows = lora.serve_adapters(model, [lora.adapter_factors(resolve(p), model.config)
                                                         for p in loras.values()])
        # MoE: the compiled step gathers each (token, expert) pair's weights, worth it while the pairs number at
        # most the experts; larger batches decode eagerly (grouped, padded experts)
        c = model.config
        self.compiled_batch = max(1, c.n_routed_experts // c.n_activated_experts) if c.n_routed_experts else max_batch
        at_least_one(max_batch=max_batch, prefill_chunk=prefill_chunk, cache_tokens=cache_tokens or 1)
        # chunked prefill (as vLLM's): a longer prompt goes in this many tokens a step, the running sequences
        # decoding between its chunks (NSA / DSA too); deepseek_v4: no forward of a prompt is longer
        self.prefill_chunk = prefill_chunk
        self.framing = framing_ids(tokenizer)  # left out of the text stop strings match (as TextStream streams it)
        c = model.config
        self.drafts = self.draft_tokens(c, speculative)  # MTP draft tokens per verify (0: plain decoding)
        if not 0 <= min_acceptance <= 1:
            raise ValueError(f"min_acceptance must be in [0, 1], not {min_acceptance}")
        # a sequence whose drafts so far were accepted less often than this, once it has speculative.PROBATION
        # verifies, decodes plainly from then on: a verify cost 1.3-1.7 plain steps on CPU, so D drafts gain only
        # when 1 + acceptance * D tokens a verify beat that (0: always draft)
        self.min_acceptance = min_acceptance
        self.draft_vocab = draft_vocabulary(c.vocab_size, draft_vocab)  # the MTP drafts' head: token ids below it
        # (vLLM's) drafts proposed, kept; verifies; sequences that stopped drafting
        self.spec_stats = {"drafted": 0, "accepted": 0, "verified": 0, "stopped": 0}
        self.prefix_cache = prefix_cache
        self.unkeyed: dict[int, list[bytes]] = {}  # speculative: prompt blocks keyed once the MTP layer filled them
        self.prefix_stats = {"hit": 0, "miss": 0}  # prompt tokens reused / prefilled
        cache_tokens = cache_tokens or min(c.max_seq_len * 8, 1 << 16)
        self.pool = PagedPool(model, 1 + -(-cache_tokens // block), block, max_batch)
        self.limits = Limits(c.vocab_size, c.max_seq_len, block, self.pool.n_blocks - 1, tokenizer is not None,
                             tuple(self.loras), has_separator(tokenizer))
        if compile and any(isinstance(m, (Int8Linear, Int8Experts)) for m in model.modules()):
            raise ValueError("compile=True does not take int8 weights (torch's inductor cannot lower their "
                             "_weight_int8pack_mm); decode them eagerly")
        self.compiled = compiled_decode(model, self.pool, self.supports_compile(c)) if compile else None
        # absorbed MLA's projections folded (absorb.py) for this engine's lifetime, each layer at its first decode:
        # the model's weights as they are then (a model changed under a running engine needs a new engine)
        self.folds: dict = {}
        # a few sequences' decode step as straight-line code (plan.py), where the model qualifies and no compiled
        # step runs them
        self.plan = plan.DecodePlan(model, self.pool) if not compile and plan.unsupported(model) is None else None
        # DeepSeek-V3.2's Keep Routing: each finished sequence holds the experts every MoE layer of the model routed
        # each of its positions to (Sequence.routes; recorded from the layers' last_idx after each forward, the
        # module path's or the plan's, paged with the cache), for GRPO's update to route its forward alike (the
        # layers' replay). V4's hash layers too (their experts follow the token: replayed, the same).
        self.routing = moe_layers(model.layers) if keep_routing else []
        if keep_routing:
            if not self.routing or compile or self.drafts:
                raise ValueError("keep_routing records the routing of a MoE model's plain decoding: not of a dense "
                                 "model, nor with compile or speculative decoding")
            self.pool.keep_routes(len(self.routing), c.n_activated_experts)
        self.device = next(model.parameters()).device
        if self.device.type == "cpu":
            keep_freed_memory()
        self.waiting: list[Sequence] = []
        self.prefilling: list[Prefill] = []  # long prompts, oldest first, one chunk a step
        self.running: list[Sequence] = []
        self.finished: dict[int, Sequence] = {}
        self.next_id = 0
        self.texts: list[str] | None = None  # each token's text, made for the first JSON-mode request
        self.call_texts: list[str] | None = None  # ... with the tool-call separator's (tool_choice "required")

    @property
    def speculative(self) -> bool:
        return self.drafts > 0

    @staticmethod
    def draft_tokens(c, speculative: bool | int) -> int:
        """speculative=True drafts with every MTP layer (DeepSeek-V3/R1 checkpoints have one; deepseek_v4 drafts
        one token), an int k with the first k: layer k reads layer k-1's hidden and the k-th draft, as trained."""
        if not speculative:
            return 0
        if not c.n_mtp_layers:
            raise ValueError("speculative decoding drafts with the MTP module; this model has none")
        most = 1 if c.arch == "deepseek_v4" else c.n_mtp_layers
        k = most if speculative is True else int(speculative)
        if not 1 <= k <= most:
            v4 = ", deepseek_v4 drafts one" if most < c.n_mtp_layers else ""
            raise ValueError(f"speculative={speculative}: this model drafts 1..{most} tokens a step "
                             f"({c.n_mtp_layers} MTP layers{v4})")
        return k

    @staticmethod
    def supports_compile(c) -> str | None:
        """Why compile=True cannot serve this model (None: it can)."""
        if c.attn_type != "full":
            return f"compile=True compiles the decode step of full-attention and DeepSeek-V4 models, not {c.attn_type}"
        return None

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device=None, fp8: bool = False,
                        int8: bool = False, adapter=None, **kw) -> Engine:
        """dtype None: linear.inference_dtype(path, device). int8=True: weight-only int8; adapter: a PEFT LoRA
        adapter folder merged into the weights (checkpoint.load)."""
        from .checkpoint import load, resolve
        from .tokenizer import load_tokenizer
        path = resolve(path)
        dtype = dtype or inference_dtype(path, device)
        return cls(load(path, dtype=dtype, device=device, mtp=kw.get("speculative", False), fp8=fp8,
                        int8=int8, adapter=adapter),
                   load_tokenizer(path), **kw)

    def warm_up(self):
        """compile=True: compile the decode step's two graphs, for one and for several sequences, now (a server
        before its first request), not while the first requests wait."""
        for n in (2, 1):
            self.generate([[0, 0]] * n, max_new_tokens=3)
        self.spec_stats, self.prefix_stats = dict.fromkeys(self.spec_stats, 0), dict.fromkeys(self.prefix_stats, 0)

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, prompt: list[int], params: SamplingParams | None = None, **kw) -> int:
        params = params or SamplingParams(**kw)
        self.check(prompt, params)
        c = self.model.config
        seq = Sequence(self.next_id, list(prompt), params,
                       torch.Generator(self.device).manual_seed(params.seed) if params.seed is not None else None,
                       mtp_length=[0] * self.drafts, lora=self.loras.index(params.lora) if params.lora else None)
        if params.repetition_penalty != 1 or params.presence_penalty or params.frequency_penalty:
            seq.seen = torch.zeros(c.vocab_size, dtype=torch.bool, device=self.device)
            seq.seen[prompt] = True
            seq.counts = torch.zeros(c.vocab_size, device=self.device)
        if params.json:
            seq.json = CallPrefix(params.tool_calls) if params.tool_calls else \
                JsonPrefix() if params.json_schema is None else SchemaPrefix(params.json_schema)
            self.texts = self.texts or token_texts(self.tokenizer, c.vocab_size)
            if params.tool_calls and self.call_texts is None:
                self.call_texts = with_separator(self.texts, self.tokenizer)
        if params.logit_bias:
            ids, vals = zip(*params.logit_bias.items())
            seq.bias = torch.zeros(c.vocab_size, device=self.device).index_put_(
                (torch.tensor(ids, device=self.device),), torch.tensor(vals, device=self.device))
        self.next_id += 1
        self.waiting.append(seq)
        return seq.rid

    def check(self, prompt: list[int], params: SamplingParams):
        self.limits.check(prompt, params)

    def cancel(self, rid: int):
        for q in (self.waiting, self.running):
            for s in q:
                if s.rid == rid:
                    q.remove(s)
                    self._finish(s, "cancelled")
                    return
        for i, p in enumerate(self.prefilling):
            if p.seq.rid == rid:  # a twin takes its place, prefilled from its own start (its blocks are its own)
                if p.twins:
                    self.prefilling[i] = Prefill(p.twins[0], p.keys, p.twins[1:])
                else:
                    del self.prefilling[i]
                self._finish(p.seq, "cancelled")
                return
            for s in p.twins:
                if s.rid == rid:
                    p.twins.remove(s)
                    self._finish(s, "cancelled")
                    return

    def in_flight(self) -> int:
        """Sequences admitted: decoding, or with a prompt being prefilled (twins included)."""
        return len(self.running) + sum(1 + len(p.twins) for p in self.prefilling)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.prefilling)

    def collect(self) -> dict[int, Sequence]:
        done, self.finished = self.finished, {}
        return done

    # ---- the step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Admit and prefill waiting requests (prompts of close lengths together, padded; others alone), then
        decode every running sequence in one batched forward (with speculative=True: draft with MTP, verify
        draft + 1 in one forward)."""
        impl = self.model.config.attn_impl
        try:
            return self._step()
        finally:
            self.model.config.attn_impl = impl  # the engine picks naive/absorb per phase, then leaves it be

    def _step(self) -> list[Event]:
        events: list[Event] = []
        c = self.model.config
        admitted: list[tuple[Sequence, list[bytes]]] = []  # (sequence, its prompt's prefix keys)
        twins: dict[int, list[Sequence]] = {}  # rid -> later sequences with the same prompt (n samples, GRPO)
        first: dict[tuple, Sequence] = {}
        filling: set[bytes] = set()  # prefix keys of the blocks this step's prefills will fill
        while self.waiting and self.in_flight() + len(admitted) + sum(map(len, twins.values())) < self.max_batch:
            seq = self.waiting[0]
            total = min(len(seq.prompt) + seq.params.max_new_tokens + self.drafts, c.max_seq_len)
            if self.pool.blocks_for(total) > self.pool.available():
                break  # wait until running sequences free their blocks
            keys = self.pool.prefix_keys(seq.prompt, self.drafts, seq.params.lora or "") if self.prefix_cache else []
            twin = None if self.speculative else first.get((seq.lora, *seq.prompt))
            if twin is None and filling.intersection(keys[:(len(seq.prompt) - 1) // self.pool.block]):
                break  # it starts with blocks an earlier prompt is about to fill: it matches them next step
            self.waiting.pop(0)
            if self.prefix_cache:
                seq.cached = seq.length = self.pool.match(seq, keys)
                seq.mtp_length = [seq.cached] * self.drafts
            self.pool.reserve(seq, total)
            if twin is not None:  # its cache is copied from the twin's once that is prefilled
                twins.setdefault(twin.rid, []).append(seq)
                continue
            first[(seq.lora, *seq.prompt)] = seq
            if not self.speculative:  # (speculative: keyed once the MTP layer fills its rows, a step later)
                filling.update(keys[seq.cached // self.pool.block:])
            admitted.append((seq, keys))
        c.attn_impl = "naive"  # prefill: expand K/V once and use fused SDPA
        long = [a for a in admitted if len(a[0].prompt) - a[0].length > self.prefill_chunk]
        self.prefilling += [Prefill(seq, keys, twins.pop(seq.rid, [])) for seq, keys in long]
        admitted = [a for a in admitted if a not in long]
        for group in self._prefill_groups(admitted):
            seqs = [s for s, _ in group]
            h, states = self._prefill(seqs)
            logits = self.model.head(h)  # [B, V]
            chosen = self._choose(seqs, logits)
            for i, (seq, keys) in enumerate(group):
                events += self._started(seq, keys, twins.get(seq.rid, ()), logits[i], int(chosen[i]),
                                        states[i] if states else None)
        if self.prefilling:
            events += self._prefill_next()
        # in block order: rows admitted together then hold their blocks in a run, read as views (PagedPool.run)
        live = sorted((s for s in self.running if s.pending is not None), key=lambda s: s.blocks[0])
        c.attn_impl = "absorb"  # decode: attention in the latent space, nothing re-expanded
        spec = [s for s in live if self.speculative and s.drafting and s.json is None
                and s.length + self.drafts + 1 <= c.max_seq_len]
        plain = [s for s in live if s not in spec]
        if spec:
            events += speculate(self, spec)
        if plain:
            pending = [s.pending for s in plain]
            h = self.plan.batch(plain, pending) if self.plan and plan.ON and len(plain) <= plan.MAX_SEQS else None
            if h is not None:  # a few sequences' step as straight-line code (plan.py)
                logits = self.model.head(h)
                if self.routing:
                    self.pool.store_routes(self.plan.new_slots, self.routing)
            else:
                tokens = ints(pending, self.device)[:, None]
                if self.compiled and len(plain) <= self.compiled_batch:
                    logits = self.compiled(tokens, plain)
                    for s in plain:
                        s.advance(1)
                else:
                    batch = self._batch(plain, 1)
                    logits = self.model.head(self.model.hidden(tokens, batch)[:, -1])
                    self._route(batch)
            kept = [] if self.keep_sampling_mask else None  # (the sampler's filtered logits, for the floors)
            chosen = self._choose(plain, logits, kept)
            floors = sampling_floors(plain, logits, *kept[:1]) if self.keep_sampling_mask else [None] * len(plain)
            lps = tempered_logprobs(plain, logits, chosen, floors if self.keep_sampling_mask else None) \
                if self.keep_logprobs else [None] * len(plain)
            events += [self._emit(s, t, row, lp, f) for s, t, row, lp, f in zip(plain, chosen.tolist(),
                                                                                logits.unbind(0), lps, floors)]
        return events

    def _started(self, seq: Sequence, keys: list[bytes], twins, logits: torch.Tensor, token: int,
                 state: torch.Tensor | None) -> list[Event]:
        """seq's prompt is in (logits [V] at its last token, `token` drawn from them): its twins get its cache
        and their own first token, the prefix cache its blocks, and it starts decoding."""
        events = []
        for twin in twins:  # before seq's first token may finish it and free its blocks
            self.pool.copy_prompt(seq, twin)
            self.running.append(twin)
            events.append(self._emit(twin, int(self._choose([twin], logits[None])[0]), logits))
        if self.prefix_cache:
            if self.speculative:
                self.unkeyed[seq.rid] = keys
            else:
                self.pool.remember(seq, keys)
            self.prefix_stats["hit"] += seq.cached
            self.prefix_stats["miss"] += len(seq.prompt) - seq.cached
        self.running.append(seq)
        events.append(self._emit(seq, token, logits))
        if state is not None and seq.finish_reason is None:  # MTP catches up on the prompt next step
            seq.mtp_in = [state] + [state[:0]] * (self.drafts - 1)
        return events

    def _prefill_next(self) -> list[Event]:
        """The next prefill_chunk tokens of the oldest long prompt; once all are in, its first token."""
        p = self.prefilling[0]
        s = p.seq
        h, state = self._forward_prompt(s, min(self.prefill_chunk, len(s.prompt) - s.length))
        if self.speculative:
            self._mtp_prompt(s, state[0])
        if s.length < len(s.prompt):
            return []
        self.prefilling.pop(0)
        logits = self.model.head(h[:, -1])  # [1, V]
        return self._started(s, p.keys, p.twins, logits[0], int(self._choose([s], logits)[0]), None)

    def _mtp_prompt(self, s: Sequence, state: torch.Tensor):
        """Speculative, a chunk of a long prompt in (state [T, ...]: the MTP draft's input over it): each MTP layer
        takes in the positions whose tokens it reads are in the prompt (layer k at position i reads token
        i + k + 1: all but the prompt's last k + 1 positions), a chunk a step like the main model, so the first
        verify catches up on a few rows instead of stalling the batch on the whole prompt."""
        if not s.mtp_in:
            s.mtp_in = [state[:0]] * self.drafts
        s.mtp_in[0] = torch.cat([s.mtp_in[0], state])
        for k in range(self.drafts):
            lo = s.mtp_length[k]
            T = min(len(s.mtp_in[k]), len(s.prompt) - k - 1 - lo)
            if T <= 0:
                return
            tokens = torch.tensor([s.ahead(lo + k + 1, lo + k + 1 + T, [])], device=self.device)
            out = self.model.mtp_hidden(s.mtp_in[k][None, :T], tokens, self._batch([s], T, mtp=k, prefill=True), k,
                                        last=k + 1 == self.drafts)
            s.mtp_in[k] = s.mtp_in[k][T:]
            if k + 1 < self.drafts:
                s.mtp_in[k + 1] = torch.cat([s.mtp_in[k + 1], out[0]])

    def _forward_prompt(self, s: Sequence, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """s's next n prompt tokens through the model, the cache advancing over them -> (hidden [1, n, D], the
        MTP draft's input [1, n, ...])."""
        tokens = torch.tensor([s.prompt[s.length:s.length + n]], device=self.device)
        batch = self._batch([s], n, prefill=True)
        out = self.model.hidden_state(tokens, batch)
        self._route(batch)
        return out

    def _chunk(self, T: int) -> int:
        """Tokens per forward for T new ones: deepseek_v4 at most prefill_chunk (its reference attention scores
        every key of a forward: a 32k prompt at once would need tens of GB); other models all at once."""
        return min(T, self.prefill_chunk) if self.pool.rings else T

    def _prefill_groups(self, admitted: list) -> list[list]:
        """Prompts prefilled together, padded to the longest of their group: sorted by length, a group grows
        while padding stays under a quarter of its tokens (at most 4096 padded tokens, each member's reserved
        blocks holding its padding). deepseek_v4 (its rings), NSA / DSA (their per-block entries) and lone
        prompts go alone."""
        if len(admitted) < 2 or self.pool.rings or self.model.config.attn_type != "full":
            return [[a] for a in admitted]
        groups: list[list] = []
        for a in sorted(admitted, key=lambda a: len(a[0].prompt) - a[0].length):
            g = groups[-1] if groups else None
            T = len(a[0].prompt) - a[0].length  # the longest so far: its own padding is none
            if g and (len(g) + 1) * T <= min(1.25 * (sum(len(s.prompt) - s.length for s, _ in g) + T), 4096) \
                    and all(self.pool.blocks_for(s.length + T) <= len(s.blocks) for s, _ in g):
                g.append(a)
            else:
                groups.append([a])
        return groups

    def _prefill(self, seqs: list[Sequence]) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """The prompts' uncached tokens through the model, padded to the longest -> (hidden at each one's last
        token [B, D], per sequence the MTP draft's input over its tokens [T_i, ...] when speculative). A lone
        prompt goes in one forward (a longer one than prefill_chunk is not here: _prefill_next takes it)."""
        todo = [s.prompt[s.length:] for s in seqs]
        if len(seqs) == 1:
            h, state = self._forward_prompt(seqs[0], len(todo[0]))
            return h[:, -1], [state[0]] if self.speculative else None
        T, ends = max(map(len, todo)), [s.length + len(t) for s, t in zip(seqs, todo)]
        tokens = torch.tensor([t + [0] * (T - len(t)) for t in todo], device=self.device)
        batch = self._batch(seqs, T)
        h, state = self.model.hidden_state(tokens, batch)  # [B, T, D]
        self._route(batch)
        for s, end in zip(seqs, ends):
            s.length = end  # (the forward advanced every row by T; the padding's entries are left unread)
        last = torch.tensor([len(t) - 1 for t in todo], device=self.device)
        return h[torch.arange(len(seqs), device=self.device), last], \
            [state[b, :len(t)] for b, t in enumerate(todo)] if self.speculative else None

    def _batch(self, seqs: list[Sequence], T: int, mtp: int | None = None, prefill: bool = False):
        """The cache view of the next forward over seqs (every model forward of the engine makes one here), and
        which LoRA adapter each of its rows uses."""
        if self.lora_rows:
            self.lora_rows.set([s.lora for s in seqs])
        if self.pool.rings:  # (a prompt's prefill under the prefix cache keeps the rings' rows at its block ends)
            return v4cache.V4Batch(self.pool, seqs, T, mtp, keep=prefill and self.prefix_cache)
        batch = PagedBatch(self.pool, seqs, T, mtp)
        batch.folds = self.folds
        return batch

    def _route(self, batch):
        """keep_routing: where the forward just made over `batch` routed its rows (PagedPool.store_routes)."""
        if self.routing:
            self.pool.store_routes(paged_rows(batch.table, batch.pos, batch.block), self.routing)

    def _choose(self, seqs: list[Sequence], logits: torch.Tensor, kept: list | None = None) -> torch.Tensor:
        scores = penalized(seqs, logits)  # (kept: sample()'s where the scores are the logits, as the floors read them)
        out = sample(scores, [s.params for s in seqs], [s.generator for s in seqs], kept if scores is logits else None)
        for i, s in enumerate(seqs):  # JSON mode: a token that would leave the object is drawn again without it
            if s.json is not None and not self._fits(s, int(out[i])):
                t = redraw(scores[i], int(out[i]), lambda t, s=s: self._fits(s, t),
                           lambda row, s=s: int(sample(row[None], [s.params], [s.generator])[0]),
                           lambda s=s: self._fitting(s))
                if t is None:  # no token continues the object: the answer ends here, cut short ("length"),
                    s.stuck = True  # with a stop token, else end-of-sentence (no text; the model's, the tokenizer's)
                    ends = s.params.stop_token_ids or eos_ids(self.model.config, self.tokenizer)
                    t = ends[0] if ends else int(out[i])
                out[i] = t
        return out

    def _texts(self, s: Sequence) -> list[str]:
        return self.call_texts if isinstance(s.json, CallPrefix) else self.texts

    def _fits(self, s: Sequence, tok: int) -> bool:
        text = self._texts(s)[tok]
        return bool(text) and tok not in s.params.stop_token_ids and s.json.accepts(text)

    def _fitting(self, s: Sequence) -> list[bool]:
        """_fits of every token (its reference): each distinct first character is checked once, then only the
        tokens that start with an accepted one (4x fewer checks over a 129k vocabulary at a JSON key)."""
        first: dict[str, bool] = {}
        stops = set(s.params.stop_token_ids)
        out = []
        for tok, text in enumerate(self._texts(s)):
            ok = bool(text) and tok not in stops
            if ok:
                c = text[0]
                if c not in first:
                    first[c] = s.json.accepts(c)
                ok = first[c] and (len(text) == 1 or s.json.accepts(text))
            out.append(ok)
        return out

    def _emit(self, s: Sequence, tok: int, logits: torch.Tensor, lp: float | None = None,
              floor: float | None = None) -> Event:
        """Append one chosen token (logits [V]: the model's raw row, for logprobs; lp, floor: its keep_logprobs
        log-prob and keep_sampling_mask floor where the step computed them); finish if it stops."""
        s.out.append(tok)
        s.pending = tok
        if self.keep_logits:
            s.logits.append(logits)
        if self.keep_sampling_mask:
            s.floors.append(floor if floor is not None else sampling_floors([s], logits[None])[0])
        if self.keep_logprobs:
            s.sampled.append(lp if lp is not None else tempered_logprobs(
                [s], logits[None], torch.tensor([tok]), s.floors[-1:] if self.keep_sampling_mask else None)[0])
        if s.params.logprobs is not None:
            chosen, vals, ids = top_logprobs(logits[None], torch.tensor([tok], device=logits.device),
                                             s.params.logprobs)
            s.logprobs.append((float(chosen[0]), dict(zip(ids[0].tolist(), vals[0].tolist()))))
        if s.seen is not None:
            s.seen[tok] = True
            s.counts[tok] += 1
        if s.json is not None:
            s.json.feed(self._texts(s)[tok])
        reason = self._stop_reason(s, tok)
        if reason:
            self.running.remove(s)
            self._finish(s, reason)
        lp = s.logprobs[-1] if s.params.logprobs is not None else None
        return Event(s.rid, tok, reason is not None, reason, lp)

    def _stop_reason(self, s: Sequence, tok: int) -> str | None:
        if s.stuck:
            return "length"
        early = len(s.out) < s.params.min_tokens  # (no stop yet: its stop tokens were masked, sampling.biased)
        if not early and (tok in s.params.stop_token_ids or s.json is not None and s.json.complete
                          or s.params.stop and self._stop_string(s)):
            return "stop"
        if len(s.out) >= s.params.max_new_tokens or len(s.prompt) + len(s.out) >= self.model.config.max_seq_len:
            return "length"
        return None

    def _stop_string(self, s: Sequence) -> bool:
        """Whether the text now holds a stop string; if so s.text = the text before the first one (the stop string
        is not part of the answer). Each token decodes only the last few (the longest stop string's characters
        take at most 4 bytes, a token at least one: a string completed by this token starts among the last
        4 x its length), the whole text only once one shows there: a long answer is not re-decoded per token."""
        window = 4 * max(map(len, s.params.stop)) + 4
        tail = self.tokenizer.decode([x for x in s.out[-window:] if x not in self.framing])
        if not any(x in tail for x in s.params.stop):
            return False
        text = self.tokenizer.decode([x for x in s.out if x not in self.framing])
        # min_tokens: a stop string counts only where it ends past the text of the first min_tokens - 1 tokens
        k = s.params.min_tokens - 1
        start = len(self.tokenizer.decode([x for x in s.out[:k] if x not in self.framing])) if k > 0 else 0
        hits = [(i, i + len(x)) for x in s.params.stop if (i := text.find(x, max(0, start - len(x) + 1))) >= 0]
        if hits:
            at, end = min(hits)
            s.text = text[:end if s.params.include_stop_str_in_output else at]
        return bool(hits)

    def _finish(self, s: Sequence, reason: str):
        s.finish_reason, s.pending = reason, None
        if self.routing and s.length:  # (before its blocks go) the routing of every position it ran through
            s.routes = self.pool.routes_of(s)
        self.unkeyed.pop(s.rid, None)
        self.pool.keep_run(s, self.running)
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

    @classmethod
    def for_prompt(cls, model: Transformer, tokenizer, prompt_len: int, max_new_tokens: int, **kw) -> Engine:
        """A one-request engine with cache for that prompt and its new tokens (generate, `sobre generate`)."""
        at_least_one(max_new_tokens=max_new_tokens)  # (before the cache size it sets)
        return cls(model, tokenizer, max_batch=1, cache_tokens=min(prompt_len + max_new_tokens + 1,
                                                                    model.config.max_seq_len), **kw)

    def spec_summary(self) -> str | None:
        """MTP speculative decoding so far, in words (None before any verify): drafts accepted, tokens a verify
        emitted (1 + its accepted drafts), sequences that stopped drafting."""
        s = self.spec_stats
        if not s["verified"]:
            return None
        out = (f"MTP speculative: {s['accepted']} of {s['drafted']} drafts accepted "
               f"({s['accepted'] / s['drafted']:.0%}), {1 + s['accepted'] / s['verified']:.2f} tokens a verify")
        return out + (f", {s['stopped']} sequence(s) stopped drafting" if s["stopped"] else "")

    def stream(self, prompt: list[int], **kw):
        """Yield the new tokens of one prompt as they come (other requests step along), until it finishes.
        Closing the generator early (a consumer that breaks off, Ctrl-C in `sobre chat`) cancels the request:
        its cache blocks are free and later steps do not run it."""
        rid = self.add_request(prompt, **kw)
        try:
            while rid not in self.finished and self.has_work():
                for ev in self.step():
                    if ev.rid == rid:
                        yield ev.token
        finally:
            self.cancel(rid)  # (nothing to do once it finished)
            self.finished.pop(rid, None)


def generate(model: Transformer, prompt: list[int], max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop: tuple[int, ...] = (),
             speculative: bool = False, compile: bool = False, tokenizer=None, min_acceptance: float = 0.3,
             draft_vocab: int | None = None, **kw):
    """Stream the new tokens of one prompt (a one-request Engine; speculative: MTP draft + verify; a tokenizer
    for stop strings and json=True)."""
    eng = Engine.for_prompt(model, tokenizer, len(prompt), max_new_tokens, speculative=speculative, compile=compile,
                            min_acceptance=min_acceptance, draft_vocab=draft_vocab)
    yield from eng.stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, seed=seed, stop_token_ids=stop, **kw)
