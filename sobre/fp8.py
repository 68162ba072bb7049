"""FP8 (e4m3) block-scaled weights kept in memory and computed with: half of bf16's weight bytes.

DeepSeek releases V3 / R1 / V3.2 with e4m3 weights and one fp32 `scale_inv` per 128 x 128 block (V4 too, its
routed experts in FP4: `dequantize_fp4`). By default `sobre.load` dequantises them once; `sobre.load(path,
fp8=True)` keeps them: every FP8 linear layer becomes an `FP8Linear`, the routed experts an `FP8Experts`
(V3-style) or a `V4QuantExperts` (V4: FP4 codes at half a byte per weight, or e4m3), which dequantise a slice
of rows (or one expert's matrices) at a time right before its matmul, so only that slice ever exists in high
precision. The dequantise-on-load model is the
reference twin (tests hold their logits equal); `quantize_model` turns a high-precision model's linears into
FP8 the same way and reports each layer's weight error.

`fp8_linear` is the FP8 compute path (DeepGEMM's recipe): activations quantised to e4m3 per 1 x 128 tile, one
`torch._scaled_mm` per 128-wide K block with row-wise scales (tile scale x weight block scale), accumulated
in fp32. FP8Linear uses it on CUDA GPUs with FP8 tensor cores (sm89+); `set_compute(model, "scaled_mm")`
forces it anywhere torch._scaled_mm runs (CPU too: that is how the tests check it against the dequantised
twin).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .experts import dispatch, grouped_ffn, per_expert
from .linear import linear
from .v4 import grouped_swiglu

E4M3_MAX = 448.0


def dequantize(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """FP8 weight [..., rows, cols] times its per-block scale [..., ceil(rows/br), ceil(cols/bc)] -> fp32."""
    rows, cols = w.shape[-2:]
    br, bc = block
    if scale_inv.shape[-2:] != (math.ceil(rows / br), math.ceil(cols / bc)):
        raise ValueError(f"scale shape {tuple(scale_inv.shape)} does not match weight {(rows, cols)} in {block} blocks")
    s = scale_inv.float().repeat_interleave(br, -2)[..., :rows, :].repeat_interleave(bc, -1)[..., :cols]
    return w.float() * s


E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # FP4 (e2m1) magnitudes by code; code bit 3 is the sign


def dequantize_fp4(w: torch.Tensor, scale: torch.Tensor, group: int = 32) -> torch.Tensor:
    """FP4 weight [rows, cols / 2] (int8 / uint8: two e2m1 codes per byte, the low nibble first) times its scale
    per 1 x `group` columns [rows, cols / group] (ue8m0 powers of two, their uint8 exponents, or floats) -> fp32
    [rows, cols]. The layout of DeepSeek-V4's released routed experts (`expert_dtype: fp4`)."""
    u = w.view(torch.uint8)
    lut = torch.tensor(E2M1 + tuple(-x for x in E2M1), device=w.device)
    x = lut[torch.stack([u & 15, u >> 4], -1).long()].flatten(-2)  # [rows, cols]
    rows, cols = x.shape
    if cols % group or tuple(scale.shape) != (rows, cols // group):
        raise ValueError(f"FP4 scale shape {tuple(scale.shape)} does not match weight {(rows, cols)} in 1 x {group} "
                         "groups")
    s = torch.exp2(scale.float() - 127) if scale.dtype == torch.uint8 else scale.float()
    return (x.view(rows, cols // group, group) * s[..., None]).view(rows, cols)


def ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """Power-of-two scales as their ue8m0 exponent bytes (uint8; 2 ** (byte - 127)): e8m0 tensors by their bits,
    float ones by log2 (ValueError for a scale that is no power of two)."""
    if scale.dtype == torch.uint8:
        return scale
    if scale.dtype == torch.float8_e8m0fnu:
        return scale.view(torch.uint8)
    e = torch.log2(scale.float()) + 127
    if not torch.equal(e, e.round()) or e.min() < 0 or e.max() > 254:
        raise ValueError("FP4 scales must be powers of two (ue8m0) to be kept packed")
    return e.to(torch.uint8)


def quantize(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, cols] -> (e4m3 weight, fp32 scale_inv per block): each block's absmax maps to e4m3's 448."""
    rows, cols = w.shape
    br, bc = block
    nr, nc = math.ceil(rows / br), math.ceil(cols / bc)
    padded = F.pad(w.float(), (0, nc * bc - cols, 0, nr * br - rows))
    blocks = padded.view(nr, br, nc, bc)
    scale = (blocks.abs().amax(dim=(1, 3)) / E4M3_MAX).clamp(min=1e-12)  # [nr, nc]
    q = (blocks / scale[:, None, :, None]).view(nr * br, nc * bc)[:rows, :cols]
    return q.to(torch.float8_e4m3fn), scale


def quantize_tiles(x: torch.Tensor, tile: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [M, K] -> (e4m3 [M, K], fp32 scale [M, ceil(K / tile)]): each 1 x tile's absmax -> 448."""
    M, K = x.shape
    n = math.ceil(K / tile)
    tiles = F.pad(x.float(), (0, n * tile - K)).view(M, n, tile)
    scale = (tiles.abs().amax(-1) / E4M3_MAX).clamp(min=1e-12)  # [M, n]
    return (tiles / scale[..., None]).view(M, n * tile)[:, :K].to(torch.float8_e4m3fn), scale


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """x [..., K] @ dequant(weight [N, K]).T computed in FP8: both operands e4m3, one scaled matmul per K block
    (block[1] wide, the activation tile too), fp32 accumulation. Returns x's dtype."""
    br, bc = block
    N, K = weight.shape
    xq, xs = quantize_tiles(x.reshape(-1, K), bc)
    ws = scale_inv.float().repeat_interleave(br, 0)[:N]  # [N, K blocks]: each output row's block scale
    out = torch.zeros(xq.shape[0], N, dtype=torch.float32, device=x.device)
    block_dtype = torch.bfloat16 if x.is_cuda else torch.float32  # cuBLAS row-wise scaling outputs bf16 only
    for b, k in enumerate(range(0, K, bc)):
        out += torch._scaled_mm(xq[:, k:k + bc].contiguous(), weight[:, k:k + bc].contiguous().t(),
                                scale_a=xs[:, b:b + 1].contiguous(), scale_b=ws[None, :, b].contiguous(),
                                out_dtype=block_dtype)
    return out.to(x.dtype).view(*x.shape[:-1], N)


def tensor_cores(device: torch.device) -> bool:
    """FP8 tensor cores: CUDA compute capability 8.9 (Ada) or newer."""
    return device.type == "cuda" and hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(device) >= (8, 9)


class FP8Linear(nn.Module):
    """y = x @ dequant(W).T, W kept in e4m3 with per-block scales. compute: "auto" (fp8_linear on FP8 tensor
    cores, else dequantise `chunk` rows at a time), "dequant" or "scaled_mm"."""

    def __init__(self, in_features: int, out_features: int, block: tuple[int, int] = (128, 128), chunk: int = 1024):
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, tuple(block)
        self.chunk = max(block[0], chunk // block[0] * block[0])  # whole row blocks per slice
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn))
        self.register_buffer("scale_inv", torch.empty(math.ceil(out_features / block[0]),
                                                      math.ceil(in_features / block[1])))
        self.compute = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        aligned = self.in_features % self.block[1] == 0 and self.out_features % 16 == 0  # cuBLAS FP8 shapes
        if self.compute == "scaled_mm" or (self.compute == "auto" and aligned and tensor_cores(x.device)):
            return fp8_linear(x, self.weight, self.scale_inv, self.block)
        br = self.block[0]
        outs = [linear(x, dequantize(self.weight[r:r + self.chunk], self.scale_inv[r // br:(r + self.chunk) // br],
                                       self.block).to(x.dtype))
                for r in range(0, self.out_features, self.chunk)]
        return torch.cat(outs, dim=-1)

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        """The whole weight in high precision (for code that reads it directly, e.g. MLA's absorbed W_UK/W_UV)."""
        return dequantize(self.weight, self.scale_inv, self.block).to(dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, e4m3 blocks {self.block}"


class FP8Experts(nn.Module):
    """moe.Experts with w1 / w2 / w3 [E, out, in] in e4m3 (+ w*_scale_inv [E, blocks, blocks]); each active
    expert's three matrices are dequantised for its own rows only, or (compute as FP8Linear's) multiplied in
    FP8 by fp8_linear."""

    def __init__(self, E: int, inter: int, dim: int, block: tuple[int, int] = (128, 128)):
        super().__init__()
        self.block = tuple(block)
        for name, (o, i) in (("w1", (inter, dim)), ("w2", (dim, inter)), ("w3", (inter, dim))):
            self.register_buffer(name, torch.empty(E, o, i, dtype=torch.float8_e4m3fn))
            self.register_buffer(name + "_scale_inv", torch.empty(E, math.ceil(o / block[0]), math.ceil(i / block[1])))
        self.compute = "auto"

    def forward(self, x, w, idx):  # moe.Experts' dispatch
        return dispatch(x, w, idx, self.w1.shape[0], self.ffn)

    def ffn(self, xs, counts: list[int]):  # rows sorted by expert; each active expert dequantised for its rows
        inter, dim = self.w1.shape[1:]
        aligned = dim % self.block[1] == 0 and inter % self.block[1] == 0
        fp8 = self.compute == "scaled_mm" or (self.compute == "auto" and aligned and tensor_cores(xs.device))
        return per_expert(xs, counts, self._fp8_ffn if fp8 else self._dequantised_ffn)

    def _fp8_ffn(self, seg, e: int):
        return self._fp8_mm(F.silu(self._fp8_mm(seg, "w1", e)) * self._fp8_mm(seg, "w3", e), "w2", e)

    def _dequantised_ffn(self, seg, e: int):
        w1, w2, w3 = (dequantize(getattr(self, k)[e], getattr(self, k + "_scale_inv")[e], self.block)
                      .to(seg.dtype)[None] for k in ("w1", "w2", "w3"))
        return grouped_ffn(seg, [len(seg)], w1, w2, w3)

    def _fp8_mm(self, a, name: str, e: int):
        return fp8_linear(a, getattr(self, name)[e], getattr(self, name + "_scale_inv")[e], self.block)


class V4QuantExperts(nn.Module):
    """v4.Experts (gate_up_proj [E, 2I, D] = gate and up stacked, down_proj [E, D, I], clipped SwiGLU) with the
    checkpoint's quantised weights kept, each beside its `_scale`: fmt "fp4" (int8, two e2m1 codes per byte, a
    ue8m0 exponent byte per 1 x `group` columns: 0.53 bytes per weight) or "fp8" (e4m3, an fp32 scale per block;
    gate and up keep their own block grids, stacked the same way). Each active expert is dequantised for its own
    rows only."""

    def __init__(self, E: int, D: int, inter: int, limit: float, fmt: str, block: tuple[int, int] = (128, 128),
                 group: int = 32):
        super().__init__()
        if fmt not in ("fp4", "fp8"):
            raise ValueError(f"quantised V4 experts are fp4 or fp8, not {fmt!r}")
        self.limit, self.fmt, self.block, self.group = limit, fmt, tuple(block), group
        for name, rows, cols, halves in (("gate_up_proj", inter, D, 2), ("down_proj", D, inter, 1)):
            if fmt == "fp4":
                data = torch.empty(E, halves * rows, cols // 2, dtype=torch.int8)
                scale = torch.empty(E, halves * rows, cols // group, dtype=torch.uint8)
            else:
                data = torch.empty(E, halves * rows, cols, dtype=torch.float8_e4m3fn)
                scale = torch.empty(E, halves * math.ceil(rows / block[0]), math.ceil(cols / block[1]))
            self.register_buffer(name, data)
            self.register_buffer(name + "_scale", scale)

    def forward(self, x, w, idx):  # v4.Experts' dispatch
        return dispatch(x, w, idx, self.gate_up_proj.shape[0], self.ffn)

    def weight(self, name: str, e: int, dtype=torch.float32) -> torch.Tensor:
        """Expert e's gate_up_proj [2I, D] or down_proj [D, I] in high precision."""
        halves = 2 if name == "gate_up_proj" else 1
        data, scale = getattr(self, name)[e].chunk(halves), getattr(self, name + "_scale")[e].chunk(halves)
        if self.fmt == "fp4":
            parts = [dequantize_fp4(d, s, self.group) for d, s in zip(data, scale)]
        else:
            parts = [dequantize(d, s, self.block) for d, s in zip(data, scale)]
        return torch.cat(parts).to(dtype)

    def ffn(self, xs, counts: list[int]):  # rows sorted by expert
        return per_expert(xs, counts, self._ffn)

    def _ffn(self, seg, e: int):
        gate_up, down = (self.weight(k, e, seg.dtype)[None] for k in ("gate_up_proj", "down_proj"))
        return grouped_swiglu(seg, [len(seg)], gate_up, down, self.limit)

    def extra_repr(self) -> str:
        return f"{self.fmt}, experts={self.gate_up_proj.shape[0]}"


def quantize_model(model: nn.Module, block: tuple[int, int] = (128, 128), skip=("embed", "head", "gate.")) -> dict:
    """Replace every nn.Linear (but embeddings, output heads, routers) by an FP8Linear, in place.
    -> {layer name: relative weight error ||W - dequant(quant(W))|| / ||W||}."""
    report = {}
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear) or mod.bias is not None or any(s in name + "." for s in skip):
            continue
        q, s = quantize(mod.weight.detach(), block)
        new = FP8Linear(mod.in_features, mod.out_features, block).to(mod.weight.device)
        new.weight.copy_(q)
        new.scale_inv.copy_(s)
        w = mod.weight.detach().float()
        report[name] = float((dequantize(q, s, block) - w).norm() / w.norm())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return report


def set_compute(model: nn.Module, compute: str) -> nn.Module:
    """Every FP8Linear's / FP8Experts' matmul: "auto", "dequant" (the reference) or "scaled_mm" (FP8 operands)."""
    if compute not in ("auto", "dequant", "scaled_mm"):
        raise ValueError(f"FP8 compute must be auto, dequant or scaled_mm, not {compute!r}")
    for m in model.modules():
        if isinstance(m, (FP8Linear, FP8Experts)):
            m.compute = compute
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (FP8 weights count 1 byte each)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
