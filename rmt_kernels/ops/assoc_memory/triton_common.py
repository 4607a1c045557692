"""Device code the associative-memory kernels share: the DPFP feature map (nu = 3) computed in
registers from the projection, its L2 norm, its backward, and tile loads of the state.

Per head, ``u`` is the ``p`` columns ``[h p, (h + 1) p)`` of a projection row and
``r = [relu(u) | relu(-u)]`` (``2p``); element ``i`` of ``r`` is ``relu(s_i u[i mod p])`` with
``s_i = +1`` for ``i < p`` and ``-1`` otherwise. The feature vector is three pieces
``phi_j = r * roll(r, j)`` (``j = 1, 2, 3``), ``roll(r, j)[i] = r[(i - j) mod 2p]``: every rolled copy
of ``r`` is loaded straight from the projection with gathered column indices and signs, so the feature
map never reaches global memory. Tiles are ``[BLOCK_M, TWO_P]`` (``TWO_P``: ``2p`` rounded up to a
power of two, at least 16 for ``tl.dot``), padded lanes masked to zero; every product runs in float32,
the state's dtype. This module imports triton.
"""

from __future__ import annotations

import triton
import triton.language as tl

EPS = tl.constexpr(1e-5)  # the official code's epsilon in every denominator (torch_impl.EPS)
NORM_EPS = tl.constexpr(1e-12)  # F.normalize's floor on the norm (torch_impl.NORM_EPS)


@triton.jit
def _r_piece(u_ptr, row_off, row_mask, su_d, J, P: tl.constexpr, TWO_P: tl.constexpr):
    """``roll(r, J)`` of the rows at element offsets ``row_off`` ``[BM]`` (int64, the head's first
    column included): ``[BM, TWO_P]`` float32, zero on masked rows and padded lanes."""
    i = tl.arange(0, TWO_P)
    src = (i + 4 * P - J) % (2 * P)  # (i - J) mod 2p, J in 0..3
    col = src % P
    sign = tl.where(src < P, 1.0, -1.0)
    mask = row_mask[:, None] & (i < 2 * P)[None, :]
    u = tl.load(u_ptr + row_off[:, None] + (col * su_d)[None, :], mask=mask, other=0.0).to(tl.float32)
    return tl.maximum(u * sign[None, :], 0.0)


@triton.jit
def _phi_piece(u_ptr, row_off, row_mask, su_d, r0, J, P: tl.constexpr, TWO_P: tl.constexpr):
    """Unnormalised feature piece ``phi_J = r * roll(r, J)`` given ``r0 = r``."""
    return r0 * _r_piece(u_ptr, row_off, row_mask, su_d, J, P, TWO_P)


@triton.jit
def _feature_norm(u_ptr, row_off, row_mask, su_d, r0, P: tl.constexpr, TWO_P: tl.constexpr):
    """``max(|phi|, 1e-12)`` per row ``[BM]`` (``F.normalize``'s divisor)."""
    p1 = _phi_piece(u_ptr, row_off, row_mask, su_d, r0, 1, P, TWO_P)
    n2 = tl.sum(p1 * p1, axis=1)
    p2 = _phi_piece(u_ptr, row_off, row_mask, su_d, r0, 2, P, TWO_P)
    n2 += tl.sum(p2 * p2, axis=1)
    p3 = _phi_piece(u_ptr, row_off, row_mask, su_d, r0, 3, P, TWO_P)
    n2 += tl.sum(p3 * p3, axis=1)
    return tl.maximum(tl.sqrt(n2), NORM_EPS)


@triton.jit
def _f_piece(u_ptr, row_off, row_mask, su_d, r0, norm, J, NORMALIZE: tl.constexpr, P: tl.constexpr,
             TWO_P: tl.constexpr):
    """Feature piece ``J`` as the op uses it: ``phi_J``, divided by ``norm`` when ``NORMALIZE``."""
    f = _phi_piece(u_ptr, row_off, row_mask, su_d, r0, J, P, TWO_P)
    if NORMALIZE:
        f = f / norm[:, None]
    return f


@triton.jit
def _state_piece(s_ptr, base, sk, sv, J, cols, col_mask, P: tl.constexpr, TWO_P: tl.constexpr):
    """Rows ``[(J - 1) 2p, J 2p)`` of a ``[K, dv]`` state matrix at columns ``cols``:
    ``[TWO_P, BLOCK_DV]`` float32 (``base``: the int64 offset of the head's matrix)."""
    i = tl.arange(0, TWO_P)
    rows = (J - 1) * 2 * P + i
    mask = (i < 2 * P)[:, None] & col_mask[None, :]
    return tl.load(s_ptr + base + (rows * sk)[:, None] + (cols.to(tl.int64) * sv)[None, :], mask=mask,
                   other=0.0).to(tl.float32)


@triton.jit
def _vec_piece(s_ptr, base, sk, J, P: tl.constexpr, TWO_P: tl.constexpr):
    """Elements ``[(J - 1) 2p, J 2p)`` of a ``[K]`` state vector: ``[TWO_P]`` float32."""
    i = tl.arange(0, TWO_P)
    return tl.load(s_ptr + base + ((J - 1) * 2 * P + i) * sk, mask=i < 2 * P, other=0.0).to(tl.float32)


@triton.jit
def _store_state_piece(s_ptr, base, sk, sv, J, cols, col_mask, val, P: tl.constexpr, TWO_P: tl.constexpr):
    i = tl.arange(0, TWO_P)
    rows = (J - 1) * 2 * P + i
    mask = (i < 2 * P)[:, None] & col_mask[None, :]
    tl.store(s_ptr + base + (rows * sk)[:, None] + (cols.to(tl.int64) * sv)[None, :], val, mask=mask)


@triton.jit
def _store_vec_piece(s_ptr, base, sk, J, val, P: tl.constexpr, TWO_P: tl.constexpr):
    i = tl.arange(0, TWO_P)
    tl.store(s_ptr + base + ((J - 1) * 2 * P + i) * sk, val, mask=i < 2 * P)


@triton.jit
def _roll_back(x, J, P: tl.constexpr, TWO_P: tl.constexpr):
    """``roll(x, -J)`` along the ``2p`` valid lanes of ``x`` ``[BM, TWO_P]``: ``out[:, i] =
    x[:, (i + J) mod 2p]``, as an product with a 0/1 permutation matrix (3xTF32: float32-accurate on tensor cores)."""
    src = tl.arange(0, TWO_P)[:, None]
    dst = tl.arange(0, TWO_P)[None, :]
    perm = tl.where((src == (dst + J) % (2 * P)) & (dst < 2 * P), 1.0, 0.0)
    return tl.dot(x, perm, input_precision="tf32x3")


@triton.jit
def _features_bwd_store(du_ptr, du_off, sdu_d, u_ptr, row_off, row_mask, su_d, r0, norm, df1, df2, df3,
                        NORMALIZE: tl.constexpr, P: tl.constexpr, TWO_P: tl.constexpr):
    """Gradient of the feature map (``torch_impl.features_bwd``) given ``df_j`` on the pieces of the
    (normalised) features, stored to the ``p`` columns of ``du`` at ``row_off`` (int64) in ``du``'s
    dtype (``du_off``: the rows' int64 offsets in ``du``, head column included). ``du[c] = dr[c] (u[c] > 0) - dr[c + p] (u[c] < 0)``: lane ``c`` of the ``2p`` lanes writes
    column ``c`` where ``u[c] >= 0``, lane ``c + p`` where ``u[c] < 0``, so each column has one writer."""
    r1 = _r_piece(u_ptr, row_off, row_mask, su_d, 1, P, TWO_P)
    r2 = _r_piece(u_ptr, row_off, row_mask, su_d, 2, P, TWO_P)
    r3 = _r_piece(u_ptr, row_off, row_mask, su_d, 3, P, TWO_P)
    if NORMALIZE:
        f1 = r0 * r1 / norm[:, None]
        f2 = r0 * r2 / norm[:, None]
        f3 = r0 * r3 / norm[:, None]
        proj = tl.sum(f1 * df1, axis=1) + tl.sum(f2 * df2, axis=1) + tl.sum(f3 * df3, axis=1)
        big = (norm > NORM_EPS)[:, None]
        df1 = tl.where(big, df1 - f1 * proj[:, None], df1) / norm[:, None]
        df2 = tl.where(big, df2 - f2 * proj[:, None], df2) / norm[:, None]
        df3 = tl.where(big, df3 - f3 * proj[:, None], df3) / norm[:, None]
    dr = df1 * r1 + _roll_back(df1 * r0, 1, P, TWO_P)
    dr += df2 * r2 + _roll_back(df2 * r0, 2, P, TWO_P)
    dr += df3 * r3 + _roll_back(df3 * r0, 3, P, TWO_P)
    # Signed u of each lane: s_i u[i mod p]; r0 = relu of it.
    i = tl.arange(0, TWO_P)
    col = i % P
    lo = i < P
    valid = row_mask[:, None] & (i < 2 * P)[None, :]
    su = tl.load(u_ptr + row_off[:, None] + (col * su_d)[None, :], mask=valid, other=0.0).to(tl.float32)
    su = su * tl.where(lo, 1.0, -1.0)[None, :]
    du = tl.where(lo[None, :], 1.0, -1.0) * tl.where(su > 0, dr, 0.0)
    write = valid & ((lo[None, :] & (su >= 0)) | ((~lo)[None, :] & (su > 0)))
    tl.store(du_ptr + du_off[:, None] + (col * sdu_d)[None, :], du.to(du_ptr.dtype.element_ty), mask=write)
