"""torch.compile options (--compile): compiled forwards equal the eager ones."""

import torch
from torch._dynamo.utils import counters

from sobre.engine import Engine
from sobre.sft import sft_loss
from sobre.train import compile_blocks

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


def test_compiled_engine_decodes_like_eager():
    """Engine(compile=True): ragged batched greedy decode equals the eager engine's, sequences finishing apart."""
    model = random_model()
    prompts = [[5, 9, 17, 3, 44, 2, 8], [7, 1], [100, 3, 3, 90, 12, 6, 6, 1, 0, 77, 31], [64]]
    want = Engine(model).generate(prompts, max_new_tokens=10)
    eng = Engine(model, compile=True)
    counters.clear()
    eng.warm_up()  # (what `sobre serve --compile` does before it listens)
    assert counters["stats"]["unique_graphs"] >= 1 and eng.prefix_stats == {"hit": 0, "miss": 0}
    assert eng.generate(prompts, max_new_tokens=10) == want
    assert eng.generate(prompts[1:2], max_new_tokens=5) == [want[1][:5]]
