"""Ground truth: the same HF checkpoint gives the same logits in sobre and in transformers."""

import pytest
import torch

import sobre

from conftest import V3, hf_checkpoint, hf_logits

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}
V2 = dict(V3, routed_scaling_factor=1.0, n_group=None, topk_group=None, topk_method="greedy", n_shared_experts=2,
          norm_topk_prob=False)
DENSE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)

CASES = {
    "v3-qlora": ("deepseek_v3", V3),
    "v3-no-qlora": ("deepseek_v3", dict(V3, q_lora_rank=None)),
    "v3-dense-only": ("deepseek_v3", dict(V3, first_k_dense_replace=3)),
    "v3-groups-4of8-top2": ("deepseek_v3", dict(V3, n_routed_experts=16, n_group=8, topk_group=4,
                                                 num_experts_per_tok=4)),
    "v3-one-group-no-norm": ("deepseek_v3", dict(V3, n_group=1, topk_group=1, norm_topk_prob=False)),
    "v3-yarn": ("deepseek_v3", dict(V3, rope_scaling=YARN)),
    "v3-yarn-mscale-split": ("deepseek_v3", dict(V3, rope_scaling=dict(YARN, mscale=0.707, mscale_all_dim=1.0))),
    "v3-half-split-rope": ("deepseek_v3", dict(V3, rope_interleave=False)),
    "v32-dsa-top16": ("deepseek_v32", dict(V3, index_topk=16, index_n_heads=16, index_head_dim=16)),
    "v32-dsa-yarn-no-mtp": ("deepseek_v32", dict(V3, index_topk=8, index_n_heads=16, index_head_dim=24,
                                                 rope_scaling=YARN, num_nextn_predict_layers=0)),
    "v2-softmax-greedy": ("deepseek_v2", V2),
    "v2-group-limited-yarn": ("deepseek_v2", dict(V2, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                                   rope_scaling=dict(YARN, mscale=0.707, mscale_all_dim=0.707))),
    "qwen2-tied": ("qwen2", dict(DENSE, tie_word_embeddings=True)),
    "llama-llama3-rope": ("llama", dict(DENSE, tie_word_embeddings=False, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}, attention_bias=True)),
    # DeepSeek-R1-0528-Qwen3-8B's layout: per-head q / k norms, head_dim apart from hidden / heads (as Qwen3-0.6B)
    "qwen3-head-dim": ("qwen3", dict(DENSE, head_dim=24, tie_word_embeddings=False)),
    "qwen3-tied-yarn-bias": ("qwen3", dict(DENSE, tie_word_embeddings=True, attention_bias=True, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})),
    "qwen3-yarn-attention-factor": ("qwen3", dict(DENSE, rope_scaling={  # (the cos/sin magnitude given)
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "attention_factor": 0.8})),
    "v3-yarn-attention-factor": ("deepseek_v3", dict(V3, rope_scaling=dict(YARN, attention_factor=1.3))),
}


def tokens(vocab=128, B=2, T=40, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def assert_close(ours, ref, rel=1e-4):
    err = (ours.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= rel * max(scale, 1.0), f"max abs diff {err:.3g} vs logit scale {scale:.3g}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    model_type, kw = CASES[case]
    path = hf_checkpoint(tmp_path / case, model_type, **kw)
    x = tokens()
    ref = hf_logits(path, x)
    model = sobre.load(path)
    assert model.config.arch == model_type
    with torch.no_grad():
        assert_close(model(x), ref)
        if model.config.is_mla:  # the absorbed path agrees with transformers too
            model.config.attn_impl = "absorb"
            assert_close(model(x), ref)


def test_yarn_attn_factor_as_the_serving_engines_read_it(tmp_path):
    """vLLM's and SGLang's YaRN `attn_factor` multiplies the cos/sin magnitude the other keys give (transformers
    ignores the key): a checkpoint with attn_factor a gives the logits transformers gives when the magnitude is
    set outright, attention_factor = a x (0.1 ln factor + 1)."""
    import json
    import math
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    path = hf_checkpoint(tmp_path / "ref", "qwen3", **dict(DENSE, rope_scaling=dict(
        rope, attention_factor=0.75 * (0.1 * math.log(4.0) + 1))))
    x = tokens()
    ref = hf_logits(path, x)
    cfg = json.loads((path / "config.json").read_text())
    key = "rope_parameters" if "rope_parameters" in cfg else "rope_scaling"
    cfg[key] = {k: v for k, v in cfg[key].items() if k != "attention_factor"} | {"attn_factor": 0.75}
    (path / "config.json").write_text(json.dumps(cfg))
    model = sobre.load(path)
    with torch.no_grad():
        assert_close(model(x), ref)
    with pytest.raises(ValueError, match="not both"):
        sobre.Config.from_hf(dict(cfg, **{key: dict(cfg[key], attention_factor=1.0)}))


def test_bf16_parity(tmp_path):
    """bf16 rounds differently in different attention kernels (sobre's fused SDPA accumulates in fp32; for MLA,
    whose V head is narrower than Q/K, transformers falls back to the math kernel), and one rounding difference
    can flip a token's top-k experts, so the bf16 logits are not compared element by element: sobre's must be
    as close to the fp32 logits of the same checkpoint (transformers' fp32 run) as transformers' bf16 ones are:
    in the median over logits and per token (a token whose experts flipped is off by 10-50x the rest; on an AMX
    CPU two such tokens of 80 took sobre's mean error to 1.23x transformers' while its median stayed at 1.04x)."""
    path = hf_checkpoint(tmp_path / "bf16", "deepseek_v3", dtype=torch.bfloat16, **dict(V3, rope_scaling=YARN))
    x = tokens()
    ref, exact = hf_logits(path, x, torch.bfloat16).float(), hf_logits(path, x, torch.float32)
    model = sobre.load(path)
    assert next(model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        ours = model(x)
    assert ours.dtype == torch.bfloat16
    ours_err, ref_err = (ours.float() - exact).abs(), (ref - exact).abs()
    assert ours_err.median() <= 1.2 * ref_err.median(), (ours_err.median(), ref_err.median())
    assert ours_err.mean() <= 2 * ref_err.mean(), (ours_err.mean(), ref_err.mean())  # flips bounded too
    assert ours_err.amax(-1).median() <= 1.2 * ref_err.amax(-1).median()  # per token, robust to a routing flip
    top = exact.argmax(-1)  # ranks: sobre's bf16 keeps the fp32 top token as often (one token of 80 is 0.0125)
    assert (ours.argmax(-1) == top).float().mean() >= (ref.argmax(-1) == top).float().mean() - 0.0125


@pytest.mark.parametrize("case", ["v3-qlora", "v32-dsa-top16", "v2-softmax-greedy", "qwen2-tied",
                                  "llama-llama3-rope", "qwen3-head-dim", "qwen3-yarn-attention-factor"])
def test_sobre_save_loads_in_transformers(tmp_path, case):
    model_type, kw = CASES[case]
    model = sobre.load(hf_checkpoint(tmp_path / "src", model_type, **kw))
    out = sobre.save(model, tmp_path / "out")
    x = tokens()
    with torch.no_grad():
        ours = model(x)
    assert_close(hf_logits(out, x), ours)
    assert (out / "README.md").read_text().startswith("---")


def test_mtp_matches_transformers_mtp_model(tmp_path):
    """The MTP head (num_nextn_predict_layers=1) against transformers' own MtpModel on the same weights."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_layers import MtpModel

    from conftest import random_model
    c = sobre.Config.from_hf(dict(V3, model_type="deepseek_v3", num_nextn_predict_layers=1))
    model = random_model(c)
    path = sobre.save(model, tmp_path / "mtp")
    x = tokens()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # transformers only looks for MTP weights after a 61-layer model; point it at our layer index
    hf._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{c.n_layers}.*"]
    mtp = MtpModel.from_pretrained(hf).float().eval()
    T = x.shape[1]
    with torch.no_grad():
        h = hf.model(x).last_hidden_state
        ref = mtp._project_to_logits(mtp.forward_layer(0, h[:, :-1], torch.arange(1, T)[None], None,
                                                       input_ids=x[:, 1:]))
        assert_close(hf(x).logits, model(x))
        assert_close(model.mtp_logits(model.hidden(x), x)[0], ref)
