"""Distillation: the top-k forward-KL term, a dense student trained from a teacher run, tokenizer mismatch."""

import json

import pytest
import torch
import torch.nn.functional as F

import sobre
from sobre.data import builtin_docs
from sobre.distill import DistillArgs, distill, kd_loss
from sobre.tasks import TASKS
from sobre.tokenizer import load_tokenizer, train_tokenizer

from conftest import random_model


def test_kd_loss_is_forward_kl_over_the_teachers_top_k():
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 3, 10, generator=g), torch.randn(2, 3, 10, generator=g)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    vals, ids = t.topk(10, -1)  # k = V: the exact KL
    p, logq = F.softmax(t[mask], -1), F.log_softmax(s[mask], -1)
    exact = (p * (p.log() - logq)).sum(-1).mean()
    assert kd_loss(logq, vals[mask], ids[mask]).item() == pytest.approx(exact.item(), rel=1e-5)
    same = kd_loss(F.log_softmax(t[mask], -1), vals[mask], ids[mask])  # student == teacher
    assert same.item() == pytest.approx(0, abs=1e-6)
    v3, i3 = t.topk(3, -1)  # k < V: the teacher renormalised over its top 3
    p3 = F.softmax(v3[mask], -1)
    want = (p3 * (p3.log() - F.log_softmax(s[mask], -1).gather(-1, i3[mask]))).sum(-1).mean()
    assert kd_loss(logq, v3[mask], i3[mask]).item() == pytest.approx(want.item(), rel=1e-5)
    p2 = F.softmax(v3[mask] / 2, -1)  # temperature 2: both distributions softened, the KL scaled by tau^2
    want2 = 4 * (p2 * (p2.log() - F.log_softmax(s[mask] / 2, -1).gather(-1, i3[mask]))).sum(-1).mean()
    got2 = kd_loss(F.log_softmax(s[mask] / 2, -1), v3[mask], i3[mask], tau=2.0)
    assert got2.item() == pytest.approx(want2.item(), rel=1e-5)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    tok = train_tokenizer(builtin_docs(300_000), 512, root / "tok")
    cfg = sobre.preset("debug", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    sobre.save(random_model(cfg), root / "model", tokenizer_dir=root / "tok")
    traces = root / "traces.jsonl"  # stands in for a strong teacher's traces: a random one solves nothing
    traces.write_text("".join(json.dumps({"messages": p.messages()}) + "\n"
                              for p in TASKS["arithmetic"].problems("train", 60)))
    return root


def test_distil_into_a_dense_student(teacher, tmp_path):
    out = tmp_path / "student"
    distill(DistillArgs(out=str(out), teacher=str(teacher / "model"), preset="debug", task=("arithmetic",),
                        examples=4, samples=2, max_new_tokens=16, data=(str(teacher / "traces.jsonl"),), steps=12,
                        batch_size=4, seq_len=192, save_every=6, eval_every=6, lr=3e-3))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and rows[-1]["loss"] < rows[0]["loss"]
    distill(DistillArgs(out=str(out), teacher=str(teacher / "model"), preset="debug", task=("arithmetic",),  # resumed
                        examples=4, samples=2, max_new_tokens=16, data=(str(teacher / "traces.jsonl"),), steps=14,
                        batch_size=4, seq_len=192, save_every=6, eval_every=6, lr=3e-3, resume=True, bf16=True))
    bf16 = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][12:]  # under bf16 autocast
    assert [r["step"] for r in bf16] == [13, 14] and all(0 < r["loss"] < rows[0]["loss"] for r in bf16)
    assert json.loads((out / "model" / "config.json").read_text())["model_type"] == "qwen2"
    assert (out / "traces-arithmetic.jsonl").exists()  # the teacher's (here: empty) verified set
    student = sobre.load(out / "model")
    assert student.config.arch == "qwen2" and not student.config.n_routed_experts
    assert load_tokenizer(out / "model").tok.get_vocab() == load_tokenizer(teacher / "tok").tok.get_vocab()


def test_tokenizer_mismatch_is_a_clear_error(teacher, tmp_path):
    other = tmp_path / "other"
    tok = train_tokenizer(builtin_docs(100_000, seed=1), 300, other)
    cfg = sobre.preset("debug", arch="qwen2", vocab_size=tok.vocab_size)
    sobre.save(random_model(cfg), other, tokenizer_dir=other)
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        distill(DistillArgs(out=str(tmp_path / "s"), teacher=str(teacher / "model"), init=str(other)))
    with pytest.raises(ValueError, match="--teacher is required"):
        distill(DistillArgs(out=str(tmp_path / "s2")))
