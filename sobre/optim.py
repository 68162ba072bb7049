"""Optimizers: AdamW, or Muon for the hidden matrices (DeepSeek-V4 trains with Muon) with AdamW for the rest.

Muon (Keller Jordan et al.): SGD-momentum whose update is orthogonalised by a few Newton-Schulz iterations.
`Muon` here is torch.optim.Muon's algorithm (same defaults; tests hold the two equal on 2-D weights) extended to
stacked matrices: a [E, A, B] expert tensor is E matrices, each orthogonalised on its own. With
adjust_lr="match_rms_adamw" (the default here, as Moonlight and DeepSeek-V4 do) the update is scaled to
AdamW's RMS, 0.2 * sqrt(max(A, B)), so AdamW's learning rate and weight decay carry over. Newton-Schulz runs
in bf16 as the reference does, in fp32 on CPU (`ns_dtype`).
"""

from __future__ import annotations

import math

import torch

NS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz coefficients (torch.optim.Muon's defaults)


def orthogonalize(g: torch.Tensor, steps: int = 5, coeffs=NS, eps: float = 1e-7, dtype=None) -> torch.Tensor:
    """g [..., A, B] -> approximately U V^T of each matrix's SVD (singular values pushed into ~[0.5, 1.5]),
    computed in `dtype`: None = bf16 like the reference, except on CPU, where it is fp32 (CPUs without native
    bf16 matmuls emulate them: 5x slower than fp32 here, and Muon's step took 12 s for the tiny preset)."""
    a, b, c = coeffs
    x = g.to(dtype or (torch.float32 if g.device.type == "cpu" else torch.bfloat16))
    tall = g.shape[-2] > g.shape[-1]
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= 1
    flat = x.reshape(-1, *x.shape[-2:])
    for _ in range(steps):
        gram = flat @ flat.mT
        flat = torch.baddbmm(flat, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), flat, beta=a)
    x = flat.view_as(x)
    return x.mT if tall else x


def lr_scale(shape: torch.Size, adjust_lr: str) -> float:
    A, B = shape[-2:]
    return 0.2 * math.sqrt(max(A, B)) if adjust_lr == "match_rms_adamw" else math.sqrt(max(1, A / B))


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, adjust_lr: str = "match_rms_adamw", ns_dtype=None):
        if adjust_lr not in ("original", "match_rms_adamw"):
            raise ValueError(f"adjust_lr must be 'original' or 'match_rms_adamw', got {adjust_lr!r}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_steps=ns_steps, adjust_lr=adjust_lr, ns_dtype=ns_dtype))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() < 2:
                    raise ValueError(f"Muon updates matrices; got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, m = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = st["momentum_buffer"]
                buf.lerp_(p.grad, 1 - m)
                update = p.grad.lerp(buf, m) if group["nesterov"] else buf
                update = orthogonalize(update, group["ns_steps"], dtype=group["ns_dtype"])
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * lr_scale(p.shape, group["adjust_lr"]))


class Optimizers:
    """Several optimizers stepped as one (Muon + AdamW): param_groups, step, zero_grad; `optimizers` for
    checkpointing (torch.distributed.checkpoint takes the list)."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = [o for o in optimizers if o.param_groups]

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)


def muon_params(model: torch.nn.Module) -> tuple[list, list]:
    """(hidden matrices for Muon, the rest for AdamW): embedding, output head, norms, biases, gates' scalars,
    sinks and position biases stay on AdamW, as in DeepSeek-V4."""
    muon, other = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        adam = p.dim() < 2 or "embed" in name or name.startswith(("head.", "lm_head.")) or "position_bias" in name
        (other if adam else muon).append(p)
    return muon, other
