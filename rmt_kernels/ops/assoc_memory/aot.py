"""Ahead-of-time job table of ARMT's associative memory: what ``rmt-kernels aot`` compiles for this op.

Seven kernels: the read forward, the read backward's ``dq`` and ``dA``/``dz`` kernels, the write
forward, and the write backward's row (``dv``/``db``), ``dk`` and state (``dA``/``dz``) kernels. Each is
compiled for float16, bfloat16 and float32 inputs (the state is always float32) at head key dims
:data:`KEY_DIMS` (``p = d_mem / H``, the job's ``head_dim``; ``P`` and ``TWO_P`` are derived from it),
with the meta-parameters the launchers pick (``triton_launch.read_fwd_config`` and friends) for a
value dim of :data:`VALUE_DIM` and :data:`MEMORY_ROWS` memory rows, and the constexpr flags of the
heaviest variant (normalised, with the denominator, a later segment with the correction, per-channel
gates). The other flag combinations are compiled once each at ``p = 64`` in bfloat16.

Precision: exactly what ``triton_launch.dot_precision`` picks. 16-bit inputs compile ``"tf32"``
products; float32 inputs compile ``"tf32x3"`` (torch's default ``"highest"`` float32 matmul precision)
at every key dim, plus a ``DOT_PREC=tf32`` variant (``"high"``/``"medium"``) at :data:`KEY_DIMS` too.

The driver (``rmt_kernels.tools.aot_triton``) reads ``OP``, :func:`kernel_table`, :func:`jobs`,
:func:`derived_constexprs` and :func:`arg_kind` from this module, as from every op's ``aot.py``.
Importing this module does not import triton.
"""

from __future__ import annotations

from typing import Dict, List

OP = "assoc_memory"
DTYPES = ("fp16", "bf16", "fp32")
KEY_DIMS = (8, 16, 32, 64, 128)
QUICK_KEY_DIMS = (64,)
QUICK_DTYPES = ("bf16",)
VARIANT_KEY_DIM = 64
# Representative sizes for the tile choices that depend on them (Llama-3.2-1B: d = 2048, M = 128).
VALUE_DIM = 2048
MEMORY_ROWS = 128

# Strides of the innermost dim of every tensor the launchers pass in the common launch: 1, a constant.
_UNIT_STRIDES = {"sy_d", "sx_d", "sq_d", "sa_v", "sz_k", "sdq_d", "sdy_d", "sda_v", "sdz_k", "san_v", "szn_k",
                 "sk_d", "sv_d", "sb_d", "sdk_d", "sdv_d", "sdb_d", "sdan_v", "sdzn_k"}
# Head counts: any value, 1 in the common launch.
_COUNT_ARGS = {"H"}
# The per-row statistics (den, d den, |phi|) and the state and its gradients are float32.
_F32_PTRS = {"stat_ptr", "scr_ptr", "a_ptr", "z_ptr", "an_ptr", "zn_ptr", "da_ptr", "dz_ptr", "dan_ptr", "dzn_ptr"}

_READ = dict(NORMALIZE=True, USE_DENOM=True)
_WRITE = dict(NORMALIZE=True, USE_DENOM=True, CORRECTION=True, GATING=True, HAS_STATE=True)

_VARIANTS = {
    "assoc_read_fwd": [dict(NORMALIZE=False), dict(USE_DENOM=False)],
    "assoc_read_bwd_dq": [dict(NORMALIZE=False), dict(USE_DENOM=False)],
    "assoc_read_bwd_da": [dict(NORMALIZE=False), dict(USE_DENOM=False)],
    "assoc_write_fwd": [dict(HAS_STATE=False, GATING=False), dict(CORRECTION=False, NORMALIZE=False),
                        dict(USE_DENOM=False, GATING=False)],
    "assoc_write_bwd_rows": [dict(HAS_STATE=False, GATING=False), dict(CORRECTION=False, NORMALIZE=False),
                             dict(USE_DENOM=False, GATING=False)],
    "assoc_write_bwd_dk": [dict(HAS_STATE=False), dict(NORMALIZE=False), dict(USE_DENOM=False)],
    "assoc_write_bwd_state": [dict(NORMALIZE=False), dict(USE_DENOM=False)],
}


def _configs(kernel: str, p: int) -> List[dict]:
    from . import triton_launch as tl_

    if kernel == "assoc_read_fwd":
        cfg = tl_.read_fwd_config(p, VALUE_DIM)
    elif kernel == "assoc_read_bwd_dq":
        cfg = tl_.read_bwd_dq_config(p, VALUE_DIM)
    elif kernel == "assoc_read_bwd_da":
        cfg = tl_.read_bwd_da_config(p, VALUE_DIM)
    elif kernel == "assoc_write_fwd":
        cfg = tl_.write_fwd_config(p, VALUE_DIM, MEMORY_ROWS)
    elif kernel == "assoc_write_bwd_rows":
        cfg = tl_.write_bwd_rows_config(p, VALUE_DIM, MEMORY_ROWS)
    elif kernel == "assoc_write_bwd_dk":
        cfg = tl_.write_bwd_dk_config(p, VALUE_DIM, MEMORY_ROWS)
    else:
        cfg = tl_.write_bwd_state_config(p, VALUE_DIM, MEMORY_ROWS)
    return [dict(cfg, num_stages=1)]


def kernel_table() -> Dict[str, tuple]:
    """name -> (jit function, None, fixed constexprs of the heaviest variant)."""
    from . import triton_bwd, triton_fwd

    dk_flags = {k: v for k, v in _WRITE.items() if k not in ("CORRECTION", "GATING")}
    state_flags = {k: v for k, v in _WRITE.items() if k in ("NORMALIZE", "USE_DENOM")}
    return {
        "assoc_read_fwd": (triton_fwd._assoc_read_fwd_kernel, None, dict(_READ)),
        "assoc_read_bwd_dq": (triton_bwd._assoc_read_bwd_dq_kernel, None, dict(_READ)),
        "assoc_read_bwd_da": (triton_bwd._assoc_read_bwd_da_kernel, None, dict(_READ)),
        "assoc_write_fwd": (triton_fwd._assoc_write_fwd_kernel, None, dict(_WRITE)),
        "assoc_write_bwd_rows": (triton_bwd._assoc_write_bwd_rows_kernel, None, dict(_WRITE)),
        "assoc_write_bwd_dk": (triton_bwd._assoc_write_bwd_dk_kernel, None, dk_flags),
        "assoc_write_bwd_state": (triton_bwd._assoc_write_bwd_state_kernel, None, state_flags),
    }


def jobs(arch: int, quick: bool) -> List[dict]:
    """Every ``(kernel, dtype, head_dim, config, variant)`` to compile (``head_dim``: the head key dim
    ``p``); the configs do not depend on ``arch``. Float32 rows compile ``"tf32x3"`` products (the
    default, :func:`derived_constexprs`) and again with ``DOT_PREC="tf32"``. ``quick``:
    :data:`QUICK_KEY_DIMS` in :data:`QUICK_DTYPES` only, without the flag variants (the quick set runs
    on two CI cores)."""
    dims = QUICK_KEY_DIMS if quick else KEY_DIMS
    dtypes = QUICK_DTYPES if quick else DTYPES
    rows = []
    for name in kernel_table():
        for dtype in dtypes:
            for p in dims:
                rows.extend(dict(kernel=name, dtype=dtype, head_dim=p, config=c) for c in _configs(name, p))
                if dtype == "fp32":
                    rows.extend(dict(kernel=name, dtype=dtype, head_dim=p, config=c, variant=dict(DOT_PREC="tf32"))
                                for c in _configs(name, p))
    for name, variants in ({} if quick else _VARIANTS).items():
        config = _configs(name, VARIANT_KEY_DIM)[0]
        rows.extend(dict(kernel=name, dtype="bf16", head_dim=VARIANT_KEY_DIM, config=dict(config), variant=dict(v))
                    for v in variants)
    return rows


def derived_constexprs(fn, dtype: str, head_dim: int) -> dict:
    """``P`` (the head key dim), ``TWO_P`` and ``DOT_PREC``, as the launchers derive them
    (``triton_launch.dot_precision``): ``"tf32"`` for 16-bit inputs, ``"tf32x3"`` for float32 inputs
    under torch's default float32 matmul precision (the ``"tf32"`` of the other precisions is a
    variant, :func:`jobs`)."""
    from .triton_launch import two_p

    return dict(P=head_dim, TWO_P=two_p(head_dim), DOT_PREC="tf32x3" if dtype == "fp32" else "tf32")


def arg_kind(kernel: str, name: str, dtype: str, consts: dict) -> str:
    """How the JIT sees argument ``name`` of ``kernel`` run on ``dtype`` inputs with the constexprs
    ``consts`` (the kinds of ``segment_attention.aot.arg_kind``). Without ``HAS_STATE`` the old state's
    pointers are placeholders (the new state, or the incoming gradients: float32 either way)."""
    if name in _UNIT_STRIDES:
        return "one"
    if name in _COUNT_ARGS:
        return "count"
    if name.endswith("_ptr"):
        return "*fp32" if name in _F32_PTRS else "*" + dtype
    return "size"
