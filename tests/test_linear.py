"""sobre.linear's oneDNN path for fp32 products on the CPU (forward and both backward products) against its twin,
F.linear / torch.mm (MKL), and the LM head's chunked losses built on it against the plain cross-entropy."""

import pytest
import torch
import torch.nn.functional as F

from sobre import linear as L
from sobre.experts import GroupedSwiGLU, Groups, grouped_ffn, stacked_weight
from sobre.loss import head_cross_entropy, head_logprobs

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN (mkldnn)")


@pytest.fixture(autouse=True)
def onednn(monkeypatch):
    """The oneDNN path on, whichever CPU this is (sobre takes it on AMD CPUs with AVX-512 only: linear.ONEDNN);
    restored after."""
    monkeypatch.setattr(L, "ONEDNN", True)


@pytest.fixture
def calls(monkeypatch):
    """The oneDNN products run, as (input shape, weight shape)."""
    seen, real = [], L.dnn

    def spy(x, w, b=None):
        seen.append((tuple(x.shape), tuple(w.shape)))
        return real(x, w, b)

    monkeypatch.setattr(L, "dnn", spy)
    return seen


def close(a, b, scale=1.0):
    assert a.shape == b.shape
    assert not a.numel() or (a - b).abs().max().item() <= 1e-5 * max(scale, b.abs().max().item())


@pytest.mark.parametrize("rows,k,n,bias", [(700, 256, 1024, True), (2048, 64, 512, False), (33, 512, 4096, False),
                                            (300, 1024, 96, True)])
def test_onednn_linear_equals_f_linear_with_gradients(calls, rows, k, n, bias):
    """Values and the input / weight / bias gradients of a product above ONEDNN_MACS, from a 3-D strided input
    (rows 2048, k 64 -> n 512: the weight gradient's shape where oneDNN's other operand order is 1000x slower);
    the weight gradient's product takes the narrower of g^T and x^T as its input (n < k: g^T)."""
    torch.manual_seed(0)
    x = torch.randn(2, k, rows).transpose(1, 2)  # [2, rows, k], not contiguous
    w, b = torch.randn(n, k) / k ** 0.5, torch.randn(n) if bias else None
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    twins = [t.detach().clone().requires_grad_() for t in leaves]
    y = L.linear(*leaves) if bias else L.linear(*leaves, None)
    want = F.linear(*twins) if bias else F.linear(*twins, None)
    assert calls and calls[0] == ((2 * rows, k), (n, k))  # the forward ran on oneDNN
    g = torch.randn_like(want)
    y.backward(g)
    want.backward(g)
    assert len(calls) == 3  # and both backward products
    assert calls[2][0] == (min(n, k), 2 * rows)
    close(y, want)
    for a, b_ in zip(leaves, twins):
        close(a.grad, b_.grad, scale=10.0)


def test_onednn_linear_without_gradients_runs_no_autograd_node(calls, monkeypatch):
    """Under no_grad / inference_mode (decode, rollouts) or with no input wanting a gradient, the product goes to
    oneDNN directly (no OneDNNLinear node) and equals F.linear."""
    torch.manual_seed(0)
    x, w = torch.randn(64, 256), torch.randn(512, 256)
    nodes = []
    real = L.OneDNNLinear.apply
    monkeypatch.setattr(L.OneDNNLinear, "apply", lambda *a: nodes.append(1) or real(*a))
    for ctx in (torch.no_grad, torch.inference_mode, torch.enable_grad):
        with ctx():
            close(L.linear(x, w), F.linear(x, w))
    assert len(calls) == 3 and not nodes
    y = L.linear(x, w.requires_grad_())
    assert nodes and y.grad_fn is not None


def test_small_products_autocast_and_the_switch_stay_with_f_linear(calls, monkeypatch):
    """Below ONEDNN_MACS (oneDNN's ~11 us a call costs more than MKL's product), under autocast (bf16 products) and
    with sobre.linear.ONEDNN off, linear is F.linear exactly."""
    torch.manual_seed(0)
    x, w = torch.randn(4, 256), torch.randn(256, 256)  # 262k multiply-adds
    assert torch.equal(L.linear(x, w), F.linear(x, w)) and not calls
    big = torch.randn(64, 256)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(L.linear(big, w), F.linear(big, w)) and not calls
    monkeypatch.setattr(L, "ONEDNN", False)
    assert torch.equal(L.linear(big, w), F.linear(big, w)) and not calls
    monkeypatch.setattr(L, "ONEDNN", True)
    L.linear(big, w)
    assert len(calls) == 1


def test_few_rows_by_a_large_weight_run_on_onednn(calls, monkeypatch):
    """AMD CPUs' few-row rule with the training-size switch off (an AVX2 CPU): up to DNN_ROWS rows times a weight of
    DNN_WEIGHT elements or more run on oneDNN (an LM head at decode) and equal F.linear, values and gradients, but
    2 to WEIGHT_LEFT_ROWS rows without autograd, which run as w @ x^T (equal too, contiguous); one row more, one
    weight row fewer, bf16 or DNN_ROWS 0 leave F.linear as it is."""
    monkeypatch.setattr(L, "ONEDNN", False)
    monkeypatch.setattr(L, "DNN_ROWS", 128)
    torch.manual_seed(0)
    w = torch.randn(L.DNN_WEIGHT // 256, 256) / 16
    left = L.WEIGHT_LEFT_ROWS
    for shape in ((1, 256), (1, 1, 256), (2, 256), (1, 3, 256), (left, 256), (left + 1, 256), (128, 256)):
        x = torch.randn(shape)
        with torch.no_grad():
            y = L.linear(x, w)
        close(y, F.linear(x, w))
        assert y.shape == (*shape[:-1], w.shape[0]) and y.is_contiguous()
    assert [c[0][0] for c in calls] == [1, 1, left + 1, 128] and len(calls) == 4
    x = torch.randn(5, 256, requires_grad=True)
    wg = w.clone().requires_grad_()
    x2, w2 = x.detach().clone().requires_grad_(), w.clone().requires_grad_()
    g = torch.randn(5, w.shape[0])
    L.linear(x, wg).backward(g)
    F.linear(x2, w2).backward(g)
    assert len(calls) == 5  # the forward on oneDNN (ONEDNN off: its gradients' products on MKL)
    close(x.grad, x2.grad, scale=10.0)
    close(wg.grad, w2.grad, scale=10.0)
    calls.clear()
    for x, w_ in ((torch.randn(129, 256), w), (torch.randn(1, 256), w[1:])):
        assert torch.equal(L.linear(x, w_), F.linear(x, w_))
    L.linear(torch.randn(1, 256, dtype=torch.bfloat16), w.bfloat16())  # (bf16's own one-row path)
    assert not calls
    monkeypatch.setattr(L, "DNN_ROWS", 0)
    x = torch.randn(1, 256)
    assert torch.equal(L.linear(x, w), F.linear(x, w)) and not calls


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_head_losses_on_onednn_equal_the_plain_cross_entropy(calls, temperature):
    """head_cross_entropy's and head_logprobs' chunked matmuls (logits, dL/dh, dL/dW: linear, grad_input,
    grad_weight_t) on oneDNN give the plain F.cross_entropy(F.linear(h, w) / T)'s loss and gradients."""
    torch.manual_seed(0)
    N, D, V = 600, 256, 4096
    h, w, y = torch.randn(N, D), torch.randn(V, D) / D ** 0.5, torch.randint(0, V, (N,))
    h1, w1, h2, w2 = (t.clone().requires_grad_() for t in (h, w, h, w))
    if temperature == 1.0:
        loss = head_cross_entropy(h1, w1, y)
    else:
        loss = -head_logprobs(h1, w1, y, temperature)[0].mean()
    loss.backward()
    want = F.cross_entropy(F.linear(h2, w2) / temperature, y)
    want.backward()
    assert calls  # the head ran on oneDNN
    close(loss, want)
    close(h1.grad, h2.grad, scale=1e-2)
    close(w1.grad, w2.grad, scale=1e-2)


@pytest.mark.parametrize("counts", [[300, 0, 70, 1, 129, 0], [5, 0, 10], [0, 0, 0]], ids=["windows", "short", "empty"])
def test_grouped_linear_equals_a_loop_of_f_linear(calls, counts):
    """grouped_linear (each expert's rows in a window of a multiple of GROUP_ROWS rows on oneDNN, results cut back;
    the weight gradient on MKL) equals one F.linear per expert, values and gradients; the windows' row counts are
    multiples of GROUP_ROWS wherever x has that many rows (kernels of a few shapes), else all of x."""
    torch.manual_seed(0)
    E, k, n = len(counts), 256, 128
    x = torch.randn(sum(counts), k, requires_grad=True)
    w = stacked_weight(torch.randn(E, n, k) / k ** 0.5)  # [E, out, in], stored [E, in, out] as the model's
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = L.grouped_linear(x, w, counts)
    starts = [sum(counts[:e]) for e in range(E)]
    want = torch.cat([F.linear(x2[s:s + c], w2[e]) for e, (s, c) in enumerate(zip(starts, counts))])
    g = torch.randn_like(want)
    y.backward(g)
    want.backward(g)
    close(y, want)
    close(x.grad, x2.grad, scale=10.0)
    close(w.grad, w2.grad, scale=10.0)
    assert w.grad.stride() == w.stride()
    rows = [r for (r, _), _ in calls]
    assert len(calls) == 2 * sum(1 for c in counts if c)  # forward and input gradient, per active expert
    assert all(r % L.GROUP_ROWS == 0 or r == sum(counts) for r in rows)


@pytest.mark.parametrize("stored", ["stacked", "contiguous"])
@pytest.mark.parametrize("counts", [[200, 0, 90, 310], [5, 0, 10, 1], [0, 0, 0, 0]], ids=["windows", "short", "empty"])
def test_training_experts_run_on_onednn(counts, stored):
    """A fp32 CPU SwiGLU over experts under autograd takes Groups' oneDNN layout (from ONEDNN_MACS an expert on
    average) and its fused, windowed GroupedSwiGLU (forced here for the short and empty cases) equals the
    per-expert loop with oneDNN off, values and gradients; the weights stored as the model's (stacked_weight) or
    plainly [E, out, in] (as FSDP2 lays them out)."""
    torch.manual_seed(0)
    xs0 = torch.randn(sum(counts), 256)
    ws0 = [torch.randn(4, *s) * 0.05 for s in ((128, 256), (256, 128), (128, 256))]
    ws0 = [stacked_weight(w).detach() for w in ws0] if stored == "stacked" else ws0
    runs = []
    for fast in (True, False):
        L.ONEDNN = fast
        xs, *ws = (t.clone().requires_grad_() for t in (xs0, *ws0))
        if counts[0] == 200:
            assert Groups(counts, xs, ws[0]).mode == ("onednn" if fast else "grouped")
        out = GroupedSwiGLU.apply(xs, *ws, counts) if fast else grouped_ffn(xs, counts, *ws)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        runs.append([out] + [t.grad for t in (xs, *ws)])
    for a, b in zip(*runs):
        assert a.stride() == b.stride() or not a.numel()  # (each gradient in its weight's layout)
        close(a, b, scale=10.0)


@pytest.mark.parametrize("K", [1, 3])
def test_routed_swiglu_gathers_weighs_and_sums_back_in_windows(K):
    """GroupedSwiGLU routed (dispatch's oneDNN path: tokens gathered, each pair weighed and summed back per token,
    window by window) equals the unfused dispatch (gather all pairs, the per-expert loop with oneDNN off, weigh,
    index_add_), values and the gradients of the tokens, every weight and the routing weights; an expert with no
    pairs keeps zero gradients."""
    from sobre.experts import dispatch, eager_dispatch
    torch.manual_seed(0)
    N, E = 512, 5
    x0 = torch.randn(N, 256)
    idx = torch.stack([torch.randperm(E - 1)[:K] for _ in range(N)])  # [N, K], expert E - 1 never chosen
    w0 = torch.rand(N, K)
    ws0 = [stacked_weight(torch.randn(E, *s) * 0.05).detach() for s in ((128, 256), (256, 128), (128, 256))]
    runs = []
    for fused in (True, False):
        L.ONEDNN = fused
        x, w, *ws = (t.clone().requires_grad_() for t in (x0, w0, *ws0))
        ffn = lambda xs, groups, ws=ws: grouped_ffn(xs, groups, *ws)  # noqa: E731
        if fused:
            counts = torch.bincount(idx.flatten(), minlength=E).tolist()
            assert Groups(counts, x, ws[0]).mode == "onednn"
            out = dispatch(x, w, idx, E, ffn, swiglu=ws)
        else:
            out = eager_dispatch(x, w, idx, E, ffn)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        runs.append([out] + [t.grad for t in (x, w, *ws)])
    for a, b in zip(*runs):
        close(a, b, scale=10.0)
    assert all(not t.grad[E - 1].any() for t in ws)


def test_tiny_model_trains_alike_on_onednn_and_mkl(monkeypatch):
    """The tiny preset (routed experts large enough for GroupedSwiGLU), a loss's gradients: oneDNN everywhere vs
    the switch off (MKL, _grouped_mm), and under activation checkpointing (the windows recomputed) vs not."""
    import copy

    import sobre
    from sobre import experts as X
    from sobre.train import _checkpoint_blocks
    calls = []
    real = X.GroupedSwiGLU.forward
    monkeypatch.setattr(X.GroupedSwiGLU, "forward", staticmethod(lambda ctx, *a: calls.append(1) or real(ctx, *a)))
    torch.manual_seed(0)
    cfg = sobre.preset("tiny", n_layers=2)
    base = sobre.init_weights(sobre.Transformer(cfg))
    models = [base, copy.deepcopy(base), copy.deepcopy(base)]  # oneDNN, MKL, oneDNN recomputed
    _checkpoint_blocks(models[2])
    x = torch.randint(0, cfg.vocab_size, (2, 512))
    for i, m in enumerate(models):
        L.ONEDNN = i != 1
        m.train()
        out = m(x)
        (out[0] if isinstance(out, tuple) else out).float().pow(2).mean().backward()
    assert len(calls) == 3  # one MoE layer: the plain forward, the checkpointed one and its recompute
    for p0, p1, p2 in zip(*(m.parameters() for m in models)):
        if p0.grad is not None:
            assert torch.equal(p0.grad, p2.grad)
            close(p0.grad, p1.grad, scale=10 * p1.grad.abs().max().item() + 1e-3)
