"""torch.compile options (--compile): compiled forwards equal the eager ones."""

import pytest
import torch
from torch._dynamo.utils import counters

import sobre
from sobre.engine import Engine
from sobre.sft import sft_loss
from sobre.train import blocks, compile_blocks

from conftest import random_model


def test_compiled_blocks_train_like_eager():
    """compile_blocks (pretrain / sft / distill --compile): the same MTP training loss, balance loss and
    gradients as eager on a MoE model (dense + MoE blocks, one MTP module), the same SFT loss over packed
    documents; forwards with the engine's cache stay eager."""
    eager, compiled = random_model().train(), random_model().train()
    compile_blocks(compiled)
    counters.clear()
    x = torch.randint(0, eager.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    results = []
    for m in (eager, compiled):
        logits, mtp = m(x, mtp=True)
        balance = sum(b.ffn.balance_loss for b in m.layers if hasattr(b.ffn, "balance_loss"))
        loss = logits.logsumexp(-1).mean() + sum(t.logsumexp(-1).mean() for t in mtp) + balance
        loss.backward()
        results.append((loss.detach(), balance.detach(), {n: p.grad for n, p in m.named_parameters()
                                                         if p.grad is not None}))
    assert counters["stats"]["unique_graphs"] >= 2  # the blocks did go through dynamo
    docs = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])  # SFT's packed rows: a stateless cache, compiled too
    graphs = counters["stats"]["unique_graphs"]
    y = [sft_loss(m, x, x, docs) for m in (eager, compiled)]
    torch.testing.assert_close(y[1], y[0], rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] > graphs
    (l0, b0, g0), (l1, b1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b1, b0, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys() and any("experts" in n for n in g0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-5, msg=n)
    with torch.no_grad():  # a cached forward (sampling, GRPO rollouts) through the compiled model: eager blocks
        assert Engine(compiled).generate([[5, 9, 17]], max_new_tokens=6) == \
            Engine(eager).generate([[5, 9, 17]], max_new_tokens=6)


def test_compile_blocks_compiles_every_block_the_mtp_modules_included(monkeypatch):
    """A training forward with MTP goes through every block's compiled forward (torch.compile stood in for: it
    records the blocks it runs), the MTP module's block too (its keyword arguments passed on)."""
    ran = []
    monkeypatch.setattr(torch, "compile", lambda f: lambda *a, **kw: ran.append(f.__self__) or f(*a, **kw))
    m = random_model().train()
    compile_blocks(m)
    m(torch.randint(0, m.config.vocab_size, (2, 12)), mtp=True)
    assert len(m.mtp) and {id(b) for b in ran} == {id(b) for b in blocks(m)}


def _decode(eng, prompts, n):
    """Greedy tokens and the chosen tokens' logprobs per prompt, all prompts in one ragged batch."""
    rids = [eng.add_request(p, max_new_tokens=n, logprobs=0) for p in prompts]
    while eng.has_work():
        eng.step()
    done = eng.collect()
    return [done[r].out for r in rids], torch.tensor([lp for r in rids for lp, _ in done[r].logprobs])


def test_compiled_engine_decodes_like_eager():
    """Engine(compile=True): after warm_up, one graph for one sequence and one for several, whatever the
    context (a prompt crosses a 64-token block); decode logprobs equal the eager engine's in a ragged batch of
    sequences finishing apart; a batch above compiled_batch (8 experts top-2: 4) decodes eagerly, still equal."""
    model = random_model()
    prompts = [[5, 9, 17, 3, 44, 2, 8], [7, 1], [100, 3, 3, 90, 12, 6, 6, 1, 0, 77, 31] * 7, [64]]
    eager, eng = Engine(model), Engine(model, compile=True)
    assert eng.compiled_batch == 4
    counters.clear()
    eng.warm_up()  # (what `sobre serve --compile` does before it listens)
    assert counters["stats"]["unique_graphs"] == 2 and eng.prefix_stats == {"hit": 0, "miss": 0}
    for batch in (prompts, prompts[1:2], prompts + prompts[:2]):
        want, want_lp = _decode(eager, batch, 10)
        got, got_lp = _decode(eng, batch, 10)
        assert got == want
        torch.testing.assert_close(got_lp, want_lp, rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == 2  # no recompiles: batch sizes and contexts are dynamic


def test_compile_rejects_models_it_cannot_trace():
    with pytest.raises(ValueError, match="full-attention"):
        Engine(random_model(sobre.preset("debug", attn_type="nsa")), compile=True)
