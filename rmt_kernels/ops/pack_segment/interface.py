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

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ... import _checks, _extension, backends
from .. import _function
from ...layout import MemoryLayout
from .._alloc import alloc_packed
from . import cuda, torch_impl, triton_launch

OP = "pack_segment"
OP_IDS = "pack_segment_from_ids"

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TORCH_DEVICES = ("cpu", "cuda", "mps", "xpu")

# The backends of both ops: each entry names its launchers (``fwd`` packs, ``bwd`` is the reduction
# behind the backward: a memory's gradient, the embedding weight's). Importing triton_launch and cuda
# imports neither triton nor the extension; they load on the first launch.
BACKEND_TABLE = backends.register_op(OP, {
    "torch": backends.BackendImpl(
        fwd=torch_impl.pack_fwd_torch, bwd=torch_impl.memory_grad_torch,
        dtypes=_FLOAT_DTYPES + (torch.float64,), devices=_TORCH_DEVICES),
    "triton": backends.BackendImpl(
        fwd=triton_launch.pack_fwd_triton, bwd=triton_launch.memory_grad_triton,
        dtypes=_FLOAT_DTYPES, status=backends.triton_status),
    "cuda": backends.BackendImpl(
        fwd=cuda.pack_fwd_cuda, bwd=cuda.memory_grad_cuda,
        dtypes=cuda.DTYPES, devices=("cuda",), status=_extension.cuda_status),
})
BACKEND_TABLE_IDS = backends.register_op(OP_IDS, {
    "torch": backends.BackendImpl(
        fwd=torch_impl.pack_ids_fwd_torch, bwd=torch_impl.embedding_grad_torch,
        dtypes=_FLOAT_DTYPES + (torch.float64,), devices=_TORCH_DEVICES),
    "triton": backends.BackendImpl(
        fwd=triton_launch.pack_ids_fwd_triton, bwd=triton_launch.embedding_grad_triton,
        dtypes=_FLOAT_DTYPES, status=backends.triton_status),
    "cuda": backends.BackendImpl(
        fwd=cuda.pack_ids_fwd_cuda, bwd=cuda.embedding_grad_cuda,
        dtypes=cuda.DTYPES, devices=("cuda",), status=_extension.cuda_status),
})


# --------------------------------------------------------------------------- launch


def _pack_fwd(segment, read, write, num_read, num_write, tied, backend) -> Tensor:
    b, s, d = segment.shape
    out = alloc_packed(b, num_read + s + num_write, d, segment.dtype, segment.device)
    BACKEND_TABLE[backend].fwd(segment, read, write, num_read, num_write, tied, out)
    return out


def _pack_ids_fwd(input_ids, weight, read, write, num_read, num_write, tied, backend) -> Tensor:
    b, s = input_ids.shape
    out = alloc_packed(b, num_read + s + num_write, weight.shape[1], weight.dtype, weight.device)
    BACKEND_TABLE_IDS[backend].fwd(input_ids, weight, read, write, num_read, num_write, tied, out)
    return out


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
    return _pack_fwd(segment, read, write, num_read, num_write, tied, backend)


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
    BACKEND_TABLE[backend].fwd(segment, read, write, num_read, num_write, tied, out)


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
    return _pack_ids_fwd(input_ids, weight, read, write, num_read, num_write, tied, backend)


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
    BACKEND_TABLE_IDS[backend].fwd(input_ids, weight, read, write, num_read, num_write, tied, out)


@pack_segment_from_ids_out_op.register_fake
def _(input_ids, weight, read, write, out, num_read, num_write, tied, backend):
    return None


@torch.library.custom_op("rmt_kernels::pack_memory_grad", mutates_args=())
def pack_memory_grad_op(grad: Tensor, start: int, start2: int, rows: int, broadcast: bool, backend: str) -> Tensor:
    return BACKEND_TABLE[backend].bwd(grad, start, start2, rows, broadcast)


@pack_memory_grad_op.register_fake
def _(grad, start, start2, rows, broadcast, backend):
    shape = (rows, grad.shape[2]) if broadcast else (grad.shape[0], rows, grad.shape[2])
    return grad.new_empty(shape)


@torch.library.custom_op("rmt_kernels::pack_embedding_grad", mutates_args=())
def pack_embedding_grad_op(
    grad: Tensor, input_ids: Tensor, num_weights: int, start: int, deterministic: bool, backend: str
) -> Tensor:
    return BACKEND_TABLE_IDS[backend].bwd(grad, input_ids, num_weights, start, deterministic)


@pack_embedding_grad_op.register_fake
def _(grad, input_ids, num_weights, start, deterministic, backend):
    return grad.new_empty((num_weights, grad.shape[2]))


# --------------------------------------------------------------------------- autograd


def _memory_grad(grad: Tensor, start: int, start2: int, rows: int, broadcast: bool, backend: str) -> Tensor:
    if start2 < 0 and not broadcast:
        return grad[:, start : start + rows]  # a view: no kernel, no copy
    if _checks._is_compiling():
        return pack_memory_grad_op(grad, start, start2, rows, broadcast, backend)
    return BACKEND_TABLE[backend].bwd(grad, start, start2, rows, broadcast)


class _Geometry(NamedTuple):
    """What the backward of a pack needs to know (saved on ``ctx``)."""

    num_read: int
    segment_len: int
    num_write: int
    tied: bool
    backend: str
    read_broadcast: bool  # an [R, d] memory: its gradient sums over the batch
    write_broadcast: bool


def _geometry(segment_len: int, read, write, num_read, num_write, tied, backend) -> _Geometry:
    return _Geometry(
        num_read, segment_len, num_write, tied, backend,
        read is not None and read.dim() == 2, write is not None and write.dim() == 2,
    )


def _memory_grads(geom: _Geometry, grad: Tensor, need_read: bool, need_write: bool):
    r, s = geom.num_read, geom.segment_len
    d_read = d_write = None
    if geom.tied:
        if need_read:
            d_read = _memory_grad(grad, 0, r + s, r, geom.read_broadcast, geom.backend)
        return d_read, None
    if need_read:
        d_read = _memory_grad(grad, 0, -1, r, geom.read_broadcast, geom.backend)
    if need_write:
        d_write = _memory_grad(grad, r + s, -1, geom.num_write, geom.write_broadcast, geom.backend)
    return d_read, d_write


def _pack_setup(ctx, inputs, output):
    segment, read, write, num_read, num_write, tied, backend = inputs
    ctx.geom = _geometry(segment.shape[1], read, write, num_read, num_write, tied, backend)


def _pack_backward(ctx, grad):
    r, s = ctx.geom.num_read, ctx.geom.segment_len
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
        args = (grad, input_ids, ctx.num_weights, ctx.geom.num_read, deterministic)
        if _checks._is_compiling():
            d_weight = pack_embedding_grad_op(*args, ctx.geom.backend)
        else:
            d_weight = BACKEND_TABLE_IDS[ctx.geom.backend].bwd(*args)
    d_read, d_write = _memory_grads(ctx.geom, grad, ctx.needs_input_grad[2], ctx.needs_input_grad[3])
    return None, d_weight, d_read, d_write, None, None, None, None


torch.library.register_autograd(
    "rmt_kernels::pack_segment_from_ids_fwd", _pack_ids_backward, setup_context=_pack_ids_setup
)


# Eager autograd (ops/_function.py): the custom ops' setup and backward on a direct launch.
_Pack = _function.eager_functions("_Pack", _pack_fwd, _pack_setup, _pack_backward)
_PackIds = _function.eager_functions("_PackIds", _pack_ids_fwd, _pack_ids_setup, _pack_ids_backward)


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
    _checks.check_segment(segment)
    _checks.check_layout(layout)
    name = resolve_backend(backend, segment.device, segment.dtype, from_ids=False)
    b, s, d = segment.shape
    read, write, tied = _checks.check_memories(layout, read_memory, write_memory, b, d, segment.dtype, segment.device)
    if out is not None:
        _checks.check_out(out, (b, layout.seq_len(s), d), segment.dtype, segment.device, (segment, read, write))
    return pack_validated(segment, None, layout, read, write, tied, out, name)


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
    _checks.check_embedding_weight(embedding_weight)
    _checks.check_layout(layout)
    _checks.check_ids_tensor(input_ids, embedding_weight)
    _checks.check_input_ids(input_ids, embedding_weight.shape[0])
    dtype, device = embedding_weight.dtype, embedding_weight.device
    name = resolve_backend(backend, device, dtype, from_ids=True)
    b, s = input_ids.shape
    d = embedding_weight.shape[1]
    read, write, tied = _checks.check_memories(layout, read_memory, write_memory, b, d, dtype, device)
    if out is not None:
        _checks.check_out(out, (b, layout.seq_len(s), d), dtype, device, (embedding_weight, read, write))
    return pack_validated(input_ids, embedding_weight, layout, read, write, tied, out, name)


def pack_validated(
    segment: Tensor,
    embedding_weight: Optional[Tensor],
    layout: MemoryLayout,
    read: Optional[Tensor],
    write: Optional[Tensor],
    tied: bool,
    out: Optional[Tensor],
    backend: str,
) -> Tensor:
    """The entry behind :func:`pack_segment` and :func:`pack_segment_from_ids` for arguments already
    checked by ``_checks`` (the recurrent driver checks once per run, then calls this per segment).

    ``segment`` is ``[B, S, d]`` embeddings, or ``[B, S]`` token ids when ``embedding_weight`` is
    given; ``write`` is None when ``tied`` (the read memory fills both blocks); ``backend`` is a
    resolved backend name; ``out`` an optional buffer that passed ``_checks.check_out``.
    """
    r, w = layout.num_read, layout.num_write
    if _checks._is_compiling():
        return _pack_op(segment, embedding_weight, read, write, out, r, w, tied, backend)
    # Eager: the same launchers without the custom-op machinery.
    if out is not None:
        if embedding_weight is None:
            BACKEND_TABLE[backend].fwd(segment, read, write, r, w, tied, out)
        else:
            BACKEND_TABLE_IDS[backend].fwd(segment, embedding_weight, read, write, r, w, tied, out)
        # What mutates_args does for the custom op: a graph that saved ``out`` sees it overwritten.
        torch.autograd.graph.increment_version(out)
        return out
    sources = (segment if embedding_weight is None else embedding_weight, read, write)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in sources):
        if backend == "torch":
            # Stock ops recorded by autograd: their backward is torch's own C++ nodes, cheaper on CPU
            # than this op's Python backward node (measured: 1.4% of an RMT training step).
            return torch_impl.pack_autograd_torch(segment, embedding_weight, read, write, r, w, tied)
        if embedding_weight is None:
            return _function.apply(_Pack, segment, read, write, r, w, tied, backend)
        return _function.apply(_PackIds, segment, embedding_weight, read, write, r, w, tied, backend)
    if embedding_weight is None:
        return _pack_fwd(segment, read, write, r, w, tied, backend)
    return _pack_ids_fwd(segment, embedding_weight, read, write, r, w, tied, backend)


def _pack_op(segment, embedding_weight, read, write, out, r, w, tied, backend) -> Tensor:
    """The custom-op path (what ``torch.compile`` traces)."""
    if embedding_weight is None:
        if out is not None:
            pack_segment_out_op(segment, read, write, out, r, w, tied, backend)
            return out
        return pack_segment_fwd_op(segment, read, write, r, w, tied, backend)
    if out is not None:
        pack_segment_from_ids_out_op(segment, embedding_weight, read, write, out, r, w, tied, backend)
        return out
    return pack_segment_from_ids_fwd_op(segment, embedding_weight, read, write, r, w, tied, backend)


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, from_ids: bool) -> str:
    """The concrete backend of :func:`pack_segment` (``from_ids``: :func:`pack_segment_from_ids`) for
    ``dtype`` tensors on ``device``, to pass to :func:`pack_validated`. Raises as the public functions."""
    op = OP_IDS if from_ids else OP
    name = backends.resolve_backend(op, backend, device, dtype)
    table = BACKEND_TABLE_IDS if from_ids else BACKEND_TABLE
    _checks.check_backend_dtype(op, name, dtype, table[name].dtypes)
    return name


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
    _checks.check_layout(layout)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be 3-D [B, N, d], got shape {tuple(hidden.shape)}")
    n = hidden.shape[1]
    s = layout.segment_len(n)
    r = layout.num_read
    return hidden[:, :r], hidden[:, r : r + s], hidden[:, r + s :]
