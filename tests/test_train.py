"""Training stack: tokenizer, data shards, balancing, MTP loss, exact resume after kill -9, clear errors."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch

import sobre
from sobre import reference
from sobre.data import Batches, build, builtin_docs, file_docs
from sobre.moe import Gate
from sobre.tokenizer import SPECIAL, load_tokenizer, train_tokenizer
from sobre.train import TrainArgs, losses, lr_at, update_router_bias

from conftest import random_model


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(builtin_docs(300_000), 512, out)
    return load_tokenizer(out)


@pytest.mark.parametrize("verb, kw, says", [
    ("pretrain", {"warmup": -1}, "--warmup must be >= 0, got -1"),
    ("pretrain", {"mtp_weight": -1.0}, "--mtp-weight must be >= 0, got -1.0"),
    ("pretrain", {"min_lr_ratio": 1.5}, "--min-lr-ratio must be in [0, 1], got 1.5"),
    ("pretrain", {"fim_rate": 1.5}, "--fim-rate must be in [0, 1], got 1.5"),
    ("pretrain", {"eval_every": 0}, "--eval-every must be positive, got 0"),
    ("sft", {"val_share": 2.0}, "--val-share must be in [0, 1], got 2.0"),
    ("sft", {"steps": 0}, "--steps must be positive, got 0"),
    ("grpo", {"epsilon_low": -0.2}, "--epsilon-low must be in (0, 1], got -0.2"),
    ("grpo", {"beta": -0.1}, "--beta must be >= 0, got -0.1"),
    ("distill", {"kd_temperature": 0.0}, "--kd-temperature must be > 0, got 0.0"),
])
def test_training_flags_out_of_range_are_clear_errors(verb, kw, says):
    """Every training verb checks its numbers before any work: a negative loss weight, clip range, KL coefficient
    or warm-up had trained without a word."""
    from sobre.distill import DistillArgs
    from sobre.grpo import GRPOArgs
    from sobre.sft import SFTArgs
    cls = {"pretrain": TrainArgs, "sft": SFTArgs, "grpo": GRPOArgs, "distill": DistillArgs}[verb]
    with pytest.raises(ValueError, match=re.escape(says)):
        cls(**kw).validate()
    cls().validate()  # the defaults pass

def test_tokenizer_roundtrip_special_tokens_and_transformers(tok, tmp_path):
    text = "def f(x):\n    return x * 12  # héllo wörld 😀\n" + SPECIAL["think"] + "ok" + SPECIAL["end_think"]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    for name, t in SPECIAL.items():
        assert tok.encode(t) == [tok.tok.token_to_id(t)], name  # one id each, never split
    assert "".join(tok.decode([i]) for i in tok.encode("12345")) == "12345" and len(tok.encode("12345")) == 5
    from transformers import AutoTokenizer
    d = tmp_path / "t"
    d.mkdir()
    tok.tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(tok.config, ensure_ascii=False))
    hf = AutoTokenizer.from_pretrained(d)
    assert hf(text, add_special_tokens=False).input_ids == ids
    assert hf(text).input_ids == tok.encode(text, add_special_tokens=True) == ids  # sobre's adds no special token
    from tokenizers import processors  # a checkpoint whose tokenizer.json puts begin-of-sentence first (DeepSeek's)
    with_bos = load_tokenizer(d)  # (a copy: the module's tokenizer stays as it is)
    with_bos.tok.post_processor = processors.TemplateProcessing(single=f"{SPECIAL['bos_token']} $A",
                                                                special_tokens=[(SPECIAL["bos_token"], tok.bos_id)])
    with_bos.tok.save(str(d / "tokenizer.json"))
    assert AutoTokenizer.from_pretrained(d)(text).input_ids == with_bos.encode(text, add_special_tokens=True) \
        == [tok.bos_id] + ids and with_bos.encode(text) == ids
    assert hf.eos_token == SPECIAL["eos_token"] and hf.pad_token == SPECIAL["pad_token"]
    assert hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                  add_generation_prompt=True).endswith("<｜Assistant｜><think>\n")


def test_data_shards_are_deterministic_and_batches_rebuildable(tok, tmp_path):
    docs = list(builtin_docs(200_000, seed=1))
    m1 = build(docs, tok, tmp_path / "a", shard_tokens=20_000)
    m2 = build(iter(docs), tok, tmp_path / "b", shard_tokens=20_000)
    assert m1 == m2 and len(m1["train"]["shards"]) > 2 and m1["val"]["tokens"] > 0
    for s in m1["train"]["shards"]:
        assert (tmp_path / "a" / s["file"]).read_bytes() == (tmp_path / "b" / s["file"]).read_bytes()
    a, b = Batches(tmp_path / "a", "train", 64, 4, seed=3), Batches(tmp_path / "b", "train", 64, 4, seed=3)
    for i in (0, 7, 123, 10_000):  # any step's batch, in any order, from a fresh reader (crosses epochs too)
        xa, ya = a.batch(i)
        xb, yb = b.batch(i)
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(xa[:, 1:], ya[:, :-1])
    assert not torch.equal(a.batch(0)[0], Batches(tmp_path / "a", "train", 64, 4, seed=4).batch(0)[0])
    assert int(a.batch(5)[0].max()) < tok.vocab_size


def test_fill_in_the_middle_documents(tok, tmp_path):
    """fim_rate: that share of the training documents written PSM (begin PREFIX hole SUFFIX end MIDDLE, EOS), cut
    at two points of the text; the rest and the validation split plain; the same draws for the same seed."""
    docs = [f"def f{i}(x):\n    return x * {i} + {i * 7}\n" for i in range(200)]
    begin, hole, end = tok.fim_ids
    plain = build(docs, tok, tmp_path / "plain", val_every=10, fim_rate=0.0)
    assert "fim_docs" not in plain["train"]
    m = build(docs, tok, tmp_path / "all", val_every=0, fim_rate=1.0, seed=3)
    ids = np.fromfile(tmp_path / "all" / m["train"]["shards"][0]["file"], dtype=m["dtype"]).tolist()
    rows = []
    while ids:
        k = ids.index(tok.eos_id)
        rows, ids = rows + [ids[:k]], ids[k + 1:]
    assert len(rows) == len(docs) == m["train"]["fim_docs"]
    cuts = set()
    for doc, row in zip(docs, rows):
        assert row[0] == begin and row.count(hole) == row.count(end) == 1 and row.index(hole) < row.index(end)
        pre, suf, mid = (tok.decode(row[1:row.index(hole)]), tok.decode(row[row.index(hole) + 1:row.index(end)]),
                         tok.decode(row[row.index(end) + 1:]))
        assert pre + mid + suf == doc
        cuts.add((len(pre), len(mid)))
    assert len(cuts) > 150  # (the cuts move from document to document)
    half = [build(docs, tok, tmp_path / f"half{k}", val_every=10, fim_rate=0.5, seed=1) for k in range(2)]
    assert half[0] == half[1] and 60 < half[0]["train"]["fim_docs"] < 120
    val = np.fromfile(tmp_path / "half0" / half[0]["val"]["shards"][0]["file"], dtype=half[0]["dtype"])
    assert half[0]["val"]["docs"] > 10 and begin not in val.tolist()  # (validation: plain text)


def test_user_data_files_and_errors(tok, tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "hello"}) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}) + "\n")
    docs = list(file_docs(tmp_path / "a.jsonl", tok))
    assert docs[0] == "hello" and "<｜User｜>2+2?<｜Assistant｜>4<｜end▁of▁sentence｜>" in docs[1]
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["one", "two"]}), tmp_path / "b.parquet")
    assert list(file_docs(tmp_path / "b.parquet")) == ["one", "two"]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        list(file_docs(tmp_path / "bad.jsonl"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported data file type '.csv'"):
        list(file_docs(tmp_path / "x.csv"))
    with pytest.raises(FileNotFoundError, match="no such data file"):
        list(file_docs(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        Batches(tmp_path, "train", 8, 2)
    build(["tiny"], tok, tmp_path / "small", val_every=0)
    with pytest.raises(ValueError, match="fewer than one batch"):
        Batches(tmp_path / "small", "train", 64, 8)


def test_aux_loss_free_bias_balances_a_skewed_router():
    cfg = sobre.preset("debug", n_routed_experts=8, n_expert_groups=1, n_limited_groups=1, n_activated_experts=2)
    gate = Gate(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(8, cfg.dim, generator=g) * 0.05)
        gate.weight[0] += 0.5  # expert 0 wins for most inputs
    x = torch.randn(2048, cfg.dim, generator=g).abs()

    def imbalance():
        load = torch.bincount(gate(x)[1].flatten(), minlength=8).float()
        return float(load.max() / load.mean()), load

    before, _ = imbalance()
    for _ in range(300):
        with torch.no_grad():
            update_router_bias({type("M", (), {"gate": gate})(): imbalance()[1]}, 1e-3)
    after, _ = imbalance()
    assert before > 3 and after < 1.5, (before, after)


def test_mtp_loss_matches_per_position_reference():
    model = random_model().train()
    x = torch.randint(0, 512, (2, 12))
    y = torch.randint(0, 512, (2, 12))
    out = losses(model, x, y, TrainArgs())
    with torch.no_grad():
        ref = reference.mtp_loss(model.eval(), x, y)
    assert out["mtp"].item() == pytest.approx(ref.item(), rel=1e-5)
    assert out["balance"].item() > 0


def test_lr_schedules():
    a = TrainArgs(steps=100, warmup=10, min_lr_ratio=0.1)
    assert lr_at(a, 0) == pytest.approx(0.1) and lr_at(a, 9) == pytest.approx(1.0)
    assert lr_at(a, 99) == pytest.approx(0.1, abs=1e-3)
    w = TrainArgs(steps=100, warmup=10, schedule="wsd")
    assert lr_at(w, 50) == 1.0 and lr_at(w, 99) < 0.2


def pretrain_cmd(out, *extra):
    return [sys.executable, "-m", "sobre", "pretrain", "--preset", "debug", "--out", str(out), "--steps", "60",
            "--save-every", "10", "--eval-every", "20", "--sample-every", "1000", "--data-bytes", "400000",
            "--threads", "1", *extra]


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_kill_9_is_bitwise_identical(tmp_path):
    subprocess.run(pretrain_cmd(tmp_path / "full"), check=True, capture_output=True)
    run = tmp_path / "killed"
    proc = subprocess.Popen(pretrain_cmd(run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "ckpt-0000020.pt").exists():
        assert time.time() < deadline and proc.poll() is None, "no checkpoint before the run ended"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(metrics(run)) < 60
    subprocess.run(pretrain_cmd(run, "--resume"), check=True, capture_output=True)
    full, resumed = metrics(tmp_path / "full"), metrics(run)
    assert [r["step"] for r in resumed] == list(range(1, 61))
    for key in ("loss", "mtp_loss", "balance_loss", "grad_norm", "lr", "expert_load_max_over_mean", "expert_load"):
        assert [r[key] for r in resumed] == [r[key] for r in full], key
    loads = [sum(layer) for layer in full[0]["expert_load"]]  # tokens x top-k per MoE layer (the MTP one sees fewer)
    assert len(set(loads[:-1])) == 1 and 0 < loads[-1] <= loads[0]
    assert [r.get("val_loss") for r in resumed] == [r.get("val_loss") for r in full]
    assert (run / "loss.png").exists() and (run / "model" / "config.json").exists()
    assert len(list((run / "checkpoints").glob("ckpt-*.pt"))) == 3  # --keep 3


def test_resume_under_bf16_autocast_is_bitwise_identical(tmp_path):
    """The speedrun trains under bf16 autocast where that is faster (--precision auto) and resumes the same way."""
    cmd = pretrain_cmd(tmp_path / "full", "--bf16")
    cmd[cmd.index("60")], cmd[cmd.index("--save-every") + 1] = "8", "4"
    subprocess.run(cmd, check=True, capture_output=True)
    run = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", run, ignore=shutil.ignore_patterns("ckpt-0000008.pt"))
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(lines[:4]))  # as if killed after the step-4 checkpoint
    cmd[cmd.index("--out") + 1] = str(run)
    subprocess.run(cmd + ["--resume"], check=True, capture_output=True)  # steps 5-8 again, from the checkpoint
    full, resumed = metrics(tmp_path / "full"), metrics(run)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for key in ("loss", "mtp_loss", "grad_norm", "expert_load"):
        assert [r[key] for r in resumed] == [r[key] for r in full], key


def test_corrupt_checkpoint_and_reused_folder_are_clear_errors(tmp_path):
    run = tmp_path / "r"
    cmd = pretrain_cmd(run)
    cmd[cmd.index("60")] = "20"
    subprocess.run(cmd, check=True, capture_output=True)
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode != 0 and "pass --resume" in again.stderr
    last = sorted((run / "checkpoints").glob("ckpt-*.pt"))[-1]
    last.write_bytes(last.read_bytes()[:1000])
    out = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    assert out.returncode != 0 and "corrupted or incompatible checkpoint" in out.stderr and last.name in out.stderr
    out = subprocess.run(pretrain_cmd(tmp_path / "x", "--data", str(tmp_path / "nope.txt")), capture_output=True,
                         text=True)
    assert out.returncode != 0 and "no such data file" in out.stderr


def test_pretrain_a_dense_student(tmp_path):
    """`sobre pretrain --arch qwen2`: the preset's dense twin (a distillation student's shape) trains and its
    export loads in transformers with the same logits. (--clip 0: no clipping, as transformers' max_grad_norm 0;
    it had scaled every gradient to zero.)"""
    from sobre.train import pretrain
    transformers = pytest.importorskip("transformers")
    run = pretrain(TrainArgs(out=str(tmp_path / "dense"), steps=10, save_every=10, eval_every=10, sample_every=10,
                             data_bytes=200_000, batch_size=4, seq_len=64, arch="qwen2", lr=3e-3, warmup=2, clip=0.0))
    recs = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.5 and recs[-1]["expert_load"] == []
    assert all(r["grad_norm"] > 0 for r in recs)
    model = sobre.load(run / "model")
    assert model.config.arch == "qwen2"
    ref = transformers.AutoModelForCausalLM.from_pretrained(run / "model").eval()
    x = torch.randint(0, model.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="--arch must be"):
        TrainArgs(arch="gpt2").validate()


def test_bf16_on_a_cpu_that_emulates_it_warns(tmp_path, monkeypatch):
    """--bf16 where the CPU has no bf16 arithmetic of its own runs, but says it will be slow (every trainer opens
    its run folder through open_run)."""
    from sobre import train
    monkeypatch.setattr(train, "native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="without native bf16"):
        train.open_run(train.TrainArgs(out=str(tmp_path / "a"), device="cpu", bf16=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train.open_run(train.TrainArgs(out=str(tmp_path / "b"), device="cpu"))  # fp32: nothing to say
        monkeypatch.setattr(train, "native_bf16", lambda: True)
        train.open_run(train.TrainArgs(out=str(tmp_path / "c"), device="cpu", bf16=True))  # AVX512-BF16 / AMX
