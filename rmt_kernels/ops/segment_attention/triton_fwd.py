"""Triton forward kernel of segment attention and its launch configs (the tile schedule, tile loads and
config picking it shares with the backward live in ``triton_common``).

Kernel ``_segment_attention_fwd_kernel``

- grid ``(cdiv(N, BLOCK_M), H_q, B)``; program ``(m, h, b)`` computes ``BLOCK_M`` query rows of query
  head ``h`` of batch row ``b`` against key/value head ``h // GROUP`` (grouped-query heads read the
  shared K/V, never a repeated copy). Row blocks are taken from the end so that the longest rows
  start first.
- tiling: the query block ``[BLOCK_M, BLOCK_D]`` stays on chip; keys and values stream through in
  ``[BLOCK_N, BLOCK_D]`` tiles, first the prefix (its own pointers, tiled from prefix position 0),
  then the packed keys (tiled from packed position 0), exactly the tiling of
  :meth:`MemoryLayout.classify_tiles`. ``BLOCK_D`` is the head dim rounded up to a power of two; the
  extra columns are masked on load.
- one program: an online softmax (FlashAttention style) in float32, in base-2 units; it writes the
  normalised output and the natural log-sum-exp of each row (``-inf`` and output 0 for a row that
  sees no key).
- schedule: the block computes its own key-tile ranges from the layout's visibility expression
  (``j < key_end[i]`` and ``j`` outside the padded gap ``[R + L, R + S)``; the prefix when the row
  class allows). It visits only the tiles holding a visible pair: packed tiles
  ``[0, cdiv(min(key_end_max, R + L), BLOCK_N))`` and, past the gap, ``[(R + S) // BLOCK_N,
  cdiv(key_end_max, BLOCK_N))``, plus ``cdiv(P, BLOCK_N)`` prefix tiles when a row of the block sees
  the prefix -- against ``cdiv(P + N, BLOCK_N)`` tiles of a dense kernel (about half of them for a
  causal segment; a block of read-memory rows visits ``cdiv(R, BLOCK_N)``). Tiles that every row of
  the block sees entirely (``j + 1 <= key_end_min`` and outside the gap) take the unmasked path, with
  no element mask at all: the read-memory columns are such tiles for every X and W row block past
  the diagonal. Only partial tiles and the bounds tail (the last tile of a key range) evaluate the
  visibility expression per element.
- ``TRACE`` (debug, tests): each visited tile writes its path (2 unmasked, 1 masked) to ``Trace``
  ``[B, H_q, cdiv(N, BLOCK_M), cdiv(P, BLOCK_N) + cdiv(N, BLOCK_N)]``; compiled out otherwise.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import (
    _LN2,
    TRACE_FULL,
    TRACE_MASKED,
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
def _fwd_step(acc, m_i, l_i, q, k, v, qk_scale, vis, MASKED: tl.constexpr, DOT_PREC: tl.constexpr,
              UPCAST: tl.constexpr):
    """One key tile of the online softmax. ``m_i`` and the scores are in base-2 units."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [BM, BN]
    if MASKED:
        qk = tl.where(vis, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    if MASKED:
        # A row that has seen no key yet keeps m = -inf; shifting by 0 makes its terms exp2(-inf) = 0
        # instead of exp2(-inf + inf) = NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_shift = m_new  # every row sees a key of this tile: m_new is finite
    p = tl.math.exp2(qk - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(_operand(p, v, UPCAST), v, acc * alpha[:, None], input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _segment_attention_fwd_kernel(
    Q, K, V, PK, PV, Out, Lse, SegLen, Trace,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkb, stride_pkh, stride_pkn, stride_pkd,
    stride_pvb, stride_pvh, stride_pvn, stride_pvd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_lb, stride_lh, stride_ln,
    N, R, S, P, D, GROUP, qk_scale, TUNE_N,
    MASK: tl.constexpr, PREFIX_ALL: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, TRACE: tl.constexpr,
):
    num_m = tl.num_programs(0)
    m_block = num_m - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    # 64-bit batch/head/row bases: B * H * N * D may exceed 2**31; offsets inside a tile stay 32-bit.
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = (h // GROUP).to(tl.int64)
    m_first = m_block * BLOCK_M
    m_last = tl.minimum(m_first + BLOCK_M, N) - 1

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = m_first + offs_m
    row_ok = rows < N
    d_ok = offs_d < D

    q_ptrs = (Q + b64 * stride_qb + h64 * stride_qh + m_first.to(tl.int64) * stride_qn
              + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd)
    q = _load_rows(q_ptrs, row_ok, d_ok, True, EVEN_D)  # [BM, BD]
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    n_ptiles = 0
    if HAS_PREFIX:
        n_ptiles = (P + BLOCK_N - 1) // BLOCK_N
    n_tiles_total = n_ptiles + (N + BLOCK_N - 1) // BLOCK_N
    trace_row = Trace + ((b64 * tl.num_programs(1) + h64) * num_m + m_block) * n_tiles_total

    # ---------------------------------------------------------------- prefix keys
    if HAS_PREFIX:
        pk_base = PK + b64 * stride_pkb + hk64 * stride_pkh
        pv_base = PV + b64 * stride_pvb + hk64 * stride_pvh
        p_full, p_end = _prefix_key_tiles(m_first, m_last, R, S, P, BLOCK_N, PREFIX_ALL)
        for t in range(0, p_full):
            start = tl.cast(t * BLOCK_N, tl.int64)
            k, v = _load_kv_tile(pk_base, pv_base, start, offs_n, offs_d, stride_pkn, stride_pkd, stride_pvn,
                                 stride_pvd, offs_n, d_ok, False, EVEN_D, UPCAST)
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k, v, qk_scale, 0, False, DOT_PREC, UPCAST)
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
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k, v, qk_scale, vis, True, DOT_PREC, UPCAST)
            if TRACE:
                tl.store(trace_row + t, TRACE_MASKED)

    # ---------------------------------------------------------------- packed keys
    k_base = K + b64 * stride_kb + hk64 * stride_kh
    v_base = V + b64 * stride_vb + hk64 * stride_vh
    gap_lo, gap_hi = _gap(SegLen, b, R, S, N, HAS_LENGTHS)
    f1, e1, s2, c0, c1, e2 = _packed_key_tiles(m_first, m_last, R, S, N, gap_lo, gap_hi, BLOCK_N, MASK)
    for t in range(0, f1 + (c1 - c0)):
        tile = t + tl.where(t >= f1, c0 - f1, 0)
        start = tl.cast(tile * BLOCK_N, tl.int64)
        k, v = _load_kv_tile(k_base, v_base, start, offs_n, offs_d, stride_kn, stride_kd, stride_vn, stride_vd,
                             offs_n, d_ok, False, EVEN_D, UPCAST)
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k, v, qk_scale, 0, False, DOT_PREC, UPCAST)
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
        # key_end <= N, so the visibility expression also masks the bounds tail.
        vis = _packed_visible(rows_end, cols, gap_lo, gap_hi, HAS_LENGTHS)
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k, v, qk_scale, vis, True, DOT_PREC, UPCAST)
        if TRACE:
            tl.store(trace_row + n_ptiles + tile, TRACE_MASKED)

    # ---------------------------------------------------------------- epilogue
    seen = l_i > 0.0  # false only for a row without any visible key
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * _LN2, float("-inf"))
    o_ptrs = (Out + b64 * stride_ob + h64 * stride_oh + m_first.to(tl.int64) * stride_on
              + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od)
    if EVEN_D:
        tl.store(o_ptrs, _stored(out, Out, UPCAST), mask=row_ok[:, None])
    else:
        tl.store(o_ptrs, _stored(out, Out, UPCAST), mask=row_ok[:, None] & d_ok[None, :])
    l_ptrs = Lse + b64 * stride_lb + h64 * stride_lh + m_first.to(tl.int64) * stride_ln + offs_m * stride_ln
    tl.store(l_ptrs, lse, mask=row_ok)


# --------------------------------------------------------------------------- configs

INTERPRETER_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}


# Autotuning candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head dim (BLOCK_D; an
# entry for the head dim itself, such as 96, wins), checked with `rmt-kernels aot` to compile without
# spills (and, on sm_90, with HGMMA for 16-bit inputs). float32 products
# in IEEE precision run on FMA units, whose operands live in registers: small tiles.
_FWD_16BIT = {
    90: {16: [(128, 64, 4, 3), (128, 128, 8, 3)], 32: [(128, 64, 4, 3), (128, 128, 8, 3)],
         64: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3)],
         128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3)], 256: [(128, 32, 8, 2)]},
    80: {16: [(128, 64, 4, 3)], 32: [(128, 64, 4, 3), (64, 64, 4, 3)],
         64: [(64, 64, 4, 3), (128, 128, 8, 2)], 128: [(128, 32, 8, 3), (64, 32, 4, 3)],
         256: [(64, 32, 8, 2), (32, 32, 4, 2)]},
}
_FWD_32BIT = {16: [(16, 32, 4, 2)], 32: [(32, 32, 4, 2)], 64: [(32, 32, 4, 2)], 128: [(16, 16, 4, 1)],
              256: [(16, 16, 8, 2)]}


def fwd_configs(head_dim: int, dtype, arch):
    """Launch configs of the forward kernel (``BLOCK_M`` query rows per program, ``BLOCK_N`` keys per
    step): the interpreter's single config when ``arch`` is None, else the autotuning candidates for
    compute capability ``arch`` (80, 90, ...)."""
    if arch is None:
        return [dict(INTERPRETER_CONFIG)]
    return pick_configs(_FWD_16BIT, _FWD_32BIT, head_dim, dtype, arch)
