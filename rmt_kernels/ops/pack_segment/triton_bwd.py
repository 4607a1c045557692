"""Triton backward kernels of the memory handoff: a memory's gradient (slices of the packed gradient
summed over slots and batch) and the embedding weight's gradient (rows scattered by id, with atomics or
deterministically from sorted ids).

Reductions accumulate in float32; element offsets are int64. This module imports triton;
``triton_launch`` imports it on the first launch.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
