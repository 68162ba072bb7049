"""Fast paths against their twins, and the router against a hand-worked example."""

import copy

import pytest
import torch
import torch.nn.functional as F

import sobre
from sobre import absorb, reference
from sobre.experts import Groups, grouped_ffn, looped_mm, stacked_weight
from sobre.model import Cache
from sobre.moe import Gate

from conftest import random_model


def test_naive_and_absorbed_mla_agree():
    model = random_model()
    x = torch.randint(0, 512, (3, 33))
    with torch.no_grad():
        naive = model(x)
        model.config.attn_impl = "absorb"
        absorbed = model(x)
    assert (naive - absorbed).abs().max() < 1e-4 * naive.abs().max()


@pytest.mark.parametrize("case", ["q_lora", "no_q_lora", "not_interleaved", "bf16"])
def test_folded_mla_equals_unfolded_in_decode(case):
    """The folded projections (absorb.py) against the unfolded absorbed path, over the engine's paged cache: a
    prompt of one sequence, a chunked one of another, decode steps of both, then of one alone; with and without
    q_lora, rope interleaved or not; in bf16 (folded in fp32, rounded once) about as far from the fp32 model as
    the unfolded path (routing flips under bf16 rounding move both)."""
    from sobre.paged import PagedBatch, PagedPool
    from sobre.request import Sequence
    from sobre.sampling import SamplingParams
    kw = dict(q_lora_rank=0) if case == "no_q_lora" else dict(rope_interleave=False) if case == "not_interleaved" \
        else {}
    model = random_model(sobre.preset("debug", attn_impl="absorb", **kw))
    x = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(4))

    def decode(folds):
        pool = PagedPool(model, 4)
        a, b = Sequence(0, [], SamplingParams()), Sequence(1, [], SamplingParams())

        def batch(seqs, T):
            out = PagedBatch(pool, seqs, T)
            out.folds = folds
            return out
        for s in (a, b):
            pool.reserve(s, 40)
        steps = [torch.cat([model(x[:1, :20], batch([a], 20)), torch.cat([model(x[1:, :8], batch([b], 8)),
                                                                          model(x[1:, 8:20], batch([b], 12))], 1)])]
        steps += [model(x[:, t:t + 1], batch([a, b], 1)) for t in range(20, 32)]
        alone = [model(x[:1, t:t + 1], batch([a], 1)) for t in range(32, 40)]  # one row: bf16 takes mv / F.linear
        assert all((absorb.folded(layer.attn, folds) is not None) == (folds is not None) for layer in model.layers)
        return torch.cat([torch.cat(steps, 1).flatten(0, 1), torch.cat(alone, 1)[0]]).float()  # [2 * 32 + 8, V]

    with torch.no_grad():
        ref = decode(None)
        if case == "bf16":
            model = model.bfloat16()
            errors = [(decode(folds) - ref).abs().mean() for folds in ({}, None)]
            assert errors[0] < 2 * errors[1]  # (a wrong fold: errors of the logits' own size)
        else:
            assert (decode({}) - ref).abs().max() < 1e-5 * ref.abs().max()


def test_fold_follows_the_weights_and_stays_out_of_training(monkeypatch):
    """Within an engine's folds, a changed projection (in place, a new tensor) refolds; autograd, a projection
    that is not sobre's Linear, and DeepSeek-V3's shapes (folded weights 3.4x the parameters they replace) take
    the unfolded path."""
    from sobre import plan
    from sobre.engine import Engine
    monkeypatch.setattr(plan, "ON", False)  # one sequence's steps on the module path (plan.py has its own test)
    model = random_model(sobre.preset("debug"))
    eng = Engine(model, max_batch=2)
    attn, prompt = model.layers[0].attn, [5, 9, 2, 7, 1]
    first = eng.generate([prompt], max_new_tokens=8)
    made = eng.folds[attn][2]
    assert made is not None
    with torch.no_grad():
        for change in (lambda: attn.wo.weight.mul_(2.0),  # in place: the version counter moves
                       lambda: setattr(attn.wq_a.weight, "data", attn.wq_a.weight.data * 0.5)):  # a new tensor
            change()
            out = eng.generate([prompt], max_new_tokens=8)
            assert eng.folds[attn][2] is not made  # folded again
            made = eng.folds[attn][2]
            assert out == Engine(model, max_batch=2).generate([prompt], max_new_tokens=8)  # as a new engine's
            with monkeypatch.context() as m:
                m.setattr(absorb, "FOLD_GROWTH", 0.0)  # the unfolded twin
                assert out == eng.generate([prompt], max_new_tokens=8)
    assert out != first
    assert absorb.folded(attn, {}) is None  # a gradient wanted: autograd sees the plain products
    v3 = sobre.Config.from_hf(dict(model_type="deepseek_v3", hidden_size=7168, num_attention_heads=128,
                                   q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                                   v_head_dim=128))
    assert not absorb.foldable(v3) and absorb.foldable(model.config)
    with torch.no_grad():
        attn.wo = torch.nn.Linear(attn.wo.in_features, attn.wo.out_features, bias=False)
        assert absorb.folded(attn, {}) is None


@pytest.mark.parametrize("attn_impl", ["naive", "absorb"])
@pytest.mark.parametrize("arch", ["deepseek_v3", "llama"])
def test_cached_decode_equals_full_forward(attn_impl, arch):
    cfg = sobre.preset("debug", attn_impl=attn_impl)
    if arch == "llama":
        cfg = sobre.Config(arch="llama", n_routed_experts=0, n_mtp_layers=0, n_kv_heads=2, qkv_bias=True,
                           rope_interleave=False)
    model = random_model(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        full = model(x)
        cache = Cache(32)
        steps = [model(x[:, :10], cache)] + [model(x[:, t:t + 1], cache) for t in range(10, 24)]
    assert cache.length == 24
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-4 * full.abs().max()


def test_context_overflow_is_a_clear_error():
    model = random_model()
    with pytest.raises(ValueError, match="exceeds the model's context of 512"):
        model(torch.zeros(1, 513, dtype=torch.long))


def test_grouped_moe_dispatch_equals_per_token_reference():
    model = random_model(sobre.preset("debug", n_routed_experts=16, n_activated_experts=4, n_expert_groups=4,
                                      n_limited_groups=2))
    moe = model.layers[1].ffn
    x = torch.randn(37, model.config.dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        w, idx, _ = moe.gate(x)
        fast = moe.experts(x, w, idx)
        slow = reference.moe_routed(moe.experts, x, w, idx)
    assert idx.unique().numel() > 4  # several experts really ran
    assert (fast - slow).abs().max() < 1e-5
    with torch.no_grad():  # one token: 4 of 16 experts, the CPU loop over active experts instead of _grouped_mm
        w, idx, _ = moe.gate(x[:1])
        assert (moe.experts(x[:1], w, idx) - reference.moe_routed(moe.experts, x[:1], w, idx)).abs().max() < 1e-5


def small_moe(dtype=torch.float32):
    """A debug model whose layer 1 routes to 16 small experts, top-4 (within SMALL_EXPERT_PARAMS), in dtype."""
    return random_model(sobre.preset("debug", n_routed_experts=16, n_activated_experts=4, n_expert_groups=4,
                                     n_limited_groups=2)).to(dtype)


def routed_against_sorted(model, x, n: int, calls: list, taken: int, experts=None, **tol):
    """Layer 1's routed experts (or `experts`, a copy) on x[:n] without autograd: `calls` (a path's counting
    wrapper) grew by `taken`, and the output equals the sorted dispatch's (eager_dispatch)."""
    import sobre.experts as X
    moe = model.layers[1].ffn
    experts = experts or moe.experts
    ws = moe.experts.w1, moe.experts.w2, moe.experts.w3
    w, idx, _ = moe.gate(x[:n])
    before = len(calls)
    with torch.no_grad():
        out = experts(x[:n], w, idx)
        ref = X.eager_dispatch(x[:n], w, idx, 16, lambda xs, g: experts.grouped(xs, g, *ws), ws)
    assert len(calls) - before == taken
    assert out.dtype == x.dtype and out.shape == (n, model.config.dim)
    torch.testing.assert_close(out, ref, **tol)
    assert n < 2 or idx.unique().numel() > 4  # several experts chosen, the others weighed 0


def plain_copy(experts):
    """experts with w1 / w2 / w3 stored [E, out, in] contiguous, not stacked_weight's layout: neither bags nor
    every_expert's products can read them as they are."""
    plain = copy.deepcopy(experts)
    for name in ("w1", "w2", "w3"):
        setattr(plain, name, torch.nn.Parameter(getattr(plain, name).detach().contiguous()))
    return plain


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_token_dispatch_equals_the_sorted_dispatch(dtype, monkeypatch):
    """A B=1 decode step's MoE (one token, no autograd, CPU) takes experts.one_token: its K experts' SwiGLUs
    weighed in one product, equal to eager_dispatch (sort, count, gather, index_add_); with autograd, or with
    several tokens, not."""
    import sobre.experts as X
    model = small_moe(dtype)
    x = torch.randn(3, model.config.dim, generator=torch.Generator().manual_seed(2)).to(dtype)
    calls = []
    monkeypatch.setattr(X, "one_token", lambda *a, f=X.one_token: calls.append(1) or f(*a))
    tol = {} if dtype == torch.float32 else dict(rtol=0.02, atol=0.02)
    for i in range(3):
        routed_against_sorted(model, x[i:], 1, calls, 1, **tol)
    routed_against_sorted(model, x, 3, calls, 0, **tol)
    w, idx, _ = model.layers[1].ffn.gate(x[:1])
    model.layers[1].ffn.experts(x[:1], w.detach(), idx)
    assert len(calls) == 3


@pytest.mark.parametrize("router", [
    dict(),  # V3: sigmoid, biased choice, groups by their top-2 sum
    dict(score_func="softmax", topk_method="greedy", n_expert_groups=1, n_limited_groups=1),  # V2-Lite
    dict(score_func="softmax", topk_method="group_limited_greedy", norm_topk_prob=False),  # V2: groups by their best
    dict(n_expert_groups=1, n_limited_groups=1, route_scale=1.0),
])
def test_gate_one_equals_forward(router):
    """Gate.one and Gate.rows (one token's, a few tokens' routing chosen on the host) pick forward's experts, in
    forward's order, with its weights (fp32 scores, float64 arithmetic), for every router variant; the bias shifts
    the choice only."""
    model = random_model(sobre.preset("debug", n_routed_experts=16, n_activated_experts=4,
                                      **{**dict(n_expert_groups=4, n_limited_groups=2, route_scale=2.5), **router}))
    gate = model.layers[1].ffn.gate
    g = torch.Generator().manual_seed(5)
    if gate.bias is not None:
        gate.bias.copy_(torch.randn(16, generator=g) * 0.05)
    x = torch.randn(200, model.config.dim, generator=g)
    with torch.no_grad():
        w, idx, _ = gate(x)
        rows = gate.rows(x[:7])  # several tokens at once (a speculative verify's): each row's own choice
        for i in range(len(x)):
            wi, ii = gate.one(x[i:i + 1]) if i >= 7 else rows[i]
            assert ii == idx[i].tolist()
            torch.testing.assert_close(torch.tensor(wi, dtype=torch.float32), w[i], rtol=1e-6, atol=0)
    assert len(set(map(tuple, idx.tolist()))) > 50  # many distinct choices reached


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shared", [1, 0])
def test_moe_of_one_token_routed_on_the_host(dtype, shared, monkeypatch):
    """A B=1 decode step's MoE layer (one token, eval, no autograd, CPU) routes on the host (Gate.one) and runs
    experts.one_token on the experts' per-expert views with the shared expert in its sum: equal to forward's
    routing, the sorted dispatch and the shared expert added; its last_load counts the token's experts. Not taken
    with several tokens, with autograd, in training mode, or with experts.ONE_TOKEN off; the views follow a weight
    replaced."""
    import sobre.experts as X
    model = random_model(sobre.preset("debug", n_routed_experts=16, n_activated_experts=4, n_expert_groups=4,
                                      n_limited_groups=2, n_shared_experts=shared)).to(dtype).eval()
    moe = model.layers[1].ffn
    moe.gate.bias.copy_(torch.randn(16, generator=torch.Generator().manual_seed(6)) * 0.05)
    calls = []
    one = type(moe.gate).one
    monkeypatch.setattr(type(moe.gate), "one", lambda *a: calls.append(1) or one(*a))
    x = torch.randn(12, 1, model.config.dim, generator=torch.Generator().manual_seed(7)).to(dtype)
    ws = moe.experts.w1, moe.experts.w2, moe.experts.w3
    tol = {} if dtype == torch.float32 else dict(rtol=0.02, atol=0.02)

    def reference(x):  # [N, D]: forward's routing, the sorted dispatch, the shared expert added
        w, idx, _ = moe.gate(x)
        y = X.eager_dispatch(x, w, idx, 16, lambda xs, g: moe.experts.grouped(xs, g, *ws), ws)
        return (y if moe.shared is None else y + moe.shared(x)), idx

    with torch.no_grad():
        for i in range(len(x)):
            out = moe(x[i:i + 1])
            ref, idx = reference(x[i])
            assert out.shape == x[i:i + 1].shape and out.dtype == dtype
            torch.testing.assert_close(out[0], ref, **tol)
            assert moe.last_load.tolist() == X.expert_load(idx, 16).tolist()
        assert len(calls) == len(x)
        moe(x[:3].transpose(0, 1))  # three tokens
        monkeypatch.setattr(X, "ONE_TOKEN", False)
        moe(x[0:1])
        monkeypatch.setattr(X, "ONE_TOKEN", True)
        moe.train()
        moe(x[0:1])
        moe.eval()
    moe(x[0:1])  # autograd
    assert len(calls) == len(x)
    with torch.no_grad():
        moe.experts.w2.data = moe.experts.w2.data * 2  # a new storage: the views are made again
        torch.testing.assert_close(moe(x[0:1])[0], reference(x[0])[0], **tol)


def test_every_expert_dispatch_equals_the_sorted_dispatch(monkeypatch):
    """Several tokens' MoE on small experts (CPU, fp32, no autograd), past the pairs bagged takes, takes
    experts.every_expert: every expert's SwiGLU on every token, weighed by the routing weights (0 where not
    chosen), projected back and summed over the experts, equal to eager_dispatch; not with autograd, in bf16, for
    one token or pairs at most the experts, past its parameter or multiply-add bounds, or with weights not in
    stacked_weight's layout."""
    import sobre.experts as X
    model = small_moe()
    experts = model.layers[1].ffn.experts
    params = sum(t.numel() for t in (experts.w1, experts.w2, experts.w3))
    calls = []
    monkeypatch.setattr(X, "every_expert", lambda *a, f=X.every_expert: calls.append(1) or f(*a))
    x = torch.randn(12, model.config.dim, generator=torch.Generator().manual_seed(3))

    def check(n, taken, experts=None):
        routed_against_sorted(model, x, n, calls, taken, experts)

    for n in (5, 7, 12):
        check(n, 1)
    check(1, 0)  # one_token
    check(4, 0)  # 16 pairs: bagged
    monkeypatch.setattr(X, "BAG_PAIRS", 0.0)
    check(2, 1)
    monkeypatch.setattr(X, "EVERY_EXPERT_MACS", 7 * params)
    check(7, 1)
    check(8, 0)  # past the multiply-add bound: the sorted dispatch
    monkeypatch.setattr(X, "SMALL_EXPERT_PARAMS", params - 1)
    check(5, 0)  # experts too large to read whole every step
    monkeypatch.undo()
    monkeypatch.setattr(X, "every_expert", lambda *a, f=X.every_expert: calls.append(1) or f(*a))
    check(5, 0, plain_copy(experts))
    w, idx, _ = model.layers[1].ffn.gate(x[:5])
    experts(x[:5], w, idx).sum().backward()  # autograd: the sorted dispatch
    with torch.no_grad():
        experts.to(torch.bfloat16)(x[:5].bfloat16(), w, idx)
    assert len(calls) == 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bagged_dispatch_equals_the_sorted_dispatch(dtype, monkeypatch):
    """2 to 4 tokens' MoE on small experts (their pairs at most the 16 experts; CPU, no autograd) takes
    experts.bagged: every pair's gate and up products as embedding bags over the stacked experts' rows, each
    token's down products weighed and summed in one bag, equal to eager_dispatch; not for one token, past the
    pairs, with autograd, past SMALL_EXPERT_PARAMS, or with weights not in stacked_weight's layout (a bag would
    read the wrong rows)."""
    import sobre.experts as X
    model = small_moe(dtype)
    experts = model.layers[1].ffn.experts
    calls = []
    monkeypatch.setattr(X, "bagged", lambda *a, f=X.bagged: calls.append(1) or f(*a))
    x = torch.randn(6, model.config.dim, generator=torch.Generator().manual_seed(4)).to(dtype)
    tol = {} if dtype == torch.float32 else dict(rtol=0.02, atol=0.02)

    for n in (2, 3, 4):
        routed_against_sorted(model, x, n, calls, 1, **tol)
    routed_against_sorted(model, x, 1, calls, 0, **tol)  # one_token
    routed_against_sorted(model, x, 5, calls, 0, **tol)  # 20 pairs: every_expert (fp32) or the sorted dispatch
    routed_against_sorted(model, x, 3, calls, 0, plain_copy(experts), **tol)
    monkeypatch.setattr(X, "SMALL_EXPERT_PARAMS", sum(t.numel() for t in (experts.w1, experts.w2, experts.w3)) - 1)
    routed_against_sorted(model, x, 3, calls, 0, **tol)
    monkeypatch.undo()
    monkeypatch.setattr(X, "bagged", lambda *a, f=X.bagged: calls.append(1) or f(*a))
    w, idx, _ = model.layers[1].ffn.gate(x[:3])
    experts(x[:3], w.detach(), idx).float().sum().backward()  # autograd: the sorted dispatch
    assert len(calls) == 3


@pytest.mark.parametrize("stored", ["contiguous", "stacked"])
@pytest.mark.parametrize("counts, mode", [([0, 1, 0, 0, 0, 0, 0, 2], "loop"), ([3, 0, 5, 1, 1, 2, 0, 4], "padded"),
                                          ([3, 0, 30, 1, 1, 2, 0, 4], "padded 4"),
                                          ([40, 0, 7, 170, 1, 0, 9, 50], "padded 9"),
                                          ([40, 60, 7, 170, 1, 45, 9, 50], "grouped")])
def test_expert_groups_equal_looped(counts, mode, stored):
    """CPU inference loops over few active experts, pads rows into one bmm while padding adds few rows (each
    expert's rows up to C there, "padded C": the few with more take the rest in matmuls of their own), else runs
    _grouped_mm: each matmul and a whole SwiGLU through the layout equal the per-expert loop; so does the
    SwiGLU with every row's expert weights gathered (Groups.gathered). Either storage of the weights: plain
    contiguous [E, out, in], or transposed in memory as the model's (stacked_weight)."""
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(sum(counts), 24, generator=g)
    w1, w2, w3 = (torch.randn(8, *shape, generator=g) * 0.2 for shape in ((40, 24), (24, 40), (40, 24)))
    if stored == "stacked":
        w1, w2, w3 = (stacked_weight(w).detach() for w in (w1, w2, w3))
        assert w1.stride() == (40 * 24, 1, 40)
    with torch.no_grad():
        g = Groups(counts, xs, w1)
        assert g.mode == mode.split()[0] and (mode == "padded") == (g.mode == "padded" and g.C == max(counts))
        if mode.startswith("padded "):
            assert g.C == int(mode.split()[1]) and g.overflow
        assert (g.unpack(g.mm(g.pack(xs), w1)) - looped_mm(xs, w1, counts)).abs().max() < 1e-5
        ref = looped_mm(F.silu(looped_mm(xs, w1, counts)) * looped_mm(xs, w3, counts), w2, counts)
        torch.testing.assert_close(grouped_ffn(xs, counts, w1, w2, w3), ref, rtol=1e-5, atol=1e-4)
        experts = torch.arange(len(counts)).repeat_interleave(torch.tensor(counts))  # (compiled decode's layout)
        torch.testing.assert_close(grouped_ffn(xs, Groups.gathered(experts), w1, w2, w3), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("overflow_rows", [0, 32])
def test_padded_layout_with_overflow_equals_looped(overflow_rows, monkeypatch):
    """Random expert counts (zeros, one expert, skewed): whatever C padded_rows picks (0 included: every row an
    overflow, where an overflowing expert costs nothing extra), the SwiGLU through the layout equals the loop."""
    import sobre.experts
    monkeypatch.setattr(sobre.experts, "OVERFLOW_ROWS", overflow_rows)
    g = torch.Generator().manual_seed(overflow_rows)
    caps = set()
    for _ in range(40):
        E = [1, 3, 8, 16][int(torch.randint(4, (), generator=g))]
        counts = torch.tensor([0, 0, 1, 2, 5, 9, 30, 70])[torch.randint(8, (E,), generator=g)].tolist()
        xs = torch.randn(sum(counts), 24, generator=g)
        w1, w2, w3 = (stacked_weight(torch.randn(E, *shape, generator=g) * 0.2).detach()
                      for shape in ((40, 24), (24, 40), (40, 24)))
        with torch.no_grad():
            layout = Groups(counts, xs, w1)
            if layout.mode == "padded":
                caps.add("zero" if layout.C == 0 else "overflow" if layout.overflow else "largest")
            ref = looped_mm(F.silu(looped_mm(xs, w1, counts)) * looped_mm(xs, w3, counts), w2, counts)
            torch.testing.assert_close(grouped_ffn(xs, counts, w1, w2, w3), ref, rtol=1e-5, atol=1e-4)
    assert caps == ({"zero", "overflow", "largest"} if overflow_rows == 0 else {"overflow", "largest"})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("overflow_rows", [0, 32])
def test_placed_padded_dispatch_equals_the_sorted_dispatch(overflow_rows, dtype, monkeypatch):
    """CPU inference whose counts take the padded layout places the pairs there in token order (experts.padded:
    no sort), equal to the sorted dispatch through the same layout (eager_dispatch), whatever C padded_rows picks
    (0 included: every pair an overflow) and routing of any skew; past C each expert's overflow rows."""
    import sobre.experts as X
    monkeypatch.setattr(X, "OVERFLOW_ROWS", overflow_rows)
    calls = []
    monkeypatch.setattr(X, "padded", lambda *a, f=X.padded: calls.append(a[3]) or f(*a))
    g = torch.Generator().manual_seed(overflow_rows)
    for _ in range(30):
        E, K, N = [(4, 2, 9), (8, 2, 40), (16, 4, 64)][int(torch.randint(3, (), generator=g))]
        skew = torch.rand(E, generator=g) ** 4 + 1e-3  # some experts far more chosen than others
        idx = torch.stack([torch.multinomial(skew, K, generator=g) for _ in range(N)])  # [N, K], distinct per token
        x = torch.randn(N, 24, generator=g).to(dtype)
        w = torch.rand(N, K, generator=g)
        ws = [stacked_weight(torch.randn(E, *shape, generator=g) * 0.2).detach().to(dtype)
              for shape in ((40, 24), (24, 40), (40, 24))]

        def ffn(xs, groups, ws=ws):
            return grouped_ffn(xs, groups, *ws)

        with torch.no_grad():
            before = len(calls)
            got = X.eager_dispatch(x, w, idx, E, ffn, ws, place=True)
            ref = X.eager_dispatch(x, w, idx, E, ffn, ws)
        assert got.dtype == dtype and len(calls) - before == (X.Groups(idx.flatten().bincount(minlength=E).tolist(), x,
                                                                        ws[0]).mode == "padded")
        tol = {} if dtype == torch.float32 else dict(rtol=0.02, atol=0.02 * ref.float().abs().max().item())
        torch.testing.assert_close(got, ref, **tol)
    caps = {"zero" if c.C == 0 else "overflow" if c.overflow else "largest" for c in calls}
    assert caps >= ({"largest"} if dtype == torch.bfloat16 else {"overflow", "zero"} if overflow_rows == 0
                    else {"overflow", "largest"})


def test_padded_overflow_only_below_onednn_rows(monkeypatch):
    """The padded layout's overflow is for decode batches: where the rows an expert reach oneDNN's (a prefill),
    C stays the largest count, so a skewed batch takes oneDNN's layout (0.8x the padded time at 512 tokens)."""
    import sobre.linear
    counts = [3, 0, 30, 1, 1, 2, 0, 4]
    xs, w1 = torch.randn(sum(counts), 24), stacked_weight(torch.randn(8, 40, 24)).detach()
    with torch.no_grad():
        assert (Groups(counts, xs, w1).mode, Groups(counts, xs, w1).C) == ("padded", 4)
        monkeypatch.setattr(sobre.linear, "ONEDNN_MACS", 1)
        monkeypatch.setattr(sobre.linear, "ONEDNN", True)  # (AMD CPUs' path: linear.ONEDNN)
        assert Groups(counts, xs, w1).mode == "onednn"


def test_experts_stored_transposed(tmp_path):
    """Stacked expert weights keep their transposed storage (each expert's [in, out] contiguous, for the padded
    layout's bmm) through init, randomizing, save + load and a dtype change; the loaded values are the saved."""
    model = random_model()
    sobre.save(model, tmp_path)
    loaded = sobre.load(tmp_path)
    for m in (model, loaded):
        for moe in (b.ffn for b in m.layers if hasattr(b.ffn, "experts")):
            for w in moe.experts.parameters():
                assert w.transpose(1, 2).is_contiguous()
                assert w.to(torch.bfloat16).transpose(1, 2).is_contiguous()
    state = loaded.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_aligned_bf16_groups_equal_looped(monkeypatch):
    """CPU _grouped_mm in bf16 (autocast, which leaves _grouped_mm in fp32, or bf16 weights) pads each expert's
    rows to a multiple of ALIGN_ROWS: the SwiGLU and its gradients equal the per-expert loop in bf16."""
    import sobre.experts
    monkeypatch.setattr(sobre.experts, "ALIGN_ROWS", 16)
    counts = [40, 0, 7, 33, 1, 0, 9, 50]
    g = torch.Generator().manual_seed(3)
    xs0 = torch.randn(sum(counts), 24, generator=g)
    ws0 = [torch.randn(8, *shape, generator=g) * 0.3 for shape in ((40, 24), (24, 40), (40, 24))]
    runs = []
    for fn in (grouped_ffn, lambda xs, c, w1, w2, w3: looped_mm(F.silu(looped_mm(xs, w1, c)) * looped_mm(xs, w3, c),
                                                                 w2, c, unbind=True)):
        xs, *ws = (t.clone().requires_grad_() for t in (xs0, *ws0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layout = Groups(counts, xs, ws[0])
            out = fn(xs, counts, *ws)
        assert out.dtype == torch.bfloat16  # matmuls in bf16, as autocast's F.linear
        out.float().pow(2).sum().backward()
        runs.append([out.float()] + [t.grad for t in (xs, *ws)])
    assert layout.mode == "grouped" and layout.aligned and int(layout.offs[-1]) == 48 + 16 + 48 + 16 + 16 + 64
    for fast, slow in zip(*runs):
        torch.testing.assert_close(fast, slow, rtol=2e-2, atol=2e-2 * slow.abs().max().item())


def test_bf16_inference_pads_where_grouped_would_align():
    """CPU inference in bf16 takes the padded bmm wherever it multiplies no more rows than _grouped_mm's
    ALIGN_ROWS-aligned layout would (a skewed decode batch), every expert's rows padded (fp32 pads to the second
    largest count there and multiplies the largest expert's rest alone), and equals the loop."""
    counts = [3, 0, 5, 1, 1, 2, 0, 40]  # 52 rows; padded 8 x 40 = 320 > 52 + 16 x 8, < 6 x 128 aligned
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(sum(counts), 24, generator=g)
    w1, w2, w3 = (stacked_weight(torch.randn(8, *shape, generator=g) * 0.2).detach()
                  for shape in ((40, 24), (24, 40), (40, 24)))
    with torch.no_grad():
        g = Groups(counts, xs, w1)
        assert (g.mode, g.C, g.overflow) == ("padded", 5, [(7, 40, 35)])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            g = Groups(counts, xs, w1)
            assert (g.mode, g.C, g.overflow) == ("padded", 40, [])
            out = grouped_ffn(xs, counts, w1, w2, w3)
        xb, (b1, b2, b3) = xs.bfloat16(), (w.bfloat16() for w in (w1, w2, w3))
        g = Groups(counts, xb, b1)
        assert (g.mode, g.C) == ("padded", 40)
        ref = looped_mm(F.silu(looped_mm(xb, b1, counts)) * looped_mm(xb, b3, counts), b2, counts).float()
        for got in (out, grouped_ffn(xb, counts, b1, b2, b3)):
            torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_grouped_moe_gradients_equal_reference():
    model = random_model(sobre.preset("debug", n_routed_experts=16, n_activated_experts=4, n_expert_groups=4,
                                      n_limited_groups=2))
    moe = model.layers[1].ffn
    x = torch.randn(23, model.config.dim, generator=torch.Generator().manual_seed(2))
    grads = []
    for fn in (moe.experts, lambda *a: reference.moe_routed(moe.experts, *a)):
        moe.zero_grad()
        w, idx, _ = moe.gate(x)
        fn(x, w, idx).pow(2).sum().backward()
        grads.append([p.grad.clone() for p in (moe.experts.w1, moe.experts.w2, moe.experts.w3, moe.gate.weight)])
    for fast, slow in zip(*grads):
        assert (fast - slow).abs().max() < 1e-4 * slow.abs().max()


def _gate(scores, bias, **kw):
    """A V3 gate whose logits for input e_0 give exactly `scores` after the sigmoid."""
    cfg = sobre.preset("debug", n_routed_experts=8, n_expert_groups=4, n_limited_groups=2, n_activated_experts=2,
                       route_scale=2.5, **kw)
    gate = Gate(cfg)
    s = torch.tensor(scores)
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[:, 0] = torch.log(s / (1 - s))
        gate.bias.copy_(torch.tensor(bias))
    x = torch.zeros(1, cfg.dim)
    x[0, 0] = 1
    return gate(x)[:2]


def test_router_group_limited_selection_by_hand():
    scores = [0.9, 0.1, 0.5, 0.6, 0.8, 0.05, 0.3, 0.3]
    # no bias: groups (top-2 sums) = 1.0, 1.1, 0.85, 0.6 -> groups 1 and 0 -> experts 0 (0.9) and 3 (0.6)
    w, idx = _gate(scores, [0.0] * 8)
    assert sorted(idx[0].tolist()) == [0, 3]
    # bias +0.5 on expert 5 lifts group 2 to 1.35: groups 2 and 1 -> experts 4 (0.8) and 3 (0.6); expert 0,
    # the best single score, is out because its group lost. The bias picks experts, never weighs them:
    w, idx = _gate(scores, [0, 0, 0, 0, 0, 0.5, 0, 0])
    got = dict(zip(idx[0].tolist(), w[0].tolist()))
    assert sorted(got) == [3, 4]
    assert got[4] == pytest.approx(2.5 * 0.8 / 1.4, rel=1e-5)
    assert got[3] == pytest.approx(2.5 * 0.6 / 1.4, rel=1e-5)


def test_mtp_logits_shapes():
    model = random_model(sobre.preset("debug", n_mtp_layers=2))
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        outs = model.mtp_logits(model.hidden(x), x)
    assert [tuple(o.shape) for o in outs] == [(2, 15, 512), (2, 14, 512)]


def test_fp8_dequant_matches_reference():
    from sobre.fp8 import dequantize as dequant_fp8
    w = (torch.randn(300, 200) * 3).to(torch.float8_e4m3fn)  # ragged edges: 300 = 2*128 + 44, 200 = 128 + 72
    s = torch.rand(3, 2) + 0.5
    assert torch.equal(dequant_fp8(w, s, (128, 128)), reference.fp8_dequant(w, s))
    with pytest.raises(ValueError, match="scale shape"):
        dequant_fp8(w, torch.rand(2, 2), (128, 128))


def test_head_losses_past_the_exp_floor():
    """Logits spread far past loss.EXP_FLOOR (exponents below it are clamped: CPU exp is slow there), targets
    among the far-below ones included: the head's losses, log-probs, entropies and gradients still equal
    log_softmax + gather."""
    import sobre.loss
    g = torch.Generator().manual_seed(1)
    h0, w0 = torch.randn(12, 16, generator=g) * 4, torch.randn(50, 16, generator=g) * 4  # logits ~ +-300
    y = (F.linear(h0, w0).argmin(-1) + torch.arange(12) % 2 * torch.arange(12)) % 50  # half at each row's min
    assert (F.log_softmax(F.linear(h0, w0), -1).gather(1, y[:, None]) < -2 * 87).sum() >= 6

    coef = torch.linspace(-1, 1, 12)

    def run(fn):  # -> log-probs, entropies, and the gradients of sum coef_i log-prob_i
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        total, lp, ent = fn(h, w)
        total.backward()
        return lp.detach(), ent, h.grad, w.grad

    def plain(h, w):
        la = F.log_softmax(F.linear(h, w) / 0.7, -1)
        lp = la.gather(1, y[:, None])[:, 0]
        return (lp * coef).sum(), lp, -(la.exp() * la).sum(-1).detach()

    def logprobs(h, w):
        lp, ent = sobre.loss.head_logprobs(h, w, y, 0.7, entropy=True)
        return (lp * coef).sum(), lp, ent

    ref = run(plain)
    for got in (run(logprobs), run(lambda h, w: sobre.loss.head_weighted_logprobs(h, w, y, coef, 0.7, True))):
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-5)
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    sobre.loss.head_cross_entropy(h, w, y).backward()
    h1, w1 = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    ce = F.cross_entropy(F.linear(h1, w1), y)
    ce.backward()
    torch.testing.assert_close(sobre.loss.head_cross_entropy(h0, w0, y), ce.detach(), atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(h.grad, h1.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(w.grad, w1.grad, atol=1e-4, rtol=1e-5)


def test_head_losses_equal_the_plain_paths(monkeypatch):
    """loss.head_cross_entropy (row chunks, gradients made in the forward) against its twin
    F.cross_entropy(F.linear(h, w).float(), y): loss and both gradients, fp32 and under bf16 autocast, a last
    chunk shorter than the others (bf16: the weight's gradient made from several groups of kept chunks), and
    the forward alone when nothing needs a gradient; loss.head_logprobs (GRPO's log-probs, with a temperature
    and the entropies) and loss.head_weighted_logprobs (a weighted sum of them, its gradients made in the
    forward) against log_softmax + gather the same way. The models' forward with targets gives the same loss
    as their logits (MTP depths included)."""
    import sobre.loss
    monkeypatch.setattr(sobre.loss, "CHUNK_LOGITS", 7 * 50)  # chunks of 7 rows over 30: the last one of 2
    monkeypatch.setattr(sobre.loss, "MIN_ROWS", 1)
    monkeypatch.setattr(sobre.loss, "KEEP_GRADS", 14 * 50)  # bf16: grad_w from 14, 14 and 2 kept rows
    g = torch.Generator().manual_seed(0)
    h0, w0 = torch.randn(30, 16, generator=g), torch.randn(50, 16, generator=g) * 0.3
    y = torch.randint(0, 50, (30,), generator=g)

    def run(fn, bf16):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = fn(h, w)
        (2 * loss).backward()
        return loss.detach(), h.grad, w.grad

    for bf16, tol in ((False, 1e-6), (True, 2e-2)):
        ours = run(lambda h, w: sobre.loss.head_cross_entropy(h, w, y), bf16)
        ref = run(lambda h, w: F.cross_entropy(F.linear(h, w).float(), y), bf16)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    with torch.no_grad():
        torch.testing.assert_close(sobre.loss.head_cross_entropy(h0, w0, y), F.cross_entropy(h0 @ w0.T, y))

    def plain_logprobs(h, w):  # GRPO's per-token log-probs at temperature 0.7, and the entropies
        la = F.log_softmax(F.linear(h, w).float() / 0.7, -1)
        return la.gather(1, y[:, None])[:, 0], -(la.exp() * la).sum(-1).detach()

    def weighted(h, w):  # the same sum, gradients made in the forward (GRPO's surrogate at ratio 1)
        total, lp, ent = sobre.loss.head_weighted_logprobs(h, w, y, g_out, 0.7, entropy=True)
        return lp, ent, total

    g_out = torch.randn(30, generator=g)
    for bf16, tol in ((False, 1e-6), (True, 2e-2)):  # head_logprobs: the backward recomputes the logits
        results = []
        for fn in (lambda h, w: sobre.loss.head_logprobs(h, w, y, 0.7, entropy=True), weighted, plain_logprobs):
            h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                lp, ent, *total = fn(h, w)
            total = total[0] if total else (lp * g_out).sum()
            total.backward()
            results.append([total.detach(), lp.detach(), ent, h.grad, w.grad])
        for got in results[:2]:
            for a, b in zip(got, results[2]):
                torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    for model in (random_model(), sobre.v4.init_weights(sobre.model.build_model(sobre.preset("debug",
                                                                                          arch="deepseek_v4")))):
        x = torch.randint(0, 500, (2, 12), generator=g)
        t = torch.randint(0, 500, (2, 12), generator=g)
        with torch.no_grad():
            logits, mtp = model(x, mtp=True)
            ce, mtp_ce = model(x, mtp=True, targets=t)
        torch.testing.assert_close(ce, F.cross_entropy(logits.flatten(0, 1), t.flatten()))
        assert len(mtp_ce) == len(mtp) == 1
        torch.testing.assert_close(mtp_ce[0], F.cross_entropy(mtp[0].flatten(0, 1), t[:, 1:].flatten()))


def test_head_entropy_gradients_equal_autograds(monkeypatch):
    """GRPO's entropy bonus through the head: loss.head_logprobs(entropy_grad=True) (entropies with gradients,
    in the backward's recomputed chunks) and head_weighted_logprobs(bonus=...) (sum coef log p + bonus H, its
    gradients made in the forward, on computed or given logits) against autograd through log_softmax: the sum and
    both gradients, at temperature 0.7, over chunks of 7 rows; fp32 and bf16 autocast."""
    import sobre.loss
    monkeypatch.setattr(sobre.loss, "CHUNK_LOGITS", 7 * 50)
    monkeypatch.setattr(sobre.loss, "MIN_ROWS", 1)
    g = torch.Generator().manual_seed(2)
    h0, w0 = torch.randn(30, 16, generator=g), torch.randn(50, 16, generator=g) * 0.5
    y = torch.randint(0, 50, (30,), generator=g)
    coef, bonus = torch.randn(30, generator=g), torch.randn(30, generator=g)

    def plain(h, w):
        la = F.log_softmax(F.linear(h, w).float() / 0.7, -1)
        return (la.gather(1, y[:, None])[:, 0] * coef).sum() - ((la.exp() * la).sum(-1) * bonus).sum()

    def graded(h, w):
        lp, ent = sobre.loss.head_logprobs(h, w, y, 0.7, entropy_grad=True)
        return (lp * coef).sum() + (ent * bonus).sum()

    def given(h, w):
        rows = list(F.linear(h, w).detach().float().unbind(0))
        return sobre.loss.head_weighted_logprobs(h, w, y, coef, 0.7, logits=rows, bonus=bonus)[0]

    for bf16, tol in ((False, 1e-5), (True, 1e-1)):  # (bf16: the products' rounding, gradients of ~1)
        results = []
        for fn in (graded, lambda h, w: sobre.loss.head_weighted_logprobs(h, w, y, coef, 0.7, bonus=bonus)[0],
                   given, plain):
            h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                total = fn(h, w)
            total.backward()
            results.append((total.detach(), h.grad, w.grad))
        for got in results[:-1 if not bf16 else 2]:  # (given: fp32 logits rows, not autocast's)
            for a, b in zip(got, results[-1]):
                torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_rmsnorm_cpu_paths_equal_f_rms_norm():
    """fp32 CPU inference normalises through the vector norm (RMSNorm.forward), training through _RMSNormCPU (its
    backward by hand); their twin is F.rms_norm: outputs and both gradients, rows of every scale, eps dominating
    the tiny ones, a zero row; either input alone wanting a gradient; a float64 gradcheck of the backward."""
    from sobre.model import RMSNorm, _RMSNormCPU
    norm = RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-2, 2, 64))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 64, generator=g) * torch.tensor([1e-5, 1e-3, 1, 30, 1e3])[:, None, None]
    x[0, 0] = 0
    dy = torch.randn(5, 3, 64, generator=g)
    want = F.rms_norm(x, (64,), norm.weight.detach(), 1e-6)
    with torch.no_grad():
        got = norm(x)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    grads = []
    for f in (norm, lambda t: F.rms_norm(t, (64,), norm.weight, 1e-6)):
        xg = x.clone().requires_grad_()
        y = f(xg)
        y.backward(dy)
        grads.append((y.detach(), xg.grad, norm.weight.grad.clone()))
        norm.weight.grad = None
    assert torch.equal(grads[0][0], got)  # training's forward: the inference path's values
    assert "RMSNormCPU" in type(norm(x.requires_grad_()).grad_fn).__name__
    for ours, ref in zip(*grads):  # (row by row: a tiny row's input gradient is ~1e3 times a unit row's)
        for a, b in zip(ours.reshape(-1, 64), ref.reshape(-1, 64)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    x.requires_grad_(False)
    norm(x).backward(dy)  # the weight alone
    torch.testing.assert_close(norm.weight.grad, grads[1][2], rtol=1e-5, atol=1e-5 * grads[1][2].abs().max().item())
    norm.weight.requires_grad_(False)
    xg = x.clone().requires_grad_()
    norm(xg).backward(dy)  # the input alone
    for a, b in zip(xg.grad.reshape(-1, 64), grads[1][1].reshape(-1, 64)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    x64 = torch.randn(4, 8, dtype=torch.float64, generator=g).requires_grad_()
    w64 = torch.randn(8, dtype=torch.float64, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormCPU.apply(a, b, 1e-6), (x64, w64))


def test_rmsnorm_under_autocast_hands_its_matmuls_bf16():
    """Under autocast the norm rounds its fp32 result once to bf16 (each matmul reading it would cast it)."""
    from sobre.model import RMSNorm
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2, 16))
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0)) * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, norm(x).to(torch.bfloat16))
    dy = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    xg = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a backward inside autocast computes in fp32 too
        norm(xg).float().backward(dy)
    xr = x.clone().requires_grad_()
    F.rms_norm(xr, (16,), norm.weight.detach(), norm.eps).backward(dy.bfloat16().float())  # (dy through the cast)
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-5, atol=1e-5 * xr.grad.abs().max().item())


@pytest.mark.parametrize("interleave", [False, True])
def test_rope_fp32_addcmul_equals_the_reference_formula(interleave):
    """fp32 RoPE as one addcmul (apply_rope); its twin is the formula bf16 keeps, x * [cos, cos] + (x2, x1) *
    [-sin, sin] with each product rounded: within an fp32 rounding, the same order of dims."""
    from sobre.model import apply_rope
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 16, generator=g) * 10
    ang = torch.rand(2, 5, 1, 8, generator=g) * 6
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([-ang.sin(), ang.sin()], -1)
    got = apply_rope(x, cos, sin, interleave)
    xs = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1) if interleave else x
    want = xs * cos + xs.roll(8, -1) * sin
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    assert not torch.equal(xs, want)  # (it rotated)
