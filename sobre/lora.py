"""LoRA (Hu et al. 2021) as PEFT has it: trainable low-rank adapters beside a frozen model's linear layers, for
fine-tuning (sft, distill, grpo --lora-rank R) a model whose full AdamW state would not fit, and PEFT-format
adapters read (merged into the weights as a checkpoint loads) and written.

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T        A [r, in] (kaiming-uniform), B [out, r] (zeros)

so a fresh adapter changes nothing. Targets are named as PEFT's `target_modules`, by the HF module's last name
(q_proj, kv_b_proj, gate_proj, ...); the default is every linear layer of the decoder blocks (PEFT's
"all-linear": attention and MLP / shared-expert projections; not the routed experts, router, DSA indexer, NSA
gates, MTP module, embedding or head). DeepSeek-V4 (its modules keep transformers' names): V4_TARGETS, named as
PEFT's target_modules by their last two names (self_attn.kv_proj: the compressors' kv_proj and gate_proj and the
indexer's q_b_proj share the last one) or by the last alone. The frozen reference of GRPO's KL is the model with
its adapters off.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from . import parallel
from .int8 import Int8Linear
from .linear import dense_weight
from .model import Transformer
from .names import HF_LAYER_MODULES, hf_to_ours

# the linear layers LoRA may adapt, by PEFT's target names (the last name of names.LAYER_MODULES' HF side)
TARGETS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "k_proj", "v_proj", "o_proj",
           "gate_proj", "up_proj", "down_proj")
PREFIX = "base_model.model."  # PEFT's key prefix (PeftModel -> LoraModel -> the transformers model)
# DeepSeek-V4's: attention's and the shared expert's projections, by the last two names of their modules; not the
# grouped o_a_proj (one product per head group: a plain adapter's [in, out] does not fit it, nor peft's layer), the
# compressors, the indexer, the routed experts or the routers
V4_TARGETS = ("self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_proj", "self_attn.o_b_proj",
              "shared_experts.gate_proj", "shared_experts.up_proj", "shared_experts.down_proj")


@dataclass
class TuneArgs:
    """The flags of the verbs that fine-tune (sft, distill, grpo): LoRA, FSDP under torchrun, the indexers' KL."""
    lora_rank: int = 0  # r > 0: train LoRA adapters of rank r, the model frozen (0: every weight trains)
    lora_alpha: float = 0.0  # scale alpha / r (0: alpha = 2 r)
    lora_dropout: float = 0.0  # on the adapters' input, training only
    lora_targets: tuple[str, ...] = ()  # PEFT target_modules names (q_proj, kv_b_proj, ...); empty: all-linear
    int8: bool = False  # --lora-rank on the model's weights in int8 (QLoRA-style: a quarter of fp32's bytes; the
    #   head, embedding and what int8.SKIP names stay fp32)
    fsdp: bool = False  # under torchrun: the blocks sharded over the ranks (FSDP2) instead of a replica each
    indexer_kl: float = 0.0  # > 0: DSA's / V4's CSA indexers keep learning from their KL to the main attention, this
    #   weight in the loss (V3.2's post-training; pretrain's is 1); 0: they stay as they are, their KL not made

    def frozen_int8(self) -> dict:
        """start_model's keywords for --int8: the weights in int8 as they load, the head kept (the fused
        cross-entropy reads it whole)."""
        return {"int8": True, "int8_skip": ("head", "lm_head")} if self.int8 else {}  # (V4's: lm_head)

    def check_lora(self, init: str):
        if self.lora_rank < 0 or not 0 <= self.lora_dropout < 1 or self.lora_alpha < 0:
            raise ValueError(f"--lora-rank must be >= 0, --lora-alpha >= 0 and --lora-dropout in [0, 1), got "
                             f"{self.lora_rank}, {self.lora_alpha}, {self.lora_dropout}")
        if self.lora_rank and not init:
            raise ValueError("--lora-rank adapts a trained model: give --init (a fresh model trains all its weights)")
        if self.indexer_kl and self.lora_rank:
            raise ValueError("--indexer-kl trains the sparse-attention indexers, which --lora-rank freezes")
        if (self.lora_targets or self.int8) and not self.lora_rank:
            raise ValueError(f"--{'int8' if self.int8 else 'lora-targets'} needs --lora-rank R (int8 weights stay "
                             "frozen: they train through adapters)")
        known = {*TARGETS, *V4_TARGETS, *(t.rpartition(".")[2] for t in V4_TARGETS)}
        if bad := sorted(set(self.lora_targets) - known):
            raise ValueError(f"--lora-targets: unknown module {bad[0]!r}; choose among {', '.join(TARGETS)} "
                             f"(DeepSeek-V4: {', '.join(V4_TARGETS)}, or their last names)")

    def check_fsdp(self, world: int):
        """--fsdp only among several torchrun processes, and not on int8 weights (buffers, which FSDP2 leaves
        whole on every rank: nothing of the frozen model would be sharded)."""
        if self.fsdp and world == 1:
            raise ValueError("--fsdp shards the blocks over torchrun's processes: run under torchrun "
                             "--nproc_per_node N")
        if self.fsdp and self.int8:
            raise ValueError("--fsdp with --int8: FSDP2 shards parameters, and int8 weights are buffers it would "
                             "leave whole on every rank (drop one of them)")


class LoRALinear(nn.Module):
    """A frozen linear layer (`base`) plus a trainable rank-r update. `weight` is the merged matrix, for code that
    reads it (absorbed MLA's W_UK / W_UV); forward never builds it (twin: F.linear(x, weight, bias), tested)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.base = base.requires_grad_(False)
        A = nn.init.kaiming_uniform_(torch.empty(rank, base.in_features), a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(A.to(base.weight.device))  # nn.Linear's init, as PEFT's
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        self.scale, self.enabled = alpha / rank, True
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:  # [out, in]
        w = dense_weight(self.base, torch.float32)  # (int8 codes dequantised)
        return w + self.scale * (self.lora_B @ self.lora_A).to(w.dtype) if self.enabled else w

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x):  # x [..., in] -> [..., out]
        y = self.base(x)
        if not self.enabled:
            return y
        return y + self.scale * F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))

    def extra_repr(self) -> str:
        return f"rank={self.lora_A.shape[0]}, scale={self.scale:g}"


def _hf_module(name: str) -> str:
    """Our decoder-layer module name -> transformers' (layers.3.attn.wkv_b -> model.layers.3.self_attn.kv_b_proj;
    DeepSeek-V4's modules have transformers' names already)."""
    i, rest = re.fullmatch(r"layers\.(\d+)\.(.+)", name).groups()
    return f"model.layers.{i}.{HF_LAYER_MODULES.get(rest, rest)}"


def v4_target(module: str) -> str | None:
    """The V4_TARGETS entry a V4 module name (ours or transformers') ends with, or None."""
    return next((t for t in V4_TARGETS if module.endswith("." + t)), None)


def targets(model: nn.Module, names: tuple[str, ...] = ()) -> dict[str, nn.Linear]:
    """The model's linear layers PEFT's target_modules `names` (empty: all of TARGETS, V4_TARGETS for DeepSeek-V4)
    pick, by our module name."""
    if getattr(model.config, "arch", "") == "deepseek_v4":
        return _v4_targets(model, names)
    if not isinstance(model, Transformer):
        raise ValueError(f"LoRA adapts DeepSeek and dense models; not {type(model).__name__}")
    if bad := sorted(set(names) - set(TARGETS)):
        raise ValueError(f"LoRA adapts {', '.join(TARGETS)} of a {model.config.arch} model, not {bad}")
    names = set(names or TARGETS)
    leaf = {ours: hf.rpartition(".")[2] for ours, hf in HF_LAYER_MODULES.items()}
    found = {}
    for name, m in model.layers.named_modules(prefix="layers"):
        rest = name.split(".", 2)[2] if name.count(".") >= 2 else ""
        if leaf.get(rest) in names:
            if not isinstance(m, (nn.Linear, Int8Linear)):
                raise ValueError(f"{name} is {type(m).__name__}: LoRA adapts full-precision or int8 linear layers "
                                 "(not --fp8's)")
            found[name] = m
    if not found:
        raise ValueError(f"no module of this {model.config.arch} model is named {sorted(names)}")
    return found


def _v4_targets(model: nn.Module, names: tuple[str, ...]) -> dict[str, nn.Linear]:
    """targets() of a DeepSeek-V4 model: V4_TARGETS, each picked by its last two names or its last alone."""
    picked = [t for t in V4_TARGETS if not names or t in names or t.rpartition(".")[2] in names]
    unknown = [n for n in names if not any(n in (t, t.rpartition(".")[2]) for t in V4_TARGETS)]
    if unknown or not picked:
        raise ValueError(f"LoRA adapts {', '.join(V4_TARGETS)} of a DeepSeek-V4 model, not {unknown or names}")
    found = {}
    for name, m in model.layers.named_modules(prefix="layers"):
        if v4_target(name) in picked:
            if not isinstance(m, (nn.Linear, Int8Linear)):
                raise ValueError(f"{name} is {type(m).__name__}: LoRA adapts full-precision or int8 linear layers "
                                 "(not --fp8's)")
            found[name] = m
    return found


def add_lora(model: nn.Module, rank: int, alpha: float = 0.0, dropout: float = 0.0, names: tuple[str, ...] = (),
             seed: int = 0) -> list[str]:
    """Freeze the model and put a LoRA adapter beside each target (alpha 0: 2 x rank; A drawn from `seed`); the
    adapted module names."""
    found = targets(model, names)
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for name, m in found.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(m, rank, alpha or 2 * rank, dropout, g))
    return list(found)


def adapters(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def fingerprint(model: nn.Module, state: dict | None = None) -> torch.Tensor:
    """A few values of every frozen parameter: an adapter-only checkpoint resumes only on the model it was
    trained on. state: their whole values by name (a full state dict); without it an FSDP-sharded parameter is
    all-gathered (every rank calls it)."""
    frozen = [(n, p) for n, p in sorted(model.named_parameters()) if not p.requires_grad]
    whole = [state[n] if state is not None else parallel.whole(p) for n, p in frozen]
    return torch.cat([p.detach().flatten()[::max(1, p.numel() // 16)][:16].float().cpu() for p in whole])


@contextmanager
def disabled(model: nn.Module):
    """The model without its adapters (the frozen reference of GRPO's KL), for the duration."""
    mods = list(adapters(model).values())
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m in mods:
            m.enabled = True


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer's weight and put the plain layer back (the model as a checkpoint)."""
    for name, m in adapters(model).items():
        if not m.base.weight.is_floating_point():
            raise ValueError(f"{name}: an adapter on int8 weights merges into the full-precision model as it loads "
                             "(sobre.load(base, adapter=...)), not into the int8 codes")
        m.base.weight += m.scale * (m.lora_B @ m.lora_A).to(m.base.weight.dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, m.base)
    return model


def save_adapter(model: nn.Module, path, base: str):
    """The adapters in PEFT's format (adapter_config.json + adapter_model.safetensors; PeftModel.from_pretrained
    loads them onto transformers' model of `base`), with a model card."""
    mods = adapters(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters to save")
    first = next(iter(mods.values()))
    rank = first.lora_A.shape[0]
    tensors = {}
    for name, m in mods.items():
        key = PREFIX + _hf_module(name)
        tensors[key + ".lora_A.weight"] = m.lora_A.detach().float().contiguous().cpu()
        tensors[key + ".lora_B.weight"] = m.lora_B.detach().float().contiguous().cpu()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    v4 = model.config.arch == "deepseek_v4"  # (V4: by the last two names, as V4_TARGETS)
    names = sorted({v4_target(n) if v4 else _hf_module(n).rpartition(".")[2] for n in mods})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": rank,
              "lora_alpha": first.scale * rank, "lora_dropout": 0.0, "target_modules": names, "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
              "init_lora_weights": True, "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {}}
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    n = sum(t.numel() for t in tensors.values())
    mlp = {"gate_proj", "up_proj", "down_proj"} & set(names)
    caveat = (f"\n\npeft (0.21, transformers 5) maps {', '.join(sorted(mlp))} of a MoE model to its routed experts "
              "and drops these MLP adapters: load this adapter with sobre (`--adapter`) or use the merged model."
              if mlp and model.config.n_routed_experts else "")
    (path / "README.md").write_text(
        f"---\nlibrary_name: peft\nbase_model: {base}\ntags: [lora, sobre]\n---\n\n# LoRA adapter\n\n"
        f"Rank {rank}, alpha {first.scale * rank:g}, on {', '.join(names)} of {len(mods)} layers' modules "
        f"({n:,} parameters), trained with sobre.\n\n```python\nfrom peft import PeftModel\nfrom transformers "
        f"import AutoModelForCausalLM\nmodel = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("
        f"{base!r}), 'THIS_FOLDER')\n```\n\nor `sobre serve {base} --adapter THIS_FOLDER`.{caveat}\n")


def read_adapter(path, config) -> dict[str, torch.Tensor]:
    """A PEFT LoRA adapter folder -> {our weight name: the fp32 update scale * B @ A to add to it} for a model of
    `config` (adapter_factors, multiplied out)."""
    return {name: scale * (B @ A) for name, (A, B, scale) in adapter_factors(path, config).items()}


def adapter_factors(path, config) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """A PEFT LoRA adapter folder -> {our weight name: (A [r, in], B [out, r] in fp32, scale)} for a model of
    `config`; what it cannot merge exactly (DoRA, trained biases, extra saved modules, embedding adapters) is
    refused."""
    path = Path(path)
    cfg_file, w_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.exists() or not w_file.exists():
        raise FileNotFoundError(f"{path}: a PEFT adapter folder holds adapter_config.json and "
                                "adapter_model.safetensors (adapter_model.bin is not read: pickle)")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r}; only LORA adapters are read")
    for key, ok in (("use_dora", False), ("fan_in_fan_out", False), ("lora_bias", False), ("bias", "none")):
        if cfg.get(key, ok) != ok:
            raise ValueError(f"{cfg_file}: {key}={cfg[key]!r} is not supported (a plain LoRA update only)")
    if cfg.get("modules_to_save") or cfg.get("target_parameters"):
        raise ValueError(f"{cfg_file}: modules_to_save / target_parameters are not supported")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(w_file).items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        if m is None:
            raise ValueError(f"{w_file}: tensor {key!r} is not a LoRA A / B matrix of a linear layer")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    out = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{w_file}: {module} has lora_{next(iter(ab))} without its pair")
        target = _adapted(module, config)
        if target is None:
            raise ValueError(f"{w_file}: {module} is not a linear layer of this {config.arch} model with "
                             f"{config.n_layers} layers" + (" that sobre adapts" if config.arch == "deepseek_v4"
                                                            else ""))
        A, B = ab["A"].float(), ab["B"].float()
        r = A.shape[0]
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != r:
            raise ValueError(f"{w_file}: {module}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not pair")
        alpha = _pattern(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8))
        out[target] = A, B, alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
    return out


def _adapted(module: str, config) -> str | None:
    """Our weight name of the linear layer an adapter's module (transformers' name) adapts; None where it is none
    of this model's (DeepSeek-V4: none of V4_TARGETS)."""
    layer = re.match(r"model\.layers\.(\d+)\.", module)
    if not layer or int(layer.group(1)) >= config.n_layers:
        return None
    if config.arch == "deepseek_v4":
        return module.removeprefix("model.") + ".weight" if v4_target(module) else None
    try:
        target = hf_to_ours(module + ".weight", config)
    except KeyError:
        return None
    return None if target is None or target[1] is not None else target[0]


class Rows:
    """Which adapter each batch row of the next forward uses (MultiLoRA): ids[b] an index into the served
    adapters, or None (the base model), and per adapter used its rows (`of`: a tensor, or None for every row),
    found once per forward for all the adapted layers. The engine sets them as it makes each forward's batch."""

    def __init__(self, device):
        self.device, self.ids, self.of = device, [], {}

    def set(self, ids: list[int | None]):
        self.ids, self.of = ids, {}
        for a in set(ids) - {None}:
            rows = [b for b, i in enumerate(ids) if i == a]
            self.of[a] = None if len(rows) == len(ids) else torch.tensor(rows, device=self.device)


class MultiLoRA(nn.Module):
    """A linear layer serving several adapters at once, each batch row its own (or none), as vLLM's multi-LoRA:
    y_b = x_b W^T + bias + s_a x_b A_a^T B_a^T for row b's adapter a, the rows of one adapter in one pair of
    matmuls. `pairs` {adapter index: (A [r, in], B [out, r], scale)}: the adapters that adapt this layer. Its
    twin is a model with that adapter merged (tests/test_lora.py)."""

    def __init__(self, base: nn.Module, pairs: dict[int, tuple], rows: Rows):
        super().__init__()
        self.base, self.pairs, self.rows = base, pairs, rows

    @property
    def weight(self) -> torch.Tensor:  # the base's (absorbed MLA adds the adapters' terms: absorbed_q / _o)
        return self.base.weight

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:  # (int8 base weights, as absorbed MLA reads them)
        return dense_weight(self.base, dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def active(self) -> bool:
        """Whether a row of this forward uses an adapter of this layer."""
        return any(a in self.rows.of for a in self.pairs)

    def groups(self):
        """(batch rows [n] or None for all of them, A, B, scale) per adapter of this layer that rows of this
        forward use."""
        for a, (A, B, scale) in self.pairs.items():
            if a in self.rows.of:
                yield self.rows.of[a], A, B, scale

    def forward(self, x):  # x [B, ..., in] or [B * T, in] (rows in batch order) -> [..., out]
        y = self.base(x)
        if not self.active:
            return y
        n = len(self.rows.ids)
        xb, yb = x.reshape(n, -1, x.shape[-1]), y.view(n, -1, y.shape[-1])
        for r, A, B, scale in self.groups():
            add_rows(yb, r, F.linear(F.linear(pick(xb, r), A), B), scale)
        return y

    # absorbed MLA on an adapted kv_b_proj, W [H * (dn + dv), r] + s B A: the adapters' share of W_UK's and
    # W_UV's products, through the rank, never a per-row weight (W_UK, W_UV: each head's first dn / last dv rows)
    def absorbed_q(self, q_nope: torch.Tensor) -> torch.Tensor:
        """q_nope [B, T, H, dn] -> its rows' s (q_nope B_UK) A [B, T, H, r] (zero for rows without an adapter)."""
        Bsz, T, H, dn = q_nope.shape
        out = q_nope.new_zeros(Bsz, T, H, self.base.weight.shape[1])
        for r, A, B, scale in self.groups():
            b_uk = B.view(H, -1, B.shape[1])[:, :dn]  # [H, dn, rank]
            add_rows(out, r, torch.einsum("bthd,hdk->bthk", pick(q_nope, r), b_uk) @ A, scale)
        return out

    def absorbed_o(self, o_lat: torch.Tensor, dn: int) -> torch.Tensor:
        """o_lat [B, T, H, r] -> its rows' s (o_lat A^T) B_UV^T [B, T, H, dv] (zero for rows without an adapter)."""
        Bsz, T, H, _ = o_lat.shape
        out = o_lat.new_zeros(Bsz, T, H, self.base.weight.shape[0] // H - dn)
        for r, A, B, scale in self.groups():
            b_uv = B.view(H, -1, B.shape[1])[:, dn:]  # [H, dv, rank]
            add_rows(out, r, torch.einsum("bthk,hvk->bthv", pick(o_lat, r) @ A.t(), b_uv), scale)
        return out


def pick(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """x's batch rows (dim 0), or x itself for rows None (every row, nothing gathered)."""
    return x if rows is None else x.index_select(0, rows)


def add_rows(out: torch.Tensor, rows: torch.Tensor | None, t: torch.Tensor, scale: float):
    """out[rows] += scale * t along dim 0 (rows None: every row)."""
    if rows is None:
        out.add_(t, alpha=scale)
    else:
        out.index_add_(0, rows, t, alpha=scale)


def serve_adapters(model: nn.Module, factors: list[dict]) -> Rows:
    """Put a MultiLoRA in place of every linear layer some adapter (adapter_factors, by index) adapts; -> the
    Rows the engine sets per forward. DSA models' kv_b_proj is refused (their sparse attention reads its weight
    whole: merge such an adapter, --adapter); absorbed MLA adds kv_b's terms itself (absorbed_q / absorbed_o)."""
    p = model.embed.weight  # (the model's dtype and device: an int8 model's embedding stays in it)
    rows = Rows(p.device)
    found = targets(model)
    for name in sorted({n.rpartition(".")[0] for f in factors for n in f}):
        if name not in found:
            raise ValueError(f"a LoRA adapter adapts {name}, which is not a linear layer sobre serves adapters on")
        if name.endswith("attn.wkv_b") and model.config.attn_type == "dsa":
            raise ValueError(f"a LoRA adapter on {_hf_module(name)} of a DSA model is merged (--adapter), not served "
                             "beside others (its sparse attention reads the weight whole)")
        pairs = {}
        for i, f in enumerate(factors):
            if name + ".weight" in f:
                A, B, scale = f[name + ".weight"]
                pairs[i] = A.to(p.device, p.dtype), B.to(p.device, p.dtype), scale
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, MultiLoRA(found[name], pairs, rows))
    return rows


def _pattern(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module's name."""
    return next((v for k, v in patterns.items() if re.match(rf"(.*\.)?(?:{k})$", module)), default)
