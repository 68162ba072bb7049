"""Sparse attention: NSA and DSA fast paths equal their dense references (forward and gradients), stay causal,
decode token by token like one prefill (model cache and batched engine), and DSA's indexer learns from its KL.
(V3.2 = DSA logit parity with transformers lives in test_parity.py.)"""

import json

import pytest
import torch

import sobre
from sobre import Engine
from sobre.config import preset
from sobre.model import MLA, Cache, Transformer, init_weights
from sobre.sparse import Compressor, dsa_attention, dsa_reference, nsa_attention, nsa_reference
from sobre.train import TrainArgs, pretrain, set_dsa_warmup

from conftest import SPARSE_MODELS

SMALL_NSA = dict(block=8, stride=4, select=16)


def nsa_inputs(S, T, Hq, Hkv, D=16, Dv=8, block=8, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).requires_grad_()

    q, k, v = rnd(2, T, Hq, D), rnd(2, S, Hkv, D), rnd(2, S, Hkv, Dv)
    gates = torch.rand(2, T, Hq, 3, generator=g).requires_grad_()
    def compressor(d):  # scaled as init_weights does, so compressed keys stay the size of keys
        return Compressor(rnd(block, d, scale=0.3), rnd(block * d, d, scale=d**-0.5),
                          rnd(d, d, scale=d**-0.5))

    cmp_k, cmp_v = compressor(D), compressor(Dv)
    return q, k, v, gates, cmp_k, cmp_v


def assert_close_with_grads(f_ref, f_fast, args, rtol=1e-5):
    ref, fast = f_ref(*args), f_fast(*args)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    leaves += [t for a in args if isinstance(a, tuple) for t in a if t.requires_grad]
    g_ref = torch.autograd.grad(ref.square().sum(), leaves)
    g_fast = torch.autograd.grad(fast.square().sum(), leaves)
    for a, b in zip(g_fast, g_ref):
        assert (a - b).abs().max() <= rtol * b.abs().max() + 1e-6


# S, T (queries = the last T positions), Hq, Hkv, top_n, window: lengths off the block grid, a group of 1 and
# of 4, one query (the decode path), fewer tokens than one selection block
@pytest.mark.parametrize("S,T,Hq,Hkv,top_n,window", [
    (150, 150, 4, 2, 3, 20), (97, 97, 4, 1, 5, 40), (200, 37, 4, 2, 4, 33), (20, 20, 2, 2, 4, 8),
    (130, 1, 4, 2, 4, 16), (300, 300, 8, 8, 16, 64)])
def test_nsa_fast_equals_reference(S, T, Hq, Hkv, top_n, window):
    q, k, v, gates, cmp_k, cmp_v = nsa_inputs(S, T, Hq, Hkv)
    kw = dict(SMALL_NSA, top_n=top_n, window=window)
    assert_close_with_grads(lambda *a: nsa_reference(*a, **kw), lambda *a: nsa_attention(*a, **kw),
                            (q, k, v, gates, cmp_k, cmp_v))
    with torch.no_grad():  # inference: each query's blocks copied a few queries at a time into one buffer
        torch.testing.assert_close(nsa_attention(q, k, v, gates, cmp_k, cmp_v, **kw),
                                   nsa_reference(q, k, v, gates, cmp_k, cmp_v, **kw))


def test_nsa_paper_defaults():
    """l=32, d=16, l'=64, n=16, w=512 over 700 tokens, as a prefill and as 5 trailing queries."""
    for T in (700, 5):
        q, k, v, gates, cmp_k, cmp_v = nsa_inputs(700, T, 4, 1, D=32, Dv=32, block=32, seed=T)
        with torch.no_grad():
            torch.testing.assert_close(nsa_attention(q, k, v, gates, cmp_k, cmp_v),
                                       nsa_reference(q, k, v, gates, cmp_k, cmp_v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fn", [nsa_reference, nsa_attention])
def test_nsa_causal(fn):
    q, k, v, gates, cmp_k, cmp_v = nsa_inputs(120, 120, 4, 2)
    kw = dict(SMALL_NSA, top_n=3, window=24)
    with torch.no_grad():
        base = fn(q, k, v, gates, cmp_k, cmp_v, **kw)
        k2, v2, q2 = k.clone(), v.clone(), q.clone()
        for t in (k2, v2, q2):
            t[:, 70:] += 5.0
        out = fn(q2, k2, v2, gates, cmp_k, cmp_v, **kw)
    torch.testing.assert_close(out[:, :70], base[:, :70], atol=0, rtol=0)
    assert (out[:, 70:] - base[:, 70:]).abs().max() > 1e-2


def dsa_inputs(S, T, H=4, r=16, rd=8, Hi=3, Di=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, T, H, r + rd, generator=g).requires_grad_()
    kv = torch.randn(2, S, r + rd, generator=g).requires_grad_()
    return q, kv, torch.randn(2, T, Hi, Di, generator=g), torch.randn(2, S, Di, generator=g), \
        torch.randn(2, T, Hi, generator=g)


@pytest.mark.parametrize("S,T,topk", [(90, 90, 5), (90, 90, 30), (90, 90, 200), (150, 7, 40), (150, 1, 16)])
def test_dsa_fast_equals_reference(S, T, topk):
    """Including ReLU ties (exact zeros), broken the same way by both paths."""
    kw = dict(rank=16, topk=topk)
    assert_close_with_grads(lambda *a: dsa_reference(*a, **kw), lambda *a: dsa_attention(*a, chunk=32, **kw),
                            dsa_inputs(S, T))
    with torch.no_grad():  # inference: its own chunking, rows copied a few queries at a time into one buffer
        args = dsa_inputs(S, T)
        torch.testing.assert_close(dsa_attention(*args, chunk=16, **kw), dsa_reference(*args, **kw))


def test_dsa_ragged_mask():
    """An explicit [B, T, S] visibility (a ragged batch: row 1 has 20 fewer keys) is honoured by both paths."""
    q, kv, qi, ki, wi = dsa_inputs(60, 10, seed=1)
    see = torch.ones(2, 10, 60, dtype=torch.bool).tril(50)
    see[1] = torch.ones(10, 60, dtype=torch.bool).tril(30)
    kw = dict(rank=16, topk=12, see=see)
    with torch.no_grad():
        ref = dsa_reference(q, kv, qi, ki, wi, **kw)
        torch.testing.assert_close(dsa_attention(q, kv, qi, ki, wi, **kw), ref)
        alone = dsa_reference(q[1:], kv[1:, :40], qi[1:], ki[1:, :40], wi[1:], rank=16, topk=12)
    torch.testing.assert_close(ref[1:], alone)


def test_dsa_with_topk_over_length_is_dense_mla():
    """With k >= T every earlier token is selected: a V3.2 model equals the V3 model with the same weights."""
    c = preset("debug", attn_type="dsa", index_topk=64)
    dsa = init_weights(Transformer(c)).eval()
    v3 = Transformer(preset("debug")).eval()
    missing = v3.load_state_dict(dsa.state_dict(), strict=False)
    assert not missing.missing_keys and all(".indexer." in k for k in missing.unexpected_keys)
    x = torch.randint(0, c.vocab_size, (2, 50))
    with torch.no_grad():
        torch.testing.assert_close(dsa(x), v3(x), atol=1e-5, rtol=1e-5)
        c.index_topk = 8  # sparse now: the outputs must differ
        assert (dsa(x) - v3(x)).abs().max() > 1e-3


@pytest.mark.parametrize("kind", sorted(SPARSE_MODELS))
def test_decode_equals_prefill(kind):
    c = preset("debug", **SPARSE_MODELS[kind])
    model = init_weights(Transformer(c)).eval()
    x = torch.randint(0, c.vocab_size, (2, 90))
    with torch.no_grad():
        full = model(x)
        cache = Cache(128)
        steps = [model(x[:, :37], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(37, 90)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
        if kind == "dsa":  # the absorbed (gathering) path against the dense-mask reference
            c.attn_impl = "absorb"
            torch.testing.assert_close(model(x), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", sorted(SPARSE_MODELS))
def test_engine_batches_sparse_models(kind):
    """Ragged prompts through the paged engine give the greedy tokens of repeated full forwards."""
    c = preset("debug", **SPARSE_MODELS[kind])
    model = init_weights(Transformer(c), seed=1).eval()
    prompts = [torch.randint(2, c.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (30, 45, 7)]

    def greedy(p, n=20):
        x = torch.tensor([p])
        with torch.no_grad():
            for _ in range(n):
                x = torch.cat([x, model(x)[:, -1:].argmax(-1)], 1)
        return x[0, len(p):].tolist()

    out = Engine(model).generate(prompts, max_new_tokens=20, temperature=0.0)
    assert out == [greedy(p) for p in prompts]


def test_engine_keeps_nsa_compressed_blocks():
    """The engine pages NSA's compressed blocks, compressing only those a forward completes (a copied prompt's
    once, at its first decode step), and decodes from the window, chosen and compressed blocks in its pool
    (sparse.nsa_paged_decode): each token's logprobs equal those of its reference twin, which gathers every
    row's K/V and compresses every block afresh each step (a pool block the stride does not divide), for copies
    of one prompt beside others, sampled with seeds; also with the prefix cache, prompts sharing 70 tokens then
    diverging running side by side (a compressed block spanning the shared and the own tokens is kept in the
    block of its last token, so shared blocks hold only what their tokens determine)."""
    c = preset("debug", **SPARSE_MODELS["nsa"])
    model = init_weights(Transformer(c), seed=2).eval()
    prompts = [torch.randint(2, c.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (41, 41, 41, 9, 70, 10, 25)]
    prompts[1] = prompts[2] = prompts[0]
    prompts[5], prompts[6] = prompts[4] + prompts[5], prompts[4] + prompts[6]

    def run(block, prefix_cache=False):
        eng = Engine(model, block=block, prefix_cache=prefix_cache)
        assert bool(eng.pool.compressed) == (block % c.nsa_stride == 0)
        rids = [eng.add_request(p, max_new_tokens=40, temperature=1.0, seed=i, logprobs=0)
                for i, p in enumerate(prompts)]
        while eng.has_work():
            eng.step()
        done = eng.collect()
        assert eng.prefix_stats["hit"] == 128 * prefix_cache  # the two longer prompts reuse 64 tokens each
        return [done[r] for r in rids]

    fresh = run(30)
    for block, prefix_cache in ((64, False), (8, False), (64, True), (8, True)):  # 8: a selection block (16)
        for a, b in zip(run(block, prefix_cache), fresh):                       # spans two pool blocks
            assert a.out == b.out
            torch.testing.assert_close([lp for lp, _ in a.logprobs], [lp for lp, _ in b.logprobs], atol=1e-4,
                                       rtol=0)


def test_indexer_warmup_lowers_its_kl():
    """Stage 1 of DSA training: dense attention, every weight frozen but the indexer's, which learns to match
    the main attention (KL falls); the rest of the model does not move."""
    torch.manual_seed(0)
    c = preset("debug", attn_type="dsa", index_topk=16)
    model = init_weights(Transformer(c), std=0.2).train()
    set_dsa_warmup(model, True)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".indexer." not in k}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, c.vocab_size, (4, 64))
    kls = []
    for _ in range(40):
        model(x)
        kl = sum(m.indexer_loss for m in model.modules() if isinstance(m, MLA) and m.indexer_loss is not None)
        kl.backward()
        opt.step()
        opt.zero_grad()
        kls.append(kl.item())
    assert kls[-1] < 0.5 * kls[0]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items() if "gate.bias" not in k)


@pytest.mark.parametrize("attn", ["nsa", "dsa"])
def test_pretrain_with_sparse_attention(tmp_path, attn):
    """`sobre pretrain --attn nsa|dsa` trains, logs the indexer KL (DSA), exports a checkpoint sobre reloads."""
    overrides = ("nsa_block=16", "nsa_stride=8", "nsa_select=32", "nsa_window=32") if attn == "nsa" else \
        ("index_topk=24",)
    run = pretrain(TrainArgs(out=str(tmp_path / attn), steps=4, save_every=4, eval_every=4, sample_every=4,
                             data_bytes=200_000, batch_size=2, seq_len=96, attn=attn, model_overrides=overrides,
                             dsa_warmup=2 if attn == "dsa" else 0))
    recs = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert len(recs) == 4 and all(r["loss"] > 0 for r in recs)
    assert all("indexer_kl" in r for r in recs) == (attn == "dsa")
    model = sobre.load(run / "model")
    assert model.config.attn_type == attn and model.config.arch == ("deepseek_v32" if attn == "dsa" else "deepseek_v3")
    with pytest.raises(ValueError, match="dsa-warmup"):
        TrainArgs(attn="nsa", dsa_warmup=3).validate()


@pytest.mark.parametrize("kind", sorted(SPARSE_MODELS))
def test_info_counts_sparse_parameters(kind):
    from sobre.stats import model_stats
    c = preset("tiny", **SPARSE_MODELS[kind])
    model = Transformer(c)
    assert model_stats(c)["params"] == sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp"))


def test_bad_shapes_are_clear_errors():
    q, k, v, gates, cmp_k, cmp_v = nsa_inputs(40, 40, 4, 3)  # 4 query heads do not split into 3 groups
    with pytest.raises(ValueError, match="multiple of Hkv"):
        nsa_attention(q, k, v, gates, cmp_k, cmp_v, **SMALL_NSA)
    q, kv, qi, ki, wi = dsa_inputs(30, 10)
    with pytest.raises(ValueError, match="rank"):
        dsa_attention(q, kv, qi, ki, wi, rank=40)
    with pytest.raises(ValueError, match="indexer"):
        dsa_reference(q, kv, qi, ki[:, :5], wi, rank=16)
    with pytest.raises(ValueError, match="deepseek_v32"):
        preset("debug", arch="deepseek_v2", attn_type="dsa", n_expert_groups=1, n_limited_groups=1,
               topk_method="greedy", score_func="softmax")


@pytest.mark.parametrize("kind", ["nsa", "deepseek_v4"])
def test_rows_shorter_than_a_compressed_block_still_reach_the_compressors(kind):
    """A training forward over rows too short to complete a compressed block (NSA's, V4's CSA / HCA windows)
    reaches the parameters longer rows reach (the compressors': their gradients zeros): data-parallel ranks sum
    the same parameters, and FSDP's reduce-scatter, which sends the gradients a rank has, met ranks of short and
    long rows with different sizes (GRPO's update: its rows as long as their rollouts)."""
    from conftest import random_model, v4_model
    model = (v4_model() if kind == "deepseek_v4" else random_model(preset("debug", **SPARSE_MODELS["nsa"]))).train()
    reached = []
    for T in (40, 3):  # (NSA's blocks: 32 tokens; V4's windows: 4 and 8)
        model.zero_grad(set_to_none=True)
        out = model(torch.randint(3, 100, (2, T)))
        (out[0] if isinstance(out, tuple) else out).float().pow(2).mean().backward()
        reached.append({n for n, p in model.named_parameters() if p.grad is not None})
    assert reached[0] == reached[1] and any("compress" in n or "cmp_" in n for n in reached[0])
