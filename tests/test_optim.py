"""Muon: equal to torch.optim.Muon on matrices, per-matrix on stacked experts; Muon + AdamW training resumes."""

import json

import pytest
import torch

from sobre.optim import Muon, orthogonalize


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
def test_muon_matches_torch_on_matrices(adjust):
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(24, 40, generator=g), torch.randn(48, 16, generator=g)]
    ours = [w.clone().requires_grad_() for w in ws]
    ref = [w.clone().requires_grad_() for w in ws]
    o1 = Muon(ours, lr=0.02, weight_decay=0.1, adjust_lr=adjust, ns_dtype=torch.bfloat16)  # as torch computes it
    o2 = torch.optim.Muon(ref, lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust)
    for _ in range(3):
        grads = [torch.randn(w.shape, generator=g) for w in ws]
        for p, q, gr in zip(ours, ref, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        o1.step()
        o2.step()
    for p, q, w in zip(ours, ref, ws):
        assert (p - q).abs().max() <= 2e-3 * (q - w).abs().max()  # bf16 Newton-Schulz: rounding only


def test_stacked_experts_are_orthogonalised_one_by_one():
    x = torch.randn(3, 16, 24, generator=torch.Generator().manual_seed(1))
    together = orthogonalize(x, dtype=torch.bfloat16).float()
    for e in range(3):
        torch.testing.assert_close(together[e], orthogonalize(x[e], dtype=torch.bfloat16).float(), atol=2e-2, rtol=0)
    torch.testing.assert_close(orthogonalize(x), together, atol=2e-2, rtol=0)  # CPU default: fp32, same up to bf16
    s = torch.linalg.svdvals(together[0])
    assert 0.3 < s.min() and s.max() < 1.6  # near-orthogonal rows


def test_pretrain_with_muon_resumes_exactly(tmp_path):
    from sobre.train import TrainArgs, pretrain
    args = dict(steps=8, save_every=4, eval_every=8, sample_every=8, data_bytes=200_000, batch_size=2, seq_len=64,
                optimizer="muon", lr=3e-3, warmup=2)
    run = pretrain(TrainArgs(out=str(tmp_path / "run"), **args))
    before = [json.loads(x)["loss"] for x in open(run / "metrics.jsonl")]
    (run / "checkpoints" / "ckpt-0000008.pt").unlink()  # as if killed after step 4's checkpoint
    pretrain(TrainArgs(out=str(run), **args, resume=True))
    after = [json.loads(x)["loss"] for x in open(run / "metrics.jsonl")]
    assert after == before and before[-1] < before[0]
    with pytest.raises(ValueError, match="optimizer"):
        TrainArgs(optimizer="sgd").validate()
