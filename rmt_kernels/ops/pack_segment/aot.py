"""Ahead-of-time job table of the memory handoff: what ``rmt-kernels aot`` compiles for this op.

Four kernels, five entries: the pack kernel from embeddings and from token ids (``FROM_IDS``), the
memory gradient, and the embedding-weight gradient with atomics and from sorted ids. Each is compiled
for float16, bfloat16 and float32 at feature dims :data:`DIMS` with the meta-parameters the launchers
pick for them (``triton_launch.pack_config`` and friends: the largest tiles; the launch may only
shrink ``BLOCK_ROWS``), with the heaviest constexpr flags (both memories read, one tensor in both
memory slots summed over a broadcast batch). The other flag combinations the launchers produce (no
read or no write memory, per-batch or single-slot memory gradients) are compiled once each at
``d = 768`` in bfloat16.

The driver (``rmt_kernels.tools.aot_triton``) reads ``OP``, :func:`kernel_table`, :func:`jobs`,
:func:`derived_constexprs` and :func:`arg_kind` from this module, as from every op's ``aot.py``.
Importing this module does not import triton.
"""

from __future__ import annotations

from typing import Dict, List

OP = "pack_segment"
DTYPES = ("fp16", "bf16", "fp32")
DIMS = (64, 768, 2048)
QUICK_DIMS = (768,)
QUICK_DTYPES = ("bf16",)
VARIANT_DIM = 768

# Representative sizes for the tile choices that depend on them: a memory block of this many rows
# and a segment of this many tokens reach the largest tiles the launchers use.
_MEMORY_ROWS = 64
_SEGMENT_LEN = 1024

# Strides of the innermost (feature) dim, and of the contiguous token ids: 1, a constant for the JIT.
_UNIT_STRIDES = {"so_d", "ss_d", "si_n", "sr_d", "sw_d", "sg_d"}
# Integer arguments that are sizes: slot offsets, the ids' batch stride (the segment length); any value,
# a multiple of 16 in the common launch.
_ANY_INTS = {"R", "S", "W", "D", "B", "ROWS", "T", "start", "start2", "si_b"}
# Token ids and their sort order: int64, as torch gives them.
_ID_PTRS = {"ids_ptr", "sorted_ids_ptr", "order_ptr"}

_VARIANTS = {
    "pack_segment_fwd": [
        dict(HAS_READ=False),
        dict(HAS_WRITE=False),
        dict(HAS_READ=False, HAS_WRITE=False),
    ],
    "pack_segment_fwd_ids": [dict(HAS_READ=False), dict(HAS_WRITE=False)],
    "pack_memory_grad": [
        dict(TWO_SLOTS=False),
        dict(REDUCE_BATCH=False),
        dict(TWO_SLOTS=False, REDUCE_BATCH=False),
    ],
}


def _configs(kernel: str, dim: int) -> List[dict]:
    from . import triton_launch

    if kernel.startswith("pack_segment_fwd"):
        return [triton_launch.pack_config(dim)]
    if kernel == "pack_memory_grad":
        return [triton_launch.memory_grad_config(_MEMORY_ROWS, dim)]
    return [triton_launch.embedding_grad_config(_SEGMENT_LEN, dim, kernel == "embedding_grad_sorted")]


def kernel_table() -> Dict[str, tuple]:
    """name -> (jit function, None, fixed constexprs of the heaviest variant), the shape of every op's
    table (the configs come from the launchers' helpers, in :func:`jobs`, not from an autotuning
    table)."""
    from . import triton_bwd, triton_fwd

    flags = dict(HAS_READ=True, HAS_WRITE=True)
    return {
        "pack_segment_fwd": (triton_fwd._pack_segment_fwd_kernel, None, dict(flags, FROM_IDS=False)),
        "pack_segment_fwd_ids": (triton_fwd._pack_segment_fwd_kernel, None, dict(flags, FROM_IDS=True)),
        "pack_memory_grad": (triton_bwd._pack_memory_grad_kernel, None, dict(TWO_SLOTS=True, REDUCE_BATCH=True)),
        "embedding_grad_atomic": (triton_bwd._embedding_grad_atomic_kernel, None, {}),
        "embedding_grad_sorted": (triton_bwd._embedding_grad_sorted_kernel, None, {}),
    }


def jobs(arch: int, quick: bool) -> List[dict]:
    """Every ``(kernel, dtype, head_dim, config, variant)`` to compile (``head_dim``: the feature dim
    ``d``); the configs do not depend on ``arch``. ``quick``: :data:`QUICK_DIMS` in
    :data:`QUICK_DTYPES` only (the variants stay)."""
    dims = QUICK_DIMS if quick else DIMS
    dtypes = QUICK_DTYPES if quick else DTYPES
    rows = []
    for name in kernel_table():
        for dtype in dtypes:
            for d in dims:
                rows.extend(dict(kernel=name, dtype=dtype, head_dim=d, config=c) for c in _configs(name, d))
    for name, variants in _VARIANTS.items():
        config = _configs(name, VARIANT_DIM)[0]
        rows.extend(dict(kernel=name, dtype="bf16", head_dim=VARIANT_DIM, config=dict(config), variant=dict(v))
                    for v in variants)
    return rows


def derived_constexprs(fn, dtype: str, head_dim: int) -> dict:
    """None: every meta-parameter of these kernels is in the job's config."""
    return {}


def arg_kind(kernel: str, name: str, dtype: str, consts: dict) -> str:
    """How the JIT sees argument ``name`` of ``kernel`` run on ``dtype`` data with the constexprs
    ``consts`` (the kinds of ``segment_attention.aot.arg_kind``). The atomic embedding gradient
    accumulates into float32. A source the flags switch off (the ids of the pack from embeddings, an
    absent memory) is the output as a placeholder, with strides 0."""
    for flag, prefix in (("FROM_IDS", "si_"), ("HAS_READ", "sr_"), ("HAS_WRITE", "sw_")):
        if not consts.get(flag, True) and name.startswith(prefix):
            return "i32:16"
    if name == "ids_ptr" and not consts.get("FROM_IDS", True):
        return "*" + dtype
    if name in _UNIT_STRIDES:
        return "one"
    if name in _ANY_INTS:
        return "size"
    if name.endswith("_ptr"):
        if name in _ID_PTRS:
            return "*i64"
        if name == "dw_ptr" and kernel == "embedding_grad_atomic":
            return "*fp32"
        return "*" + dtype
    return "i32:16"
