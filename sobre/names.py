"""The one table between Hugging Face tensor names and ours (torchtitan's state_dict_adapter): the V3 family's
(DeepSeek-V3 / R1, V3.2, V2, Qwen2 / Qwen3, Llama) and DeepSeek-V4's, both ways. checkpoint.py reads and writes
the tensors; LoRA adapters (lora.py) name their layers from here too.
"""

from __future__ import annotations

import re

import torch

from .config import Config
from .model import Transformer

# HF module path inside a decoder layer -> ours inside a Block (parameter names .weight/.bias follow)
LAYER_MODULES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn.wq", "self_attn.q_a_proj": "attn.wq_a", "self_attn.q_a_layernorm": "attn.q_norm",
    "self_attn.q_b_proj": "attn.wq_b", "self_attn.kv_a_proj_with_mqa": "attn.wkv_a",
    "self_attn.kv_a_layernorm": "attn.kv_norm", "self_attn.kv_b_proj": "attn.wkv_b",
    "self_attn.k_proj": "attn.wk", "self_attn.v_proj": "attn.wv", "self_attn.o_proj": "attn.wo",
    "self_attn.q_norm": "attn.q_head_norm", "self_attn.k_norm": "attn.k_head_norm",  # Qwen3's per-head norms
    "self_attn.indexer.wq_b": "attn.indexer.wq_b", "self_attn.indexer.wk": "attn.indexer.wk",  # V3.2's DSA
    "self_attn.indexer.k_norm": "attn.indexer.k_norm", "self_attn.indexer.weights_proj": "attn.indexer.weights_proj",
    "self_attn.nsa_gate": "attn.gate", "self_attn.compress_k": "attn.cmp_k", "self_attn.compress_v": "attn.cmp_v",
    "mlp.gate_proj": "ffn.w1", "mlp.up_proj": "ffn.w3", "mlp.down_proj": "ffn.w2",
    "mlp.gate": "ffn.gate", "mlp.shared_experts.gate_proj": "ffn.shared.w1",
    "mlp.shared_experts.up_proj": "ffn.shared.w3", "mlp.shared_experts.down_proj": "ffn.shared.w2",
}
HF_LAYER_MODULES = {ours: hf for hf, ours in LAYER_MODULES.items()}  # the inverse: ours -> HF
TOP = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight", "lm_head.weight": "head.weight"}
MTP_OWN = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
           "shared_head.norm.weight": "norm.weight"}
MTP_SHARED = ("embed_tokens.weight", "shared_head.head.weight")  # copies of the model's own: not loaded
EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")
EXPERT_W = {"gate": "w1", "up": "w3", "down": "w2"}
GATE_BIAS = ("e_score_correction_bias", "bias")  # the router's balancing bias: HF name, ours


# DeepSeek-V4's released tensor names -> transformers' module names, which v4.py keeps (the same table
# transformers applies; names already in transformers' form pass through unchanged)
V4_RENAMES = [(r"\.attn\.", ".self_attn."), (r"\.ffn\.", ".mlp."), (r"\.indexer\.compressor\.", ".compressor.indexer."),
              (r"^embed\.weight", "embed_tokens.weight"), (r"^head\.weight", "lm_head.weight"),
              (r"^hc_head_(fn|base|scale)", r"hc_head.hc_\1"), (r"\.attn_norm\.", ".input_layernorm."),
              (r"\.ffn_norm\.", ".post_attention_layernorm."), (r"\.hc_(attn|ffn)_(fn|base|scale)", r".\1_hc.\2"),
              (r"\.attn_sink", ".sinks"), (r"\.indexer\.weights_proj\.", ".compressor.indexer.scorer.weights_proj."),
              (r"\.indexer\.wq_b\.", ".compressor.indexer.q_b_proj."), (r"\.norm\.", ".kv_norm."),
              (r"\.ape$", ".position_bias"), (r"\.wq_a\.", ".q_a_proj."),
              (r"\.self_attn\.wq_b\.", ".self_attn.q_b_proj."),
              (r"\.wkv\.", ".kv_proj."), (r"\.wgate\.", ".gate_proj."), (r"\.wo_a\.", ".o_a_proj."),
              (r"\.wo_b\.", ".o_b_proj."), (r"\.q_norm\.", ".q_a_norm."),
              (r"\.gate\.bias$", ".gate.e_score_correction_bias"),
              (r"\.shared_experts\.w1\.", ".shared_experts.gate_proj."),
              (r"\.shared_experts\.w2\.", ".shared_experts.down_proj."),
              (r"\.shared_experts\.w3\.", ".shared_experts.up_proj.")]
V4_EXPERT = re.compile(r"(.+\.experts)\.(\d+)\.(w1|w2|w3)\.weight")


V4_SAVE = [(r"\.self_attn\.compressor\.indexer\.q_b_proj\.", ".attn.indexer.wq_b."),
            (r"\.self_attn\.compressor\.indexer\.scorer\.weights_proj\.", ".attn.indexer.weights_proj."),
            (r"\.self_attn\.compressor\.indexer\.", ".attn.indexer.compressor."), (r"\.self_attn\.", ".attn."),
            (r"\.mlp\.shared_experts\.gate_proj\.", ".ffn.shared_experts.w1."),
            (r"\.mlp\.shared_experts\.down_proj\.", ".ffn.shared_experts.w2."),
            (r"\.mlp\.shared_experts\.up_proj\.", ".ffn.shared_experts.w3."),
            (r"\.mlp\.gate\.e_score_correction_bias$", ".ffn.gate.bias"), (r"\.mlp\.", ".ffn."),
            (r"\.input_layernorm\.", ".attn_norm."), (r"\.post_attention_layernorm\.", ".ffn_norm."),
            (r"\.(attn|ffn)_hc\.(fn|base|scale)$", r".hc_\1_\2"), (r"\.sinks$", ".attn_sink"),
            (r"\.kv_norm\.", ".norm."), (r"\.position_bias$", ".ape"), (r"\.q_a_proj\.", ".wq_a."),
            (r"\.attn\.q_b_proj\.", ".attn.wq_b."), (r"\.kv_proj\.", ".wkv."), (r"\.gate_proj\.", ".wgate."),
            (r"\.o_a_proj\.", ".wo_a."), (r"\.o_b_proj\.", ".wo_b."), (r"\.q_a_norm\.", ".q_norm.")]


V4_FP32 = re.compile(r"hc_|attn_sink$|\.ape$|norm\.weight$|gate\.bias$")  # saved in fp32, as transformers keeps them


def v4_saved(model):
    """(name, tensor) in the layout transformers writes for deepseek_v4: DeepSeek's names inside the layers,
    experts one matrix each (w1 / w3 = the halves of gate_up_proj, w2 = down_proj); MTP modules under DeepSeek's
    own names (mtp.K.e_proj, mtp.K.hc_head_fn, mtp.K.<its layer's tensors>), which transformers skips."""
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            yield "head.weight", t
        elif m := re.fullmatch(r"mtp\.(\d+)\.(.+)", name):
            k, rest = m.groups()
            if rest.startswith("block."):
                for n, x in _v4_layer_saved("layers.0." + rest.removeprefix("block."), t):
                    yield n.replace("model.layers.0.", f"mtp.{k}.", 1), x
            else:
                yield f"mtp.{k}." + re.sub(r"^hc_head\.hc_", "hc_head_", rest), t
        elif name.startswith("layers."):
            yield from _v4_layer_saved(name, t)
        else:
            yield "model." + name, t


def _v4_layer_saved(name: str, t: torch.Tensor):
    out = "model." + name
    for pat, rep in V4_SAVE:
        out = re.sub(pat, rep, out)
    if not out.endswith(("experts.gate_up_proj", "experts.down_proj")):
        yield out, t
        return
    base = out.rsplit(".", 1)[0]
    for e in range(t.shape[0]):
        if out.endswith("gate_up_proj"):
            w1, w3 = t[e].chunk(2, dim=0)
            yield f"{base}.{e}.w1.weight", w1
            yield f"{base}.{e}.w3.weight", w3
        else:
            yield f"{base}.{e}.w2.weight", t[e]


V4_MTP_OWN = ("e_proj.weight", "h_proj.weight", "enorm.weight", "hnorm.weight", "norm.weight")
V4_MTP_SHARED = ("embed.weight", "head.weight", "embed_tokens.weight", "shared_head.head.weight")  # the main model's


def v4_name(name: str, n_mtp: int = 0):
    """-> (our name, expert index | (expert, half of gate_up_proj) | None), or None for a tensor left out on
    purpose (an MTP module beyond n_mtp, the MTP's copies of the shared embedding and head)."""
    name = name.removeprefix("model.")
    if m := re.fullmatch(r"mtp\.(\d+)\.(.+)", name):
        k, rest = int(m.group(1)), m.group(2)
        if k >= n_mtp or rest in V4_MTP_SHARED:
            return None
        if rest in V4_MTP_OWN:
            return f"mtp.{k}.{rest}", None
        if h := re.fullmatch(r"hc_head_(fn|base|scale)", rest):
            return f"mtp.{k}.hc_head.hc_{h.group(1)}", None
        ours, idx = v4_name("layers.0." + rest)
        return ours.replace("layers.0.", f"mtp.{k}.block.", 1), idx
    for pat, rep in V4_RENAMES:
        name = re.sub(pat, rep, name)
    if m := V4_EXPERT.fullmatch(name):  # per-expert w1/w3 halves of gate_up_proj [E, 2I, D]; w2 -> down_proj
        e, w = int(m.group(2)), m.group(3)
        return (f"{m.group(1)}.down_proj", e) if w == "w2" else (f"{m.group(1)}.gate_up_proj", (e, w == "w3"))
    return name, None


def hf_to_ours(name: str, c: Config) -> tuple[str, int | None] | None:
    """HF tensor name -> (our parameter name, expert index or None); None for tensors we skip on purpose.
    Raises KeyError for names that belong to no part of the model."""
    if c.arch == "deepseek_v4":
        return v4_name(name, c.n_mtp_layers)
    if name in TOP:
        return TOP[name], None
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if not m:
        raise KeyError(name)
    i, rest = int(m.group(1)), m.group(2)
    if i < c.n_layers:
        prefix = f"layers.{i}."
    elif i < c.n_layers + c.n_mtp_layers:
        prefix = f"mtp.{i - c.n_layers}."
        if rest in MTP_OWN:
            return prefix + MTP_OWN[rest], None
        if rest in MTP_SHARED:
            return None
        prefix += "block."
    else:
        raise KeyError(name)
    if em := EXPERT.fullmatch(rest):
        return f"{prefix}ffn.experts.{EXPERT_W[em.group(2)]}", int(em.group(1))
    module, param = rest.rsplit(".", 1)
    if module not in LAYER_MODULES:
        raise KeyError(name)
    if module == "mlp.gate" and param == GATE_BIAS[0]:
        param = GATE_BIAS[1]
    return f"{prefix}{LAYER_MODULES[module]}.{param}", None


def ours_to_hf(model: Transformer):
    """Yield (HF name, tensor) for every tensor of the model, experts unstacked."""
    c = model.config
    if c.arch == "deepseek_v4":
        yield from v4_saved(model)
        return
    inv_top = {v: k for k, v in TOP.items()}
    inv_mtp = {v: k for k, v in MTP_OWN.items()}
    inv_expert = {v: k for k, v in EXPERT_W.items()}
    for name, t in model.state_dict().items():
        if name in inv_top:
            if name == "head.weight" and c.tie_embeddings:
                continue
            yield inv_top[name], t
            continue
        kind, idx, rest = name.split(".", 2)
        layer = int(idx) if kind == "layers" else c.n_layers + int(idx)
        base = f"model.layers.{layer}."
        if kind == "mtp":
            if rest in inv_mtp:
                yield base + inv_mtp[rest], t
                continue
            rest = rest.removeprefix("block.")
        module, param = rest.rsplit(".", 1)
        if module == "ffn.experts":
            for e in range(t.shape[0]):
                yield f"{base}mlp.experts.{e}.{inv_expert[param]}_proj.weight", t[e]
        else:
            if module == "ffn.gate" and param == GATE_BIAS[1]:
                param = GATE_BIAS[0]
            yield f"{base}{HF_LAYER_MODULES[module]}.{param}", t
