"""The CUDA paths, on a GPU: the CPU suite's ground truths again, on the device. Skipped where torch sees no GPU
(CI has none); run on a GPU machine with `pytest tests/test_cuda.py`, or with SOBRE_TEST_DEVICE=cpu to try the
same checks on the CPU. fp32 runs with TF32 off (as transformers' own parity tests do on GPUs)."""

import json
import os
import shutil

import pytest
import torch

import sobre
from sobre import fp8, lora
from sobre.config import Config
from sobre.engine import Engine
from sobre.int8 import quantize_int8
from sobre.v4 import V4Transformer

from conftest import SPARSE_MODELS, V3, hf_checkpoint, random_model, randomize, run_requests, v4_model
from test_engine import DENSE, PROMPTS, hf_greedy
from test_fp8 import fp8_experts
from test_lora import randomize_adapters
from test_parity import CASES, assert_close, tokens

DEV = torch.device(os.environ.get("SOBRE_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEV.type == "cuda" and not torch.cuda.is_available(), reason="torch sees no GPU")


@pytest.fixture(autouse=True)
def full_fp32():
    if DEV.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def hf_on_device(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(DEV).eval()


@pytest.mark.parametrize("case", ["v3-qlora", "v3-no-qlora", "v3-yarn", "v32-dsa-top16", "v2-softmax-greedy",
                                  "qwen2-tied", "qwen3-head-dim"])
def test_logits_match_transformers(tmp_path, case):
    model_type, kw = CASES[case]
    path = hf_checkpoint(tmp_path / case, model_type, **kw)
    x = tokens().to(DEV)
    model = sobre.load(path, device=DEV)
    assert next(model.parameters()).device.type == DEV.type
    with torch.no_grad():
        ref = hf_on_device(path)(x).logits
        assert_close(model(x), ref)
        if model.config.is_mla:
            model.config.attn_impl = "absorb"
            assert_close(model(x), ref)


def test_bf16_as_close_to_fp32_as_transformers_bf16(tmp_path):
    """As test_parity.test_bf16_parity: sobre's bf16 logits as close to the fp32 ones as transformers' bf16."""
    path = hf_checkpoint(tmp_path / "m", "deepseek_v3", dtype=torch.bfloat16, **V3)
    x = tokens().to(DEV)
    with torch.no_grad():
        exact = hf_on_device(path)(x).logits.float()
        ref = hf_on_device(path, torch.bfloat16)(x).logits.float()
        ours = sobre.load(path, device=DEV)(x)
    assert ours.dtype == torch.bfloat16
    ours_err, ref_err = (ours.float() - exact).abs(), (ref - exact).abs()
    assert ours_err.median() <= 1.2 * ref_err.median(), (ours_err.median(), ref_err.median())
    assert ours_err.amax(-1).median() <= 1.2 * ref_err.amax(-1).median()


@pytest.mark.parametrize("model_type,kw", [("deepseek_v3", dict(V3, num_nextn_predict_layers=0)),
                                           ("qwen2", dict(DENSE, tie_word_embeddings=True))])
def test_engine_greedy_equals_transformers(tmp_path, model_type, kw):
    path = hf_checkpoint(tmp_path / model_type, model_type, **kw)
    want = hf_greedy(path, PROMPTS, 12, DEV)
    for kw_ in ({}, dict(prefill_chunk=4), dict(prefix_cache=True, block=8)):
        eng = Engine.from_pretrained(path, dtype=torch.float32, device=DEV, **kw_)
        assert eng.device.type == DEV.type
        assert eng.generate(PROMPTS, max_new_tokens=12) == want, kw_


def test_speculative_and_seeded_sampling():
    """MTP drafting: greedy equals plain greedy; a seeded sample is the same in every batch, drafted or not."""
    model = random_model(sobre.preset("debug", n_mtp_layers=1)).to(DEV)
    plain, spec = Engine(model), Engine(model, speculative=True, min_acceptance=0)
    assert spec.generate(PROMPTS, max_new_tokens=16) == plain.generate(PROMPTS, max_new_tokens=16)
    assert spec.spec_stats["drafted"] > 0
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    alone = plain.generate(PROMPTS[:1], **kw)
    assert plain.generate(PROMPTS, **kw)[:1] == alone == plain.generate(PROMPTS[:1], **kw)
    assert [s.out for s in run_requests(plain, PROMPTS, **kw)][0] == alone[0]


@pytest.mark.parametrize("kind", sorted(SPARSE_MODELS))
def test_sparse_attention_on_the_device_equals_the_cpu(kind):
    """NSA / DSA: a prefill's logits and the engine's greedy tokens as on the CPU (the reference twins' tests)."""
    model = random_model(sobre.preset("debug", **SPARSE_MODELS[kind]))
    x = tokens(vocab=model.config.vocab_size, T=48)
    with torch.no_grad():
        cpu = model(x)
        on = model.to(DEV)(x.to(DEV)).cpu()
    assert_close(on, cpu)
    got = Engine(model).generate(PROMPTS, max_new_tokens=10)
    assert got == Engine(model.cpu()).generate(PROMPTS, max_new_tokens=10)


def test_v4_on_the_device_equals_the_cpu():
    from test_v4 import HF
    torch.manual_seed(0)
    model = V4Transformer(Config.from_hf(dict(HF, model_type="deepseek_v4"))).eval()
    randomize(model, std=0.05)
    x = torch.randint(0, 128, (2, 37), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cpu = model(x)
        on = model.to(DEV)(x.to(DEV)).cpu()
    assert_close(on, cpu)
    assert Engine(model).generate(PROMPTS, max_new_tokens=8) == Engine(model.cpu()).generate(PROMPTS,
                                                                                             max_new_tokens=8)


@pytest.mark.parametrize("kind", ["nsa", "dsa", "deepseek_v4"])
def test_packed_rows_of_sparse_attention_on_the_device(kind):
    """SFT's packed rows (each document a row of its own for NSA's and V4's pooled blocks, DSA under the mask):
    the hidden states and the loss as on the CPU."""
    from test_sft import sparse_model

    from sobre.sft import Packed, pack, sft_loss
    model = sparse_model(kind).eval()
    g = torch.Generator().manual_seed(0)
    docs = [(torch.randint(2, model.config.vocab_size, (n,), generator=g).tolist(), [True] * n) for n in (38, 30, 21)]
    X, Y, D, _ = pack(docs, seq_len=60, pad_id=0)  # (two rows)
    with torch.no_grad():
        cpu, loss = model.hidden(X, cache=Packed(D)), sft_loss(model, X, Y, D)
        model.to(DEV)
        on = model.hidden(X.to(DEV), cache=Packed(D.to(DEV))).cpu()
        assert_close(on, cpu)
        assert abs(sft_loss(model, X.to(DEV), Y.to(DEV), D.to(DEV)).item() - loss.item()) < 1e-4


def test_release_whole_on_the_device():
    """GRPO --fsdp's whole copy freed through the update and refilled after it: device memory back, the weights
    those of the model."""
    import copy

    from sobre.parallel import copy_whole, release_whole
    model = random_model().to(DEV)
    policy = copy.deepcopy(model)
    release_whole(policy, model)
    assert all(p.untyped_storage().nbytes() == 0 for p in policy.parameters())
    copy_whole(policy, model)
    assert all(torch.equal(p, q) for p, q in zip(policy.parameters(), model.parameters()))


def test_fp8_weights_on_the_tensor_cores():
    """FP8Linear / FP8Experts pick torch._scaled_mm on sm89+ GPUs (auto): close to their dequantised twin, and a
    quantised model decodes in the engine."""
    model = random_model(sobre.preset("debug", dim=256, moe_inter_dim=128, q_lora_rank=128, kv_lora_rank=128),
                         std=0.05).to(DEV)
    fp8.quantize_model(model)
    assert any(isinstance(m, fp8.FP8Linear) for m in model.modules())
    x = tokens(vocab=model.config.vocab_size, T=24).to(DEV)
    with torch.no_grad():
        twin = fp8.set_compute(model, "dequant")(x)
        auto = fp8.set_compute(model, "auto")(x)
    if fp8.tensor_cores(DEV):
        assert not torch.equal(auto, twin)  # (computed in FP8: one more e4m3 rounding per layer)
    assert (auto - twin).norm() < 0.15 * twin.norm()
    got = Engine(model).generate(PROMPTS, max_new_tokens=6)
    assert [len(g) for g in got] == [6] * len(PROMPTS)
    _, experts, x, w, idx = fp8_experts(model.config, torch.Generator().manual_seed(0))
    experts, x, w, idx = experts.to(DEV), x.to(DEV), w.to(DEV), idx.to(DEV)
    with torch.no_grad():
        twin, auto = (fp8.set_compute(experts, mode)(x, w, idx) for mode in ("dequant", "auto"))
    if fp8.tensor_cores(DEV):
        assert not torch.equal(auto, twin)
    assert (auto - twin).norm() < 0.06 * twin.norm()


def test_int8_weights_equal_their_dequantised_twin():
    """int8 weights on a GPU: int8_mm's path there (on the CPU: the kernel, within bf16's rounding)."""
    from test_int8 import dequantised_copy
    model = random_model(std=0.05)
    ref = dequantised_copy(model).to(DEV)
    quantize_int8(model)
    x = tokens(vocab=model.config.vocab_size).to(DEV)
    with torch.no_grad():
        want, got = ref(x), model.to(DEV)(x)
    assert (got - want).abs().max() <= (3e-2 if DEV.type == "cpu" else 1e-4) * want.abs().max()
    assert len(Engine(model).generate(PROMPTS, max_new_tokens=4)[0]) == 4


def test_multi_lora_on_the_device(tmp_path):
    base = sobre.save(random_model(), tmp_path / "base")
    m = sobre.load(base)
    lora.add_lora(m, rank=4)
    randomize_adapters(m, std=1.0)
    lora.save_adapter(m, tmp_path / "ad", str(base))
    sobre.save(lora.merge(m), tmp_path / "merged")
    want = Engine(sobre.load(tmp_path / "merged", device=DEV)).generate(PROMPTS, max_new_tokens=8)
    eng = Engine(sobre.load(base, device=DEV), loras={"ad": tmp_path / "ad"})
    assert eng.generate(PROMPTS, max_new_tokens=8, lora="ad") == want


def test_training_and_exact_resume(tmp_path):
    """`sobre pretrain` on the device under bf16 autocast: the loss falls, and a run resumed from its step-4
    checkpoint logs the steps after it as the uninterrupted run did (to 1e-3: CUDA's index_add_ / scatter_add_ add
    with atomics, in no fixed order, so bitwise equality is not asked of the GPU)."""
    from sobre.train import TrainArgs, pretrain
    a = TrainArgs(preset="debug", out=str(tmp_path / "full"), steps=8, save_every=4, eval_every=1000,
                  sample_every=1000, data_bytes=200_000, bf16=True, device=str(DEV))
    pretrain(a)
    run = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", run, ignore=shutil.ignore_patterns("ckpt-0000008.pt"))
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(lines[:4]))
    pretrain(TrainArgs(**{**a.__dict__, "out": str(run), "resume": True}))
    full, resumed = ([json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()]
                     for r in (tmp_path / "full", run))
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert full[-1]["loss"] < full[0]["loss"]
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in resumed] == pytest.approx([r[key] for r in full], rel=1e-3), key


def test_compiled_engine_decodes_like_eager():
    """compile=True decodes the eager engine's tokens, batches of one and several, across block-table widths
    (block 8: prompts up to 11 tokens + 30 new)."""
    model = random_model(sobre.preset("debug", n_routed_experts=4, n_activated_experts=2)).to(DEV)
    eager = Engine(model, block=8).generate(PROMPTS, max_new_tokens=30)
    eng = Engine(model, block=8, compile=True)
    assert eng.generate(PROMPTS[:1], max_new_tokens=30) == eager[:1]
    assert eng.generate(PROMPTS[:2], max_new_tokens=30) == eager[:2]


def test_grpo_with_bf16_rollouts(tmp_path):
    """`sobre grpo --bf16 --rollout-bf16` (DAPO) on the device: rollouts on bf16 copies of the weights, the update
    under autocast; the steps log finite losses and the exported model holds the trained fp32 weights."""
    import math

    from sobre.grpo import GRPOArgs, grpo
    from sobre.tasks import get_task
    task = get_task("arithmetic")
    rows = [{"prompt": p.prompt, "answer": p.answer} for p in task.problems("train", 20) + task.problems("test", 2)]
    (tmp_path / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = grpo(GRPOArgs(out=str(tmp_path / "run"), preset="debug", task=str(tmp_path / "task.jsonl"),
                        reward="test_grpo:spread_reward", steps=2, prompts=2, group=4, max_new_tokens=8,
                        eval_every=1000, eval_problems=2, loss="dapo", bf16=True, rollout_bf16=True, lr=1e-2,
                        device=str(DEV)))
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2] and all(math.isfinite(r["loss"]) for r in logged)
    assert sobre.load(run / "model").layers[0].attn.wkv_a.weight.dtype == torch.float32


@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v4"])
def test_kept_routing_on_the_device(arch):
    """Engine(keep_routing=True, keep_sampling_mask=True) on the device: each finished sequence's kept routing is a
    plain forward's on the device (a near tie of router scores aside), and the floors leave its top-k 5 tokens."""
    from test_grpo import moe_choices
    torch.manual_seed(0)
    model = (random_model() if arch == "deepseek_v3" else v4_model()).to(DEV)
    eng = Engine(model, keep_routing=True, keep_sampling_mask=True, keep_logits=True)
    rids = [eng.add_request(p, temperature=1.0, top_k=5, max_new_tokens=6) for p in PROMPTS for _ in range(2)]
    done = {}
    while eng.has_work():
        eng.step()
        done |= eng.collect()
    flips = 0
    for r in rids:
        s = done[r]
        want, scores = moe_choices(model, s.prompt + s.out[:-1])
        same = (s.routes.long().sort(-1).values == want.sort(-1).values).all(-1)
        gap = (scores.gather(2, want).sum(-1) - scores.gather(2, s.routes.long()).sum(-1)).abs()
        assert bool((same | (gap < 1e-3)).all())
        flips += int((~same).sum())
        z = torch.stack(s.logits).float()
        assert ((z >= torch.tensor(s.floors, device=z.device)[:, None]).sum(-1) == 5).all()
    assert flips <= 4
