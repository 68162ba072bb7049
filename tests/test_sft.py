"""SFT: loss only on assistant tokens, packed rows that equal separate forwards, the `sobre sft` run."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from sobre.data import builtin_docs
from sobre.sft import IGNORE, Packed, SFTArgs, encode_turns, pack, read_examples, sft, sft_loss, task_examples
from sobre.tasks import TASKS
from sobre.tokenizer import load_tokenizer, train_tokenizer

from conftest import crash_then_resume, random_model, untimed_rows


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(builtin_docs(300_000), 512, out)
    return load_tokenizer(out)


def test_loss_mask_covers_the_assistant_turns_only(tok):
    p = TASKS["arithmetic"].problems("train", 1)[0]
    (ids, mask), = encode_turns(tok, p.messages())
    prompt = tok.decode([t for t, m in zip(ids, mask) if not m])
    target = tok.decode([t for t, m in zip(ids, mask) if m])
    assert prompt.endswith("<｜Assistant｜><think>\n") and p.prompt in prompt and p.answer not in prompt.split("?")[-1]
    assert target == f"{p.reasoning}\n</think>\n\nAnswer: {p.answer}<｜end▁of▁sentence｜>"
    api_style = [{"role": "user", "content": p.prompt},
                 {"role": "assistant", "reasoning_content": p.reasoning, "content": f"Answer: {p.answer}"}]
    assert encode_turns(tok, api_style) == [(ids, mask)]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"}]
    turns = encode_turns(tok, chat)
    assert len(turns) == 2  # one example per assistant turn
    assert tok.decode([t for t, m in zip(*turns[0]) if m]) == "</think>\n\nhello<｜end▁of▁sentence｜>"
    second = tok.decode(turns[1][0])
    assert "hello" in second and second.endswith("add\n</think>\n\n4<｜end▁of▁sentence｜>")


def test_direct_share_answers_without_worked_steps(tok):
    """--direct: a seeded share of the task traces has an empty <think> block (DeepSeek's non-thinking answer)."""
    targets = [tok.decode([t for t, m in zip(ids, mask) if m]) for ids, mask in
               task_examples(tok, "arithmetic:1", 200, seed=3, direct=0.6)]
    direct = [t for t in targets if t.startswith("</think>")]
    assert 0.5 < len(direct) / len(targets) < 0.7
    assert all(t.startswith("</think>\n\nAnswer: ") and t.count("\n") == 2 for t in direct)
    assert all("s: " in t.split("</think>")[0] for t in targets if t not in direct)  # the worked columns
    assert targets == [tok.decode([t for t, m in zip(ids, mask) if m]) for ids, mask in
                       task_examples(tok, "arithmetic:1", 200, seed=3, direct=0.6)]  # reproducible
    assert not any(t.startswith("</think>") for t in [tok.decode([t for t, m in zip(*ex) if m]) for ex in
                                                      task_examples(tok, "arithmetic:1", 50, seed=3)])
    with pytest.raises(ValueError, match=r"--direct must be in \[0, 1\], got 1.5"):
        sft(SFTArgs(task=("arithmetic:1",), direct=1.5))


def test_packed_rows_equal_separate_forwards(tok):
    model = random_model().eval()
    docs = [([3, 4, 5, 6, 7], [False, False, True, True, True]), ([8, 9, 10, 11], [False, True, True, True])]
    X, Y, D, dropped = pack(docs, seq_len=12, pad_id=0)
    assert X.shape == (1, 12) and dropped == 0
    assert Y[0].tolist()[:7] == [IGNORE, 5, 6, 7, 9, 10, 11] and set(Y[0, 7:].tolist()) == {IGNORE}
    assert Packed(D).positions(X)[0].tolist()[:7] == [0, 1, 2, 3, 0, 1, 2]
    with torch.no_grad():
        packed = model(X, cache=Packed(D))[0]
        a, b = model(torch.tensor([[3, 4, 5, 6]]))[0], model(torch.tensor([[8, 9, 10]]))[0]
    assert torch.allclose(packed[:4], a, atol=1e-5) and torch.allclose(packed[4:7], b, atol=1e-5)
    # the loss computes the head at target positions only: the same value and gradients as the full logits
    loss = sft_loss(model, X, Y, D)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    full = F.cross_entropy(model(X, cache=Packed(D)).flatten(0, 1), Y.flatten(), ignore_index=IGNORE)
    full.backward()
    assert torch.allclose(loss, full, atol=1e-6)
    assert all(torch.allclose(g, p.grad, atol=1e-6) for g, p in zip(grads, [p for p in model.parameters()
                                                                           if p.grad is not None]))
    X, *_ = pack(docs, seq_len=12, pad_id=0, packing=False)
    assert X.shape[0] == 2
    with pytest.raises(ValueError, match="no example fits"):
        pack(docs, seq_len=2, pad_id=0)


def test_sft_data_errors(tok, tmp_path):
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match="chat.jsonl:1: no assistant turn"):
        read_examples(f, tok)
    f.write_text("not json\n")
    with pytest.raises(ValueError, match="chat.jsonl:1"):
        read_examples(f, tok)
    f.write_text(json.dumps({"prompt": "2+2?", "completion": "4"}) + "\n")
    assert len(read_examples(f, tok)) == 1


def test_sft_run_learns_the_format_and_resumes(tmp_path):
    out = tmp_path / "sft"
    cmd = [sys.executable, "-m", "sobre", "sft", "--preset", "debug", "--task", "arithmetic", "--examples", "200",
           "--out", str(out), "--batch-size", "8", "--seq-len", "192", "--save-every", "10", "--eval-every", "10"]
    r = subprocess.run(cmd + ["--steps", "20"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == list(range(1, 21)) and rows[-1]["loss"] < rows[0]["loss"] - 1
    assert "val_loss" in rows[-1] and (out / "model" / "tokenizer.json").exists()
    r = subprocess.run(cmd + ["--steps", "20"], capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "--resume" in r.stderr
    r = subprocess.run(cmd + ["--steps", "22", "--resume", "--bf16"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr  # the last two steps under bf16 autocast
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 22 and abs(last["loss"] - rows[-1]["loss"]) < 0.5


def test_sft_resumes_exactly_after_a_crash(tmp_path, monkeypatch):
    """A run that dies after its step-2 checkpoint and is resumed logs the same losses for steps 3-4 as one that
    ran through (the shared fit loop: SFT and distillation)."""
    from sobre import sft as S
    args = dict(preset="debug", task=("arithmetic",), examples=60, steps=4, batch_size=4, seq_len=128, save_every=2,
                eval_every=2, seed=3)
    S.sft(SFTArgs(out=str(tmp_path / "whole"), **args))
    ran = crash_then_resume(monkeypatch, S, lambda resume: S.sft(SFTArgs(out=str(tmp_path / "cut"), resume=resume,
                                                                       **args)))
    cut, whole = untimed_rows(tmp_path / "cut" / "metrics.jsonl"), untimed_rows(tmp_path / "whole" / "metrics.jsonl")
    assert ran == [3, 4] and cut == whole and len({r["loss"] for r in whole}) == 4


def sparse_model(kind):
    import sobre

    from conftest import SPARSE_MODELS, v4_model
    return v4_model() if kind == "deepseek_v4" else random_model(sobre.preset("debug", **SPARSE_MODELS[kind]))


@pytest.mark.parametrize("kind", ["nsa", "dsa", "deepseek_v4"])
def test_packed_rows_of_sparse_attention_equal_separate_forwards(kind):
    """Packed rows of models whose attention pools or selects blocks of positions (NSA, DeepSeek-V4's compressed
    attention: each document a row of its own, Packed.split) or picks keys by an indexer (DSA: under the packed
    mask) give each document what it gets alone, and the SFT loss's gradients are those of the documents' losses
    taken alone: documents long enough to complete several of NSA's blocks, V4's windows (8) and pooled entries
    (4 and 8 tokens), padding after them. (NSA crashed here; V4 refused packed rows.)"""
    model = sparse_model(kind).eval()
    g = torch.Generator().manual_seed(0)
    docs = [(torch.randint(2, model.config.vocab_size, (n,), generator=g).tolist(), [False] * 3 + [True] * (n - 3))
            for n in (38, 30, 21)]
    X, Y, D, _ = pack(docs, seq_len=96, pad_id=0)
    assert X.shape == (1, 96) and D[0].tolist().count(-1) == 96 - 37 - 29 - 20
    loss = sft_loss(model, X, Y, D)
    loss.backward()
    got = [p.grad.clone() if p.grad is not None else None for p in model.parameters()]  # (MTP: none)
    model.zero_grad()
    with torch.no_grad():
        h = model.hidden(X, cache=Packed(D))[0]
    at, total = 0, 0
    for ids, _ in docs:
        x = torch.tensor([ids[:-1]])
        with torch.no_grad():
            torch.testing.assert_close(h[at:at + x.shape[1]], model.hidden(x)[0], atol=1e-5, rtol=1e-5)
        logits = model(x)[0]
        total = total + F.cross_entropy(logits[2:], torch.tensor(ids[3:]), reduction="sum")
        at += x.shape[1]
    (total / int((Y != IGNORE).sum())).backward()
    for (name, p), g in zip(model.named_parameters(), got):
        assert (g is None) == (p.grad is None), name
        if g is not None:
            torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_sft_of_a_v4_model(tmp_path, tok):
    """`sobre sft` of a DeepSeek-V4 model on packed rows (and a V4 teacher's logits of them: each conversation's
    own, as with --no-packing). Its aux-loss-free balancing (--bias-update): the learned-routing layer's bias moves
    by the update for every expert over or under the mean load; hash-routed layers have none (V4's MoE layers are
    not sobre.moe.MoE: SFT left them out, silently)."""
    import sobre
    from sobre.distill import teacher_topk
    from sobre.moe import moe_layers

    from conftest import v4_model
    model = v4_model(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    examples = task_examples(tok, "arithmetic", 6)
    X, _, D, _ = pack(examples, 200, tok.pad_id)
    assert D.amax().item() > 0  # (several conversations a row)
    def by_conversation(X, D):  # {a conversation's tokens: the teacher's top-k logits at them}
        top = teacher_topk(model, X, D, 4)[0]
        return {tuple(X[r][D[r] == d].tolist()): top[r][D[r] == d] for r in range(len(X)) for d in
                range(int(D[r].max()) + 1)}

    packed, alone = by_conversation(X, D), by_conversation(*pack(examples, 200, tok.pad_id, packing=False)[::2])
    assert packed.keys() == alone.keys() and len(packed) == 6
    for k in packed:
        torch.testing.assert_close(packed[k], alone[k], atol=1e-5, rtol=1e-5)
    tok.save(tmp_path / "tok")
    sobre.save(model, tmp_path / "v4", tokenizer_dir=tmp_path / "tok")
    sft(SFTArgs(out=str(tmp_path / "run"), init=str(tmp_path / "v4"), task=("arithmetic",), examples=20, steps=1,
                batch_size=2, seq_len=200, bias_update=0.1, eval_every=100))
    trained = sobre.load(tmp_path / "run" / "model")
    before, after = (moe_layers(m.layers) for m in (model, trained))
    assert [m.gate.bias is None for m in after] == [True, True, True, False]
    assert (after[-1].gate.bias - before[-1].gate.bias).abs().min() == pytest.approx(0.1)


def test_push_to_hub_and_the_model_card(tmp_path, monkeypatch):
    """--push-to-hub: the repo is made (or found) before the run trains, a missing token or a bad id refused then
    with a clear error, and the exported model (its card naming the verb, the starting model and the last metrics)
    uploaded at the end, the LoRA adapter into adapter/. The Hub is a stand-in here (tests stay offline)."""
    import huggingface_hub

    calls = []

    class Hub:
        def create_repo(self, repo, private=False, exist_ok=False):
            calls.append(("create", repo, private, exist_ok))
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo}")

        def upload_folder(self, repo_id, folder_path, path_in_repo=None, commit_message=""):
            card = (folder_path / "README.md").read_text() if path_in_repo is None else ""
            calls.append(("upload", repo_id, sorted(p.name for p in folder_path.iterdir()), path_in_repo, card))
            return huggingface_hub.CommitInfo(f"https://huggingface.co/{repo_id}/commit/1", "", "", "1")

    monkeypatch.setattr(huggingface_hub, "HfApi", Hub)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    args = dict(preset="debug", task=("arithmetic",), examples=20, steps=2, batch_size=2, seq_len=192, eval_every=100)
    with pytest.raises(ValueError, match="needs a Hugging Face token"):
        sft(SFTArgs(out=str(tmp_path / "a"), push_to_hub="me/run", **args))
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_x")
    with pytest.raises(ValueError, match="a Hub repo id like 'org/name'"):
        sft(SFTArgs(out=str(tmp_path / "a"), push_to_hub="./run", **args))
    assert not calls and not (tmp_path / "a" / "metrics.jsonl").exists()  # (refused before any training)
    sft(SFTArgs(out=str(tmp_path / "a"), push_to_hub="me/run", hub_private=True, **args))
    assert calls[0] == ("create", "me/run", True, True)
    assert calls[1][:2] == ("upload", "me/run") and {"model.safetensors", "README.md", "manifest.json",
                                                     "tokenizer.json"} <= set(calls[1][2])
    card = calls[1][4]
    assert "`sobre sft` from a freshly initialised model" in card and "| loss |" in card and "| step | 2 |" in card
    calls.clear()
    sft(SFTArgs(out=str(tmp_path / "b"), init=str(tmp_path / "a" / "model"), push_to_hub="me/lora", lora_rank=2,
                **args))
    assert [c[3] for c in calls if c[0] == "upload"] == [None, "adapter"]
    card = calls[1][4]
    assert f"from `{tmp_path / 'a' / 'model'}`" in card and "base_model:" not in card  # (a local folder)
    from sobre.checkpoint import model_card
    assert "\nbase_model: org/name\ntags:" in model_card(random_model(), torch.float32, "org/name")


@pytest.mark.parametrize("kind", ["dsa", "deepseek_v4"])
def test_post_training_makes_no_indexer_kl(kind, tmp_path, tok, monkeypatch):
    """The sparse-attention indexers' KL to the main attention (a product over every visible key) is made in
    training forwards for pretraining's loss; sft and grpo read no such loss and do not make it (they made it and
    dropped it). train.learn_indexers turns it back on."""
    import sobre
    import sobre.sparse
    import sobre.v4
    from sobre.grpo import GRPOArgs, grpo
    from sobre.train import learn_indexers

    from conftest import SPARSE_MODELS, v4_model
    ids = dict(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    model = v4_model(**ids) if kind == "deepseek_v4" else random_model(sobre.preset("debug", **ids,
                                                                                   **SPARSE_MODELS[kind]))
    x = torch.randint(2, tok.vocab_size, (1, 80))
    model.train()(x)
    indexed = [m for m in model.layers.modules() if hasattr(m, "learn_indexer") and getattr(m, "kind", "csa") == "csa"]
    #   (DSA's MLA and V4's CSA layers, not the MTP layers, which a plain forward does not run)
    assert indexed and all(m.indexer_loss is not None for m in indexed)
    tok.save(tmp_path / "tok")
    sobre.save(model, tmp_path / "m", tokenizer_dir=tmp_path / "tok")

    def made(*a, **kw):
        raise AssertionError("an indexer KL was made")
    monkeypatch.setattr(sobre.sparse, "indexer_kl", made)
    monkeypatch.setattr(sobre.v4.Attention, "indexer_kl", made)
    learn_indexers(model, False)
    for m in indexed:
        m.indexer_loss = None
    model(x)
    assert all(m.indexer_loss is None for m in indexed)
    sft(SFTArgs(out=str(tmp_path / "sft"), init=str(tmp_path / "m"), task=("arithmetic",), examples=8, steps=1,
                batch_size=2, seq_len=160, eval_every=100))
    grpo(GRPOArgs(out=str(tmp_path / "grpo"), init=str(tmp_path / "m"), task="arithmetic", steps=1, prompts=2,
                  group=2, max_new_tokens=8, eval_every=100, eval_problems=1, micro_batch=4))
    learn_indexers(model, True)
    with pytest.raises(AssertionError, match="an indexer KL was made"):
        model(x)


@pytest.mark.parametrize("kind", ["dsa", "deepseek_v4"])
def test_post_training_keeps_the_indexers_learning_with_indexer_kl(kind, tmp_path, tok):
    """sft / grpo --indexer-kl W: the sparse-attention indexers learn from their KL to the main attention (W x the
    layers' mean in the loss, logged as indexer_kl), as in V3.2's post-training; without it they stay as they
    were. GRPO's update makes the KL in each of its forwards (a micro-batch's prompts and its completions, one of
    each per prompt length) and no other. Refused with --lora-rank (which freezes them) and on a model without
    indexers."""
    import sobre
    from sobre.grpo import GRPOArgs, grpo
    from sobre.objective import token_logprobs
    from sobre.rollout import Rollout
    from sobre.train import indexed_layers
    from sobre.update import indexer_kls

    from conftest import SPARSE_MODELS, v4_model
    ids = dict(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    model = v4_model(**ids) if kind == "deepseek_v4" else random_model(sobre.preset("debug", **ids,
                                                                                   **SPARSE_MODELS[kind]))
    tok.save(tmp_path / "tok")
    sobre.save(model, tmp_path / "m", tokenizer_dir=tmp_path / "tok")
    args = dict(init=str(tmp_path / "m"), task=("arithmetic",), examples=16, steps=3, batch_size=4, seq_len=160,
                eval_every=100, bias_update=0.0)

    def indexers(run):
        sd = sobre.load(tmp_path / run / "model").state_dict()
        return {k: v for k, v in sd.items() if ".indexer." in k and not k.startswith("mtp")}
    before = {k: v for k, v in model.state_dict().items() if ".indexer." in k and not k.startswith("mtp")}
    assert before
    rl = dict(init=str(tmp_path / "m"), task="arithmetic", steps=2, prompts=2, group=2, max_new_tokens=8,
              eval_every=100, eval_problems=1, micro_batch=2, lr=1e-3, router_bias_update=0.0)
    for train, make, kw in ((sft, SFTArgs, args), (grpo, GRPOArgs, rl)):
        name = train.__name__
        train(make(out=str(tmp_path / f"{name}_off"), **kw))
        assert all(torch.equal(v, before[k]) for k, v in indexers(f"{name}_off").items())
        train(make(out=str(tmp_path / f"{name}_on"), indexer_kl=1.0, **kw))
        assert any(not torch.equal(v, before[k]) for k, v in indexers(f"{name}_on").items())
        rows = [json.loads(x) for x in (tmp_path / f"{name}_on" / "metrics.jsonl").read_text().splitlines()]
        assert all(r["indexer_kl"] > 0 for r in rows)
        with pytest.raises(ValueError, match="which --lora-rank freezes"):
            train(make(out=str(tmp_path / "lora"), indexer_kl=1.0, lora_rank=2, **kw))
        with pytest.raises(ValueError, match="has no sparse-attention indexer"):
            train(make(out=str(tmp_path / "v3"), indexer_kl=1.0, **{**kw, "init": ""}, preset="debug"))

    indexed = [m for m in indexed_layers(model) if getattr(m, "kind", "csa") == "csa" and m in set(
        model.layers.modules())]  # (those a forward runs: not the MTP layers; V4's CSA layers)
    batch = [Rollout(p, [5, 6, 7], "", False, 0.0, 0.0, None) for p in ([3] * 20, [3] * 20, [4] * 13)]
    kls = []
    with indexer_kls(indexed_layers(model), kls):
        token_logprobs(model.train(), batch)
    assert len(kls) == 4 * len(indexed) and all(k > 0 for k in kls)  # 2 prompt lengths x (prompts, completions)
    assert all(not m.learn_indexer for m in indexed)
    token_logprobs(model, batch)
    assert len(kls) == 4 * len(indexed)  # (outside: none made)
