"""Int8 weight-only inference: per-row round trip, the CPU kernel against its dequantised twin, whole models
(MoE and dense, tied head) against the same model holding the dequantised weights, the engine and the CLI."""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_cli import call

import sobre
from sobre import int8
from sobre.engine import Engine
from sobre.int8 import Int8Experts, Int8Linear, int8_mm, int8_reference, quantize_int8, quantize_rows
from sobre.moe import Experts

from conftest import random_model


def test_quantize_rows_round_trip():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 40, 24, generator=g) * torch.rand(3, 40, 1, generator=g)  # rows of different scales
    w[1, 5] = 0  # an all-zero row: codes 0, no division by zero
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and s.shape == (3, 40) and q.abs().max() <= 127
    back = q.float() * s[..., None]
    assert ((back - w).abs() <= s[..., None] / 2 + 1e-7).all()  # within half a step of each row's own scale
    assert (q.abs().amax(-1)[s > 1e-12] == 127).all() and torch.equal(back[1, 5], torch.zeros(24))


@pytest.mark.parametrize("shape", [(1, 256), (5, 96), (2, 3, 64), (4, 12), (3, 200), (4, 24)])
def test_kernel_equals_the_dequantised_twin(shape):
    """(4, 12), (3, 200), (4, 24): in % 16 != 0, which AVX-512's kernel crashed on (it steps 16 at a time with
    aligned loads): the twin computes them."""
    g = torch.Generator().manual_seed(1)
    K = shape[-1]
    q, s = quantize_rows(torch.randn(72, K, generator=g))
    x = torch.randn(*shape, generator=g)
    exact = F.linear(x, q.float() * s[:, None])
    twin = int8_reference(x, q, s)
    torch.testing.assert_close(twin, exact, atol=1e-5, rtol=1e-5)
    got = int8_mm(x, q, s)
    assert got.shape == (*shape[:-1], 72) and got.dtype == x.dtype
    # bf16 activations and scales: ~3 significant digits of each product's inputs
    assert (got - exact).abs().max() <= 2e-2 * exact.abs().max()
    if K % 16:
        assert torch.equal(got, twin)
    odd = torch.empty(x.numel() + 1, dtype=torch.bfloat16)[1:].view(x.shape).copy_(x)  # bf16 rows at an odd address
    torch.testing.assert_close(int8_mm(odd, q, s), int8_mm(x.bfloat16(), q, s))


def test_gradient_through_int8_weights(monkeypatch):
    """x's gradient through int8 weights (LoRA on an int8 model) equals autograd's through the dequantised
    matrix, over several dequantised slices; nothing of the weight reaches autograd."""
    monkeypatch.setattr(int8, "CHUNK", 32)  # 72 rows: slices of 32, 32, 8
    g = torch.Generator().manual_seed(2)
    q, s = quantize_rows(torch.randn(72, 24, generator=g))
    x = torch.randn(2, 5, 24, generator=g, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    w = q.float() * s[:, None]
    up = torch.randn(2, 5, 72, generator=g)
    (int8_mm(x, q, s) * up).sum().backward()
    (F.linear(x2, w) * up).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(int8_mm(x, q, s), F.linear(x, w), atol=1e-5, rtol=1e-5)  # (the forward: fp32)


CONFIGS = [sobre.preset("debug", dim=64, moe_inter_dim=32, n_mtp_layers=1),
           sobre.Config.from_hf(dict(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     tie_word_embeddings=True))]


def dequantised_copy(model):
    """The same model with every weight quantize_int8 would replace set to its dequantised value (fp32)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in ref.named_modules():
            if any(s in name.split(".") for s in int8.SKIP):
                continue
            if isinstance(m, torch.nn.Linear):
                q, s = quantize_rows(m.weight)
                m.weight = torch.nn.Parameter(q.float() * s[:, None])  # (unties a tied head, as int8 does)
            elif isinstance(m, Experts):
                for k in ("w1", "w2", "w3"):
                    q, s = quantize_rows(getattr(m, k))
                    getattr(m, k).copy_(q.float() * s[..., None])
    return ref


@pytest.mark.parametrize("cfg", CONFIGS, ids=["moe", "dense-tied"])
def test_int8_model_equals_its_dequantised_twin(cfg, monkeypatch):
    model = random_model(cfg, std=0.05)
    ref = dequantised_copy(model)
    q = copy.deepcopy(model)
    report = quantize_int8(q)
    kinds = {type(m) for m in q.modules()}
    assert Int8Linear in kinds and (Int8Experts in kinds) == bool(cfg.n_routed_experts)
    assert isinstance(q.embed, torch.nn.Embedding) and q.head.weight.dtype == torch.int8  # tied: its own copy
    if cfg.is_mla:
        assert all(type(layer.attn.wkv_b) is not Int8Linear for layer in q.layers)  # read whole by absorbed MLA
    assert report and max(report.values()) < 0.01  # int8 keeps each matrix within 1% of its norm
    x = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(x)
        got = q(x)  # the kernel (bf16 activations)
        assert (got - want).abs().max() <= 3e-2 * want.abs().max()
        monkeypatch.setattr(int8, "int8_mm", int8_reference)  # the twin everywhere: fp32 products of the same weights
        torch.testing.assert_close(q(x), want, atol=1e-4 * want.abs().max().item(), rtol=0)


@pytest.mark.parametrize("cfg", CONFIGS, ids=["moe", "dense-tied"])
def test_load_quantises_each_tensor_as_it_reads(cfg, tmp_path):
    path = sobre.save(random_model(cfg, std=0.05), tmp_path / "m", dtype=torch.bfloat16)
    streamed = sobre.load(path, int8=True, dtype=torch.float32)
    twin = sobre.load(path, dtype=torch.float32)
    quantize_int8(twin)  # the whole fp32 model first, then quantised: the same codes and scales
    a, b = streamed.state_dict(), twin.state_dict()
    assert a.keys() == b.keys() and any(t.dtype == torch.int8 for t in a.values())
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_int8_deepseek_v4_equals_its_dequantised_twin(monkeypatch):
    from test_v4 import hf_model, ours_from
    model = ours_from(hf_model())
    ref, q = dequantised_copy(model), copy.deepcopy(model)
    quantize_int8(q)
    assert isinstance(q.lm_head, Int8Linear) and type(q.layers[0].self_attn.o_a_proj) is not Int8Linear
    x = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(x)
        assert torch.isfinite(q(x)).all()  # the kernel's bf16 rows may move the indexer's top-k: no closeness
        monkeypatch.setattr(int8, "int8_mm", int8_reference)
        torch.testing.assert_close(q(x), want, atol=1e-4 * want.abs().max().item(), rtol=0)


def test_engine_and_cli_with_int8(tmp_path, capsys):
    model = random_model(sobre.preset("debug", dim=64, moe_inter_dim=32), std=0.05)
    path = sobre.save(model, tmp_path / "m")
    eng = Engine.from_pretrained(path, int8=True)
    assert any(isinstance(m, Int8Linear) for m in eng.model.modules())
    prompts = [[5, 6, 7], [8, 9]]
    out = eng.generate(prompts, max_new_tokens=6)
    assert [len(o) for o in out] == [6, 6]
    # batch invariance holds for int8 too: each row alone decodes the same tokens
    assert [eng.generate([p], max_new_tokens=6)[0] for p in prompts] == out
    code, stdout, _ = call(capsys, "generate", str(path), "--ids", "5,6,7", "--max-new-tokens", "6", "--int8")
    assert code == 0 and [int(t) for t in stdout.split()] == out[0]
    with pytest.raises(ValueError, match="choose one"):
        sobre.load(path, fp8=True, int8=True)
    with pytest.raises(ValueError, match="int8 weights"):
        Engine.from_pretrained(path, int8=True, compile=True)
    code, _, stderr = call(capsys, "generate", str(path), "--ids", "5", "--int8", "--expert-parallel")
    assert code == 1 and "--int8 with --expert-parallel" in stderr
