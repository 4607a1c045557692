"""The ``torch`` backend of the memory handoff: stock copies, the fallback on every device.

Launchers take validated inputs and a preallocated ``out`` (``ops._alloc.alloc_packed``); they never
record autograd (the interface calls them from inside custom ops). The one exception is
:func:`pack_autograd_torch`: an eager call that records autograd on this backend runs the stock ops
differentiably (``embedding`` + ``cat``), since torch's C++ backward nodes cost less on CPU than a
Python backward node (measured: the drop-in RMT training step went from 0.98-0.99x to 1.00x the
official wrapper's on CPU).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._alloc import accum_dtype


def _fill_memory(out, read, write, num_read: int, num_write: int, tied: bool) -> None:
    s_end = out.shape[1] - num_write
    if num_read:
        out[:, :num_read].copy_(read)  # an [R, d] memory broadcasts over the batch
    if num_write:
        out[:, s_end:].copy_(read if tied else write)


def pack_fwd_torch(
    segment: torch.Tensor,
    read: Optional[torch.Tensor],
    write: Optional[torch.Tensor],
    num_read: int,
    num_write: int,
    tied: bool,
    out: torch.Tensor,
) -> torch.Tensor:
    """``out[:, :R] = read``, ``out[:, R:R+S] = segment``, ``out[:, R+S:] = write`` (read when tied)."""
    out[:, num_read : num_read + segment.shape[1]].copy_(segment)
    _fill_memory(out, read, write, num_read, num_write, tied)
    return out


def pack_ids_fwd_torch(
    input_ids: torch.Tensor,
    weight: torch.Tensor,
    read: Optional[torch.Tensor],
    write: Optional[torch.Tensor],
    num_read: int,
    num_write: int,
    tied: bool,
    out: torch.Tensor,
) -> torch.Tensor:
    """Like :func:`pack_fwd_torch` with the segment rows gathered from ``weight`` by ``input_ids``."""
    out[:, num_read : num_read + input_ids.shape[1]].copy_(F.embedding(input_ids, weight))
    _fill_memory(out, read, write, num_read, num_write, tied)
    return out


def pack_autograd_torch(
    segment: torch.Tensor,
    weight: Optional[torch.Tensor],
    read: Optional[torch.Tensor],
    write: Optional[torch.Tensor],
    num_read: int,
    num_write: int,
    tied: bool,
) -> torch.Tensor:
    """The pack as differentiable stock ops (``embedding`` when ``weight`` is given, then one ``cat``),
    for eager calls that record autograd: the gradients are those of the fused op (segment rows as
    views, the memories' rows summed over slots and, for ``[R, d]`` memories, over the batch, the
    embedding rows summed per id by ``embedding_dense_backward``), computed by torch's C++ nodes."""
    rows = segment if weight is None else F.embedding(segment, weight)
    b = rows.shape[0]

    def batched(memory):
        return memory if memory.dim() == 3 else memory[None].expand(b, -1, -1)

    parts = []
    if num_read:
        parts.append(batched(read))
    parts.append(rows)
    if num_write:
        parts.append(batched(read if tied else write))
    if len(parts) > 1:
        return torch.cat(parts, dim=1)
    return rows if weight is not None else rows.clone(memory_format=torch.contiguous_format)  # never the input


def memory_grad_torch(grad: torch.Tensor, start: int, start2: int, rows: int, broadcast: bool) -> torch.Tensor:
    """Gradient of a memory input: rows ``[start, start + rows)`` of ``grad`` ``[B, N, d]``, plus rows
    ``[start2, start2 + rows)`` when ``start2 >= 0`` (one tensor fed as both R and W), summed over the
    batch when ``broadcast`` (an ``[R, d]`` memory). Accumulates in float32; returns grad's dtype,
    ``[rows, d]`` if ``broadcast`` else ``[B, rows, d]``."""
    if start2 < 0 and not broadcast:  # a plain slice: the interface returns a view instead
        return grad[:, start : start + rows].clone(memory_format=torch.contiguous_format)
    acc = accum_dtype(grad.dtype)
    g = grad[:, start : start + rows].to(acc)
    if start2 >= 0:
        g = g + grad[:, start2 : start2 + rows].to(acc)
    if broadcast:
        g = g.sum(0)
    return g.to(grad.dtype).contiguous()


def embedding_grad_torch(
    grad: torch.Tensor, input_ids: torch.Tensor, num_weights: int, start: int, deterministic: bool
) -> torch.Tensor:
    """``[V, d]`` gradient of the embedding weight: the segment rows ``grad[:, start:start+S]`` summed
    per id. ``aten.embedding_dense_backward`` is deterministic on CPU and CUDA, whatever
    ``deterministic`` says."""
    seg = grad[:, start : start + input_ids.shape[1]]
    return torch.ops.aten.embedding_dense_backward(seg, input_ids, num_weights, -1, False)
