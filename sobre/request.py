"""What the engine schedules: a request's state as it decodes (Sequence), what a request must fit (Limits), and
what a step emits (Event)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .constrain import JsonPrefix
from .sampling import ParamError, SamplingParams
from .schema import SchemaPrefix
from .tools import SEP


@dataclass
class Sequence:
    rid: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    out: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    logits: list = field(default_factory=list)  # Engine(keep_logits=True): the raw logits row [V] of each token in out
    sampled: list = field(default_factory=list)  # Engine(keep_logprobs=True): each token's log-prob at the temperature
    routes: torch.Tensor | None = None  # Engine(keep_routing=True), once finished: [MoE layers, positions, K] experts
    floors: list = field(default_factory=list)  # Engine(keep_sampling_mask=True): each out token's sampling floor
    blocks: list[int] = field(default_factory=list)
    lane: int | None = None  # row in the pool's per-sequence rings (deepseek_v4)
    length: int = 0  # tokens whose K/V sit in the cache
    mtp_length: list[int] = field(default_factory=list)  # per MTP layer k: its valid cache entries (positions)
    pending: int | None = None  # sampled, not yet fed to the model
    # per MTP layer k: the hiddens of layer k - 1 (k = 0: the main model's) at positions mtp_length[k].., [T, D]
    mtp_in: list[torch.Tensor] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    cached: int = 0  # prompt tokens whose cache came from the prefix cache
    entries: int = 0  # NSA: compressed K/V entries in the pool (a copied prompt's own are recomputed once)
    rings_at: dict = field(default_factory=dict)  # deepseek_v4 prefix cache: block end -> its ring rows (prefill)
    text: str | None = None  # stopped by a stop string: the text before it (what a server sends)
    seen: torch.Tensor | None = None  # [V] bool: prompt + output (repetition penalty)
    counts: torch.Tensor | None = None  # [V] output token counts (presence / frequency penalties)
    bias: torch.Tensor | None = None  # [V] fp32 logit_bias
    json: JsonPrefix | SchemaPrefix | None = None  # JSON mode: the object so far
    stuck: bool = False  # ... and no token of the vocabulary continues it (it ends, cut short)
    lora: int | None = None  # index of its LoRA adapter among the engine's (None: the base model)
    verifies: int = 0  # speculative: verify forwards so far, and the drafts they accepted
    accepted: int = 0
    drafting: bool = True  # speculative: False once its drafts proved too rarely accepted (plain from then on)

    def advance(self, T: int, mtp: int | None = None):
        """T more tokens in the cache (of the main model, or of MTP layer `mtp`)."""
        if mtp is None:
            self.length += T
        else:
            self.mtp_length[mtp] += T

    def ahead(self, lo: int, hi: int, drafts: list[int]) -> list[int]:
        """Tokens lo..hi-1 of prompt + output + drafts (an MTP layer's inputs), without copying the prompt."""
        n = len(self.prompt)
        tokens = self.prompt[lo:] + self.out if lo < n else self.out[lo - n:]
        return (tokens + drafts)[:hi - lo]


@dataclass(frozen=True)
class Limits:
    """What a request must fit: the vocabulary, the context, the cache pool. Plain values (a server checks
    requests against them in its own process, the engine may live in another)."""
    vocab_size: int
    max_seq_len: int
    block: int
    blocks: int  # usable cache blocks
    tokenizer: bool
    loras: tuple[str, ...] = ()  # the LoRA adapters served beside the base model, by name
    separator: bool = False  # the vocabulary holds <｜tool▁sep｜> as one token (tool_calls' constraint reads it)

    def check(self, prompt: list[int], params: SamplingParams):
        """ValueError unless the request can run: ids in the vocabulary, prompt inside the context, cache room."""
        if not prompt:
            raise ValueError("empty prompt")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        if len(prompt) >= self.max_seq_len:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit the context of {self.max_seq_len} "
                             "(max_position_embeddings) with room for one new token")
        if params.lora is not None and params.lora not in self.loras:
            raise ParamError(f"no LoRA adapter {params.lora!r} is served (adapters: {', '.join(self.loras) or 'none'})",
                             "lora")
        if params.logit_bias and max(params.logit_bias) >= self.vocab_size:
            raise ParamError(f"logit_bias token ids must be in [0, {self.vocab_size})", "logit_bias")
        if any(not 0 <= t < self.vocab_size for t in params.stop_token_ids):
            raise ParamError(f"stop_token_ids must be in [0, {self.vocab_size})", "stop_token_ids")
        if (params.stop or params.json) and not self.tokenizer:
            raise ValueError(f"{'stop strings need' if params.stop else 'JSON mode needs'} a tokenizer "
                             "(Engine(model, tokenizer))")
        if params.tool_calls and not self.separator:
            raise ParamError(f"tool_calls: the vocabulary has no {SEP} token (a call's name and arguments are read "
                             "token by token: a vocabulary trained before sobre added it spells it in bytes)",
                             "tool_calls")
        need = -(-min(len(prompt) + params.max_new_tokens, self.max_seq_len) // self.block)
        if need > self.blocks:
            raise ValueError(f"request needs {need} cache blocks, the pool has {self.blocks}; raise cache_tokens")


@dataclass
class Prefill:
    """A prompt longer than the engine's prefill_chunk, prefilled that many tokens a step while the running rows
    keep decoding (chunked prefill): its sequence, prefix-cache keys and the later samples of the same prompt (twins:
    their cache is copied from it once it is in)."""
    seq: Sequence
    keys: list[bytes]
    twins: list[Sequence]


@dataclass
class Event:
    rid: int
    token: int
    finished: bool
    finish_reason: str | None = None
    logprob: tuple[float, dict[int, float]] | None = None  # (chosen token's, {top-n id: logprob}) when asked
