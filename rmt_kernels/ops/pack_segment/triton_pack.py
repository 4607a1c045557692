"""Triton kernels of the memory handoff: pack forward (from embeddings or from token ids) and its
backward (memory slices summed over slots and batch, embedding rows scattered by id).

Every kernel here is a copy or a reduction: memory-bound. Tiles are ``[BLOCK_ROWS, BLOCK_D]`` with the
feature dim ``d`` innermost and contiguous in every tensor the package allocates, so loads and stores
vectorise along ``d``; element offsets are int64 (a packed buffer of ``B * N * d`` elements may exceed
2^31). This module imports triton; the interface imports it only when the triton backend is asked for.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .torch_impl import accum_dtype

# Elements of one tile: 16 KiB of float32 / 8 KiB of 16-bit data per load, enough in flight per
# program to cover memory latency without spilling.
_TILE_ELEMS = 4096
_MAX_BLOCK_D = 512
_NUM_WARPS = 4


def _block_d(dim: int) -> int:
    """Power-of-two chunk of ``d``: the largest one up to ``_MAX_BLOCK_D`` that divides ``d`` (no
    masked tail lanes, e.g. 256 for d=768), else the next power of two (masked tail)."""
    for cand in (512, 256, 128, 64):
        if cand <= _MAX_BLOCK_D and dim % cand == 0:
            return cand
    return min(triton.next_power_of_2(max(dim, 1)), _MAX_BLOCK_D)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _block_rows(rows: int, batch: int, block_d: int, device: torch.device) -> int:
    """Rows per program: as many as fill one tile, fewer when that would leave the GPU's SMs idle
    (small batches at short lengths)."""
    br = max(1, _TILE_ELEMS // block_d)
    if device.type == "cuda":
        target = 4 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())
        while br > 1 and triton.cdiv(rows, br) * batch < target:
            br //= 2
    return br


def _strides3(t: torch.Tensor):
    """``(stride_b, stride_n, stride_d)`` of a ``[B, n, d]`` or broadcast ``[n, d]`` tensor."""
    if t.dim() == 2:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


# --------------------------------------------------------------------------- forward


@triton.jit
def _pack_segment_fwd_kernel(
    out_ptr, seg_ptr, ids_ptr, read_ptr, write_ptr,
    R, S, W, D,
    so_b, so_n, so_d,
    ss_b, ss_n, ss_d,
    si_b, si_n,
    sr_b, sr_n, sr_d,
    sw_b, sw_n, sw_d,
    FROM_IDS: tl.constexpr, HAS_READ: tl.constexpr, HAS_WRITE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Grid: (cdiv(N, BLOCK_ROWS), B). One program writes packed rows [pid0 * BLOCK_ROWS, +BLOCK_ROWS)
    # of batch row b, all of d in BLOCK_D chunks. Each packed row has exactly one source (read memory,
    # segment row or embedding row, write memory); the three loads are masked by row class, so a
    # masked-off source costs no memory traffic and a tile straddling a block edge needs no branch.
    # With FROM_IDS, seg_ptr is the embedding weight (ss_n its row stride) and the segment row of
    # packed row R + t is weight[ids[b, t]]. Broadcast memories come with a batch stride of 0.
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # [BR]
    n_rows = R + S + W
    in_rows = rows < n_rows
    is_read = rows < R
    is_seg = (rows >= R) & (rows < R + S)
    is_write = (rows >= R + S) & in_rows
    rows64 = rows.to(tl.int64)

    t = rows64 - R
    if FROM_IDS:
        tok = tl.load(ids_ptr + b * si_b + t * si_n, mask=is_seg, other=0).to(tl.int64)
        seg_off = tok * ss_n  # [BR]
    else:
        seg_off = b * ss_b + t * ss_n
    read_off = b * sr_b + rows64 * sr_n
    write_off = b * sw_b + (rows64 - R - S) * sw_n
    out_off = b * so_b + rows64 * so_n

    for d0 in range(0, D, BLOCK_D):
        cols = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)  # [BD]
        cmask = cols < D
        x = tl.load(
            seg_ptr + seg_off[:, None] + cols[None, :] * ss_d,
            mask=is_seg[:, None] & cmask[None, :], other=0.0,
        )  # [BR, BD]
        if HAS_READ:
            xr = tl.load(
                read_ptr + read_off[:, None] + cols[None, :] * sr_d,
                mask=is_read[:, None] & cmask[None, :], other=0.0,
            )
            x = tl.where(is_read[:, None], xr, x)
        if HAS_WRITE:
            xw = tl.load(
                write_ptr + write_off[:, None] + cols[None, :] * sw_d,
                mask=is_write[:, None] & cmask[None, :], other=0.0,
            )
            x = tl.where(is_write[:, None], xw, x)
        tl.store(out_ptr + out_off[:, None] + cols[None, :] * so_d, x, mask=in_rows[:, None] & cmask[None, :])


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
    block_d = _block_d(dim)
    block_rows = _block_rows(n, batch, block_d, out.device)
    grid = (triton.cdiv(n, block_rows), batch)
    _pack_segment_fwd_kernel[grid](
        out, seg_src, ids_t, read_t, write_t,
        num_read, segment_len, num_write, dim,
        *out.stride(), *ss, *si, *sr, *sw,
        FROM_IDS=from_ids, HAS_READ=has_read, HAS_WRITE=has_write,
        BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=_NUM_WARPS,
    )
    return out


def pack_fwd_triton(segment, read, write, num_read, num_write, tied, out):
    """Triton launcher of ``pack_segment``: fills ``out`` ``[B, N, d]`` (inputs validated)."""
    return _launch_pack(out, segment, None, read, write, num_read, num_write, tied, segment.shape[1], False)


def pack_ids_fwd_triton(input_ids, weight, read, write, num_read, num_write, tied, out):
    """Triton launcher of ``pack_segment_from_ids``: the segment rows are gathered from ``weight``."""
    return _launch_pack(out, weight, input_ids, read, write, num_read, num_write, tied, input_ids.shape[1], True)


# --------------------------------------------------------------------------- backward: memory


@triton.jit
def _pack_memory_grad_kernel(
    dmem_ptr, grad_ptr,
    B, ROWS, D, start, start2,
    sg_b, sg_n, sg_d,
    so_b, so_n, so_d,
    TWO_SLOTS: tl.constexpr, REDUCE_BATCH: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Grid: (cdiv(ROWS, BLOCK_ROWS), cdiv(D, BLOCK_D), 1 if REDUCE_BATCH else B). One program writes
    # one [BLOCK_ROWS, BLOCK_D] tile of the memory gradient: the packed-gradient rows start + r (plus
    # start2 + r when one tensor fed both the R and W slots), summed over the batch for a broadcast
    # [R, d] memory. Memory blocks are short (M <= a few hundred rows), so the feature dim is split
    # over the grid too to keep enough programs in flight. The batch loop runs in a fixed order in
    # float32: the result is deterministic.
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = (pid_r * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)  # [BR]
    cols = (pid_d * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)  # [BD]
    mask = (rows < ROWS)[:, None] & (cols < D)[None, :]
    off1 = (start + rows)[:, None] * sg_n + cols[None, :] * sg_d
    off2 = (start2 + rows)[:, None] * sg_n + cols[None, :] * sg_d
    acc = tl.zeros((BLOCK_ROWS, BLOCK_D), dtype=tl.float32)
    if REDUCE_BATCH:
        b_out = 0
        base = grad_ptr
        for _ in range(0, B):
            acc += tl.load(base + off1, mask=mask, other=0.0).to(tl.float32)
            if TWO_SLOTS:
                acc += tl.load(base + off2, mask=mask, other=0.0).to(tl.float32)
            base += sg_b  # pointer arithmetic is 64-bit
    else:
        b_out = tl.program_id(2).to(tl.int64)
        base = grad_ptr + b_out * sg_b
        acc += tl.load(base + off1, mask=mask, other=0.0).to(tl.float32)
        if TWO_SLOTS:
            acc += tl.load(base + off2, mask=mask, other=0.0).to(tl.float32)
    dst = dmem_ptr + b_out * so_b + rows[:, None] * so_n + cols[None, :] * so_d
    tl.store(dst, acc.to(dmem_ptr.dtype.element_ty), mask=mask)


def memory_grad_triton(grad, start, start2, rows, broadcast):
    """Triton launcher of the memory gradient (see ``torch_impl.memory_grad_torch``)."""
    batch, _, dim = grad.shape
    shape = (rows, dim) if broadcast else (batch, rows, dim)
    dmem = torch.empty(shape, dtype=grad.dtype, device=grad.device)
    if dmem.numel() == 0:
        return dmem.zero_()
    block_d = min(_block_d(dim), 128)
    block_rows = max(1, min(triton.next_power_of_2(rows), _TILE_ELEMS // block_d // 4))
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(dim, block_d), 1 if broadcast else batch)
    so = (0, *dmem.stride()) if broadcast else dmem.stride()
    _pack_memory_grad_kernel[grid](
        dmem, grad, batch, rows, dim, start, max(start2, 0),
        *grad.stride(), *so,
        TWO_SLOTS=start2 >= 0, REDUCE_BATCH=broadcast,
        BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=_NUM_WARPS,
    )
    return dmem


# --------------------------------------------------------------------------- backward: embedding


@triton.jit
def _embedding_grad_atomic_kernel(
    dw_ptr, grad_ptr, ids_ptr,
    S, D, start,
    sg_b, sg_n, sg_d,
    si_b, si_n,
    sw_v, sw_d,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Grid: (cdiv(S, BLOCK_T), B). One program adds the gradient rows of BLOCK_T segment tokens of
    # batch row b into the float32 weight-gradient rows of their ids, with atomics: repeated ids
    # accumulate, in an order that varies from run to run (the non-deterministic mode).
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    t = (pid * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # [BT]
    tmask = t < S
    tok = tl.load(ids_ptr + b * si_b + t * si_n, mask=tmask, other=0).to(tl.int64)
    g_off = b * sg_b + (start + t) * sg_n
    for d0 in range(0, D, BLOCK_D):
        cols = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        mask = tmask[:, None] & (cols < D)[None, :]
        g = tl.load(grad_ptr + g_off[:, None] + cols[None, :] * sg_d, mask=mask, other=0.0).to(tl.float32)
        tl.atomic_add(dw_ptr + tok[:, None] * sw_v + cols[None, :] * sw_d, g, mask=mask)


@triton.jit
def _embedding_grad_sorted_kernel(
    dw_ptr, grad_ptr, sorted_ids_ptr, order_ptr,
    T, S, D, start,
    sg_b, sg_n, sg_d,
    sw_v, sw_d,
    BLOCK_D: tl.constexpr,
):
    # Grid: (B * S, cdiv(D, BLOCK_D)). The B*S token ids are sorted (stably) on the host, so equal ids
    # form runs in token order. The program at the first position of a run sums that run's gradient
    # rows in order, in float32, and writes the weight-gradient row once: deterministic, no atomics,
    # and no host sync to count the runs (programs not at a run start exit at once).
    p = tl.program_id(0).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    cmask = cols < D
    tok = tl.load(sorted_ids_ptr + p).to(tl.int64)
    prev = tl.load(sorted_ids_ptr + p - 1, mask=p > 0, other=-1).to(tl.int64)
    if (p == 0) | (tok != prev):
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        q = p
        cur = tok
        while cur == tok:
            flat = tl.load(order_ptr + q).to(tl.int64)
            b = flat // S
            t = flat - b * S
            acc += tl.load(
                grad_ptr + b * sg_b + (start + t) * sg_n + cols * sg_d, mask=cmask, other=0.0
            ).to(tl.float32)
            q += 1
            cur = tl.load(sorted_ids_ptr + q, mask=q < T, other=-1).to(tl.int64)
        tl.store(dw_ptr + tok * sw_v + cols * sw_d, acc.to(dw_ptr.dtype.element_ty), mask=cmask)


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
        block_d = min(_block_d(dim), 256)
        grid = (total, triton.cdiv(dim, block_d))
        _embedding_grad_sorted_kernel[grid](
            dw, grad, sorted_ids, order,
            total, seg_len, dim, start,
            *grad.stride(), *dw.stride(),
            # One warp: 8 elements per thread along d, i.e. 16-byte accesses for 16-bit dtypes.
            BLOCK_D=block_d, num_warps=1,
        )
        return dw
    acc = accum_dtype(grad.dtype)
    dw = torch.zeros((num_weights, dim), dtype=acc, device=grad.device)
    if batch * seg_len and dim:
        block_d = _block_d(dim)
        block_t = max(1, min(triton.next_power_of_2(seg_len), _TILE_ELEMS // block_d))
        _embedding_grad_atomic_kernel[(triton.cdiv(seg_len, block_t), batch)](
            dw, grad, input_ids,
            seg_len, dim, start,
            *grad.stride(), *input_ids.stride(), *dw.stride(),
            BLOCK_T=block_t, BLOCK_D=block_d, num_warps=_NUM_WARPS,
        )
    return dw if dw.dtype == grad.dtype else dw.to(grad.dtype)
