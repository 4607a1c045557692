"""The pure-PyTorch reference: SPEC.md in code.

Tests and benchmarks import it; nobody copies it. It builds the dense mask from
:class:`~rmt_kernels.layout.MemoryLayout` and computes attention in float32 (float64 for float64 inputs),
which is slow and O(N^2) in memory by design.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._checks import check_attention_inputs
from .layout import MemoryLayout

REFERENCE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def segment_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: MemoryLayout,
    *,
    segment_lengths: Optional[torch.Tensor] = None,
    prefix_k: Optional[torch.Tensor] = None,
    prefix_v: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    upcast: bool = True,
    return_lse: bool = False,
):
    """Reference causal-plus-memory attention with a dense mask.

    Args:
        q: ``[B, H_q, N, D]`` float16/bfloat16/float32/float64, any strides.
        k, v: ``[B, H_kv, N, D]``, same dtype and device; ``H_q % H_kv == 0``.
        layout: the :class:`MemoryLayout` (R, W, mask family, prefix visibility).
        segment_lengths: int ``[B]`` in ``[0, S]``: valid segment tokens per batch row (right padding).
        prefix_k, prefix_v: ``[B, H_kv, P, D]`` keys/values before the packed ones (both or neither).
        scale: softmax scale, default ``1/sqrt(D)``.
        upcast: compute in float32 (float64 for float64 inputs). ``False`` computes in the input
            dtype: the "same-dtype eager" baseline of the tolerance rule.
        return_lse: also return the natural log-sum-exp of each row, float32/float64 ``[B, H_q, N]``.

    Returns:
        ``[B, H_q, N, D]`` in q's dtype (and the log-sum-exp when asked). Rows that see no key give
        0, a log-sum-exp of -inf, and zero gradients.

    Example::

        >>> q = k = v = torch.randn(1, 2, 8, 16)
        >>> segment_attention_ref(q, k, v, MemoryLayout(2, 2)).shape
        torch.Size([1, 2, 8, 16])
    """
    shape = check_attention_inputs(
        q, k, v, layout, segment_lengths, prefix_k, prefix_v, scale, dtypes=REFERENCE_DTYPES
    )
    if upcast:
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    else:
        cdt = q.dtype
    if prefix_k is not None:
        k = torch.cat([prefix_k, k], dim=2)
        v = torch.cat([prefix_v, v], dim=2)
    group = shape.heads_q // shape.heads_kv
    k = k.to(cdt).repeat_interleave(group, dim=1)
    v = v.to(cdt).repeat_interleave(group, dim=1)

    mask = layout.dense_mask(shape.segment_len, shape.prefix_len, segment_lengths)
    mask = mask.to(q.device)[:, None]  # [B or 1, 1, N, P+N]
    scores = torch.matmul(q.to(cdt), k.transpose(-1, -2)) * shape.scale
    scores = scores.masked_fill(~mask, float("-inf"))
    # Softmax is shift invariant: a detached row max keeps gradients exact and rows with no key at 0.
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    expd = torch.exp(scores - row_max)
    denom = expd.sum(dim=-1, keepdim=True)
    has_key = denom > 0
    safe = torch.where(has_key, denom, torch.ones_like(denom))
    out = torch.matmul(expd / safe, v).to(q.dtype)
    if not return_lse:
        return out
    lse = torch.where(has_key, row_max + torch.log(safe), torch.full_like(denom, float("-inf")))
    return out, lse.squeeze(-1).to(torch.float64 if cdt == torch.float64 else torch.float32)
