"""The one tolerance helper (STYLE.md convention 3).

Rule (flash-attention's): a kernel's error against a high-precision reference may be at most
``FACTOR`` times the error of the same computation done eagerly in the kernel's dtype, plus a small
per-dtype floor. Both errors are measured against the float64 (or float32) reference. A miss fails the
test with where the mismatches and NaNs are; nothing only warns.
"""

from __future__ import annotations

from typing import Optional

import torch

FACTOR = 2.0

# (atol floor, rtol) per dtype: the floor absorbs the eager baseline being exactly right by luck.
FLOORS = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-6, 1e-5),
    torch.float16: (2e-4, 2e-3),
    torch.bfloat16: (2e-3, 1.6e-2),
}


def floor_for(dtype: torch.dtype, ref: torch.Tensor) -> float:
    atol, rtol = FLOORS[dtype]
    return atol + rtol * ref.abs().max().item() if ref.numel() else atol


def _describe(name: str, diff: torch.Tensor, bound: float, actual: torch.Tensor, expected: torch.Tensor) -> str:
    bad = diff > bound
    lines = [f"{name}: {int(bad.sum())} of {diff.numel()} elements exceed {bound:.3e}"]
    flat = int(torch.argmax(torch.nan_to_num(diff, nan=float("inf"))))
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    lines.append(
        f"  worst at {idx}: got {actual[idx].item():.6g}, expected {expected[idx].item():.6g}, "
        f"|diff| {diff[idx].item():.3e}"
    )
    if diff.dim() >= 3:  # which packed rows (dim 2 of [B, H, N, D]) are off
        rows = torch.nonzero(bad.flatten(0, 1).any(dim=0).any(dim=-1) if diff.dim() == 4 else bad.any(0).any(-1))
        lines.append(f"  rows (dim 2) off: {rows.flatten()[:20].tolist()}{' ...' if rows.numel() > 20 else ''}")
    return "\n".join(lines)


def assert_no_nan(t: torch.Tensor, name: str) -> None:
    nan = ~torch.isfinite(t)
    if nan.any():
        where = torch.nonzero(nan)[:10].tolist()
        raise AssertionError(f"{name}: {int(nan.sum())} non-finite values, first at {where}")


def assert_close(
    actual: torch.Tensor,
    reference: torch.Tensor,
    baseline: Optional[torch.Tensor] = None,
    *,
    name: str = "output",
    dtype: Optional[torch.dtype] = None,
) -> float:
    """Check ``actual`` against the high-precision ``reference``.

    ``baseline`` is the same-dtype eager computation (e.g. ``segment_attention_ref(..., upcast=False)``);
    without it the bound is the floor alone. Returns the max error. Raises AssertionError with a
    mismatch report.
    """
    if actual.shape != reference.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != reference {tuple(reference.shape)}")
    dtype = dtype or actual.dtype
    assert_no_nan(actual, name)
    ref = reference.detach().to(torch.float64)
    diff = (actual.detach().to(torch.float64) - ref).abs()
    bound = floor_for(dtype, ref)
    if baseline is not None and baseline.numel():
        bound += FACTOR * (baseline.detach().to(torch.float64) - ref).abs().max().item()
    if diff.numel() and not diff.max().item() <= bound:
        raise AssertionError(_describe(name, diff, bound, actual.detach().to(torch.float64), ref))
    return diff.max().item() if diff.numel() else 0.0
