"""The paged, batched engine against transformers, against the contiguous cache, and against itself."""

import pytest
import torch

import sobre
from sobre import plan
from sobre.engine import Engine
from sobre.host import int_rows, ints
from sobre.model import Cache
from sobre.paged import PagedBatch, PagedPool
from sobre.request import Sequence
from sobre.sampling import SamplingParams

from conftest import SPARSE_MODELS, V3, assert_same_samples, hf_checkpoint, random_model, run_requests

DENSE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
PROMPTS = [[5, 9, 17, 3, 44, 2, 8], [7, 1], [100, 3, 3, 90, 12, 6, 6, 1, 0, 77, 31], [64]]


def hf_greedy(path, prompts, n, device="cpu"):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    return [row[width:].tolist() for row in out]


@pytest.mark.parametrize("model_type,kw", [("deepseek_v3", V3), ("qwen2", dict(DENSE, tie_word_embeddings=True)),
                                           ("llama", DENSE), ("qwen3", dict(DENSE, head_dim=24))])
def test_engine_greedy_equals_transformers(tmp_path, model_type, kw):
    path = hf_checkpoint(tmp_path / model_type, model_type, **kw)
    eng = Engine.from_pretrained(path, dtype=torch.float32)
    assert eng.generate([PROMPTS[0]], max_new_tokens=12) == hf_greedy(path, [PROMPTS[0]], 12)
    assert eng.generate(PROMPTS, max_new_tokens=12) == hf_greedy(path, PROMPTS, 12)


@pytest.mark.parametrize("row", ["mv", "linear"])
def test_one_row_bf16_linear_equals_f_linear(row, monkeypatch):
    """sobre.linear: one bf16 row on the CPU as torch.mv (B=1 decode) where this CPU runs that faster (BF16_ROW,
    measured; both forced here); its twin F.linear. Both land within bf16's rounding of the fp32 product; anything
    else is F.linear itself."""
    import torch.nn.functional as F

    from sobre import linear as L
    from sobre.linear import Linear, linear
    assert L.bf16_row_op() in ("mv", "linear")  # (measured once a process)
    monkeypatch.setattr(L, "BF16_ROW", row)
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(300, 200, generator=g).bfloat16(), torch.randn(300, generator=g).bfloat16()
    for shape in ((200,), (1, 200), (1, 1, 200)):
        x = torch.randn(*shape, generator=g).bfloat16()
        for bias in (None, b):
            exact = F.linear(x.float(), w.float(), None if bias is None else bias.float())
            got, twin = linear(x, w, bias), F.linear(x, w, bias)
            assert got.shape == exact.shape and got.dtype == torch.bfloat16
            for y in (got, twin):
                assert ((y.float() - exact).abs() <= exact.abs() / 128 + 1e-3).all()
            assert bias is None or torch.equal(got, twin)  # with a bias: F.linear (bf16 addmv is 8-10x slower)
            if bias is None:  # the product BF16_ROW names
                want = torch.mv(w, x.reshape(-1)) if row == "mv" else F.linear(x, w)
                assert torch.equal(got.reshape(-1), want.reshape(-1))
    for x, ww in ((torch.randn(3, 200, generator=g).bfloat16(), w), (torch.randn(1, 200, generator=g), w.float())):
        assert torch.equal(linear(x, ww, None), F.linear(x, ww))  # several rows, or fp32: F.linear
    layer = Linear(200, 300, bias=True).bfloat16()
    x = torch.randn(1, 1, 200, generator=g).bfloat16()
    assert set(layer.state_dict()) == {"weight", "bias"} and torch.equal(layer(x), linear(x, layer.weight, layer.bias))


def test_default_dtype_on_cpu(tmp_path, monkeypatch):
    """A bf16 checkpoint loads in fp32 when it is small or the CPU lacks native bf16, else stays bf16 (where its
    decode measured faster, bench/dense.py); an explicit dtype always wins."""
    import sobre.linear as linear
    path = hf_checkpoint(tmp_path / "m", "qwen2", dtype=torch.bfloat16, **DENSE)
    def dtype(**kw):
        return next(Engine.from_pretrained(path, **kw).model.parameters()).dtype

    for threshold, native, want in ((1, True, torch.bfloat16), (1, False, torch.float32),
                                    (10**9, True, torch.float32)):  # (the model: a few thousand parameters)
        monkeypatch.setattr(linear, "BF16_PARAMS", threshold)
        monkeypatch.setattr(linear, "native_bf16", lambda native=native: native)
        assert dtype() == want
    assert dtype(dtype=torch.float32) == torch.float32

    model = random_model()
    x = torch.randint(0, 512, (2, 70), generator=torch.Generator().manual_seed(3))  # crosses a 64-token block
    with torch.no_grad():
        full = model(x)
        tol = 1e-4 * full.abs().max()
        for impl in ("naive", "absorb"):
            model.config.attn_impl = impl
            pool = PagedPool(model, 8)
            a, b = Sequence(0, [], SamplingParams()), Sequence(1, [], SamplingParams())
            pool.reserve(a, 70)
            pool.reserve(b, 70)
            pre_a = model(x[:1, :30], PagedBatch(pool, [a], 30))
            pre_b = torch.cat([model(x[1:, :5], PagedBatch(pool, [b], 5)),  # chunked prefill
                               model(x[1:, 5:30], PagedBatch(pool, [b], 25))], dim=1)
            dec = torch.cat([model(x[:, t:t + 1], PagedBatch(pool, [a, b], 1)) for t in range(30, 70)], dim=1)
            assert (a.length, b.length) == (70, 70)
            assert (pre_a - full[:1, :30]).abs().max() < tol, impl
            assert (pre_b - full[1:, :30]).abs().max() < tol, impl
            assert (dec - full[:, 30:]).abs().max() < tol, impl


def test_paged_batch_masks_only_where_rows_need_one():
    """A forward's mask is None (causal, the queries last: attention.attend's contract) where every row ends at the
    last key and the step adds one token (a lone sequence's decode: nothing to hide) or the whole sequence; rows of
    different lengths and a few tokens after a cache (a speculative verify) get the explicit mask. The batch's last
    position (the context check, host-side) is its positions' largest."""
    model = random_model()
    pool = PagedPool(model, 8)
    a, b = Sequence(0, [], SamplingParams()), Sequence(1, [], SamplingParams())
    for s in (a, b):
        pool.reserve(s, 70)
    assert PagedBatch(pool, [a, b], 30)._mask is None  # fresh prompts
    a.length = b.length = 40
    for seqs in ([a], [a, b]):
        batch = PagedBatch(pool, seqs, 1)
        assert batch._mask is None and batch.last_position() == int(batch.pos.max()) == 40
    b.length = 30
    ragged = PagedBatch(pool, [a, b], 1)
    assert ragged.last_position() == int(ragged.pos.max()) == 40
    assert torch.equal(ragged.mask(None)[:, 0, 0], torch.arange(41)[None] < torch.tensor([[41], [31]]))
    verify = PagedBatch(pool, [a], 3)
    assert torch.equal(verify.mask(None)[0, 0], torch.ones(3, 43, dtype=torch.bool).tril(40))


@pytest.mark.parametrize("cfg", ["debug", "dense"])
def test_bf16_decode_of_one_sequence_close_to_fp32(cfg):
    """bf16 decode of one sequence (every product one row: torch.mv in the linears and the expert loop) stays
    within bf16's rounding of the fp32 model's full forward, as the prefill of several rows (F.linear) does."""
    c = sobre.preset("debug") if cfg == "debug" else sobre.Config.from_hf(dict(DENSE, model_type="qwen2"))
    model = random_model(c)
    x = torch.randint(0, c.vocab_size, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(x)
        half = model.bfloat16()
        pool = PagedPool(half, 4)
        a = Sequence(0, [], SamplingParams())
        pool.reserve(a, 40)
        pre = half(x[:, :20], PagedBatch(pool, [a], 20))
        dec = torch.cat([half(x[:, t:t + 1], PagedBatch(pool, [a], 1)) for t in range(20, 40)], dim=1)
    assert dec.dtype == torch.bfloat16
    tol = 0.03 * full.abs().max()
    assert (pre.float() - full[:, :20]).abs().max() < tol
    assert (dec.float() - full[:, 20:]).abs().max() < tol


@pytest.mark.parametrize("values", [[], [7], [3, -1, 2 ** 40, 0], list(range(300))])
def test_host_ints_equal_torch_tensor(values):
    """host.ints / int_rows (the decode step's host-side integers through numpy) against torch.tensor."""
    got = ints(values, "cpu")
    assert got.dtype == torch.int64 and torch.equal(got, torch.tensor(values, dtype=torch.int64))
    assert torch.equal(ints(iter(values), None, len(values)), got)
    rows = [[v, v + 1, -v] for v in values]
    if rows:
        assert torch.equal(int_rows(rows), torch.tensor(rows, dtype=torch.int64))
    else:
        assert int_rows(rows).shape == (0, 0)
    with pytest.raises(ValueError, match="different lengths"):
        int_rows([[1, 2], [3]])


def test_paged_equals_contiguous_cache():
    model = random_model(sobre.preset("debug", attn_impl="absorb"))
    x = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        cache = Cache(32)
        ref = [model(x[:, :8], cache)] + [model(x[:, t:t + 1], cache) for t in range(8, 20)]
        pool, seq = PagedPool(model, 2), Sequence(0, [], SamplingParams())
        pool.reserve(seq, 20)
        got = [model(x[:, :8], PagedBatch(pool, [seq], 8))] + \
              [model(x[:, t:t + 1], PagedBatch(pool, [seq], 1)) for t in range(8, 20)]
    assert (torch.cat(got, 1) - torch.cat(ref, 1)).abs().max() < 1e-5


def test_block_run_reads_strided_views_equal_to_the_gather():
    """Rows whose blocks lie in a run (PagedPool.run: row b's at first + b * step, consecutive) read the pool as
    a strided view; on every row's own blocks it equals the gather (past them both read what the mask hides)."""
    model = random_model(sobre.preset("debug", arch="qwen2"))  # two slot arrays [P, Hkv, hd]
    pool = PagedPool(model, 16)
    seqs = [Sequence(i, [], SamplingParams()) for i in range(4)]
    for s, n in zip(seqs, (128, 128, 128, 64)):  # the last row holds one block of the table's two
        pool.reserve(s, n)
    for layer in pool.slots:
        for t in layer:
            t.normal_()
    for s in seqs:
        s.length = 100 if s.rid < 3 else 50
    batch = PagedBatch(pool, seqs, 1)
    assert batch.run == (1, 2) and batch.table.shape == (4, 2)
    views = batch.read(0, 2)
    batch.run = None
    gathered = batch.read(0, 2)
    for v, g, t in zip(views, gathered, pool.slots[0]):
        assert v.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()  # a view: nothing copied
        assert v.shape == g.shape and torch.equal(v[:3], g[:3]) and torch.equal(v[3, :64], g[3, :64])
    seqs[2].blocks.reverse()  # not consecutive: the gather
    assert pool.run(seqs, 2) is None
    assert pool.run([seqs[1], seqs[0]], 2) is None  # (rows out of block order)


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen2"])
def test_rollout_batches_decode_through_block_runs_and_match_the_gather(arch, monkeypatch):
    """A batch admitted together (GRPO's groups: n samples of a prompt) decodes in block order with its cache
    read as views of the pool; a sequence that stops hands its blocks to the run's last one (PagedPool.keep_run),
    so the rest stay a run. Tokens equal the gather's (seeded per request: the batch's order may differ)."""
    model = random_model(sobre.preset("debug", arch=arch))
    prompts = [[5, 9, 3, 7, 2, 8, 1] * 3] * 4 + [[4, 4, 6] * 5] * 4

    def sample(stop=()):
        eng = Engine(model, max_batch=8)
        rids = [eng.add_request(p, max_new_tokens=24, temperature=1.0, seed=i, stop_token_ids=stop)
                for i, p in enumerate(prompts)]
        done = {}
        while eng.has_work():
            eng.step()
            done.update(eng.collect())
        assert len(eng.pool.free) == eng.pool.n_blocks - 1  # every block came back
        return [done[r].out for r in rids]

    monkeypatch.setattr(plan, "ON", False)  # the module path's cache views (the plan reads the pool its own way)
    stop = (sample()[3][10],)  # row 3 stops by its 11th token: a hole mid-run
    runs, run = [], PagedPool.run
    monkeypatch.setattr(PagedPool, "run", lambda self, seqs, nb: runs.append(run(self, seqs, nb)) or runs[-1])
    views = sample(stop)
    assert len(runs) > 20 and None not in runs[1:]  # every decode step after the prompts' prefill read views
    assert len({len(v) for v in views}) > 1  # some stopped early
    monkeypatch.setattr(PagedPool, "run", lambda self, seqs, nb: None)  # (and no sequence moves)
    assert sample(stop) == views


@pytest.mark.parametrize("experts", ["small", "padded"])
def test_batch_invariance_greedy_and_seeded(experts, monkeypatch):
    """Each prompt of a ragged batch gets the tokens it gets alone (greedy, and seeded sampling). "padded": the
    experts too large for the few-token paths (bags, every expert), so batched steps take the padded layout with
    the pairs placed unsorted (experts.padded), one prompt alone experts.one_token."""
    import sobre.experts as X
    calls = []
    if experts == "padded":
        monkeypatch.setattr(X, "SMALL_EXPERT_PARAMS", 0)
        monkeypatch.setattr(X, "padded", lambda *a, f=X.padded: calls.append(1) or f(*a))
    model = random_model()
    eng = Engine(model)
    alone = [eng.generate([p], max_new_tokens=10)[0] for p in PROMPTS]
    assert eng.generate(PROMPTS, max_new_tokens=10) == alone
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=11)
    alone = [eng.generate([p], **kw)[0] for p in PROMPTS]
    assert eng.generate(PROMPTS, **kw) == alone
    assert len(eng.pool.free) == eng.pool.n_blocks - 1  # every block came back
    assert (len(calls) > 10) == (experts == "padded")


def test_step_api_cancel_and_finish_reasons():
    eng = Engine(random_model(), max_batch=2, cache_tokens=512)
    a = eng.add_request([1, 2, 3], max_new_tokens=5)
    b = eng.add_request([4, 5], max_new_tokens=50)
    c = eng.add_request([6], max_new_tokens=3)  # waits: max_batch is 2
    events = eng.step()
    assert {e.rid for e in events} == {a, b} and not eng.collect()
    eng.cancel(b)
    done = {}
    while eng.has_work():
        for e in eng.step():
            assert e.rid in (a, c)
        done.update(eng.collect())
    done.update(eng.collect())
    assert done[a].finish_reason == "length" and len(done[a].out) == 5
    assert done[c].finish_reason == "length" and len(done[c].out) == 3


def test_min_tokens_holds_stops_off_until_reached():
    """min_tokens (vLLM's): the first min_tokens tokens are drawn with the stop tokens masked and no stop string
    ends the text before them; greedy equals a full-forward reference, batched, alone and speculative."""
    model = random_model()
    free = Engine(model).generate([[1, 2, 3]], max_new_tokens=10)[0]

    def reference(prompt, n, min_tokens):  # (greedy by full forwards; also each step's unmasked argmax)
        seq, out, raw = list(prompt), [], []
        with torch.no_grad():
            while len(out) < n:
                logits = model(torch.tensor([seq]))[0, -1]
                raw.append(int(logits.argmax()))
                if len(out) < min_tokens:
                    logits[list(stops)] = float("-inf")
                out.append(int(logits.argmax()))
                seq.append(out[-1])
                if out[-1] in stops and len(out) >= min_tokens:
                    break
        return out, raw

    stops = (free[0],)
    while not set((raw := reference([1, 2, 3], 10, 5)[1])[:5]) <= set(stops):
        stops = tuple(dict.fromkeys(stops + tuple(raw[:5])))  # until every early step's favourite is a stop token
    want = reference([1, 2, 3], 10, 5)[0]
    assert not set(want[:5]) & set(stops) and want != free
    kw = dict(max_new_tokens=10, min_tokens=5, stop_token_ids=stops)
    for eng in (Engine(model), Engine(model, speculative=True, min_acceptance=0)):
        assert eng.generate([[1, 2, 3]], **kw)[0] == want
        batch = [[1, 2, 3], [9, 8, 7, 6]]
        assert eng.generate(batch, **kw) == [want, reference([9, 8, 7, 6], 10, 5)[0]]
    assert Engine(model).generate([[1, 2, 3]], max_new_tokens=10, stop_token_ids=stops)[0] == [free[0]]

    class Chars:  # token i is chr(97 + i % 26)
        def decode(self, ids):
            return "".join(chr(97 + i % 26) for i in ids)

    text = Chars().decode(free)
    eng = Engine(model, Chars())
    rid = eng.add_request([1, 2, 3], max_new_tokens=10, stop=(text[0],), min_tokens=4)
    while eng.has_work():
        eng.step()
    seq = eng.collect()[rid]  # its first letter again, but only where it ends past the first 3 tokens' text
    cut = text.find(text[0], 3)
    assert seq.out == free[:len(seq.out)] and (seq.text == text[:cut] if cut >= 0 else seq.finish_reason == "length")
    with pytest.raises(ValueError, match="min_tokens=11: must be in"):
        SamplingParams(max_new_tokens=10, min_tokens=11)
    with pytest.raises(ValueError, match="JSON mode"):
        SamplingParams(min_tokens=2, json=True)


def test_stop_tokens_strings_and_logprobs():
    model = random_model()
    eng = Engine(model)
    free_run = eng.generate([[1, 2, 3]], max_new_tokens=8)[0]
    stop_at = free_run[3]
    out = eng.generate([[1, 2, 3]], max_new_tokens=8, stop_token_ids=(stop_at,))[0]
    assert out == free_run[:free_run.index(stop_at) + 1]

    class Chars:  # a toy tokenizer: token i is chr(97 + i % 26)
        def decode(self, ids):
            return "".join(chr(97 + i % 26) for i in ids)

    eng = Engine(model, Chars())
    text = Chars().decode(free_run)
    rid = eng.add_request([1, 2, 3], max_new_tokens=8, stop=(text[4:6],), logprobs=3)
    while eng.has_work():
        eng.step()
    seq = eng.collect()[rid]
    assert seq.finish_reason == "stop" and seq.text == text[:text.index(text[4:6])]
    rid = eng.add_request([1, 2, 3], max_new_tokens=8, stop=(text[4:6],), include_stop_str_in_output=True)
    while eng.has_work():
        eng.step()
    assert eng.collect()[rid].text == text[:text.index(text[4:6]) + 2]
    chosen, top = seq.logprobs[0]
    assert len(top) == 3 and chosen == pytest.approx(max(top.values()), abs=1e-6)  # greedy took the top token
    # a stop string first completed late in a long answer: found by decoding only each step's last tokens
    calls = []

    class Counted(Chars):
        def decode(self, ids):
            calls.append(len(ids))
            return super().decode(ids)

    eng = Engine(model, Counted())
    sampled = Chars().decode(eng.generate([[1, 2, 3]], max_new_tokens=150, temperature=1.0, seed=7)[0])
    at = next(i for i in range(100, 140) if sampled.index(sampled[i:i + 3]) == i)  # its first occurrence
    rid = eng.add_request([1, 2, 3], max_new_tokens=150, temperature=1.0, seed=7, stop=(sampled[at:at + 3], "@"))
    calls.clear()
    while eng.has_work():
        eng.step()
    seq = eng.collect()[rid]
    assert seq.finish_reason == "stop" and seq.text == sampled[:at] and len(seq.out) == at + 3
    assert max(calls[:-1]) <= 4 * 3 + 4 and calls[-1] == at + 3  # the whole text decoded once, at the end
    rid = eng.add_request([1, 2, 3], max_new_tokens=8, stop=("@",), stop_token_ids=(free_run[3],))
    while eng.has_work():
        eng.step()
    seq = eng.collect()[rid]
    assert seq.finish_reason == "stop" and seq.text is None  # (a stop token: a server cuts nothing)


def test_bad_requests_are_rejected():
    eng = Engine(random_model(), cache_tokens=128)
    with pytest.raises(ValueError, match="does not fit the context of 512"):
        eng.add_request(list(range(512)))
    with pytest.raises(ValueError, match="sampling parameter top_p"):
        eng.add_request([1], top_p=2.0)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        eng.add_request([1], stop=("x",))
    with pytest.raises(ValueError, match="raise cache_tokens"):
        eng.add_request([1] * 100, max_new_tokens=300)
    with pytest.raises(ValueError, match="empty prompt"):
        eng.add_request([])
    for kw in ({"max_batch": 0}, {"cache_tokens": -1}):
        with pytest.raises(ValueError, match=f"{next(iter(kw))} must be >= 1"):
            Engine(random_model(), **kw)


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen2"])
def test_repeated_prompts_share_one_prefill_and_match_separate_runs(arch):
    model = random_model(sobre.preset("debug", arch=arch))
    p, q = [5, 9, 3, 7, 2, 8, 1] * 10, [4, 4, 6]  # 70 tokens: the copied prompt spans two cache blocks
    reqs = [(p, 1), (p, 2), (q, 3), (p, 4), (p, None)]
    eng = Engine(model, max_batch=8)
    rids = [eng.add_request(x, max_new_tokens=10, temperature=1.0 if s else 0.0, seed=s, repetition_penalty=1.3)
            for x, s in reqs]
    calls = []
    hidden = model.hidden
    model.hidden = lambda tokens, cache=None: calls.append(tokens.shape) or hidden(tokens, cache)
    done = {}
    while eng.has_work():
        eng.step()
        done.update(eng.collect())
    del model.hidden
    assert sum(1 for shape in calls if shape[1] > 1) == 2  # one prefill per distinct prompt
    for rid, (x, s) in zip(rids, reqs):
        alone = Engine(model).generate([x], max_new_tokens=10, temperature=1.0 if s else 0.0, seed=s,
                                       repetition_penalty=1.3)[0]
        assert done[rid].out == alone, (x[:3], s)


@pytest.mark.parametrize("speculative", [False, True])
def test_prompts_of_close_lengths_prefill_together_and_match_alone(speculative):
    """Prompts admitted in one step go through one forward, padded to the longest, when padding stays under a
    quarter of the group's tokens; tokens and logprobs (and with MTP drafting, the drafts' acceptance) equal
    each prompt run alone."""
    model = random_model()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (44, 6, 40, 50, 47)]
    kw = dict(max_new_tokens=6, logprobs=2)
    eng = Engine(model, max_batch=8, speculative=speculative)
    calls = []
    hidden = model.hidden
    model.hidden = lambda tokens, cache=None: calls.append(tuple(tokens.shape)) or hidden(tokens, cache)
    rids = [eng.add_request(p, **kw) for p in prompts]
    done = {}
    while eng.has_work():
        eng.step()
        done.update(eng.collect())
    del model.hidden
    assert calls[:2] == [(1, 6), (4, 50)]  # the short prompt alone, the other four in one padded forward
    for rid, p in zip(rids, prompts):
        alone = Engine(model, speculative=speculative)
        r = alone.add_request(p, **kw)
        while alone.has_work():
            alone.step()
        ref = alone.collect()[r]
        assert done[rid].out == ref.out
        for (lp, top), (lp_ref, top_ref) in zip(done[rid].logprobs, ref.logprobs):
            assert lp == pytest.approx(lp_ref, abs=1e-4) and top.keys() == top_ref.keys()


@pytest.mark.parametrize("cfg", [None, "dense"], ids=["mla", "gqa"])
def test_prefix_cache_reuses_blocks_and_changes_nothing(cfg):
    """Requests sharing a long system prefix: with the prefix cache the later ones prefill only their own tail
    (whole 64-token blocks reused, counted in prefix_stats / Sequence.cached), outputs equal an engine without it
    (greedy; seeded up to a draw at a token boundary, assert_same_samples); a small pool evicts
    least-recently-used cached blocks and still agrees."""
    model = random_model(sobre.preset("debug", arch="qwen2") if cfg else None)
    g = torch.Generator().manual_seed(0)
    system = torch.randint(3, 500, (150,), generator=g).tolist()
    prompts = [system + torch.randint(3, 500, (n,), generator=g).tolist() for n in (5, 20, 1)] + [system[:130]]
    ref = Engine(model).generate(prompts, max_new_tokens=8)
    eng = Engine(model, prefix_cache=True)
    assert eng.generate(prompts[:1], max_new_tokens=8) == ref[:1]
    assert eng.prefix_stats == {"hit": 0, "miss": 155}
    done = run_requests(eng, prompts[1:], max_new_tokens=8)
    assert [s.out for s in done] == ref[1:]
    assert [s.cached for s in done] == [128, 128, 128]  # two full blocks of the shared system prompt
    assert eng.prefix_stats["hit"] == 3 * 128
    seeded = dict(max_new_tokens=8, temperature=1.0, seed=3)
    assert_same_samples(eng.generate(prompts, **seeded), Engine(model).generate(prompts, **seeded))
    # a pool of 8 blocks: every new prompt needs room, so cached blocks nobody holds are evicted
    small = Engine(model, prefix_cache=True, cache_tokens=8 * 64)
    others = [torch.randint(3, 500, (140,), generator=g).tolist() for _ in range(4)]
    for p in others + prompts:
        assert small.generate([p], max_new_tokens=4) == Engine(model).generate([p], max_new_tokens=4)
    assert small.pool.available() == small.pool.n_blocks - 1  # nothing leaked (V4: tests/test_v4.py)


@pytest.mark.parametrize("mtp_layers", [1, 2, 3])
def test_prefix_cache_with_speculative_decoding(mtp_layers):
    """With MTP drafting, a block is shared only when the tokens after it match too (MTP layer k's row at a
    position reads the token k + 1 ahead) and only once the MTP layers have their rows: prompts sharing 70 tokens
    reuse one block, prompts sharing exactly 64 reuse none; every MTP row of a running sequence equals the one
    an engine without the cache computes, and greedy output equals plain greedy. D MTP layers: D drafts."""
    model = random_model(sobre.preset("debug", n_mtp_layers=mtp_layers))
    c = model.config
    g = torch.Generator().manual_seed(1)
    system = torch.randint(3, 500, (70,), generator=g).tolist()
    tails = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (9, 30, 12)]
    prompts = [system + tails[0], system + tails[1], system[:64] + tails[2]]

    def mtp_rows(eng):  # each running sequence's MTP-layer cache rows over its prompt, after one decode step
        rids = [eng.add_request(p, max_new_tokens=12) for p in prompts[:1]]
        eng.step(), eng.step()  # the first prompt's MTP rows are in (the second step drafts)
        rids += [eng.add_request(p, max_new_tokens=12) for p in prompts[1:]]
        eng.step(), eng.step()
        rows = {}
        for s in eng.running:
            slots = sobre.paged.paged_rows(torch.tensor([s.blocks]), torch.arange(len(s.prompt))[None], 64)[0]
            rows[s.rid] = torch.stack([eng.pool.slots[c.n_layers + k][0][slots] for k in range(mtp_layers)])
        while eng.has_work():
            eng.step()
        done = eng.collect()
        return rows, [done[r].out for r in rids]

    rows, out = mtp_rows(Engine(model, speculative=True))
    cached = Engine(model, speculative=True, prefix_cache=True)
    rows_c, out_c = mtp_rows(cached)
    assert cached.prefix_stats["hit"] == 64  # the second prompt only: the third differs at token 64
    assert out_c == out == [Engine(model).generate([p], max_new_tokens=12)[0] for p in prompts]
    assert rows_c.keys() == rows.keys() and len(rows) == 3
    for rid in rows:
        torch.testing.assert_close(rows_c[rid], rows[rid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mtp_layers", [1, 2, 3])
def test_chunked_prompt_feeds_the_mtp_layers_chunk_by_chunk(mtp_layers, monkeypatch):
    """Speculative, a prompt longer than prefill_chunk: each MTP layer takes in a chunk's positions as it arrives
    (layer k all but the prompt's last k + 1, whose tokens are not drawn yet), so no MTP forward is longer than a
    chunk (a whole prefill's first verify runs them over the whole prompt); the MTP layers' cache rows over the
    prompt equal a whole prefill's, and greedy output equals plain greedy."""
    model = random_model(sobre.preset("debug", n_mtp_layers=mtp_layers))
    c = model.config
    prompt = torch.randint(3, 500, (150,), generator=torch.Generator().manual_seed(2)).tolist()
    lengths = []  # tokens of each MTP forward
    mtp_hidden = model.mtp_hidden
    monkeypatch.setattr(model, "mtp_hidden", lambda h, tokens, *a, **kw: lengths.append(tokens.shape[1]) or
                        mtp_hidden(h, tokens, *a, **kw))

    def prefill(chunk):  # -> the MTP layers' rows over the prompt once it is in, the longest MTP forward, the output
        lengths.clear()
        eng = Engine(model, speculative=True, prefill_chunk=chunk, min_acceptance=0)
        rid = eng.add_request(prompt, max_new_tokens=8)
        while not eng.running:
            eng.step()  # (the step that takes the last chunk also runs the first verify)
        s = eng.running[0]
        slots = sobre.paged.paged_rows(torch.tensor([s.blocks]), torch.arange(len(prompt) - mtp_layers)[None], 64)[0]
        rows = torch.stack([eng.pool.slots[c.n_layers + k][0][slots] for k in range(mtp_layers)])
        longest = max(lengths)
        while eng.has_work():
            eng.step()
        return rows, longest, eng.collect()[rid].out

    rows, longest, out = prefill(37)
    rows_whole, longest_whole, out_whole = prefill(4096)
    assert longest == 37 and longest_whole == len(prompt)
    assert out == out_whole == Engine(model).generate([prompt], max_new_tokens=8)[0]
    torch.testing.assert_close(rows, rows_whole, atol=1e-5, rtol=0)
    assert prefill(64)[2] == out


@pytest.mark.parametrize("cfg,kw", [(None, {}), ("qwen2", {}), ("mtp", dict(speculative=True)),
                                    (None, dict(prefix_cache=True)), ("nsa", dict(prefix_cache=True)),
                                    ("dsa", dict(prefix_cache=True))],
                         ids=["mla", "gqa", "speculative", "prefix", "nsa", "dsa"])
def test_chunked_prefill_interleaves_and_changes_nothing(cfg, kw):
    """A prompt longer than prefill_chunk goes in that many tokens a step while the running sequences decode
    (each step emits their token), and starts once its last chunk is in; outputs equal an engine that prefills
    it whole (greedy, and seeded samples of one prompt: its twins get its cache); cancelling it mid-prefill hands
    its place to a twin, which prefills from its own start; every block is free at the end. NSA / DSA: also at
    chunk sizes their compression blocks and stride do not divide."""
    model = random_model(sobre.preset("debug", arch="qwen2") if cfg == "qwen2" else
                         sobre.preset("debug", n_mtp_layers=1) if cfg == "mtp" else
                         sobre.preset("debug", **SPARSE_MODELS[cfg]) if cfg in SPARSE_MODELS else None)
    g = torch.Generator().manual_seed(0)
    long, short, long2, long3 = (torch.randint(3, 500, (n,), generator=g).tolist() for n in (300, 7, 300, 300))
    whole = Engine(model, prefill_chunk=4096, **kw)
    ref = whole.generate([long, short, long2, long3], max_new_tokens=10)  # (new prompts below: no prefix hit)
    seeded = dict(max_new_tokens=6, temperature=1.0, seed=1)
    ref_samples = whole.generate([long] * 3, **seeded)
    eng = Engine(model, prefill_chunk=64, **kw)
    assert eng.generate([long, short], max_new_tokens=10) == ref[:2]
    assert_same_samples(eng.generate([long] * 3, **seeded), ref_samples)
    rs = eng.add_request(short, max_new_tokens=12)
    eng.step()  # the short prompt decodes from here on
    rl = eng.add_request(long2, max_new_tokens=4)
    for step in range(5):  # 300 tokens, 64 a step: the long prompt's first token comes with its fifth chunk
        events = eng.step()
        assert [e.rid for e in events if e.rid == rs] == [rs]  # the running sequence was not held up
        assert (rl in [e.rid for e in events]) == (step == 4) and bool(eng.prefilling) == (step < 4)
    while eng.has_work():
        eng.step()
    done = eng.collect()
    assert done[rl].out == ref[2][:4] and done[rs].out[:10] == ref[1]
    parent, twin = (eng.add_request(long3, max_new_tokens=5) for _ in range(2))
    eng.step(), eng.step()  # two chunks in
    eng.cancel(parent)
    assert eng.prefilling[0].seq.rid == twin and eng.prefilling[0].seq.length == eng.prefilling[0].seq.cached
    while eng.has_work():
        eng.step()
    done = eng.collect()
    assert done[parent].finish_reason == "cancelled" and done[twin].out == ref[3][:5]
    assert eng.pool.available() == eng.pool.n_blocks - 1 and eng.in_flight() == 0
    if cfg in SPARSE_MODELS:
        for chunk in (37, 50):  # NSA: blocks of 8 every 4 tokens; DSA: its indexer keys
            assert Engine(model, prefill_chunk=chunk, **kw).generate([long, short, long2, long3],
                                                                      max_new_tokens=10) == ref
