"""Launchers of the Triton segment attention, and its registration as backend ``"triton"``.

The launchers allocate outputs and gradients (``ops._alloc``), check what the kernels
need of their inputs, pass every stride, pick the grid and the configuration, and run the kernels of
``triton_fwd.py`` / ``triton_bwd.py``. They do no autograd (that is ``interface.py``'s custom op).

Every launch goes through :func:`_launch`: it makes the inputs' GPU the current device (Triton launches
on the current device and its current stream, not the tensors') and cuts a batch of more than
:data:`GRID_YZ_MAX` rows into launches over chunks of the batch (grid axis z).

Attention dropout (``dropout_p > 0``) compiles the kernels' ``DROPOUT`` variant; its seed is an int64
``[1]`` tensor the kernels read themselves (never ``.item()`` here: no host sync, graph capture works),
and :func:`segment_attention_dropout_mask_triton` returns the keep mask a seed gives (debug, tests).

The backward's dQ is atomics-free (deterministic) or atomic (:func:`dq_atomic_default` chooses);
float32 inputs with TF32 allowed take the backward's TF32 config tables.

Importing this module does not import triton: the kernel modules are imported on the first launch,
so ``import rmt_kernels`` works without triton and without a GPU.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch

from ... import backends
from ..._checks import check_kernel_support
from ...errors import BackendUnavailableError
from ...layout import MASK_CODES, MemoryLayout
from .._alloc import GRID_YZ_MAX
from .._alloc import device_guard as _device_guard
from .._alloc import (
    alloc_grads,
    alloc_outputs,
    empty_attention_outputs,
    is_empty,
    kernel_lengths,
    zero_grads,
)

OP = "segment_attention"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (16, 32, 64, 96, 128, 256)

# In-tile offsets (row index times row stride) are 32-bit in the kernels; a tensor whose row or
# column stride could overflow them is copied to a contiguous layout first (never the case for
# [B, H, N, D] or [B, N, H, D] layouts of realistic sizes).
_MAX_TILE_STRIDE = (2**31 - 1) // 256


# CUDA's limit on grid axes y and z (axis x takes 2**31 - 1). The kernels' grids put the heads on axis y
# and the batch on axis z: a larger batch is launched in chunks, more heads are refused.


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _kernels():
    """The kernel modules, imported on first use (they import triton)."""
    from . import triton_bwd, triton_common, triton_fwd

    return triton_common, triton_fwd, triton_bwd


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and _interpreting():
        return
    reason = backends.triton_status(t.device)[1]
    raise BackendUnavailableError(f"the triton backend of {OP} cannot run on {t.device}: {reason}")


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k, prefix_v) -> None:
    check_kernel_support(q, DTYPES, HEAD_DIMS, "triton")
    for name, t in (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if t is not None and t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; they must match")
    if q.shape[1] > GRID_YZ_MAX:
        raise ValueError(f"the triton backend of {OP} takes at most {GRID_YZ_MAX} query heads (CUDA's grid limit "
                         f"on axis y), got {q.shape[1]}")
    _check_device(q)


def _rows(t, b0: int, b1: int):
    """Batch rows ``[b0, b1)`` of a kernel argument: a view of a tensor (all of them start with the batch
    dim), any other argument as is."""
    return t[b0:b1] if isinstance(t, torch.Tensor) else t


def _launch(kernel, grid, batch: int, args, meta: dict, seed=None) -> None:
    """``kernel[grid(rows)](*args, **meta)`` on the device of ``args[0]``, over chunks of at most
    :data:`GRID_YZ_MAX` batch rows (``grid(rows)``: the grid of a launch over ``rows`` rows, the batch on
    axis z). Each chunk takes the views of its rows of every tensor argument: the strides, and with them
    the kernels, stay the same. A kernel with dropout arguments takes ``seed`` (the ``Seed`` tensor or
    its placeholder, whole in every chunk) and the chunk's first batch row ``B_START`` after ``args``,
    so that the keep decisions of batch row ``b`` do not depend on the chunking."""
    with _device_guard(args[0]):
        if batch <= GRID_YZ_MAX:
            if seed is None:
                kernel[grid(batch)](*args, **meta)
            else:
                kernel[grid(batch)](*args, seed, 0, **meta)
            return
        for b0 in range(0, batch, GRID_YZ_MAX):
            b1 = min(b0 + GRID_YZ_MAX, batch)
            tail = () if seed is None else (seed, b0)
            kernel[grid(b1 - b0)](*(_rows(a, b0, b1) for a in args), *tail, **meta)


def _fit(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` itself unless its row/column strides overflow 32-bit in-tile offsets."""
    if t is None or max(abs(t.stride(-2)), abs(t.stride(-1))) <= _MAX_TILE_STRIDE:
        return t
    return t.contiguous()


def _strides(t: Optional[torch.Tensor], like: torch.Tensor, ndim: int = 4) -> Tuple[int, ...]:
    return tuple((t if t is not None else like).stride())[:ndim]


def _dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the products: for float32, IEEE unless torch allows TF32
    (``torch.set_float32_matmul_precision``); 16-bit products ignore it (Triton's default)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _block_d(head_dim: int) -> int:
    return 1 << max(4, (head_dim - 1).bit_length())


def _arch(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


_TUNED: Dict[tuple, object] = {}


def _select(kernel, configs_fn, key_args, q: torch.Tensor, config: Optional[dict], fixed: bool,
            dropout: bool = False, variant: tuple = (), restore: tuple = (), pre_hook=None):
    """``(kernel or autotuner, meta-parameters to pass)``.

    ``configs_fn(head_dim, dtype, arch, dropout)`` lists the candidates (the ``DROPOUT`` variant has
    its own; ``variant``: whatever else the list depends on, part of the autotuner's cache key). The
    plain kernel with one config under the interpreter, when ``config`` is given, when ``fixed`` (the
    trace path needs known block sizes), or in deterministic mode
    (``torch.are_deterministic_algorithms_enabled()``: a timing-based choice could differ between
    processes, and with it the order of the floating-point sums); an autotuner over the configs for
    this GPU otherwise (autotuning needs a GPU driver). Only the dK/dV kernel's ``DQ_ATOMIC`` variant
    uses atomics (never by default in deterministic mode, :func:`dq_atomic_default`); ``restore`` names
    the arguments a kernel adds to, which the autotuner restores after each timed run; ``pre_hook`` runs
    before each launch of an autotuned config (the forward's descriptor blocks).
    """
    import triton

    d, dtype = q.shape[-1], q.dtype
    arch = None if _interpreting() or q.device.type != "cuda" else _arch(q.device)
    if config is not None or arch is None or fixed or torch.are_deterministic_algorithms_enabled():
        cfg = dict(config if config is not None else configs_fn(d, dtype, arch, dropout)[0])
        warps_stages = {"num_warps": cfg.pop("num_warps", 4), "num_stages": cfg.pop("num_stages", 1)}
        if arch is not None:
            cfg.update(warps_stages)
        return kernel, cfg
    cache_key = (kernel, arch, d, dtype, dropout, variant)
    tuned = _TUNED.get(cache_key)
    if tuned is None:
        configs = [
            triton.Config({k: v for k, v in c.items() if k not in ("num_warps", "num_stages")},
                          num_warps=c["num_warps"], num_stages=c["num_stages"], pre_hook=pre_hook)
            for c in configs_fn(d, dtype, arch, dropout)
        ]
        extra = {"restore_value": list(restore)} if restore else {}
        tuned = _TUNED[cache_key] = triton.autotune(configs=configs, key=list(key_args), **extra)(kernel)
    return tuned, {}


def _common_meta(q: torch.Tensor, layout: MemoryLayout) -> dict:
    d = q.shape[-1]
    return dict(
        MASK=MASK_CODES[layout.mask],
        PREFIX_ALL=layout.prefix_visible_to == "all",
        BLOCK_D=_block_d(d),
        EVEN_D=_block_d(d) == d,
        DOT_PREC=_dot_precision(q.dtype),
        # tl.dot on bfloat16 is wrong in the interpreter: products run in float32 there, with P and dS
        # rounded to bfloat16 first as on a GPU (triton_common._operand).
        UPCAST=_interpreting() and q.dtype == torch.bfloat16,
    )


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tune_bucket(n: int) -> int:
    """Autotuning key: the key length rounded up to a power of two, so that segments of similar
    length share a tuned config."""
    return 1 << max(0, (n - 1).bit_length())


# Autotuning keys (kernel argument names); tensor dtypes are part of every key.
_TUNE_KEY = ("TUNE_N", "MASK", "PREFIX_ALL", "HAS_PREFIX", "HAS_LENGTHS")
_TUNE_KEY_DKDV = ("TUNE_N", "MASK", "PREFIX_ALL", "IS_PREFIX", "HAS_LENGTHS")


def tile_counts(layout: MemoryLayout, segment_len: int, block_m: int, block_n: int, prefix_len: int = 0,
                segment_lengths=None) -> Dict[str, int]:
    """Key tiles the forward (and the dQ kernel) visits with ``(block_m, block_n)`` tiles, summed over
    query blocks and batch rows of one head, from :meth:`MemoryLayout.classify_tiles`.

    Returns ``{"visited": ..., "unmasked": ..., "dense": ...}``: tiles holding a visible pair (the only
    ones loaded), those of them taken without element masks (fully visible and not a bounds tail),
    and the tiles a dense kernel would load. Raises as ``classify_tiles``.

    Example::

        >>> tile_counts(MemoryLayout(0, 0, "causal"), 1024, 128, 64)
        {'visited': 72, 'unmasked': 56, 'dense': 128}
    """
    from ...layout import TILE_EMPTY, TILE_FULL

    tiles = layout.classify_tiles(segment_len, block_m, block_n, prefix_len, segment_lengths)
    rows = tiles.packed.shape[0] * tiles.packed.shape[1]
    counts = {"visited": 0, "unmasked": 0, "dense": 0}
    for classes, keys in ((tiles.prefix, prefix_len), (tiles.packed, layout.seq_len(segment_len))):
        whole = torch.ones(classes.shape[-1], dtype=torch.bool)
        if keys % block_n:
            whole[-1] = False  # the bounds tail takes the masked path
        counts["visited"] += int((classes != TILE_EMPTY).sum())
        counts["unmasked"] += int(((classes == TILE_FULL) & whole).sum())
        counts["dense"] += rows * classes.shape[-1]
    return counts


def _seed_arg(seed: Optional[torch.Tensor], dropout: bool, dummy: torch.Tensor) -> torch.Tensor:
    """The kernels' ``Seed`` argument: the seed tensor under dropout, else a placeholder (never read)."""
    if not dropout:
        return dummy
    if seed is None or seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != dummy.device:
        got = None if seed is None else f"{seed.dtype} {tuple(seed.shape)} on {seed.device}"
        raise ValueError(f"dropout needs an int64 seed tensor of one element on {dummy.device}, got {got}")
    return seed


# --------------------------------------------------------------------------- forward
# TMA (sm_90+, configs with ``TMA: True``): the kernel takes pointers and tensor descriptors of K, V and
# the prefix K, V, so that one autotuner chooses among pointer and TMA configs (``triton_fwd``: the
# descriptors, their checks, the pre-hook setting their block per config). Keys or values TMA cannot
# read, a GPU older than sm_90 or a triton without descriptors drop the TMA configs (an explicit
# ``TMA: True`` config runs the pointer path); a launch that reads no descriptor gets q in their place.


def _use_tma(fwd_mod, q: torch.Tensor, *kv) -> bool:
    """The forward may read the keys and values ``kv`` (k, v, prefix k, v; None: no prefix) through TMA:
    sm_90 or newer (or the interpreter), each of them ``triton_fwd.tma_ready``."""
    if not (_interpreting() or q.device.type != "cuda" or _arch(q.device) >= 90):
        return False
    return all(t is None or t.shape[2] == 0 or fwd_mod.tma_ready(t) for t in kv)


def _select_fwd(fwd_mod, q: torch.Tensor, config: Optional[dict], fixed: bool, dropout: bool, tma: bool):
    """``(kernel or autotuner, meta, descriptors)`` of the forward: :func:`_select` over the configs of
    ``fwd_configs`` (without the TMA ones unless ``tma``), each autotuned config with the pre-hook
    ``triton_fwd.set_kv_blocks``. An explicit ``TMA: True`` config without ``tma`` runs the pointer path
    (``TMA`` False). ``descriptors``: whether a config of the launch reads the descriptors (else the
    launcher passes placeholders)."""
    kernel = fwd_mod._segment_attention_fwd_kernel
    configs_fn = fwd_mod.fwd_configs if tma else fwd_mod.fwd_pointer_configs
    selected, meta = _select(kernel, configs_fn, _TUNE_KEY, q, config, fixed, dropout, variant=(tma,),
                             pre_hook=fwd_mod.set_kv_blocks)
    if selected is not kernel:  # an autotuner: any of its configs may read the descriptors
        return selected, meta, any(c.kwargs.get("TMA") for c in selected.configs)
    if meta.get("TMA") and not tma:
        meta["TMA"] = False
    if meta.get("WARP_SPECIALIZE") and not fwd_mod.HAS_WARP_SPECIALIZE:
        meta["WARP_SPECIALIZE"] = False
    return selected, meta, bool(meta.get("TMA"))


def segment_attention_fwd_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: Optional[torch.Tensor],
    prefix_v: Optional[torch.Tensor],
    segment_lengths: Optional[torch.Tensor],
    layout: MemoryLayout,
    scale: float,
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,
    *,
    config: Optional[dict] = None,
    trace: bool = False,
):
    """Forward of the triton backend.

    Args:
        q: ``[B, H_q, N, D]`` float16/bfloat16/float32, any strides; ``D`` in :data:`HEAD_DIMS`.
        k, v: ``[B, H_kv, N, D]`` (``H_q % H_kv == 0``); prefix_k, prefix_v: ``[B, H_kv, P, D]`` or None.
        segment_lengths: integer ``[B]`` in ``[0, S]`` or None; layout: the :class:`MemoryLayout`;
        scale: softmax scale. Shapes and values are validated by the public entry point.
        dropout_p: attention dropout probability in ``[0, 1)``: ``out = (softmax(S) * keep / (1 - p)) V``
            (``lse`` stays that of the scores without dropout); 0 runs the kernels without dropout.
        seed: int64 ``[1]`` tensor on q's device (read by the kernels, no host sync) when
            ``dropout_p > 0``; the keep decisions are those of
            :func:`segment_attention_dropout_mask_triton` for the same seed.
        config: fixed meta-parameters (``BLOCK_M``, ``BLOCK_N``, ``num_warps``, ``num_stages``, and
            optionally ``TMA``, ``WARP_SPECIALIZE``) instead of autotuning; the interpreter always runs one
            config. ``TMA: True`` runs the pointer path where TMA cannot read the keys and values or
            the GPU is older than sm_90 (see the TMA note above and ``triton_fwd``).
        trace: debug path: also return an int32 tensor ``[B, H_q, cdiv(N, BLOCK_M), cdiv(P, BLOCK_N) +
            cdiv(N, BLOCK_N)]`` holding, per query block and key tile (prefix tiles first), 2 for a
            tile taken unmasked, 1 for a masked one, 0 for a tile never loaded.

    Returns:
        ``(out, lse)``: ``[B, H_q, N, D]`` in q's dtype and the float32 natural log-sum-exp
        ``[B, H_q, N]`` (layouts of ``ops._alloc.alloc_outputs``); ``(out, lse, trace)`` with ``trace``.

    Raises:
        TypeError: unsupported or mismatched dtypes. ValueError: unsupported head dim, more than
        :data:`GRID_YZ_MAX` query heads. BackendUnavailableError: CPU tensors without ``TRITON_INTERPRET=1``.

    Example::

        >>> layout = MemoryLayout(4, 4)
        >>> q = k = v = torch.randn(1, 2, 40, 64, device="cuda", dtype=torch.bfloat16)
        >>> out, lse = segment_attention_fwd_triton(q, k, v, None, None, None, layout, 0.125)
    """
    _check_inputs(q, k, v, prefix_k, prefix_v)
    common_mod, fwd_mod, _ = _kernels()
    b, hq, n, d = q.shape
    s = layout.segment_len(n)
    p = 0 if prefix_k is None else prefix_k.shape[2]
    out, lse = alloc_outputs(q)
    q, k, v, prefix_k, prefix_v = (_fit(t) for t in (q, k, v, prefix_k, prefix_v))
    lengths = kernel_lengths(segment_lengths, q.device)
    dropout = dropout_p > 0
    tma = _use_tma(fwd_mod, q, k, v, prefix_k, prefix_v)
    kernel, meta, descriptors = _select_fwd(fwd_mod, q, config, trace, dropout, tma)
    trace_buf = None
    if trace:
        bm, bn = meta["BLOCK_M"], meta["BLOCK_N"]
        trace_buf = torch.zeros((b, hq, _cdiv(n, bm), _cdiv(p, bn) + _cdiv(n, bn)), dtype=torch.int32, device=q.device)
    if is_empty(q):
        out, lse = empty_attention_outputs(out, lse)
        return (out, lse, trace_buf) if trace else (out, lse)
    dummy = q
    args = (
        q, k, v,
        prefix_k if p else dummy, prefix_v if p else dummy,
        out, lse,
        lengths if lengths is not None else dummy,
        trace_buf if trace_buf is not None else dummy,
        *(fwd_mod.kv_descriptors(k, v, prefix_k if p else None, prefix_v if p else None, meta) if descriptors
          else (dummy,) * 4),
        *q.stride(), *k.stride(), *v.stride(),
        *_strides(prefix_k if p else None, q), *_strides(prefix_v if p else None, q),
        *out.stride(), *lse.stride(),
        n, layout.num_read, s, p, d, hq // k.shape[1], scale * common_mod.LOG2E, _tune_bucket(n + p),
        float(dropout_p) if dropout else 0.0,
    )
    _launch(kernel, lambda rows: lambda m: (_cdiv(n, m["BLOCK_M"]), hq, rows), b, args,
            dict(HAS_PREFIX=p > 0, HAS_LENGTHS=lengths is not None, TRACE=trace, DROPOUT=dropout,
                 **_common_meta(q, layout), **meta), _seed_arg(seed, dropout, dummy))
    return (out, lse, trace_buf) if trace else (out, lse)


# --------------------------------------------------------------------------- backward


def _bwd_buffers(q: torch.Tensor, k: torch.Tensor, prefix_k: Optional[torch.Tensor]):
    """``(dq, dk, dv, dprefix_k, dprefix_v, delta, lse_s)``: the gradients of ``ops._alloc.alloc_grads``
    and the float32 row statistics of the backward, ``delta = rowsum(dO * O)`` and ``lse / scale``,
    ``[B, H_q, NP]`` with ``NP = cdiv(N, triton_bwd.ROW_PAD) * ROW_PAD`` and the same strides (two
    halves of one buffer); the kernels write every element."""
    from .triton_bwd import ROW_PAD

    b, h, n = q.shape[:3]
    stats = torch.empty((2, b, h, _cdiv(n, ROW_PAD) * ROW_PAD), dtype=torch.float32, device=q.device)
    return (*alloc_grads(q, k, prefix_k), stats[0], stats[1])


# Up to this head dim the atomic dQ path's sm_90 products are all 64 wide or wider; from D = 96 on its dQ
# tile leaves registers for 32-row steps only. A static choice: no GPU has timed the two paths yet.
DQ_ATOMIC_MAX_HEAD_DIM = 64


def dq_atomic_default(q: torch.Tensor, trace: bool = False) -> bool:
    """Whether the backward takes the atomic dQ path when the caller does not say (``dq_atomic=None``): on
    a GPU, outside deterministic mode, without the trace (which reports the dQ kernel's tiles), for head
    dims up to :data:`DQ_ATOMIC_MAX_HEAD_DIM`. Not under the interpreter (it runs programs one after
    another, proving nothing about atomics; tests pass ``dq_atomic=True``)."""
    return (q.device.type == "cuda" and not _interpreting() and not trace and q.shape[-1] <= DQ_ATOMIC_MAX_HEAD_DIM
            and not torch.are_deterministic_algorithms_enabled())


def segment_attention_bwd_triton(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: Optional[torch.Tensor],
    prefix_v: Optional[torch.Tensor],
    segment_lengths: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    layout: MemoryLayout,
    scale: float,
    need_prefix_grad: bool,
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,
    *,
    config: Optional[dict] = None,
    trace: bool = False,
    dq_atomic: Optional[bool] = None,
):
    """Backward of the triton backend.

    dQ (``triton_bwd``'s docstring): atomics-free (a dQ kernel; deterministic, 7 products per visited
    tile pair), or ``dq_atomic`` (the dK/dV kernel adds each pair's dQ to a float32 buffer with atomics:
    5 products, dQ's bits may change between runs; the buffer is cast to q's dtype at the end, one more
    pass over dQ, none for float32). A prefix without ``need_prefix_grad`` still runs its key blocks
    there (their share of dQ; their dK/dV are dropped).

    Args:
        dout: ``[B, H_q, N, D]`` upstream gradient, any strides; ``out``, ``lse``: the forward's
            outputs; the other arguments as in :func:`segment_attention_fwd_triton`.
        need_prefix_grad: compute the prefix gradients (launches the prefix key blocks).
        dropout_p, seed: those of the forward (the kernels regenerate its keep decisions).
        config: ``{"dq": {...}, "dkdv": {...}}`` fixed meta-parameters per kernel (either may be
            left out) instead of autotuning; the atomic path runs no dQ kernel and ignores ``"dq"``.
        trace: debug path: also return ``{"dq": ..., "dkdv": ..., "dkdv_prefix": ...}``: the dQ
            kernel's tile codes laid out like the forward trace (absent on the atomic path), and the
            dK/dV kernels' codes ``[B, H_kv, key blocks, cdiv(N, BLOCK_M)]`` (query tiles per key block).
        dq_atomic: True: the atomic dQ path; False: the atomics-free one; None (default):
            :func:`dq_atomic_default` (atomics on a GPU outside deterministic mode for head dims up to
            64; not under the interpreter, not with ``trace``).

    Returns:
        ``(dq, dk, dv, dprefix_k, dprefix_v)`` stored ``[B, N, H, D]``, in q's dtype; the prefix gradients are None
        without a prefix or without ``need_prefix_grad``.

    Raises:
        As :func:`segment_attention_fwd_triton`.

    Example::

        >>> dq, dk, dv, _, _ = segment_attention_bwd_triton(dout, q, k, v, None, None, None, out, lse,
        ...                                                  layout, 0.125, False)
    """
    import functools

    _check_inputs(q, k, v, prefix_k, prefix_v)
    common_mod, _, bwd_mod = _kernels()
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    s = layout.segment_len(n)
    p = 0 if prefix_k is None else prefix_k.shape[2]
    want_prefix = p > 0 and need_prefix_grad
    dq, dk, dv, dpk, dpv, delta, lse_s = _bwd_buffers(q, k, prefix_k if want_prefix else None)
    if is_empty(q):
        return zero_grads(dq, dk, dv, dpk, dpv)
    dout, q, k, v, prefix_k, prefix_v, out = (_fit(t) for t in (dout, q, k, v, prefix_k, prefix_v, out))
    lengths = kernel_lengths(segment_lengths, q.device)
    config = config or {}
    common = _common_meta(q, layout)
    dummy = q
    dropout = dropout_p > 0
    seed_arg = _seed_arg(seed, dropout, dummy)
    drop_p = float(dropout_p) if dropout else 0.0
    seg = lengths if lengths is not None else dummy
    traces = {}
    atomic = dq_atomic_default(q, trace) if dq_atomic is None else bool(dq_atomic)
    tf32 = common["DOT_PREC"] == "tf32"

    pre_m = bwd_mod.PREPROCESS_BLOCK_M
    _launch(bwd_mod._bwd_preprocess_kernel, lambda rows: (delta.shape[-1] // pre_m, hq, rows), b,
            (out, dout, lse, delta, lse_s, *out.stride(), *dout.stride(), *lse.stride(), *delta.stride(), n, d,
             float(scale)),
            dict(BLOCK_M=pre_m, BLOCK_D=common["BLOCK_D"], EVEN_D=common["EVEN_D"]))

    dq_acc = None
    if atomic:  # float32 dQ summed by atomics: dq itself for float32 inputs, else a buffer cast at the end
        dq_acc = dq.zero_() if dq.dtype == torch.float32 else torch.zeros_like(dq, dtype=torch.float32)
    kernel, meta = _select(bwd_mod._bwd_dkdv_kernel,
                           functools.partial(bwd_mod.dkdv_configs, tf32=tf32, dq_atomic=atomic), _TUNE_KEY_DKDV,
                           q, config.get("dkdv"), trace, dropout, variant=(tf32, atomic),
                           restore=("DQAcc",) if atomic else ())
    key_sets = [("dkdv", k, v, dk, dv, n, False)]
    if want_prefix:
        key_sets.append(("dkdv_prefix", prefix_k, prefix_v, dpk, dpv, p, True))
    elif atomic and p > 0:  # the prefix keys' share of dQ; their dK/dV go to scratch buffers
        key_sets.append(("dkdv_prefix", prefix_k, prefix_v, torch.empty_like(prefix_k), torch.empty_like(prefix_v),
                         p, True))
    for name, kk, vv, gk, gv, keys, is_prefix in key_sets:  # keys: [prefix (P) | packed (N)]
        trace_buf = None
        if trace:
            trace_buf = torch.zeros((b, hkv, _cdiv(keys, meta["BLOCK_N"]), _cdiv(n, meta["BLOCK_M"])),
                                    dtype=torch.int32, device=q.device)
            traces[name] = trace_buf
        args = (
            q, kk, vv, dout, lse_s, delta, gk, gv, dq_acc if atomic else dummy, seg,
            trace_buf if trace_buf is not None else dummy,
            *q.stride(), *kk.stride(), *vv.stride(), *dout.stride(), *delta.stride(),
            *gk.stride(), *gv.stride(), *_strides(dq_acc, q),
            n, layout.num_read, s, keys, d, hq // hkv, scale * common_mod.LOG2E, scale, _tune_bucket(n + p),
            0 if is_prefix else p, drop_p,
        )
        _launch(kernel, lambda rows, keys=keys: lambda m: (_cdiv(keys, m["BLOCK_N"]), hkv, rows), b, args,
                dict(IS_PREFIX=is_prefix, HAS_LENGTHS=lengths is not None, TRACE=trace, DROPOUT=dropout,
                     DQ_ATOMIC=atomic, **common, **meta), seed_arg)
    if atomic:
        if dq_acc is not dq:
            dq.copy_(dq_acc)  # the one extra pass over dQ of the atomic path
        grads = (dq, dk, dv, dpk, dpv)
        return (*grads, traces) if trace else grads

    kernel, meta = _select(bwd_mod._bwd_dq_kernel, functools.partial(bwd_mod.dq_configs, tf32=tf32), _TUNE_KEY, q,
                           config.get("dq"), trace, dropout, variant=(tf32,))
    trace_buf = None
    if trace:
        bm, bn = meta["BLOCK_M"], meta["BLOCK_N"]
        trace_buf = traces["dq"] = torch.zeros((b, hq, _cdiv(n, bm), _cdiv(p, bn) + _cdiv(n, bn)),
                                               dtype=torch.int32, device=q.device)
    args = (
        q, k, v, prefix_k if p else dummy, prefix_v if p else dummy, dout, lse, delta, dq, seg,
        trace_buf if trace_buf is not None else dummy,
        *q.stride(), *k.stride(), *v.stride(),
        *_strides(prefix_k if p else None, q), *_strides(prefix_v if p else None, q),
        *dout.stride(), *lse.stride(), *delta.stride(), *dq.stride(),
        n, layout.num_read, s, p, d, hq // hkv, scale * common_mod.LOG2E, scale, _tune_bucket(n + p), drop_p,
    )
    _launch(kernel, lambda rows: lambda m: (_cdiv(n, m["BLOCK_M"]), hq, rows), b, args,
            dict(HAS_PREFIX=p > 0, HAS_LENGTHS=lengths is not None, TRACE=trace, DROPOUT=dropout, **common, **meta),
            seed_arg)
    grads = (dq, dk, dv, dpk, dpv)
    return (*grads, traces) if trace else grads



# --------------------------------------------------------------------------- dropout mask (debug)

DROPOUT_MASK_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 64}


def segment_attention_dropout_mask_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    prefix_k: Optional[torch.Tensor],
    layout: MemoryLayout,
    dropout_p: float,
    seed: torch.Tensor,
) -> torch.Tensor:
    """The keep decisions the attention kernels take with ``seed`` and ``dropout_p`` (debug, tests).

    Args:
        q: ``[B, H_q, N, D]``; k: ``[B, H_kv, N, D]``; prefix_k: ``[B, H_kv, P, D]`` or None (only the
            shapes and the device are read); layout: the :class:`MemoryLayout` of the call;
        dropout_p: in ``[0, 1)``; seed: int64 ``[1]`` tensor on q's device.

    Returns:
        bool ``[B, H_q, N, P + N]`` (keys ordered ``[prefix | packed]``): True where the element is kept,
        for every element, visible or not (the kernels apply it to visible ones only). Computed by the
        kernels' own keep function (``triton_common._dropout_keep``).

    Example::

        >>> seed = torch.randint(0, 2**62, (1,), device="cuda")
        >>> mask = segment_attention_dropout_mask_triton(q, k, None, layout, 0.1, seed)
    """
    _check_inputs(q, k, k, prefix_k, prefix_k)
    common_mod = _kernels()[0]
    b, hq, n, _ = q.shape
    p = 0 if prefix_k is None else prefix_k.shape[2]
    mask = torch.empty((b, hq, n, p + n), dtype=torch.uint8, device=q.device)
    seed_arg = _seed_arg(seed, True, q)
    if mask.numel() == 0:
        return mask.view(torch.bool)
    blocks = DROPOUT_MASK_BLOCKS
    meta = dict(blocks) if _interpreting() or q.device.type != "cuda" else dict(blocks, num_warps=4)
    _launch(common_mod._dropout_mask_kernel, lambda rows: (_cdiv(n, blocks["BLOCK_M"]), hq, rows), b,
            (mask, *mask.stride(), n, p + n, float(dropout_p)), meta, seed_arg)
    return mask.view(torch.bool)
