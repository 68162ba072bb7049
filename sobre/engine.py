"""Generation. For now: one sequence over a contiguous cache, with the full sampling pipeline."""

from __future__ import annotations

import torch

from .model import Cache, Transformer
from .sampling import SamplingParams, apply_penalties, sample


@torch.inference_mode()
def generate(model: Transformer, prompt: list[int], max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop: tuple[int, ...] = (), **kw):
    """Continue one prompt; yields new token ids one at a time (streams). Extra keywords are SamplingParams
    fields (min_p, presence_penalty, frequency_penalty, repetition_penalty)."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed, stop_token_ids=stop, **kw)
    if not prompt:
        raise ValueError("empty prompt")
    c = model.config
    if len(prompt) >= c.max_seq_len:
        raise ValueError(f"prompt of {len(prompt)} tokens does not fit the context of {c.max_seq_len}")
    if max(prompt) >= c.vocab_size or min(prompt) < 0:
        raise ValueError(f"prompt token ids must be in [0, {c.vocab_size})")
    gen = [torch.Generator().manual_seed(seed)] if seed is not None else None
    cache = Cache(min(c.max_seq_len, len(prompt) + max_new_tokens))
    device = next(model.parameters()).device
    seen = torch.zeros(1, c.vocab_size, dtype=torch.bool, device=device)
    seen[0, prompt] = True
    counts = torch.zeros(1, c.vocab_size, device=device)
    logits = model(torch.tensor([prompt], device=device), cache)[:, -1]
    for _ in range(max_new_tokens):
        tok = sample(apply_penalties(logits.float(), seen, counts, [params]), [params], gen)
        yield int(tok)
        if int(tok) in params.stop_token_ids or cache.length >= cache.max_len:
            return
        seen[0, tok] = True
        counts[0, tok] += 1
        logits = model(tok.view(1, 1), cache)[:, -1]
