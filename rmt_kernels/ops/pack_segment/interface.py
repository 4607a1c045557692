"""Public ``pack_segment`` / ``pack_segment_from_ids`` / ``unpack_segment``: validation, backend choice,
and the custom ops autograd goes through.

Custom ops (``torch.library``, with fake implementations so ``torch.compile`` traces them):

- ``rmt_kernels::pack_segment_fwd`` / ``pack_segment_from_ids_fwd``: functional, return a new packed
  buffer; differentiable (autograd registered below).
- ``rmt_kernels::pack_segment_out`` / ``pack_segment_from_ids_out``: write into ``out``
  (``mutates_args=("out",)``, which bumps ``out``'s version counter, so autograd still detects a
  buffer that a graph saved being overwritten). Not differentiable: ``out=`` raises a ValueError when
  autograd would have to record the call (grad mode on and an input requiring grad), as
  ``torch.cat(..., out=)`` does. Differentiable callers use the functional form; inference (and the
  recurrent driver, which reuses one buffer only when no graph is recorded) uses ``out=``.
- ``rmt_kernels::pack_memory_grad``: a memory input's gradient when it is a reduction (an ``[R, d]``
  memory broadcast over the batch, or one tensor fed as both R and W). Plain slices of the packed
  gradient are returned as views, without a kernel or a copy.
- ``rmt_kernels::pack_embedding_grad``: the embedding weight's gradient, ids scattered (repeated ids
  accumulate; deterministic when ``torch.are_deterministic_algorithms_enabled()``).

Passing the *same tensor object* as ``read_memory`` and ``write_memory`` (the official RMT wrapper) is
detected: it is read once per slot and its gradient, the sum of both slots, comes from one kernel.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ... import backends
from ..._checks import _is_compiling
from ...layout import MemoryLayout
from .torch_impl import (
    alloc_packed,
    embedding_grad_torch,
    memory_grad_torch,
    pack_fwd_torch,
    pack_ids_fwd_torch,
)
from . import cuda as _cuda  # noqa: F401  registers backend "cuda"; loads no extension until used

OP = "pack_segment"
OP_IDS = "pack_segment_from_ids"

_TORCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ID_DTYPES = (torch.int32, torch.int64)


def _triton(name: str):
    """A launcher of ``triton_pack`` imported on first call (importing rmt_kernels never imports triton)."""

    def launch(*args):
        from . import triton_pack

        return getattr(triton_pack, name)(*args)

    launch.__name__ = name
    return launch


_TORCH_DEVICES = ("cpu", "cuda", "mps", "xpu")
backends.register(OP, "torch", backends.BackendImpl(
    fwd=pack_fwd_torch, bwd=memory_grad_torch, dtypes=_TORCH_DTYPES, devices=_TORCH_DEVICES))
backends.register(OP, "triton", backends.BackendImpl(
    fwd=_triton("pack_fwd_triton"), bwd=_triton("memory_grad_triton"), dtypes=_TRITON_DTYPES))
backends.register(OP_IDS, "torch", backends.BackendImpl(
    fwd=pack_ids_fwd_torch, bwd=embedding_grad_torch, dtypes=_TORCH_DTYPES, devices=_TORCH_DEVICES))
backends.register(OP_IDS, "triton", backends.BackendImpl(
    fwd=_triton("pack_ids_fwd_triton"), bwd=_triton("embedding_grad_triton"), dtypes=_TRITON_DTYPES))


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("rmt_kernels::pack_segment_fwd", mutates_args=())
def pack_segment_fwd_op(
    segment: Tensor,
    read: Optional[Tensor],
    write: Optional[Tensor],
    num_read: int,
    num_write: int,
    tied: bool,
    backend: str,
) -> Tensor:
    b, s, d = segment.shape
    out = alloc_packed(b, num_read + s + num_write, d, segment.dtype, segment.device)
    backends.get_impl(OP, backend).fwd(segment, read, write, num_read, num_write, tied, out)
    return out


@pack_segment_fwd_op.register_fake
def _(segment, read, write, num_read, num_write, tied, backend):
    b, s, d = segment.shape
    return alloc_packed(b, num_read + s + num_write, d, segment.dtype, segment.device)


@torch.library.custom_op("rmt_kernels::pack_segment_out", mutates_args=("out",))
def pack_segment_out_op(
    segment: Tensor,
    read: Optional[Tensor],
    write: Optional[Tensor],
    out: Tensor,
    num_read: int,
    num_write: int,
    tied: bool,
    backend: str,
) -> None:
    backends.get_impl(OP, backend).fwd(segment, read, write, num_read, num_write, tied, out)


@pack_segment_out_op.register_fake
def _(segment, read, write, out, num_read, num_write, tied, backend):
    return None


@torch.library.custom_op("rmt_kernels::pack_segment_from_ids_fwd", mutates_args=())
def pack_segment_from_ids_fwd_op(
    input_ids: Tensor,
    weight: Tensor,
    read: Optional[Tensor],
    write: Optional[Tensor],
    num_read: int,
    num_write: int,
    tied: bool,
    backend: str,
) -> Tensor:
    b, s = input_ids.shape
    out = alloc_packed(b, num_read + s + num_write, weight.shape[1], weight.dtype, weight.device)
    backends.get_impl(OP_IDS, backend).fwd(input_ids, weight, read, write, num_read, num_write, tied, out)
    return out


@pack_segment_from_ids_fwd_op.register_fake
def _(input_ids, weight, read, write, num_read, num_write, tied, backend):
    b, s = input_ids.shape
    return alloc_packed(b, num_read + s + num_write, weight.shape[1], weight.dtype, weight.device)


@torch.library.custom_op("rmt_kernels::pack_segment_from_ids_out", mutates_args=("out",))
def pack_segment_from_ids_out_op(
    input_ids: Tensor,
    weight: Tensor,
    read: Optional[Tensor],
    write: Optional[Tensor],
    out: Tensor,
    num_read: int,
    num_write: int,
    tied: bool,
    backend: str,
) -> None:
    backends.get_impl(OP_IDS, backend).fwd(input_ids, weight, read, write, num_read, num_write, tied, out)


@pack_segment_from_ids_out_op.register_fake
def _(input_ids, weight, read, write, out, num_read, num_write, tied, backend):
    return None


@torch.library.custom_op("rmt_kernels::pack_memory_grad", mutates_args=())
def pack_memory_grad_op(grad: Tensor, start: int, start2: int, rows: int, broadcast: bool, backend: str) -> Tensor:
    return backends.get_impl(OP, backend).bwd(grad, start, start2, rows, broadcast)


@pack_memory_grad_op.register_fake
def _(grad, start, start2, rows, broadcast, backend):
    shape = (rows, grad.shape[2]) if broadcast else (grad.shape[0], rows, grad.shape[2])
    return grad.new_empty(shape)


@torch.library.custom_op("rmt_kernels::pack_embedding_grad", mutates_args=())
def pack_embedding_grad_op(
    grad: Tensor, input_ids: Tensor, num_weights: int, start: int, deterministic: bool, backend: str
) -> Tensor:
    return backends.get_impl(OP_IDS, backend).bwd(grad, input_ids, num_weights, start, deterministic)


@pack_embedding_grad_op.register_fake
def _(grad, input_ids, num_weights, start, deterministic, backend):
    return grad.new_empty((num_weights, grad.shape[2]))


# --------------------------------------------------------------------------- autograd


def _memory_grad(grad: Tensor, start: int, start2: int, rows: int, broadcast: bool, backend: str) -> Tensor:
    if start2 < 0 and not broadcast:
        return grad[:, start : start + rows]  # a view: no kernel, no copy
    return pack_memory_grad_op(grad, start, start2, rows, broadcast, backend)


def _geometry(segment_len: int, read, write, num_read, num_write, tied, backend) -> tuple:
    return (
        num_read, segment_len, num_write, tied, backend,
        read is not None and read.dim() == 2, write is not None and write.dim() == 2,
    )


def _memory_grads(geom: tuple, grad: Tensor, need_read: bool, need_write: bool):
    r, s, w, tied, backend, read_bcast, write_bcast = geom
    d_read = d_write = None
    if tied:
        if need_read:
            d_read = _memory_grad(grad, 0, r + s, r, read_bcast, backend)
        return d_read, None
    if need_read:
        d_read = _memory_grad(grad, 0, -1, r, read_bcast, backend)
    if need_write:
        d_write = _memory_grad(grad, r + s, -1, w, write_bcast, backend)
    return d_read, d_write


def _pack_setup(ctx, inputs, output):
    segment, read, write, num_read, num_write, tied, backend = inputs
    ctx.geom = _geometry(segment.shape[1], read, write, num_read, num_write, tied, backend)


def _pack_backward(ctx, grad):
    r, s = ctx.geom[0], ctx.geom[1]
    d_seg = grad[:, r : r + s] if ctx.needs_input_grad[0] else None
    d_read, d_write = _memory_grads(ctx.geom, grad, ctx.needs_input_grad[1], ctx.needs_input_grad[2])
    return d_seg, d_read, d_write, None, None, None, None


torch.library.register_autograd("rmt_kernels::pack_segment_fwd", _pack_backward, setup_context=_pack_setup)


def _pack_ids_setup(ctx, inputs, output):
    input_ids, weight, read, write, num_read, num_write, tied, backend = inputs
    ctx.geom = _geometry(input_ids.shape[1], read, write, num_read, num_write, tied, backend)
    ctx.num_weights = weight.shape[0]
    ctx.save_for_backward(input_ids if weight.requires_grad else None)


def _pack_ids_backward(ctx, grad):
    (input_ids,) = ctx.saved_tensors
    d_weight = None
    if ctx.needs_input_grad[1]:
        deterministic = torch.are_deterministic_algorithms_enabled()
        d_weight = pack_embedding_grad_op(grad, input_ids, ctx.num_weights, ctx.geom[0], deterministic, ctx.geom[4])
    d_read, d_write = _memory_grads(ctx.geom, grad, ctx.needs_input_grad[2], ctx.needs_input_grad[3])
    return None, d_weight, d_read, d_write, None, None, None, None


torch.library.register_autograd(
    "rmt_kernels::pack_segment_from_ids_fwd", _pack_ids_backward, setup_context=_pack_ids_setup
)


# --------------------------------------------------------------------------- validation


def _check_layout(layout) -> None:
    if not isinstance(layout, MemoryLayout):
        raise TypeError(f"layout must be a rmt_kernels.MemoryLayout, got {type(layout).__name__}")


def _check_memories(layout, read_memory, write_memory, batch: int, dim: int, dtype, device):
    """Validate both memories against the layout; returns ``(read, write, tied)`` (write None if tied)."""
    tied = read_memory is not None and read_memory is write_memory
    for name, mem, rows, block in (
        ("read_memory", read_memory, layout.num_read, "num_read"),
        ("write_memory", write_memory, layout.num_write, "num_write"),
    ):
        if mem is None:
            if rows:
                raise ValueError(
                    f"layout has {block}={rows}: {name} ([B, {rows}, d] or [{rows}, d]) is required"
                )
            continue
        if not isinstance(mem, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mem).__name__}")
        if rows == 0:
            raise ValueError(f"{name} was given but layout has {block}=0 (no such block); pass None")
        if mem.dim() == 2:
            expected = (rows, dim)
        elif mem.dim() == 3:
            expected = (batch, rows, dim)
        else:
            raise ValueError(f"{name} must be [B, {rows}, d] or [{rows}, d], got shape {tuple(mem.shape)}")
        if tuple(mem.shape) != expected:
            raise ValueError(
                f"{name} must have shape {list(expected)} (B={batch}, {block}={rows}, d={dim}), "
                f"got {list(mem.shape)}"
            )
        if mem.dtype != dtype:
            raise TypeError(f"{name} has dtype {mem.dtype} but the packed buffer is {dtype}; they must match")
        if mem.device != device:
            raise ValueError(f"{name} is on {mem.device} but the segment is on {device}; they must match")
    return read_memory, (None if tied else write_memory), tied


def _extent(t: Tensor) -> Tuple[int, int]:
    start = t.data_ptr()
    last = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())) if t.numel() else -1
    return start, start + (last + 1) * t.element_size()


def _overlaps(a: Tensor, b: Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    (a0, a1), (b0, b1) = _extent(a), _extent(b)
    return a0 < b1 and b0 < a1


def _check_out(out, shape, dtype, device, inputs) -> None:
    if not isinstance(out, Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out must have shape {list(shape)} = [B, R + S + W, d], got {list(out.shape)}")
    if out.dtype != dtype:
        raise TypeError(f"out has dtype {out.dtype}; expected {dtype}")
    if out.device != device:
        raise ValueError(f"out is on {out.device}; expected {device}")
    present = [t for t in inputs if t is not None]
    if out.requires_grad or (torch.is_grad_enabled() and any(t.requires_grad for t in present)):
        raise ValueError(
            "out= is not differentiable: an input (or out) requires grad while grad mode is on. "
            "Call without out= for a differentiable result, or run under torch.no_grad()"
        )
    if not _is_compiling():
        for t in present:
            if _overlaps(out, t):
                raise ValueError("out overlaps one of the inputs; pass a separate buffer")


def _resolve(op: str, backend: str, like: Tensor, dtype: torch.dtype) -> str:
    name = backends.resolve_backend(op, backend, like.device)
    impl = backends.get_impl(op, name)
    if dtype not in impl.dtypes:
        raise TypeError(f"dtype {dtype} is not supported by the {name} backend of {op} (supported: {list(impl.dtypes)})")
    return name


# --------------------------------------------------------------------------- public


def pack_segment(
    segment: Tensor,
    layout: MemoryLayout,
    read_memory: Optional[Tensor] = None,
    write_memory: Optional[Tensor] = None,
    *,
    out: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """Pack ``[read memory | segment | write memory]`` into one ``[B, N, d]`` buffer in one kernel.

    Args:
        segment: ``[B, S, d]`` float16/bfloat16/float32 (float64 on the torch backend), any strides
            (a slice of a longer sequence works without a copy).
        layout: :class:`MemoryLayout`; its ``num_read`` (R) and ``num_write`` (W) fix the blocks.
        read_memory: ``[B, R, d]``, or ``[R, d]`` broadcast over the batch; required iff R > 0 and
            must be None when R == 0. Same dtype and device as ``segment``.
        write_memory: ``[B, W, d]`` or ``[W, d]``; required iff W > 0. Passing the same tensor object
            as ``read_memory`` (the official RMT wrapper, R = W) is supported: its gradient is the sum
            of both slots, computed in one pass.
        out: optional preallocated ``[B, N, d]`` buffer of the segment's dtype and device (any
            strides), not overlapping any input. Not differentiable: ValueError when grad mode is on
            and an input requires grad. Returned as the result.
        backend: ``"auto"`` (default), ``"torch"`` or ``"triton"``.

    Returns:
        ``[B, N, d]`` with ``N = R + S + W``, contiguous unless ``out`` is not. Backward gives
        ``segment`` the rows ``[R, R+S)`` of the gradient (a view), each memory its rows (summed over
        the batch for an ``[R, d]`` memory).

    Raises:
        TypeError: non-tensor arguments, a non-MemoryLayout ``layout``, mismatched or unsupported dtypes.
        ValueError: wrong shapes or devices, a memory given for a block the layout lacks or missing
            for one it has, an ``out`` of the wrong shape / overlapping an input / under autograd.
        BackendUnavailableError: the requested backend cannot run here.

    Example::

        >>> layout = MemoryLayout(num_read=4, num_write=4, mask="causal")
        >>> memory = torch.randn(4, 32)                  # [M, d], broadcast over the batch
        >>> x = torch.randn(2, 10, 32)                   # [B, S, d]
        >>> pack_segment(x, layout, memory, memory).shape
        torch.Size([2, 18, 32])
    """
    if not isinstance(segment, Tensor):
        raise TypeError(f"segment must be a torch.Tensor, got {type(segment).__name__}")
    _check_layout(layout)
    if segment.dim() != 3:
        raise ValueError(f"segment must be 3-D [B, S, d], got shape {tuple(segment.shape)}")
    name = _resolve(OP, backend, segment, segment.dtype)
    b, s, d = segment.shape
    read, write, tied = _check_memories(layout, read_memory, write_memory, b, d, segment.dtype, segment.device)
    r, w = layout.num_read, layout.num_write
    if out is not None:
        _check_out(out, (b, r + s + w, d), segment.dtype, segment.device, (segment, read, write))
        pack_segment_out_op(segment, read, write, out, r, w, tied, name)
        return out
    return pack_segment_fwd_op(segment, read, write, r, w, tied, name)


def check_input_ids(input_ids, num_weights: int, name: str = "input_ids") -> None:
    """Validate token ids: an int32/int64 tensor with values in ``[0, num_weights)``.

    The range check reads the values (a device sync on GPU); it is skipped under ``torch.compile``.
    """
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in _ID_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {input_ids.dtype}")
    if input_ids.numel() and not _is_compiling():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= num_weights:
            raise ValueError(
                f"{name} must lie in [0, {num_weights}) (the embedding has {num_weights} rows), "
                f"got values in [{lo}, {hi}]"
            )


def pack_segment_from_ids(
    input_ids: Tensor,
    embedding_weight: Tensor,
    layout: MemoryLayout,
    read_memory: Optional[Tensor] = None,
    write_memory: Optional[Tensor] = None,
    *,
    out: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """:func:`pack_segment` with the embedding lookup fused in: the segment rows are
    ``embedding_weight[input_ids]``, gathered straight into the packed buffer.

    Args:
        input_ids: ``[B, S]`` int32/int64, values in ``[0, V)`` (checked: a device sync on GPU), any
            strides.
        embedding_weight: ``[V, d]`` float16/bfloat16/float32 (float64 on torch), any strides.
        layout, read_memory, write_memory, out, backend: as in :func:`pack_segment` (memories and
            ``out`` in the weight's dtype and device).

    Returns:
        ``[B, R + S + W, d]`` in the weight's dtype. Backward scatters the segment rows' gradient
        into a dense ``[V, d]`` weight gradient (repeated ids accumulate in float32); when
        ``torch.are_deterministic_algorithms_enabled()`` the scatter is deterministic (sorted ids, one
        writer per row), otherwise the triton backend uses atomics.

    Raises:
        TypeError / ValueError / BackendUnavailableError: as in :func:`pack_segment`; also ids of a
        non-integer dtype (TypeError) or out of range (ValueError).

    Example::

        >>> emb = torch.nn.Embedding(100, 32)
        >>> layout = MemoryLayout(num_read=4, num_write=4, mask="causal")
        >>> memory = torch.randn(4, 32)
        >>> ids = torch.randint(0, 100, (2, 10))
        >>> pack_segment_from_ids(ids, emb.weight, layout, memory, memory).shape
        torch.Size([2, 18, 32])
    """
    return _pack_from_ids(input_ids, embedding_weight, layout, read_memory, write_memory, out, backend, True)


def _pack_from_ids(input_ids, embedding_weight, layout, read_memory, write_memory, out, backend, check_ids):
    """:func:`pack_segment_from_ids`; ``check_ids=False`` skips the id range check (a caller that
    validated the whole sequence once)."""
    if not isinstance(embedding_weight, Tensor):
        raise TypeError(f"embedding_weight must be a torch.Tensor, got {type(embedding_weight).__name__}")
    if embedding_weight.dim() != 2:
        raise ValueError(f"embedding_weight must be 2-D [V, d], got shape {tuple(embedding_weight.shape)}")
    _check_layout(layout)
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D [B, S], got shape {tuple(input_ids.shape)}")
    if input_ids.device != embedding_weight.device:
        raise ValueError(f"input_ids is on {input_ids.device} but embedding_weight is on {embedding_weight.device}")
    if check_ids:
        check_input_ids(input_ids, embedding_weight.shape[0])
    elif input_ids.dtype not in _ID_DTYPES:
        raise TypeError(f"input_ids must be int32 or int64, got {input_ids.dtype}")
    dtype, device = embedding_weight.dtype, embedding_weight.device
    name = _resolve(OP_IDS, backend, embedding_weight, dtype)
    b, s = input_ids.shape
    d = embedding_weight.shape[1]
    read, write, tied = _check_memories(layout, read_memory, write_memory, b, d, dtype, device)
    r, w = layout.num_read, layout.num_write
    if out is not None:
        _check_out(out, (b, r + s + w, d), dtype, device, (embedding_weight, read, write))
        pack_segment_from_ids_out_op(input_ids, embedding_weight, read, write, out, r, w, tied, name)
        return out
    return pack_segment_from_ids_fwd_op(input_ids, embedding_weight, read, write, r, w, tied, name)


def unpack_segment(hidden: Tensor, layout: MemoryLayout) -> Tuple[Tensor, Tensor, Tensor]:
    """Split a packed ``[B, N, d]`` tensor into its ``(read [B, R, d], segment [B, S, d], write
    [B, W, d])`` blocks: views, no copies. The next segment's memory is the ``write`` view of the
    backbone's last hidden state.

    Raises:
        TypeError: ``hidden`` is not a tensor or ``layout`` not a MemoryLayout.
        ValueError: ``hidden`` is not 3-D or shorter than R + W.

    Example::

        >>> layout = MemoryLayout(num_read=4, num_write=4)
        >>> read, seg, write = unpack_segment(torch.randn(2, 18, 32), layout)
        >>> read.shape, seg.shape, write.shape
        (torch.Size([2, 4, 32]), torch.Size([2, 10, 32]), torch.Size([2, 4, 32]))
    """
    if not isinstance(hidden, Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    _check_layout(layout)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be 3-D [B, N, d], got shape {tuple(hidden.shape)}")
    n = hidden.shape[1]
    s = layout.segment_len(n)
    r = layout.num_read
    return hidden[:, :r], hidden[:, r : r + s], hidden[:, r + s :]
