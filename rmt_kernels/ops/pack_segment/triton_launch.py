"""Launchers of the Triton memory-handoff kernels (``triton_fwd.py``, ``triton_bwd.py``).

Same contract as ``torch_impl`` and ``cuda``: validated inputs, outputs allocated here (or the
caller's ``out``), no autograd. Importing this module does not import triton: the kernel modules are
imported on the first launch, so ``import rmt_kernels`` works without triton and without a GPU.

Every launch goes through :func:`_launch`: it makes the tensors' GPU the current device (Triton launches
on the current device and its current stream, not the tensors') and cuts a batch of more than
:data:`GRID_YZ_MAX` rows into launches over chunks of the batch.

The meta-parameters come from :func:`pack_config`, :func:`memory_grad_config` and
:func:`embedding_grad_config`, which ``aot.py`` reads too: ``rmt-kernels aot`` compiles the tiles the
launches use.
"""

from __future__ import annotations

import functools

import torch

from .._alloc import GRID_YZ_MAX, accum_dtype
from .._alloc import device_guard as _device_guard

# Elements of one tile: 16 KiB of float32 / 8 KiB of 16-bit data per load, enough in flight per
# program to cover memory latency without spilling.
_TILE_ELEMS = 4096
_MAX_BLOCK_D = 512
_NUM_WARPS = 4
# CUDA's limit on grid axes y and z (axis x takes 2**31 - 1), where the kernels' grids put the batch.


def _block_d(dim: int) -> int:
    """Power-of-two chunk of ``d``: the largest one up to ``_MAX_BLOCK_D`` that divides ``d`` (no
    masked tail lanes, e.g. 256 for d=768), else the next power of two (masked tail)."""
    for cand in (512, 256, 128, 64):
        if cand <= _MAX_BLOCK_D and dim % cand == 0:
            return cand
    return min(_next_pow2(max(dim, 1)), _MAX_BLOCK_D)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def pack_config(dim: int) -> dict:
    """Meta-parameters of ``_pack_segment_fwd_kernel`` for feature dim ``dim``: ``BLOCK_D`` and the
    largest ``BLOCK_ROWS`` (the launch may halve it to fill the GPU: :func:`_block_rows`)."""
    block_d = _block_d(dim)
    return {"BLOCK_ROWS": max(1, _TILE_ELEMS // block_d), "BLOCK_D": block_d, "num_warps": _NUM_WARPS}


def memory_grad_config(rows: int, dim: int) -> dict:
    """Meta-parameters of ``_pack_memory_grad_kernel`` for a ``[rows, dim]`` memory."""
    block_d = min(_block_d(dim), 128)
    block_rows = max(1, min(_next_pow2(rows), _TILE_ELEMS // block_d // 4))
    return {"BLOCK_ROWS": block_rows, "BLOCK_D": block_d, "num_warps": _NUM_WARPS}


def embedding_grad_config(seg_len: int, dim: int, deterministic: bool) -> dict:
    """Meta-parameters of ``_embedding_grad_sorted_kernel`` (``deterministic``) or
    ``_embedding_grad_atomic_kernel`` for ``seg_len`` tokens of feature dim ``dim``."""
    if deterministic:
        # One warp: 8 elements per thread along d, i.e. 16-byte accesses for 16-bit dtypes.
        return {"BLOCK_D": min(_block_d(dim), 256), "num_warps": 1}
    block_d = _block_d(dim)
    block_t = max(1, min(_next_pow2(seg_len), _TILE_ELEMS // block_d))
    return {"BLOCK_T": block_t, "BLOCK_D": block_d, "num_warps": _NUM_WARPS}


def _block_rows(block_rows: int, rows: int, batch: int, device: torch.device) -> int:
    """Rows per program: ``block_rows`` (one full tile), fewer when that would leave the GPU's SMs idle
    (small batches at short lengths)."""
    br = block_rows
    if device.type == "cuda":
        target = 4 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())
        while br > 1 and _cdiv(rows, br) * batch < target:
            br //= 2
    return br


def _strides3(t: torch.Tensor):
    """``(stride_b, stride_n, stride_d)`` of a ``[B, n, d]`` or broadcast ``[n, d]`` tensor."""
    if t.dim() == 2:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _rows(t: torch.Tensor, b0: int, b1: int) -> torch.Tensor:
    """Batch rows ``[b0, b1)`` of ``t`` (a view; ``t`` itself when that is all of them)."""
    return t if b0 == 0 and b1 == t.shape[0] else t[b0:b1]


def _launch(kernel, grid, batch: int, args, device_tensor: torch.Tensor, meta: dict) -> None:
    """``kernel[grid(rows)](*args(b0, b1), **meta)`` on the device of ``device_tensor``, over chunks
    ``[b0, b1)`` of at most :data:`GRID_YZ_MAX` batch rows: ``grid(rows)`` is the grid of a launch over
    ``rows`` batch rows, ``args(b0, b1)`` its arguments (views of the batched tensors' rows; the
    strides, and with them the kernels, stay the same)."""
    with _device_guard(device_tensor):
        for b0 in range(0, batch, GRID_YZ_MAX):
            b1 = min(b0 + GRID_YZ_MAX, batch)
            kernel[grid(b1 - b0)](*args(b0, b1), **meta)


def _kernels():
    """The kernel modules, imported on first use (they import triton)."""
    from . import triton_bwd, triton_fwd

    return triton_fwd, triton_bwd


def _launch_pack(out, seg_src, ids, read, write, num_read, num_write, tied, segment_len, from_ids):
    batch, n, dim = out.shape
    if out.numel() == 0:
        return out
    if tied:
        write = read
    has_read, has_write = num_read > 0, num_write > 0
    # Absent sources are never dereferenced (HAS_READ/HAS_WRITE are compile-time off); pass `out` as
    # a placeholder pointer with zero strides.
    read_t = read if has_read else out
    write_t = write if has_write else out
    sr = _strides3(read) if has_read else (0, 0, 0)
    sw = _strides3(write) if has_write else (0, 0, 0)
    if from_ids:
        ss = (0, seg_src.stride(0), seg_src.stride(1))
        si = (ids.stride(0), ids.stride(1))
        ids_t = ids
    else:
        ss = _strides3(seg_src)
        si = (0, 0)
        ids_t = out
    meta = pack_config(dim)
    meta["BLOCK_ROWS"] = _block_rows(meta["BLOCK_ROWS"], n, batch, out.device)

    def args(b0, b1):
        # The embedding weight, absent sources and broadcast [M, d] memories have no batch rows.
        def rows(t, batched):
            return _rows(t, b0, b1) if batched else t

        return (
            _rows(out, b0, b1), rows(seg_src, not from_ids), rows(ids_t, from_ids),
            rows(read_t, has_read and read.dim() == 3), rows(write_t, has_write and write.dim() == 3),
            num_read, segment_len, num_write, dim,
            *out.stride(), *ss, *si, *sr, *sw,
        )

    _launch(_kernels()[0]._pack_segment_fwd_kernel, lambda rows: (_cdiv(n, meta["BLOCK_ROWS"]), rows), batch, args,
            out, dict(FROM_IDS=from_ids, HAS_READ=has_read, HAS_WRITE=has_write, **meta))
    return out


def pack_fwd_triton(segment, read, write, num_read, num_write, tied, out):
    """Triton launcher of ``pack_segment``: fills ``out`` ``[B, N, d]`` (inputs validated)."""
    return _launch_pack(out, segment, None, read, write, num_read, num_write, tied, segment.shape[1], False)


def pack_ids_fwd_triton(input_ids, weight, read, write, num_read, num_write, tied, out):
    """Triton launcher of ``pack_segment_from_ids``: the segment rows are gathered from ``weight``."""
    return _launch_pack(out, weight, input_ids, read, write, num_read, num_write, tied, input_ids.shape[1], True)


def memory_grad_triton(grad, start, start2, rows, broadcast):
    """Triton launcher of the memory gradient (the contract of ``torch_impl.memory_grad_torch``)."""
    batch, _, dim = grad.shape
    shape = (rows, dim) if broadcast else (batch, rows, dim)
    dmem = torch.empty(shape, dtype=grad.dtype, device=grad.device)
    if dmem.numel() == 0:
        return dmem.zero_()
    meta = memory_grad_config(rows, dim)
    so = (0, *dmem.stride()) if broadcast else dmem.stride()

    def args(b0, b1):
        # A broadcast memory's gradient sums the whole batch in one program (one launch).
        g, d = (grad, dmem) if broadcast else (_rows(grad, b0, b1), _rows(dmem, b0, b1))
        return (d, g, batch, rows, dim, start, max(start2, 0), *grad.stride(), *so)

    _launch(_kernels()[1]._pack_memory_grad_kernel,
            lambda n: (_cdiv(rows, meta["BLOCK_ROWS"]), _cdiv(dim, meta["BLOCK_D"]), n), 1 if broadcast else batch,
            args, grad, dict(TWO_SLOTS=start2 >= 0, REDUCE_BATCH=broadcast, **meta))
    return dmem


def embedding_grad_triton(grad, input_ids, num_weights, start, deterministic):
    """Triton launcher of the embedding-weight gradient ``[V, d]`` (grad's dtype).

    ``deterministic``: sort the ids and sum each id's rows in token order (one writer per row);
    otherwise float32 atomics. Either way the accumulation is float32.
    """
    batch, seg_len = input_ids.shape
    dim = grad.shape[2]
    if deterministic:
        dw = torch.zeros((num_weights, dim), dtype=grad.dtype, device=grad.device)
        total = batch * seg_len
        if total == 0 or dim == 0:
            return dw
        sorted_ids, order = torch.sort(input_ids.reshape(-1), stable=True)
        meta = embedding_grad_config(seg_len, dim, True)
        # One launch: the batch is folded into grid axis x (up to 2**31 - 1 tokens).
        _launch(_kernels()[1]._embedding_grad_sorted_kernel, lambda _: (total, _cdiv(dim, meta["BLOCK_D"])), 1,
                lambda b0, b1: (dw, grad, sorted_ids, order, total, seg_len, dim, start, *grad.stride(),
                                *dw.stride()), grad, meta)
        return dw
    acc = accum_dtype(grad.dtype)
    dw = torch.zeros((num_weights, dim), dtype=acc, device=grad.device)
    if batch * seg_len and dim:
        meta = embedding_grad_config(seg_len, dim, False)
        _launch(_kernels()[1]._embedding_grad_atomic_kernel, lambda rows: (_cdiv(seg_len, meta["BLOCK_T"]), rows),
                batch, lambda b0, b1: (dw, _rows(grad, b0, b1), _rows(input_ids, b0, b1), seg_len, dim, start,
                                       *grad.stride(), *input_ids.stride(), *dw.stride()), grad, meta)
    return dw if dw.dtype == grad.dtype else dw.to(grad.dtype)
