"""Triton pieces shared by the forward and backward kernels of segment attention.

- the tile schedule: which key tiles a block of query rows visits and which of them take the
  unmasked path (``_key_end``, ``_first_row``, ``_gap``, ``_packed_key_tiles``, ``_prefix_key_tiles``,
  ``_prefix_rows``, ``_packed_visible``, ``_masked_tile_index``), read from the layout's visibility
  expression exactly as :meth:`MemoryLayout.classify_tiles` tiles it;
- tile loads: ``_load_rows`` (one ``[rows, BLOCK_D]`` tile) and ``_load_kv_tile`` (the K and V tiles
  of one key block: every step of the forward's and the dQ kernel's key loops, masked or not, and the
  key block a dK/dV program keeps on chip);
- ``_operand`` and ``_stored``: a float32 tile cast for a product (P, dS) or for a store (O, dQ, dK,
  dV); under ``UPCAST`` (the interpreter on bfloat16 inputs) rounded to bfloat16 to nearest even, as
  the GPU's cast rounds (``_round_bf16``);
- attention dropout (``DROPOUT``): ``_dropout_params`` and ``_dropout_keep``, the one keep function
  of the forward and both backward kernels (scheme below), and next to it ``_dropout_mask_kernel``
  (debug, tests): grid ``(cdiv(N, BLOCK_M), H_q, B)``, the keep decisions of every element
  ``[B, H_q, N, P + N]`` (visible or not) as uint8, from the same ``_dropout_keep``;
- the trace codes of the ``TRACE`` debug path, ``LOG2E`` / ``LN2`` (scores run in base-2 units);
- ``pick_configs``: the autotuning candidates of one kernel from its per-head-dim tables, keyed by
  ``padded_head_dim`` and ``table_arch``.

Dropout counters. Element ``(b, h, i, j)`` of the attention probabilities (batch row ``b``, query head
``h`` of ``H_q``, query row ``i`` of ``N``, key ``j`` in the key order ``[prefix (P) | packed (N)]``) is
kept iff ``u >= p``, with ``u = (x >> 8) / 2**24`` (a float32 uniform on ``[0, 1)``, exact) and ``x``
word ``i % 4`` of Philox-4x32-10 (``tl.philox``) keyed by the 64-bit seed (``Seed[0]``, split into the
two key words) on the counter ``(j, i // 4, h, b)``: one 32-bit counter word per coordinate, and each
Philox evaluation serves four rows (row blocks are multiples of 16 from row 0, so the groups of four
never straddle a tile). The counter never overflows, and distinct ``(b, h, i, j)`` have distinct
``(counter, word)`` pairs for every coordinate below ``2**32`` (Philox is a bijection of the counter
under one key), far beyond ``B * H = 2**20`` and ``N, P + N = 2**16``. ``b`` is the global batch row
(the program's batch index plus the launch's ``B_START``, for batches launched in chunks). Nothing is
stored: the forward, the dK/dV and dQ kernels regenerate the same bits from the same counters.

This module imports triton; the launchers import it on the first launch.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_LN2 = tl.constexpr(LN2)
_LOG2E = tl.constexpr(LOG2E)


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
def _load_kv_tile(k_base, v_base, start, offs_n, offs_d, stride_kn, stride_kd, stride_vn, stride_vd,
                  row_ok, d_ok, ROW_MASK: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr):
    """The ``[BLOCK_N, BLOCK_D]`` K and V tiles of the keys ``start + offs_n`` (``start`` int64: the
    batch/head bases and the tile start may exceed 2**31; in-tile offsets stay 32-bit). ``ROW_MASK``
    masks keys with ``row_ok`` (the bounds tail); ``UPCAST`` returns float32 tiles (bfloat16 products
    are wrong in the interpreter; the upcast is exact)."""
    k = _load_rows(k_base + start * stride_kn + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                   row_ok, d_ok, ROW_MASK, EVEN_D)  # [BN, BD]
    v = _load_rows(v_base + start * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                   row_ok, d_ok, ROW_MASK, EVEN_D)  # [BN, BD]
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def _dropout_params(Seed, dropout_p):
    """``(seed, threshold, rescale)`` of dropout probability ``dropout_p``: the 64-bit Philox key loaded
    from ``Seed`` (device memory: no host sync), ``p * 2**24`` (the keep test of :func:`_dropout_keep`)
    and ``1 / (1 - p)``."""
    seed = tl.load(Seed)
    threshold = dropout_p * 16777216.0
    rescale = 1.0 / (1.0 - dropout_p)
    return seed, threshold, rescale


@triton.jit
def _dropout_keep(seed, b, h, row0, keys, threshold, BLOCK_ROWS: tl.constexpr, BLOCK_KEYS: tl.constexpr):
    """``[BLOCK_KEYS, BLOCK_ROWS]`` keep decisions (in the ``[keys, rows]`` frame of the dK/dV kernel;
    the others transpose it) of the elements ``(b, h, row0 + r, keys[k])``: ``row0`` a multiple of 4,
    ``keys`` the int32 ``[BLOCK_KEYS]`` key indices in the order ``[prefix | packed]``, ``b`` (global
    batch row) and ``h`` (query head) int32 scalars. Row ``i`` takes word ``i % 4`` of the counter
    ``(j, i // 4, h, b)``; kept iff ``(x >> 8) >= p * 2**24``, that is ``u >= p``."""
    groups = row0 // 4 + tl.arange(0, BLOCK_ROWS // 4)
    zero = keys[:, None] * 0 + groups[None, :] * 0
    x0, x1, x2, x3 = tl.philox(seed, keys[:, None] + zero, groups[None, :] + zero, zero + h, zero + b)
    # [keys, groups, a, c] holds word 2 * a + c: row 4 * group + 2 * a + c once the last three dims merge.
    x = tl.reshape(tl.join(tl.join(x0, x2), tl.join(x1, x3)), BLOCK_KEYS, BLOCK_ROWS)
    return (x >> 8).to(tl.float32) >= threshold


@triton.jit
def _dropout_mask_kernel(
    Mask, stride_mb, stride_mh, stride_mn, stride_mk,
    N, KEYS, dropout_p, Seed, B_START,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``Mask[b, h, i, j] = keep(b, h, i, j)`` for ``j < KEYS = P + N``, as uint8."""
    h = tl.program_id(1)
    b = tl.program_id(2)
    seed, threshold, _ = _dropout_params(Seed, dropout_p)
    row0 = tl.program_id(0) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    base = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh + rows.to(tl.int64)[None, :] * stride_mn
    for start in range(0, KEYS, BLOCK_N):
        keys = start + offs_n
        keep = _dropout_keep(seed, b + B_START, h, row0, keys, threshold, BLOCK_M, BLOCK_N)  # [keys, rows]
        tl.store(base + keys[:, None] * stride_mk, keep.to(tl.uint8), mask=(keys < KEYS)[:, None] & (rows < N)[None, :])


@triton.jit
def _round_bf16(x):
    """float32 ``x`` rounded to the nearest bfloat16 (ties to even), kept in float32: the rounding of a
    GPU's cast to bfloat16 (the interpreter's cast truncates). Finite inputs only."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _operand(x, like, UPCAST: tl.constexpr):
    """The float32 tile ``x`` (P or dS) as an operand of a product with the loaded tile ``like``: in
    ``like``'s dtype. Under ``UPCAST`` (bfloat16 products run in float32 in the interpreter, ``like`` is
    float32) it is rounded to bfloat16 all the same, so the interpreter computes the GPU's numerics."""
    if UPCAST:
        y = _round_bf16(x)
    else:
        y = x.to(like.dtype)
    return y


@triton.jit
def _stored(x, ptr, UPCAST: tl.constexpr):
    """The float32 tile ``x`` in the element type of ``ptr``, for a store; under ``UPCAST`` a bfloat16
    destination gets ``x`` rounded to nearest even first (the interpreter's cast would truncate)."""
    if UPCAST:
        if ptr.dtype.element_ty == tl.bfloat16:
            x = _round_bf16(x)
    return x.to(ptr.dtype.element_ty)


# --------------------------------------------------------------------------- configs


def _cfg(block_m, block_n, num_warps, num_stages):
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps, "num_stages": num_stages}


def padded_head_dim(head_dim: int) -> int:
    """``BLOCK_D``: the head dim rounded up to a power of two, at least 16 (the key of the config tables)."""
    return 1 << max(4, (head_dim - 1).bit_length())


def table_arch(arch: int) -> int:
    """The key of the per-arch config tables: 90 for sm_90 and newer, else 80."""
    return 90 if arch >= 90 else 80


def pick_configs(table_16bit, table_32bit, head_dim: int, dtype, arch: int, per_arch_32bit: bool = False):
    """Configs of one kernel for ``head_dim`` on ``arch`` (sm_90 tables for sm_90 and newer); the float32
    table is per arch too with ``per_arch_32bit``."""
    import torch

    block_d = padded_head_dim(head_dim)
    arch_key = table_arch(arch)
    if dtype == torch.float32:
        table = table_32bit[arch_key] if per_arch_32bit else table_32bit
    else:
        table = table_16bit[arch_key]
    rows = table.get(head_dim, table[block_d])
    return [_cfg(*row) for row in rows]
