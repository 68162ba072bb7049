"""FP8 block quantisation: round trip error, FP8Linear == dequantised linear, quantize_model's report; the FP8
matmul (e4m3 activations x e4m3 weights, torch._scaled_mm) against its dequantised twin."""

import pytest
import torch

from sobre import reference
from sobre.config import preset
from sobre.fp8 import (
    FP8Linear,
    dequantize,
    fp8_linear,
    quantize,
    quantize_model,
    quantize_tiles,
    set_compute,
    weight_bytes,
)
from sobre.model import Transformer, init_weights


def test_quantize_round_trip_and_twin():
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))  # ragged 128x128 blocks on both axes
    q, s = quantize(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 2)
    back = dequantize(q, s, (128, 128))
    assert torch.equal(back, reference.fp8_dequant(q, s))
    assert (back - w).norm() / w.norm() < 0.05  # e4m3 keeps ~2 significant digits
    lin = FP8Linear(200, 300, chunk=128)  # three row slices, the last one ragged
    lin.weight.copy_(q)
    lin.scale_inv.copy_(s)
    x = torch.randn(5, 200, generator=torch.Generator().manual_seed(1))
    # (fp32 sums of 200 products of unit scale: the slices' matmul kernels may round ~1e-5 apart)
    torch.testing.assert_close(lin(x), x @ back.T, atol=1e-4, rtol=1e-5)


def test_quantize_model_reports_and_stays_close():
    torch.manual_seed(0)  # (the error moves with the weights: 0.08-0.12 of the logits' norm over 8 seeds)
    model = init_weights(Transformer(preset("debug", dim=256, moe_inter_dim=128, q_lora_rank=128,
                                            kv_lora_rank=128))).eval()
    x = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        ref = model(x)
        before = weight_bytes(model)
        report = quantize_model(model)
        got = model(x)
    assert report and all(0 < e < 0.05 for e in report.values())
    assert "layers.0.attn.wq_a" in report and not any("head" in k or "embed" in k for k in report)
    assert weight_bytes(model) < before
    assert (got - ref).norm() < 0.15 * ref.norm()  # e4m3: 3 mantissa bits, ~3% per weight, a few layers deep


def test_fp8_matmul_against_the_dequantised_twin():
    """fp8_linear quantises the activations too (1 x 128 tiles): its error over the dequantised-weight matmul
    is that of one more e4m3 rounding (~2-3%), on ragged shapes as well."""
    g = torch.Generator().manual_seed(0)
    for N, K, M in ((256, 384, 7), (200, 130, 5)):
        w, x = torch.randn(N, K, generator=g) * 0.05, torch.randn(3, M, K, generator=g)
        q, s = quantize(w)
        ref = x @ dequantize(q, s, (128, 128)).T
        got = fp8_linear(x, q, s, (128, 128))
        assert got.shape == ref.shape and got.dtype == x.dtype
        assert (got - ref).norm() / ref.norm() < 0.04
        xb = x.bfloat16()
        assert (fp8_linear(xb, q, s, (128, 128)).float() - ref).norm() / ref.norm() < 0.05
    xq, xs = quantize_tiles(torch.tensor([[1.0, -2.0, 448.0]]), tile=2)
    assert xs.shape == (1, 2) and xq.float()[0, 2] == 448.0  # each tile's absmax maps onto e4m3's 448


def test_fp8_compute_switch_on_a_model():
    model = init_weights(Transformer(preset("debug", dim=256, moe_inter_dim=128, q_lora_rank=128,
                                            kv_lora_rank=128))).eval()
    x = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    quantize_model(model)
    with torch.no_grad():
        twin = set_compute(model, "dequant")(x)
        fp8 = set_compute(model, "scaled_mm")(x)
    assert not torch.equal(fp8, twin) and (fp8 - twin).norm() < 0.15 * twin.norm()  # one more e4m3 rounding per layer
    try:
        set_compute(model, "fast")
    except ValueError as e:
        assert "auto, dequant or scaled_mm" in str(e)
    else:
        raise AssertionError("an unknown compute mode must raise")


def fp8_experts(c, g: torch.Generator):
    """Random moe.Experts of config c, the same quantised as FP8Experts, and a routed batch of 10 tokens:
    (experts, fp8 experts, x [10, D], routing weights [10, 2], expert ids [10, 2])."""
    from sobre.fp8 import FP8Experts
    from sobre.moe import Experts
    ref = Experts(c)
    fp8 = FP8Experts(c.n_routed_experts, c.moe_inter_dim, c.dim)
    with torch.no_grad():
        for k in ("w1", "w2", "w3"):
            getattr(ref, k).copy_(torch.randn(getattr(ref, k).shape, generator=g) * 0.05)
            for e in range(c.n_routed_experts):
                q, s = quantize(getattr(ref, k)[e])
                getattr(fp8, k)[e] = q
                getattr(fp8, k + "_scale_inv")[e] = s
    x = torch.randn(10, c.dim, generator=g)
    idx = torch.stack([torch.randperm(c.n_routed_experts, generator=g)[:2] for _ in range(10)])
    return ref, fp8, x, torch.rand(10, 2, generator=g), idx


def test_fp8_experts_matmul_against_the_dequantised_twin():
    ref, fp8, x, w, idx = fp8_experts(preset("debug", dim=256, moe_inter_dim=128), torch.Generator().manual_seed(0))
    with torch.no_grad():
        twin = set_compute(fp8, "dequant")(x, w, idx)
        got = set_compute(fp8, "scaled_mm")(x, w, idx)
        exact = ref(x, w, idx)
    assert (twin - exact).norm() < 0.05 * exact.norm()
    assert not torch.equal(got, twin) and (got - twin).norm() < 0.06 * twin.norm()


def test_ue8m0_exponent_bytes():
    """FP4 scales kept packed as ue8m0 exponent bytes: from e8m0 bits, uint8 as is, float powers of two by log2;
    a scale that is no power of two is an error (it would not round-trip)."""
    from sobre.fp8 import dequantize_fp4, ue8m0
    s = torch.tensor([[0.25, 1.0, 8.0]])
    assert ue8m0(s).tolist() == [[125, 127, 130]]
    assert torch.equal(ue8m0(s.to(torch.float8_e8m0fnu)), ue8m0(s))
    assert torch.equal(ue8m0(ue8m0(s)), ue8m0(s))
    w = torch.randint(-128, 128, (1, 48), dtype=torch.int8)
    assert torch.equal(dequantize_fp4(w, ue8m0(s)), dequantize_fp4(w, s))
    with pytest.raises(ValueError, match="powers of two"):
        ue8m0(torch.tensor([[0.3]]))
