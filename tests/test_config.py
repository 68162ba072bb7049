import json

import pytest

import sobre
from sobre.config import Config
from sobre.stats import model_stats

V3_RELEASE = {  # config.json of deepseek-ai/DeepSeek-V3 (as released)
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}, "aux_loss_alpha": 0.001,
    "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
    "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "pretraining_tp": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                                    "quant_method": "fp8", "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                            "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280}


def test_v3_release_config_sizes():
    c = Config.from_hf(V3_RELEASE)
    assert (c.n_layers, c.n_routed_experts, c.n_dense_layers, c.rope_type, c.rope_factor) == (61, 256, 3, "yarn", 40)
    s = model_stats(c)
    assert 670e9 < s["params"] < 672e9  # "671B total"
    assert 36.5e9 < s["active_params"] < 37.7e9  # "37B activated per token"
    assert 11e9 < s["mtp_params"] < 12e9  # + the MTP module (the release's 685B includes it and shared copies)
    assert s["kv"]["latent_values_per_layer"] == 576 and s["kv"]["naive_values_per_layer"] == 40960


def test_hf_roundtrip_keeps_architecture():
    c = Config.from_hf(V3_RELEASE)
    assert Config.from_hf(c.to_hf()) == c


@pytest.mark.parametrize("key,value,message", [
    ("n_routed_expert", 8, "unknown key 'n_routed_expert'"),
    ("model_type", "gpt2", "model_type='gpt2': unsupported model type"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("n_group", 7, "n_expert_groups=7: must divide n_routed_experts=256"),
    ("num_experts_per_tok", 300, "n_activated_experts=300"),
    ("num_key_value_heads", 16, "num_key_value_heads=16: MLA has one latent"),
    ("rope_scaling", {"type": "dynamic", "factor": 2.0}, "rope type 'dynamic' is not supported"),
])
def test_bad_config_keys_name_the_key(key, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Config.from_hf({**V3_RELEASE, key: value})


def test_layer_types_of_each_transformers_version():
    """V3.2's layers as transformers 5.25 writes them (indexed_attention) and as 5.17 did
    (deepseek_sparse_attention); any other kind is refused, named."""
    v32 = {**V3_RELEASE, "model_type": "deepseek_v32", "num_hidden_layers": 2}
    for kind in ("indexed_attention", "deepseek_sparse_attention"):
        assert Config.from_hf({**v32, "layer_types": [kind] * 2}).arch == "deepseek_v32"
    with pytest.raises(ValueError, match="layer_types=.*only indexed_attention / deepseek_sparse_attention"):
        Config.from_hf({**v32, "layer_types": ["sliding_attention"] * 2})
    with pytest.raises(ValueError, match="only full_attention layers are supported for deepseek_v3"):
        Config.from_hf({**V3_RELEASE, "layer_types": ["indexed_attention"] * 61})


def test_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Config.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Config.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(V3_RELEASE))
    assert Config.load(tmp_path).dim == 7168


def test_presets_and_dict_roundtrip():
    for name in ("debug", "tiny", "small"):
        c = sobre.preset(name)
        assert Config.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown preset"):
        sobre.preset("huge")
    with pytest.raises(ValueError, match="unknown key 'dimm'"):
        Config.from_dict({"dimm": 3})


R1_DISTILL_QWEN_1_5B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
    "hidden_act": "silu", "hidden_size": 1536, "initializer_range": 0.02, "intermediate_size": 8960,
    "max_position_embeddings": 131072, "max_window_layers": 21, "model_type": "qwen2", "num_attention_heads": 12,
    "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 10000,
    "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.44.0",
    "use_cache": True, "use_mrope": False, "use_sliding_window": False, "vocab_size": 151936}
QWEN3_8B = {  # Qwen3-8B's config.json, the layout of DeepSeek-R1-0528-Qwen3-8B
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 12288, "max_position_embeddings": 40960, "max_window_layers": 36, "model_type": "qwen3",
    "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936}
V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "auto_map": {}, "vocab_size": 102400, "hidden_size": 2048,
    "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
    "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64, "ep_size": 1,
    "routed_scaling_factor": 1.0, "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
    "num_experts_per_tok": 6, "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": False,
    "scoring_func": "softmax", "aux_loss_alpha": 0.001, "seq_aux": True, "hidden_act": "silu",
    "max_position_embeddings": 163840, "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True,
    "pad_token_id": None, "bos_token_id": 100000, "eos_token_id": 100001, "pretraining_tp": 1,
    "tie_word_embeddings": False, "rope_theta": 10000, "attention_bias": False, "attention_dropout": 0.0,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "model_type": "deepseek_v2", "torch_dtype": "bfloat16", "transformers_version": "4.39.3"}


def test_other_released_configs_load_with_their_sizes():
    q = Config.from_hf(R1_DISTILL_QWEN_1_5B)
    assert (q.arch, q.kv_heads, q.qkv_bias, q.tie_embeddings, q.rope_interleave) == ("qwen2", 2, True, False, False)
    assert 1.75e9 < model_stats(q)["params"] < 1.80e9  # "1.5B" backbone + untied 151936 x 1536 head
    q3 = Config.from_hf(QWEN3_8B)
    assert (q3.arch, q3.qk_norm, q3.qkv_bias, q3.dense_head_dim, q3.kv_heads) == ("qwen3", True, False, 128, 8)
    assert 8.15e9 < model_stats(q3)["params"] < 8.25e9  # "8.2B"
    yarn = Config.from_hf(dict(QWEN3_8B, max_position_embeddings=131072, rope_scaling={  # YaRN to 131k, with
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "attn_factor": 0.5}))
    assert yarn.rope_magnitude == pytest.approx(0.5 * (0.1 * __import__("math").log(4) + 1))  # (vLLM's attn_factor)
    assert Config.from_hf(q3.to_hf()) == q3 and Config.from_hf(yarn.to_hf()) == yarn  # (saved: attention_factor)
    v2 = Config.from_hf(V2_LITE)
    assert (v2.q_lora_rank, v2.score_func, v2.topk_method, v2.n_mtp_layers) == (0, "softmax", "greedy", 0)
    s = model_stats(v2)
    assert 15.5e9 < s["params"] < 16.0e9  # "15.7B total"
    assert 2.3e9 < s["active_params"] < 2.9e9  # "2.4B activated" (ours counts embedding and head)
    assert v2.softmax_scale == pytest.approx(192**-0.5 * (0.1 * 0.707 * __import__("math").log(40) + 1) ** 2)
