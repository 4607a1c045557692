"""Mixed precision in the integrations: ``segment_attention`` under ``torch.autocast`` behaves as SDPA.

SDPA is on autocast's lower-precision list: inside an autocast region every float16/bfloat16/float32
input is cast to the autocast dtype (float64 is left alone) and the op runs on them. The models the
integrations patch rely on that (rotary embeddings hand over float32 queries and keys with a bfloat16
value; a float32 learned null key meets bfloat16 projections), while ``segment_attention`` itself
requires one dtype: its callers here cast first, then run it with autocast off so that its own
arithmetic is the one it was written with.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype active on ``device_type`` here, None when autocast is off there."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def cast_like_sdpa(dtype: Optional[torch.dtype], *tensors):
    """``tensors`` cast as autocast casts SDPA's inputs to ``dtype`` (unchanged when ``dtype`` is None;
    None entries and float64 tensors pass through)."""
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None and t.dtype in _ELIGIBLE else t for t in tensors)


def kernel_region(device_type: str, dtype: Optional[torch.dtype]):
    """Context in which the kernel runs: autocast off on ``device_type`` when it was on (``dtype``)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, enabled=False)
