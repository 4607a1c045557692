"""Device code the associative-memory kernels share: the DPFP feature map (nu = 3) computed in
registers from the projection, in lane chunks, its L2 norm, its backward, and tile loads of the state.

Per head, ``u`` is the ``p`` columns ``[h p, (h + 1) p)`` of a projection row and
``r = [relu(u) | relu(-u)]`` (``2p``); element ``i`` of ``r`` is ``relu(s_i u[i mod p])`` with
``s_i = +1`` for ``i < p`` and ``-1`` otherwise. The feature vector is three pieces
``phi_j = r * roll(r, j)`` (``j = 1, 2, 3``), ``roll(r, j)[i] = r[(i - j) mod 2p]``. Every lane of a
rolled copy of ``r`` is an independent gather from the projection (column ``(i - j) mod 2p mod p``,
sign), so the feature map is computed in chunks of ``BLOCK_K`` lanes (:func:`_f_chunk`): the operand
tiles of the products are ``[BLOCK_M, BLOCK_K]``, never ``2p`` wide, and the feature map never reaches
global memory. The norm is a first pass over the chunks (:func:`_feature_norm`). ``TWO_P`` is ``2p``
rounded up to a power of two (at least 16), padded lanes masked to zero; ``BLOCK_K`` divides it.

The chunks of the flattened feature vector are numbered ``t = 0 .. 3 TWO_P / BLOCK_K``: piece
``j = t BLOCK_K // TWO_P + 1``, lanes ``c0 = t BLOCK_K mod TWO_P``; the state rows of a chunk are
``(j - 1) 2p + c0 + [0, BLOCK_K)``.

The feature backward (:func:`_lmap`, :func:`_fold`, :func:`_store_du`) works on ``[BLOCK_M, BF]`` tiles
of one piece at a time, ``BF`` the piece's ``TWO_P`` lanes or, at ``p = 128`` (``TWO_P = 2p = 256``), one
half of them (``[16, 256]`` tiles spill): ``roll(x, -j)`` is a ``tl.gather`` along the lanes (no
product, no permutation matrix), and with halves, the last ``j`` lanes of a half's roll land in the
other half. This module imports triton.

Precision (every kernel): the products run on tensor cores in float32 with ``input_precision``
``DOT_PREC``: ``"tf32"`` for 16-bit inputs, and for float32 inputs ``"tf32x3"`` (float32-accurate)
when torch's float32 matmul precision is ``"highest"``, else ``"tf32"``; never ``"ieee"``
(``triton_launch.dot_precision``).
"""

from __future__ import annotations

import triton
import triton.language as tl

EPS = tl.constexpr(1e-5)  # the official code's epsilon in every denominator (torch_impl.EPS)
NORM_EPS = tl.constexpr(1e-12)  # F.normalize's floor on the norm (torch_impl.NORM_EPS)


@triton.jit
def _r_chunk(u_ptr, row_off, row_mask, su_d, J, c0, P: tl.constexpr, BK: tl.constexpr):
    """Lanes ``[c0, c0 + BK)`` of ``roll(r, J)`` for the rows at element offsets ``row_off`` ``[BM]``
    (int64, the head's first column included): ``[BM, BK]`` float32, zero on masked rows and lanes
    ``>= 2p``."""
    i = c0 + tl.arange(0, BK)
    src = (i + 4 * P - J) % (2 * P)  # (i - J) mod 2p, J in 0..3
    col = src % P
    sign = tl.where(src < P, 1.0, -1.0)
    mask = row_mask[:, None] & (i < 2 * P)[None, :]
    u = tl.load(u_ptr + row_off[:, None] + (col * su_d)[None, :], mask=mask, other=0.0).to(tl.float32)
    return tl.maximum(u * sign[None, :], 0.0)


@triton.jit
def _phi_chunk(u_ptr, row_off, row_mask, su_d, J, c0, P: tl.constexpr, BK: tl.constexpr):
    """Lanes ``[c0, c0 + BK)`` of the unnormalised feature piece ``phi_J = r * roll(r, J)``."""
    return _r_chunk(u_ptr, row_off, row_mask, su_d, 0, c0, P, BK) * \
        _r_chunk(u_ptr, row_off, row_mask, su_d, J, c0, P, BK)


@triton.jit
def _feature_norm(u_ptr, row_off, row_mask, su_d, BLOCK_M: tl.constexpr, P: tl.constexpr, TWO_P: tl.constexpr,
                  BK: tl.constexpr):
    """``max(|phi|, 1e-12)`` per row ``[BM]`` (``F.normalize``'s divisor): a pass over the chunks."""
    n2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for t in tl.range(0, 3 * TWO_P, BK, loop_unroll_factor=1):
        ph = _phi_chunk(u_ptr, row_off, row_mask, su_d, t // TWO_P + 1, t % TWO_P, P, BK)
        n2 += tl.sum(ph * ph, axis=1)
    return tl.maximum(tl.sqrt(n2), NORM_EPS)


@triton.jit
def _f_chunk(u_ptr, row_off, row_mask, su_d, norm, J, c0, NORMALIZE: tl.constexpr, P: tl.constexpr,
             BK: tl.constexpr):
    """Lanes ``[c0, c0 + BK)`` of feature piece ``J`` as the op uses it: ``phi_J``, divided by
    ``norm`` when ``NORMALIZE``."""
    f = _phi_chunk(u_ptr, row_off, row_mask, su_d, J, c0, P, BK)
    if NORMALIZE:
        f = f / norm[:, None]
    return f


@triton.jit
def _state_chunk(s_ptr, base, sk, sv, J, c0, cols, col_mask, P: tl.constexpr, BK: tl.constexpr):
    """Rows ``(J - 1) 2p + [c0, c0 + BK)`` of a ``[K, dv]`` state matrix at columns ``cols``:
    ``[BK, BLOCK_DV]`` float32 (``base``: the int64 offset of the head's matrix; the offsets inside it
    are int32, which the launchers guarantee: ``triton_launch._state_view``)."""
    i = c0 + tl.arange(0, BK)
    rows = (J - 1) * 2 * P + i
    mask = (i < 2 * P)[:, None] & col_mask[None, :]
    return tl.load((s_ptr + base) + ((rows * sk)[:, None] + (cols * sv)[None, :]), mask=mask,
                   other=0.0).to(tl.float32)


@triton.jit
def _vec_chunk(s_ptr, base, sk, J, c0, P: tl.constexpr, BK: tl.constexpr):
    """Elements ``(J - 1) 2p + [c0, c0 + BK)`` of a ``[K]`` state vector: ``[BK]`` float32."""
    i = c0 + tl.arange(0, BK)
    return tl.load(s_ptr + base + ((J - 1) * 2 * P + i) * sk, mask=i < 2 * P, other=0.0).to(tl.float32)


@triton.jit
def _store_state_chunk(s_ptr, base, sk, sv, J, c0, cols, col_mask, val, P: tl.constexpr, BK: tl.constexpr):
    i = c0 + tl.arange(0, BK)
    rows = (J - 1) * 2 * P + i
    mask = (i < 2 * P)[:, None] & col_mask[None, :]
    tl.store(s_ptr + base + (rows * sk)[:, None] + (cols.to(tl.int64) * sv)[None, :], val, mask=mask)


@triton.jit
def _store_vec_chunk(s_ptr, base, sk, J, c0, val, P: tl.constexpr, BK: tl.constexpr):
    i = c0 + tl.arange(0, BK)
    tl.store(s_ptr + base + ((J - 1) * 2 * P + i) * sk, val, mask=i < 2 * P)


@triton.jit
def _lmap(x, r0, rj, J, BLOCK_M: tl.constexpr, P: tl.constexpr, TWO_P: tl.constexpr):
    """The backward of ``phi_J = r * roll(r, J)`` with respect to ``r``, for ``x`` ``[BM, TWO_P]`` on
    ``phi_J``: ``x * roll(r, J) + roll(x * r, -J)`` (``roll(y, -J)[i] = y[(i + J) mod 2p]``, a
    gather along the lanes; lanes ``>= 2p`` are garbage, the caller masks them)."""
    lane = tl.arange(0, TWO_P)[None, :]
    idx = tl.broadcast_to((lane + J) % (2 * P), (BLOCK_M, TWO_P))
    return x * rj + tl.gather(x * r0, idx, 1)


@triton.jit
def _fold(d_r, d_r2, x, r0, rj, J, off: tl.constexpr, BLOCK_M: tl.constexpr, P: tl.constexpr, TWO_P: tl.constexpr,
          BF: tl.constexpr):
    """Adds :func:`_lmap` of lanes ``[off, off + BF)`` of a piece (``x``, ``r0``, ``rj``: ``[BM, BF]``) to
    the gradient on ``r``: ``d_r`` (lanes ``[0, BF)``) and, when ``BF < TWO_P``, ``d_r2`` (lanes
    ``[BF, 2 BF)``; then ``TWO_P == 2p == 2 BF``, and ``roll(., -J)`` of one half is a roll inside it whose
    last ``J`` lanes land in the other half). ``BF == TWO_P``: ``d_r2`` (a ``[BM, 1]`` placeholder) is
    returned unchanged."""
    if BF == TWO_P:
        d_r += _lmap(x, r0, rj, J, BLOCK_M, P, TWO_P)
    else:
        tl.static_assert(2 * BF == TWO_P)
        tl.static_assert(TWO_P == 2 * P)
        lane = tl.arange(0, BF)[None, :]
        rolled = tl.gather(x * r0, tl.broadcast_to((lane + J) % BF, (BLOCK_M, BF)), 1)
        keep = lane < BF - J
        own = x * rj + tl.where(keep, rolled, 0.0)
        other = tl.where(keep, 0.0, rolled)
        if off == 0:
            d_r += own
            d_r2 += other
        else:
            d_r2 += own
            d_r += other
    return d_r, d_r2


@triton.jit
def _store_du(du_ptr, du_off, sdu_d, u_ptr, row_off, row_mask, su_d, dr, off: tl.constexpr, P: tl.constexpr,
              BF: tl.constexpr):
    """``du[c] = dr[c] (u[c] > 0) - dr[c + p] (u[c] < 0)`` from ``dr`` ``[BM, BF]`` (lanes ``[off, off + BF)``
    of the gradient on ``r``), stored to the ``p`` columns of ``du`` at ``du_off`` (int64, head column
    included) in ``du``'s dtype: lane ``c`` writes column ``c`` where ``u[c] >= 0``, lane ``c + p`` where
    ``u[c] < 0``, so each column has one writer."""
    i = off + tl.arange(0, BF)
    col = i % P
    lo = i < P
    valid = row_mask[:, None] & (i < 2 * P)[None, :]
    su = tl.load(u_ptr + row_off[:, None] + (col * su_d)[None, :], mask=valid, other=0.0).to(tl.float32)
    su = su * tl.where(lo, 1.0, -1.0)[None, :]
    du = tl.where(lo[None, :], 1.0, -1.0) * tl.where(su > 0, dr, 0.0)
    write = valid & ((lo[None, :] & (su >= 0)) | ((~lo)[None, :] & (su > 0)))
    tl.store(du_ptr + du_off[:, None] + (col * sdu_d)[None, :], du.to(du_ptr.dtype.element_ty), mask=write)
