"""Triton forward kernel of the memory handoff: pack ``[read memory | segment | write memory]`` from
embeddings or from token ids.

A copy kernel: memory-bound. Tiles are ``[BLOCK_ROWS, BLOCK_D]`` with the feature dim ``d`` innermost
and contiguous in every tensor the package allocates, so loads and stores vectorise along ``d``;
element offsets are int64 (a packed buffer of ``B * N * d`` elements may exceed 2^31). This module
imports triton; ``triton_launch`` imports it on the first launch.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
