"""CPU training attention (softmax kept for the backward) against its twin, fused SDPA."""

import pytest
import torch

from sobre import attention
from sobre.attention import attend, attend_grouped

from conftest import random_model


def _grads(q, k, v, mask, budget, monkeypatch, dtype=torch.float32):
    monkeypatch.setattr(attention, "SCORES_BUDGET", budget)
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    o = attend(q, k, v, mask, 0.3)
    o.backward(torch.linspace(-1, 1, o.numel()).view(o.shape).to(dtype))
    return [o.detach().float()] + [t.grad.float() for t in (q, k, v)]


def _masks(B, T, S):
    g = torch.Generator().manual_seed(1)
    docs = torch.randint(0, 3, (B, T), generator=g).sort(1).values  # packed documents (SFT's mask)
    same = (docs[:, :, None] == docs[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril()
    cached = torch.ones(T, S, dtype=torch.bool).tril(S - T)  # new tokens after a cache of S - T
    own = torch.arange(S)[None, None, :] < torch.tensor([S, S - 2])[:, None, None]  # GRPO's padded prompts
    ahead = cached.clone()
    ahead[min(3, T - 1), min(S - T + 9, S - 1)] = T > 9  # query 3 sees past its causal position (no mask of sobre's)
    return {"causal": (None, T), "documents": (same[:, None], T), "cached": (cached, S),
            "padded": ((own & cached)[:, None], S), "ahead": (ahead, S)}


@pytest.mark.parametrize("block", [128, 4, 7])
@pytest.mark.parametrize("case", ["causal", "documents", "cached", "padded", "ahead"])
def test_kept_softmax_equals_sdpa(case, block, monkeypatch):
    """Whole, or in blocks of queries that skip the keys after their causal positions (fp32), which a mask
    letting a query see past its own falls back from."""
    monkeypatch.setattr(attention, "CAUSAL_BLOCK", block)
    B, T, H = 2, 19, 3
    mask, S = _masks(B, T, T + 5)[case]
    bias = attention.causal_bias(T, "cpu") if mask is None else torch.where(mask, 0.0, float("-inf"))
    blocks = attention._blocks(bias, T, S, torch.float32)
    assert len(blocks) == (1 if block == 128 or case == "ahead" else -(-T // block))
    assert attention._blocks(bias, T, S, torch.bfloat16) == [(0, T, S)]
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(B, n, H, 12, generator=g) for n in (T, S))
    v = torch.randn(B, S, H, 8, generator=g)  # MLA: dv < dq
    ours, twin = _grads(q, k, v, mask, 1 << 20, monkeypatch), _grads(q, k, v, mask, 0, monkeypatch)
    for a, b in zip(ours, twin):
        assert (a - b).abs().max() < 1e-5 * b.abs().max()


def test_kept_softmax_bf16_close_to_sdpa(monkeypatch):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 40, 4, d, generator=g) for d in (16, 16, 8))
    exact = _grads(q, k, v, None, 0, monkeypatch)
    for budget in (1 << 20, 0):  # bf16 rounding, ours and the twin's alike
        for a, b in zip(_grads(q, k, v, None, budget, monkeypatch, torch.bfloat16), exact):
            assert (a - b).abs().max() < 0.03 * b.abs().max()


def test_model_training_step_equals_sdpa(monkeypatch):
    """The path the model takes with gradients on, and its fallback past the budget: same loss and gradients."""
    model = random_model()
    x = torch.randint(0, model.config.vocab_size, (2, 17))
    runs = []
    for budget in (1 << 20, 0):
        monkeypatch.setattr(attention, "SCORES_BUDGET", budget)
        model.zero_grad()
        loss = model(x[:, :-1], targets=x[:, 1:])[0]
        loss.backward()
        runs.append([loss.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*runs):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max() + 1e-7


@pytest.mark.parametrize("case", ["cached", "padded", "documents"])
@pytest.mark.parametrize("T", [1, 5])
def test_grouped_query_attention_equals_repeated_heads(case, T):
    """attend_grouped (each KV head's query heads as extra query rows) against repeating K/V per query head."""
    B, Hkv, G, S = 2, 2, 3, 13
    mask = _masks(B, S, S)["documents"][0][..., S - T:, :] if case == "documents" else _masks(B, T, S)[case][0]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, Hkv * G, 12, generator=g)
    k = torch.randn(B, S, Hkv, 12, generator=g)
    v = torch.randn(B, S, Hkv, 8, generator=g)
    with torch.no_grad():
        got = attend_grouped(q, k, v, mask, 0.3)
        want = attend(q, k.repeat_interleave(G, 2), v.repeat_interleave(G, 2), mask, 0.3)
    assert got.shape == want.shape == (B, T, Hkv * G, 8)
    assert (got - want).abs().max() < 1e-5 * want.abs().max()


def test_engine_decodes_grouped_query_models_without_repeating_heads(monkeypatch):
    """The engine's dense (GQA) decode takes attend_grouped: tokens equal the plain forward's greedy ones."""
    import sobre
    from sobre import attention as A
    from sobre import model as M
    from sobre.engine import Engine
    calls = []
    monkeypatch.setattr(M, "attend_grouped", lambda *a: calls.append(1) or A.attend_grouped(*a))
    cfg = sobre.Config.from_hf(dict(model_type="qwen2", vocab_size=96, hidden_size=48, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                                    max_position_embeddings=128))
    model = random_model(cfg)
    prompt = [5, 9, 17, 3, 44]
    out = Engine(model).generate([prompt], max_new_tokens=8)[0]
    assert calls
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt):]


@pytest.mark.parametrize("T", [1, 4, 13])
def test_no_mask_means_causal_at_the_last_positions(T, monkeypatch):
    """mask=None (a lone sequence's cache: paged.PagedBatch gives no mask where every row ends at the last key) is
    causal with the T queries at the last T of S positions, one query seeing every key: attend (with and without
    gradients), attend_grouped and absorbed MLA's latent_attend equal the explicit [T, S] mask."""
    from sobre.absorb import latent_attend
    B, H, S = 2, 4, 13
    explicit = torch.ones(T, S, dtype=torch.bool).tril(S - T)
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(B, T, H, 12, generator=g), torch.randn(B, S, H, 12, generator=g), torch.randn(B, S, H, 8)
    for budget in (1 << 20, 0):  # the kept softmax, SDPA
        for a, b in zip(_grads(q, k, v, None, budget, monkeypatch), _grads(q, k, v, explicit, budget, monkeypatch)):
            assert (a - b).abs().max() < 1e-5 * b.abs().max()
    with torch.no_grad():
        pairs = [(attend(q, k, v, m, 0.3), attend_grouped(q, k[:, :, :2], v[:, :, :2], m, 0.3),
                  latent_attend(q, k[:, :, 0], None if m is None else m.clone(), 8, 0.3)) for m in (None, explicit)]
    for a, b in zip(*pairs):
        assert (a - b).abs().max() < 1e-6 * b.abs().max()
