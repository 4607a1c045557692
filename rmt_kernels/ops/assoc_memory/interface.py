"""Public ``assoc_read`` / ``assoc_write`` (ARMT's associative memory, SPEC §6): validation, backend
choice, and the custom ops autograd goes through.

Custom ops (``torch.library``, with fakes, so ``torch.compile(fullgraph=True)`` traces them):

- ``rmt_kernels::assoc_read_fwd`` -> ``y = x + read``; ``rmt_kernels::assoc_read_bwd`` -> ``(dq, dA,
  dz)`` (``dx`` is ``dy`` itself: no kernel);
- ``rmt_kernels::assoc_write_fwd`` -> the new ``(A, z)``; ``rmt_kernels::assoc_write_bwd`` ->
  ``(dk, dv, db, dA, dz)`` (empty ``dA``/``dz`` for a first segment, which has no old state).

Autograd is registered once per op for every backend. The read saves ``q``, ``A`` and ``z`` (the
feature map is recomputed from ``q``, never stored); the write saves its inputs. Eager calls run the
launchers through ``torch.autograd.Function`` s without the custom-op machinery (``_Read``,
``_Write``, built by ``ops/_function.py``); under ``torch.compile`` the custom ops are what the graph
holds.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ... import _checks, backends
from .. import _function
from .._alloc import accum_dtype
from . import torch_impl, triton_launch

OP_READ = "assoc_read"
OP_WRITE = "assoc_write"

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TORCH_DEVICES = ("cpu", "cuda", "mps", "xpu")

# Both ops on both backends; the Triton launchers import triton on their first launch only. There is
# no CUDA-C++ backend: these kernels are memory- and launch-bound tile code that Triton covers.
READ_TABLE = backends.register_op(OP_READ, {
    "torch": backends.BackendImpl(
        fwd=torch_impl.read_fwd_torch, bwd=torch_impl.read_bwd_torch,
        dtypes=_KERNEL_DTYPES + (torch.float64,), devices=_TORCH_DEVICES),
    "triton": backends.BackendImpl(
        fwd=triton_launch.read_fwd_triton, bwd=triton_launch.read_bwd_triton,
        dtypes=_KERNEL_DTYPES, status=backends.triton_status),
})
WRITE_TABLE = backends.register_op(OP_WRITE, {
    "torch": backends.BackendImpl(
        fwd=torch_impl.write_fwd_torch, bwd=torch_impl.write_bwd_torch,
        dtypes=_KERNEL_DTYPES + (torch.float64,), devices=_TORCH_DEVICES),
    "triton": backends.BackendImpl(
        fwd=triton_launch.write_fwd_triton, bwd=triton_launch.write_bwd_triton,
        dtypes=_KERNEL_DTYPES, status=backends.triton_status),
})


def _state_shapes(batch: int, n_heads: int, d_mem: int, dim: int):
    key = 6 * d_mem // n_heads
    return (batch, n_heads, key, dim // n_heads), (batch, n_heads, key)


# --------------------------------------------------------------------------- custom ops: read


@torch.library.custom_op("rmt_kernels::assoc_read_fwd", mutates_args=())
def assoc_read_fwd_op(x: Tensor, q: Tensor, A: Tensor, z: Tensor, n_heads: int, normalize: bool,
                      use_denom: bool, backend: str) -> Tensor:
    return READ_TABLE[backend].fwd(x, q, A, z, n_heads, normalize, use_denom)


@assoc_read_fwd_op.register_fake
def _(x, q, A, z, n_heads, normalize, use_denom, backend):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("rmt_kernels::assoc_read_bwd", mutates_args=())
def assoc_read_bwd_op(dy: Tensor, q: Tensor, A: Tensor, z: Tensor, n_heads: int, normalize: bool,
                      use_denom: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    return READ_TABLE[backend].bwd(dy, q, A, z, n_heads, normalize, use_denom)


@assoc_read_bwd_op.register_fake
def _(dy, q, A, z, n_heads, normalize, use_denom, backend):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty_like(A, memory_format=torch.contiguous_format),
            torch.empty_like(z, memory_format=torch.contiguous_format))


class _ReadCtx(NamedTuple):
    n_heads: int
    normalize: bool
    use_denom: bool
    backend: str


def _read_fwd(x, q, A, z, n_heads, normalize, use_denom, backend):
    return READ_TABLE[backend].fwd(x, q, A, z, n_heads, normalize, use_denom)


def _read_setup(ctx, inputs, output):
    x, q, A, z, n_heads, normalize, use_denom, backend = inputs
    ctx.cfg = _ReadCtx(n_heads, normalize, use_denom, backend)
    ctx.save_for_backward(q, A, z)


def _read_backward(ctx, dy):
    q, A, z = ctx.saved_tensors
    cfg = ctx.cfg
    need = ctx.needs_input_grad
    dq = dA = dz = None
    if need[1] or need[2] or need[3]:
        args = (dy, q, A, z, cfg.n_heads, cfg.normalize, cfg.use_denom)
        with _no_autocast(q.device):
            if _checks._is_compiling():
                dq, dA, dz = assoc_read_bwd_op(*args, cfg.backend)
            else:
                dq, dA, dz = READ_TABLE[cfg.backend].bwd(*args)
    return (dy if need[0] else None, dq if need[1] else None, dA if need[2] else None,
            dz if need[3] and cfg.use_denom else None, None, None, None, None)


torch.library.register_autograd("rmt_kernels::assoc_read_fwd", _read_backward, setup_context=_read_setup)


# Eager autograd (ops/_function.py): the custom op's setup and backward on a direct launch.
_Read = _function.eager_functions("_Read", _read_fwd, _read_setup, _read_backward)


# --------------------------------------------------------------------------- custom ops: write


@torch.library.custom_op("rmt_kernels::assoc_write_fwd", mutates_args=())
def assoc_write_fwd_op(k: Tensor, v: Tensor, b: Tensor, A: Optional[Tensor], z: Optional[Tensor], n_heads: int,
                       normalize: bool, use_denom: bool, correction: bool, backend: str) -> Tuple[Tensor, Tensor]:
    return WRITE_TABLE[backend].fwd(k, v, b, A, z, n_heads, normalize, use_denom, correction)


@assoc_write_fwd_op.register_fake
def _(k, v, b, A, z, n_heads, normalize, use_denom, correction, backend):
    sa, sz = _state_shapes(k.shape[0], n_heads, k.shape[2], v.shape[2])
    sdt = accum_dtype(k.dtype)
    return torch.empty(sa, dtype=sdt, device=k.device), torch.empty(sz, dtype=sdt, device=k.device)


@torch.library.custom_op("rmt_kernels::assoc_write_bwd", mutates_args=())
def assoc_write_bwd_op(dA_new: Optional[Tensor], dz_new: Optional[Tensor], k: Tensor, v: Tensor, b: Tensor,
                       A: Optional[Tensor], z: Optional[Tensor], n_heads: int, normalize: bool, use_denom: bool,
                       correction: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dk, dv, db, dA, dz = WRITE_TABLE[backend].bwd(dA_new, dz_new, k, v, b, A, z, n_heads, normalize, use_denom,
                                                  correction)
    if dA is None:  # a first segment: no old state (custom ops return tensors, never None)
        dA, dz = k.new_empty((0,)), k.new_empty((0,))
    return dk, dv, db, dA, dz


@assoc_write_bwd_op.register_fake
def _(dA_new, dz_new, k, v, b, A, z, n_heads, normalize, use_denom, correction, backend):
    def like(t):
        return torch.empty(t.shape, dtype=t.dtype, device=t.device)

    if A is None:
        return like(k), like(v), like(b), k.new_empty((0,)), k.new_empty((0,))
    return like(k), like(v), like(b), like(A), like(z)


class _WriteCtx(NamedTuple):
    n_heads: int
    normalize: bool
    use_denom: bool
    correction: bool
    backend: str
    first: bool


def _write_fwd(k, v, b, A, z, n_heads, normalize, use_denom, correction, backend):
    return WRITE_TABLE[backend].fwd(k, v, b, A, z, n_heads, normalize, use_denom, correction)


def _write_setup(ctx, inputs, output):
    k, v, b, A, z, n_heads, normalize, use_denom, correction, backend = inputs
    ctx.cfg = _WriteCtx(n_heads, normalize, use_denom, correction, backend, A is None)
    ctx.save_for_backward(k, v, b, A, z)


def _write_backward(ctx, dA_new, dz_new):
    k, v, b, A, z = ctx.saved_tensors
    cfg = ctx.cfg
    need = ctx.needs_input_grad
    if not any(need[:5]):
        return (None,) * 10
    args = (dA_new, dz_new, k, v, b, A, z, cfg.n_heads, cfg.normalize, cfg.use_denom, cfg.correction)
    with _no_autocast(k.device):
        if _checks._is_compiling():
            dk, dv, db, dA, dz = assoc_write_bwd_op(*args, cfg.backend)
            if cfg.first:
                dA = dz = None
        else:
            dk, dv, db, dA, dz = WRITE_TABLE[cfg.backend].bwd(*args)
    grads = (dk, dv, db, dA, dz)
    return tuple(g if n else None for g, n in zip(grads, need[:5])) + (None,) * 5


torch.library.register_autograd("rmt_kernels::assoc_write_fwd", _write_backward, setup_context=_write_setup)


# Eager autograd (ops/_function.py): the custom op's setup and backward on a direct launch.
_Write = _function.eager_functions("_Write", _write_fwd, _write_setup, _write_backward)


# --------------------------------------------------------------------------- public


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend of both ops for ``dtype`` tensors on ``device`` (what the ``*_validated``
    entries take). Raises as the public functions."""
    name = backends.resolve_backend(OP_READ, backend, device, dtype)
    _checks.check_backend_dtype(OP_READ, name, dtype, READ_TABLE[name].dtypes)
    return name


def _autocast_on(device: torch.device) -> bool:
    try:
        return torch.is_autocast_enabled(device.type)
    except TypeError:  # pragma: no cover - torch < 2.4 takes no device type
        return device.type == "cuda" and torch.is_autocast_enabled()


def _common_dtype(*tensors) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _read_under_autocast(x, q):
    """Under ``torch.autocast`` the query projection arrives in the autocast dtype while the residual
    ``x`` may not: ``q`` is cast to ``x``'s dtype (the read returns ``x``'s dtype either way)."""
    if isinstance(x, Tensor) and isinstance(q, Tensor) and _autocast_on(x.device) and q.dtype != x.dtype \
            and q.dtype.is_floating_point and x.dtype.is_floating_point:
        q = q.to(x.dtype)
    return q


def _write_under_autocast(k, v, b):
    """Under ``torch.autocast``, ``k``, ``v`` and ``b`` are cast to their common (widest) dtype."""
    ts = (k, v, b)
    if all(isinstance(t, Tensor) and t.dtype.is_floating_point for t in ts) and _autocast_on(k.device):
        dtype = _common_dtype(*ts)
        return tuple(t.to(dtype) for t in ts)
    return ts


def _no_autocast(device: torch.device):
    """The op's own arithmetic, whatever autocast region the caller is in: the state stays float32."""
    return torch.autocast(device.type, enabled=False) if _autocast_on(device) else contextlib.nullcontext()


def _state_dtype_of(t) -> Optional[torch.dtype]:
    """The associative state's dtype for a model whose activations are ``t`` (None for a non-tensor:
    the checks then reject ``t`` itself)."""
    return accum_dtype(t.dtype) if isinstance(t, Tensor) else None


def _needs_graph(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def assoc_read(
    x: Tensor, q: Tensor, A: Tensor, z: Tensor, *, n_heads: int = 1, normalize: bool = True,
    use_denom: bool = True, backend: str = "auto",
) -> Tensor:
    """ARMT's associative read: ``x + (phi(q)^T A) / (phi(q)^T z + 1e-5)`` per head, one fused pass.

    ``phi`` is DPFP (nu = 3), L2-normalised per head when ``normalize`` (the official ``experimental``
    branch; ``framework_accel`` does not normalise); the feature map never reaches memory.

    Args:
        x: ``[B, N, d]`` the layer's input (the residual the read is added to), float16/bfloat16/
            float32 (float64 on the torch backend).
        q: ``[B, N, d_mem]`` the query projection ``W_q x`` (a stock GEMM, x's dtype).
        A: ``[B, H, 6 d_mem / H, d / H]`` the associative matrix, float32 (float64 for a float64
            model).
        z: ``[B, H, 6 d_mem / H]`` the normaliser, A's dtype (unused when not ``use_denom``).
        n_heads: H, dividing ``d_mem`` and ``d``.
        normalize, use_denom: the variant (see above); without the denominator the read is
            ``phi(q)^T A``.
        backend: ``"auto"`` (default), ``"torch"`` or ``"triton"``.

    Returns:
        ``[B, N, d]`` in x's dtype. Backward: ``x`` gets the output's gradient unchanged; ``q``, ``A``
        and ``z`` their gradients (full BPTT through the state).

    Raises:
        TypeError / ValueError: wrong types, shapes, dtypes or devices (the argument is named).
        BackendUnavailableError: the requested backend cannot run here.

    Example::

        >>> x, q = torch.randn(2, 10, 32), torch.randn(2, 10, 8)
        >>> A, z = torch.zeros(2, 1, 48, 32), torch.zeros(2, 1, 48)
        >>> assoc_read(x, q, A, z).shape
        torch.Size([2, 10, 32])
    """
    q = _read_under_autocast(x, q)
    heads = _checks.check_assoc_read(x, q, A, z, n_heads, _state_dtype_of(x))
    _checks.check_flags(normalize=normalize, use_denom=use_denom)
    name = resolve_backend(backend, x.device, x.dtype)
    return assoc_read_validated(x, q, A, z, heads, normalize, use_denom, name)


def assoc_read_validated(x, q, A, z, n_heads: int, normalize: bool, use_denom: bool, backend: str) -> Tensor:
    """:func:`assoc_read` for checked arguments and a resolved backend (a caller that checks once per
    run calls this per layer and segment). Under ``torch.autocast`` ``q`` is cast to ``x``'s dtype and
    the op runs with autocast off."""
    q = _read_under_autocast(x, q)
    with _no_autocast(x.device):
        if _checks._is_compiling():
            return assoc_read_fwd_op(x, q, A, z, n_heads, normalize, use_denom, backend)
        if _needs_graph(x, q, A, z):
            return _function.apply(_Read, x, q, A, z, n_heads, normalize, use_denom, backend)
        return _read_fwd(x, q, A, z, n_heads, normalize, use_denom, backend)


def assoc_write(
    k: Tensor, v: Tensor, b: Tensor, A: Optional[Tensor] = None, z: Optional[Tensor] = None, *,
    n_heads: int = 1, normalize: bool = True, use_denom: bool = True, correction: bool = True,
    gating: bool = False, backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """ARMT's delta-rule write of the M memory rows into the associative state; returns the new
    ``(A, z)`` (the old tensors are not modified, so autograd reaches them).

    With ``f = phi(k)``, ``beta = sigmoid(b)``, ``vbar = (f A) / (f z + 1e-5)`` (0 when ``A`` is None,
    the first segment) and ``gamma = clip(1 - (f z + 1e-5) / |f|^2, 0, 1)`` (detached; ``|f|^2 +
    1e-5`` when not ``normalize``; 1 for a first segment or without ``correction``):
    ``A' = A + sum_i beta_i f_i (v_i - vbar_i)^T`` and ``z' = z + sum_i gamma_i f_i``. Every row uses
    the same old state (no scan within a segment).

    Args:
        k: ``[B, M, d_mem]`` the key projection ``W_k m`` of the memory rows.
        v: ``[B, M, d]`` the value projection ``W_v m``.
        b: ``[B, M, H]`` (``[B, M, d]`` with ``gating``) the gate logits ``W_b m + bias``; the sigmoid
            is fused.
        A, z: the old state (see :func:`assoc_read`), or both None before the first segment.
        n_heads, normalize, use_denom, correction, gating, backend: the variant and the backend.

    Returns:
        ``(A', z')``: ``[B, H, 6 d_mem / H, d / H]`` and ``[B, H, 6 d_mem / H]`` in float32 (float64
        for float64 inputs).

    Example::

        >>> k, v, b = torch.randn(2, 4, 8), torch.randn(2, 4, 32), torch.randn(2, 4, 1)
        >>> A, z = assoc_write(k, v, b)
        >>> A.shape, z.shape
        (torch.Size([2, 1, 48, 32]), torch.Size([2, 1, 48]))
    """
    k, v, b = _write_under_autocast(k, v, b)
    heads = _checks.check_assoc_write(k, v, b, A, z, n_heads, gating, _state_dtype_of(k))
    _checks.check_flags(normalize=normalize, use_denom=use_denom, correction=correction)
    name = resolve_backend(backend, k.device, k.dtype)
    return assoc_write_validated(k, v, b, A, z, heads, normalize, use_denom, correction, name)


def assoc_write_validated(k, v, b, A, z, n_heads: int, normalize: bool, use_denom: bool, correction: bool,
                          backend: str) -> Tuple[Tensor, Tensor]:
    """:func:`assoc_write` for checked arguments and a resolved backend. Under ``torch.autocast``
    ``k``, ``v`` and ``b`` are cast to their common dtype and the op runs with autocast off (the state
    stays float32)."""
    k, v, b = _write_under_autocast(k, v, b)
    with _no_autocast(k.device):
        if _checks._is_compiling():
            return assoc_write_fwd_op(k, v, b, A, z, n_heads, normalize, use_denom, correction, backend)
        if _needs_graph(k, v, b, A, z):
            return _function.apply(_Write, k, v, b, A, z, n_heads, normalize, use_denom, correction, backend)
        return _write_fwd(k, v, b, A, z, n_heads, normalize, use_denom, correction, backend)
