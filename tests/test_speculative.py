"""MTP speculative decoding: greedy output identical to plain greedy; sampled output keeps the distribution."""

import torch

import sobre
from sobre.engine import Engine

from conftest import random_model

PROMPTS = [[5, 9, 17, 3, 44, 2, 8], [7, 1], [100, 3, 3, 90, 12, 6, 6, 1, 0, 77, 31], [64]]


def test_speculative_greedy_equals_plain_greedy():
    model = random_model()
    plain = Engine(model).generate(PROMPTS, max_new_tokens=20)
    eng = Engine(model, speculative=True)
    assert eng.generate(PROMPTS, max_new_tokens=20) == plain
    assert [eng.generate([p], max_new_tokens=20)[0] for p in PROMPTS] == plain
    assert eng.spec_stats["accepted"] < eng.spec_stats["drafted"]  # a random MTP head is mostly wrong


def use_oracle(model, monkeypatch):
    """Replace the MTP head by an oracle: the main model's own next hidden, from a full forward."""
    mtp_hidden = model.mtp_hidden

    def oracle(h, tokens, cache):
        out = mtp_hidden(h, tokens, cache).clone()  # keeps the MTP cache bookkeeping real
        for b, s in enumerate(cache.seqs):
            out[b, -1] = model.hidden(torch.tensor([s.prompt + s.out]))[0, -1]
        return out

    monkeypatch.setattr(model, "mtp_hidden", oracle)


def test_a_perfect_draft_is_always_accepted(monkeypatch):
    """With the oracle every draft must be accepted, two tokens per step, and the output still equals plain
    greedy."""
    model = random_model()
    plain = Engine(model).generate(PROMPTS, max_new_tokens=15)
    use_oracle(model, monkeypatch)
    eng = Engine(model, speculative=True)
    steps = 0
    rids = [eng.add_request(p, max_new_tokens=15) for p in PROMPTS]
    done = {}
    while eng.has_work():
        eng.step()
        steps += 1
        done.update(eng.collect())
    assert [done[r].out for r in rids] == plain
    assert eng.spec_stats["accepted"] == eng.spec_stats["drafted"] > 0
    assert steps <= 9  # prefill step + 7 steps of 2 tokens for 15 tokens
    assert len(eng.pool.free) == eng.pool.n_blocks - 1


def test_speculative_greedy_with_penalties_equals_plain(monkeypatch):
    """Greedy rows with and without penalties in one batch (their picks are made apart: a penalty moves with
    the token accepted before it), beside a sampled row: with the random MTP head most drafts are rejected, with
    the oracle (its draft penalized as the verify's pick) every one is accepted."""
    model = random_model()
    kinds = [{}, {"repetition_penalty": 1.5}, {"presence_penalty": 1.0, "frequency_penalty": 0.5}]

    def run(eng):
        rids = [eng.add_request(p, max_new_tokens=12, **k) for p, k in zip(PROMPTS, kinds)]
        rids.append(eng.add_request(PROMPTS[3], max_new_tokens=12, temperature=1.0, seed=3))
        done = {}
        while eng.has_work():
            eng.step()
            done.update(eng.collect())
        return [done[r].out for r in rids[:3]]

    plain = run(Engine(model))
    assert plain[1] != Engine(model).generate([PROMPTS[1]], max_new_tokens=12)[0]  # the penalty matters
    eng = Engine(model, speculative=True)
    assert run(eng) == plain
    assert eng.spec_stats["accepted"] < eng.spec_stats["drafted"]
    use_oracle(model, monkeypatch)
    eng = Engine(model, speculative=True)
    assert run(eng) == plain
    assert eng.spec_stats["accepted"] == eng.spec_stats["drafted"] > 0


def test_speculative_sampling_keeps_the_distribution():
    """Joint law of the first two sampled tokens (the second one goes through draft/verify) against the
    exact one computed from full forwards; chi-square goodness of fit."""
    cfg = sobre.preset("debug", vocab_size=6, n_layers=2, max_seq_len=16)
    model = random_model(cfg, std=0.5)
    prompt = [1, 2, 3]
    with torch.no_grad():
        p0 = model(torch.tensor([prompt]))[0, -1].softmax(-1)
        pairs = torch.tensor([prompt + [a] for a in range(6)])
        p1 = model(pairs)[:, -1].softmax(-1)  # [6, 6]
    exact = (p0[:, None] * p1).flatten()
    n = 3000
    eng = Engine(model, speculative=True, max_batch=512, cache_tokens=64 * 600)
    rids = [eng.add_request(prompt, max_new_tokens=2, temperature=1.0, seed=i) for i in range(n)]
    done = {}
    while eng.has_work():
        eng.step()
        done.update(eng.collect())
    outs = [done[r].out for r in rids]
    counts = torch.bincount(torch.tensor([a * 6 + b for a, b in outs]), minlength=36).float()
    expected = exact * n
    keep = expected >= 5
    chi2 = (((counts - expected) ** 2 / expected)[keep]).sum() + \
        ((counts[~keep].sum() - expected[~keep].sum()) ** 2 / expected[~keep].sum().clamp(min=1e-9))
    dof = int(keep.sum())  # kept cells + the pooled rest - 1
    assert eng.spec_stats["accepted"] > 0 and eng.spec_stats["accepted"] < eng.spec_stats["drafted"]
    assert chi2 < dof + 4 * (2 * dof) ** 0.5, (chi2, dof)  # far beyond p = 0.001 only if the law is wrong
