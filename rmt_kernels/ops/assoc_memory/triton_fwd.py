"""Triton forward kernels of ARMT's associative memory: the read ``y = x + phi(q) A / (phi(q) z + eps)``
and the delta-rule write of the memory rows into ``(A, z)`` (the contract of ``torch_impl``).

The DPFP feature map and its L2 normalisation are computed in registers from the projection rows in
chunks of ``BLOCK_K`` lanes (``triton_common``) and never reach global memory; every product runs in
float32 (the state's dtype) on tensor cores with ``tl.dot`` on ``[rows, BLOCK_K] x [BLOCK_K, dv]``
tiles, at ``input_precision=DOT_PREC``: ``"tf32"`` for 16-bit inputs, ``"tf32x3"`` for float32
inputs under torch's ``"highest"`` float32 matmul precision, else ``"tf32"``
(``triton_launch.dot_precision``; never the scalar ``"ieee"`` path). Element offsets of the batched
tensors are int64. This module imports triton; ``triton_launch`` imports it on the first launch.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import EPS, _f_chunk, _feature_norm, _state_chunk, _store_state_chunk, _store_vec_chunk, \
    _vec_chunk


@triton.jit
def _assoc_read_fwd_kernel(
    y_ptr, x_ptr, q_ptr, a_ptr, z_ptr,
    N, DV, H,
    sy_b, sy_n, sy_d,
    sx_b, sx_n, sx_d,
    sq_b, sq_n, sq_d,
    sa_b, sa_h, sa_k, sa_v,
    sz_b, sz_h, sz_k,
    NORMALIZE: tl.constexpr, USE_DENOM: tl.constexpr, P: tl.constexpr, TWO_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # Grid: (B * H, cdiv(N, BLOCK_M), cdiv(dv, BLOCK_DV)). One program: rows [pid_m BM, +BM) of head h,
    # value columns [pid_v BDV, +BDV), over the 3 TWO_P / BLOCK_K feature chunks. The features are
    # recomputed per value block (gathers of the q rows, cache hits): cheaper than a second pass over
    # memory.
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_v = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    q_off = b * sq_b + rows64 * sq_n + h * P * sq_d
    norm = tl.full([BLOCK_M], 1.0, tl.float32)
    if NORMALIZE:
        norm = _feature_norm(q_ptr, q_off, rmask, sq_d, BLOCK_M, P, TWO_P, BLOCK_K)
    cols = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    cmask = cols < DV
    a_base = b * sa_b + h * sa_h
    z_base = b * sz_b + h * sz_h
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    den = tl.zeros([BLOCK_M], dtype=tl.float32)
    for t in tl.range(0, 3 * TWO_P, BLOCK_K, loop_unroll_factor=1):
        j = t // TWO_P + 1
        c0 = t % TWO_P
        f = _f_chunk(q_ptr, q_off, rmask, sq_d, norm, j, c0, NORMALIZE, P, BLOCK_K)
        acc = tl.dot(f, _state_chunk(a_ptr, a_base, sa_k, sa_v, j, c0, cols, cmask, P, BLOCK_K), acc,
                     input_precision=DOT_PREC)
        if USE_DENOM:
            den += tl.sum(f * _vec_chunk(z_ptr, z_base, sz_k, j, c0, P, BLOCK_K)[None, :], axis=1)
    if USE_DENOM:
        acc = acc / (den + EPS)[:, None]
    gcols = (h * DV + cols).to(tl.int64)
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + (b * sx_b + rows64 * sx_n)[:, None] + (gcols * sx_d)[None, :], mask=mask, other=0.0)
    # As torch_impl: the read is rounded to x's dtype, then added in x's dtype.
    y = x.to(tl.float32) + acc.to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + (b * sy_b + rows64 * sy_n)[:, None] + (gcols * sy_d)[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _assoc_write_fwd_kernel(
    an_ptr, zn_ptr, k_ptr, v_ptr, b_ptr, a_ptr, z_ptr,
    M, DV, H,
    san_b, san_h, san_k, san_v,
    szn_b, szn_h, szn_k,
    sk_b, sk_m, sk_d,
    sv_b, sv_m, sv_d,
    sb_b, sb_m, sb_d,
    sa_b, sa_h, sa_k, sa_v,
    sz_b, sz_h, sz_k,
    HAS_STATE: tl.constexpr, NORMALIZE: tl.constexpr, USE_DENOM: tl.constexpr, CORRECTION: tl.constexpr,
    GATING: tl.constexpr, P: tl.constexpr, TWO_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # Grid: (B * H, cdiv(dv, BLOCK_DV), 3). One program writes feature piece J = pid_j + 1 (rows
    # [(J - 1) 2p, J 2p) of the head's state) at value columns [pid_v BDV, +BDV), looping over the M
    # memory rows: A'_J = A_J + phi_J^T (beta (v - vbar)), a [TWO_P, BLOCK_M] x [BLOCK_M, BLOCK_DV]
    # product. vbar needs the full feature width, which every program recomputes in BLOCK_K chunks
    # (M is small). z'_J = z_J + sum_i gamma_i phi_J,i is written by the programs of value block 0.
    # Without HAS_STATE (a first segment) a_ptr/z_ptr are placeholders.
    pid_bh = tl.program_id(0)
    pid_v = tl.program_id(1)
    J = tl.program_id(2) + 1
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    cols = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    cmask = cols < DV
    gcols = (h * DV + cols).to(tl.int64)
    a_base = b * sa_b + h * sa_h
    z_base = b * sz_b + h * sz_h
    acc = tl.zeros([TWO_P, BLOCK_DV], dtype=tl.float32)
    zacc = tl.zeros([TWO_P], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < M
        rows64 = rows.to(tl.int64)
        k_off = b * sk_b + rows64 * sk_m + h * P * sk_d
        norm = tl.full([BLOCK_M], 1.0, tl.float32)
        if NORMALIZE:
            norm = _feature_norm(k_ptr, k_off, rmask, sk_d, BLOCK_M, P, TWO_P, BLOCK_K)
        mask = rmask[:, None] & cmask[None, :]
        diff = tl.load(v_ptr + (b * sv_b + rows64 * sv_m)[:, None] + (gcols * sv_d)[None, :], mask=mask,
                       other=0.0).to(tl.float32)
        gamma = tl.full([BLOCK_M], 1.0, tl.float32)
        if HAS_STATE:
            vbar = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
            den = tl.zeros([BLOCK_M], dtype=tl.float32)
            n2 = tl.zeros([BLOCK_M], dtype=tl.float32)
            for t in tl.range(0, 3 * TWO_P, BLOCK_K, loop_unroll_factor=1):
                j = t // TWO_P + 1
                c0 = t % TWO_P
                f = _f_chunk(k_ptr, k_off, rmask, sk_d, norm, j, c0, NORMALIZE, P, BLOCK_K)
                vbar = tl.dot(f, _state_chunk(a_ptr, a_base, sa_k, sa_v, j, c0, cols, cmask, P, BLOCK_K), vbar,
                              input_precision=DOT_PREC)
                if USE_DENOM:
                    den += tl.sum(f * _vec_chunk(z_ptr, z_base, sz_k, j, c0, P, BLOCK_K)[None, :], axis=1)
                    if CORRECTION:
                        n2 += tl.sum(f * f, axis=1)
            if USE_DENOM:
                den += EPS
                vbar = vbar / den[:, None]
                if CORRECTION:
                    if not NORMALIZE:
                        n2 += EPS
                    n2 = tl.where(rmask, n2, 1.0)  # padded rows: no 0/0
                    gamma = tl.minimum(tl.maximum(1.0 - den / n2, 0.0), 1.0)
            diff = diff - vbar
        if GATING:
            logit = tl.load(b_ptr + (b * sb_b + rows64 * sb_m)[:, None] + (gcols * sb_d)[None, :], mask=mask,
                            other=0.0).to(tl.float32)
            beta = 1.0 / (1.0 + tl.exp(-logit))
        else:
            logit = tl.load(b_ptr + b * sb_b + rows64 * sb_m + h * sb_d, mask=rmask, other=0.0).to(tl.float32)
            beta = (1.0 / (1.0 + tl.exp(-logit)))[:, None]
        delta = tl.where(mask, beta * diff, 0.0)
        fj = _f_chunk(k_ptr, k_off, rmask, sk_d, norm, J, 0, NORMALIZE, P, TWO_P)
        acc = tl.dot(tl.trans(fj), delta, acc, input_precision=DOT_PREC)
        zacc += tl.sum(tl.where(rmask[:, None], gamma[:, None] * fj, 0.0), axis=0)
    if HAS_STATE:
        acc += _state_chunk(a_ptr, a_base, sa_k, sa_v, J, 0, cols, cmask, P, TWO_P)
        zacc += _vec_chunk(z_ptr, z_base, sz_k, J, 0, P, TWO_P)
    _store_state_chunk(an_ptr, b * san_b + h * san_h, san_k, san_v, J, 0, cols, cmask, acc, P, TWO_P)
    if pid_v == 0:
        _store_vec_chunk(zn_ptr, b * szn_b + h * szn_h, szn_k, J, 0, zacc, P, TWO_P)
