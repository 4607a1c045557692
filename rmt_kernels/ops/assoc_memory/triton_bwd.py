"""Triton backward kernels of ARMT's associative memory (the contract of ``torch_impl.read_bwd_torch``
and ``write_bwd_torch``).

Read: ``_assoc_read_bwd_dq_kernel`` (one program per head and row block) loops over the three feature
pieces; per piece it accumulates ``G_j = dy A_j^T`` over the value columns (one ``[BLOCK_M, BLOCK_F]``
accumulator) and folds it into the feature backward at once, by linearity:
``dG = sum_j L_j(G_j)`` (``L_j``: the backward of ``phi_j`` with respect to ``r``,
``triton_common._lmap``) and the row sums ``phi . G``, ``phi . z``; then ``d den`` and the
normalisation's projection, and a second pass over the pieces (no products) adds
``sum_j L_j(d den z_j - proj phi_j)``: ``dr = (dG / den + sum_j L_j(d den z_j - proj phi_j)) / |phi|``,
with only ``dr`` and one piece's tiles live at a time (``r`` is reloaded per piece). At ``p = 128`` each
piece is processed in two lane halves (``BLOCK_F = TWO_P / 2``: ``G_j``'s value loop runs once per half,
``dr`` is two half tiles, ``triton_common._fold``).
It stores ``dq`` and per-row ``den``, ``d den`` and ``|phi|`` (float32 ``[3, B H, N]``);
``_assoc_read_bwd_da_kernel`` (one program per head, value block and feature piece; loops over the
rows) accumulates ``dA_J = phi_J^T (dy / den)`` and ``dz_J = phi_J^T d den``.

Write: ``_assoc_write_bwd_rows_kernel`` (per head and block of memory rows; loops over the value
columns, features in ``BLOCK_K`` chunks) produces ``dv``, ``db``, the rows' ``den``/``d den``/
``gamma``/``|phi|`` and two float32 scratch rows per memory row, ``w = beta (v - vbar)`` and
``dnum = -beta (phi dA') / den``; ``_assoc_write_bwd_dk_kernel`` (same grid) produces ``dk`` from
``df_j = w dA'_j^T + dnum A_j^T + gamma dz'_j + d den z_j``, one piece (or lane half) at a time as the
read's ``dq``, the two products in value loops of their own;
``_assoc_write_bwd_state_kernel`` (per head, value block and feature piece; later segments only)
produces the old state's ``dA_J = dA'_J + phi_J^T dnum``, ``dz_J = dz'_J + phi_J^T d den``. Every
reduction is a loop inside one program: no atomics, deterministic.

Products: float32 on tensor cores at ``input_precision=DOT_PREC`` (``"tf32"`` for 16-bit inputs,
``"tf32x3"`` for float32 inputs under torch's ``"highest"`` float32 matmul precision, else ``"tf32"``;
never ``"ieee"``: ``triton_launch.dot_precision``). This module imports triton.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import EPS, NORM_EPS, _f_chunk, _feature_norm, _fold, _r_chunk, _state_chunk, \
    _store_du, _store_state_chunk, _store_vec_chunk, _vec_chunk


@triton.jit
def _assoc_read_bwd_dq_kernel(
    dq_ptr, stat_ptr, dy_ptr, q_ptr, a_ptr, z_ptr,
    N, DV, H,
    sdq_b, sdq_n, sdq_d,
    sdy_b, sdy_n, sdy_d,
    sq_b, sq_n, sq_d,
    sa_b, sa_h, sa_k, sa_v,
    sz_b, sz_h, sz_k,
    s_plane,
    NORMALIZE: tl.constexpr, USE_DENOM: tl.constexpr, P: tl.constexpr, TWO_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # Grid: (B * H, cdiv(N, BLOCK_M)). df_j = G_j / den + d den z_j with d den = -(phi . G) / den^2;
    # the feature backward is linear in df, so each piece is folded in as soon as G_j is complete.
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    a_base = b * sa_b + h * sa_h
    z_base = b * sz_b + h * sz_h
    dy_off = b * sdy_b + rows64 * sdy_n
    q_off = b * sq_b + rows64 * sq_n + h * P * sq_d
    stat_off = pid_bh.to(tl.int64) * N + rows64
    norm = tl.full([BLOCK_M], 1.0, tl.float32)
    if NORMALIZE:
        norm = _feature_norm(q_ptr, q_off, rmask, sq_d, BLOCK_M, P, TWO_P, BLOCK_K)
        tl.store(stat_ptr + 2 * s_plane + stat_off, norm, mask=rmask)
    d_r = tl.zeros([BLOCK_M, BLOCK_F], dtype=tl.float32)
    d_r2 = tl.zeros([BLOCK_M, (TWO_P // BLOCK_F - 1) * BLOCK_F + BLOCK_F // TWO_P], dtype=tl.float32)
    fg = tl.zeros([BLOCK_M], dtype=tl.float32)
    den = tl.zeros([BLOCK_M], dtype=tl.float32)
    for j in tl.range(1, 4, loop_unroll_factor=1):
        # Lane blocks of BLOCK_F (the whole piece but at p = 128): G_j's lanes [off, off + BLOCK_F).
        for off in tl.static_range(0, TWO_P, BLOCK_F):
            g = tl.zeros([BLOCK_M, BLOCK_F], dtype=tl.float32)
            for c0 in range(0, DV, BLOCK_DV):
                cols = c0 + tl.arange(0, BLOCK_DV)
                cmask = cols < DV
                gcols = (h * DV + cols).to(tl.int64)
                dy = tl.load(dy_ptr + dy_off[:, None] + (gcols * sdy_d)[None, :],
                             mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
                g = tl.dot(dy, tl.trans(_state_chunk(a_ptr, a_base, sa_k, sa_v, j, off, cols, cmask, P, BLOCK_F)),
                           g, input_precision=DOT_PREC)
            r0 = _r_chunk(q_ptr, q_off, rmask, sq_d, 0, off, P, BLOCK_F)
            rj = _r_chunk(q_ptr, q_off, rmask, sq_d, j, off, P, BLOCK_F)
            f = r0 * rj
            if NORMALIZE:
                f = f / norm[:, None]
            fg += tl.sum(f * g, axis=1)
            d_r, d_r2 = _fold(d_r, d_r2, g, r0, rj, j, off, BLOCK_M, P, TWO_P, BLOCK_F)
            if USE_DENOM:
                den += tl.sum(f * _vec_chunk(z_ptr, z_base, sz_k, j, off, P, BLOCK_F)[None, :], axis=1)
    dden = tl.zeros([BLOCK_M], dtype=tl.float32)
    if USE_DENOM:
        fz = den
        den += EPS
        dden = -(fg / den) / den
        d_r = d_r / den[:, None]
        d_r2 = d_r2 / den[:, None]
        proj = fg / den + dden * fz
        tl.store(stat_ptr + stat_off, den, mask=rmask)
        tl.store(stat_ptr + s_plane + stat_off, dden, mask=rmask)
    else:
        proj = fg
    if USE_DENOM or NORMALIZE:
        # The rest of dr = sum_j L_j(d den z_j - proj phi_j) (linearity): a second pass over the pieces,
        # so that only dr and one piece's tiles are live in the value loop above.
        proj = tl.where(norm > NORM_EPS, proj, 0.0)
        for j in tl.range(1, 4, loop_unroll_factor=1):
            for off in tl.static_range(0, TWO_P, BLOCK_F):
                r0 = _r_chunk(q_ptr, q_off, rmask, sq_d, 0, off, P, BLOCK_F)
                rj = _r_chunk(q_ptr, q_off, rmask, sq_d, j, off, P, BLOCK_F)
                x = tl.zeros([BLOCK_M, BLOCK_F], dtype=tl.float32)
                if USE_DENOM:
                    x += dden[:, None] * _vec_chunk(z_ptr, z_base, sz_k, j, off, P, BLOCK_F)[None, :]
                if NORMALIZE:
                    x -= proj[:, None] * (r0 * rj / norm[:, None])
                d_r, d_r2 = _fold(d_r, d_r2, x, r0, rj, j, off, BLOCK_M, P, TWO_P, BLOCK_F)
    if NORMALIZE:
        d_r = d_r / norm[:, None]
        d_r2 = d_r2 / norm[:, None]
    dq_off = b * sdq_b + rows64 * sdq_n + h * P * sdq_d
    _store_du(dq_ptr, dq_off, sdq_d, q_ptr, q_off, rmask, sq_d, d_r, 0, P, BLOCK_F)
    if BLOCK_F < TWO_P:
        _store_du(dq_ptr, dq_off, sdq_d, q_ptr, q_off, rmask, sq_d, d_r2, BLOCK_F, P, BLOCK_F)


@triton.jit
def _assoc_read_bwd_da_kernel(
    da_ptr, dz_ptr, stat_ptr, dy_ptr, q_ptr,
    N, DV, H,
    sda_b, sda_h, sda_k, sda_v,
    sdz_b, sdz_h, sdz_k,
    sdy_b, sdy_n, sdy_d,
    sq_b, sq_n, sq_d,
    s_plane,
    NORMALIZE: tl.constexpr, USE_DENOM: tl.constexpr, P: tl.constexpr, TWO_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # Grid: (B * H, cdiv(dv, BLOCK_DV), 3): piece J = pid_j + 1 of dA at value block pid_v, over all
    # rows, with the rows' norm, den and d den from the dq kernel; value block 0 also writes dz_J.
    pid_bh = tl.program_id(0)
    pid_v = tl.program_id(1)
    J = tl.program_id(2) + 1
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    cols = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    cmask = cols < DV
    gcols = (h * DV + cols).to(tl.int64)
    acc = tl.zeros([TWO_P, BLOCK_DV], dtype=tl.float32)
    zacc = tl.zeros([TWO_P], dtype=tl.float32)
    for m0 in range(0, N, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < N
        rows64 = rows.to(tl.int64)
        q_off = b * sq_b + rows64 * sq_n + h * P * sq_d
        stat_off = pid_bh.to(tl.int64) * N + rows64
        norm = tl.full([BLOCK_M], 1.0, tl.float32)
        if NORMALIZE:
            norm = tl.load(stat_ptr + 2 * s_plane + stat_off, mask=rmask, other=1.0)
        fj = _f_chunk(q_ptr, q_off, rmask, sq_d, norm, J, 0, NORMALIZE, P, TWO_P)
        dy = tl.load(dy_ptr + (b * sdy_b + rows64 * sdy_n)[:, None] + (gcols * sdy_d)[None, :],
                     mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        if USE_DENOM:
            den = tl.load(stat_ptr + stat_off, mask=rmask, other=1.0)
            dden = tl.load(stat_ptr + s_plane + stat_off, mask=rmask, other=0.0)
            dy = dy / den[:, None]
            zacc += tl.sum(fj * dden[:, None], axis=0)
        acc = tl.dot(tl.trans(fj), dy, acc, input_precision=DOT_PREC)
    _store_state_chunk(da_ptr, b * sda_b + h * sda_h, sda_k, sda_v, J, 0, cols, cmask, acc, P, TWO_P)
    if USE_DENOM:
        if pid_v == 0:
            _store_vec_chunk(dz_ptr, b * sdz_b + h * sdz_h, sdz_k, J, 0, zacc, P, TWO_P)


@triton.jit
def _assoc_write_bwd_rows_kernel(
    dv_ptr, db_ptr, stat_ptr, scr_ptr, dan_ptr, k_ptr, v_ptr, b_ptr, a_ptr, z_ptr,
    M, DV, H,
    sdv_b, sdv_m, sdv_d,
    sdb_b, sdb_m, sdb_d,
    sdan_b, sdan_h, sdan_k, sdan_v,
    sk_b, sk_m, sk_d,
    sv_b, sv_m, sv_d,
    sb_b, sb_m, sb_d,
    sa_b, sa_h, sa_k, sa_v,
    sz_b, sz_h, sz_k,
    s_plane, s_scr,
    HAS_STATE: tl.constexpr, NORMALIZE: tl.constexpr, USE_DENOM: tl.constexpr, CORRECTION: tl.constexpr,
    GATING: tl.constexpr, P: tl.constexpr, TWO_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # Grid: (B * H, cdiv(M, BLOCK_M)). Per value block: ddelta = phi dA' and vbar = phi A / den (over the
    # feature chunks); dv = beta ddelta; db (per channel, or summed over dv per head); the scratch rows
    # w = beta (v - vbar) and dnum = -dv / den; d den = -sum(dnum vbar). Stats: den, d den, gamma, |phi|.
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    k_off = b * sk_b + rows64 * sk_m + h * P * sk_d
    norm = tl.full([BLOCK_M], 1.0, tl.float32)
    if NORMALIZE:
        norm = _feature_norm(k_ptr, k_off, rmask, sk_d, BLOCK_M, P, TWO_P, BLOCK_K)
    a_base = b * sa_b + h * sa_h
    z_base = b * sz_b + h * sz_h
    dan_base = b * sdan_b + h * sdan_h
    gamma = tl.full([BLOCK_M], 1.0, tl.float32)
    den = tl.full([BLOCK_M], 1.0, tl.float32)
    if HAS_STATE:
        if USE_DENOM:
            den = tl.zeros([BLOCK_M], dtype=tl.float32)
            n2 = tl.zeros([BLOCK_M], dtype=tl.float32)
            for t in tl.range(0, 3 * TWO_P, BLOCK_K, loop_unroll_factor=1):
                j = t // TWO_P + 1
                c0 = t % TWO_P
                f = _f_chunk(k_ptr, k_off, rmask, sk_d, norm, j, c0, NORMALIZE, P, BLOCK_K)
                den += tl.sum(f * _vec_chunk(z_ptr, z_base, sz_k, j, c0, P, BLOCK_K)[None, :], axis=1)
                n2 += tl.sum(f * f, axis=1)
            den += EPS
            if CORRECTION:
                if not NORMALIZE:
                    n2 += EPS
                n2 = tl.where(rmask, n2, 1.0)  # padded rows: no 0/0
                gamma = tl.minimum(tl.maximum(1.0 - den / n2, 0.0), 1.0)
    # The per-row statistics known before the value loop are stored now (fewer values live over it).
    stat_off = pid_bh.to(tl.int64) * M + rows64
    tl.store(stat_ptr + stat_off, den, mask=rmask)
    tl.store(stat_ptr + 2 * s_plane + stat_off, gamma, mask=rmask)
    tl.store(stat_ptr + 3 * s_plane + stat_off, norm, mask=rmask)
    beta_h = tl.zeros([BLOCK_M], dtype=tl.float32)
    if not GATING:
        logit = tl.load(b_ptr + b * sb_b + rows64 * sb_m + h * sb_d, mask=rmask, other=0.0).to(tl.float32)
        beta_h = 1.0 / (1.0 + tl.exp(-logit))
    dbeta = tl.zeros([BLOCK_M], dtype=tl.float32)
    dden = tl.zeros([BLOCK_M], dtype=tl.float32)
    scr_row = (pid_bh.to(tl.int64) * M + rows64) * DV
    for v0 in range(0, DV, BLOCK_DV):
        cols = v0 + tl.arange(0, BLOCK_DV)
        cmask = cols < DV
        gcols = (h * DV + cols).to(tl.int64)
        mask = rmask[:, None] & cmask[None, :]
        ddelta = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        vbar = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        for t in tl.range(0, 3 * TWO_P, BLOCK_K, loop_unroll_factor=1):
            j = t // TWO_P + 1
            c0 = t % TWO_P
            f = _f_chunk(k_ptr, k_off, rmask, sk_d, norm, j, c0, NORMALIZE, P, BLOCK_K)
            ddelta = tl.dot(f, _state_chunk(dan_ptr, dan_base, sdan_k, sdan_v, j, c0, cols, cmask, P, BLOCK_K),
                            ddelta, input_precision=DOT_PREC)
            if HAS_STATE:
                vbar = tl.dot(f, _state_chunk(a_ptr, a_base, sa_k, sa_v, j, c0, cols, cmask, P, BLOCK_K), vbar,
                              input_precision=DOT_PREC)
        diff = tl.load(v_ptr + (b * sv_b + rows64 * sv_m)[:, None] + (gcols * sv_d)[None, :], mask=mask,
                       other=0.0).to(tl.float32)
        if HAS_STATE:
            if USE_DENOM:
                vbar = vbar / den[:, None]
            diff = diff - vbar
        if GATING:
            logit = tl.load(b_ptr + (b * sb_b + rows64 * sb_m)[:, None] + (gcols * sb_d)[None, :], mask=mask,
                            other=0.0).to(tl.float32)
            beta = 1.0 / (1.0 + tl.exp(-logit))
        else:
            beta = beta_h[:, None]
        dvv = beta * ddelta
        tl.store(dv_ptr + (b * sdv_b + rows64 * sdv_m)[:, None] + (gcols * sdv_d)[None, :],
                 dvv.to(dv_ptr.dtype.element_ty), mask=mask)
        if GATING:
            db = ddelta * diff * beta * (1.0 - beta)
            tl.store(db_ptr + (b * sdb_b + rows64 * sdb_m)[:, None] + (gcols * sdb_d)[None, :],
                     db.to(db_ptr.dtype.element_ty), mask=mask)
        else:
            dbeta += tl.sum(tl.where(mask, ddelta * diff, 0.0), axis=1)
        scr = scr_ptr + scr_row[:, None] + cols[None, :]
        tl.store(scr, tl.where(mask, beta * diff, 0.0), mask=mask)
        if HAS_STATE:
            dnum = tl.where(mask, -dvv, 0.0)
            if USE_DENOM:
                dnum = dnum / den[:, None]
                dden -= tl.sum(dnum * vbar, axis=1)
            tl.store(scr + s_scr, dnum, mask=mask)
    if not GATING:
        tl.store(db_ptr + b * sdb_b + rows64 * sdb_m + h * sdb_d,
                 (dbeta * beta_h * (1.0 - beta_h)).to(db_ptr.dtype.element_ty), mask=rmask)
    tl.store(stat_ptr + s_plane + pid_bh.to(tl.int64) * M + rows64, dden, mask=rmask)


@triton.jit
def _assoc_write_bwd_dk_kernel(
    dk_ptr, stat_ptr, scr_ptr, dan_ptr, dzn_ptr, k_ptr, a_ptr, z_ptr,
    M, DV, H,
    sdk_b, sdk_m, sdk_d,
    sdan_b, sdan_h, sdan_k, sdan_v,
    sdzn_b, sdzn_h, sdzn_k,
    sk_b, sk_m, sk_d,
    sa_b, sa_h, sa_k, sa_v,
    sz_b, sz_h, sz_k,
    s_plane, s_scr,
    HAS_STATE: tl.constexpr, NORMALIZE: tl.constexpr, USE_DENOM: tl.constexpr, P: tl.constexpr,
    TWO_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_F: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # Grid: (B * H, cdiv(M, BLOCK_M)). Per piece j: G_j = w dA'_j^T + dnum A_j^T over the value columns
    # (scratch rows of the rows kernel), df_j = G_j + gamma dz'_j + d den z_j, folded into
    # dR = sum_j L_j(df_j) (and dF = sum_j L_j(phi_j), proj = phi . df for the normalisation).
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    k_off = b * sk_b + rows64 * sk_m + h * P * sk_d
    stat_off = pid_bh.to(tl.int64) * M + rows64
    dden = tl.load(stat_ptr + s_plane + stat_off, mask=rmask, other=0.0)
    gamma = tl.load(stat_ptr + 2 * s_plane + stat_off, mask=rmask, other=0.0)
    norm = tl.load(stat_ptr + 3 * s_plane + stat_off, mask=rmask, other=1.0)
    a_base = b * sa_b + h * sa_h
    z_base = b * sz_b + h * sz_h
    dan_base = b * sdan_b + h * sdan_h
    dzn_base = b * sdzn_b + h * sdzn_h
    scr_row = (pid_bh.to(tl.int64) * M + rows64) * DV
    d_r = tl.zeros([BLOCK_M, BLOCK_F], dtype=tl.float32)
    d_r2 = tl.zeros([BLOCK_M, (TWO_P // BLOCK_F - 1) * BLOCK_F + BLOCK_F // TWO_P], dtype=tl.float32)
    proj = tl.zeros([BLOCK_M], dtype=tl.float32)
    for j in tl.range(1, 4, loop_unroll_factor=1):
        # Lane blocks of BLOCK_F (the whole piece but at p = 128): G_j's lanes [off, off + BLOCK_F).
        for off in tl.static_range(0, TWO_P, BLOCK_F):
            g = tl.zeros([BLOCK_M, BLOCK_F], dtype=tl.float32)
            for v0 in range(0, DV, BLOCK_DV):
                cols = v0 + tl.arange(0, BLOCK_DV)
                cmask = cols < DV
                w = tl.load(scr_ptr + scr_row[:, None] + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                            other=0.0)
                g = tl.dot(w, tl.trans(_state_chunk(dan_ptr, dan_base, sdan_k, sdan_v, j, off, cols, cmask, P,
                                                    BLOCK_F)), g, input_precision=DOT_PREC)
                if HAS_STATE:
                    if BLOCK_F == TWO_P:
                        dnum = tl.load(scr_ptr + s_scr + scr_row[:, None] + cols[None, :],
                                       mask=rmask[:, None] & cmask[None, :], other=0.0)
                        g = tl.dot(dnum, tl.trans(_state_chunk(a_ptr, a_base, sa_k, sa_v, j, off, cols, cmask, P,
                                                               BLOCK_F)), g, input_precision=DOT_PREC)
            if HAS_STATE and BLOCK_F < TWO_P:
                # Lane halves: a loop of its own, one scratch tile and one state tile live at a time.
                for v0 in range(0, DV, BLOCK_DV):
                    cols = v0 + tl.arange(0, BLOCK_DV)
                    cmask = cols < DV
                    dnum = tl.load(scr_ptr + s_scr + scr_row[:, None] + cols[None, :],
                                   mask=rmask[:, None] & cmask[None, :], other=0.0)
                    g = tl.dot(dnum, tl.trans(_state_chunk(a_ptr, a_base, sa_k, sa_v, j, off, cols, cmask, P,
                                                           BLOCK_F)), g, input_precision=DOT_PREC)
            g += gamma[:, None] * _vec_chunk(dzn_ptr, dzn_base, sdzn_k, j, off, P, BLOCK_F)[None, :]
            if HAS_STATE:
                if USE_DENOM:
                    g += dden[:, None] * _vec_chunk(z_ptr, z_base, sz_k, j, off, P, BLOCK_F)[None, :]
            r0 = _r_chunk(k_ptr, k_off, rmask, sk_d, 0, off, P, BLOCK_F)
            rj = _r_chunk(k_ptr, k_off, rmask, sk_d, j, off, P, BLOCK_F)
            d_r, d_r2 = _fold(d_r, d_r2, g, r0, rj, j, off, BLOCK_M, P, TWO_P, BLOCK_F)
            if NORMALIZE:
                proj += tl.sum(r0 * rj / norm[:, None] * g, axis=1)
    if NORMALIZE:
        # The normalisation's part, -proj sum_j L_j(phi_j) (linearity): a second pass over the pieces,
        # so that only dR and one piece's tiles are live in the value loop above.
        proj = tl.where(norm > NORM_EPS, proj, 0.0)
        for j in tl.range(1, 4, loop_unroll_factor=1):
            for off in tl.static_range(0, TWO_P, BLOCK_F):
                r0 = _r_chunk(k_ptr, k_off, rmask, sk_d, 0, off, P, BLOCK_F)
                rj = _r_chunk(k_ptr, k_off, rmask, sk_d, j, off, P, BLOCK_F)
                d_r, d_r2 = _fold(d_r, d_r2, -proj[:, None] * (r0 * rj / norm[:, None]), r0, rj, j, off, BLOCK_M,
                                  P, TWO_P, BLOCK_F)
        d_r = d_r / norm[:, None]
        d_r2 = d_r2 / norm[:, None]
    dk_off = b * sdk_b + rows64 * sdk_m + h * P * sdk_d
    _store_du(dk_ptr, dk_off, sdk_d, k_ptr, k_off, rmask, sk_d, d_r, 0, P, BLOCK_F)
    if BLOCK_F < TWO_P:
        _store_du(dk_ptr, dk_off, sdk_d, k_ptr, k_off, rmask, sk_d, d_r2, BLOCK_F, P, BLOCK_F)


@triton.jit
def _assoc_write_bwd_state_kernel(
    da_ptr, dz_ptr, stat_ptr, scr_ptr, dan_ptr, dzn_ptr, k_ptr,
    M, DV, H,
    sda_b, sda_h, sda_k, sda_v,
    sdz_b, sdz_h, sdz_k,
    sdan_b, sdan_h, sdan_k, sdan_v,
    sdzn_b, sdzn_h, sdzn_k,
    sk_b, sk_m, sk_d,
    s_plane, s_scr,
    NORMALIZE: tl.constexpr, USE_DENOM: tl.constexpr, P: tl.constexpr,
    TWO_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # Grid: (B * H, cdiv(dv, BLOCK_DV), 3), later segments only: dA_J = dA'_J + phi_J^T dnum (dnum: the
    # rows kernel's scratch) and, from value block 0, dz_J = dz'_J + phi_J^T d den.
    pid_bh = tl.program_id(0)
    pid_v = tl.program_id(1)
    J = tl.program_id(2) + 1
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    cols = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    cmask = cols < DV
    dan_base = b * sdan_b + h * sdan_h
    acc = tl.zeros([TWO_P, BLOCK_DV], dtype=tl.float32)
    zacc = tl.zeros([TWO_P], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < M
        rows64 = rows.to(tl.int64)
        mask = rmask[:, None] & cmask[None, :]
        k_off = b * sk_b + rows64 * sk_m + h * P * sk_d
        stat_off = pid_bh.to(tl.int64) * M + rows64
        norm = tl.full([BLOCK_M], 1.0, tl.float32)
        if NORMALIZE:
            norm = tl.load(stat_ptr + 3 * s_plane + stat_off, mask=rmask, other=1.0)
        fj = _f_chunk(k_ptr, k_off, rmask, sk_d, norm, J, 0, NORMALIZE, P, TWO_P)
        dnum = tl.load(scr_ptr + s_scr + ((pid_bh.to(tl.int64) * M + rows64) * DV)[:, None] + cols[None, :],
                       mask=mask, other=0.0)
        if USE_DENOM:
            dden = tl.load(stat_ptr + s_plane + stat_off, mask=rmask, other=0.0)
            zacc += tl.sum(fj * dden[:, None], axis=0)
        acc = tl.dot(tl.trans(fj), dnum, acc, input_precision=DOT_PREC)
    acc += _state_chunk(dan_ptr, dan_base, sdan_k, sdan_v, J, 0, cols, cmask, P, TWO_P)
    _store_state_chunk(da_ptr, b * sda_b + h * sda_h, sda_k, sda_v, J, 0, cols, cmask, acc, P, TWO_P)
    if pid_v == 0:
        zacc += _vec_chunk(dzn_ptr, b * sdzn_b + h * sdzn_h, sdzn_k, J, 0, P, TWO_P)
        _store_vec_chunk(dz_ptr, b * sdz_b + h * sdz_h, sdz_k, J, 0, zacc, P, TWO_P)
