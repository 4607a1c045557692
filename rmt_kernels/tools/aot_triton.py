"""``rmt-kernels aot``: compile every Triton kernel of the package for a GPU target, without a GPU.

Each kernel is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` for
every head dim, dtype and launch config it can run with (the autotuning candidates of
``fwd_configs`` / ``dkdv_configs`` / ``dq_configs``). The constexpr flags are those of the heaviest
variant (``memory_bidirectional`` mask, a prefix visible to the segment rows, right padding); the
other variants (mask families, prefix visibility, no prefix or padding, the trace path, TF32
products) are compiled once each with a D=64 config (table rows marked ``[...]``). The
signature marks pointers and strides 16-divisible and unit strides constant, as the JIT specializes
them for ``[B, H, N, D]`` and ``[B, N, H, D]`` tensors. ``cuobjdump`` from the triton wheel reads
registers, stack/local bytes (spills) and, for sm_90, whether the SASS holds ``HGMMA`` (Hopper
warpgroup MMA) rather than only ``HMMA``.

Exit status: 0 when every kernel compiled with no spill and shared memory within the target's limit
(sm_80: 163 KiB, sm_90: 227 KiB); 1 otherwise; 2 when it cannot run (no triton, interpreter mode).

Example::

    rmt-kernels aot --arch 90 --json aot90.json
    rmt-kernels aot --arch 80 --quick
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import List, Optional

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = ("fp16", "bf16", "fp32")
QUICK_HEAD_DIMS = (64, 128)
QUICK_DTYPES = ("bf16",)

# Runtime integer arguments that are sizes (not marked 16-divisible: they take any value).
_SIZE_ARGS = {"N", "R", "S", "P", "D", "GROUP", "TUNE_N", "KEYS"}
_FLOAT_ARGS = {"qk_scale", "scale"}
# float32 buffers and int32 buffers among the pointer arguments; the others have the input dtype.
_F32_PTRS = {"Lse", "Delta"}
_I32_PTRS = {"SegLen", "Trace"}
# Strides equal to 1 for the tensors the launchers pass (last dims; delta is contiguous): the JIT
# turns an integer argument equal to 1 into a constant, and so does this compile.
_UNIT_STRIDES = re.compile(r"^stride_(q|k|v|pk|pv|o|d|dk|dv|dq)d$|^stride_tn$")
# Strides that need not be 16-divisible (the log-sum-exp rows are H_q apart).
_ODD_STRIDES = {"stride_ln"}


@dataclass
class Job:
    kernel: str
    dtype: str
    head_dim: int
    config: dict
    arch: int
    variant: Optional[dict] = None  # constexpr flags replacing the heaviest variant's


@dataclass
class Result:
    name: str
    config: dict
    arch: int
    dtype: str
    head_dim: int
    registers: Optional[int]
    spill_bytes: Optional[int]
    shared_bytes: Optional[int]
    uses_wgmma: Optional[bool]
    uses_mma: Optional[bool]
    variant: str = "full"
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and self.spill_bytes == 0
            and self.shared_bytes is not None
            and self.shared_bytes <= SHARED_LIMIT[self.arch]
        )


def _kernel_table():
    """name -> (jit function, configs function or None, fixed constexprs)."""
    from ..ops.segment_attention import triton_bwd, triton_fwd

    flags = dict(MASK=1, PREFIX_ALL=False, HAS_LENGTHS=True, UPCAST=False, TRACE=False)
    return {
        "segment_attention_fwd": (triton_fwd._segment_attention_fwd_kernel, triton_fwd.fwd_configs,
                                  dict(flags, HAS_PREFIX=True)),
        "segment_attention_bwd_preprocess": (triton_bwd._bwd_preprocess_kernel, None, {}),
        "segment_attention_bwd_dkdv": (triton_bwd._bwd_dkdv_kernel, triton_bwd.dkdv_configs,
                                       dict(flags, IS_PREFIX=False)),
        "segment_attention_bwd_dq": (triton_bwd._bwd_dq_kernel, triton_bwd.dq_configs, dict(flags, HAS_PREFIX=True)),
    }


# Other constexpr variants the launchers produce, each compiled once (first config, D=64, bfloat16, plus
# float32 with TF32 products) so that a compile error in a rarely used branch shows up here, not on a
# user's GPU. "full" in the table is the heaviest variant of _kernel_table.
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
    ],
    "segment_attention_bwd_dq": [
        dict(MASK=0, PREFIX_ALL=True, HAS_PREFIX=False, HAS_LENGTHS=False, TRACE=True),
        dict(MASK=2, PREFIX_ALL=True, HAS_PREFIX=True, HAS_LENGTHS=False),
    ],
}


def _variant_name(variant: Optional[dict]) -> str:
    if not variant:
        return "full"
    return ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in variant.items())


def _torch_dtype(name: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def jobs_for(arch: int, quick: bool) -> List[Job]:
    """Every (kernel, dtype, head dim, config) the launchers can run on ``arch``."""
    from ..ops.segment_attention import triton_bwd
    from ..ops.segment_attention.triton_launch import HEAD_DIMS

    head_dims = QUICK_HEAD_DIMS if quick else HEAD_DIMS
    dtypes = QUICK_DTYPES if quick else DTYPES
    jobs = []
    for name, (_, configs_fn, _) in _kernel_table().items():
        for dtype in dtypes:
            for d in head_dims:
                if configs_fn is None:
                    configs = [{"BLOCK_M": triton_bwd.PREPROCESS_BLOCK_M, "num_warps": 4, "num_stages": 1}]
                else:
                    configs = configs_fn(d, _torch_dtype(dtype), arch)
                jobs.extend(Job(name, dtype, d, dict(c), arch) for c in configs)
    for name, variants in _VARIANTS.items():
        configs_fn = _kernel_table()[name][1]
        for dtype, extra in (("bf16", {}), ("fp32", {"DOT_PREC": "tf32"})):
            config = configs_fn(64, _torch_dtype(dtype), arch)[0]
            chosen = variants[:1] if extra else variants
            jobs.extend(Job(name, dtype, 64, dict(config), arch, dict(v, **extra)) for v in chosen)
    return jobs


def _signature(fn, dtype: str, constexprs: dict):
    """ASTSource signature, constexprs and attributes for one kernel."""
    signature, consts, attrs = {}, dict(constexprs), {}
    divisible = [["tt.divisibility", 16]]
    for idx, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name in _SIZE_ARGS:
            signature[name] = "i32"
        elif name in _FLOAT_ARGS:
            signature[name] = "fp32"
        elif name.startswith("stride_"):
            if _UNIT_STRIDES.match(name):
                signature[name] = "constexpr"
                consts[name] = 1
            else:
                signature[name] = "i32"
                if name not in _ODD_STRIDES:
                    attrs[(idx,)] = divisible
        else:
            elem = "fp32" if name in _F32_PTRS else "i32" if name in _I32_PTRS else dtype
            signature[name] = "*" + elem
            attrs[(idx,)] = divisible
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in consts]
    if missing:
        raise ValueError(f"{fn.__name__}: no value for constexpr {missing}")
    return signature, consts, attrs


def _ast_source(fn, signature, consts, attrs):
    from triton.compiler import ASTSource

    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" in params:  # triton >= 3.3 (3.6 on the GPU machines, 3.9 here)
        return ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    return ASTSource(fn=fn, signature=signature, constants=consts, attrs=attrs)


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} is not in the triton wheel ({path})")
    return path


def compile_job(job: Job) -> Result:
    """Compile one job and read its resources from the cubin."""
    import warnings

    import triton
    from triton.backends.compiler import GPUTarget

    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # triton 3.9's notice, per compile

    from ..ops.segment_attention.triton_launch import _block_d, _dot_precision

    fn, _, flags = _kernel_table()[job.kernel]
    cfg = dict(job.config)
    options = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    consts = dict(flags, **cfg)
    block_d = _block_d(job.head_dim)
    consts.update(BLOCK_D=block_d, EVEN_D=block_d == job.head_dim)
    if "DOT_PREC" in fn.arg_names:
        consts["DOT_PREC"] = _dot_precision(_torch_dtype(job.dtype))
    consts.update(job.variant or {})
    result = Result(job.kernel, job.config, job.arch, job.dtype, job.head_dim, None, None, None, None, None,
                    variant=_variant_name(job.variant))
    try:
        signature, consts, attrs = _signature(fn, job.dtype, consts)
        compiled = triton.compile(_ast_source(fn, signature, consts, attrs), target=GPUTarget("cuda", job.arch, 32),
                                  options=options)
        result.shared_bytes = int(compiled.metadata.shared)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                                   text=True, check=True).stdout
            sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", f.name], capture_output=True, text=True,
                                  check=True).stdout
        fields = dict(re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", usage))
        result.registers = int(fields["REG"])
        result.spill_bytes = int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0))
        result.shared_bytes = max(result.shared_bytes, int(fields.get("SHARED", 0)))
        result.uses_wgmma = "HGMMA" in sass if job.arch >= 90 else False
        result.uses_mma = "HMMA" in sass or "HGMMA" in sass
    except Exception as exc:  # reported per job; the exit status says it failed
        result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    return result


def _config_str(cfg: dict) -> str:
    short = {"BLOCK_M": "M", "BLOCK_N": "N", "num_warps": "w", "num_stages": "s"}
    return " ".join(f"{short.get(k, k)}{v}" for k, v in cfg.items())


def format_table(results: List[Result]) -> str:
    head = (f"{'kernel':<34} {'dtype':<5} {'D':>4} {'config':<18} {'regs':>4} {'spill':>5} {'smem KiB':>8} "
            f"{'wgmma':>5}  status")
    lines = [head, "-" * len(head)]
    for r in results:
        if r.error:
            lines.append(f"{r.name:<34} {r.dtype:<5} {r.head_dim:>4} {_config_str(r.config):<18} FAILED: {r.error}"
                         f"  [{r.variant}]")
            continue
        status = "ok"
        if r.spill_bytes:
            status = "SPILL"
        elif r.shared_bytes > SHARED_LIMIT[r.arch]:
            status = "SHARED OVER LIMIT"
        wg = ("yes" if r.uses_wgmma else "no") if r.arch >= 90 else "-"
        variant = "" if r.variant == "full" else f"  [{r.variant}]"
        lines.append(
            f"{r.name:<34} {r.dtype:<5} {r.head_dim:>4} {_config_str(r.config):<18} {r.registers:>4} "
            f"{r.spill_bytes:>5} {r.shared_bytes / 1024:>8.1f} {wg:>5}  {status}{variant}"
        )
    return "\n".join(lines)


def run_aot(arch: int, quick: bool = False, workers: Optional[int] = None) -> List[Result]:
    """Compile every job for ``arch`` (80 or 90) and return the results in job order."""
    jobs = jobs_for(arch, quick)
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers <= 1:
        return [compile_job(j) for j in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(compile_job, jobs))


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", type=int, choices=sorted(SHARED_LIMIT), action="append",
                        help="target compute capability (repeatable; default: 80 and 90)")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="write the results as a JSON list to PATH (stdout with no PATH: then no table)")
    parser.add_argument("--quick", action="store_true",
                        help=f"only head dims {list(QUICK_HEAD_DIMS)} and {list(QUICK_DTYPES)}")
    parser.add_argument("--workers", type=int, default=None, help="parallel compiles (default: CPU count)")
    parser.add_argument("--cuda", action="store_true",
                        help="compile the CUDA C++ kernels of csrc/ with nvcc instead (sm_80 and sm_90a)")


def run(args) -> int:
    if args.cuda:
        from .aot_cuda import main as cuda_main

        return cuda_main(args.arch, args.json)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: rmt-kernels aot compiles real kernels: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        print(f"error: rmt-kernels aot needs triton ({exc})", file=sys.stderr)
        return 2
    results: List[Result] = []
    for arch in args.arch or sorted(SHARED_LIMIT):
        results.extend(run_aot(arch, quick=args.quick, workers=args.workers))
    rows = [dict(asdict(r), ok=r.ok) for r in results]
    if args.json == "-":
        json.dump(rows, sys.stdout, indent=1)
        print()
    else:
        for arch in sorted({r.arch for r in results}):
            print(f"sm_{arch}")
            print(format_table([r for r in results if r.arch == arch]))
            print()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    bad = [r for r in results if not r.ok]
    summary = f"{len(results) - len(bad)} of {len(results)} kernel configs ok"
    print(summary if not bad else f"{summary}; {len(bad)} FAILED (spill, shared memory over limit or error)",
          file=sys.stderr)
    return 1 if bad else 0
