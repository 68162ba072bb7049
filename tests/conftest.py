"""Shared helpers: tiny random HF checkpoints written by transformers' own save_pretrained."""

import json

import pytest
import torch

import sobre
from sobre.model import Transformer, init_weights
from sobre.moe import Gate

V3 = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
          num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, kv_lora_rank=32,
          q_lora_rank=48, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, n_group=2, topk_group=1,
          num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=256, routed_scaling_factor=2.5,
          tie_word_embeddings=False, num_nextn_predict_layers=0)
SPARSE_MODELS = {  # debug-preset overrides of small sparse-attention models
    "nsa": dict(attn_type="nsa", n_kv_heads=2, nsa_block=8, nsa_stride=4, nsa_select=16, nsa_top_n=3,
                nsa_window=16),
    "dsa": dict(attn_type="dsa", index_topk=12),
}


def randomize(model, seed=0, std=0.1):
    """Weights large enough that routing, norms and rope all matter (HF's init is nearly zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point() or "inv_freq" in name or name.startswith("rope."):
                continue
            if "norm" in name:
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
            elif "e_score_correction_bias" in name or name.endswith("gate.bias"):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(std * torch.randn(t.shape, generator=g))
    return model


def hf_checkpoint(path, model_type, seed=0, dtype=torch.float32, **kw):
    """Build a random transformers model of `model_type`, save it with save_pretrained, return the path."""
    import transformers as tf
    cls = {"deepseek_v3": (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM),
           "deepseek_v32": (tf.DeepseekV32Config, tf.DeepseekV32ForCausalLM),
           "deepseek_v2": (tf.DeepseekV2Config, tf.DeepseekV2ForCausalLM),
           "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM), "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
           "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM)}
    cfg_cls, model_cls = cls[model_type]
    torch.manual_seed(seed)
    model = randomize(model_cls(cfg_cls(**kw)), seed).to(dtype)
    model.save_pretrained(path)
    return path


def hf_logits(path, tokens, dtype=torch.float32):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():
        return model(tokens).logits


def random_model(cfg=None, seed=0, std=0.1):
    cfg = cfg or sobre.preset("debug")
    model = randomize(init_weights(Transformer(cfg)), seed, std)
    for m in model.modules():
        if isinstance(m, Gate) and m.bias is not None:
            m.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
    return model.eval()


def v4_model(seed=0, **kw):
    """A random DeepSeek-V4 model of test_v4's config (3 hash-routed MoE layers, then a learned one; kw: its HF
    config's keys)."""
    import transformers

    from sobre.config import Config
    from sobre.v4 import V4Transformer, init_weights

    from test_v4 import HF
    return init_weights(V4Transformer(Config.from_hf(transformers.DeepseekV4Config(**{**HF, **kw}).to_dict())),
                        std=0.1, seed=seed).eval()


@pytest.fixture
def debug_model():
    return random_model()


def assert_same_samples(got: list[list[int]], want: list[list[int]]):
    """Seeded samples of the same requests computed through differently shaped forwards (a prefix cache, another
    batch): equal tokens, except that float rounding (logits equal to ~1e-6) may move an inverse-CDF draw lying
    at a token boundary to the neighbouring id (sampling.draw walks the vocabulary in id order): a sequence may
    part from the other only that way, and is compared up to there. Broken seeding would part at random ids."""
    assert len(got) == len(want)
    for a, b in zip(got, want):
        j = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if j is None:
            assert len(a) == len(b)
        else:
            assert abs(a[j] - b[j]) == 1, (j, a, b)


def run_requests(eng, prompts, **kw) -> list:
    """Add every prompt to the engine at once and step until all finish: their Sequences, in prompt order."""
    rids = [eng.add_request(p, **kw) for p in prompts]
    done = {}
    while eng.has_work():
        eng.step()
        done.update(eng.collect())
    return [done[r] for r in rids]


def crash_then_resume(monkeypatch, module, train, at: int = 2) -> list[int]:
    """train(resume) runs a training verb whose steps end in module.end_step (sobre.sft, sobre.grpo: the metrics
    line and the checkpoint). The first run dies right after step `at`, as if killed there; the second resumes it.
    Returns the steps the resumed run made."""
    end_step, ran = module.end_step, []

    def crash(log, rec, run, step, *rest):
        end_step(log, rec, run, step, *rest)
        if step + 1 == at:
            raise KeyboardInterrupt

    monkeypatch.setattr(module, "end_step", crash)
    with pytest.raises(KeyboardInterrupt):
        train(False)
    monkeypatch.setattr(module, "end_step", lambda log, rec, run, step, *rest: ran.append(step + 1) or
                        end_step(log, rec, run, step, *rest))
    train(True)
    monkeypatch.setattr(module, "end_step", end_step)
    return ran


def untimed_rows(path) -> list[dict]:
    """A run's JSONL log (metrics.jsonl, eval.jsonl) without its timings (keys ending in _s or per_s)."""
    return [{k: v for k, v in json.loads(line).items() if not k.endswith(("_s", "per_s"))}
            for line in path.read_text().splitlines()]
