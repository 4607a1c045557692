"""Triton backward of segment attention: three kernels, no atomics (deterministic in every mode).

With ``P = exp(scale * Q K^T - lse)`` (the forward's log-sum-exp) and ``delta = rowsum(dO * O)``:
``dV = P^T dO``, ``dS = P * (dO V^T - delta)``, ``dQ = scale * dS K``, ``dK = scale * dS^T Q``.

``_bwd_preprocess_kernel``
    grid ``(cdiv(N, BLOCK_M), H_q, B)``; one program writes ``delta`` (float32) for ``BLOCK_M`` rows.

``_bwd_dkdv_kernel``
    grid ``(cdiv(L, BLOCK_N), H_kv, B)`` with ``L = N`` (packed keys) or ``L = P`` (``IS_PREFIX``: the
    prefix, launched only when its gradient is needed). One program keeps a ``[BLOCK_N, BLOCK_D]`` tile
    of K and V on chip and float32 dK, dV accumulators in registers, and streams the
    ``[BLOCK_M, BLOCK_D]`` query tiles (Q, dO, lse, delta) of every query head of its group that see
    the key tile: the group sum is an ordered register sum, with no atomics. Visibility is monotone in
    the row (``key_end`` never decreases), so the rows that see packed key ``j`` are
    ``[first_row(j), N)``: the program visits query tiles ``[first_row(j_min) // BLOCK_M,
    cdiv(N, BLOCK_M))`` (``j_min``: the tile's first key outside the padded gap; none when the tile
    lies in the gap), the transpose of the forward's tile set, against ``cdiv(N, BLOCK_M)`` per head
    for a dense kernel. When the key tile holds only visible keys, the query tiles from
    ``cdiv(first_row(last key), BLOCK_M)`` up to the bounds tail take the unmasked path. Prefix key
    tiles visit the query tiles of the rows that see the prefix (all, or ``[R, R + S)``).

``_bwd_dq_kernel``
    grid ``(cdiv(N, BLOCK_M), H_q, B)``; one program keeps a query block, dO, lse and delta in registers
    and visits exactly the key tiles of the forward's schedule (``triton_common._packed_key_tiles``,
    ``_prefix_key_tiles``), accumulating dQ in float32.

Recomputing ``Q K^T`` and ``dO V^T`` in the dQ kernel costs two products per visited tile over an
atomic-add design (seven instead of five), and buys determinism in every mode. Rows that see no key
have ``lse = -inf``; they only occur in masked tiles, where the mask zeroes ``P`` (``where``, not a
product, so ``inf`` never meets 0) and their gradients are exactly 0.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import (
    _LOG2E,
    TRACE_FULL,
    TRACE_MASKED,
    _first_row,
    _gap,
    _key_end,
    _load_kv_tile,
    _load_rows,
    _masked_tile_index,
    _operand,
    _stored,
    _packed_key_tiles,
    _packed_visible,
    _prefix_key_tiles,
    _prefix_rows,
    pick_configs,
)


@triton.jit
def _bwd_preprocess_kernel(
    Out, DO, Delta,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_db, stride_dh, stride_dn, stride_dd,
    stride_tb, stride_th, stride_tn,
    N, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):
    m_first = tl.program_id(0) * BLOCK_M
    b64 = tl.program_id(2).to(tl.int64)
    h64 = tl.program_id(1).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = m_first + offs_m < N
    d_ok = offs_d < D
    m64 = m_first.to(tl.int64)
    o = _load_rows(Out + b64 * stride_ob + h64 * stride_oh + m64 * stride_on + offs_m[:, None] * stride_on
                   + offs_d[None, :] * stride_od, row_ok, d_ok, True, EVEN_D)
    do = _load_rows(DO + b64 * stride_db + h64 * stride_dh + m64 * stride_dn + offs_m[:, None] * stride_dn
                    + offs_d[None, :] * stride_dd, row_ok, d_ok, True, EVEN_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + b64 * stride_tb + h64 * stride_th + m64 * stride_tn + offs_m * stride_tn, delta, mask=row_ok)


@triton.jit
def _dkdv_step(dk, dv, k, v, q, do, lse2, delta, qk_scale, vis, MASKED: tl.constexpr, DOT_PREC: tl.constexpr,
               UPCAST: tl.constexpr):
    """One query tile against the program's key tile, in the transposed ``[keys, rows]`` frame."""
    qk = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # [BN, BM], base 2
    p = tl.math.exp2(qk - lse2[None, :])
    if MASKED:
        p = tl.where(vis, p, 0.0)
    dv = tl.dot(_operand(p, do, UPCAST), do, dv, input_precision=DOT_PREC)
    dp = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # [BN, BM]
    ds = p * (dp - delta[None, :])
    dk = tl.dot(_operand(ds, q, UPCAST), q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, SegLen, Trace,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_db, stride_dh, stride_dn, stride_dd,
    stride_lb, stride_lh, stride_ln,
    stride_tb, stride_th, stride_tn,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    N, R, S, KEYS, D, GROUP, qk_scale, scale, TUNE_N,
    MASK: tl.constexpr, PREFIX_ALL: tl.constexpr, IS_PREFIX: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, TRACE: tl.constexpr,
):
    n_block = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    n_first = n_block * BLOCK_N
    n64 = n_first.to(tl.int64)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    cols = n_first + offs_n
    col_ok = cols < KEYS
    d_ok = offs_d < D

    k, v = _load_kv_tile(K + b64 * stride_kb + hk64 * stride_kh, V + b64 * stride_vb + hk64 * stride_vh, n64,
                         offs_n, offs_d, stride_kn, stride_kd, stride_vn, stride_vd, col_ok, d_ok, True, EVEN_D,
                         UPCAST)  # [BN, BD]
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # Query tiles [qa, qe) see this key tile; [qf, qfe) see all of it (no element mask).
    n_last = tl.minimum(n_first + BLOCK_N, KEYS) - 1
    whole = n_first + BLOCK_N <= KEYS  # no bounds tail in this key tile
    q_tiles = (N + BLOCK_M - 1) // BLOCK_M
    if IS_PREFIX:
        if PREFIX_ALL:
            qa = n_first * 0
            qe = n_first * 0 + q_tiles
            qf = qa
            qfe = tl.where(whole, N // BLOCK_M, qf)
        else:
            qa = tl.where(S > 0, R // BLOCK_M, 0)
            qe = tl.where(S > 0, (R + S + BLOCK_M - 1) // BLOCK_M, 0)
            qf = tl.minimum((R + BLOCK_M - 1) // BLOCK_M, qe)
            qfe = tl.minimum(tl.where(whole, tl.maximum((R + S) // BLOCK_M, qf), qf), qe)
        gap_lo = N
        gap_hi = N
    else:
        gap_lo, gap_hi = _gap(SegLen, b, R, S, N, HAS_LENGTHS)
        # The tile's first key outside the padded gap [gap_lo, gap_hi): rows from first_row(j_min) on
        # see some key of the tile; when the whole tile is visible keys, rows from first_row(n_last)
        # on see all of it.
        j_min = tl.where(n_first < gap_lo, n_first, tl.maximum(n_first, gap_hi))
        any_key = j_min <= n_last
        qa = tl.where(any_key, _first_row(j_min, R, S, MASK) // BLOCK_M, 0)
        qe = tl.where(any_key, q_tiles, 0)
        entire = whole & ((n_last < gap_lo) | (n_first >= gap_hi))
        qf = tl.where(entire, (_first_row(n_last, R, S, MASK) + BLOCK_M - 1) // BLOCK_M, qe)
        qfe = tl.where(entire, tl.maximum(N // BLOCK_M, qf), qe)
    n_masked = (qf - qa) + (qe - qfe)

    # The group's query heads and the query tiles run as one flat loop per path (unmasked, masked):
    # nesting a head loop around the tile loops costs registers that spill at D = 128.
    trace_row = Trace + ((b64 * tl.num_programs(1) + hk64) * tl.num_programs(0) + n_block) * q_tiles
    n_full = qfe - qf
    for it in range(0, GROUP * n_full):
        g = it // n_full
        tile = qf + it - g * n_full
        h64 = hk64 * GROUP + g
        m64 = tl.cast(tile * BLOCK_M, tl.int64)
        q = _load_rows(Q + b64 * stride_qb + h64 * stride_qh + m64 * stride_qn + offs_m[:, None] * stride_qn
                       + offs_d[None, :] * stride_qd, offs_m, d_ok, False, EVEN_D)
        do = _load_rows(DO + b64 * stride_db + h64 * stride_dh + m64 * stride_dn + offs_m[:, None] * stride_dn
                        + offs_d[None, :] * stride_dd, offs_m, d_ok, False, EVEN_D)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse2 = tl.load(Lse + b64 * stride_lb + h64 * stride_lh + m64 * stride_ln + offs_m * stride_ln) * _LOG2E
        delta = tl.load(Delta + b64 * stride_tb + h64 * stride_th + m64 * stride_tn + offs_m * stride_tn)
        dk, dv = _dkdv_step(dk, dv, k, v, q, do, lse2, delta, qk_scale, 0, False, DOT_PREC, UPCAST)
        if TRACE:
            tl.store(trace_row + tile, TRACE_FULL)
    for it in range(0, GROUP * n_masked):
        g = it // n_masked
        t = it - g * n_masked
        tile = qa + t + tl.where(t >= qf - qa, qfe - qf, 0)
        h64 = hk64 * GROUP + g
        rows = tile * BLOCK_M + offs_m
        row_ok = rows < N
        m64 = tl.cast(tile * BLOCK_M, tl.int64)
        q = _load_rows(Q + b64 * stride_qb + h64 * stride_qh + m64 * stride_qn + offs_m[:, None] * stride_qn
                       + offs_d[None, :] * stride_qd, row_ok, d_ok, True, EVEN_D)
        do = _load_rows(DO + b64 * stride_db + h64 * stride_dh + m64 * stride_dn + offs_m[:, None] * stride_dn
                        + offs_d[None, :] * stride_dd, row_ok, d_ok, True, EVEN_D)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse2 = tl.load(Lse + b64 * stride_lb + h64 * stride_lh + m64 * stride_ln + offs_m * stride_ln,
                       mask=row_ok, other=0.0) * _LOG2E
        delta = tl.load(Delta + b64 * stride_tb + h64 * stride_th + m64 * stride_tn + offs_m * stride_tn,
                        mask=row_ok, other=0.0)
        if IS_PREFIX:
            vis = col_ok[:, None] & (_prefix_rows(rows, R, S, PREFIX_ALL) & row_ok)[None, :]
        else:
            # [keys, rows]: the forward's visibility expression, transposed.
            vis = tl.trans(_packed_visible(_key_end(rows, R, S, N, MASK), cols, gap_lo, gap_hi, HAS_LENGTHS))
            vis = vis & row_ok[None, :]
        dk, dv = _dkdv_step(dk, dv, k, v, q, do, lse2, delta, qk_scale, vis, True, DOT_PREC, UPCAST)
        if TRACE:
            tl.store(trace_row + tile, TRACE_MASKED)

    dk = dk * scale
    dk_ptrs = (DK + b64 * stride_dkb + hk64 * stride_dkh + n64 * stride_dkn + offs_n[:, None] * stride_dkn
               + offs_d[None, :] * stride_dkd)
    dv_ptrs = (DV + b64 * stride_dvb + hk64 * stride_dvh + n64 * stride_dvn + offs_n[:, None] * stride_dvn
               + offs_d[None, :] * stride_dvd)
    if EVEN_D:
        store_ok = col_ok[:, None]
    else:
        store_ok = col_ok[:, None] & d_ok[None, :]
    tl.store(dk_ptrs, _stored(dk, DK, UPCAST), mask=store_ok)
    tl.store(dv_ptrs, _stored(dv, DV, UPCAST), mask=store_ok)


@triton.jit
def _dq_step(dq, q, do, k, v, lse2, delta, qk_scale, vis, MASKED: tl.constexpr, DOT_PREC: tl.constexpr,
             UPCAST: tl.constexpr):
    """One key tile of dQ for the program's query block."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [BM, BN], base 2
    p = tl.math.exp2(qk - lse2[:, None])
    if MASKED:
        p = tl.where(vis, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    return tl.dot(_operand(ds, k, UPCAST), k, dq, input_precision=DOT_PREC)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, PK, PV, DO, Lse, Delta, DQ, SegLen, Trace,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkb, stride_pkh, stride_pkn, stride_pkd,
    stride_pvb, stride_pvh, stride_pvn, stride_pvd,
    stride_db, stride_dh, stride_dn, stride_dd,
    stride_lb, stride_lh, stride_ln,
    stride_tb, stride_th, stride_tn,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    N, R, S, P, D, GROUP, qk_scale, scale, TUNE_N,
    MASK: tl.constexpr, PREFIX_ALL: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, TRACE: tl.constexpr,
):
    num_m = tl.num_programs(0)
    m_block = num_m - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = (h // GROUP).to(tl.int64)
    m_first = m_block * BLOCK_M
    m_last = tl.minimum(m_first + BLOCK_M, N) - 1
    m64 = m_first.to(tl.int64)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = m_first + offs_m
    row_ok = rows < N
    d_ok = offs_d < D

    q = _load_rows(Q + b64 * stride_qb + h64 * stride_qh + m64 * stride_qn + offs_m[:, None] * stride_qn
                   + offs_d[None, :] * stride_qd, row_ok, d_ok, True, EVEN_D)
    do = _load_rows(DO + b64 * stride_db + h64 * stride_dh + m64 * stride_dn + offs_m[:, None] * stride_dn
                    + offs_d[None, :] * stride_dd, row_ok, d_ok, True, EVEN_D)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(Lse + b64 * stride_lb + h64 * stride_lh + m64 * stride_ln + offs_m * stride_ln,
                   mask=row_ok, other=0.0) * _LOG2E
    delta = tl.load(Delta + b64 * stride_tb + h64 * stride_th + m64 * stride_tn + offs_m * stride_tn,
                    mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    n_ptiles = 0
    if HAS_PREFIX:
        n_ptiles = (P + BLOCK_N - 1) // BLOCK_N
    trace_row = Trace + ((b64 * tl.num_programs(1) + h64) * num_m + m_block) * (n_ptiles + (N + BLOCK_N - 1) // BLOCK_N)

    if HAS_PREFIX:
        pk_base = PK + b64 * stride_pkb + hk64 * stride_pkh
        pv_base = PV + b64 * stride_pvb + hk64 * stride_pvh
        p_full, p_end = _prefix_key_tiles(m_first, m_last, R, S, P, BLOCK_N, PREFIX_ALL)
        for t in range(0, p_full):
            start = tl.cast(t * BLOCK_N, tl.int64)
            k, v = _load_kv_tile(pk_base, pv_base, start, offs_n, offs_d, stride_pkn, stride_pkd, stride_pvn,
                                 stride_pvd, offs_n, d_ok, False, EVEN_D, UPCAST)
            dq = _dq_step(dq, q, do, k, v, lse2, delta, qk_scale, 0, False, DOT_PREC, UPCAST)
            if TRACE:
                tl.store(trace_row + t, TRACE_FULL)
        p_vis = _prefix_rows(rows, R, S, PREFIX_ALL)
        for t in range(p_full, p_end):
            cols = t * BLOCK_N + offs_n
            col_ok = cols < P
            start = tl.cast(t * BLOCK_N, tl.int64)
            k, v = _load_kv_tile(pk_base, pv_base, start, offs_n, offs_d, stride_pkn, stride_pkd, stride_pvn,
                                 stride_pvd, col_ok, d_ok, True, EVEN_D, UPCAST)
            vis = p_vis[:, None] & col_ok[None, :]
            dq = _dq_step(dq, q, do, k, v, lse2, delta, qk_scale, vis, True, DOT_PREC, UPCAST)
            if TRACE:
                tl.store(trace_row + t, TRACE_MASKED)

    k_base = K + b64 * stride_kb + hk64 * stride_kh
    v_base = V + b64 * stride_vb + hk64 * stride_vh
    gap_lo, gap_hi = _gap(SegLen, b, R, S, N, HAS_LENGTHS)
    f1, e1, s2, c0, c1, e2 = _packed_key_tiles(m_first, m_last, R, S, N, gap_lo, gap_hi, BLOCK_N, MASK)
    for t in range(0, f1 + (c1 - c0)):
        tile = t + tl.where(t >= f1, c0 - f1, 0)
        start = tl.cast(tile * BLOCK_N, tl.int64)
        k, v = _load_kv_tile(k_base, v_base, start, offs_n, offs_d, stride_kn, stride_kd, stride_vn, stride_vd,
                             offs_n, d_ok, False, EVEN_D, UPCAST)
        dq = _dq_step(dq, q, do, k, v, lse2, delta, qk_scale, 0, False, DOT_PREC, UPCAST)
        if TRACE:
            tl.store(trace_row + n_ptiles + tile, TRACE_FULL)
    rows_end = _key_end(rows, R, S, N, MASK)
    for t in range(0, (e1 - f1) + (c0 - s2) + (e2 - c1)):
        tile = _masked_tile_index(t, f1, e1, s2, c0, c1)
        cols = tile * BLOCK_N + offs_n
        col_ok = cols < N
        start = tl.cast(tile * BLOCK_N, tl.int64)
        k, v = _load_kv_tile(k_base, v_base, start, offs_n, offs_d, stride_kn, stride_kd, stride_vn, stride_vd,
                             col_ok, d_ok, True, EVEN_D, UPCAST)
        vis = _packed_visible(rows_end, cols, gap_lo, gap_hi, HAS_LENGTHS)
        dq = _dq_step(dq, q, do, k, v, lse2, delta, qk_scale, vis, True, DOT_PREC, UPCAST)
        if TRACE:
            tl.store(trace_row + n_ptiles + tile, TRACE_MASKED)

    dq = dq * scale
    dq_ptrs = (DQ + b64 * stride_dqb + h64 * stride_dqh + m64 * stride_dqn + offs_m[:, None] * stride_dqn
               + offs_d[None, :] * stride_dqd)
    if EVEN_D:
        tl.store(dq_ptrs, _stored(dq, DQ, UPCAST), mask=row_ok[:, None])
    else:
        tl.store(dq_ptrs, _stored(dq, DQ, UPCAST), mask=row_ok[:, None] & d_ok[None, :])


# --------------------------------------------------------------------------- configs

INTERPRETER_DKDV_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}
INTERPRETER_DQ_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
PREPROCESS_BLOCK_M = 64

# Autotuning candidates per padded head dim, as triton_fwd's tables. dK/dV: BLOCK_N keys per program,
# BLOCK_M query rows per step; its float32 accumulators for dK and dV bound the key tile.
_DKDV_16BIT = {
    90: {16: [(32, 128, 8, 2), (64, 128, 8, 2)], 32: [(32, 128, 8, 2), (64, 128, 8, 2)],
         64: [(32, 64, 4, 2), (32, 128, 8, 2)], 96: [(32, 64, 8, 2)], 128: [(32, 64, 8, 2), (32, 128, 8, 2)],
         256: [(16, 32, 8, 2), (32, 32, 8, 1)]},
    80: {16: [(32, 128, 8, 2), (32, 64, 4, 2)], 32: [(32, 128, 8, 2), (32, 64, 4, 2)],
         64: [(32, 64, 8, 2), (32, 128, 8, 2)], 128: [(32, 64, 8, 2), (16, 64, 4, 2)],
         256: [(16, 32, 8, 2), (16, 64, 8, 1)]},
}
_DKDV_32BIT = {16: [(16, 32, 4, 2)], 32: [(16, 32, 4, 2)], 64: [(16, 32, 4, 2)], 128: [(16, 32, 8, 1)],
               256: [(16, 16, 8, 1)]}
_DQ_16BIT = {
    90: {16: [(128, 64, 8, 2), (64, 64, 4, 2)], 32: [(128, 64, 8, 2), (64, 64, 4, 2)],
         64: [(64, 64, 4, 2), (128, 64, 8, 2), (128, 32, 8, 2)],
         128: [(64, 32, 4, 2), (128, 32, 8, 2)], 256: [(128, 32, 8, 2)]},
    80: {16: [(128, 32, 8, 2), (64, 32, 4, 2)], 32: [(128, 32, 8, 2), (64, 32, 4, 2)],
         64: [(128, 32, 8, 2)], 128: [(64, 32, 4, 2), (128, 32, 8, 2)], 256: [(64, 16, 8, 2)]},
}
_DQ_32BIT = {16: [(32, 32, 4, 2)], 32: [(32, 32, 4, 2)], 64: [(32, 32, 4, 2)], 128: [(16, 16, 4, 1)],
             256: [(16, 16, 8, 1)]}


def dkdv_configs(head_dim: int, dtype, arch):
    """Launch configs of ``_bwd_dkdv_kernel``: the interpreter's single config when ``arch`` is None,
    else the autotuning candidates for compute capability ``arch``."""
    if arch is None:
        return [dict(INTERPRETER_DKDV_CONFIG)]
    return pick_configs(_DKDV_16BIT, _DKDV_32BIT, head_dim, dtype, arch)


def dq_configs(head_dim: int, dtype, arch):
    """Launch configs of ``_bwd_dq_kernel``, as :func:`dkdv_configs`."""
    if arch is None:
        return [dict(INTERPRETER_DQ_CONFIG)]
    return pick_configs(_DQ_16BIT, _DQ_32BIT, head_dim, dtype, arch)
