"""Launchers of the CUDA memory-handoff kernels (``csrc/pack_segment/``): the ``"cuda"`` entries of the
backend tables of ``pack_segment`` and ``pack_segment_from_ids`` (``interface.py``).

Same contract as ``torch_impl`` / ``triton_launch``: validated inputs, outputs allocated here (or the
caller's ``out``), no autograd. The extension is loaded (or built just in time) on the first launch by
:mod:`rmt_kernels._extension`; importing this module loads nothing.
"""

from __future__ import annotations

from typing import Optional

import torch

from ... import _extension
from ..._checks import check_backend_dtype
from ...errors import BackendUnavailableError
from .._alloc import accum_dtype

OP = "pack_segment"
OP_IDS = "pack_segment_from_ids"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(t: torch.Tensor, op: str) -> None:
    if t.device.type != "cuda":
        raise BackendUnavailableError(f"the cuda backend of {op} needs CUDA tensors, got {t.device}")
    check_backend_dtype(op, "cuda", t.dtype, DTYPES)


def _pack(out, src, ids, read, write, num_read, num_write, tied):
    if tied:
        write = read
    if out.numel() == 0:
        return out
    _extension.load_extension()
    torch.ops.rmt_kernels.pack_segment_fwd_cuda(
        out, src, ids, read if num_read else None, write if num_write else None, num_read, num_write,
        _extension.current_stream(out.device),
    )
    return out


def pack_fwd_cuda(
    segment: torch.Tensor,
    read: Optional[torch.Tensor],
    write: Optional[torch.Tensor],
    num_read: int,
    num_write: int,
    tied: bool,
    out: torch.Tensor,
) -> torch.Tensor:
    """CUDA launcher of ``pack_segment``: fills ``out`` ``[B, N, d]`` from ``segment`` ``[B, S, d]`` and
    the memories (``[B, M, d]`` or ``[M, d]``; ``write`` is ``read`` when ``tied``). Inputs validated."""
    _check(segment, OP)
    return _pack(out, segment, None, read, write, num_read, num_write, tied)


def pack_ids_fwd_cuda(
    input_ids: torch.Tensor,
    weight: torch.Tensor,
    read: Optional[torch.Tensor],
    write: Optional[torch.Tensor],
    num_read: int,
    num_write: int,
    tied: bool,
    out: torch.Tensor,
) -> torch.Tensor:
    """CUDA launcher of ``pack_segment_from_ids``: the segment rows are gathered from ``weight`` ``[V, d]``
    by ``input_ids`` ``[B, S]`` (int32/int64)."""
    _check(weight, OP_IDS)
    return _pack(out, weight, input_ids, read, write, num_read, num_write, tied)


def memory_grad_cuda(grad: torch.Tensor, start: int, start2: int, rows: int, broadcast: bool) -> torch.Tensor:
    """CUDA launcher of a memory's gradient (see ``torch_impl.memory_grad_torch``): ``[rows, d]`` when
    ``broadcast`` else ``[B, rows, d]``, grad's dtype, summed in float32 in a fixed order."""
    _check(grad, OP)
    batch, _, dim = grad.shape
    shape = (rows, dim) if broadcast else (batch, rows, dim)
    dmem = torch.empty(shape, dtype=grad.dtype, device=grad.device)
    if dmem.numel() == 0:
        return dmem
    if batch == 0:
        return dmem.zero_()
    _extension.load_extension()
    torch.ops.rmt_kernels.pack_segment_bwd_cuda(grad, dmem, start, start2, broadcast, _extension.current_stream(grad.device))
    return dmem


def embedding_grad_cuda(
    grad: torch.Tensor, input_ids: torch.Tensor, num_weights: int, start: int, deterministic: bool
) -> torch.Tensor:
    """CUDA launcher of the embedding-weight gradient ``[V, d]`` (grad's dtype).

    ``deterministic``: the ids are sorted (stably) and each id's rows summed in token order by one
    writer; otherwise float32 atomics. Either way the accumulation is float32.
    """
    _check(grad, OP_IDS)
    batch, seg_len = input_ids.shape
    dim = grad.shape[2]
    empty = batch * seg_len == 0 or dim == 0
    stream = _extension.current_stream(grad.device)
    if deterministic:
        dw = torch.zeros((num_weights, dim), dtype=grad.dtype, device=grad.device)
        if empty:
            return dw
        _extension.load_extension()
        sorted_ids, order = torch.sort(input_ids.reshape(-1).to(torch.int64), stable=True)
        torch.ops.rmt_kernels.pack_embedding_grad_cuda(grad, input_ids, dw, start, sorted_ids, order, stream)
        return dw
    dw = torch.zeros((num_weights, dim), dtype=accum_dtype(grad.dtype), device=grad.device)
    if not empty:
        _extension.load_extension()
        torch.ops.rmt_kernels.pack_embedding_grad_cuda(grad, input_ids, dw, start, None, None, stream)
    return dw if dw.dtype == grad.dtype else dw.to(grad.dtype)

