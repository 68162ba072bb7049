"""Generation. For now: plain batched greedy / sampled decoding over a contiguous cache."""

from __future__ import annotations

import torch

from .model import Cache, Transformer


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. temperature 0 is greedy."""
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"bad sampling parameters: temperature={temperature} (>= 0), top_k={top_k} (>= 0), "
                         f"top_p={top_p} (in (0, 1])")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model: Transformer, prompt: list[int], max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop: tuple[int, ...] = ()):
    """Continue one prompt; yields new token ids one at a time (streams)."""
    if not prompt:
        raise ValueError("empty prompt")
    c = model.config
    if len(prompt) >= c.max_seq_len:
        raise ValueError(f"prompt of {len(prompt)} tokens does not fit the context of {c.max_seq_len}")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    cache = Cache(min(c.max_seq_len, len(prompt) + max_new_tokens))
    device = next(model.parameters()).device
    logits = model(torch.tensor([prompt], device=device), cache)[:, -1]
    for _ in range(max_new_tokens):
        tok = sample(logits, temperature, top_k, top_p, gen)
        yield int(tok)
        if int(tok) in stop or cache.length >= cache.max_len:
            return
        logits = model(tok.view(1, 1), cache)[:, -1]
