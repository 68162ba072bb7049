"""One config dataclass for the whole model family, with the paper's names.

HF `config.json` names live only at the boundary: `Config.from_hf` / `Config.to_hf` map them once (hfconfig.py).
Supported `model_type`s: deepseek_v3 (V3, R1, V3.1), deepseek_v32 (V3.2: V3 with DeepSeek Sparse Attention),
deepseek_v2 (V2, V2-Lite, V2.5), qwen2 and llama (the R1-Distill students), qwen3 (DeepSeek-R1-0528-Qwen3-8B:
Qwen2's layout without biases, each head's q and k RMS-normed before RoPE). sobre's own extension: attn_type
"nsa" (Native Sparse Attention on grouped-query heads) on a deepseek_v3 model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

ARCHS = ("deepseek_v3", "deepseek_v32", "deepseek_v2", "qwen2", "llama", "qwen3", "deepseek_v4")
DENSE_ARCHS = ("qwen2", "llama", "qwen3")
MLA_ARCHS = ("deepseek_v3", "deepseek_v32", "deepseek_v2")
ATTN_TYPES = ("full", "nsa", "dsa")
V4_LAYER_TYPES = ("sliding", "csa", "hca")  # HF: sliding_attention, compressed_sparse_attention, heavily_compressed_...


@dataclass
class Config:
    arch: str = "deepseek_v3"
    vocab_size: int = 512
    dim: int = 64  # hidden_size
    inter_dim: int = 128  # intermediate_size of dense FFNs
    n_layers: int = 3
    n_heads: int = 4
    norm_eps: float = 1e-6
    max_seq_len: int = 512  # max_position_embeddings
    tie_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    # dense attention (qwen2 / llama / qwen3): grouped-query heads
    n_kv_heads: int = 0  # 0 -> n_heads
    head_dim: int = 0  # 0 -> dim // n_heads
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # qwen3: RMSNorm over each head's q and k, before RoPE
    # MLA (deepseek_v2 / v3)
    q_lora_rank: int = 32  # 0 -> full-rank wq
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    # DeepSeekMoE
    n_routed_experts: int = 8  # 0 -> every layer dense
    n_shared_experts: int = 1
    n_activated_experts: int = 2  # num_experts_per_tok
    moe_inter_dim: int = 32
    n_dense_layers: int = 1  # first_k_dense_replace
    moe_layer_freq: int = 1
    n_expert_groups: int = 2  # n_group
    n_limited_groups: int = 1  # topk_group
    score_func: str = "sigmoid"  # sigmoid (V3) | softmax (V2)
    topk_method: str = "noaux_tc"  # noaux_tc (V3) | greedy | group_limited_greedy (V2)
    route_scale: float = 1.0  # routed_scaling_factor
    norm_topk_prob: bool = True
    # multi-token prediction
    n_mtp_layers: int = 1  # num_nextn_predict_layers
    # RoPE (+ YaRN / llama3 scaling)
    rope_theta: float = 10000.0
    rope_type: str = "default"  # default | yarn | llama3
    rope_factor: float = 1.0
    original_seq_len: int = 0  # original_max_position_embeddings
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    rope_attn_factor: float = 0.0  # YaRN's cos/sin magnitude where the checkpoint sets it (0: from factor, mscale)
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    rope_interleave: bool = True  # DeepSeek checkpoints rotate interleaved pairs; Qwen/Llama rotate halves
    # sparse attention (sparse.py): "full" | "nsa" (deepseek_v3 with GQA heads) | "dsa" (= deepseek_v32)
    attn_type: str = "full"
    nsa_block: int = 32  # compression block length l
    nsa_stride: int = 16  # compression stride d
    nsa_select: int = 64  # selection block length l'
    nsa_top_n: int = 16  # selected blocks per query (incl. the first and two local ones)
    nsa_window: int = 512  # sliding window w
    index_n_heads: int = 4  # DSA lightning indexer
    index_head_dim: int = 16
    index_topk: int = 2048
    # DeepSeek-V4 (v4.py): hybrid sliding / CSA / HCA attention, mHC residual streams, hash-routed MoE
    layer_types: list = dataclasses.field(default_factory=list)  # per layer: sliding | csa | hca
    sliding_window: int = 128
    compress_rate_csa: int = 4
    compress_rate_hca: int = 128
    compress_rope_theta: float = 160000.0
    o_groups: int = 2  # grouped low-rank output projection
    o_lora_rank: int = 32
    hc_mult: int = 4  # mHC streams
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    n_hash_layers: int = 0  # the first n MoE layers route by a fixed token -> experts table
    swiglu_limit: float = 0.0  # clamp of the SwiGLU pre-activations (0: off)
    # implementation switches (not part of the checkpoint)
    attn_impl: str = "naive"  # naive (expand K/V) | absorb (attention in latent space)
    seed: int = 0

    def __post_init__(self):
        if self.attn_type == "dsa" and self.arch == "deepseek_v3" or self.arch == "deepseek_v32" and \
                self.attn_type == "full":  # V3.2 is V3 with DSA: one model, two spellings
            self.arch, self.attn_type = "deepseek_v32", "dsa"
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def is_mla(self) -> bool:
        return self.arch in MLA_ARCHS and self.attn_type != "nsa"

    @property
    def is_dense_arch(self) -> bool:  # qwen2 / llama / qwen3: no MoE, no MTP
        return self.arch in DENSE_ARCHS

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dense_head_dim(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.is_mla or self.arch == "deepseek_v4" else self.dense_head_dim

    def compress_rate(self, kind: str) -> int:  # deepseek_v4: tokens per compressed entry of a csa / hca layer
        return self.compress_rate_csa if kind == "csa" else self.compress_rate_hca

    def is_moe_layer(self, i: int) -> bool:
        return self.n_routed_experts > 0 and i >= self.n_dense_layers and i % self.moe_layer_freq == 0

    @property
    def rope_magnitude(self) -> float:
        """YaRN's cos/sin magnitude (transformers' attention_factor): the checkpoint's, else mscale / mscale_all_dim
        (DeepSeek's), else 0.1 ln(factor) + 1."""
        if self.rope_type != "yarn":
            return 1.0
        if self.rope_attn_factor:
            return self.rope_attn_factor
        if self.mscale and self.mscale_all_dim:
            return self.yarn_mscale(self.mscale) / self.yarn_mscale(self.mscale_all_dim)
        return 0.1 * math.log(self.rope_factor) + 1.0 if self.rope_factor > 1 else 1.0

    def yarn_mscale(self, m: float) -> float:
        if self.rope_type != "yarn" or self.rope_factor <= 1 or not m:
            return 1.0
        return 0.1 * m * math.log(self.rope_factor) + 1.0

    @property
    def softmax_scale(self) -> float:
        d = self.qk_head_dim if self.is_mla else self.dense_head_dim
        # YaRN's attention temperature, folded into the softmax scale as in DeepSeek's reference code
        return d**-0.5 * self.yarn_mscale(self.mscale_all_dim) ** 2 if self.is_mla else d**-0.5

    # ---- validation ----------------------------------------------------------------------
    def validate(self):
        def bad(key, msg):
            raise ValueError(f"config: {key}={getattr(self, key, None)!r}: {msg}")

        if self.arch not in ARCHS:
            bad("arch", f"unsupported model type, expected one of {ARCHS}")
        for k in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            if getattr(self, k) <= 0:
                bad(k, "must be positive")
        if self.attn_impl not in ("naive", "absorb"):
            bad("attn_impl", "expected 'naive' or 'absorb'")
        if self.rope_type not in ("default", "yarn", "llama3"):
            bad("rope_type", "expected 'default', 'yarn' or 'llama3'")
        if not 0 <= self.rope_attn_factor < math.inf:
            bad("rope_attn_factor", "YaRN's cos/sin magnitude must be a finite number >= 0 (0: from the factor)")
        if self.rope_type != "default" and self.original_seq_len <= 0:
            bad("original_seq_len", f"rope_type {self.rope_type!r} needs original_max_position_embeddings")
        if self.rope_dim % 2:
            bad("qk_rope_head_dim" if self.is_mla else "head_dim", "rotary dim must be even")
        if self.attn_type not in ATTN_TYPES:
            bad("attn_type", f"expected one of {ATTN_TYPES}")
        if (self.attn_type == "dsa") != (self.arch == "deepseek_v32"):
            bad("attn_type", "DeepSeek Sparse Attention is the deepseek_v32 model type (MLA + indexer)")
        if self.attn_type == "nsa":
            if self.arch != "deepseek_v3":
                bad("attn_type", "nsa replaces the attention of a deepseek_v3 model")
            for k in ("nsa_block", "nsa_stride", "nsa_select", "nsa_top_n", "nsa_window"):
                if getattr(self, k) <= 0:
                    bad(k, "must be positive")
            if self.nsa_stride > self.nsa_block:
                bad("nsa_stride", f"must be <= nsa_block={self.nsa_block} (blocks overlap or touch, never skip)")
        if self.attn_type == "dsa":
            for k in ("index_n_heads", "index_head_dim", "index_topk", "q_lora_rank"):
                if getattr(self, k) <= 0:
                    bad(k, "must be positive for DSA (the indexer reads the compressed query)")
            if self.index_head_dim < self.qk_rope_head_dim:
                bad("index_head_dim", f"must hold the rope slice ({self.qk_rope_head_dim})")
        if self.is_mla:
            for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, k) <= 0:
                    bad(k, "must be positive for MLA models")
            if self.q_lora_rank < 0:
                bad("q_lora_rank", "must be >= 0 (0 means no query compression)")
        else:
            if self.head_dim == 0 and self.dim % self.n_heads:
                bad("n_heads", f"hidden size {self.dim} is not divisible by {self.n_heads} heads")
            if self.n_heads % self.kv_heads:
                bad("n_kv_heads", f"{self.n_heads} heads are not divisible into {self.kv_heads} kv heads")
        if self.is_dense_arch:
            if self.n_routed_experts:
                bad("n_routed_experts", f"{self.arch} models are dense")
            if self.n_mtp_layers:
                bad("n_mtp_layers", f"{self.arch} models have no MTP module")
            if self.attn_type != "full":
                bad("attn_type", f"{self.arch} models use full attention")
        if self.qk_norm and self.arch != "qwen3":
            bad("qk_norm", "per-head q / k norms are qwen3's")
        if self.arch == "deepseek_v4":
            self._validate_v4(bad)
        if self.n_routed_experts:
            if self.score_func not in ("sigmoid", "softmax", "sqrtsoftplus"):
                bad("score_func", "expected 'sigmoid', 'softmax' or 'sqrtsoftplus'")
            if self.topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"):
                bad("topk_method", "expected 'noaux_tc', 'greedy' or 'group_limited_greedy'")
            if not 0 < self.n_activated_experts <= self.n_routed_experts:
                bad("n_activated_experts", f"must be in 1..n_routed_experts={self.n_routed_experts}")
            if self.n_expert_groups <= 0 or self.n_routed_experts % self.n_expert_groups:
                bad("n_expert_groups", f"must divide n_routed_experts={self.n_routed_experts}")
            if not 0 < self.n_limited_groups <= self.n_expert_groups:
                bad("n_limited_groups", f"must be in 1..n_expert_groups={self.n_expert_groups}")
            per_group = self.n_routed_experts // self.n_expert_groups
            if self.topk_method == "noaux_tc" and self.n_expert_groups > 1 and per_group < 2:
                bad("n_expert_groups", "noaux_tc scores a group by its top-2 experts: need >= 2 experts per group")
            if self.n_limited_groups * per_group < self.n_activated_experts and self.topk_method != "greedy":
                bad("n_limited_groups", "the selected groups hold fewer experts than n_activated_experts")
            if self.moe_inter_dim <= 0 or self.moe_layer_freq <= 0:
                bad("moe_inter_dim", "moe_inter_dim and moe_layer_freq must be positive")

    def _validate_v4(self, bad):
        if len(self.layer_types) != self.n_layers or set(self.layer_types) - set(V4_LAYER_TYPES):
            bad("layer_types", f"need one of {V4_LAYER_TYPES} per layer ({self.n_layers} layers)")
        for k in ("head_dim", "q_lora_rank", "sliding_window", "compress_rate_csa", "compress_rate_hca", "o_groups",
                  "o_lora_rank", "hc_mult", "hc_sinkhorn_iters", "n_routed_experts"):
            if getattr(self, k) <= 0:
                bad(k, "must be positive for deepseek_v4")
        if self.kv_heads != 1:
            bad("n_kv_heads", "deepseek_v4 attention has one shared K=V head")
        if not 0 < self.qk_rope_head_dim <= self.head_dim:
            bad("qk_rope_head_dim", f"the rope slice must fit in head_dim={self.head_dim}")
        if self.n_heads % self.o_groups:
            bad("o_groups", f"must divide n_heads={self.n_heads}")
        if not 0 <= self.n_hash_layers <= self.n_layers:
            bad("n_hash_layers", f"must be in 0..n_layers={self.n_layers}")
        if "csa" in self.layer_types and self.index_head_dim < self.qk_rope_head_dim:
            bad("index_head_dim", f"must hold the rope slice ({self.qk_rope_head_dim})")

    # ---- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"config: unknown key {unknown[0]!r} (known keys: {', '.join(sorted(names))})")
        return cls(**d)

    def replace(self, **kw) -> Config:
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> Config:
        from .hfconfig import from_hf  # (hfconfig builds Configs: imported when called)
        return from_hf(hf, source)

    def to_hf(self) -> dict:
        from .hfconfig import to_hf
        return to_hf(self)

    @classmethod
    def load(cls, path: str | Path) -> Config:
        """Read an HF `config.json` (or the directory holding it)."""
        p = Path(path)
        p = p / "config.json" if p.is_dir() else p
        if not p.exists():
            raise FileNotFoundError(f"{p}: no config.json (is this a Hugging Face model directory?)")
        try:
            hf = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON ({e})") from None
        return cls.from_hf(hf, str(p))


# ---- presets: debug is what every test uses ----------------------------------------------------
PRESETS = {
    "debug": dict(),
    "tiny": dict(vocab_size=4096, dim=256, inter_dim=512, n_layers=4, n_heads=4, max_seq_len=1024,
                 q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                 n_routed_experts=16, n_activated_experts=4, moe_inter_dim=128, n_expert_groups=4,
                 n_limited_groups=2, route_scale=2.5),
    "small": dict(vocab_size=16384, dim=512, inter_dim=1408, n_layers=8, n_heads=8, max_seq_len=2048,
                  q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                  n_routed_experts=32, n_activated_experts=4, moe_inter_dim=256, n_expert_groups=4,
                  n_limited_groups=2, route_scale=2.5),
}


def at_least_one(**counts: int):
    """ValueError naming the first count below 1 (a batch, problem or sample count of 0 leaves nothing to do)."""
    for name, n in counts.items():
        if n < 1:
            raise ValueError(f"{name} must be >= 1, got {n}")


def parse_overrides(items) -> dict:
    """["nsa_window=256", "attn_impl=absorb"] -> {"nsa_window": 256, "attn_impl": "absorb"}, typed by the field."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        f = Config.__dataclass_fields__.get(key)
        if not sep or f is None or key == "arch":
            raise ValueError(f"model override {item!r}: expected KEY=VALUE with KEY a Config field (not arch)")
        kind = type(f.default)
        try:
            out[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
        except ValueError:
            raise ValueError(f"model override {item!r}: {key} takes a {kind.__name__}") from None
    return out


def preset(name: str, **overrides) -> Config:
    """A preset; arch="qwen2", "llama" or "qwen3" gives its dense twin (same sizes, grouped-query attention with
    half as many K/V heads, no MoE, no MTP), e.g. an R1-Distill-style student."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    kw = {**PRESETS[name], **overrides}
    if kw.get("arch") == "deepseek_v4":  # the V4 twin: same sizes, V4's attention, mHC and routing
        dim, heads = kw.get("dim", Config.dim), kw.get("n_heads", Config.n_heads)
        n = kw.get("n_layers", Config.n_layers)
        kw = {**PRESETS[name], **dict(
            n_kv_heads=1, head_dim=2 * dim // heads, layer_types=["sliding"] + ["csa", "hca"] * (n // 2),
            sliding_window=64, compress_rate_csa=4, compress_rate_hca=32, index_n_heads=4, index_head_dim=32,
            index_topk=64, o_groups=2 if heads % 2 == 0 else 1, o_lora_rank=dim // 2, hc_mult=4, n_hash_layers=1,
            swiglu_limit=10.0, score_func="sqrtsoftplus", n_expert_groups=1, n_limited_groups=1, n_dense_layers=0,
            n_mtp_layers=1, route_scale=1.5), **overrides}
        kw["layer_types"] = kw["layer_types"][:n]
    if kw.get("arch") in DENSE_ARCHS:
        heads = kw.get("n_heads", Config.n_heads)
        kw = {"n_kv_heads": max(1, heads // 2), "qkv_bias": kw["arch"] == "qwen2", "qk_norm": kw["arch"] == "qwen3",
              "rope_interleave": False, **kw, "n_routed_experts": 0, "n_mtp_layers": 0}
    return Config(**kw)
