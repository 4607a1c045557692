"""Ahead-of-time job table of segment attention: what ``rmt-kernels aot`` compiles for this op.

Every kernel is compiled for every head dim, dtype and launch config it can run with (the autotuning
candidates of ``fwd_configs`` / ``dkdv_configs`` / ``dq_configs``), with the constexpr flags of the
heaviest variant (``memory_bidirectional`` mask, a prefix visible to the segment rows, right padding).
The other variants the launchers produce (mask families, prefix visibility, no prefix or padding, the
trace path, TF32 products) are compiled once each with a D=64 config, so that a compile error in a
rarely used branch shows up here, not on a user's GPU. Attention dropout (``DROPOUT``, the variant
``dropout_p > 0`` launches, with the dropout configs of ``fwd_configs(..., dropout=True)`` etc.) is
compiled for every head dim, dtype and config of the run (the quick set with ``quick``), so its Philox
counters are checked for spills like the plain kernels; the debug kernel of the dropout mask once.
The forward's ``TMA`` configs (sm_90, 16-bit: K/V through tensor descriptors) are jobs like the others,
for every head dim and dtype; the TMA path's own variants (:data:`_FWD_TMA_VARIANTS`) once each.
The backward's atomic dQ (the dK/dV kernel's ``DQ_ATOMIC``, with its configs of ``dkdv_configs(...,
dq_atomic=True)``, with and without dropout) and, for float32, the TF32 configs of the dK/dV and dQ
kernels (``tf32=True``) are compiled for every head dim and dtype of the run too.

The driver (``rmt_kernels.tools.aot_triton``) reads four things from this module: ``OP``,
:func:`kernel_table`, :func:`jobs`, and :func:`derived_constexprs` / :func:`arg_kind`, which describe
the kernels' arguments the way the JIT specializes them for ``[B, H, N, D]`` and ``[B, N, H, D]``
tensors. Importing this module does not import triton.
"""

from __future__ import annotations

import re
from typing import Dict, List

OP = "segment_attention"
DTYPES = ("fp16", "bf16", "fp32")
QUICK_HEAD_DIMS = (64, 128)
QUICK_DTYPES = ("bf16",)

# Runtime integer arguments that are sizes: any value, a multiple of 16 in the common launch. So are
# the strides of the log-sum-exp (stored [B, N, H_q]) that are not 1: products of N and H_q; so are those
# of the dropout mask [B, H_q, N, P + N] and KEY_START (0 or P). Not those of the backward's delta and
# lse / scale (contiguous [B, H_q, NP], NP a multiple of triton_bwd.ROW_PAD): always multiples of 16.
# Neither are the head dim D (every supported one is a multiple of 16) nor the autotuning bucket TUNE_N
# (a power of two, at least 16 past 8 keys).
_SIZE_ARGS = {"N", "R", "S", "P", "KEYS", "KEY_START", "stride_lb", "stride_ln",
              "stride_mb", "stride_mh", "stride_mn"}
# Query heads per K/V head: any value, 1 in the common launch (no grouped-query heads).
_COUNT_ARGS = {"GROUP"}
_FLOAT_ARGS = {"qk_scale", "scale", "dropout_p"}
# float32 buffers and int32 buffers among the pointer arguments; the others have the input dtype.
_F32_PTRS = {"Lse", "Delta", "LseS"}
_I32_PTRS = {"SegLen", "Trace"}
_U8_PTRS = {"Mask"}
# Strides equal to 1 for the tensors the launchers pass (last dims; delta is contiguous, the log-sum-exp
# is stored [B, N, H_q]): the JIT turns an integer argument equal to 1 into a constant, and so does the
# ahead-of-time compile.
_UNIT_STRIDES = re.compile(r"^stride_(q|k|v|pk|pv|o|d|dk|dv|dq)d$|^stride_(tn|lh|mk)$")

# Other constexpr variants the launchers produce, each compiled once (first config, D=64, bfloat16, plus
# float32 with TF32 products). "full" in the report is the heaviest variant of kernel_table.
_VARIANTS = {
    "segment_attention_fwd": [
        dict(MASK=0, PREFIX_ALL=True, HAS_PREFIX=False, HAS_LENGTHS=False, TRACE=True),
        dict(MASK=2, PREFIX_ALL=True, HAS_PREFIX=True, HAS_LENGTHS=False),
        dict(MASK=0, PREFIX_ALL=False, HAS_PREFIX=True, HAS_LENGTHS=True),
    ],
    "segment_attention_bwd_dkdv": [
        dict(MASK=0, HAS_LENGTHS=False, TRACE=True),
        dict(MASK=2, IS_PREFIX=True, PREFIX_ALL=True, TRACE=True),
        dict(IS_PREFIX=True, PREFIX_ALL=False),
        dict(IS_PREFIX=True, PREFIX_ALL=False, DQ_ATOMIC=True),
        dict(MASK=0, HAS_LENGTHS=False, TRACE=True, DQ_ATOMIC=True),
    ],
    "segment_attention_bwd_dq": [
        dict(MASK=0, PREFIX_ALL=True, HAS_PREFIX=False, HAS_LENGTHS=False, TRACE=True),
        dict(MASK=2, PREFIX_ALL=True, HAS_PREFIX=True, HAS_LENGTHS=False),
    ],
}


def _torch_dtype(name: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def kernel_table() -> Dict[str, tuple]:
    """name -> (jit function, configs function or None, fixed constexprs of the heaviest variant)."""
    from . import triton_bwd, triton_common, triton_fwd

    flags = dict(MASK=1, PREFIX_ALL=False, HAS_LENGTHS=True, UPCAST=False, TRACE=False, DROPOUT=False)
    return {
        "segment_attention_fwd": (triton_fwd._segment_attention_fwd_kernel, triton_fwd.fwd_configs,
                                  dict(flags, HAS_PREFIX=True, TMA=False, WARP_SPECIALIZE=False)),
        "segment_attention_bwd_preprocess": (triton_bwd._bwd_preprocess_kernel, None, {}),
        "segment_attention_bwd_dkdv": (triton_bwd._bwd_dkdv_kernel, triton_bwd.dkdv_configs,
                                       dict(flags, IS_PREFIX=False, DQ_ATOMIC=False)),
        "segment_attention_bwd_dq": (triton_bwd._bwd_dq_kernel, triton_bwd.dq_configs, dict(flags, HAS_PREFIX=True)),
        "segment_attention_dropout_mask": (triton_common._dropout_mask_kernel, None, {}),
    }


def jobs(arch: int, quick: bool) -> List[dict]:
    """Every ``(kernel, dtype, head_dim, config, variant)`` the launchers can run on ``arch``; ``quick``:
    head dims :data:`QUICK_HEAD_DIMS` in :data:`QUICK_DTYPES` only (the variants stay)."""
    from . import triton_bwd
    from .triton_launch import DROPOUT_MASK_BLOCKS, HEAD_DIMS

    table = kernel_table()
    head_dims = QUICK_HEAD_DIMS if quick else HEAD_DIMS
    dtypes = QUICK_DTYPES if quick else DTYPES
    rows = []
    for name, (_, configs_fn, flags) in table.items():
        if name == "segment_attention_dropout_mask":  # no dtype, no head dim: the launcher's one config
            rows.append(dict(kernel=name, dtype="bf16", head_dim=64, config=dict(DROPOUT_MASK_BLOCKS, num_warps=4)))
            continue
        for dtype in dtypes:
            for d in head_dims:
                if configs_fn is None:
                    configs = [{"BLOCK_M": triton_bwd.PREPROCESS_BLOCK_M, "num_warps": 4, "num_stages": 1}]
                else:
                    configs = configs_fn(d, _torch_dtype(dtype), arch)
                rows.extend(dict(kernel=name, dtype=dtype, head_dim=d, config=dict(c)) for c in configs)
                if "DROPOUT" in flags:
                    rows.extend(dict(kernel=name, dtype=dtype, head_dim=d, config=dict(c), variant=dict(DROPOUT=True))
                                for c in configs_fn(d, _torch_dtype(dtype), arch, True))
                rows.extend(_bwd_variant_rows(name, flags, configs_fn, dtype, d, arch))
    for name, variants in _VARIANTS.items():
        configs_fn = table[name][1]
        for dtype, extra in (("bf16", {}), ("fp32", {"DOT_PREC": "tf32"})):
            config = configs_fn(64, _torch_dtype(dtype), arch)[0]
            chosen = variants[:1] if extra else variants
            rows.extend(dict(kernel=name, dtype=dtype, head_dim=64, config=dict(config), variant=dict(v, **extra))
                        for v in chosen)
    rows.extend(_fwd_tma_variant_rows(arch))
    return rows


def _bwd_variant_rows(name: str, flags: dict, configs_fn, dtype: str, d: int, arch: int) -> List[dict]:
    """The backward's launchable variants beside the plain and dropout rows of one kernel, dtype and head
    dim: the dK/dV kernel's ``DQ_ATOMIC`` (atomic dQ) for every config of ``dkdv_configs(...,
    dq_atomic=True)``, with and without dropout, and, for float32, every TF32 config of the dK/dV and dQ
    kernels (``tf32=True``, ``DOT_PREC="tf32"``; the dK/dV kernel's with and without ``DQ_ATOMIC``)."""
    dt = _torch_dtype(dtype)
    rows = []
    if "DQ_ATOMIC" in flags:
        for dropout in (False, True):
            variant = dict(DROPOUT=True, DQ_ATOMIC=True) if dropout else dict(DQ_ATOMIC=True)
            rows.extend(dict(kernel=name, dtype=dtype, head_dim=d, config=dict(c), variant=dict(variant))
                        for c in configs_fn(d, dt, arch, dropout, dq_atomic=True))
    if dtype == "fp32" and name in ("segment_attention_bwd_dkdv", "segment_attention_bwd_dq"):
        rows.extend(dict(kernel=name, dtype=dtype, head_dim=d, config=dict(c), variant=dict(DOT_PREC="tf32"))
                    for c in configs_fn(d, dt, arch, tf32=True))
        if "DQ_ATOMIC" in flags:
            rows.extend(dict(kernel=name, dtype=dtype, head_dim=d, config=dict(c),
                             variant=dict(DOT_PREC="tf32", DQ_ATOMIC=True))
                        for c in configs_fn(d, dt, arch, tf32=True, dq_atomic=True))
    return rows


# The forward's other constexpr variants on its TMA path (sm_90 and newer), each compiled once with the
# first TMA config at D=64 in bfloat16: no prefix and the trace, the full mask, a warp-specialized loop.
_FWD_TMA_VARIANTS = [
    dict(MASK=0, PREFIX_ALL=True, HAS_PREFIX=False, HAS_LENGTHS=False, TRACE=True),
    dict(MASK=2, PREFIX_ALL=True, HAS_PREFIX=True, HAS_LENGTHS=False),
    dict(WARP_SPECIALIZE=True),
]


def _fwd_tma_variant_rows(arch: int) -> List[dict]:
    from . import triton_fwd

    tma = [c for c in triton_fwd.fwd_configs(64, _torch_dtype("bf16"), arch) if c.get("TMA")]
    if not tma:  # sm_80, or a triton without tensor descriptors
        return []
    variants = [v for v in _FWD_TMA_VARIANTS if triton_fwd.HAS_WARP_SPECIALIZE or not v.get("WARP_SPECIALIZE")]
    return [dict(kernel="segment_attention_fwd", dtype="bf16", head_dim=64, config=dict(tma[0]), variant=dict(v))
            for v in variants]


def derived_constexprs(fn, dtype: str, head_dim: int) -> dict:
    """The constexprs the launchers derive from the inputs (``BLOCK_D``, ``EVEN_D``, ``DOT_PREC``)."""
    from .triton_launch import _block_d, _dot_precision

    block_d = _block_d(head_dim)
    consts = dict(BLOCK_D=block_d, EVEN_D=block_d == head_dim, DOT_PREC=_dot_precision(_torch_dtype(dtype)))
    return {name: value for name, value in consts.items() if name in fn.arg_names}


def arg_kind(kernel: str, name: str, dtype: str, consts: dict) -> str:
    """How the JIT sees argument ``name`` of ``kernel`` run on ``dtype`` inputs with the constexprs
    ``consts`` (the same for every kernel of this op): ``"one"`` (an integer equal to 1, a constant),
    ``"i32:16"`` (16-divisible), ``"size"`` / ``"count"`` (any value; a multiple of 16 / 1 in the common
    launch: the driver's ``SPECIALIZATIONS``), ``"fp32"``, ``"*<elem>"`` (a 16-byte aligned pointer) or
    ``"tensordesc<<elem>[1, 1, BLOCK_N, BLOCK_D]>"`` (the forward's host-side descriptors of K, V and the
    prefix K, V under ``TMA``, spelled as Triton's JIT mangles a ``TensorDescriptor``; without a prefix the
    launcher passes the K, V ones in their place).
    A buffer the flags switch off (no lengths, no trace, no dropout seed) is the placeholder the launchers
    pass: q. ``B_START`` (the first batch row of a launch) is 0 but in batches beyond the grid limit."""
    if name in ("KD", "VD", "PKD", "PVD"):  # the forward's K/V (prefix K/V) descriptors under TMA, else q
        if consts.get("TMA"):
            return f"tensordesc<{dtype}[1, 1, {consts['BLOCK_N']}, {consts['BLOCK_D']}]>"
        return "*" + dtype
    if name == "DQAcc":  # the dK/dV kernel's float32 dQ under DQ_ATOMIC, else q
        return "*fp32" if consts.get("DQ_ATOMIC") else "*" + dtype
    if name == "Seed":  # the int64 seed, read under DROPOUT and always by the dropout mask kernel
        return "*i64" if consts.get("DROPOUT", True) else "*" + dtype
    if (name == "SegLen" and not consts.get("HAS_LENGTHS", True)) or (name == "Trace" and not consts.get("TRACE")):
        return "*" + dtype
    if name == "B_START":
        return "i32:16"
    if name in _SIZE_ARGS:
        return "size"
    if name in _COUNT_ARGS:
        return "count"
    if name in _FLOAT_ARGS:
        return "fp32"
    if name.startswith("stride_"):
        return "one" if _UNIT_STRIDES.match(name) else "i32:16"
    if name in ("D", "TUNE_N"):
        return "i32:16"
    return "*" + ("fp32" if name in _F32_PTRS else "i32" if name in _I32_PTRS else "u8" if name in _U8_PTRS else dtype)
