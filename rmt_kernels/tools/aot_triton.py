"""``rmt-kernels aot``: compile every Triton kernel of the package for a GPU target, without a GPU.

The jobs come from each op's ahead-of-time table (``rmt_kernels/ops/<op>/aot.py``, listed in
:data:`OPS`): which kernels, with which constexpr variants, launch configs, dtypes and head (or
feature) dims. This driver compiles each job with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))``, with the signature the op's ``arg_kind`` describes (pointers
16-byte aligned and strides 16-divisible, ``tt.divisibility``; unit strides constant), in parallel
worker processes, printing progress on stderr. The JIT specializes every integer argument that is a
multiple of 16 or equal to 1, so each launch config is compiled for two of :data:`SPECIALIZATIONS`:
``generic`` (sizes take any value, the op's job table) and ``common`` (every size a multiple of 16 and
every count 1, the usual launch; reported as the variant ``specialization=common``). ``cuobjdump``
from the triton wheel reads registers, stack/local bytes (spills) and, for sm_90, whether the SASS
holds ``HGMMA`` (Hopper warpgroup MMA) rather than only ``HMMA``. Rows of the table marked ``[...]``
are variants other than an op's heaviest one.

Exit status: 0 when every kernel compiled with no spill and shared memory within the target's limit
(sm_80: 163 KiB, sm_90: 227 KiB); 1 otherwise; 2 when it cannot run (no triton, interpreter mode, or
``--cuda`` with an option of the Triton compile).

Example::

    rmt-kernels aot --arch 90 --json aot90.json
    rmt-kernels aot --arch 80 --quick
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from typing import List, Optional

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

# The ops whose kernels are compiled, each with its ahead-of-time table ``rmt_kernels.ops.<op>.aot``.
OPS = ("segment_attention", "pack_segment", "assoc_memory")

# What the JIT sees of the integer arguments an op's ``arg_kind`` calls "size" (lengths, offsets, strides
# that are sizes) and "count" (e.g. query heads per K/V head), per specialization: any value, or a
# multiple of 16 (``tt.divisibility``) and 1 (a constant), as in a launch with N = 1024, D = 64,
# 16 heads and no grouped-query heads.
SPECIALIZATIONS = {
    "generic": {"size": "i32", "count": "i32"},
    "common": {"size": "i32:16", "count": "one"},
}
# The key of a job's variant that names its specialization (the other keys are constexpr flags).
SPEC_KEY = "specialization"

# Seconds between two progress lines (the first and the last job always print one).
PROGRESS_EVERY_S = 5.0


@dataclass
class Job:
    kernel: str
    dtype: str
    head_dim: int
    config: dict
    arch: int
    variant: Optional[dict] = None  # constexpr flags replacing the heaviest variant's, and SPEC_KEY
    op: str = "segment_attention"

    @property
    def specialization(self) -> str:
        return (self.variant or {}).get(SPEC_KEY, "generic")


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
    specialization: str = "generic"

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and self.spill_bytes == 0
            and self.shared_bytes is not None
            and self.shared_bytes <= SHARED_LIMIT[self.arch]
        )


def _op_aot(op: str):
    """The ahead-of-time table module of ``op``."""
    return importlib.import_module(f"rmt_kernels.ops.{op}.aot")


def _kernel_table():
    """name -> (jit function, configs function or None, fixed constexprs), over every op of :data:`OPS`."""
    table = {}
    for op in OPS:
        table.update(_op_aot(op).kernel_table())
    return table


def _variant_name(variant: Optional[dict]) -> str:
    if not variant:
        return "full"
    return ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in variant.items())


def jobs_for(arch: int, quick: bool, ops=OPS) -> List[Job]:
    """Every job of every op in ``ops`` for ``arch``, in table order (``quick``: each op's short list).

    Each launch config of an op's table (a row without variant) is followed by the same job in the
    ``common`` specialization; with ``quick``, only the first config of each kernel, dtype and dim."""
    jobs = []
    for op in ops:
        seen = set()
        for row in _op_aot(op).jobs(arch, quick):
            jobs.append(Job(arch=arch, op=op, **row))
            key = (row["kernel"], row["dtype"], row["head_dim"])
            if not row.get("variant") and not (quick and key in seen):
                seen.add(key)
                jobs.append(Job(arch=arch, op=op, **dict(row, variant={SPEC_KEY: "common"})))
    return jobs


def _params(fn):
    """``(name, is_constexpr)`` of each parameter of the ``@triton.jit`` function ``fn`` (compiled or
    interpreted), in order."""
    params = inspect.signature(getattr(fn, "fn", fn)).parameters.values()
    return [(p.name, "constexpr" in str(p.annotation)) for p in params]


def _signature(fn, consts: dict, kind, specialization: str = "generic"):
    """ASTSource signature, constexprs and attributes of ``fn``; ``kind(name)`` is the op's ``arg_kind``,
    its "size" and "count" arguments as ``specialization`` (a key of :data:`SPECIALIZATIONS`) sees them."""
    signature, consts, attrs = {}, dict(consts), {}
    divisible = [["tt.divisibility", 16]]
    resolve = SPECIALIZATIONS[specialization]
    for idx, (name, is_constexpr) in enumerate(_params(fn)):
        if is_constexpr:
            signature[name] = "constexpr"
            continue
        k = kind(name)
        k = resolve.get(k, k)
        if k == "one":
            signature[name] = "constexpr"
            consts[name] = 1
        elif k == "i32:16":
            signature[name] = "i32"
            attrs[(idx,)] = divisible
        else:
            signature[name] = k
            if k.startswith("*"):
                attrs[(idx,)] = divisible
    missing = [name for name, is_constexpr in _params(fn) if is_constexpr and name not in consts]
    if missing:
        raise ValueError(f"{fn.__name__}: no value for constexpr {missing}")
    return signature, consts, attrs


def _ast_source(fn, signature, consts, attrs):
    from triton.compiler import ASTSource

    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" in params:  # the newer name of the argument
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

    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # a notice the compiler prints per compile

    mod = _op_aot(job.op)
    fn, _, flags = mod.kernel_table()[job.kernel]
    cfg = dict(job.config)
    options = {key: cfg.pop(key) for key in ("num_warps", "num_stages") if key in cfg}
    consts = dict(flags, **cfg)
    consts.update(mod.derived_constexprs(fn, job.dtype, job.head_dim))
    consts.update({k: v for k, v in (job.variant or {}).items() if k != SPEC_KEY})
    result = Result(job.kernel, job.config, job.arch, job.dtype, job.head_dim, None, None, None, None, None,
                    variant=_variant_name(job.variant), specialization=job.specialization)
    try:
        signature, consts, attrs = _signature(fn, consts, lambda name: mod.arg_kind(job.kernel, name, job.dtype,
                                                                                    consts), job.specialization)
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
    short = {"BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_ROWS": "R", "BLOCK_T": "T", "BLOCK_D": "BD", "num_warps": "w",
             "num_stages": "s"}
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


class _Progress:
    """Progress of one arch's compile on stderr, flushed: a line when it starts, then ``done/total`` at
    most every :data:`PROGRESS_EVERY_S` seconds and after the last job (a full compile takes minutes)."""

    def __init__(self, arch: int, total: int, workers: int):
        self.arch, self.total, self.done, self.failed = arch, total, 0, 0
        self.start = self.last = time.monotonic()
        plural = "" if workers == 1 else "s"
        self._print(f"compiling {total} kernels for sm_{arch} with {workers} worker{plural}...")

    @staticmethod
    def _print(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def step(self, result: Result) -> None:
        self.done += 1
        self.failed += not result.ok
        now = time.monotonic()
        if self.done == self.total or now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            failed = f", {self.failed} not ok" if self.failed else ""
            self._print(f"  sm_{self.arch}: {self.done}/{self.total} compiled{failed} ({now - self.start:.0f} s)")


def run_aot(arch: int, quick: bool = False, workers: Optional[int] = None) -> List[Result]:
    """Compile every job for ``arch`` (80 or 90) and return the results in job order."""
    jobs = jobs_for(arch, quick)
    workers = max(1, workers or min(len(jobs), os.cpu_count() or 1))
    progress = _Progress(arch, len(jobs), workers)
    if workers == 1:
        results = []
        for job in jobs:
            results.append(compile_job(job))
            progress.step(results[-1])
        return results
    results: List[Optional[Result]] = [None] * len(jobs)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(compile_job, job): i for i, job in enumerate(jobs)}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            progress.step(results[futures[future]])
    return results


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", type=int, choices=sorted(SHARED_LIMIT), action="append",
                        help="target compute capability (repeatable; default: 80 and 90)")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="write the results as a JSON list to PATH (stdout with no PATH: then no table)")
    parser.add_argument("--quick", action="store_true",
                        help="a short list per op: segment attention at head dims 64 and 128, the handoff at "
                             "d=768, bfloat16, plus each op's variants; the associative memory at key dim 64 "
                             "without flag variants")
    parser.add_argument("--workers", type=int, default=None, help="parallel compiles (default: CPU count)")
    parser.add_argument("--cuda", action="store_true",
                        help="compile the CUDA C++ kernels of csrc/ with nvcc instead (sm_80 and sm_90a); "
                             "takes --arch and --json, not --quick or --workers")
    parser.set_defaults(aot_parser=parser)


def _reject_cuda_options(args) -> None:
    """``--cuda`` with an option of the Triton compile is a usage error (status 2), raised before any work."""
    given = [flag for flag, value in (("--quick", args.quick), ("--workers", args.workers is not None)) if value]
    if args.cuda and given:
        parser = getattr(args, "aot_parser", None) or argparse.ArgumentParser(prog="rmt-kernels aot")
        parser.error(f"argument --cuda: not allowed with {' or '.join(given)} (--quick and --workers apply "
                     f"to the Triton compile only)")


def run(args) -> int:
    _reject_cuda_options(args)
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
