"""LoRA: the adapter layer against its merged weight, PEFT's format both ways (peft's own PeftModel is the
reference), adapters merged at load (int8 too), LoRA fine-tuning (sft, grpo) with exact resume, bad input."""

import json

import pytest
import torch
import torch.nn.functional as F

import sobre
from sobre import lora
from sobre.cli import main
from sobre.data import builtin_docs
from sobre.engine import Engine
from sobre.grpo import GRPOArgs, grpo
from sobre.sft import SFTArgs
from sobre.tokenizer import train_tokenizer

from conftest import V3, crash_then_resume, hf_checkpoint, random_model, untimed_rows

QWEN2 = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
TOKENS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))


def randomize_adapters(model, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.adapters(model).values():
            m.lora_B.copy_(std * torch.randn(m.lora_B.shape, generator=g))


def test_lora_linear_equals_its_merged_weight():
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 40)
    m = lora.LoRALinear(base, rank=4, alpha=8, dropout=0.0)
    x = torch.randn(3, 5, 24)
    assert torch.equal(m(x), base(x))  # B starts at zero: a fresh adapter changes nothing
    with torch.no_grad():
        m.lora_B.normal_()
    want = F.linear(x, base.weight + 2.0 * m.lora_B @ m.lora_A, base.bias)  # scale alpha / r = 2
    torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(F.linear(x, m.weight, m.bias), want, atol=1e-5, rtol=1e-5)
    m.enabled = False
    assert torch.equal(m(x), base(x)) and m.weight is base.weight
    m.enabled = True
    m(x).sum().backward()  # only the adapter learns
    assert base.weight.grad is None and m.lora_A.grad is not None and m.lora_B.grad is not None
    m.dropout = torch.nn.Dropout(0.5)  # on the adapter's input, in training only
    assert not torch.allclose(m(x), want, atol=1e-3)
    torch.testing.assert_close(m.eval()(x), want, atol=1e-5, rtol=1e-5)


MLA = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


@pytest.mark.parametrize("model_type,kw", [("deepseek_v3", V3), ("qwen2", QWEN2)])
def test_peft_reads_our_adapters_and_we_read_peft(tmp_path, model_type, kw):
    """Both directions against peft's PeftModel on transformers' model: our saved adapter loads there with the
    logits of our adapted model; an adapter peft wrote (rsLoRA, an alpha pattern, a subset of modules) merges
    into our model as it loads with the logits peft gives. (DeepSeek MoE models: attention only. peft 0.21 on
    transformers 5 re-targets any gate_proj / up_proj / down_proj of them to the fused routed experts and
    drops the dense and shared-expert MLPs' adapters.)"""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM
    base = hf_checkpoint(tmp_path / "base", model_type, **kw)
    ours = sobre.load(base)
    names = lora.add_lora(ours, rank=4, alpha=12, names=MLA if model_type == "deepseek_v3" else ())
    assert all(n.startswith("layers.") for n in names) and not any(".experts" in n or "gate." in n for n in names)
    assert model_type == "deepseek_v3" or len(names) == 2 * 7
    randomize_adapters(ours)
    with torch.no_grad():
        want = ours(TOKENS)
    lora.save_adapter(ours, tmp_path / "ours", str(base))
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                   tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(TOKENS).logits, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sobre.load(base, adapter=tmp_path / "ours")(TOKENS), want, atol=1e-4, rtol=1e-4)

    some = ["q_a_proj", "kv_b_proj", "o_proj"] if model_type == "deepseek_v3" else ["q_proj", "v_proj", "down_proj"]
    torch.manual_seed(3)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=some, init_lora_weights=False, use_rslora=True,
                     alpha_pattern={some[1]: 2}, rank_pattern={some[2]: 2})
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), cfg).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        want = peft_model(TOKENS).logits
        plain = sobre.load(base)(TOKENS)
        got = sobre.load(base, adapter=tmp_path / "peft")(TOKENS)
    assert (want - plain).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_adapter_merged_before_int8_and_in_the_engine(tmp_path, capsys):
    """load(int8=True, adapter=...) quantises the merged weights: the same codes as the merged model saved and
    loaded in int8. The engine and `sobre generate --adapter` take it too: greedy as the merged model."""
    base = hf_checkpoint(tmp_path / "base", "deepseek_v3", **V3)
    ours = sobre.load(base)
    lora.add_lora(ours, rank=4, names=("q_b_proj", "o_proj", "up_proj"))
    randomize_adapters(ours, seed=1)
    lora.save_adapter(ours, tmp_path / "ad", str(base))
    sobre.save(lora.merge(ours), tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(sobre.load(base, int8=True, adapter=tmp_path / "ad")(TOKENS),
                                   sobre.load(tmp_path / "merged", int8=True)(TOKENS), atol=0, rtol=0)
    got = Engine.from_pretrained(base, dtype=torch.float32, adapter=tmp_path / "ad").generate(
        TOKENS.tolist(), max_new_tokens=6, temperature=0.0)
    want = Engine(sobre.load(tmp_path / "merged")).generate(TOKENS.tolist(), max_new_tokens=6, temperature=0.0)
    assert got == want
    main(["convert", str(base), str(tmp_path / "converted"), "--adapter", str(tmp_path / "ad"), "--dtype", "float32"])
    assert "adapter" in capsys.readouterr().out
    with torch.no_grad():
        torch.testing.assert_close(sobre.load(tmp_path / "converted")(TOKENS), sobre.load(tmp_path / "merged")(TOKENS),
                                   atol=1e-5, rtol=1e-5)
    ids = ",".join(map(str, TOKENS[0].tolist()))
    main(["generate", str(base), "--adapter", str(tmp_path / "ad"), "--ids", ids, "--max-new-tokens", "6",
          "--temperature", "0", "--dtype", "float32"])
    assert [int(t) for t in capsys.readouterr().out.split()] == want[0]


def test_bad_adapters_and_flags(tmp_path):
    base = hf_checkpoint(tmp_path / "base", "qwen2", **QWEN2)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        sobre.load(base, adapter=tmp_path)
    ours = sobre.load(base)
    lora.add_lora(ours, rank=2)
    lora.save_adapter(ours, tmp_path / "ad", str(base))
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    for key, value, match in (("use_dora", True, "use_dora"), ("modules_to_save", ["lm_head"], "modules_to_save"),
                              ("peft_type", "IA3", "only LORA")):
        (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ValueError, match=match):
            sobre.load(base, adapter=tmp_path / "ad")
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(cfg))
    bigger = hf_checkpoint(tmp_path / "bigger", "qwen2", **{**QWEN2, "intermediate_size": 128})
    with pytest.raises(ValueError, match="shape"):  # an adapter for another model
        sobre.load(bigger, adapter=tmp_path / "ad")
    fewer = hf_checkpoint(tmp_path / "fewer", "qwen2", **{**QWEN2, "num_hidden_layers": 1})
    with pytest.raises(ValueError, match="not a linear layer of this qwen2 model with 1 layers"):
        sobre.load(fewer, adapter=tmp_path / "ad")
    with pytest.raises(ValueError, match="unknown module 'lm_head'"):
        SFTArgs(init=str(base), task=("arithmetic",), lora_rank=4, lora_targets=("lm_head",)).validate()
    with pytest.raises(ValueError, match="give --init"):
        SFTArgs(task=("arithmetic",), lora_rank=4).validate()
    with pytest.raises(ValueError, match="no module"):
        lora.add_lora(sobre.load(base), rank=2, names=("kv_b_proj",))  # a Qwen2 has no MLA
    int8_model = sobre.load(base, int8=True)
    lora.add_lora(int8_model, rank=2)
    with pytest.raises(ValueError, match="merges into the full-precision model"):
        lora.merge(int8_model)


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    """A debug model with a tokenizer, as --init."""
    root = tmp_path_factory.mktemp("init")
    tok = train_tokenizer(builtin_docs(300_000), 512, root / "tok")
    cfg = sobre.preset("debug", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    sobre.save(random_model(cfg, std=0.05), root / "model", tokenizer_dir=root / "tok")
    return root / "model"


def test_sft_with_lora_trains_only_the_adapters_and_resumes_exactly(init, tmp_path, monkeypatch, capsys):
    from sobre import sft as S
    args = dict(init=str(init), task=("arithmetic",), examples=60, steps=4, batch_size=4, seq_len=128, save_every=2,
                eval_every=2, seed=3, lr=1e-2, lora_rank=4, lora_targets=("q_a_proj", "kv_b_proj", "o_proj",
                                                                         "gate_proj", "down_proj"))
    S.sft(SFTArgs(out=str(tmp_path / "whole"), **args))
    ran = crash_then_resume(monkeypatch, S, lambda resume: S.sft(SFTArgs(out=str(tmp_path / "cut"), resume=resume,
                                                                       **args)))
    cut, whole = untimed_rows(tmp_path / "cut" / "metrics.jsonl"), untimed_rows(tmp_path / "whole" / "metrics.jsonl")
    assert ran == [3, 4] and cut == whole and whole[-1]["loss"] < whole[0]["loss"]
    other = sobre.save(random_model(sobre.load(init).config, seed=1, std=0.05), tmp_path / "other",
                       tokenizer_dir=init)
    with pytest.raises(ValueError, match="trained on another model"):  # resumed on another --init
        S.sft(SFTArgs(out=str(tmp_path / "whole"), resume=True, **{**args, "init": str(other), "steps": 6}))
    ckpt = torch.load(sorted((tmp_path / "whole" / "checkpoints").glob("*.pt"))[-1], weights_only=True)
    assert ckpt["adapter_only"] and ckpt["model"] and all(".lora_" in k for k in ckpt["model"])
    before, after = sobre.load(init).state_dict(), sobre.load(tmp_path / "whole" / "model").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.split(".")[-2] in ("wq_a", "wkv_b", "wo", "w1", "w2") for k in changed), changed
    assert all(".experts." not in k and "ffn.gate" not in k for k in changed)  # (the routed experts, the router)
    cfg = json.loads((tmp_path / "whole" / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["base_model_name_or_path"] == str(init.resolve())
    with torch.no_grad():  # the adapter on its base gives the exported (merged) model
        torch.testing.assert_close(sobre.load(init, adapter=tmp_path / "whole" / "adapter")(TOKENS),
                                   sobre.load(tmp_path / "whole" / "model")(TOKENS), atol=1e-5, rtol=1e-5)
    capsys.readouterr()
    scores = []
    for path, extra in ((init, ["--adapter", str(tmp_path / "whole" / "adapter")]), (tmp_path / "whole", [])):
        main(["eval", str(path), "--task", "arithmetic", "--n", "3", "--max-new-tokens", "8", "--json", *extra])
        scores.append(capsys.readouterr().out)
    assert scores[0] == scores[1] and "pass@1" in scores[0]


@pytest.mark.parametrize("verb", ["sft", "grpo"])
def test_lora_on_int8_weights(init, tmp_path, verb):
    """--int8 --lora-rank: the frozen model in int8 (its head fp32), adapters trained through it; the adapter
    merges into the full-precision model for run/model; --int8 alone is refused (int8 weights cannot train)."""
    from sobre.int8 import Int8Experts, Int8Linear
    from sobre.sft import sft
    seen = {}
    add = lora.add_lora

    def spy(model, *args):
        add(model, *args)
        seen["int8"] = {n: type(m.base) for n, m in lora.adapters(model).items()}
        seen["experts"] = any(isinstance(m, Int8Experts) for m in model.modules())
        seen["head"] = model.head.weight.dtype
        return list(lora.adapters(model))

    import sobre.grpo as G
    import sobre.sft as S
    module = S if verb == "sft" else G
    orig = module.add_lora
    module.add_lora = spy
    try:
        out = tmp_path / verb
        if verb == "sft":
            sft(SFTArgs(out=str(out), init=str(init), task=("arithmetic",), examples=40, steps=3, batch_size=4,
                        seq_len=128, save_every=3, eval_every=3, lr=1e-2, lora_rank=4, int8=True))
        else:
            grpo(GRPOArgs(out=str(out), init=str(init), task="arithmetic", steps=2, prompts=2, group=2,
                          max_new_tokens=8, lr=1e-2, eval_problems=2, lora_rank=2, int8=True, beta=0.1))
    finally:
        module.add_lora = orig
    assert seen["int8"] and seen["experts"]  # (MLA's wkv_b stays fp32: the absorbed attention reads it whole)
    assert all((t is Int8Linear) != n.endswith("wkv_b") for n, t in seen["int8"].items())
    assert seen["head"] == torch.float32
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 0 for r in rows)  # gradients reach the adapters through the int8 layers
    with torch.no_grad():
        torch.testing.assert_close(sobre.load(init, adapter=out / "adapter")(TOKENS),
                                   sobre.load(out / "model")(TOKENS), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="--int8 needs --lora-rank"):
        SFTArgs(init=str(init), task=("arithmetic",), int8=True).validate()


def test_grpo_with_lora_and_the_adapters_off_as_reference(init, tmp_path, monkeypatch):
    """The KL's reference is the model with its adapters disabled: with adapters that start nonzero the first
    step's KL is > 0 (it is exactly 0 while policy and reference are one model); the run exports an adapter and
    the merged model."""
    from sobre import grpo as G

    def nonzero_adapters(model, *args):
        names = lora.add_lora(model, *args)
        randomize_adapters(model)
        return names

    monkeypatch.setattr(G, "add_lora", nonzero_adapters)
    out = tmp_path / "grpo"
    grpo(GRPOArgs(out=str(out), init=str(init), task="arithmetic", steps=2, prompts=2, group=2, max_new_tokens=8,
                  beta=0.1, lr=1e-2, eval_problems=2, lora_rank=2))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["kl"] > 1e-4
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    with torch.no_grad():
        torch.testing.assert_close(sobre.load(init, adapter=out / "adapter")(TOKENS),
                                   sobre.load(out / "model")(TOKENS), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="router-bias-update"):
        GRPOArgs(init=str(init), lora_rank=2, router_bias_update=1e-3).validate()


@pytest.mark.parametrize("model_type,kw", [("deepseek_v3", V3), ("qwen2", QWEN2)])
def test_engine_serves_several_adapters_at_once(tmp_path, model_type, kw):
    """Engine(loras={name: folder}): each request runs with its own adapter or the base model, side by side in one
    batch (vLLM's multi-LoRA), with the greedy tokens of an engine on that adapter merged: prefill, decode, chunked
    prefill, speculative MTP drafting (V3: absorbed MLA adds kv_b_proj's adapter terms through the rank); the prefix
    cache never hands one adapter's blocks to another; unknown names are refused."""
    base = hf_checkpoint(tmp_path / "base", model_type, **kw) if model_type == "qwen2" else \
        sobre.save(random_model(sobre.preset("debug", n_mtp_layers=1)), tmp_path / "base")  # (with its MTP layer)
    folders = {}
    for i, names in enumerate([(), ("q_proj", "q_b_proj", "o_proj", "down_proj")]):  # all-linear; a few
        m = sobre.load(base)
        lora.add_lora(m, rank=2 + i, names=tuple(n for n in names if n in {t.rpartition(".")[2] for t in
                                                                          map(lora._hf_module, lora.targets(m))}))
        randomize_adapters(m, seed=i, std=2.0)
        lora.save_adapter(m, tmp_path / f"ad{i}", str(base))
        sobre.save(lora.merge(m), tmp_path / f"merged{i}")
        folders[f"ad{i}"] = tmp_path / f"ad{i}"
    prompts = [TOKENS[r, :n].tolist() for r, n in ((0, 11), (1, 5), (0, 9), (0, 11), (1, 7), (1, 3))]
    which = [None, "ad0", "ad1", "ad0", None, "ad1"]
    mtp = dict(speculative=True, min_acceptance=0) if model_type == "deepseek_v3" else {}
    want = {name: Engine(sobre.load(tmp_path / f"merged{name[-1]}" if name else base), **mtp).generate(
        prompts, max_new_tokens=6) for name in (None, "ad0", "ad1")}
    assert len({want[a][0][0] for a in want}) == 3  # (each adapter changes prompt 0's first token)
    for kw_ in ({}, dict(prefill_chunk=4), dict(prefix_cache=True, block=8)):  # (blocks of 8: prompts fill some)
        eng = Engine(sobre.load(base), loras=folders, **kw_, **mtp)
        rids = [eng.add_request(p, max_new_tokens=6, lora=a) for p, a in zip(prompts, which)]
        while eng.has_work():
            eng.step()
        done = eng.collect()
        assert [done[r].out for r in rids] == [want[a][i] for i, a in enumerate(which)], kw_
        if kw_.get("prefix_cache"):
            assert eng.prefix_stats["hit"] == 0  # (prompts 0 and 3 are one prompt, under two adapters)
        assert eng.generate([prompts[0]] * 2, max_new_tokens=6, lora="ad1") == [want["ad1"][0]] * 2
    with pytest.raises(ValueError, match="no LoRA adapter 'nope'"):
        eng.add_request(prompts[0], lora="nope")
    with pytest.raises(ValueError, match="compile=True"):
        Engine(sobre.load(base), loras=folders, compile=True)


def test_lora_on_a_v4_model(tmp_path):
    """DeepSeek-V4: LoRA on attention's q_a / q_b / kv / o_b projections and the shared expert's (not the grouped
    o_a_proj, the compressors, the indexer), named by their last two names (the compressors' kv_proj and gate_proj
    share the last): our saved adapter loads in peft on transformers' model with our adapted logits, and merges as
    it loads; an adapter peft wrote on some of them merges into ours with peft's logits; the engine serves one
    beside the base model (greedy as the merged model); --int8's frozen weights keep the head (lm_head) whole;
    modules outside those are refused."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from sobre.int8 import Int8Linear

    from conftest import v4_model
    base = sobre.save(v4_model(), tmp_path / "base")
    ours = sobre.load(base)
    names = lora.add_lora(ours, rank=4, alpha=12)
    assert len(names) == 4 * 7 and not any("compressor" in n or "o_a_proj" in n for n in names)
    randomize_adapters(ours)
    with torch.no_grad():
        want = ours(TOKENS)
        assert (want - sobre.load(base)(TOKENS)).abs().max() > 1e-2
    lora.save_adapter(ours, tmp_path / "ours", str(base))
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == sorted(lora.V4_TARGETS)
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                   tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(TOKENS).logits, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sobre.load(base, adapter=tmp_path / "ours")(TOKENS), want, atol=1e-4, rtol=1e-4)

    torch.manual_seed(3)
    some = ["self_attn.q_b_proj", "self_attn.kv_proj", "shared_experts.down_proj"]
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                LoraConfig(r=4, lora_alpha=8, target_modules=some, init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(sobre.load(base, adapter=tmp_path / "peft")(TOKENS), peft_model(TOKENS).logits,
                                   atol=1e-4, rtol=1e-4)

    sobre.save(lora.merge(ours), tmp_path / "merged")
    prompts = [TOKENS[0, :9].tolist(), TOKENS[1].tolist()]
    eng = Engine(sobre.load(base), loras={"ours": tmp_path / "ours"})
    assert eng.generate(prompts, max_new_tokens=5, lora="ours") == Engine(sobre.load(tmp_path / "merged")).generate(
        prompts, max_new_tokens=5)
    frozen = sobre.load(base, **SFTArgs(lora_rank=4, int8=True).frozen_int8())
    assert type(frozen.lm_head) is not Int8Linear and type(frozen.layers[0].self_attn.q_a_proj) is Int8Linear
    with pytest.raises(ValueError, match="o_a_proj"):
        lora.add_lora(sobre.load(base), rank=2, names=("o_a_proj",))
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                LoraConfig(r=2, target_modules=["compressor.kv_proj"]))
    peft_model.save_pretrained(tmp_path / "compressor")
    with pytest.raises(ValueError, match="that sobre adapts"):
        sobre.load(base, adapter=tmp_path / "compressor")
