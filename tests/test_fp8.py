"""FP8 block quantisation: round trip error, FP8Linear == dequantised linear, quantize_model's report."""

import torch

from sobre import reference
from sobre.config import preset
from sobre.fp8 import FP8Linear, dequantize, quantize, quantize_model, weight_bytes
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
    x = torch.randn(5, 200)
    torch.testing.assert_close(lin(x), x @ back.T, atol=1e-5, rtol=1e-5)


def test_quantize_model_reports_and_stays_close():
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
