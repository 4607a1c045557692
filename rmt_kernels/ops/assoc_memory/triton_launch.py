"""Launchers of the Triton kernels of ARMT's associative memory (``triton_fwd.py``, ``triton_bwd.py``).

Same contract as ``torch_impl`` (signatures, return conventions, dtypes): validated inputs (any
strides: they are passed to the kernels), outputs allocated here through :func:`_empty` (``y`` in x's
dtype, ``dq``/``dk``/``dv``/``db`` in their input's dtype, the state and its gradients float32,
contiguous), no autograd. Importing this module does not import triton: the kernel modules are
imported on the first launch, so ``import rmt_kernels`` works without triton and without a GPU.

Every launch runs under the tensors' device (:func:`_device_guard`); the grids put ``B * H`` on axis x
(up to 2^31 - 1) and row / value / feature-piece blocks on axes y and z.

The meta-parameters come from :func:`read_fwd_config`, :func:`read_bwd_dq_config`,
:func:`read_bwd_da_config`, :func:`write_fwd_config`, :func:`write_bwd_rows_config`,
:func:`write_bwd_dk_config` and :func:`write_bwd_state_config`, which ``aot.py`` reads too:
``rmt-kernels aot`` compiles the tiles the launches use.

Precision (:func:`dot_precision`, which ``aot.py`` compiles per dtype): the kernels' float32 products
run on tensor cores with ``input_precision`` ``"tf32"`` for 16-bit inputs (fp16/bf16 models, float32
state: a 10-bit mantissa, finer than the model's own 16-bit rounding of the result), and for float32
inputs ``"tf32x3"`` (float32-accurate) when ``torch.get_float32_matmul_precision()`` is
``"highest"``, ``"tf32"`` otherwise. Never the scalar ``"ieee"`` path on the GPU (the interpreter
ignores ``input_precision``).
"""

from __future__ import annotations

from typing import Optional

import torch

from .._alloc import GRID_YZ_MAX, accum_dtype
from .._alloc import device_guard as _device_guard

_NUM_WARPS = 8
# Lanes of a feature chunk, the K of the products over the feature width (operand tiles are
# [rows, BLOCK_K], never 2p wide).
_BLOCK_K = 32
# Elements of one [BLOCK_M, TWO_P] float32 tile of the row kernels that keep full-width pieces live
# over their value loop (the accumulator G_j and the feature backward's sums): 4096 is 16 registers a
# thread at 8 warps, and the dq / dk kernels keep about five of them.
_ROW_TILE = 2048
# Lanes of a feature piece the dq / dk kernels accumulate at a time (BLOCK_F): the whole piece up to
# p = 64, halves of it at p = 128 ([16, 256] tiles spill there).
_PIECE_LANES = 128
# Elements of the [TWO_P, BLOCK_DV] float32 state accumulator of the per-piece kernels.
_STATE_TILE = 8192


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def two_p(p: int) -> int:
    """Lanes of a feature piece: ``2p`` rounded up to a power of two, at least 16 (``tl.dot``)."""
    return max(16, _next_pow2(2 * p))


def _block_k(p: int) -> int:
    return min(_BLOCK_K, two_p(p))


def _block_dv(dv: int, cap: int) -> int:
    return max(16, min(_next_pow2(max(dv, 1)), cap))


def _block_f(p: int) -> int:
    """Lanes of a piece per lane block of the dq / dk kernels: the piece, or halves of it when it is
    wider than :data:`_PIECE_LANES` and ``2p`` is a power of two (``triton_common._fold``)."""
    tp = two_p(p)
    return tp // 2 if tp > _PIECE_LANES and tp == 2 * p else tp


def _row_block(m: int, cap: int) -> int:
    return max(16, min(_next_pow2(max(m, 1)), cap))


def read_fwd_config(p: int, dv: int) -> dict:
    """``_assoc_read_fwd_kernel`` for head key dim ``p`` (``d_mem / H``) and value dim ``dv``: a
    ``[128, BLOCK_DV]`` accumulator, ``[128, 16]`` feature chunks (two warpgroups on sm_90; 32-lane
    chunks spill on sm_80 with float32 inputs and ``"tf32x3"`` products)."""
    return {"BLOCK_M": 128, "BLOCK_DV": _block_dv(dv, 64), "BLOCK_K": 16, "num_warps": _NUM_WARPS}


def read_bwd_dq_config(p: int, dv: int) -> dict:
    """``_assoc_read_bwd_dq_kernel``: about four ``[BLOCK_M, 2p]`` tiles live over the value loop; at
    ``p = 16`` 32 rows (64 spill with ``"tf32x3"`` on sm_80), ``[2p, 16]`` state tiles at ``p = 32``
    (ptxas caps the common specialisation at 128 registers and spills with 32) and at ``p = 128``, and there
    the pieces in lane halves (``BLOCK_F``, :func:`_block_f`)."""
    tp = two_p(p)
    bm = max(16, min(64, _ROW_TILE // tp))
    if tp == 32:
        bm = 32
    return {"BLOCK_M": bm, "BLOCK_DV": _block_dv(dv, 16 if tp >= 256 or tp == 64 else 32),
            "BLOCK_K": _block_k(p), "BLOCK_F": _block_f(p), "num_warps": _NUM_WARPS}


def read_bwd_da_config(p: int, dv: int) -> dict:
    """``_assoc_read_bwd_da_kernel``: one ``[2p, BLOCK_DV]`` accumulator, rows streamed."""
    tp = two_p(p)
    return {"BLOCK_M": 32 if tp <= 64 else 16, "BLOCK_DV": _block_dv(dv, max(16, min(128, _STATE_TILE // tp))),
            "num_warps": _NUM_WARPS}


def write_fwd_config(p: int, dv: int, m: int) -> dict:
    """``_assoc_write_fwd_kernel`` for ``m`` memory rows: a ``[2p, BLOCK_DV]`` accumulator; 16-row
    blocks from ``p = 64`` (the ``[BLOCK_M, 2p]`` feature piece), 32 value columns at ``p = 8``
    (64 spill in float32 on sm_90)."""
    tp = two_p(p)
    return {"BLOCK_M": _row_block(m, 16 if tp >= 128 else 32),
            "BLOCK_DV": _block_dv(dv, max(16, min(32 if tp <= 16 else 64, _STATE_TILE // tp))),
            "BLOCK_K": _block_k(p), "num_warps": _NUM_WARPS}


def write_bwd_rows_config(p: int, dv: int, m: int) -> dict:
    """``_assoc_write_bwd_rows_kernel``: two ``[BLOCK_M, BLOCK_DV]`` accumulators, feature chunks."""
    return {"BLOCK_M": _row_block(m, 32), "BLOCK_DV": _block_dv(dv, 32), "BLOCK_K": 16,
            "num_warps": _NUM_WARPS}


def write_bwd_dk_config(p: int, dv: int, m: int) -> dict:
    """``_assoc_write_bwd_dk_kernel``: about three ``[BLOCK_M, 2p]`` tiles live over the value loop;
    ``[2p, 16]`` state tiles except at ``p = 8`` (32 at ``p = 32`` spill in the common specialisation); at
    ``p = 128`` the pieces in lane halves (``BLOCK_F``, :func:`_block_f`)."""
    tp = two_p(p)
    return {"BLOCK_M": _row_block(m, max(16, min(32 if tp == 32 else 64, _ROW_TILE // tp))),
            "BLOCK_DV": _block_dv(dv, 32 if tp == 16 else 16), "BLOCK_F": _block_f(p),
            "num_warps": _NUM_WARPS}


def write_bwd_state_config(p: int, dv: int, m: int) -> dict:
    """``_assoc_write_bwd_state_kernel``: one ``[2p, BLOCK_DV]`` accumulator, rows streamed."""
    tp = two_p(p)
    return {"BLOCK_M": _row_block(m, 32 if tp <= 64 else 16),
            "BLOCK_DV": _block_dv(dv, max(16, min(64, _STATE_TILE // tp))), "num_warps": _NUM_WARPS}


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the float32 products for inputs of ``dtype`` (what ``aot.py`` compiles):
    ``"tf32"`` for 16-bit inputs (a 10-bit mantissa, finer than the model's own 16-bit rounding of the
    result); for float32 (and float64) inputs ``"tf32x3"`` (float32-accurate on tensor cores) when
    torch's float32 matmul precision is ``"highest"``, else ``"tf32"``. Never ``"ieee"`` (scalar FMA
    loops on the GPU)."""
    if dtype in (torch.float16, torch.bfloat16):
        return "tf32"
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _kernels():
    """The kernel modules, imported on first use (they import triton)."""
    from . import triton_bwd, triton_fwd

    return triton_fwd, triton_bwd


def _empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Every output buffer a kernel fills completely (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _state_view(s: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A ``[B, H, K, dv]`` state the kernels read with int32 offsets inside one head's matrix
    (``triton_common._state_chunk``): ``s`` itself when they fit (always for real states), else a
    contiguous copy."""
    if s is None or (s.shape[-2] - 1) * s.stride(-2) + (s.shape[-1] - 1) * s.stride(-1) < 2 ** 31:
        return s
    if s.shape[-2] * s.shape[-1] >= 2 ** 31:
        raise ValueError(f"a state matrix of {s.shape[-2]} x {s.shape[-1]} elements per head exceeds 2^31")
    return s.contiguous()


def _launch(kernel, grid, args, meta: dict, device_tensor: torch.Tensor) -> None:
    if any(g == 0 for g in grid):
        return
    if grid[1] > GRID_YZ_MAX or grid[2] > GRID_YZ_MAX:
        raise ValueError(f"{kernel.__name__}: grid {grid} exceeds CUDA's limit on axes y/z ({GRID_YZ_MAX})")
    with _device_guard(device_tensor):
        kernel[grid](*args, **meta)


def _dims(q: torch.Tensor, x: torch.Tensor, n_heads: int):
    """``(B, rows, H, p, dv)``."""
    bsz, n, d_mem = q.shape
    return bsz, n, n_heads, d_mem // n_heads, x.shape[2] // n_heads


def _meta(cfg: dict, p: int, dtype: torch.dtype, **flags) -> dict:
    meta = dict(cfg, P=p, TWO_P=two_p(p), DOT_PREC=dot_precision(dtype), **flags)
    meta["num_stages"] = 1
    return meta


# --------------------------------------------------------------------------- read


def read_fwd_triton(x, q, A, z, n_heads: int, normalize: bool, use_denom: bool):
    """``y = x + (phi(q) A) / (phi(q) z + eps)`` per head (``torch_impl.read_fwd_torch``)."""
    bsz, n, h, p, dv = _dims(q, x, n_heads)
    A = _state_view(A)
    y = _empty(x.shape, x.dtype, x.device)
    cfg = read_fwd_config(p, dv)
    grid = (bsz * h, _cdiv(n, cfg["BLOCK_M"]), _cdiv(dv, cfg["BLOCK_DV"]))
    args = (y, x, q, A, z, n, dv, h, *y.stride(), *x.stride(), *q.stride(), *A.stride(), *z.stride())
    _launch(_kernels()[0]._assoc_read_fwd_kernel, grid, args,
            _meta(cfg, p, x.dtype, NORMALIZE=bool(normalize), USE_DENOM=bool(use_denom)), x)
    return y


def read_bwd_triton(dy, q, A, z, n_heads: int, normalize: bool, use_denom: bool):
    """``(dq, dA, dz)`` of :func:`read_fwd_triton` (``torch_impl.read_bwd_torch``; ``dz`` zeros when
    not ``use_denom``)."""
    bsz, n, h, p, dv = _dims(q, dy, n_heads)
    A = _state_view(A)
    sdt = A.dtype
    dq = _empty(q.shape, q.dtype, q.device)
    dA = _empty(A.shape, sdt, A.device)
    dz = _empty(z.shape, sdt, z.device) if use_denom else torch.zeros(z.shape, dtype=sdt, device=z.device)
    stat = torch.empty((3, bsz * h, n), dtype=torch.float32, device=q.device)  # den, d den, |phi|
    flags = dict(NORMALIZE=bool(normalize), USE_DENOM=bool(use_denom))
    kf = _kernels()[1]
    cfg = read_bwd_dq_config(p, dv)
    _launch(kf._assoc_read_bwd_dq_kernel, (bsz * h, _cdiv(n, cfg["BLOCK_M"]), 1),
            (dq, stat, dy, q, A, z, n, dv, h, *dq.stride(), *dy.stride(), *q.stride(), *A.stride(), *z.stride(),
             stat.stride(0)), _meta(cfg, p, q.dtype, **flags), q)
    cfg = read_bwd_da_config(p, dv)
    _launch(kf._assoc_read_bwd_da_kernel, (bsz * h, _cdiv(dv, cfg["BLOCK_DV"]), 3),
            (dA, dz, stat, dy, q, n, dv, h, *dA.stride(), *dz.stride(), *dy.stride(), *q.stride(), stat.stride(0)),
            _meta(cfg, p, q.dtype, **flags), q)
    return dq, dA, dz


# --------------------------------------------------------------------------- write


def _gating(b: torch.Tensor, n_heads: int) -> bool:
    """Per-channel beta (``[B, M, d]``) rather than per head (``[B, M, H]``); when ``d == H`` both
    readings are the same math (``dv = 1``)."""
    return b.shape[-1] != n_heads


def write_fwd_triton(k, v, b, A: Optional[torch.Tensor], z: Optional[torch.Tensor], n_heads: int, normalize: bool,
                     use_denom: bool, correction: bool):
    """The new ``(A, z)`` (``torch_impl.write_fwd_torch``); ``A``/``z`` None: a first segment."""
    bsz, m, h, p, dv = _dims(k, v, n_heads)
    sdt = accum_dtype(k.dtype)
    kdim = 6 * p
    A_new = _empty((bsz, h, kdim, dv), sdt, k.device)
    z_new = _empty((bsz, h, kdim), sdt, k.device)
    has_state = A is not None
    A = _state_view(A)
    a_t, z_t = (A, z) if has_state else (A_new, z_new)  # placeholders, never read without HAS_STATE
    cfg = write_fwd_config(p, dv, m)
    grid = (bsz * h, _cdiv(dv, cfg["BLOCK_DV"]), 3)
    args = (A_new, z_new, k, v, b, a_t, z_t, m, dv, h, *A_new.stride(), *z_new.stride(), *k.stride(), *v.stride(),
            *b.stride(), *a_t.stride(), *z_t.stride())
    flags = dict(HAS_STATE=has_state, NORMALIZE=bool(normalize), USE_DENOM=bool(use_denom),
                 CORRECTION=bool(correction), GATING=_gating(b, n_heads))
    _launch(_kernels()[0]._assoc_write_fwd_kernel, grid, args, _meta(cfg, p, k.dtype, **flags), k)
    return A_new, z_new


def write_bwd_triton(dA_new, dz_new, k, v, b, A, z, n_heads: int, normalize: bool, use_denom: bool,
                     correction: bool):
    """``(dk, dv, db, dA, dz)`` of :func:`write_fwd_triton` (``torch_impl.write_bwd_torch``): ``dA_new``/
    ``dz_new`` None count as zero; ``dA``/``dz`` None for a first segment."""
    bsz, m, h, p, dv = _dims(k, v, n_heads)
    sdt = accum_dtype(k.dtype)
    kdim = 6 * p
    if dA_new is None:
        dA_new = torch.zeros((bsz, h, kdim, dv), dtype=sdt, device=k.device)
    if dz_new is None:
        dz_new = torch.zeros((bsz, h, kdim), dtype=sdt, device=k.device)
    A, dA_new = _state_view(A), _state_view(dA_new)
    dk = _empty(k.shape, k.dtype, k.device)
    dvv = _empty(v.shape, v.dtype, v.device)
    db = _empty(b.shape, b.dtype, b.device)
    has_state = A is not None
    stat = torch.empty((4, bsz * h, m), dtype=torch.float32, device=k.device)  # den, d den, gamma, |phi|
    # w = beta (v - vbar) and dnum = -beta (phi dA') / den per memory row and value column.
    scr = torch.empty((2, bsz * h, m, dv), dtype=torch.float32, device=k.device)
    a_t, z_t = (A, z) if has_state else (dA_new, dz_new)  # placeholders, never read without HAS_STATE
    flags = dict(NORMALIZE=bool(normalize), USE_DENOM=bool(use_denom))
    kb = _kernels()[1]
    cfg = write_bwd_rows_config(p, dv, m)
    _launch(kb._assoc_write_bwd_rows_kernel, (bsz * h, _cdiv(m, cfg["BLOCK_M"]), 1),
            (dvv, db, stat, scr, dA_new, k, v, b, a_t, z_t, m, dv, h, *dvv.stride(), *db.stride(),
             *dA_new.stride(), *k.stride(), *v.stride(), *b.stride(), *a_t.stride(), *z_t.stride(), stat.stride(0),
             scr.stride(0)),
            _meta(cfg, p, k.dtype, HAS_STATE=has_state, CORRECTION=bool(correction), GATING=_gating(b, n_heads),
                  **flags), k)
    cfg = write_bwd_dk_config(p, dv, m)
    _launch(kb._assoc_write_bwd_dk_kernel, (bsz * h, _cdiv(m, cfg["BLOCK_M"]), 1),
            (dk, stat, scr, dA_new, dz_new, k, a_t, z_t, m, dv, h, *dk.stride(), *dA_new.stride(),
             *dz_new.stride(), *k.stride(), *a_t.stride(), *z_t.stride(), stat.stride(0), scr.stride(0)),
            _meta(cfg, p, k.dtype, HAS_STATE=has_state, **flags), k)
    if not has_state:
        return dk, dvv, db, None, None
    dA = _empty(A.shape, sdt, k.device)
    dz = _empty(z.shape, sdt, k.device)
    cfg = write_bwd_state_config(p, dv, m)
    _launch(kb._assoc_write_bwd_state_kernel, (bsz * h, _cdiv(dv, cfg["BLOCK_DV"]), 3),
            (dA, dz, stat, scr, dA_new, dz_new, k, m, dv, h, *dA.stride(), *dz.stride(), *dA_new.stride(),
             *dz_new.stride(), *k.stride(), stat.stride(0), scr.stride(0)),
            _meta(cfg, p, k.dtype, **flags), k)
    return dk, dvv, db, dA, dz
