"""HF `config.json` <-> Config: the one place HF's key names are mapped to the paper's (Config.from_hf /
Config.to_hf call these). Unknown keys, and values sobre would misread, are errors naming the key."""

from __future__ import annotations

from .config import ARCHS, MLA_ARCHS, Config

# (HF key, our field) pairs shared by every model type
_COMMON = [("vocab_size", "vocab_size"), ("hidden_size", "dim"), ("intermediate_size", "inter_dim"),
           ("num_hidden_layers", "n_layers"), ("num_attention_heads", "n_heads"), ("rms_norm_eps", "norm_eps"),
           ("max_position_embeddings", "max_seq_len"), ("tie_word_embeddings", "tie_embeddings"),
           ("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("pad_token_id", "pad_token_id")]
_MLA = [("q_lora_rank", "q_lora_rank"), ("kv_lora_rank", "kv_lora_rank"), ("qk_nope_head_dim", "qk_nope_head_dim"),
        ("qk_rope_head_dim", "qk_rope_head_dim"), ("v_head_dim", "v_head_dim"),
        ("n_routed_experts", "n_routed_experts"), ("n_shared_experts", "n_shared_experts"),
        ("num_experts_per_tok", "n_activated_experts"), ("moe_intermediate_size", "moe_inter_dim"),
        ("first_k_dense_replace", "n_dense_layers"), ("moe_layer_freq", "moe_layer_freq"),
        ("n_group", "n_expert_groups"), ("topk_group", "n_limited_groups"), ("scoring_func", "score_func"),
        ("topk_method", "topk_method"), ("routed_scaling_factor", "route_scale"),
        ("norm_topk_prob", "norm_topk_prob"), ("num_nextn_predict_layers", "n_mtp_layers")]
_DENSE = [("num_key_value_heads", "n_kv_heads"), ("head_dim", "head_dim")]
_DSA = [("index_n_heads", "index_n_heads"), ("index_head_dim", "index_head_dim"), ("index_topk", "index_topk")]
_NSA = [("attn_type", "attn_type"), ("nsa_block_size", "nsa_block"), ("nsa_block_stride", "nsa_stride"),
        ("nsa_select_size", "nsa_select"), ("nsa_top_n", "nsa_top_n"), ("nsa_window", "nsa_window")]
_ROPE = [("factor", "rope_factor"), ("original_max_position_embeddings", "original_seq_len"),
         ("beta_fast", "beta_fast"), ("beta_slow", "beta_slow"), ("mscale", "mscale"),
         ("mscale_all_dim", "mscale_all_dim"), ("low_freq_factor", "low_freq_factor"),
         ("high_freq_factor", "high_freq_factor")]
# keys HF writes that carry no architecture (or that we check below): accepted and not mapped
_IGNORED = {"architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "use_cache",
            "initializer_range", "pretraining_tp", "attention_dropout", "output_router_logits", "aux_loss_alpha",
            "router_aux_loss_coef", "seq_aux", "ep_size", "_name_or_path", "quantization_config", "hidden_act",
            "model_type", "num_mtp_layers", "qk_head_dim", "rope_theta", "rope_scaling", "rope_parameters",
            "rope_interleave", "attention_bias", "mlp_bias", "use_sliding_window", "sliding_window",
            "max_window_layers", "layer_types", "mlp_layer_types", "num_key_value_heads", "head_dim", "use_mrope",
            "output_attentions", "output_hidden_states", "return_dict", "chunk_size_feed_forward",
            "is_encoder_decoder", "id2label", "label2id", "problem_type", "tokenizer_class", "task_specific_params",
            "finetuning_task", "prefix", "sep_token_id", "decoder_start_token_id", "tf_legacy_loss",
            "use_bfloat16", "torchscript", "pruned_heads", "add_cross_attention", "is_decoder",
            "cross_attention_hidden_size", "tie_encoder_decoder", "num_labels"}
_DEFAULTS_V3 = dict(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                    n_routed_experts=256, n_shared_experts=1, n_activated_experts=8, moe_inter_dim=2048,
                    n_dense_layers=3, n_expert_groups=8, n_limited_groups=4, route_scale=2.5, norm_topk_prob=True,
                    score_func="sigmoid", topk_method="noaux_tc", n_mtp_layers=1)
_DEFAULTS_V32 = dict(_DEFAULTS_V3, n_mtp_layers=0, index_n_heads=64, index_head_dim=128, index_topk=2048)
_DEFAULTS_V2 = dict(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                    n_routed_experts=64, n_shared_experts=2, moe_inter_dim=1407, n_dense_layers=0,
                    n_expert_groups=1, n_limited_groups=1, route_scale=1.0, norm_topk_prob=False,
                    score_func="softmax", topk_method="greedy", n_mtp_layers=0, bos_token_id=1, eos_token_id=2)
_DEFAULTS_DENSE = dict(n_routed_experts=0, n_mtp_layers=0, rope_interleave=False, q_lora_rank=0)


_V4 = [("vocab_size", "vocab_size"), ("hidden_size", "dim"), ("num_hidden_layers", "n_layers"),
       ("num_attention_heads", "n_heads"), ("num_key_value_heads", "n_kv_heads"), ("head_dim", "head_dim"),
       ("rms_norm_eps", "norm_eps"), ("max_position_embeddings", "max_seq_len"),
       ("tie_word_embeddings", "tie_embeddings"), ("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
       ("pad_token_id", "pad_token_id"), ("q_lora_rank", "q_lora_rank"), ("n_routed_experts", "n_routed_experts"),
       ("n_shared_experts", "n_shared_experts"), ("num_experts_per_tok", "n_activated_experts"),
       ("moe_intermediate_size", "moe_inter_dim"), ("scoring_func", "score_func"),
       ("routed_scaling_factor", "route_scale"), ("norm_topk_prob", "norm_topk_prob"),
       ("qk_rope_head_dim", "qk_rope_head_dim"), ("compress_rope_theta", "compress_rope_theta"),
       ("sliding_window", "sliding_window"), ("o_groups", "o_groups"), ("o_lora_rank", "o_lora_rank"),
       ("hc_mult", "hc_mult"), ("hc_sinkhorn_iters", "hc_sinkhorn_iters"), ("hc_eps", "hc_eps"),
       ("swiglu_limit", "swiglu_limit"), ("index_n_heads", "index_n_heads"), ("index_head_dim", "index_head_dim"),
       ("index_topk", "index_topk"), ("num_nextn_predict_layers", "n_mtp_layers")]
_V4_LAYER = {"sliding_attention": "sliding", "compressed_sparse_attention": "csa",
             "heavily_compressed_attention": "hca"}
_DEFAULTS_V4 = dict(vocab_size=129280, dim=4096, n_layers=43, n_heads=64, n_kv_heads=1, head_dim=512,
                    q_lora_rank=1024, qk_rope_head_dim=64, n_routed_experts=256, n_shared_experts=1,
                    n_activated_experts=6, moe_inter_dim=2048, n_dense_layers=0, n_expert_groups=1,
                    n_limited_groups=1, score_func="sqrtsoftplus", route_scale=1.5, n_mtp_layers=0,
                    sliding_window=128, o_groups=8, o_lora_rank=1024, swiglu_limit=10.0, index_n_heads=64,
                    index_head_dim=128, index_topk=512, compress_rate_csa=4, compress_rate_hca=128,
                    max_seq_len=1048576, rope_interleave=True, compress_rope_theta=160000.0)


def _v4_from_hf(hf: dict, source: str, bad) -> Config:
    """DeepSeek-V4's config.json (transformers' deepseek_v4 names, with the legacy spellings it also reads)."""
    known = {k for k, _ in _V4} | _IGNORED | {"compress_rates", "compress_ratios", "compress_rate_csa",
                                              "compress_rate_hca", "num_hash_layers", "partial_rotary_factor",
                                              "router_jitter_noise", "n_group",
                                              "topk_group", "topk_method", "moe_layer_freq", "first_k_dense_replace",
                                              "expert_dtype"}  # fp4: the experts' weights (checkpoint.load_weights)
    for key in hf:
        if key not in known:
            raise ValueError(f"{source}: unknown key {key!r} for model_type 'deepseek_v4'")
    expert_dtype = hf.get("expert_dtype", (hf.get("quantization_config") or {}).get("expert_dtype"))
    if expert_dtype not in (None, "fp4", "fp8", "bf16"):
        raise ValueError(f"{source}: expert_dtype {expert_dtype!r} is not one of fp4, fp8, bf16")
    if hf.get("hidden_act", "silu") != "silu":
        bad("hidden_act", "only silu (SwiGLU) FFNs are supported")
    kw = {"arch": "deepseek_v4", **_DEFAULTS_V4}
    kw.update({ours: hf[k] for k, ours in _V4 if k in hf})
    if "qk_rope_head_dim" not in hf and "partial_rotary_factor" in hf:
        kw["qk_rope_head_dim"] = int(kw["head_dim"] * hf["partial_rotary_factor"])
    n = kw["n_layers"]
    rates = {**{_V4_LAYER[k]: v for k, v in (hf.get("compress_rates") or {}).items()},
             **{k[-3:]: hf[k] for k in ("compress_rate_csa", "compress_rate_hca") if k in hf}}
    kw["compress_rate_csa"], kw["compress_rate_hca"] = rates.get("csa", 4), rates.get("hca", 128)
    if hf.get("layer_types"):
        if any(t not in _V4_LAYER for t in hf["layer_types"]):
            bad("layer_types", f"expected entries from {sorted(_V4_LAYER)}")
        kw["layer_types"] = [_V4_LAYER[t] for t in hf["layer_types"][:n]]
    elif hf.get("compress_ratios"):
        by_rate = {0: "sliding", kw["compress_rate_csa"]: "csa", kw["compress_rate_hca"]: "hca"}
        kw["layer_types"] = [by_rate[r] for r in hf["compress_ratios"][:n]]
    else:  # transformers' default: two HCA layers, then CSA / HCA alternating
        kw["layer_types"] = ["hca"] * min(n, 2) + ["csa" if i % 2 else "hca" for i in range(max(n - 2, 0))]
    mlp = hf.get("mlp_layer_types")
    kw["n_hash_layers"] = mlp.count("hash_moe") if mlp else min(n, hf.get("num_hash_layers", 3))
    if mlp and mlp != ["hash_moe"] * kw["n_hash_layers"] + ["moe"] * (n - kw["n_hash_layers"]):
        bad("mlp_layer_types", "expected hash_moe layers first, then moe")
    rp = hf.get("rope_parameters") or {}
    if "main" in rp:  # transformers' nested form; else the flat form describes the compressed layers' rope
        main, comp = rp["main"] or {}, rp.get("compress") or {}
    else:
        main, comp = {}, {**(hf.get("rope_scaling") or {}), **rp}
    if main.get("rope_type", "default") != "default":
        bad("rope_parameters", "the main (sliding-window) rope must be unscaled")
    kw["compress_rope_theta"] = float(comp.get("rope_theta", kw["compress_rope_theta"]))
    comp = {k: v for k, v in comp.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if comp.get("attention_factor", 1.0) != 1.0:
        bad("rope_parameters", "V4's compressed rope leaves cos/sin unscaled (attention_factor 1.0)")
    comp.pop("attention_factor", None)
    if _rope_from_hf({"rope_parameters": comp, "max_position_embeddings": kw["max_seq_len"]}, kw, bad) != 1.0:
        bad("rope_parameters", "V4's compressed rope leaves cos/sin unscaled (attn_factor 1.0)")
    kw["rope_theta"] = float(main.get("rope_theta", hf.get("rope_theta", 10000.0)))  # the sliding layers' rope
    try:
        return Config(**kw)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def from_hf(hf: dict, source: str) -> Config:
    def bad(key, msg):
        raise ValueError(f"{source}: {key}={hf.get(key)!r}: {msg}")

    arch = hf.get("model_type")
    if arch not in ARCHS:
        bad("model_type", f"unsupported model type; sobre loads {', '.join(ARCHS)}")
    if arch == "deepseek_v4":
        return _v4_from_hf(hf, source, bad)
    mapping = _COMMON + (_MLA if arch in MLA_ARCHS else _DENSE) + (_DSA if arch == "deepseek_v32" else [])
    nsa = arch == "deepseek_v3" and hf.get("attn_type", "full") != "full"
    if nsa:  # sobre's NSA models: grouped-query heads instead of MLA
        mapping += _DENSE + _NSA
    known = {k for k, _ in mapping} | _IGNORED
    for key in hf:
        if key not in known:
            raise ValueError(f"{source}: unknown key {key!r} for model_type {arch!r}; "
                             f"remove it or check the spelling (sobre never guesses what a key means)")
    if hf.get("hidden_act", "silu") != "silu":
        bad("hidden_act", "only silu (SwiGLU) FFNs are supported")
    if hf.get("use_sliding_window"):
        bad("use_sliding_window", "sliding-window attention is not supported")
    if hf.get("use_mrope"):
        bad("use_mrope", "multimodal rope is not supported")
    # (V3.2's layers: indexed_attention as transformers 5.25 writes them, deepseek_sparse_attention as 5.17 did)
    attention = ("indexed_attention", "deepseek_sparse_attention") if arch == "deepseek_v32" else ("full_attention",)
    if any(t not in attention for t in hf.get("layer_types") or []):
        bad("layer_types", f"only {' / '.join(attention)} layers are supported for {arch}")

    kw: dict = {"arch": arch}
    kw.update({"deepseek_v3": _DEFAULTS_V3, "deepseek_v32": _DEFAULTS_V32, "deepseek_v2": _DEFAULTS_V2}.get(
        arch, _DEFAULTS_DENSE))
    if arch == "deepseek_v2":
        kw["rope_interleave"] = True  # V2 checkpoints always rotate interleaved pairs
    for hf_key, ours in mapping:
        if hf_key in hf:
            kw[ours] = hf[hf_key]
    if "num_mtp_layers" in hf and "num_nextn_predict_layers" not in hf and arch in MLA_ARCHS:
        kw["n_mtp_layers"] = hf["num_mtp_layers"]
    for k in ("q_lora_rank", "n_routed_experts", "head_dim", "n_kv_heads"):
        if k in kw and kw[k] is None:
            kw[k] = 0
    if kw.get("n_expert_groups") is None:
        kw["n_expert_groups"] = 1
    if kw.get("n_limited_groups") is None:
        kw["n_limited_groups"] = kw["n_expert_groups"]
    if arch in ("deepseek_v3", "deepseek_v32"):
        kw["rope_interleave"] = bool(hf.get("rope_interleave", True))
    if arch in MLA_ARCHS and not nsa:
        nkv = hf.get("num_key_value_heads")
        if nkv not in (None, hf.get("num_attention_heads")):
            bad("num_key_value_heads", "MLA has one latent shared by all heads; must equal num_attention_heads")
        if "qk_head_dim" in hf and hf["qk_head_dim"] != kw["qk_nope_head_dim"] + kw["qk_rope_head_dim"]:
            bad("qk_head_dim", "must equal qk_nope_head_dim + qk_rope_head_dim")
        if arch == "deepseek_v2" and kw["topk_method"] == "noaux_tc":
            bad("topk_method", "deepseek_v2 routers are greedy or group_limited_greedy")
    else:
        kw["qkv_bias"] = True if arch == "qwen2" else bool(hf.get("attention_bias", False))
        kw["o_bias"] = False if arch == "qwen2" else bool(hf.get("attention_bias", False))
        kw["qk_norm"] = arch == "qwen3"
        kw["mlp_bias"] = bool(hf.get("mlp_bias", False))
        if "intermediate_size" not in hf:
            bad("intermediate_size", "missing")
    times = _rope_from_hf(hf, kw, bad)
    try:
        c = Config(**kw)
        if times != 1.0:  # vLLM's attn_factor: a multiple of the magnitude the rest of the YaRN keys give
            c = c.replace(rope_attn_factor=times * c.rope_magnitude)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    if "mlp_layer_types" in hf and hf["mlp_layer_types"] != [
            "sparse" if c.is_moe_layer(i) else "dense" for i in range(c.n_layers)]:
        bad("mlp_layer_types", "disagrees with first_k_dense_replace / moe_layer_freq")
    return c


def _rope_from_hf(hf: dict, kw: dict, bad) -> float:
    """Fills kw's rope fields; -> vLLM / SGLang's YaRN `attn_factor`, which multiplies the cos/sin magnitude
    (1.0 when absent; transformers ignores the key, with a warning: a checkpoint that sets it, as DeepSeek's
    Qwen3 distill may, means the serving engines' reading)."""
    # transformers 5 writes `rope_parameters` (with rope_theta inside); released checkpoints write
    # `rope_theta` + `rope_scaling` (null when unscaled). Accept both, refuse what we would misread.
    rp = dict(hf.get("rope_parameters") or {})
    rs = dict(hf.get("rope_scaling") or {})
    if rp and rs and {k: v for k, v in rp.items() if k in rs} != {k: v for k, v in rs.items() if k in rp}:
        bad("rope_scaling", "disagrees with rope_parameters")
    rope = {**rs, **rp}
    kw["rope_theta"] = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rtype = rope.get("rope_type", rope.get("type", "default"))
    if rtype not in ("default", "yarn", "llama3"):
        bad("rope_scaling", f"rope type {rtype!r} is not supported (default, yarn, llama3)")
    kw["rope_type"] = rtype
    if rtype == "default":
        return 1.0
    allowed = {"type", "rope_type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast",
               "beta_slow", "mscale", "mscale_all_dim", "low_freq_factor", "high_freq_factor", "truncate",
               "attention_factor", "attn_factor"}
    for k in rope:
        if k not in allowed:
            bad("rope_scaling", f"unknown rope parameter {k!r}")
    if rope.get("truncate", True) is not True:
        bad("rope_scaling", "truncate=False is not supported")
    if rtype != "yarn" and ({"attention_factor", "attn_factor"} & set(rope)):
        bad("rope_scaling", "attention_factor / attn_factor are YaRN's")
    if rope.get("attention_factor") is not None and rope.get("attn_factor") is not None:
        bad("rope_scaling", "give attention_factor (the magnitude) or attn_factor (a multiple of it), not both")
    if rope.get("attention_factor") is not None:
        kw["rope_attn_factor"] = float(rope["attention_factor"])
    for hf_key, ours in _ROPE:
        if rope.get(hf_key) is not None:
            kw[ours] = rope[hf_key]
    kw.setdefault("original_seq_len", hf.get("max_position_embeddings", 0))
    if rtype == "yarn" and rope.get("mscale_all_dim") is None:
        kw["mscale_all_dim"] = 0.0
    if rtype == "yarn" and rope.get("mscale") is None:
        kw["mscale"] = 0.0  # HF then falls back to mscale(factor) for the cos/sin scale
    return float(rope.get("attn_factor") or 1.0)


def _v4_to_hf(c: Config) -> dict:
    out = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "hidden_act": "silu",
           **{k: getattr(c, ours) for k, ours in _V4}}
    inv = {v: k for k, v in _V4_LAYER.items()}
    out["layer_types"] = [inv[t] for t in c.layer_types]
    out["compress_rates"] = {inv["csa"]: c.compress_rate_csa, inv["hca"]: c.compress_rate_hca}
    out["mlp_layer_types"] = ["hash_moe"] * c.n_hash_layers + ["moe"] * (c.n_layers - c.n_hash_layers)
    out["partial_rotary_factor"] = c.qk_rope_head_dim / c.head_dim
    del out["qk_rope_head_dim"]
    comp = {"rope_type": c.rope_type, "rope_theta": c.compress_rope_theta}
    if c.rope_type == "yarn":
        comp.update(factor=c.rope_factor, original_max_position_embeddings=c.original_seq_len,
                    beta_fast=c.beta_fast, beta_slow=c.beta_slow)
    out["rope_parameters"] = {"main": {"rope_type": "default", "rope_theta": c.rope_theta}, "compress": comp}
    return out


def to_hf(c: Config) -> dict:
    if c.arch == "deepseek_v4":
        return _v4_to_hf(c)
    out = {"architectures": [{"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v32": "DeepseekV32ForCausalLM",
                              "deepseek_v2": "DeepseekV2ForCausalLM", "qwen2": "Qwen2ForCausalLM",
                              "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[c.arch]],
           "model_type": c.arch, "hidden_act": "silu"}
    mapping = _COMMON + (_MLA if c.arch in MLA_ARCHS else []) + (_DSA if c.attn_type == "dsa" else []) + \
        (_NSA if c.attn_type == "nsa" else [])
    for hf_key, ours in mapping:
        out[hf_key] = getattr(c, ours)
    if c.arch in MLA_ARCHS:
        out["q_lora_rank"] = c.q_lora_rank or None
    if c.is_mla:
        out["num_key_value_heads"] = c.n_heads
        if c.arch == "deepseek_v2":
            out.pop("num_nextn_predict_layers")
    else:
        out["num_key_value_heads"] = c.kv_heads
        out["head_dim"] = c.dense_head_dim
        if c.arch in ("llama", "qwen3"):
            out["attention_bias"] = c.qkv_bias
            out["mlp_bias"] = c.mlp_bias
    if c.arch in ("deepseek_v3", "deepseek_v32"):
        out["rope_interleave"] = c.rope_interleave
    out["rope_theta"] = c.rope_theta
    out["rope_scaling"] = None
    if c.rope_type == "yarn":
        out["rope_scaling"] = {"type": "yarn", "factor": c.rope_factor, "original_max_position_embeddings":
                               c.original_seq_len, "beta_fast": c.beta_fast, "beta_slow": c.beta_slow,
                               "mscale": c.mscale, "mscale_all_dim": c.mscale_all_dim,
                               **({"attention_factor": c.rope_attn_factor} if c.rope_attn_factor else {})}
    elif c.rope_type == "llama3":
        out["rope_scaling"] = {"rope_type": "llama3", "factor": c.rope_factor, "original_max_position_embeddings":
                               c.original_seq_len, "low_freq_factor": c.low_freq_factor,
                               "high_freq_factor": c.high_freq_factor}
    return out
