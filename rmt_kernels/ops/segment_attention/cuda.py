"""Launchers of the CUDA segment attention (``csrc/segment_attention/``): the ``"cuda"`` entry of the
op's backend table (``interface.py``).

The launchers allocate the outputs and gradients (``ops._alloc``: stored ``[B, N, H, D]``), make sure the inputs suit the kernels' 16-byte tile loads (a unit head-dim stride,
other strides multiples of 8 elements, 16-byte aligned data; anything else is copied, which the
``[B, H, N, D]`` and ``[B, N, H, D]`` layouts never need), and call the ops
``torch.ops.rmt_kernels.segment_attention_fwd_cuda`` / ``_bwd_cuda`` of the extension, loaded (or
built just in time) on first use by :mod:`rmt_kernels._extension`. No autograd here: the custom
ops of ``interface.py`` call these.

Supported: float16 and bfloat16, head dims 64 and 128, every mask family, a prefix, right padding and
grouped-query attention. Tensor cores through ``mma.sync`` (sm_80 and newer, Hopper included).
"""

from __future__ import annotations

from typing import Optional

import torch

from ... import _extension
from ..._checks import check_kernel_support, refuse_dropout
from ...errors import BackendUnavailableError
from ...layout import MASK_CODES, MemoryLayout
from .._alloc import alloc_grads, alloc_outputs, empty_attention_outputs, is_empty, kernel_lengths, zero_grads

OP = "segment_attention"
DTYPES = (torch.float16, torch.bfloat16)
HEAD_DIMS = (64, 128)


def _check(q: torch.Tensor) -> None:
    if q.device.type != "cuda":
        raise BackendUnavailableError(f"the cuda backend of {OP} needs CUDA tensors, got {q.device}")
    check_kernel_support(q, DTYPES, HEAD_DIMS, "cuda")


def _tileable(t: torch.Tensor) -> bool:
    strides = t.stride()
    return (
        strides[-1] == 1
        and all(s % 8 == 0 for s, n in zip(strides[:-1], t.shape[:-1]) if n > 1)
        and t.data_ptr() % 16 == 0
    )


def _fit(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` as the kernels read it: itself when tileable, else a contiguous copy; dims of size 1 get
    stride 0 (their stride is never used, but the kernels check every stride)."""
    if t is None:
        return None
    if not _tileable(t):
        t = t.contiguous()
    if any(n == 1 and s % 8 for n, s in zip(t.shape, t.stride())):
        t = t.as_strided(t.shape, [0 if n == 1 else s for n, s in zip(t.shape, t.stride())])
    return t


def _prefix(prefix_k, prefix_v):
    if prefix_k is None or prefix_k.shape[2] == 0:
        return None, None
    return _fit(prefix_k), _fit(prefix_v)


def segment_attention_fwd_cuda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: Optional[torch.Tensor],
    prefix_v: Optional[torch.Tensor],
    segment_lengths: Optional[torch.Tensor],
    layout: MemoryLayout,
    scale: float,
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,
):
    """Forward of the cuda backend.

    Args:
        q: ``[B, H_q, N, D]`` float16/bfloat16 on a CUDA device, any strides; ``D`` in :data:`HEAD_DIMS`.
        k, v: ``[B, H_kv, N, D]`` (``H_q % H_kv == 0``); prefix_k, prefix_v: ``[B, H_kv, P, D]`` or None.
        segment_lengths: integer ``[B]`` in ``[0, S]`` or None; layout: the :class:`MemoryLayout`;
        scale: softmax scale. Shapes and values are validated by the public entry point.
        dropout_p, seed: the launcher contract's dropout arguments; this backend has no dropout and
            takes only ``dropout_p == 0`` (``BackendUnavailableError`` otherwise).

    Returns:
        ``(out, lse)``: ``[B, H_q, N, D]`` in q's dtype and the float32 natural log-sum-exp
        ``[B, H_q, N]`` (layouts of ``ops._alloc.alloc_outputs``); rows that see no key give 0 and -inf.

    Raises:
        TypeError: unsupported dtype. ValueError: unsupported head dim.
        BackendUnavailableError: CPU tensors, or the extension is missing and cannot be built.

    Example::

        >>> layout = MemoryLayout(16, 16)
        >>> q = k = v = torch.randn(1, 4, 96, 64, device="cuda", dtype=torch.bfloat16)
        >>> out, lse = segment_attention_fwd_cuda(q, k, v, None, None, None, layout, 0.125)
    """
    _check(q)
    refuse_dropout(OP, "cuda", dropout_p)
    out, lse = alloc_outputs(q)
    if is_empty(q):
        return empty_attention_outputs(out, lse)
    _extension.load_extension()
    q, k, v = _fit(q), _fit(k), _fit(v)
    prefix_k, prefix_v = _prefix(prefix_k, prefix_v)
    torch.ops.rmt_kernels.segment_attention_fwd_cuda(
        q, k, v, prefix_k, prefix_v, kernel_lengths(segment_lengths, q.device), out, lse,
        layout.num_read, layout.num_write, MASK_CODES[layout.mask], layout.prefix_visible_to == "all",
        float(scale), _extension.current_stream(q.device),
    )
    return out, lse


def segment_attention_bwd_cuda(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: Optional[torch.Tensor],
    prefix_v: Optional[torch.Tensor],
    segment_lengths: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    layout: MemoryLayout,
    scale: float,
    need_prefix_grad: bool,
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,
):
    """Backward of the cuda backend. Deterministic: no atomics, group heads summed in a fixed order.

    Args:
        dout: ``[B, H_q, N, D]`` upstream gradient, any strides; ``out``, ``lse``: the forward's
            outputs; the other arguments as in :func:`segment_attention_fwd_cuda`.
        need_prefix_grad: compute the prefix gradients (a detached prefix still feeds ``dq``).
        dropout_p, seed: as in :func:`segment_attention_fwd_cuda`.

    Returns:
        ``(dq, dk, dv, dprefix_k, dprefix_v)`` stored ``[B, N, H, D]``, in q's dtype; the prefix gradients are None
        without a prefix or without ``need_prefix_grad``.

    Raises:
        As :func:`segment_attention_fwd_cuda`.

    Example::

        >>> dq, dk, dv, _, _ = segment_attention_bwd_cuda(dout, q, k, v, None, None, None, out, lse,
        ...                                               layout, 0.125, False)
    """
    _check(q)
    refuse_dropout(OP, "cuda", dropout_p)
    p = 0 if prefix_k is None else prefix_k.shape[2]
    dq, dk, dv, dpk, dpv = alloc_grads(q, k, prefix_k if p > 0 and need_prefix_grad else None)
    if is_empty(q):
        return zero_grads(dq, dk, dv, dpk, dpv)
    _extension.load_extension()
    dout, q, k, v = _fit(dout), _fit(q), _fit(k), _fit(v)
    prefix_k, prefix_v = _prefix(prefix_k, prefix_v)
    torch.ops.rmt_kernels.segment_attention_bwd_cuda(
        dout, q, k, v, prefix_k, prefix_v, kernel_lengths(segment_lengths, q.device), out, lse,
        dq, dk, dv, dpk, dpv,
        layout.num_read, layout.num_write, MASK_CODES[layout.mask], layout.prefix_visible_to == "all",
        float(scale), _extension.current_stream(q.device),
    )
    return dq, dk, dv, dpk, dpv

