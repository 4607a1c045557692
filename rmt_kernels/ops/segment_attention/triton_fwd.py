"""Triton forward of segment attention, and the tile schedule the backward shares.

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

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_LN2 = tl.constexpr(LN2)


# Tile codes written by the TRACE debug path (tests compare them with MemoryLayout.classify_tiles).
TRACE_MASKED = tl.constexpr(1)
TRACE_FULL = tl.constexpr(2)


@triton.jit
def _key_end(rows, R, S, N, MASK: tl.constexpr):  # MASK: layout.MASK_CODES
    """Packed keys ``j < key_end`` are in reach of row ``rows`` (before padding): MemoryLayout.key_end."""
    if MASK == 0:
        end = rows + 1
    elif MASK == 2:
        end = rows * 0 + N
    else:
        end = tl.where(rows < R, R, tl.where(rows < R + S, rows + 1, N))
    return end


@triton.jit
def _first_row(j, R, S, MASK: tl.constexpr):
    """Smallest row whose key_end exceeds key ``j`` (key_end is non-decreasing, so every later row
    reaches ``j`` too)."""
    if MASK == 0:
        row = j
    elif MASK == 2:
        row = j * 0
    else:
        row = tl.where(j < R, 0, tl.where(j < R + S, j, R + S))
    return row


@triton.jit
def _gap(SegLen, b, R, S, N, HAS_LENGTHS: tl.constexpr):
    """Packed keys ``[gap_lo, gap_hi)`` are right padding, invisible to every row (``[N, N)`` when
    the batch row is not padded)."""
    if HAS_LENGTHS:
        length = tl.load(SegLen + b)
        gap_lo = tl.where(length < S, R + length, N)
        gap_hi = tl.where(length < S, R + S, N)
    else:
        gap_lo = N
        gap_hi = N
    return gap_lo, gap_hi


@triton.jit
def _packed_key_tiles(m_first, m_last, R, S, N, gap_lo, gap_hi, BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    """Packed key tiles of the query rows ``[m_first, m_last]``.

    Returns ``f1, e1, s2, c0, c1, e2`` with ``f1 <= e1 <= s2 <= c0 <= c1 <= e2``: the tiles
    ``[0, f1)`` and ``[c0, c1)`` are seen entirely by every row (unmasked path); ``[f1, e1)``,
    ``[s2, c0)`` and ``[c1, e2)`` hold a visible pair but not only visible ones (masked path); every
    other tile holds none and is never loaded.
    """
    lo = _key_end(m_first, R, S, N, MASK)  # key_end is non-decreasing: the block's min and max
    hi = _key_end(m_last, R, S, N, MASK)
    # Keys before the gap: the last row reaches [0, min(hi, gap_lo)); every row [0, min(lo, gap_lo)).
    e1 = (tl.minimum(hi, gap_lo) + BLOCK_N - 1) // BLOCK_N
    f1 = tl.minimum(lo, gap_lo) // BLOCK_N
    # Keys after the gap: [gap_hi, hi), starting at the tile holding gap_hi unless already visited.
    s2 = tl.maximum(gap_hi // BLOCK_N, e1)
    e2 = tl.where(hi > gap_hi, (hi + BLOCK_N - 1) // BLOCK_N, s2)
    c0 = tl.minimum(tl.maximum((gap_hi + BLOCK_N - 1) // BLOCK_N, s2), e2)
    c1 = tl.minimum(tl.maximum(lo // BLOCK_N, c0), e2)
    return f1, e1, s2, c0, c1, e2


@triton.jit
def _prefix_key_tiles(m_first, m_last, R, S, P, BLOCK_N: tl.constexpr, PREFIX_ALL: tl.constexpr):
    """Prefix tiles of the query rows ``[m_first, m_last]``: ``[0, full)`` unmasked, ``[full, end)``
    masked (the rows of the block that see the prefix differ, or the bounds tail)."""
    if PREFIX_ALL:
        full = P // BLOCK_N
        end = (P + BLOCK_N - 1) // BLOCK_N
    else:
        some = (m_last >= R) & (m_first < R + S) & (S > 0)
        every = (m_first >= R) & (m_last < R + S)
        full = tl.where(every, P // BLOCK_N, 0)
        end = tl.where(some, (P + BLOCK_N - 1) // BLOCK_N, 0)
    return full, end


@triton.jit
def _prefix_rows(rows, R, S, PREFIX_ALL: tl.constexpr):
    """Whether each row sees the prefix: MemoryLayout.prefix_visible."""
    if PREFIX_ALL:
        vis = rows >= 0
    else:
        vis = (rows >= R) & (rows < R + S)
    return vis


@triton.jit
def _packed_visible(rows_end, cols, gap_lo, gap_hi, HAS_LENGTHS: tl.constexpr):
    """``[rows, cols]`` visibility of packed keys: ``j < key_end[i]`` and ``j`` not padding."""
    vis = cols[None, :] < rows_end[:, None]
    if HAS_LENGTHS:
        vis = vis & ((cols < gap_lo) | (cols >= gap_hi))[None, :]
    return vis


@triton.jit
def _masked_tile_index(t, f1, e1, s2, c0, c1):
    """The ``t``-th tile of ``[f1, e1) + [s2, c0) + [c1, e2)``."""
    a1 = e1 - f1
    a2 = a1 + (c0 - s2)
    return f1 + t + tl.where(t >= a1, s2 - e1, 0) + tl.where(t >= a2, c1 - c0, 0)


@triton.jit
def _load_rows(ptrs, row_ok, d_ok, ROW_MASK: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a ``[rows, BLOCK_D]`` tile; masks only where rows or head-dim columns can be out of range."""
    if ROW_MASK:
        if EVEN_D:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return x


@triton.jit
def _fwd_step(acc, m_i, l_i, q, k, v, qk_scale, vis, MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
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
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
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
            k = _load_rows(pk_base + start * stride_pkn + offs_n[:, None] * stride_pkn
                           + offs_d[None, :] * stride_pkd, offs_n, d_ok, False, EVEN_D)
            v = _load_rows(pv_base + start * stride_pvn + offs_n[:, None] * stride_pvn
                           + offs_d[None, :] * stride_pvd, offs_n, d_ok, False, EVEN_D)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k, v, qk_scale, 0, False, DOT_PREC)
            if TRACE:
                tl.store(trace_row + t, TRACE_FULL)
        p_vis = _prefix_rows(rows, R, S, PREFIX_ALL)
        for t in range(p_full, p_end):
            cols = t * BLOCK_N + offs_n
            col_ok = cols < P
            start = tl.cast(t * BLOCK_N, tl.int64)
            k = _load_rows(pk_base + start * stride_pkn + offs_n[:, None] * stride_pkn
                           + offs_d[None, :] * stride_pkd, col_ok, d_ok, True, EVEN_D)
            v = _load_rows(pv_base + start * stride_pvn + offs_n[:, None] * stride_pvn
                           + offs_d[None, :] * stride_pvd, col_ok, d_ok, True, EVEN_D)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            vis = p_vis[:, None] & col_ok[None, :]
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k, v, qk_scale, vis, True, DOT_PREC)
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
        k = _load_rows(k_base + start * stride_kn + offs_n[:, None] * stride_kn
                       + offs_d[None, :] * stride_kd, offs_n, d_ok, False, EVEN_D)
        v = _load_rows(v_base + start * stride_vn + offs_n[:, None] * stride_vn
                       + offs_d[None, :] * stride_vd, offs_n, d_ok, False, EVEN_D)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k, v, qk_scale, 0, False, DOT_PREC)
        if TRACE:
            tl.store(trace_row + n_ptiles + tile, TRACE_FULL)
    rows_end = _key_end(rows, R, S, N, MASK)
    for t in range(0, (e1 - f1) + (c0 - s2) + (e2 - c1)):
        tile = _masked_tile_index(t, f1, e1, s2, c0, c1)
        cols = tile * BLOCK_N + offs_n
        col_ok = cols < N
        start = tl.cast(tile * BLOCK_N, tl.int64)
        k = _load_rows(k_base + start * stride_kn + offs_n[:, None] * stride_kn
                       + offs_d[None, :] * stride_kd, col_ok, d_ok, True, EVEN_D)
        v = _load_rows(v_base + start * stride_vn + offs_n[:, None] * stride_vn
                       + offs_d[None, :] * stride_vd, col_ok, d_ok, True, EVEN_D)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        # key_end <= N, so the visibility expression also masks the bounds tail.
        vis = _packed_visible(rows_end, cols, gap_lo, gap_hi, HAS_LENGTHS)
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k, v, qk_scale, vis, True, DOT_PREC)
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
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    l_ptrs = Lse + b64 * stride_lb + h64 * stride_lh + m_first.to(tl.int64) * stride_ln + offs_m * stride_ln
    tl.store(l_ptrs, lse, mask=row_ok)


# --------------------------------------------------------------------------- configs

INTERPRETER_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}


def _cfg(block_m, block_n, num_warps, num_stages):
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps, "num_stages": num_stages}


# Autotuning candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head dim (BLOCK_D; an
# entry for the head dim itself, such as 96, wins), checked with `rmt-kernels aot` under triton 3.6
# and 3.9 to compile without spills (and, on sm_90, with HGMMA for 16-bit inputs). float32 products
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


def pick_configs(table_16bit, table_32bit, head_dim: int, dtype, arch: int):
    """Configs of one kernel for ``head_dim`` on ``arch`` (sm_90 tables for sm_90 and newer)."""
    import torch

    block_d = 1 << max(4, (head_dim - 1).bit_length())
    table = table_32bit if dtype == torch.float32 else table_16bit[90 if arch >= 90 else 80]
    rows = table.get(head_dim, table[block_d])
    return [_cfg(*row) for row in rows]


def fwd_configs(head_dim: int, dtype, arch):
    """Launch configs of the forward kernel (``BLOCK_M`` query rows per program, ``BLOCK_N`` keys per
    step): the interpreter's single config when ``arch`` is None, else the autotuning candidates for
    compute capability ``arch`` (80, 90, ...)."""
    if arch is None:
        return [dict(INTERPRETER_CONFIG)]
    return pick_configs(_FWD_16BIT, _FWD_32BIT, head_dim, dtype, arch)
