"""The one tolerance helper (STYLE.md convention 3).

Rule (flash-attention's, defined in rmt_kernels/_tolerance.py so `rmt-kernels check` applies the same
one): a kernel's error against a high-precision reference may be at most ``FACTOR`` times the error of
the same computation done eagerly in the kernel's dtype, plus a small per-dtype floor. A miss fails the
test with where the mismatches and NaNs are; nothing only warns.
"""

from __future__ import annotations

from typing import Optional

import torch

from rmt_kernels._tolerance import FACTOR, FLOORS, error_bound, floor_for  # noqa: F401  (the one rule)


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
    bound = error_bound(ref, baseline, dtype)
    if diff.numel() and not diff.max().item() <= bound:
        raise AssertionError(_describe(name, diff, bound, actual.detach().to(torch.float64), ref))
    return diff.max().item() if diff.numel() else 0.0
