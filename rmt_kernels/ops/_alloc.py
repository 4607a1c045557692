"""The launcher contract: how every backend of every op allocates what it returns.

Every launcher (torch, Triton, CUDA) and every fake implementation imports these, so that outputs
and gradients have one layout whatever backend produced them, and no backend imports another's
module:

- attention outputs and gradients are ``[B, H, N, D]`` tensors stored ``[B, N, H, D]``
  (:func:`empty_bnhd`): a model's projections are ``[B, N, H * D]``, so gradients in this layout flow
  back through their ``view``/``transpose`` without copies;
- log-sum-exp, ``delta`` and every reduction accumulate in float32 (float64 for float64 inputs,
  :func:`accum_dtype`);
- kernels read ``segment_lengths`` as contiguous int32 on the device (:func:`kernel_lengths`);
- an empty input (``B * H * N == 0``) returns zero outputs with log-sum-exp ``-inf`` and zero
  gradients (:func:`empty_attention_outputs`, :func:`zero_grads`), without launching anything;
- the packed segment ``[B, N, d]`` is contiguous (:func:`alloc_packed`);
- a kernel launches under its tensors' device (:func:`device_guard`), and over chunks of at most
  :data:`GRID_YZ_MAX` batch rows where the batch is a grid axis other than x;
- a gradient summed from parts (the torch backend's blocks and row chunks) fills its buffer part by
  part without a zero-fill pass (:class:`GradAccumulator`).
"""

from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulators, log-sum-exp and reductions run in this dtype: float32, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty_bnhd(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised ``[B, H, N, D]`` tensor stored as ``[B, N, H, D]``."""
    b, h, n, d = shape
    return torch.empty((b, n, h, d), dtype=dtype, device=device).transpose(1, 2)


def is_bnhd(t: torch.Tensor) -> bool:
    """Whether ``t`` ``[B, H, N, D]`` is stored as a contiguous ``[B, N, H, D]``."""
    return t.transpose(1, 2).is_contiguous()


def as_bnhd(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it is stored as ``[B, N, H, D]``, else a copy that is."""
    if is_bnhd(t):
        return t
    out = empty_bnhd(t.shape, t.dtype, t.device)
    out.copy_(t)
    return out


def as_bnh(lse: torch.Tensor) -> torch.Tensor:
    """``lse`` ``[B, H, N]`` itself when stored ``[B, N, H]``, else a copy that is."""
    if lse.transpose(1, 2).is_contiguous():
        return lse
    b, h, n = lse.shape
    out = torch.empty((b, n, h), dtype=lse.dtype, device=lse.device).transpose(1, 2)
    out.copy_(lse)
    return out


def alloc_outputs(q: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention output ``[B, H_q, N, D]`` (stored ``[B, N, H_q, D]``) in q's dtype and log-sum-exp
    ``[B, H_q, N]`` (stored ``[B, N, H_q]``) in :func:`accum_dtype`."""
    b, h, n, _ = q.shape
    out = empty_bnhd(q.shape, q.dtype, q.device)
    lse = torch.empty((b, n, h), dtype=accum_dtype(q.dtype), device=q.device).transpose(1, 2)
    return out, lse


def alloc_grads(q: torch.Tensor, k: torch.Tensor, prefix_k: Optional[torch.Tensor]):
    """``(dq, dk, dv, dprefix_k, dprefix_v)`` in q's dtype, stored ``[B, N, H, D]`` like the outputs;
    the prefix ones are None when ``prefix_k`` is None (no prefix, or its gradient is not needed)."""
    def grad(shape):
        return empty_bnhd(shape, q.dtype, q.device)

    dpk = grad(prefix_k.shape) if prefix_k is not None else None
    dpv = grad(prefix_k.shape) if prefix_k is not None else None
    return grad(q.shape), grad(k.shape), grad(k.shape), dpk, dpv


def is_empty(q: torch.Tensor) -> bool:
    """No query row at all (``B * H * N == 0``): launchers return without launching."""
    b, h, n, _ = q.shape
    return b * h * n == 0


def empty_attention_outputs(out: torch.Tensor, lse: torch.Tensor):
    """``(out, lse)`` of an empty call: zeros and ``-inf``."""
    return out.zero_(), lse.fill_(float("-inf"))


def zero_grads(*grads: Optional[torch.Tensor]):
    """The gradients of an empty call: every given buffer zeroed (None passed through)."""
    return tuple(None if g is None else g.zero_() for g in grads)


def kernel_lengths(segment_lengths: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    """``segment_lengths`` as the Triton and CUDA kernels read it: contiguous int32 on ``device``."""
    if segment_lengths is None:
        return None
    return segment_lengths.to(device=device, dtype=torch.int32).contiguous()


def alloc_packed(batch: int, seq_len: int, dim: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The packed segment buffer ``[B, N, d]``, contiguous."""
    return torch.empty((batch, seq_len, dim), dtype=dtype, device=device)


# CUDA's limit on grid axes y and z.
GRID_YZ_MAX = 65535


def device_guard(t: torch.Tensor):
    """A context in which ``t``'s GPU is the current device (cheap when it is already); a no-op for CPU
    tensors (the interpreter). Triton launches on the current device, not on the tensors'."""
    if t.device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


class GradAccumulator:
    """Gradient buffer filled block by block without a zero-fill pass.

    The first write to a row range copies, later writes add, and :meth:`finish` zeroes what no block
    wrote. A block gradient that spans the whole buffer is adopted as the buffer itself. (On CPU a
    fresh large buffer costs page faults on first touch, which is measurable against one stock call.)
    """

    def __init__(self, like: torch.Tensor, dtype: torch.dtype):
        self.like, self.dtype = like, dtype
        self.buf = None
        self.covered = {}  # (b0, b1) -> list of written [start, end)

    def write(self, b0: int, b1: int, start: int, grad: torch.Tensor):
        end = start + grad.shape[2]
        covered = self.covered.setdefault((b0, b1), [])
        if self.buf is None:
            whole = (b0, b1, start, end) == (0, self.like.shape[0], 0, self.like.shape[2])
            if whole and grad.dtype == self.dtype and grad.shape == self.like.shape and is_bnhd(grad):
                self.buf = grad
                covered.append((start, end))
                return
            self.buf = empty_bnhd(self.like.shape, self.dtype, self.like.device)
        pos = start
        for c0, c1 in union_intervals(covered):
            c0, c1 = max(c0, start), min(c1, end)
            if c1 <= c0:
                continue
            if c0 > pos:
                self.buf[b0:b1, :, pos:c0].copy_(grad[:, :, pos - start : c0 - start])
            self.buf[b0:b1, :, c0:c1].add_(grad[:, :, c0 - start : c1 - start])
            pos = c1
        if pos < end:
            self.buf[b0:b1, :, pos:end].copy_(grad[:, :, pos - start :])
        covered.append((start, end))

    def finish(self, spans, dtype: torch.dtype) -> torch.Tensor:
        """The gradient in ``dtype``, with the rows no write covered zeroed in each batch span ``(b0, b1)``
        of ``spans`` (those the writes used)."""
        if self.buf is None:
            return empty_bnhd(self.like.shape, dtype, self.like.device).zero_()
        length = self.buf.shape[2]
        for b0, b1 in spans:
            pos = 0
            for c0, c1 in union_intervals(self.covered.get((b0, b1), [])) + [(length, length)]:
                if c0 > pos:
                    self.buf[b0:b1, :, pos:c0].zero_()
                pos = max(pos, c1)
        return self.buf if self.buf.dtype == dtype else self.buf.to(dtype)


def union_intervals(intervals):
    """Sorted disjoint union of ``[start, end)`` intervals."""
    merged = []
    for c0, c1 in sorted(intervals):
        if merged and c0 <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], c1))
        else:
            merged.append((c0, c1))
    return merged
