"""Sampling filters against hand-computed distributions; penalties; seeds; bad parameters."""

import json
import math

import pytest
import torch

import sobre
from sobre import Engine, generate
from sobre.constrain import WS_LINES, JsonPrefix
from sobre.sampling import SamplingParams, apply_penalties, draw, filter_logits, sample, sorted_filter, top_logprobs
from sobre.tokenizer import train_tokenizer

from conftest import random_model

PROBS = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
LOGITS = PROBS.log()


def kept(**kw):
    out = filter_logits(LOGITS, [SamplingParams(temperature=1.0, **kw)]).softmax(-1)
    return out[0]


def test_filter_from_top_candidates_equals_the_full_sort(monkeypatch):
    """filter_logits decides among each row's TOP_CANDIDATES best tokens when they hold its kept set, else sorts
    the row: every mix of top-k (below, above and past that many), top-p (reached inside them or not) and min-p
    (its bound inside or not) keeps exactly what one sort of the whole vocabulary keeps, with the same values."""
    import sobre.sampling
    monkeypatch.setattr(sobre.sampling, "TOP_CANDIDATES", 32)
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.5, 2.0, 6.0, 15.0, 30.0]).repeat(10)[:48, None]  # flat..peaked
    logits = torch.randn(48, 500, generator=g) * scale
    combos = [dict(top_k=k, top_p=p, min_p=m) for k in (0, 8, 32, 100, 900) for p in (1.0, 0.5, 0.9, 0.999)
              for m in (0.0, 0.02, 0.3)]
    params = [SamplingParams(temperature=0.7, **combos[i % len(combos)]) for i in range(48)]
    short = [i for i in range(48) if 0 < params[i].top_k <= 32]  # every row's top-k within: a smaller topk
    plain = [i for i in range(48) if params[i].top_k in (0, 900) and params[i].top_p == 1 and params[i].min_p == 0]
    for rows in (range(48), range(24, 48), short, short + plain):  # (both filter paths in one call, rows of each)
        got = filter_logits(logits[list(rows)], [params[i] for i in rows])
        want = sorted_filter(logits[list(rows)] / 0.7, [params[i] for i in rows])
        assert torch.equal(got.isfinite(), want.isfinite())
        torch.testing.assert_close(got[got.isfinite()], want[want.isfinite()], rtol=0, atol=0)
        for i, row in zip(rows, got):  # top-p 1 drops nothing, though a peaked row's mass sums to 1.0 early in fp32
            if params[i].top_p == 1 and params[i].min_p == 0:
                assert row.isfinite().sum() == min(params[i].top_k or 500, 500)
    flat = torch.randn(4, 500, generator=g) * 0.5  # min-p alone with its bound past the candidates: no sort
    params = [SamplingParams(temperature=0.7, min_p=m, top_k=k)
              for m, k in ((0.02, 0), (0.1, 900), (0.02, 8), (0.5, 0))]
    got, want = filter_logits(flat, params), sorted_filter(flat / 0.7, params)
    assert torch.equal(got.isfinite(), want.isfinite()) and torch.equal(got[got.isfinite()], want[want.isfinite()])
    assert got[:2].isfinite().sum(1).min() > 32


def test_top_k_renormalises_the_best_k():
    assert torch.allclose(kept(top_k=2), torch.tensor([0.5, 0.2, 0, 0, 0]) / 0.7)
    assert SamplingParams(temperature=1e-300).temperature == 0  # greedy, not an overflow
    assert torch.allclose(kept(top_k=2**62, top_p=0.999), kept())  # beyond the vocabulary: no filter (found by
    # schemathesis: it overflowed)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    assert torch.allclose(kept(top_p=0.7), torch.tensor([0.5, 0.2, 0, 0, 0]) / 0.7)  # 0.5 + 0.2 reaches 0.7
    assert torch.allclose(kept(top_p=0.71), torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85)
    assert torch.allclose(kept(top_p=1e-6), torch.tensor([1.0, 0, 0, 0, 0]))


def test_min_p_is_relative_to_the_top_token():
    assert torch.allclose(kept(min_p=0.3), torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85)  # >= 0.15


def test_temperature_sharpens():
    t = 0.5
    want = PROBS[0] ** (1 / t) / (PROBS[0] ** (1 / t)).sum()
    assert torch.allclose(filter_logits(LOGITS, [SamplingParams(temperature=t)]).softmax(-1)[0], want)


def test_penalties_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    seen = torch.tensor([[True, True, False, False]])
    counts = torch.tensor([[2.0, 0.0, 0.0, 1.0]])
    p = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, seen, counts, [p])
    # token 0: 2/2 - 0.5 - 0.5 ; token 1: -1*2 ; token 2: untouched ; token 3: 1 - 0.5 - 0.25
    assert torch.allclose(out, torch.tensor([[0.0, -2.0, 0.5, 0.25]]))
    extreme = apply_penalties(logits, seen, counts, [SamplingParams(repetition_penalty=1e-300)])
    assert torch.isfinite(extreme).all()  # found by schemathesis: an overflow made the draw fail


def test_sampling_frequencies_follow_the_filtered_distribution():
    g = torch.Generator().manual_seed(0)
    p = SamplingParams(temperature=1.0, top_k=3)
    draws = torch.stack([sample(LOGITS, [p], [g]) for _ in range(6000)]).flatten()
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    want = torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85
    chi2 = (((freq - want) ** 2 / want.clamp(min=1e-9))[:3] * len(draws)).sum()
    assert freq[3:].sum() == 0 and chi2 < 13.8  # chi-square, 2 dof, p = 0.001


def test_inverse_cdf_draw_matches_multinomial_in_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.0, 0.3, 0.0, 0.05, 0.45, 0.2, 0.0])  # zeros inside and at both ends
    n = 40_000
    ours = draw(p.repeat(n, 1), torch.rand(n, generator=g))
    ref = torch.multinomial(p, n, replacement=True, generator=g)  # the reference twin
    for ids in (ours, ref):
        freq = torch.bincount(ids, minlength=7).float() / n
        chi2 = ((freq - p) ** 2 / p.clamp(min=1e-9))[p > 0].sum() * n
        assert freq[p == 0].sum() == 0 and chi2 < 16.3  # chi-square, 3 dof, p = 0.001
    edges = draw(p.repeat(3, 1) * 3.0, torch.tensor([0.0, 0.5, 1 - 2**-24]))  # unnormalised rows too
    assert edges.tolist() == [1, 4, 5]  # the first and last tokens with mass, never a zero-probability one


def test_greedy_rows_and_seeded_rows_mix_in_one_batch():
    logits = LOGITS.repeat(3, 1)
    params = [SamplingParams(), SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=1.0, seed=1)]
    gens = [None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)]
    out = sample(logits, params, gens)
    assert out[0] == 0 and out[1] == out[2]


def test_logprobs_are_the_model_distribution():
    chosen, vals, ids = top_logprobs(LOGITS, torch.tensor([2]), 2)
    assert chosen.item() == pytest.approx(math.log(0.15), rel=1e-5)
    assert ids.tolist() == [[0, 1]] and torch.allclose(vals, torch.tensor([[math.log(0.5), math.log(0.2)]]))


@pytest.mark.parametrize("kw,name", [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
                                     (dict(top_k=-2), "top_k"), (dict(min_p=1.5), "min_p"),
                                     (dict(repetition_penalty=0), "repetition_penalty"),
                                     (dict(presence_penalty=3), "presence_penalty"),
                                     (dict(max_new_tokens=0), "max_new_tokens"), (dict(logprobs=50), "logprobs")])
def test_bad_parameters_are_rejected(kw, name):
    with pytest.raises(ValueError, match=f"sampling parameter {name}="):
        SamplingParams(**kw)


def test_generate_seeded_sampling_reproducible_and_penalties_change_output():
    model = random_model()
    a = list(generate(model, [1, 2, 3], max_new_tokens=12, temperature=1.0, seed=5))
    assert a == list(generate(model, [1, 2, 3], max_new_tokens=12, temperature=1.0, seed=5))
    greedy = list(generate(model, [1, 2, 3], max_new_tokens=12))
    no_repeat = list(generate(model, [1, 2, 3], max_new_tokens=12, repetition_penalty=1e6))
    assert len(set(no_repeat)) == len(no_repeat) and not set(no_repeat) & {1, 2, 3}
    assert greedy != no_repeat or len(set(greedy)) == len(greedy)
    with pytest.raises(ValueError, match="token ids must be in"):
        list(generate(model, [10**6]))


def test_logit_bias_forces_bans_and_leaves_logprobs_and_neighbours_alone():
    """OpenAI's logit_bias: +100 makes a token every pick, -100 bans the greedy tokens; the reported logprobs stay
    the model's own; a row without bias in the same batch decodes as alone."""
    model = random_model()
    prompt = [1, 2, 3]
    base = Engine(model).generate([prompt], max_new_tokens=8)[0]
    eng = Engine(model)
    forced = eng.add_request(prompt, max_new_tokens=8, logit_bias={5: 100}, logprobs=0)
    banned = eng.add_request(prompt, max_new_tokens=8, logit_bias={t: -100 for t in base}, temperature=1.0, seed=0)
    alone = eng.add_request(prompt, max_new_tokens=8)
    done = {}
    while eng.has_work():
        eng.step()
        done.update(eng.collect())
    assert done[forced].out == [5] * 8 and done[alone].out == base and not set(done[banned].out) & set(base)
    with torch.no_grad():
        raw = model(torch.tensor([prompt]))[0, -1].log_softmax(-1)
    assert done[forced].logprobs[0][0] == pytest.approx(raw[5].item(), abs=1e-5)
    with pytest.raises(ValueError, match="sampling parameter logit_bias"):
        SamplingParams(logit_bias={0: 101})
    with pytest.raises(ValueError, match="logit_bias token ids must be in"):
        eng.add_request(prompt, logit_bias={model.config.vocab_size: 1})


@pytest.mark.parametrize("text,ok", [
    ('{}', True), (' {"a": [1, 2.5, -3e+2, 0, -0.1E5, true, false, null, "x\\u00e9\\n\\"", {}, []], "b": {}} ', True),
    ('{"é": "日本", "k":[[],[{}]]}', True), ('[]', False), ('{"a" 1}', False), ('{"a": 01}', False),
    ('{"a": 1.}', False), ('{"a": [1,]}', False), ('{"a": 1,}', False), ('{a: 1}', False), ('{"a": "\\x"}', False),
    ('{"a": 1}}', False), ('{"a": [}', False), ('{"a": "b\n"}', False), ('{} x', False), ('{"a": .5}', False),
    ('{"a": tru', None), ('{"a": 1e', None), ('{"a": "\\u00', None),
    ('{"a":' + " " * 20 + "1}", True), ('{"a":' + " " * 21 + "1}", False), ('{\n\n "a": 1}', True),
    ('{\n\n\n"a": 1}', False), ("\n\n{}", True), ("\n\n\n{}", False), ('{"a": "' + "\n" * 3 + '"}', False),
    ('{"a": "' + " " * 40 + '"}', True)])
def test_json_prefix(text, ok):
    """JsonPrefix against json.loads: a valid object is accepted character by character and complete exactly at
    its last character; an invalid one is refused where it goes wrong (ok None: a valid, unfinished prefix)."""
    p, done = JsonPrefix(), []
    fed = all(p.accepts(ch) and p.feed(ch) and not done.append(p.complete) for ch in text)
    if ok:
        assert fed and json.loads(text) is not None and done.index(True) == len(text.rstrip()) - 1
    else:
        assert (fed and not p.complete) if ok is None else not (fed and p.complete)


def test_json_mode_answers_one_object(tmp_path):
    """Engine JSON mode: with end-of-sentence and a special token ranked above the next token of an object, greedy
    skips them and stops when the object closes (no end-of-sentence needed); sampled rows stay prefixes of an
    object; speculative engines decode JSON rows plainly; without a tokenizer it is an error."""
    tok = train_tokenizer(['{"a": [1, 2.5, true], "b": "text"}', "Hello world, the answer is 42."] * 20,
                          vocab_size=300, out=tmp_path)
    model = random_model(sobre.preset("debug", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id))
    script, think = tok.encode('{"a": [1, true], "b": "x"} and more'), tok.encode("<think>")[0]

    class Prefers(torch.nn.Module):  # end-of-sentence, then <think>, then the script's next token
        def forward(self, h):
            logits = torch.full((*h.shape[:-1], tok.vocab_size), -1e9)
            logits[..., [tok.eos_id, think, script[min(len(steps), len(script) - 1)]]] = torch.tensor([10., 9., 5.])
            steps.append(0)
            return logits

    head, steps = model.head, []
    model.head = Prefers()
    eng = Engine(model, tok)
    out = eng.generate([[5, 6]], max_new_tokens=40, json=True, stop_token_ids=(tok.eos_id,))[0]
    assert tok.decode(out) == '{"a": [1, true], "b": "x"}'
    steps[:] = []  # with stop strings too: the object's end stops it, nothing for a server to cut (text None)
    rid = eng.add_request([5, 6], max_new_tokens=40, json=True, stop=("zz",), stop_token_ids=(tok.eos_id,))
    while eng.has_work():
        eng.step()
    seq = eng.collect()[rid]
    assert seq.out == out and seq.finish_reason == "stop" and seq.text is None
    one, steps[:] = tok.encode("1")[0], []  # a stop token that would fit is not drawn either: the object goes on
    out = eng.generate([[5, 6]], max_new_tokens=40, json=True, stop_token_ids=(tok.eos_id, one))[0]
    assert one not in out and JsonPrefix().feed(tok.decode(out))
    model.head = head
    for spec in (False, True):
        eng = Engine(model, tok, speculative=spec)
        rids = [eng.add_request([5, 6 + i], max_new_tokens=24, json=True, temperature=1.0, seed=i) for i in range(4)]
        done = {}
        while eng.has_work():
            eng.step()
            done.update(eng.collect())
        for r in rids:
            text, p = tok.decode(done[r].out), JsonPrefix()
            assert p.feed(text) and (done[r].finish_reason == "length" or json.loads(text) is not None)
        assert eng.spec_stats["verified"] == 0
    with pytest.raises(ValueError, match="JSON mode needs a tokenizer"):
        Engine(model).add_request([1], json=True)


def test_json_mode_bounds_whitespace(tmp_path):
    """A model that ranks a newline above everything still answers an object in JSON mode: whitespace between
    tokens comes in runs of at most WS_LINES line breaks (unbounded, greedy would pad until max_new_tokens)."""
    tok = train_tokenizer(['{"a": [1, 2.5, true], "b": "text"}\n'] * 20, vocab_size=300, out=tmp_path)
    model = random_model(sobre.preset("debug", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id))
    ids = [tok.encode(t) for t in "\n{}"]
    assert all(len(i) == 1 for i in ids)

    class Prefers(torch.nn.Module):  # newline, then "{", then "}"
        def forward(self, h):
            logits = torch.full((*h.shape[:-1], tok.vocab_size), -1e9)
            logits[..., [i[0] for i in ids]] = torch.tensor([10., 8., 7.])
            return logits

    model.head = Prefers()
    out = Engine(model, tok).generate([[5, 6]], max_new_tokens=40, json=True)[0]
    assert tok.decode(out) == "\n" * WS_LINES + "{" + "\n" * WS_LINES + "}"
