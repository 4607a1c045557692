"""The tolerance rule shared by the tests (tests/helpers.py) and `rmt-kernels check`.

A kernel's error against a high-precision reference may be at most ``FACTOR`` times the error of the
same computation done eagerly in the kernel's dtype, plus a per-dtype floor (absolute + relative to the
reference's magnitude) that absorbs an eager baseline that happens to be exact.
"""

from __future__ import annotations

from typing import Optional

import torch

FACTOR = 2.0

# (atol floor, rtol) per dtype.
FLOORS = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-6, 1e-5),
    torch.float16: (2e-4, 2e-3),
    torch.bfloat16: (2e-3, 1.6e-2),
}


def floor_for(dtype: torch.dtype, ref: torch.Tensor) -> float:
    atol, rtol = FLOORS[dtype]
    return atol + rtol * ref.abs().max().item() if ref.numel() else atol


def error_bound(reference: torch.Tensor, baseline: Optional[torch.Tensor], dtype: torch.dtype) -> float:
    """Largest admissible max-abs error of a ``dtype`` result against ``reference``."""
    ref = reference.detach().to(torch.float64)
    bound = floor_for(dtype, ref)
    if baseline is not None and baseline.numel():
        bound += FACTOR * (baseline.detach().to(torch.float64) - ref).abs().max().item()
    return bound
