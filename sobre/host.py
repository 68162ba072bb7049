"""Host-side integers to tensors. torch.tensor walks a Python list element by element: 256 ints took 52-58 us on a
2-core Xeon, a 256 x 2 nested list 205 us; numpy converts a flat list in C (8-10 us). A GRPO rollout's decode step
makes several such tensors (the tokens, positions, block table, each MoE layer's padded rows), 0.3-0.4 ms of its
~10 (bench/RESULTS.md, session 53). The twin is torch.tensor (tests/test_engine.py)."""

from __future__ import annotations

from itertools import chain

import numpy as np
import torch


def ints(values, device=None, n: int = -1) -> torch.Tensor:
    """torch.tensor(list(values), dtype=torch.int64, device=device): values a list of Python ints (or an iterable
    of n of them) -> [n]."""
    return torch.from_numpy(np.fromiter(values, np.int64, n if n >= 0 else len(values))).to(device)


def int_rows(rows: list[list[int]], device=None) -> torch.Tensor:
    """torch.tensor(rows, device=device) for rows of one length -> [len(rows), len(rows[0])] int64."""
    width = len(rows[0]) if rows else 0
    if any(len(r) != width for r in rows):
        raise ValueError(f"int_rows: rows of different lengths ({sorted({len(r) for r in rows})})")
    return ints(chain.from_iterable(rows), device, len(rows) * width).view(len(rows), width)
