"""DeepSeek-V4 (sobre/v4.py): logits equal transformers' DeepseekV4ForCausalLM on the same weights."""

import pytest
import torch

from sobre.config import Config
from sobre.v4 import V4Transformer

from conftest import run_requests

transformers = pytest.importorskip("transformers")

HF = dict(vocab_size=128, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
          head_dim=32, q_lora_rank=32, n_routed_experts=8, num_experts_per_tok=2, sliding_window=8, o_groups=2,
          o_lora_rank=16, index_n_heads=16, index_head_dim=16, index_topk=4, partial_rotary_factor=0.25, hc_mult=2,
          layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                       "compressed_sparse_attention"],
          compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
          max_position_embeddings=256)


def hf_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.DeepseekV4Config(**{**HF, **kw})
    cfg._attn_implementation = "eager"
    m = transformers.DeepseekV4ForCausalLM(cfg).eval()
    with torch.no_grad():  # transformers zero-inits sinks, biases, hc weights: randomise them all
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in m.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() == 1 else 0.05) + (1 if "norm" in name
                                                                                            else 0))
        for mod in m.modules():
            if hasattr(mod, "tid2eid"):
                mod.tid2eid.copy_(torch.randint(0, cfg.n_routed_experts, mod.tid2eid.shape, generator=g))
            if hasattr(mod, "e_score_correction_bias"):
                mod.e_score_correction_bias.copy_(torch.randn(mod.e_score_correction_bias.shape, generator=g) * .1)
    return m


def ours_from(hf) -> V4Transformer:
    c = Config.from_hf(hf.config.to_dict()).replace(n_mtp_layers=0)  # transformers builds no MTP module
    m = V4Transformer(c).eval()
    sd = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return m


@pytest.mark.parametrize("kw", [{}, dict(hc_mult=4, o_groups=4, num_hidden_layers=3, layer_types=[
    "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"], mlp_layer_types=[
    "hash_moe", "moe", "moe"]), dict(rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": 64}),
    dict(o_groups=1, layer_types=["heavily_compressed_attention", "sliding_attention", "compressed_sparse_attention",
                                  "heavily_compressed_attention"],
         mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"])])
def test_logits_match_transformers(kw):
    hf = hf_model(**kw)
    ours = ours_from(hf)
    x = torch.randint(0, 128, (2, 37), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf(x).logits
        got = ours(x)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max().clamp(min=1), (got - want).abs().max()


def test_config_round_trip_and_errors():
    c = Config.from_hf(transformers.DeepseekV4Config(**HF).to_dict())
    assert c.layer_types == ["sliding", "csa", "hca", "csa"] and c.n_hash_layers == 3
    assert c.qk_rope_head_dim == 8 and c.compress_rate_hca == 8 and c.score_func == "sqrtsoftplus"
    assert Config.from_hf(c.to_hf()) == c
    bare = Config.from_hf(dict(HF, model_type="deepseek_v4"))  # no rope keys at all: transformers' defaults
    assert (bare.rope_theta, bare.compress_rope_theta) == (10000.0, 160000.0) == (c.rope_theta, c.compress_rope_theta)
    assert transformers.DeepseekV4Config(**c.to_hf()).layer_types == HF["layer_types"]  # transformers reads it
    with pytest.raises(ValueError, match="unknown key 'hc_multt'"):
        Config.from_hf({**c.to_hf(), "hc_multt": 2})
    with pytest.raises(ValueError, match="layer_types"):
        Config.from_hf({**c.to_hf(), "layer_types": ["full_attention"] * 4})
    with pytest.raises(ValueError, match="o_groups"):
        Config.from_hf({**c.to_hf(), "o_groups": 3})
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    for scaled in ({"attention_factor": 0.5}, {"attn_factor": 0.5}):  # (the compressed rope is unscaled: refused)
        with pytest.raises(ValueError, match="leaves cos/sin unscaled"):
            Config.from_hf({**c.to_hf(), "rope_parameters": yarn | scaled})


def test_load_hf_directory(tmp_path):
    import sobre
    hf = hf_model(seed=5)
    hf.save_pretrained(tmp_path / "v4")
    ours = sobre.load(tmp_path / "v4")
    x = torch.randint(0, 128, (1, 29), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kw", [{}, dict(n_layers=3, hc_mult=4, o_groups=4, layer_types=["csa", "hca", "sliding"],
                                          n_hash_layers=1, tie_embeddings=True)])
def test_stats_count_the_model(kw):
    from sobre.stats import model_stats, v4_cache_values
    c = Config.from_hf(transformers.DeepseekV4Config(**HF).to_dict()).replace(**kw)
    with torch.device("meta"):
        m = V4Transformer(c)
        if c.tie_embeddings:
            m.lm_head.weight = m.embed_tokens.weight
    s = model_stats(c, ctx=1000)
    assert c.n_mtp_layers == 1 and s["mtp_params"] == sum(p.numel() for p in m.mtp.parameters())
    assert s["params"] + s["mtp_params"] == sum(p.numel() for p in m.parameters())
    routed = c.n_layers * (c.n_routed_experts - c.n_activated_experts) * 3 * c.dim * c.moe_inter_dim
    assert s["active_params"] == s["params"] - routed
    want = sum(8 * 32 + (250 * (32 + 16) if t == "csa" else 125 * 32 if t == "hca" else 0) for t in c.layer_types)
    assert v4_cache_values(c, 1000) == want  # window 8, CSA 1/4 (+ 16-dim indexer keys), HCA 1/8, head_dim 32


def test_info_on_a_v4_config(tmp_path, capsys):
    import json

    from sobre.cli import main
    (tmp_path / "config.json").write_text(json.dumps(transformers.DeepseekV4Config(**HF).to_dict()))
    main(["info", str(tmp_path), "--ctx", "1000"])
    out = capsys.readouterr().out
    assert "1/2/1 sliding/CSA/HCA" in out and "hash-routed" in out and "cached" in out


def test_bf16_parity(tmp_path):
    import sobre
    hf_model(seed=7).save_pretrained(tmp_path / "v4")
    ref_model = transformers.DeepseekV4ForCausalLM.from_pretrained(tmp_path / "v4", dtype=torch.bfloat16,
                                                                    attn_implementation="eager").eval()
    ours = sobre.load(tmp_path / "v4", dtype=torch.bfloat16)
    assert ours.layers[0].self_attn.sinks.dtype == torch.float32  # kept in fp32 like transformers keeps it
    assert ours.layers[0].self_attn.q_b_proj.weight.dtype == torch.bfloat16
    x = torch.randint(0, 128, (2, 37), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, got = ref_model(x).logits, ours(x)
    assert got.dtype == torch.bfloat16
    err, scale = (got.float() - ref.float()).abs().max().item(), ref.float().abs().max().item()
    assert err <= 2e-2 * max(scale, 1.0), (err, scale)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95


def test_decode_with_caches_equals_one_forward():
    """Token-by-token decode (model.Cache: every token's rows, windows re-pooled) and the engine's incremental
    cache (v4cache: window rings, entries pooled once; prompts whole or in chunks) give the full forward's
    logits and greedy tokens."""
    from sobre import Engine
    from sobre.model import Cache
    hf = hf_model(seed=2, sliding_window=4, compress_rates={"compressed_sparse_attention": 4,
                                                             "heavily_compressed_attention": 8})
    m = ours_from(hf)
    x = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = m(x)
        cache = Cache(64)
        steps = [m(x[:, :11], cache)]
        steps += [m(x[:, t:t + 1], cache) for t in range(11, 30)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    # ragged lengths; two lanes for four requests (the last two reuse lanes that hold stale rows), and those two
    # share a prompt (the second copies the first's prefilled cache)
    prompts = [x[0, :9].tolist(), x[1, :17].tolist(), x[0, :5].tolist(), x[0, :5].tolist()]
    eng = Engine(m, max_batch=2, block=8)
    got = eng.generate(prompts, max_new_tokens=12)
    # prompts prefilled in chunks of 3 tokens (chunks start and end inside windows of the rings and entries)
    assert Engine(m, max_batch=2, block=8, prefill_chunk=3).generate(prompts, max_new_tokens=12) == got
    for p, g in zip(prompts, got):  # greedy by repeated full forwards
        seq = list(p)
        for _ in range(12):
            with torch.no_grad():
                seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
        assert g == seq[len(p):]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_round_trips_through_transformers(tmp_path, dtype):
    import sobre
    from sobre.names import v4_name, v4_saved
    m = ours_from(hf_model(seed=9))
    names = {n for n, _ in m.state_dict().items()}
    mapped = {v4_name(n, m.config.n_mtp_layers)[0] for n, _ in v4_saved(m)}
    assert mapped == names  # every tensor maps back (experts: 8 x w1/w3 -> gate_up_proj, w2 -> down_proj)
    sobre.save(m, tmp_path / "out", dtype=dtype)
    ref = transformers.DeepseekV4ForCausalLM.from_pretrained(tmp_path / "out", dtype=dtype,
                                                              attn_implementation="eager").eval()
    back = sobre.load(tmp_path / "out")
    x = torch.randint(0, 128, (1, 33), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        want = ref(x).logits.float()
        torch.testing.assert_close(back(x).float(), want, atol=2e-2 if dtype == torch.bfloat16 else 1e-4, rtol=0)
        if dtype == torch.float32:
            torch.testing.assert_close(m(x), want, atol=1e-4, rtol=0)
    assert (tmp_path / "out" / "README.md").exists() and (tmp_path / "out" / "manifest.json").exists()


def test_pretrain_a_v4_model(tmp_path):
    """`sobre pretrain --arch deepseek_v4`: the preset's V4 twin trains (loss and MTP loss fall, the learned routers'
    balancing bias moves, hash layers stay fixed), resumes, and its export loads in transformers with the same
    logits (transformers skips the MTP module) and in sobre with the MTP module's weights too."""
    import json

    import sobre
    from sobre.train import TrainArgs, pretrain
    args = dict(out=str(tmp_path / "v4"), steps=12, save_every=6, eval_every=6, sample_every=12, data_bytes=200_000,
                batch_size=4, seq_len=80, arch="deepseek_v4", lr=3e-3, warmup=2,
                model_overrides=("compress_rate_hca=8",))
    run = pretrain(TrainArgs(**args))
    recs = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert len(recs) == 12 and recs[-1]["loss"] < recs[0]["loss"] - 0.5
    assert recs[-1]["mtp_loss"] < recs[0]["mtp_loss"] - 0.5
    assert len(recs[0]["expert_load"]) == 4 and "val_loss" in recs[-1]  # 3 layers + the MTP module's
    assert all(r["indexer_kl"] > 0 for r in recs)  # the CSA indexer learns from its KL to the main attention
    model = sobre.load(run / "model")
    assert model.config.arch == "deepseek_v4" and model.config.layer_types == ["sliding", "csa", "hca"]
    assert model.layers[0].mlp.gate.hashed and model.layers[1].mlp.gate.bias.abs().sum() > 0
    assert model.config.n_mtp_layers == 1 and not model.mtp[0].block.mlp.gate.hashed
    trained = torch.load(sorted((run / "checkpoints").glob("*.pt"))[-1], weights_only=True)["model"]
    for name, t in model.mtp.state_dict().items():  # the exported MTP module is the trained one
        torch.testing.assert_close(t, trained["mtp." + name], atol=0, rtol=0)
    ref = transformers.DeepseekV4ForCausalLM.from_pretrained(run / "model", attn_implementation="eager").eval()
    x = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, atol=1e-4, rtol=1e-4)
    resumed = pretrain(TrainArgs(**{**args, "steps": 14, "resume": True}))
    assert len([json.loads(line) for line in open(resumed / "metrics.jsonl")]) == 14
    with pytest.raises(ValueError, match="brings its own"):
        TrainArgs(arch="deepseek_v4", attn="nsa").validate()
    short = TrainArgs(arch="v4")  # `sobre pretrain --arch v4`
    short.validate()
    assert short.arch == "deepseek_v4"


def test_grouped_moe_equals_the_per_expert_loop():
    """v4.MoE's grouped dispatch (torch._grouped_mm, clipped SwiGLU) against reference.v4_moe: outputs and
    gradients."""
    from sobre import reference
    model = ours_from(hf_model(swiglu_limit=0.05))
    moe = model.layers[-1].mlp  # a learned-routing layer (the bottom ones hash)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 64, generator=g)
    tokens = torch.randint(0, 128, (2, 7), generator=g)
    flat = x.flatten(0, 1)
    w, idx, _ = moe.gate(flat, tokens.flatten())
    fast = moe(x, tokens) - moe.shared_experts(x)
    ref = reference.v4_moe(moe, flat, w, idx).view_as(x)
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-5)
    grads = [torch.autograd.grad(y.pow(2).sum(), moe.experts.parameters()) for y in (fast, ref)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_engine_cache_grows_by_compressed_entries_only():
    """The engine keeps per token only the pooled entries (CSA: head_dim + index_head_dim per 4 tokens; HCA:
    head_dim per 8, one slot per block of 8); windows and projections sit in fixed per-lane rings."""
    from sobre import Engine
    m = ours_from(hf_model(seed=2))
    eng = Engine(m, max_batch=3, block=8, cache_tokens=64)
    c = m.config
    assert eng.pool.bytes_per_token == 4 * (2 * (c.head_dim + c.index_head_dim) / 4 + c.head_dim / 8)
    # K=V window rings (4 layers); kv + gate rings of the last 2 * rate tokens (CSA: compressor + indexer, 2x
    # wide for the overlap) or the last rate (HCA)
    rings = 4 * c.sliding_window * c.head_dim + 2 * 2 * (2 * 4) * 2 * (c.head_dim + c.index_head_dim)
    rings += 2 * 8 * c.head_dim
    assert eng.pool.lane_bytes == 4 * rings  # fp32, per running sequence


def fp4_quantize(w: torch.Tensor, group: int = 32):
    """The test's own FP4 encoder (OCP MX e2m1, power-of-two scale per 1 x 32): (packed int8 [r, c/2], scale
    [r, c/group] as float8_e8m0fnu, the exact values those codes stand for [r, c])."""
    mags = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    r, c = w.shape
    g = w.float().view(r, c // group, group)
    scale = torch.exp2(torch.ceil(torch.log2(g.abs().amax(-1).clamp(min=1e-30) / 6)))  # absmax -> at most 6
    x = g / scale[..., None]
    mag = (x.abs()[..., None] - mags).abs().argmin(-1)
    code = (mag | (x < 0).long() << 3).view(r, c)
    packed = (code[:, 0::2] | code[:, 1::2] << 4).to(torch.uint8).view(torch.int8)  # even column in the low nibble
    value = (mags[mag] * torch.where(x < 0, -1.0, 1.0) * scale[..., None]).view(r, c)
    return packed, scale.to(torch.float8_e8m0fnu), value


@pytest.mark.parametrize("scale_as,suffix,experts", [("e8m0", ".weight_scale_inv", "fp4"), ("e8m0", ".scale", "fp4"),
                                                      ("uint8", ".weight_scale_inv", "fp4"),
                                                      ("float", ".scale", "fp8")])
def test_quantised_experts_load_like_transformers(tmp_path, scale_as, suffix, experts):
    """A V4 checkpoint with its routed experts in FP4 (int8, two e2m1 codes per byte, a ue8m0 scale per 32 columns,
    as DeepSeek releases V4; scales named X.weight_scale_inv as HF writes them or X.scale as DeepSeek does, the
    latter beside FP8 attention weights) or in FP8 loads dequantised: the same logits as the model holding the exact
    quantised values, and as transformers loading it with FineGrainedFP8Config(dequantize=True). With fp8=True it
    keeps them quantised in memory (V4QuantExperts, FP8Linear): the same logits and engine tokens, fewer bytes."""
    import json

    from safetensors.torch import load_file, save_file

    import sobre
    from sobre import Engine
    from sobre.fp8 import FP8Linear, V4QuantExperts, dequantize, quantize, weight_bytes
    m = ours_from(hf_model(seed=9))
    path = sobre.save(m, tmp_path / "v4")
    tensors, exact = {}, {}
    for name, t in load_file(path / "model.safetensors").items():
        base = name.removesuffix(".weight")
        if ".experts." in name and name.endswith(".weight") and experts == "fp4":
            packed, scale, exact[name] = fp4_quantize(t)
            tensors[name] = packed
            tensors[base + suffix] = scale if scale_as == "e8m0" else scale.view(torch.uint8)  # the exponent byte
        elif suffix == ".scale" and (name.endswith(("wq_a.weight", "wo_a.weight")) or ".experts." in name):
            tensors[name], tensors[base + suffix] = quantize(t)
            exact[name] = dequantize(*quantize(t), (128, 128))
        else:
            tensors[name] = t
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                  "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    cfg["expert_dtype"] = experts
    (path / "config.json").write_text(json.dumps(cfg))
    from sobre.names import v4_saved
    with torch.no_grad():  # the reference: the model with the exact values the FP4 / FP8 codes stand for
        for name, t in v4_saved(m):
            if name in exact:
                t.copy_(exact[name])
    x = torch.randint(0, 128, (1, 33), generator=torch.Generator().manual_seed(8))
    ours, kept = sobre.load(path), sobre.load(path, fp8=True)
    assert ours.layers[1].mlp.experts.gate_up_proj.dtype == torch.float32
    q = kept.layers[1].mlp.experts
    assert isinstance(q, V4QuantExperts) and q.fmt == experts
    assert q.gate_up_proj.dtype == (torch.int8 if experts == "fp4" else torch.float8_e4m3fn)
    assert isinstance(kept.layers[0].self_attn.q_a_proj, FP8Linear) == (suffix == ".scale")
    assert weight_bytes(kept) < weight_bytes(ours) * 0.6
    with torch.no_grad():
        want = m(x)
        torch.testing.assert_close(ours(x), want, atol=1e-4, rtol=0)
        torch.testing.assert_close(kept(x), ours(x), atol=1e-5, rtol=0)
        if scale_as == "e8m0":  # transformers reads float scales (uint8 is MXFP8's exponent-byte form)
            hf = transformers.DeepseekV4ForCausalLM.from_pretrained(
                path, quantization_config=transformers.FineGrainedFP8Config(dequantize=True), dtype=torch.float32,
                attn_implementation="eager").eval()
            torch.testing.assert_close(hf(x).logits, want, atol=1e-4, rtol=0)
    prompts = [x[0, :9].tolist(), x[0, 9:14].tolist()]
    assert Engine(kept).generate(prompts, max_new_tokens=6) == Engine(ours).generate(prompts, max_new_tokens=6)
    if experts == "fp8":
        return
    tensors[next(n for n in tensors if n.endswith("w1" + suffix))] = torch.ones(3, 3)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="FP4 scale shape"):
        sobre.load(path)
    cfg["expert_dtype"] = "fp2"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="expert_dtype 'fp2'"):
        sobre.load(path)


def test_mtp_module_predicts_two_ahead_causally():
    """V4's MTP module (not in transformers; DeepSeek's layout): depth-1 logits at position i see tokens up to
    i + 1 only, the main logits are the same with or without it, and save -> load keeps its weights."""
    import sobre
    from sobre.v4 import init_weights
    c = Config.from_hf(transformers.DeepseekV4Config(**HF).to_dict())
    assert c.n_mtp_layers == 1  # num_nextn_predict_layers
    m = init_weights(V4Transformer(c), std=0.1, seed=0).eval()
    x = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[0, 20] = (x[0, 20] + 1) % 128
    with torch.no_grad():
        (logits, (mtp,)), (_, (mtp_y,)) = m(x, mtp=True), m(y, mtp=True)
        torch.testing.assert_close(logits, m(x), atol=0, rtol=0)
    assert mtp.shape == (1, 29, 128)
    assert (mtp[:, :19] - mtp_y[:, :19]).abs().max() < 1e-5 and (mtp[:, 19] - mtp_y[:, 19]).abs().max() > 1e-2
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        back = sobre.load(sobre.save(m, d))
        assert back.config.n_mtp_layers == 1
        with torch.no_grad():
            torch.testing.assert_close(back(x, mtp=True)[1][0], mtp, atol=1e-5, rtol=0)
        assert len(sobre.load(d, mtp=False).mtp) == 0
        from safetensors.torch import load_file, save_file
        t = load_file(f"{d}/model.safetensors")
        t["mtp.0.markov_head.markov_w1.weight"] = torch.zeros(128, 8)  # another release's extra draft head
        save_file(t, f"{d}/model.safetensors", metadata={"format": "pt"})
        with pytest.warns(UserWarning, match="markov_head.*without its MTP module"):
            lean = sobre.load(d)
        assert len(lean.mtp) == 0
        with torch.no_grad():
            torch.testing.assert_close(lean(x), logits, atol=1e-5, rtol=0)


def test_speculative_decoding_with_the_mtp_module(monkeypatch):
    """The engine drafts with V4's MTP module and verifies [pending, draft] in one forward (rings read before
    the new rows are written, windows completed by either token pooled): greedy tokens equal plain greedy,
    batched and alone; with an oracle draft (the main model's own next hidden) every draft is accepted, two
    tokens per step, and the MTP layer's own incremental hiddens (its cache catching up two positions a step)
    equal the module run over the whole sequence."""
    import sobre
    from sobre.v4 import init_weights
    c = Config.from_hf(transformers.DeepseekV4Config(**{**HF, "sliding_window": 4}).to_dict())
    m = init_weights(V4Transformer(c), std=0.1, seed=3).eval()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (9, 1, 17, 6)]
    plain = sobre.Engine(m, max_batch=2, block=8).generate(prompts, max_new_tokens=14)
    eng = sobre.Engine(m, max_batch=2, block=8, speculative=True)
    assert eng.generate(prompts, max_new_tokens=14) == plain
    assert [eng.generate([p], max_new_tokens=14)[0] for p in prompts] == plain
    chunked = sobre.Engine(m, max_batch=2, block=8, speculative=True, prefill_chunk=5)  # MTP catches up in chunks
    assert chunked.generate(prompts, max_new_tokens=14) == plain
    mtp_hidden, drafted = m.mtp_hidden, []

    def oracle(h, tokens, cache, k=0, last=False):
        out = mtp_hidden(h, tokens, cache, k, last)  # (last: the last row only)
        drafted.extend((s.rid, cache.pos[b, -out.shape[1]:], out[b]) for b, s in enumerate(cache.seqs))
        out = out.clone()
        for b, s in enumerate(cache.seqs):  # the draft: the main model's next hidden, always right
            out[b, -1] = m.hidden(torch.tensor([s.prompt + s.out]))[0, -1]
        return out

    monkeypatch.setattr(m, "mtp_hidden", oracle)
    eng = sobre.Engine(m, max_batch=2, block=8, speculative=True)
    assert eng.generate(prompts, max_new_tokens=14) == plain
    with torch.no_grad():  # the MTP layer's incremental hiddens (catching up 2 tokens a step) == the module run
        for rid, p in enumerate(prompts):  # over the whole sequence (training's mtp_logits)
            full = m(torch.tensor([p + plain[rid]]), mtp=True)[1][0][0]  # [L - 1, V]
            for pos, h in [(pos, h) for r, pos, h in drafted if r == rid]:
                torch.testing.assert_close(m.head(h), full[pos], atol=1e-4, rtol=0)
    assert eng.spec_stats["accepted"] == eng.spec_stats["drafted"] > 20


def test_sinkhorn_projection_is_doubly_stochastic():
    """mHC's comb matrices: rows and columns sum to 1 (all positive) after the Sinkhorn-Knopp iterations, from
    the projection itself and from a hyper-connection's forward; the numpy path (a decode step's few rows on
    the CPU) equals the torch path (autograd, or many rows)."""
    from sobre.v4 import HyperConnection, sinkhorn
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(5, 3, 4, 4, generator=g).softmax(-1) + 1e-6  # (sharper inputs converge slower in 20 rounds)
    fast = sinkhorn(raw, 20, 1e-6)
    slow = sinkhorn(raw.clone().requires_grad_(), 20, 1e-6)  # autograd: the torch path
    torch.testing.assert_close(fast, slow.detach(), atol=1e-7, rtol=0)
    big = sinkhorn(raw.repeat(20, 1, 1, 1), 20, 1e-6)  # > 1024 values: the torch path
    torch.testing.assert_close(big[:5], fast, atol=1e-7, rtol=0)
    for comb in (fast, slow.detach()):
        assert (comb > 0).all()
        torch.testing.assert_close(comb.sum(-1), torch.ones(5, 3, 4), atol=1e-5, rtol=0)
        torch.testing.assert_close(comb.sum(-2), torch.ones(5, 3, 4), atol=1e-5, rtol=0)
    c = Config.from_hf(transformers.DeepseekV4Config(**HF).to_dict())
    hc = HyperConnection(c)
    with torch.no_grad():
        hc.fn.normal_(0, 0.05, generator=g)
        hc.base.normal_(0, 0.5, generator=g)
        post, comb, x = hc(torch.randn(2, 7, c.hc_mult, c.dim, generator=g))
    assert comb.shape == (2, 7, c.hc_mult, c.hc_mult) and x.shape == (2, 7, c.dim)
    torch.testing.assert_close(comb.sum(-1), torch.ones(2, 7, c.hc_mult), atol=1e-5, rtol=0)
    torch.testing.assert_close(comb.sum(-2), torch.ones(2, 7, c.hc_mult), atol=1e-5, rtol=0)


def test_chunked_attention_equals_the_dense_reference(monkeypatch):
    """Past ATTN_CHUNK queries attention runs chunk by chunk over the window band each chunk sees plus the
    entries (recomputed in the backward pass), and CSA gathers each query's top-k entries once there are more
    than CSA_GATHER x k of them: logits, every gradient and the CSA indexers' KL equal the one-chunk dense
    masked reference, in training and in the engine's prompt forwards."""
    import sobre
    import sobre.v4
    from sobre.engine import Engine
    from sobre.v4 import init_weights
    c = Config.from_hf(transformers.DeepseekV4Config(**HF).to_dict())
    m = init_weights(V4Transformer(c), std=0.1, seed=0).train()
    x = torch.randint(0, 128, (2, 70), generator=torch.Generator().manual_seed(1))  # 17 CSA entries, top-4

    def setup(chunk, gather):
        monkeypatch.setattr(sobre.v4, "ATTN_CHUNK", chunk)
        monkeypatch.setattr(sobre.v4, "CSA_GATHER", gather)

    def run(chunk, gather):
        setup(chunk, gather)
        m.zero_grad()
        logits, (mtp,) = m(x, mtp=True)
        kl = [a.indexer_loss for a in m.modules() if isinstance(a, sobre.v4.Attention) and a.kind == "csa"]
        (logits.square().mean() + mtp.square().mean() + sum(kl)).backward()
        return logits, torch.stack(kl), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    want, kl, grads = run(1024, 10**9)
    for chunk, gather in ((16, 10**9), (16, 4), (1024, 4)):
        got, kl_c, grads_c = run(chunk, gather)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(kl_c, kl, atol=1e-6, rtol=1e-5)
        assert grads_c.keys() == grads.keys()
        for n in grads:
            assert (grads_c[n] - grads[n]).abs().max() <= 1e-4 * grads[n].abs().max() + 1e-7, (chunk, gather, n)
    m.eval()
    prompts = [x[0].tolist(), x[1, :45].tolist()]
    setup(1024, 10**9)
    ref = Engine(m, prefill_chunk=64).generate(prompts, max_new_tokens=8)
    for chunk, gather in ((16, 10**9), (16, 4)):
        setup(chunk, gather)
        assert Engine(m, prefill_chunk=64).generate(prompts, max_new_tokens=8) == ref, (chunk, gather)


def test_compiled_engine_decodes_like_eager(monkeypatch):
    """Engine(compile=True) on a V4 model (v4cache.V4Step: every row pools the window its token may complete,
    stored only where it does; CSA always gathers its top-k): a ragged batch of three decodes across window,
    compression (4, 8) and block boundaries and past the indexer's top-k, in one graph, with the eager engine's
    greedy tokens and chosen-token logprobs. Traced by dynamo and AOT autograd (functionalised cache writes)
    without inductor's C++ build (~150 s here; test_compile.py builds the V3 step with it)."""
    from torch._dynamo.utils import counters

    from sobre import Engine
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, dynamic, options: real(fn, dynamic=dynamic, backend="aot_eager"))
    m = ours_from(hf_model(seed=2, sliding_window=4, num_hidden_layers=2, hc_sinkhorn_iters=3, mlp_layer_types=[
        "hash_moe", "moe"], layer_types=[
        "compressed_sparse_attention", "heavily_compressed_attention"]))
    prompts = [list(range(5, 14)), list(range(40, 57)), [3, 4]]  # ends at 9, 17, 2: windows complete apart
    runs = []
    counters.clear()
    for compile in (False, True):
        eng = Engine(m, max_batch=3, block=8, compile=compile)
        rids = [eng.add_request(p, max_new_tokens=20, logprobs=0) for p in prompts]
        while eng.has_work():
            eng.step()
        done = eng.collect()
        runs.append(([done[r].out for r in rids], torch.tensor([lp for r in rids for lp, _ in done[r].logprobs])))
    (want, want_lp), (got, got_lp) = runs
    assert got == want and all(len(o) == 20 for o in got)
    torch.testing.assert_close(got_lp, want_lp, rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1  # B = 3 at every context: one dynamic graph


@pytest.mark.parametrize("window", [4, 12])  # the window ring shorter than a block, and spanning two
def test_prefix_cache_restores_the_rings_and_changes_nothing(window):
    """The engine's prefix cache on a V4 model: cached blocks hold the compressed entries, and the rings' rows at
    each cached block's end are kept and restored into the lane of a later prompt that starts with those blocks,
    which then prefills only its tail (whole, or in chunks): greedy output equals an engine without the cache.
    The kept rows are budgeted (least recently used dropped first: a match backs off to the last block that
    still has them)."""
    from sobre import Engine
    hf = hf_model(seed=3, sliding_window=window, compress_rates={"compressed_sparse_attention": 4,
                                                                 "heavily_compressed_attention": 16})
    m = ours_from(hf)
    g = torch.Generator().manual_seed(4)
    system = torch.randint(0, 128, (30,), generator=g).tolist()
    prompts = [system + torch.randint(0, 128, (n,), generator=g).tolist() for n in (5, 13, 1)] + [system[:27]]
    ref = Engine(m, block=8).generate(prompts, max_new_tokens=8)
    for chunk in (1024, 5):
        eng = Engine(m, block=8, prefix_cache=True, prefill_chunk=chunk)
        assert eng.generate(prompts[:1], max_new_tokens=8) == ref[:1]
        assert len(eng.pool.rings_at) == 4  # the first prompt's four full blocks
        done = run_requests(eng, prompts[1:], max_new_tokens=8)
        assert [s.out for s in done] == ref[1:]
        assert [s.cached for s in done] == [24, 24, 24]  # the system prompt's three full blocks
    eng = Engine(m, block=8, prefix_cache=True)
    eng.pool.max_rings_at = 2  # room for two blocks' ring rows: the first prompt's last two keep theirs
    eng.generate(prompts[:1], max_new_tokens=8)
    assert eng.generate(prompts[1:2], max_new_tokens=8) == ref[1:2] and eng.prefix_stats["hit"] == 24  # block 3's
    eng = Engine(m, block=8, prefix_cache=True)
    eng.pool.max_rings_at = 1  # only the first prompt's 4th block: the second prompt shares blocks 1-3, none kept
    eng.generate(prompts[:1], max_new_tokens=8)
    assert eng.generate(prompts[1:2], max_new_tokens=8) == ref[1:2] and eng.prefix_stats["hit"] == 0


@pytest.mark.parametrize("window", [4, 12])
def test_prefix_cache_keeps_the_mtp_ring_for_speculative_decoding(window, monkeypatch):
    """With speculative decoding the prefix cache also keeps the MTP layer's ring rows at each cached block's end
    (taken when that layer catches up on the prompt, the step after its prefill): a later prompt sharing those
    blocks gets them restored, and the MTP layer's hiddens (each draft's input) equal an engine's without the
    cache, as do the greedy tokens (prompts whole or in chunks)."""
    from sobre import Engine
    from sobre.v4 import init_weights
    c = Config.from_hf(transformers.DeepseekV4Config(**{**HF, "sliding_window": window}).to_dict())
    m = init_weights(V4Transformer(c), std=0.1, seed=3).eval()
    g = torch.Generator().manual_seed(4)
    system = torch.randint(0, 128, (30,), generator=g).tolist()
    prompts = [system + torch.randint(0, 128, (n,), generator=g).tolist() for n in (5, 13, 1)]
    mtp_hidden, log = m.mtp_hidden, {}

    def record(h, tokens, cache, k=0, last=False):
        out = mtp_hidden(h, tokens, cache, k, last)
        for b, s in enumerate(cache.seqs):
            log.setdefault(s.rid, []).append(out[b, -1].clone())
        return out

    monkeypatch.setattr(m, "mtp_hidden", record)
    runs = []
    for chunk in (1024, 5):
        for cache in (False, True):
            log = {}
            eng = Engine(m, block=8, speculative=True, prefix_cache=cache, prefill_chunk=chunk)
            out = eng.generate(prompts[:1], max_new_tokens=8) + [s.out for s in run_requests(
                eng, prompts[1:], max_new_tokens=8)]
            runs.append((out, log, eng.prefix_stats["hit"], eng.spec_stats["drafted"]))
    (out, log, hit, drafted), (out_c, log_c, hit_c, drafted_c) = runs[:2]
    assert out_c == out == runs[2][0] == runs[3][0] and drafted_c == drafted > 0
    assert hit == 0 and hit_c == runs[3][2] == 48  # the system prompt's three full blocks, twice
    assert log_c.keys() == log.keys() and len(log) == 3
    for rid in log:  # (one MTP call a step: the prompt's catch-up, then a draft per verify)
        torch.testing.assert_close(torch.stack(log_c[rid]), torch.stack(log[rid]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_v4_norm_equals_its_formula(dtype):
    """V4's RMSNorm (the V3 norm's fp32 paths: CPU training's backward by hand) equals its formula, normalised and
    scaled in fp32 and cast once, in output and both gradients, in training and inference."""
    import torch.nn.functional as F

    from sobre.v4 import RMSNorm
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(32, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32, generator=g))
    x = (torch.randn(5, 32, generator=g) * torch.logspace(-3, 2, 5)[:, None]).to(dtype).requires_grad_()
    out = norm(x)
    ref = (norm.weight.float() * F.rms_norm(x.float(), (32,), eps=1e-6)).to(dtype)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref)
    up = torch.randn(5, 32, generator=g).to(dtype)
    got = torch.autograd.grad((out * up).sum(), (x, norm.weight))
    want = torch.autograd.grad((ref * up).sum(), (x, norm.weight))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4 if dtype == torch.float32 else 2e-2, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(norm(x), ref)
