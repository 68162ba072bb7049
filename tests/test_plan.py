"""plan.DecodePlan, a few sequences' decode steps and a lone one's speculative steps as straight-line code, against
its twin: the module path (Transformer.hidden / mtp_hidden over a paged.PagedBatch; plan.ON off)."""

import pytest
import torch

import sobre
from sobre import plan
from sobre.engine import Engine
from sobre.int8 import quantize_int8
from sobre.linear import Linear
from sobre.moe import MoE

from conftest import random_model, run_requests

CASES = {  # debug-preset overrides
    "moe": {},  # q_lora, a shared expert, grouped sigmoid routing with its bias, a dense first layer, interleaved rope
    "v2_router": dict(q_lora_rank=0, score_func="softmax", topk_method="greedy", n_expert_groups=1,
                      n_limited_groups=1, n_shared_experts=0, rope_interleave=False, n_activated_experts=3),
    "yarn": dict(rope_type="yarn", rope_factor=4.0, original_seq_len=128, mscale_all_dim=1.0, norm_topk_prob=False,
                 route_scale=2.5, topk_method="group_limited_greedy", score_func="softmax"),
    "dense": dict(n_routed_experts=0),
}
PROMPTS = [[5, 9, 17, 3, 44, 2, 8, 100, 31], [7, 1, 300, 12]]


def decode(eng, prompts, on: bool, monkeypatch, n: int = 24, **kw):
    """The requests one at a time (every decode step of one sequence) with the plan on or off: the steps the
    plan took, and each request's tokens and logprobs (the top 3 as well). BLOCKS: the last planned sequence's."""
    calls = []
    call = plan.DecodePlan.batch

    def spy(self, seqs, tokens):
        BLOCKS[:] = seqs[0].blocks
        h = call(self, seqs, tokens)
        calls.append(h is not None)
        return h
    monkeypatch.setattr(plan, "ON", on)
    monkeypatch.setattr(plan.DecodePlan, "batch", spy)
    out = [run_requests(eng, [p], max_new_tokens=n, logprobs=3, **kw)[0] for p in prompts]
    return sum(calls), [(s.out, s.logprobs) for s in out]


BLOCKS = []


def assert_close(got, want, atol=1e-4):
    for (toks, lps), (toks2, lps2) in zip(got, want):
        assert toks == toks2
        for (lp, top), (lp2, top2) in zip(lps, lps2):
            assert lp == pytest.approx(lp2, abs=atol)
            assert top.keys() == top2.keys() and all(top[k] == pytest.approx(top2[k], abs=atol) for k in top)


@pytest.mark.parametrize("case", CASES)
def test_plan_equals_the_module_path(case, monkeypatch):
    """Greedy tokens equal, logprobs within fp32 rounding of the module path's, every decode step planned; with the
    pool's blocks handed out in descending order (a sequence's rows not in a run: gathered by block) as well."""
    model = random_model(sobre.preset("debug", **CASES[case]))
    assert plan.unsupported(model) is None
    want = decode(Engine(model, max_batch=2, cache_tokens=512), PROMPTS, False, monkeypatch)
    assert want[0] == 0
    eng = Engine(model, max_batch=2, cache_tokens=512)
    planned, got = decode(eng, PROMPTS, True, monkeypatch)
    assert planned == 2 * 23  # every step after each prompt's first token
    assert_close(got, want[1])
    eng = Engine(model, max_batch=2, cache_tokens=512)
    eng.pool.free.reverse()  # blocks 1, 2, ... popped last: each sequence's blocks descend
    planned, got = decode(eng, [list(range(2, 150))], True, monkeypatch, n=40)  # 188 tokens: 3 blocks
    assert planned == 39 and len(BLOCKS) == 3 and BLOCKS[0] > BLOCKS[1] > BLOCKS[2]
    assert_close(got, decode(Engine(model, max_batch=2, cache_tokens=512), [list(range(2, 150))], False,
                             monkeypatch, n=40)[1])
    if case == "moe":  # a MoE layer's last routing is the planned token's (RoutedLoad.last_load)
        moe = next(m for m in model.modules() if isinstance(m, MoE))
        assert moe.last_load.sum() == model.config.n_activated_experts


@pytest.mark.parametrize("case", ["moe", "v2_router"])
def test_a_few_sequences_step_together_as_the_module_path(case, monkeypatch):
    """Up to MAX_SEQS (here 4) sequences of different lengths decode together through the plan (each row its own
    position's rotation, its own keys; the MoE's rows routed together), finishing at different steps (the batch
    shrinks), one of them with its blocks descending (gathered): tokens and logprobs those of the module path; a
    batch of MAX_SEQS + 1 runs on the modules."""
    model = random_model(sobre.preset("debug", **CASES[case]))
    prompts = [[5, 9, 17, 3, 44, 2, 8, 100, 31], [7, 1, 300, 12], list(range(2, 140)), [11]]
    news = [20, 9, 30, 14]
    sizes, batch = [], plan.DecodePlan.batch

    def spy(self, seqs, tokens):
        h = batch(self, seqs, tokens)
        sizes.append(len(seqs) if h is not None else -len(seqs))
        return h

    def run(on: bool, prompts, news):
        monkeypatch.setattr(plan, "ON", on)
        eng = Engine(model, max_batch=8, cache_tokens=1024)
        eng.pool.free.reverse()  # blocks handed out descending: the long prompt's rows are not in a run
        rids = [eng.add_request(p, max_new_tokens=n, logprobs=3) for p, n in zip(prompts, news)]
        done = {}
        while eng.has_work():
            eng.step()
            done.update(eng.collect())
        return [(done[r].out, done[r].logprobs) for r in rids]

    monkeypatch.setattr(plan.DecodePlan, "batch", spy)
    monkeypatch.setattr(plan, "MAX_SEQS", 4)
    want = run(False, prompts, news)
    assert sizes == []
    assert_close(run(True, prompts, news), want)
    assert sorted(set(sizes)) == [1, 2, 3, 4]  # 4 together, then fewer as they finish
    sizes.clear()
    five = prompts + [[3, 3, 3]]
    assert_close(run(True, five, news + [12]), run(False, five, news + [12]))
    # five at once: on the modules (min(news) - 1 decode steps), then four or fewer through the plan
    assert max(sizes) == 4 and min(sizes) > 0 and len(sizes) == max(news) - min(news)


def test_plan_follows_the_model_and_stands_down(monkeypatch):
    """A weight changed in place or into new memory, a module replaced, and a module registered where none was
    make the plan prepare again (equal to the module path after each change); int8 layers (not plain) make it
    stand down: the module path runs. bf16, dense (GQA), sparse-attention and V4 models get no plan."""
    model = random_model()
    eng = Engine(model, max_batch=2)
    attn = model.layers[1].attn
    n, made = decode(eng, PROMPTS[:1], True, monkeypatch)
    first = eng.plan.made[2]
    with torch.no_grad():
        def replace_wo():  # a new module of the same kind, other weights
            wo = Linear(attn.wo.in_features, attn.wo.out_features, bias=False)
            wo.weight.copy_(attn.wo.weight * 0.7)
            attn.wo = wo

        shared = model.layers[2].ffn.shared.w2.weight
        changes = [lambda: attn.wq_b.weight.mul_(1.5),  # in place: the version counter moves
                   lambda: setattr(shared, "data", shared.data * 0.5),  # a new tensor
                   lambda: model.layers[0].attn_norm.weight.add_(0.3), replace_wo]
        for change in changes:
            change()
            n, got = decode(eng, PROMPTS[:1], True, monkeypatch)
            assert n == 23 and eng.plan.made[2] is not first  # prepared again
            first = eng.plan.made[2]
            assert_close(got, decode(Engine(model, max_batch=2), PROMPTS[:1], False, monkeypatch)[1])
            assert got != made
            made = got
        attn.wo.register_module("extra", torch.nn.Identity())  # an entry in a dict that held none
        n, got = decode(eng, PROMPTS[:1], True, monkeypatch)
        assert n == 23 and eng.plan.made[2] is not first and got == made
    quantize_int8(model)
    n, got = decode(eng, PROMPTS[:1], True, monkeypatch)
    assert n == 0 and eng.plan.made[2] is None  # stood down: every step on the module path
    assert got == decode(Engine(model, max_batch=2), PROMPTS[:1], False, monkeypatch)[1]
    assert "fp32" in plan.unsupported(random_model().to(torch.bfloat16))
    assert Engine(random_model().to(torch.bfloat16)).plan is None
    for cfg in (dict(arch="qwen2", n_kv_heads=2, q_lora_rank=0, kv_lora_rank=0), dict(attn_type="dsa", index_topk=8),
                dict(attn_type="nsa", n_kv_heads=2, nsa_block=8, nsa_stride=4, nsa_select=16, nsa_top_n=3,
                     nsa_window=16)):
        assert plan.unsupported(random_model(sobre.preset("debug", **cfg))) is not None
    assert Engine(random_model(), compile=True).plan is None  # the compiled step runs B=1 itself


def checked_verify(model, seen):
    """DecodePlan.verify with each sequence's hiddens [T, D] checked against a full forward over its tokens so far
    and the verified ones; seen(seqs, tokens) at each call."""
    verify = plan.DecodePlan.verify

    def check(self, seqs, tokens):
        lengths = [s.length for s in seqs]
        seen(seqs, tokens)
        out = verify(self, seqs, tokens)
        assert out.shape[:2] == (len(seqs), len(tokens[0]))
        for s, L, row, h in zip(seqs, lengths, tokens, out):
            seq = torch.tensor([(s.prompt + s.out)[:L] + row])
            torch.testing.assert_close(h, model.hidden(seq)[0, L:], atol=1e-4, rtol=0)
        return out
    return check


SPEC = {"moe": dict(n_mtp_layers=2), "three_mtp_layers": dict(n_mtp_layers=3),
        "v2_router": dict(CASES["v2_router"], n_mtp_layers=2), "dense": dict(n_routed_experts=0, n_mtp_layers=1)}


@pytest.mark.parametrize("case", SPEC)
def test_speculative_steps_equal_the_module_path(case, monkeypatch):
    """A lone sequence's speculative steps through the plan: each verify (1 + drafts tokens, causal among them)
    equal to a full forward's rows, each MTP layer's rows (its catch-up over the rows accepted since it last ran,
    the last layer's FFN on its last row alone) equal to the training-time MTP layers over the whole sequence with
    the drafts appended; tokens equal plain greedy's, logprobs and draft counts the module path's. A vocabulary of 8:
    drafts are often right. Prompts: one whose catch-up exceeds MAX_TOKENS (the module path, then the plan, on one
    cache) and whose first verify straddles two blocks handed out in descending order (rows written by slot)."""
    model = random_model(sobre.preset("debug", vocab_size=8, **SPEC[case]), std=0.3)
    D, drafted, sizes = model.config.n_mtp_layers, {}, {"verify": [], "mtp": []}
    mtp = plan.DecodePlan.mtp

    def check_mtp(self, s, k, h, tokens, last=False):
        out = mtp(self, s, k, h, tokens, last)
        sizes["mtp"].append(len(tokens) if out is not None else 0)
        if out is not None:
            assert out.shape[0] == (1 if last else len(tokens)) and last == (k + 1 == D)
            drafted[s.rid] = [] if k == 0 else drafted[s.rid] + [tokens[-1]]  # d_1 .. d_k
            seq = torch.tensor([s.prompt + s.out + drafted[s.rid]])
            ref = model.mtp_hiddens(model.hidden(seq), seq)[k][0]  # [len - k - 1, D]
            end = len(s.prompt) + len(s.out) - 1  # the pending token's position: rows end just before it
            torch.testing.assert_close(out, ref[end - out.shape[0]:end], atol=1e-4, rtol=0)
        return out

    monkeypatch.setattr(plan.DecodePlan, "mtp", check_mtp)
    monkeypatch.setattr(plan.DecodePlan, "verify", checked_verify(model, lambda seqs, tokens: sizes["verify"].append(
        len(tokens[0]))))
    prompts = [[1, 2, 3, 4, 5, 6, 7, 0, 1], [3], [(i * 5) % 8 for i in range(62)]]

    def run(on: bool):
        monkeypatch.setattr(plan, "ON", on)
        eng = Engine(model, max_batch=2, cache_tokens=512, speculative=True, min_acceptance=0)
        eng.pool.free.reverse()  # blocks 1, 2, ... popped last: each sequence's blocks descend
        with torch.no_grad():
            out = [run_requests(eng, [p], max_new_tokens=30, logprobs=2)[0] for p in prompts]
        return [(s.out, s.logprobs) for s in out], eng.spec_stats

    want, stats = run(False)
    assert sizes == {"verify": [], "mtp": []}
    got, spec_stats = run(True)
    assert_close(got, want)
    assert [toks for toks, _ in got] == Engine(model).generate(prompts, max_new_tokens=30)
    assert spec_stats == stats and 0 < stats["accepted"] < stats["drafted"]
    assert sizes["verify"] == [D + 1] * stats["verified"]  # every verify planned
    assert len(sizes["mtp"]) == D * stats["verified"] and sizes["mtp"].count(0) == D  # the long prompt's catch-up
    assert max(sizes["mtp"]) > 1  # accepted drafts caught up on


@pytest.mark.parametrize("case", ["moe", "three_mtp_layers"])
def test_a_few_sequences_verify_together_as_the_module_path(case, monkeypatch):
    """Several sequences speculating in one step: their verify runs through the plan (each sequence's 1 + drafts
    rows against its own keys, a rotation per row), equal to full forwards row by row, while their MTP drafts go
    through the modules; ragged prompts finishing at different steps (then a lone sequence's planned drafts):
    tokens equal plain greedy's, logprobs and draft counts the module path's."""
    model = random_model(sobre.preset("debug", vocab_size=8, **SPEC[case]), std=0.3)
    together = []
    monkeypatch.setattr(plan.DecodePlan, "verify", checked_verify(model, lambda seqs, _: together.append(len(seqs))))
    prompts, new = [[1, 2, 3, 4, 5, 6, 7, 0, 1], [3], [5, 5, 2, 7]], [30, 12, 21]

    def run(on: bool):
        monkeypatch.setattr(plan, "ON", on)
        eng = Engine(model, max_batch=3, speculative=True, min_acceptance=0)
        rids = [eng.add_request(p, max_new_tokens=n, logprobs=2) for p, n in zip(prompts, new)]
        done = {}
        with torch.no_grad():
            while eng.has_work():
                eng.step()
                done.update(eng.collect())
        return [(done[r].out, done[r].logprobs) for r in rids], eng.spec_stats

    want, stats = run(False)
    assert not together
    got, spec_stats = run(True)
    assert_close(got, want)
    assert [toks for toks, _ in got] == [Engine(model).generate([p], max_new_tokens=n)[0]
                                         for p, n in zip(prompts, new)]
    assert spec_stats == stats and 0 < stats["accepted"] < stats["drafted"]
    assert max(together) == 3 and min(together) == 1  # three together, then fewer as they finish


def test_an_mtp_layer_that_is_not_plain_runs_on_the_modules(monkeypatch):
    """An MTP layer with a stand-in module (here a Linear subclass as its eh_proj) drafts through the modules while
    the other MTP layer and the verify stay planned; the output is still plain greedy's."""
    model = random_model(sobre.preset("debug", n_mtp_layers=2, vocab_size=8), std=0.3)

    class Other(Linear):
        pass

    eh = model.mtp[1].eh_proj
    model.mtp[1].eh_proj = Other(eh.in_features, eh.out_features, bias=False)
    model.mtp[1].eh_proj.weight = eh.weight
    assert plan.unsupported_mtp(model.mtp[1]) and plan.unsupported_mtp(model.mtp[0]) is None
    planned, mtp = [], plan.DecodePlan.mtp

    def spy(self, s, k, h, tokens, last=False):
        out = mtp(self, s, k, h, tokens, last)
        planned.append((k, out is not None))
        return out

    monkeypatch.setattr(plan.DecodePlan, "mtp", spy)
    prompts = [[1, 2, 3, 4, 5], [6]]
    want = Engine(model).generate(prompts, max_new_tokens=20)
    assert [Engine(model, speculative=True).generate([p], max_new_tokens=20)[0] for p in prompts] == want
    assert {k for k, ok in planned if ok} == {0} and (1, False) in planned
