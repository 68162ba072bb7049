"""The model's linear layers: F.linear, but one row in bf16 on the CPU as a matrix-vector product where that is
the faster; and the dtype to decode a checkpoint in on the CPU, where bf16 pays.

A B=1 decode step multiplies one row by every weight matrix. In bf16 on the CPU, F.linear sends that row to
oneDNN's matmul, which on an Intel Xeon with AMX took 1.6x as long as torch.mv for a [1536] x [8960, 1536] product
and reached ~60% of the memory bandwidth mv did (bf16 weights are read once per token: the read is the step); on
a 2-core AMD EPYC with AVX512-BF16 (no AMX) the other way round: F.linear 46 ms a token of a dense 0.5B model, mv
63. So the first one-row bf16 product of a process times both on a [4096, 1024] weight (bf16_row_op) and takes
the faster from then on. fp32 keeps F.linear
(MKL's matrix-vector product is already at the bandwidth), and so does a layer with a bias: torch.addmv in bf16
ran 8-10x slower than F.linear with the bias ([1, 896] x [896, 896]: 0.76 vs 0.09 ms on an AVX2 EPYC; Qwen2's
q / k / v projections decoded 0.5B models at 0.81x transformers' bf16 through it). The twin is F.linear
(tests/test_engine.py).

fp32 on an AMD CPU with AVX-512: a product of at least ONEDNN_MACS multiply-adds goes to oneDNN
(torch.ops.mkldnn._linear_pointwise, forward and both backward products) instead of MKL, whose fp32 GEMM ran ~185
GFLOP/s on a 2-core AMD EPYC with AVX-512 where oneDNN ran ~420 ([2048, 256] x [256, 1024]: 5.5 vs 2.5 ms; MKL keeps
to AVX2 on AMD CPUs). Smaller products stay with MKL: oneDNN pays ~11 us a call. On an AMD EPYC with AVX2 only, MKL's
AVX2 code is the CPU's full width: MKL ran 150-180 GFLOP/s at training sizes where oneDNN ran 100-165, and GRPO's
update took 0.85 s on MKL against 1.11 on oneDNN (bench/RESULTS.md, session 58). On Intel CPUs MKL runs its own
AVX-512 kernels and everything stays with it: on a 2-core Xeon oneDNN was no faster at training sizes and slower at
decode sizes ([64, 256] x [256, 128]: 36 vs 20 us), and routing there made GRPO's rollouts and update 15-17% slower
(session 50).
A few rows times a large weight (at most DNN_ROWS rows, at least DNN_WEIGHT weights: an LM head at decode) go to
oneDNN on every AMD CPU: such a product is bound by the weight's read, which MKL makes on one thread for 1-4 rows
and oneDNN spreads over the threads (AVX2 EPYC, 2 threads, weight out of cache: one row x [8192, 256] 346 vs 724 us,
64 rows x [4096, 256] 1.2 vs 1.8 ms, 128 rows 2.1 vs 3.1; smaller weights pay oneDNN's ~25 us a call). Two to
WEIGHT_LEFT_ROWS rows (a speculative verify's head, a decode step of a few sequences) run faster still as w @ x^T on
MKL, the weight the left operand (the same AVX2 EPYC, weight out of cache: 2 / 3 / 4 rows x [4096, 256] 330 / 311 /
270 us against oneDNN's 752 / 638 / 713, x [2048, 2048] 923 / - / 1204 against 1093 / - / 1329; at 8 rows MKL
takes a slower kernel, 1.4-1.6x oneDNN's time). The twin is F.linear (tests/test_linear.py).
"""

from __future__ import annotations

import os
import time

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


ONEDNN_MACS = 1 << 21  # fp32 CPU products from this many multiply-adds (rows x in x out) up run on oneDNN


def cpu_info(field: str) -> str:
    """A field of the first processor in /proc/cpuinfo ("vendor_id": "GenuineIntel", "AuthenticAMD", ...;
    "flags"); "" where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.split(":", 1)[0].strip() == field), "")
    except OSError:
        return ""


AMD = torch.backends.mkldnn.is_available() and cpu_info("vendor_id") in ("AuthenticAMD", "HygonGenuine")
# fp32 products to oneDNN where MKL runs narrower code than the CPU has (AMD CPUs with AVX-512); elsewhere every fp32
# product through F.linear (MKL, or the build's BLAS), but AMD's few-row ones. The switch the twins' tests turn.
ONEDNN = AMD and "avx512f" in cpu_info("flags").split()
DNN_ROWS = 128 if AMD else 0  # fp32 products of at most this many rows (0: none) ...
DNN_WEIGHT = 1 << 19  # ... by a weight of at least this many elements run on oneDNN (any AMD CPU), but for
WEIGHT_LEFT_ROWS = 4  # 2 to this many rows without autograd: w @ x^T on MKL, the weight the product's left operand


BF16_ROW: str | None = None  # "mv" or "linear": this CPU's faster one-row bf16 product (None: measure at first use)


def bf16_row_op() -> str:
    """BF16_ROW, timed once a process (best of 5 each, ~2 ms) where not set (under torch.compile, not timed: mv)."""
    global BF16_ROW
    if BF16_ROW is None and torch.compiler.is_compiling():
        return "mv"
    if BF16_ROW is None:
        w, x = torch.randn(4096, 1024, dtype=torch.bfloat16), torch.randn(1, 1024, dtype=torch.bfloat16)

        def best(f) -> float:
            f()
            times = []
            for _ in range(5):
                t = time.perf_counter()
                f()
                times.append(time.perf_counter() - t)
            return min(times)

        BF16_ROW = "mv" if best(lambda: torch.mv(w, x[0])) < best(lambda: F.linear(x, w)) else "linear"
    return BF16_ROW


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, b): x [..., in], w [out, in] -> [..., out]."""
    if x.dtype == torch.float32 and not ONEDNN and (w.numel() < DNN_WEIGHT or not DNN_ROWS):
        return F.linear(x, w, b)  # F.linear as it is (the checks below took ~3% of a B=1 step)
    if x.device.type == "cpu":
        if (x.dtype == w.dtype == torch.bfloat16 and x.numel() == x.shape[-1] and b is None
                and bf16_row_op() == "mv"):
            return torch.mv(w, x.reshape(-1)).view(*x.shape[:-1], -1)
        few = few_rows(x, w)
        if few or onednn(x, w, x.numel() * w.shape[0]):
            x2 = x.reshape(-1, x.shape[-1])  # (no autograd node where no gradient is wanted: ~13 us a call)
            grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, b))
            if few and not grad and b is None and 1 < x2.shape[0] <= WEIGHT_LEFT_ROWS:
                return torch.mm(w, x2.t()).t().contiguous().view(*x.shape[:-1], w.shape[0])
            return (OneDNNLinear.apply(x2, w, b) if grad else dnn(x2, w, b)).view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w, b)


def onednn(a: torch.Tensor, b: torch.Tensor, macs: int = ONEDNN_MACS, force: bool = False) -> bool:
    """Whether a product of a and b with this many multiply-adds runs on oneDNN (force: on any CPU, ONEDNN aside,
    where this torch has oneDNN)."""
    return ((ONEDNN or force and torch.backends.mkldnn.is_available()) and a.device.type == "cpu"
            and a.dtype == b.dtype == torch.float32 and macs >= ONEDNN_MACS
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def few_rows(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether x's few rows times the large w run on oneDNN (DNN_ROWS, DNN_WEIGHT: a weight-bound product)."""
    return x.numel() <= DNN_ROWS * x.shape[-1] and w.numel() >= DNN_WEIGHT and onednn(x, w, force=True)


def dnn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T (+ b) -> [M, N] on oneDNN; x and w may be strided (transposed views)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [None], "")


def grad_input(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A linear layer's input gradient: g [M, N] @ w [N, K] -> [M, K]."""
    return dnn(g, w.t()) if onednn(g, w, g.numel() * w.shape[1]) else g @ w


def grad_weight(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A linear layer's weight gradient: g [M, N]^T @ x [M, K] -> [N, K] (a transposed view where made as [K, N])."""
    if onednn(g, x, g.numel() * x.shape[1]):
        # oneDNN takes a strided (transposed) weight as it is but copies a strided input whole, so the narrower of
        # g^T [N, M] and x^T [K, M] goes in as the input: [2048, 4096] x and [2048, 256] g, 10 ms as g^T @ x
        # against 30 as (x^T @ g)^T; the other way round, [2048, 64] x and [2048, 512] g, g^T @ x hit a slow path
        # (700 ms; x^T @ g 0.4)
        return dnn(g.t(), x.t()) if g.shape[1] < x.shape[1] else dnn(x.t(), g.t()).t()
    return g.t() @ x


def grad_weight_t(g: torch.Tensor, x: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """A linear layer's weight gradient, transposed, added to acc [K, N]: x [M, K]^T @ g [M, N] (the head's, whose
    N, the vocabulary, is the wider: grad_weight's input is x^T)."""
    if onednn(g, x, g.numel() * x.shape[1]):
        return acc.add_(dnn(x.t(), g.t()))
    return acc.addmm_(x.t(), g)


class OneDNNLinear(torch.autograd.Function):
    """F.linear for 2-D fp32 x [M, K] on the CPU, its three products on oneDNN."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.bias = b is not None
        return dnn(x, w, b)

    @staticmethod
    def backward(ctx, g):  # g [M, N]
        x, w = ctx.saved_tensors
        gx = grad_input(g, w) if ctx.needs_input_grad[0] else None
        gw = grad_weight(g, x).contiguous() if ctx.needs_input_grad[1] else None
        gb = g.sum(0) if ctx.bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Each expert's rows times its matrix, as torch._grouped_mm(x, w.transpose(1, 2), offs) but on oneDNN (fp32
    CPU): x [sum(counts), in] sorted by expert, w [E, out, in] -> [sum(counts), out]."""
    return GroupedLinear.apply(x, w, counts)


GROUP_ROWS = 64  # GroupedLinear multiplies each expert's rows in a window of a multiple of this many rows


class GroupedLinear(torch.autograd.Function):
    """One oneDNN product per active expert, forward and input gradient, in one autograd node (a loop of
    OneDNNLinear's would make one per expert); the weight gradient on MKL. On CPU torch._grouped_mm runs one MKL
    matmul per expert. oneDNN builds a kernel per shape, and the rows per expert change every step (a kernel built
    per product cost ~70 us, which took most of the gain), so each expert's rows are multiplied within a window of
    a multiple of GROUP_ROWS rows of x (its own and its neighbours': their results are dropped), of which only a
    few sizes occur. 16 experts at ~512 rows, [256 -> 128], counts changing: forward 1.8 vs 3.0 ms (the AVX-512
    AMD EPYC). The weight gradient sums over rows, where a window's foreign rows would count: MKL (3.0 ms; oneDNN
    exact 4.5, 2.7 only when its kernels were built)."""

    @staticmethod
    def forward(ctx, x, w, counts):
        ctx.save_for_backward(x, w)
        ctx.counts = counts
        return _windowed(x, counts, w.shape[1], lambda rows, e: dnn(rows, w[e]))

    @staticmethod
    def backward(ctx, g):  # g [sum(counts), out]
        x, w = ctx.saved_tensors
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = _windowed(g, ctx.counts, w.shape[2], lambda rows, e: dnn(rows, w[e].t()))
        if ctx.needs_input_grad[1]:  # [E, out, in] in w's layout (stacked_weight's: each [in, out] contiguous)
            gw = torch.zeros_like(w)
            for e, start, _, lo, hi in windows(ctx.counts, x.shape[0]):
                torch.mm(x[start + lo:start + hi].t(), g[start + lo:start + hi], out=gw[e].t())
        return gx, gw, None


def _windowed(x: torch.Tensor, counts: list[int], width: int, product) -> torch.Tensor:
    """product(rows, e) [rows, width] of each expert's window of rows (windows), cut back to its own rows."""
    outs = [product(x[start:start + m], e)[lo:hi] for e, start, m, lo, hi in windows(counts, x.shape[0])]
    return torch.cat(outs) if outs else x.new_zeros(0, width)


def windows(counts: list[int], total: int) -> list[tuple[int, int, int, int, int]]:
    """Each active expert's window over rows sorted by expert (counts[e] rows for expert e, total rows in all):
    (e, start, m, lo, hi): rows start .. start + m, a multiple of GROUP_ROWS (or all rows, where fewer), that
    start at its first row or end at the last row; its own rows are lo .. hi within the window."""
    out, a = [], 0
    for e, n in enumerate(counts):
        if n:
            m = min(-(-n // GROUP_ROWS) * GROUP_ROWS, total)
            start = min(a, total - m)
            out.append((e, start, m, a - start, a - start + n))
            a += n
    return out


def dense_weight(m: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A linear layer's weight [out, in] for code that reads the matrix (absorbed MLA's W_UK / W_UV, V4's grouped
    output projection, LoRA's merged weight): dequantised in dtype where the layer keeps it quantised (FP8Linear,
    Int8Linear, a MultiLoRA over one), else the layer's own weight as it is."""
    return m.dequantized(dtype) if hasattr(m, "dequantized") else m.weight


class Linear(nn.Linear):
    """nn.Linear with `linear`'s one-row path (same parameters, same state dict)."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)
