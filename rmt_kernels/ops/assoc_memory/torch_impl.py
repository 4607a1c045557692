"""The ``torch`` backend of ARMT's associative memory: stock PyTorch calls, forward and an explicit
backward (no autograd recorded, nothing recomputed beyond the feature map).

Shapes (per call; ``p = d_mem / H``, ``K = 6 p`` the feature width, ``dv = d / H``):

- read: ``x [B, N, d]``, ``q [B, N, d_mem]`` (the projection ``W_q x``), ``A [B, H, K, dv]``,
  ``z [B, H, K]`` -> ``y = x + read`` in ``x``'s dtype;
- write: ``k [B, M, d_mem]``, ``v [B, M, d]``, ``b [B, M, H]`` (``[B, M, d]`` with ``gating``; before
  the sigmoid), ``A``/``z`` the old state or None (first segment) -> the new ``(A, z)``.

Every output is a new contiguous tensor (the fakes of the custom ops say so). The state is float32
(float64 for float64 inputs); the feature map, the normalisation and every
product run in the state's dtype. These formulas are the contract of the Triton kernels too; the
tests check them against ``reference.assoc_read_ref``/``assoc_write_ref`` (float64 gradcheck).
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._alloc import accum_dtype

EPS = 1e-5  # the official code's epsilon in every denominator
NORM_EPS = 1e-12  # F.normalize's floor on the norm


def _heads(t: Tensor, n_heads: int, dtype: torch.dtype) -> Tensor:
    b, n, d = t.shape
    return t.reshape(b, n, n_heads, d // n_heads).transpose(1, 2).to(dtype)


def _merge(t: Tensor, dtype: torch.dtype) -> Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d).to(dtype).contiguous()


def _roll_index(two_p, device: torch.device) -> Tuple[Tensor, Tensor]:
    if isinstance(two_p, int):
        return _roll_index_cached(two_p, device)
    return _make_roll_index(two_p, device)  # a symbolic size (tracing): nothing to cache on


@functools.lru_cache(maxsize=None)
def _roll_index_cached(two_p: int, device: torch.device) -> Tuple[Tensor, Tensor]:
    return _make_roll_index(two_p, device)


def _make_roll_index(two_p, device: torch.device) -> Tuple[Tensor, Tensor]:
    """``(rolled, unrolled)`` gather indices over ``3 * 2p`` columns: ``r[..., rolled]`` is
    ``[roll(r, 1) | roll(r, 2) | roll(r, 3)]`` (``roll(r, j)[i] = r[(i - j) mod 2p]``), and
    ``t[..., unrolled]`` takes column ``j * 2p + (i + j) mod 2p`` to column ``j * 2p + i``: the
    inverse of each roll, what the backward of the rolled factor gathers with."""
    i = torch.arange(two_p, device=device)
    rolled = torch.cat([(i - j) % two_p for j in (1, 2, 3)])
    unrolled = torch.cat([(j - 1) * two_p + (i + j) % two_p for j in (1, 2, 3)])
    return rolled, unrolled


def features(u: Tensor, normalize: bool):
    """DPFP (nu = 3) of ``u [..., p]``: ``(f [..., 6p], r [..., 2p], norm [..., 1] or None)``, ``f``
    L2-normalised when ``normalize`` (``r`` and ``norm`` are what the backward needs)."""
    r = torch.cat([F.relu(u), F.relu(-u)], dim=-1)
    rolled, _ = _roll_index(r.shape[-1], r.device)
    f = r.repeat(*([1] * (r.dim() - 1)), 3).mul_(r.index_select(-1, rolled))
    if not normalize:
        return f, r, None
    norm = torch.linalg.vector_norm(f, dim=-1, keepdim=True).clamp_min_(NORM_EPS)
    return f.div_(norm), r, norm


def features_bwd(df: Tensor, f: Tensor, r: Tensor, norm: Optional[Tensor], u: Tensor) -> Tensor:
    """Gradient of :func:`features` with respect to ``u``, given ``df`` on its (normalised) output
    (``df`` may be overwritten)."""
    if norm is not None:
        # f = g / max(|g|, eps): dg = (df - f (f . df)) / |g| where |g| > eps, df / eps elsewhere.
        proj = (f * df).sum(-1, keepdim=True).masked_fill_(norm <= NORM_EPS, 0.0)
        df = df.sub_(f * proj).div_(norm)
    two_p = r.shape[-1]
    rolled, unrolled = _roll_index(two_p, r.device)
    lead = r.shape[:-1]
    # g_j[i] = r[i] * r[(i - j) mod 2p]: the first factor's gradient is df_j * roll(r, j), the
    # rolled factor's is df_j * r taken back through the inverse roll.
    first = df * r.index_select(-1, rolled)
    second = (df * r.repeat(*([1] * (r.dim() - 1)), 3)).index_select(-1, unrolled)
    dr = (first + second).view(*lead, 3, two_p).sum(-2)
    p = two_p // 2
    return dr[..., :p] * (u > 0) - dr[..., p:] * (u < 0)


# --------------------------------------------------------------------------- read


def _scaled_features(q: Tensor, z: Tensor, n_heads: int, normalize: bool, use_denom: bool):
    """``(f, r, norm, u, inv_den)``: the features of ``q``, and ``1 / (f z + eps)`` (None without the
    denominator)."""
    u = _heads(q, n_heads, z.dtype)
    f, r, norm = features(u, normalize)
    inv_den = torch.matmul(f, z.unsqueeze(-1)).add_(EPS).reciprocal_() if use_denom else None
    return f, r, norm, u, inv_den


def read_fwd_torch(x: Tensor, q: Tensor, A: Tensor, z: Tensor, n_heads: int, normalize: bool,
                   use_denom: bool) -> Tensor:
    """``y = x + (f A) / (f z + eps)`` per head, ``f = phi(q)``: the division scales the ``K``-wide
    features, not the ``d``-wide product, and the residual add is fused into the product when the
    dtypes and the layout allow (one head, ``x`` in the state's dtype)."""
    f, _, _, _, inv_den = _scaled_features(q, z, n_heads, normalize, use_denom)
    fs = f if inv_den is None else f.mul_(inv_den)
    if n_heads == 1 and x.dtype == A.dtype:
        return torch.baddbmm(x, fs.squeeze(1), A.squeeze(1))
    return (x + _merge(torch.matmul(fs, A), x.dtype)).contiguous()


def read_bwd_torch(dy: Tensor, q: Tensor, A: Tensor, z: Tensor, n_heads: int, normalize: bool,
                   use_denom: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dq, dA, dz)`` of :func:`read_fwd_torch` given ``dy`` (``dx`` is ``dy`` itself).

    Two products of the ``d``-wide gradient (``dy A^T`` and ``f^T dy``) and nothing else ``d``-wide:
    ``dy . read = (dy A^T) . f / den`` gives the denominator's gradient from the first product."""
    f, r, norm, u, inv_den = _scaled_features(q, z, n_heads, normalize, use_denom)
    g = _heads(dy, n_heads, A.dtype)  # [B, H, N, dv]
    gA = torch.matmul(g, A.transpose(-1, -2))  # [B, H, N, K]
    if use_denom:
        fs = f * inv_den
        dA = torch.matmul(fs.transpose(-1, -2), g)
        dden = (gA * fs).sum(-1, keepdim=True).mul_(inv_den).neg_()  # -(dy . read) / den
        dz = torch.matmul(f.transpose(-1, -2), dden).squeeze(-1)
        df = gA.mul_(inv_den).add_(dden * z.unsqueeze(-2))
    else:
        dA = torch.matmul(f.transpose(-1, -2), g)
        dz = torch.zeros_like(z)
        df = gA
    du = features_bwd(df, f, r, norm, u)
    return _merge(du, q.dtype), dA.contiguous(), dz.contiguous()


# --------------------------------------------------------------------------- write


def _write_terms(k, v, b, A, z, n_heads, normalize, use_denom, correction):
    sdt = accum_dtype(k.dtype)  # the state: float32, float64 for float64
    u = _heads(k, n_heads, sdt)
    f, r, norm = features(u, normalize)  # [B, H, M, K]
    vv = _heads(v, n_heads, sdt)  # [B, H, M, dv]
    beta = torch.sigmoid(_heads(b, n_heads, sdt))  # [B, H, M, 1 or dv]
    gamma = den = None
    if A is None:
        vbar = torch.zeros_like(vv)
    else:
        vbar = torch.matmul(f, A)
        if use_denom:
            den = torch.matmul(f, z.unsqueeze(-1)) + EPS  # [B, H, M, 1]
            vbar = vbar / den
            if correction:
                norm2 = (f * f).sum(-1, keepdim=True) + (0.0 if normalize else EPS)
                gamma = torch.clamp(1 - den / norm2, 0, 1)
    return u, f, r, norm, vv, beta, vbar, den, gamma


def write_fwd_torch(k: Tensor, v: Tensor, b: Tensor, A: Optional[Tensor], z: Optional[Tensor], n_heads: int,
                    normalize: bool, use_denom: bool, correction: bool) -> Tuple[Tensor, Tensor]:
    """``A + f^T (beta (v - vbar))`` and ``z + sum_i gamma_i f_i`` (new tensors; the old state is
    not modified)."""
    _, f, _, _, vv, beta, vbar, _, gamma = _write_terms(k, v, b, A, z, n_heads, normalize, use_denom, correction)
    ft = f.transpose(-1, -2)
    upd = torch.matmul(ft, beta * (vv - vbar))
    zu = f.sum(-2) if gamma is None else torch.matmul(ft, gamma).squeeze(-1)
    if A is None:
        return upd.contiguous(), zu.contiguous()
    return (A + upd).contiguous(), (z + zu).contiguous()


def write_bwd_torch(dA_new: Optional[Tensor], dz_new: Optional[Tensor], k: Tensor, v: Tensor, b: Tensor,
                    A: Optional[Tensor], z: Optional[Tensor], n_heads: int, normalize: bool, use_denom: bool,
                    correction: bool):
    """``(dk, dv, db, dA, dz)`` of :func:`write_fwd_torch` (``dA``/``dz`` None before the first
    segment); ``dA_new``/``dz_new`` None count as zero. ``gamma`` is detached."""
    u, f, r, norm, vv, beta, vbar, den, gamma = _write_terms(k, v, b, A, z, n_heads, normalize, use_denom,
                                                             correction)
    bsz, h, m, kdim = f.shape
    dv_ = vv.shape[-1]
    if dA_new is None:
        dA_new = f.new_zeros((bsz, h, kdim, dv_))
    diff = vv - vbar
    ddelta = torch.matmul(f, dA_new)  # [B, H, M, dv]
    dvv = beta * ddelta
    dbeta = ddelta * diff
    if beta.shape[-1] == 1:
        dbeta = dbeta.sum(-1, keepdim=True)
    db = dbeta * beta * (1 - beta)
    df = torch.matmul(beta * diff, dA_new.transpose(-1, -2))
    if dz_new is not None:
        df = df + (dz_new.unsqueeze(-2) if gamma is None else gamma * dz_new.unsqueeze(-2))
    dA = dz = None
    if A is not None:
        dvbar = -dvv
        if use_denom:
            dnum = dvbar / den
            dden = -(dnum * vbar).sum(-1, keepdim=True)
            dz = torch.matmul(f.transpose(-1, -2), dden).squeeze(-1)
            df = df + dden * z.unsqueeze(-2)
        else:
            dnum = dvbar
            dz = torch.zeros_like(z)
        dA = (dA_new + torch.matmul(f.transpose(-1, -2), dnum)).contiguous()
        df = df + torch.matmul(dnum, A.transpose(-1, -2))
        if dz_new is not None:
            dz = dz + dz_new
        dz = dz.contiguous()
    du = features_bwd(df, f, r, norm, u)
    return (_merge(du, k.dtype), _merge(dvv, v.dtype), _merge(db, b.dtype), dA, dz)
