"""Int8 weight-only inference (W8A16): every linear layer's and routed expert's weight kept as int8 with one scale
per output row, a quarter of fp32's bytes and half of bf16's.

A decode step multiplies a few rows by every weight matrix, so on a CPU its time is the time to read the weights.
`torch.ops.aten._weight_int8pack_mm` multiplies bf16 rows by int8 weights without materialising them in high
precision ([1, 1536] x [8960, 1536]: 0.58 ms against 1.4 ms for bf16 `torch.mv` and 3.6 ms in fp32 on a 2-core AVX2
CPU; `python bench/dense.py --int8` times whole models). Activations enter it in bf16 and leave in their own
dtype. The kernel steps through in_features 16 at a time with aligned loads on AVX-512 CPUs (8 on AVX2): it needs
in_features % 16 == 0 and rows at 32-byte addresses (in % 8 alone crashed it on an AVX-512 Xeon, e.g. a 200-wide
expert layer); those layers, and other devices, take the reference path: the rows' matmul with the weight
dequantised a slice at a time (`int8_reference`, the twin the tests hold the kernel to).

Symmetric per-row quantisation: scale = absmax / 127, q = round(w / scale). Left in their own precision: the
embedding (a lookup reads one row), the routers (fp32, as in the reference code), MLA's wkv_b and V4's o_a_proj
(read as whole matrices by the absorbed attention) and V4's routed experts (`--fp8` keeps their FP4 / FP8 codes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .experts import dispatch, per_expert
from .moe import Experts

SKIP = ("embed", "wkv_b", "o_a_proj")  # module names whose weights stay as loaded (read whole, or looked up)
CHUNK = 4096  # reference path: output rows dequantised at a time


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., out, in] -> (int8 codes [..., out, in], fp32 scales [..., out]): each row's absmax maps to 127."""
    w = w.detach().float()
    scale = (w.abs().amax(-1) / 127).clamp(min=1e-12)
    return (w / scale[..., None]).round_().clamp_(-127, 127).to(torch.int8), scale


def int8_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ (q [out, in] * scale [out, None]).T -> [..., out] in x's dtype: the int8 kernel on the CPU for
    in % 16 == 0, else `int8_reference`. An x that needs a gradient (LoRA on int8 weights) takes Int8Grad."""
    K = q.shape[1]
    if x.requires_grad and torch.is_grad_enabled():
        return Int8Grad.apply(x, q, scale)
    if x.device.type != "cpu" or K % 16 or q.data_ptr() % 16:
        return int8_reference(x, q, scale)
    rows = x.reshape(-1, K).to(torch.bfloat16).contiguous()
    if rows.data_ptr() % 32:  # (a view at an odd offset: the kernel's aligned loads need a fresh copy)
        rows = rows.clone()
    y = torch.ops.aten._weight_int8pack_mm(rows, q, scale.to(torch.bfloat16))
    return y.to(x.dtype).view(*x.shape[:-1], -1)


def dequantized_rows(q: torch.Tensor, scale: torch.Tensor, r: int, dtype: torch.dtype) -> torch.Tensor:
    """Output rows r .. r + CHUNK of the weight q [out, in] * scale [out, None], in dtype."""
    return q[r:r + CHUNK].to(dtype) * scale[r:r + CHUNK, None].to(dtype)


def int8_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The twin of int8_mm: CHUNK output rows at a time dequantised to x's dtype, then F.linear."""
    outs = [F.linear(x, dequantized_rows(q, scale, r, x.dtype)) for r in range(0, q.shape[0], CHUNK)]
    return torch.cat(outs, -1) if len(outs) > 1 else outs[0]


class Int8Grad(torch.autograd.Function):
    """int8_reference with x's gradient, the weight dequantised again a slice at a time in the backward (autograd
    would keep every slice: the whole weight in x's dtype, what int8 is there to avoid). Training shapes take
    this path, not the kernel: 256 rows x [4864, 896] in fp32 took 20 ms here, the bf16-activation kernel 38 ms."""

    @staticmethod
    def forward(ctx, x, q, scale):
        ctx.save_for_backward(q, scale)
        return int8_reference(x, q, scale)

    @staticmethod
    def backward(ctx, g):  # g [..., out] -> [..., in]
        q, scale = ctx.saved_tensors
        gx = None
        for r in range(0, q.shape[0], CHUNK):
            part = g[..., r:r + CHUNK] @ dequantized_rows(q, scale, r, g.dtype)
            gx = part if gx is None else gx.add_(part)
        return gx, None, None


class Int8Linear(nn.Module):
    """nn.Linear (weight [out, in], optional bias) with the weight as int8 codes + per-row scales: quantised from
    `linear`, or (fill=False) left empty for checkpoint.load to quantise each tensor as it arrives."""

    MATRICES = {"weight": "scale"}  # int8 buffer -> its scales' buffer

    def __init__(self, linear: nn.Linear, fill: bool = True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        _int8_buffers(self, {"weight": linear.weight}, fill)
        self.bias = linear.bias

    def forward(self, x):
        y = int8_mm(x, self.weight, self.scale)
        return y if self.bias is None else y + self.bias

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        """The whole weight in high precision (FP8Linear's method: for code that reads the matrix, e.g. LoRA's)."""
        return self.weight.to(dtype) * self.scale[:, None].to(dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-row scales"


class Int8Experts(nn.Module):
    """moe.Experts (w1 / w3 [E, I, D], w2 [E, D, I]) in int8 with per-row scales; each active expert's three
    matrices multiply its own rows through int8_mm."""

    MATRICES = {"w1": "w1_scale", "w2": "w2_scale", "w3": "w3_scale"}

    def __init__(self, experts: Experts, fill: bool = True):
        super().__init__()
        _int8_buffers(self, {k: getattr(experts, k) for k in self.MATRICES}, fill)

    def forward(self, x, w, idx):  # moe.Experts' dispatch
        return dispatch(x, w, idx, self.w1.shape[0], self.ffn)

    def ffn(self, xs, counts: list[int]):  # rows sorted by expert
        return per_expert(xs, counts, self._ffn)

    def _ffn(self, seg, e: int):
        return self._mm(F.silu(self._mm(seg, "w1", e)) * self._mm(seg, "w3", e), "w2", e)

    def _mm(self, a, name: str, e: int):
        return int8_mm(a, getattr(self, name)[e], getattr(self, name + "_scale")[e])

    def extra_repr(self) -> str:
        return f"experts={self.w1.shape[0]}, int8 per-row scales"


def _int8_buffers(mod: nn.Module, weights: dict, fill: bool):
    """mod's int8 buffers (names as weights', contiguous) and their scales (mod.MATRICES): quantised from the
    weights, or empty (fill=False: not a byte of the weights read)."""
    for name, w in weights.items():
        if fill:
            q, scale = quantize_rows(w)
        else:
            q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
            scale = torch.empty(w.shape[:-1], device=w.device)
        mod.register_buffer(name, q.contiguous())
        mod.register_buffer(mod.MATRICES[name], scale)


@torch.no_grad()
def quantize_int8(model: nn.Module, fill: bool = True, skip: tuple[str, ...] = ()) -> dict:
    """Swap, in place, every nn.Linear (sobre's Linear included) for an Int8Linear and every moe.Experts for an
    Int8Experts, but those named in SKIP or `skip`. A head tied to the embedding gets its own int8 copy (the
    lookup keeps the table). -> {module name: relative weight error ||W - dequant(quant(W))|| / ||W||}.
    fill=False: empty int8 modules (checkpoint.load quantises into them; `int8_scale` names each code's scales)
    -> {}."""
    report = {}
    for name, mod in list(model.named_modules()):
        if any(s in name.split(".") for s in SKIP + skip) or not isinstance(mod, (nn.Linear, Experts)):
            continue
        new = (Int8Linear if isinstance(mod, nn.Linear) else Int8Experts)(mod, fill)
        if fill:
            pairs = [(getattr(mod, k), getattr(new, k), getattr(new, v)) for k, v in new.MATRICES.items()]
            err = sum(float((q.float() * s[..., None] - w.float()).norm() ** 2) for w, q, s in pairs)
            report[name] = (err / sum(float(w.float().norm() ** 2) for w, _, _ in pairs)) ** 0.5
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return report


def int8_scale(model: nn.Module, name: str) -> str | None:
    """The scales' buffer name of the int8 buffer `name` (None: no int8 code of an Int8Linear / Int8Experts)."""
    parent, _, child = name.rpartition(".")
    mod = model.get_submodule(parent) if parent else model
    scale = getattr(mod, "MATRICES", {}).get(child) if isinstance(mod, (Int8Linear, Int8Experts)) else None
    return f"{parent}.{scale}" if scale and parent else scale
