"""MTP speculative decoding: greedy output identical to plain greedy; sampled output keeps the distribution."""

import pytest
import torch

import sobre
from sobre import plan
from sobre.engine import Engine
from sobre.sampling import speculative_accept
from sobre.speculative import PROBATION, draft_vocabulary

from conftest import random_model

PROMPTS = [[5, 9, 17, 3, 44, 2, 8], [7, 1], [100, 3, 3, 90, 12, 6, 6, 1, 0, 77, 31], [64]]


def test_speculative_greedy_equals_plain_greedy():
    model = random_model()
    plain = Engine(model).generate(PROMPTS, max_new_tokens=20)
    eng = Engine(model, speculative=True)
    assert eng.generate(PROMPTS, max_new_tokens=20) == plain
    assert [eng.generate([p], max_new_tokens=20)[0] for p in PROMPTS] == plain
    assert eng.spec_stats["accepted"] < eng.spec_stats["drafted"]  # a random MTP head is mostly wrong
    s = eng.spec_stats
    assert eng.spec_summary().startswith(f"MTP speculative: {s['accepted']} of {s['drafted']} drafts accepted")
    assert Engine(model).spec_summary() is None


def test_sequences_whose_drafts_fail_stop_drafting():
    """A random MTP head's drafts are never accepted here: each sequence stops drafting after PROBATION verifies
    and decodes plainly (still plain greedy's tokens), a late request drafting beside them in one step;
    min_acceptance=0 drafts to the end; a bad value is refused."""
    model = random_model()
    plain = Engine(model).generate(PROMPTS, max_new_tokens=60)
    eng = Engine(model, speculative=True)
    rids, done = [eng.add_request(p, max_new_tokens=60) for p in PROMPTS[:3]], {}
    for step in range(PROBATION + 10):
        if step == 20:  # (drafting while the others go plain: both kinds in one step)
            rids.append(eng.add_request(PROMPTS[3], max_new_tokens=60))
        eng.step()
        done.update(eng.collect())
    assert [s.drafting for s in eng.running] == [False, False, False, True]
    while eng.has_work():
        eng.step()
        done.update(eng.collect())
    assert [done[r].out for r in rids] == plain
    assert [done[r].verifies for r in rids] == [PROBATION] * 4 and eng.spec_stats["stopped"] == 4
    always = Engine(model, speculative=True, min_acceptance=0)
    assert always.generate(PROMPTS, max_new_tokens=60) == plain
    assert always.spec_stats["stopped"] == 0 and always.spec_stats["verified"] == 59 * 4
    with pytest.raises(ValueError, match="min_acceptance"):
        Engine(model, speculative=True, min_acceptance=1.5)


def use_oracle(model, monkeypatch):
    """Replace the MTP layers by an oracle: layer k's last hidden is the main model's after k more greedy
    tokens (full forwards), so its draft is the main model's own greedy token k + 1 ahead. (It stands in for the
    module path's MTP layers: a lone sequence's plan, plan.py, is turned off.)"""
    monkeypatch.setattr(plan, "ON", False)
    mtp_hidden = model.mtp_hidden

    def oracle(h, tokens, cache, k=0, last=False):
        out = mtp_hidden(h, tokens, cache, k, last).clone()  # keeps the MTP cache bookkeeping real
        for b, s in enumerate(cache.seqs):
            seq = s.prompt + s.out
            for _ in range(k):
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
            out[b, -1] = model.hidden(torch.tensor([seq]))[0, -1]
        return out

    monkeypatch.setattr(model, "mtp_hidden", oracle)


def test_a_perfect_draft_is_always_accepted(monkeypatch):
    """With the oracle every draft must be accepted, two tokens per step, and the output still equals plain
    greedy."""
    assert oracle_steps(random_model(), monkeypatch, 15) <= 9  # prefill step + 7 steps of 2 tokens for 15 tokens


def oracle_steps(model, monkeypatch, new: int) -> int:
    """Engine steps to decode PROMPTS (new tokens each) with the oracle's drafts; checks the output is plain
    greedy's, every draft was accepted and the pool got all its blocks back."""
    plain = Engine(model).generate(PROMPTS, max_new_tokens=new)
    use_oracle(model, monkeypatch)
    eng = Engine(model, speculative=True)
    rids = [eng.add_request(p, max_new_tokens=new) for p in PROMPTS]
    steps, done = 0, {}
    while eng.has_work():
        eng.step()
        steps += 1
        done.update(eng.collect())
    assert [done[r].out for r in rids] == plain
    assert eng.spec_stats["accepted"] == eng.spec_stats["drafted"] > 0
    assert len(eng.pool.free) == eng.pool.n_blocks - 1
    return steps


@pytest.mark.parametrize("speculative", [False, True])
def test_kept_logits_are_each_tokens_own_row(speculative, monkeypatch):
    """Engine(keep_logits=True): a sequence keeps one raw logits row per token it is given, a verify's accepted
    drafts and bonus token included (the oracle's drafts: all accepted), each equal to a full forward's logits
    at its position; without it none are kept."""
    model = random_model()
    if speculative:
        use_oracle(model, monkeypatch)
    eng = Engine(model, speculative=speculative, keep_logits=True)
    rids, done = [eng.add_request(p, max_new_tokens=9) for p in PROMPTS], {}
    while eng.has_work():
        eng.step()
        done.update(eng.collect())
    for rid, prompt in zip(rids, PROMPTS):
        s = done[rid]
        assert len(s.logits) == len(s.out) == 9
        with torch.no_grad():
            full = model(torch.tensor([prompt + s.out[:-1]]))[0, len(prompt) - 1:]
        torch.testing.assert_close(torch.stack(s.logits), full, atol=1e-4, rtol=1e-4)
    assert eng.spec_stats["accepted"] > 0 if speculative else not eng.spec_stats["drafted"]
    plain = Engine(model, speculative=speculative)
    rid = plain.add_request(PROMPTS[0], max_new_tokens=3)
    while plain.has_work():
        plain.step()
    assert plain.collect()[rid].logits == []


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


def assert_sampled_law(model, prompt: list[int], exact: torch.Tensor, new: int, n: int, draft_vocab=None,
                       **kw) -> Engine:
    """Sample n continuations of `new` tokens (seeds 0..n-1; kw: more sampling parameters) with MTP drafting;
    chi-square goodness of fit of their joint counts against the exact law [V ** new] (cells expected under 5
    pooled). Returns the engine."""
    V = model.config.vocab_size
    eng = Engine(model, speculative=True, max_batch=512, cache_tokens=64 * 600, draft_vocab=draft_vocab)
    rids = [eng.add_request(prompt, max_new_tokens=new, temperature=1.0, seed=i, **kw) for i in range(n)]
    done = {}
    while eng.has_work():
        eng.step()
        done.update(eng.collect())
    cells = [sum(t * V ** (new - 1 - j) for j, t in enumerate(done[r].out)) for r in rids]
    counts = torch.bincount(torch.tensor(cells), minlength=V ** new).float()
    expected = exact * n
    keep = expected >= 5
    chi2 = (((counts - expected) ** 2 / expected)[keep]).sum() + \
        ((counts[~keep].sum() - expected[~keep].sum()) ** 2 / expected[~keep].sum().clamp(min=1e-9))
    dof = int(keep.sum())  # kept cells + the pooled rest - 1
    assert chi2 < dof + 4 * (2 * dof) ** 0.5, (chi2, dof)  # far beyond p = 0.001 only if the law is wrong
    return eng


@pytest.mark.parametrize("bias, draft_vocab", [(None, None), ({0: 1.5, 2: -1.0}, None), (None, 3)])
def test_speculative_sampling_keeps_the_distribution(bias, draft_vocab):
    """Joint law of the first two sampled tokens (the second one goes through draft/verify) against the
    exact one computed from full forwards (with a logit_bias: from the biased logits); chi-square goodness of
    fit. draft_vocab=3: the drafts drawn from ids 0-2 only (a draft law that differs from the model's more)."""
    cfg = sobre.preset("debug", vocab_size=6, n_layers=2, max_seq_len=16)
    model = random_model(cfg, std=0.5)
    prompt = [1, 2, 3]
    b = torch.zeros(6).index_put_((torch.tensor(list(bias)),), torch.tensor(list(bias.values()))) if bias else 0
    with torch.no_grad():
        p0 = (model(torch.tensor([prompt]))[0, -1] + b).softmax(-1)
        pairs = torch.tensor([prompt + [a] for a in range(6)])
        p1 = (model(pairs)[:, -1] + b).softmax(-1)  # [6, 6]
    eng = assert_sampled_law(model, prompt, (p0[:, None] * p1).flatten(), new=2, n=3000, logit_bias=bias,
                             draft_vocab=draft_vocab)
    assert eng.spec_stats["accepted"] > 0 and eng.spec_stats["accepted"] < eng.spec_stats["drafted"]


def two_drafts(cfg=None, **kw):
    return random_model(cfg or sobre.preset("debug", n_mtp_layers=2), **kw)


def test_two_mtp_layers_draft_two_tokens():
    """A model with two MTP layers drafts two tokens a step (layer 2 reads layer 1's hidden and draft), greedy
    output equals plain greedy batched and alone; speculative=1 drafts with the first layer only; more drafts
    than layers is a clear error."""
    model = two_drafts()
    plain = Engine(model).generate(PROMPTS, max_new_tokens=20)
    eng = Engine(model, speculative=True)
    assert eng.drafts == 2
    assert eng.generate(PROMPTS, max_new_tokens=20) == plain
    assert [eng.generate([p], max_new_tokens=20)[0] for p in PROMPTS] == plain
    assert 0 < eng.spec_stats["drafted"] and eng.spec_stats["accepted"] < eng.spec_stats["drafted"]
    one = Engine(model, speculative=1)
    assert one.drafts == 1 and one.generate(PROMPTS, max_new_tokens=20) == plain
    for bad in (3, -1):
        with pytest.raises(ValueError, match="drafts 1..2 tokens"):
            Engine(model, speculative=bad)


def test_two_drafts_with_penalties_and_logprobs_equal_plain():
    """Greedy rows with penalties or a logit bias beside a sampled row, two drafts: each verified position picks
    after the tokens accepted before it (penalties move with them), and the logprobs are the verify's rows:
    output and logprobs equal plain decoding's."""
    model = two_drafts(sobre.preset("debug", n_mtp_layers=2, vocab_size=16), std=0.3)
    kinds = [{}, {"repetition_penalty": 1.5}, {"presence_penalty": 1.0, "frequency_penalty": 0.5},
             {"logit_bias": {3: 1.5, 5: -2.0}}, {"logit_bias": {3: 1.5}, "repetition_penalty": 1.5}]
    prompts = [[1, 2, 3, 4], [5], [7, 7, 1], [2, 6], [9, 3]]

    def run(eng):
        rids = [eng.add_request(p, max_new_tokens=24, logprobs=2, **k) for p, k in zip(prompts, kinds)]
        eng.add_request(prompts[0], max_new_tokens=24, temperature=1.0, seed=3)
        done = {}
        while eng.has_work():
            eng.step()
            done.update(eng.collect())
        return [(done[r].out, done[r].logprobs) for r in rids]

    plain, spec = run(Engine(model)), Engine(model, speculative=True)
    ours = run(spec)
    assert 0 < spec.spec_stats["accepted"] < spec.spec_stats["drafted"]
    for (out, lp), (out_s, lp_s) in zip(plain, ours):
        assert out_s == out
        for (c, top), (c_s, top_s) in zip(lp, lp_s):
            assert abs(c - c_s) < 1e-4 and top.keys() == top_s.keys()


def test_draft_vocabulary():
    assert draft_vocabulary(4096) == 1024 and draft_vocabulary(129280) == 32320  # a quarter, ...
    assert draft_vocabulary(2048) == 1024 and draft_vocabulary(500) == 500  # ... at least 1024, at most V
    assert draft_vocabulary(4096, 10) == 10 and draft_vocabulary(8, 100) == 8
    with pytest.raises(ValueError, match="draft_vocab must be >= 1"):
        Engine(random_model(), speculative=True, draft_vocab=0)


def test_a_draft_vocabulary_keeps_greedy_output(monkeypatch):
    """draft_vocab=4 of 8 ids: the drafts' head scores ids 0-3 alone (the others -inf, never drafted), through
    the plan and through the modules; the drafts are still accepted often and the output is plain greedy's."""
    model = two_drafts(sobre.preset("debug", n_mtp_layers=2, vocab_size=8), std=0.3)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 0, 1], [3], [5, 5, 2, 7]]
    plain = Engine(model).generate(prompts, max_new_tokens=30)
    heads, draft_head = [], sobre.speculative.draft_head
    monkeypatch.setattr(sobre.speculative, "draft_head", lambda e, x: heads.append(draft_head(e, x)) or heads[-1])
    for on in (True, False):
        monkeypatch.setattr(plan, "ON", on)
        eng = Engine(model, speculative=True, draft_vocab=4)
        assert [eng.generate([p], max_new_tokens=30)[0] for p in prompts] == plain
        assert 0 < eng.spec_stats["accepted"] < eng.spec_stats["drafted"]
    assert heads and all(h[:, 4:].isneginf().all() and h[:, :4].isfinite().all() for h in heads)
    with torch.no_grad():  # the head's own logits on ids 0-3
        h = torch.randn(2, model.config.dim)
        torch.testing.assert_close(draft_head(eng, h)[:, :4], model.head(h)[:, :4])


def test_two_perfect_drafts_are_always_accepted(monkeypatch):
    """With the oracle both drafts are always right: three tokens a step, the same output as plain greedy (the
    MTP layers' incremental rows: the next test)."""
    # the first step prefills (1 token) and verifies 2 drafts (3), then 4 steps of 3 tokens
    assert oracle_steps(two_drafts(), monkeypatch, 16) == 5


@pytest.mark.parametrize("D", [2, 3])
def test_drafts_mtp_hiddens_equal_the_whole_sequence_run(D, monkeypatch):
    """D MTP layers, D drafts a step. Whatever is accepted or rejected, every row each MTP layer computes while
    drafting (the catch-up over the positions verified since it last ran, and the draft's own) equals the
    training-time MTP layers run over the whole sequence with the drafts appended (mtp_hiddens: layer k at i reads
    layer k-1 at i and token i + k + 1), so the layers' caches hold the right rows; the last layer returns its last
    row only (its FFN runs on that one). A vocabulary of 8: drafts are often right; a 1-token prompt: with 3 drafts
    a rejection leaves the deeper layers no verified row."""
    model = random_model(sobre.preset("debug", n_mtp_layers=D, vocab_size=8), std=0.3)
    mtp_hidden, drafted, checked = model.mtp_hidden, {}, []

    def check(h, tokens, cache, k=0, last=False):
        out = mtp_hidden(h, tokens, cache, k, last)
        assert last == (k == D - 1) and out.shape[1] == (1 if last else h.shape[1])
        for b, s in enumerate(cache.seqs):
            drafted[s.rid] = [] if k == 0 else drafted[s.rid] + [int(tokens[b, -1])]  # d_1 .. d_k
            seq = torch.tensor([s.prompt + s.out + drafted[s.rid]])
            ref = model.mtp_hiddens(model.hidden(seq), seq)[k][0]  # [len - k - 1, D]
            end = len(s.prompt) + len(s.out) - 1  # the pending token's position: rows end just before it
            torch.testing.assert_close(out[b], ref[end - out.shape[1]:end], atol=1e-4, rtol=0)
            checked.append(h.shape[1])
        return out

    monkeypatch.setattr(model, "mtp_hidden", check)
    monkeypatch.setattr(plan, "ON", False)  # the module path's rows (the plan's: tests/test_plan.py)
    eng = Engine(model, speculative=True)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 0, 1], [3], [5, 5, 2, 7]]
    plain = Engine(model).generate(prompts, max_new_tokens=30)
    assert eng.generate(prompts, max_new_tokens=30) == plain
    assert 0 < eng.spec_stats["accepted"] < eng.spec_stats["drafted"], eng.spec_stats
    assert max(checked) >= 3 and checked.count(1) > 0  # prompts, accepted drafts' catch-up, rejections


def test_two_drafts_sampling_keeps_the_distribution(monkeypatch):
    """Joint law of the first three sampled tokens (the second and third go through two drafts and one verify:
    accept d_1, then d_2, each with min(1, p/q), else a residual draw that ends the step) against the exact
    one from full forwards; chi-square goodness of fit."""
    V = 5
    model = two_drafts(sobre.preset("debug", n_mtp_layers=2, vocab_size=V, n_layers=2, max_seq_len=16), std=0.5)
    prompt = [1, 2, 3]
    with torch.no_grad():
        p0 = model(torch.tensor([prompt]))[0, -1].softmax(-1)  # [V]
        p1 = model(torch.tensor([prompt + [a] for a in range(V)]))[:, -1].softmax(-1)  # [V, V]
        p2 = model(torch.tensor([prompt + [a, b] for a in range(V) for b in range(V)]))[:, -1].softmax(-1)
    exact = (p0[:, None, None] * p1[:, :, None] * p2.view(V, V, V)).flatten()
    checks = []
    monkeypatch.setattr(sobre.speculative, "speculative_accept", lambda *a: checks.append(a) or speculative_accept(*a))
    eng = assert_sampled_law(model, prompt, exact, new=3, n=4000)
    assert eng.spec_stats["accepted"] > 0 and eng.spec_stats["accepted"] < eng.spec_stats["drafted"]
    assert len(checks) > eng.spec_stats["verified"]  # second drafts were checked (after an accepted first one)
