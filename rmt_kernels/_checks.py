"""Argument checks shared by the reference and every backend's public entry point.

Each failure names the argument and what was expected; nothing is silently broadcast or cast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .layout import MemoryLayout

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class AttentionShape:
    """Sizes of one ``segment_attention`` call, read off validated inputs."""

    batch: int
    heads_q: int
    heads_kv: int
    seq_len: int
    segment_len: int
    prefix_len: int
    head_dim: int
    scale: float


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - torch < 2.3
        return False


def _tensor4(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D [B, H, N, D], got shape {tuple(x.shape)}")
    return x


def check_attention_inputs(
    q,
    k,
    v,
    layout,
    segment_lengths=None,
    prefix_k=None,
    prefix_v=None,
    scale=None,
    *,
    dtypes=KERNEL_DTYPES,
    head_dims=None,
    backend: str = "reference",
) -> AttentionShape:
    """Validate the arguments of ``segment_attention`` and return the call's sizes.

    ``dtypes``: dtypes the caller supports; ``head_dims``: supported head dims (None: any >= 1).
    ``segment_lengths`` values are checked against ``[0, S]`` except while ``torch.compile`` traces.
    """
    if not isinstance(layout, MemoryLayout):
        raise TypeError(f"layout must be a rmt_kernels.MemoryLayout, got {type(layout).__name__}")
    q, k, v = _tensor4(q, "q"), _tensor4(k, "k"), _tensor4(v, "v")
    if q.dtype not in dtypes:
        raise TypeError(f"q has dtype {q.dtype}; the {backend} backend supports {list(dtypes)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; they must match")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; they must match")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    b, hq, n, d = q.shape
    if k.shape[0] != b:
        raise ValueError(f"k has batch {k.shape[0]} but q has {b}")
    if k.shape[2] != n:
        raise ValueError(f"k/v have {k.shape[2]} positions but q has {n}; both are the packed length N")
    if k.shape[3] != d:
        raise ValueError(f"k/v head dim {k.shape[3]} differs from q head dim {d}")
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hkv}) for grouped-query attention")
    if d == 0 or (head_dims is not None and d not in head_dims):
        supported = "any >= 1" if head_dims is None else sorted(head_dims)
        raise ValueError(f"head dim D={d} is not supported by the {backend} backend (supported: {supported})")
    if n < layout.num_read + layout.num_write:
        raise ValueError(
            f"packed length N={n} is shorter than num_read + num_write = "
            f"{layout.num_read} + {layout.num_write}"
        )
    s = n - layout.num_read - layout.num_write

    if (prefix_k is None) != (prefix_v is None):
        raise ValueError("prefix_k and prefix_v must be given together (got only one of them)")
    p = 0
    if prefix_k is not None:
        prefix_k, prefix_v = _tensor4(prefix_k, "prefix_k"), _tensor4(prefix_v, "prefix_v")
        for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
            if t.dtype != q.dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; they must match")
            if t.device != q.device:
                raise ValueError(f"{name} is on {t.device} but q is on {q.device}; they must match")
        if prefix_k.shape != prefix_v.shape:
            raise ValueError(
                f"prefix_k and prefix_v must have the same shape, got {tuple(prefix_k.shape)} "
                f"and {tuple(prefix_v.shape)}"
            )
        pb, ph, p, pd = prefix_k.shape
        if (pb, ph, pd) != (b, hkv, d):
            raise ValueError(
                f"prefix_k/prefix_v must be [B, H_kv, P, D] = [{b}, {hkv}, P, {d}], got {tuple(prefix_k.shape)}"
            )

    if segment_lengths is not None:
        if not isinstance(segment_lengths, torch.Tensor):
            raise TypeError(f"segment_lengths must be an integer torch.Tensor [B], got {type(segment_lengths).__name__}")
        if segment_lengths.dtype.is_floating_point or segment_lengths.dtype.is_complex or segment_lengths.dtype == torch.bool:
            raise TypeError(f"segment_lengths must be an integer tensor, got {segment_lengths.dtype}")
        if tuple(segment_lengths.shape) != (b,):
            raise ValueError(f"segment_lengths must have shape [B] = [{b}], got {tuple(segment_lengths.shape)}")
        if segment_lengths.device.type not in ("cpu", q.device.type):
            raise ValueError(f"segment_lengths is on {segment_lengths.device}; expected the CPU or {q.device}")
        if not _is_compiling() and segment_lengths.numel():
            lo, hi = int(segment_lengths.min()), int(segment_lengths.max())
            if lo < 0 or hi > s:
                raise ValueError(f"segment_lengths must lie in [0, S] = [0, {s}], got values in [{lo}, {hi}]")

    if scale is None:
        scale = 1.0 / math.sqrt(d)
    else:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        scale = float(scale)
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
    return AttentionShape(b, hq, hkv, n, s, p, d, scale)
