"""The model's linear layers: F.linear, but one row in bf16 on the CPU as a matrix-vector product; and the dtype
to decode a checkpoint in on the CPU, where bf16 pays.

A B=1 decode step multiplies one row by every weight matrix. In bf16 on the CPU, F.linear sends that row to
oneDNN's matmul, which took 1.6x as long as torch.mv for a [1536] x [8960, 1536] product and reached ~60% of
the memory bandwidth mv did (bf16 weights are read once per token: the read is the step). fp32 keeps F.linear
(MKL's matrix-vector product is already at the bandwidth), and so does a layer with a bias: torch.addmv in bf16
ran 8-10x slower than F.linear with the bias ([1, 896] x [896, 896]: 0.76 vs 0.09 ms on an AVX2 EPYC; Qwen2's
q / k / v projections decoded 0.5B models at 0.81x transformers' bf16 through it). The twin is F.linear
(tests/test_engine.py).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config
from .stats import model_stats

BF16_PARAMS = 100_000_000  # inference_dtype on a CPU with native bf16: from this many active parameters up (those a
#   token reads: a MoE's chosen experts), the checkpoint's bf16 rather than fp32. B=1 decode, bf16 vs fp32: a dense
#   0.5B model 1.25-1.6x (bench/dense.py), 39M 1.1x, 5M 0.75x; the small preset (116M, 39M active) 0.69x: small
#   matrices pay bf16's fixed cost per product, large ones read half the bytes


def native_bf16() -> bool:
    """A CPU with bf16 arithmetic of its own (AVX512-BF16; AMX machines have it)."""
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def inference_dtype(path, device=None) -> torch.dtype | None:
    """The dtype to decode a checkpoint folder in (None: its own): on CPU float32 where it fits in half the RAM and
    decodes faster, below BF16_PARAMS active parameters or without native bf16 (bench/engine.py --dtype,
    bench/dense.py)."""
    if torch.device(device or "cpu").type != "cpu":
        return None
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    s = model_stats(Config.load(path))
    fits = s["params"] * 4 <= ram / 2
    return torch.float32 if fits and (s["active_params"] < BF16_PARAMS or not native_bf16()) else None


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, b): x [..., in], w [out, in] -> [..., out]."""
    if x.dtype == w.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() == x.shape[-1] and b is None:
        return torch.mv(w, x.reshape(-1)).view(*x.shape[:-1], -1)
    return F.linear(x, w, b)


def dense_weight(m: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A linear layer's weight [out, in] for code that reads the matrix (absorbed MLA's W_UK / W_UV, V4's grouped
    output projection, LoRA's merged weight): dequantised in dtype where the layer keeps it quantised (FP8Linear,
    Int8Linear, a MultiLoRA over one), else the layer's own weight as it is."""
    return m.dequantized(dtype) if hasattr(m, "dequantized") else m.weight


class Linear(nn.Linear):
    """nn.Linear with `linear`'s one-row path (same parameters, same state dict)."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)
