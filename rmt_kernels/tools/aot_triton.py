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

The SASS (``cuobjdump --dump-sass``) is also read for the tensor-core pipeline (:func:`sass_summary`,
pure Python): ``hgmma_shapes`` (``{"64x128x16": count}``, M x N x K of every ``HGMMA``; the table's
``hgmma N`` column lists the N widths), ``uses_tma`` (a TMA load, ``UTMALDG``; column ``tma``),
``mma_loops`` (each loop holding ``HGMMA``/``HMMA``: its products per shape, ``hgmma`` and ``hmma``,
warpgroup waits ``WARPGROUP.DEPBAR``, block barriers ``BAR.SYNC``... and TMA loads per iteration) and
``main_loop``, the one of them with the most products (column ``wait/bar``: its waits / barriers). A
loop is a natural loop of the control flow, closed by a branch back to an instruction that every path
to the branch passes (its header); the instructions of loops nested in it are not counted in it.
``--json`` writes every field of :class:`Result` per job, plus ``ok``.

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
from typing import Dict, List, Optional

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
    # From the SASS (:func:`sass_summary`): HGMMA shapes and counts, TMA loads, the loops with tensor-core
    # products (products, warpgroup waits, block barriers and TMA loads per iteration) and the main one.
    hgmma_shapes: Optional[Dict[str, int]] = None
    uses_tma: Optional[bool] = None
    mma_loops: Optional[List[dict]] = None
    main_loop: Optional[dict] = None

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


# ----------------------------------------------------------------------------------------------- SASS
# What the SASS of a kernel says about its tensor-core pipeline, read from ``cuobjdump --dump-sass``
# (or ``nvdisasm``) text without a GPU: :func:`sass_summary`.

# One instruction: ``/*1ad0*/  @!P2 BRA 0x36d0 ;`` (address, predicate, opcode, operands).
_SASS_INSTR = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(@!?U?P(?:T|\d+)\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
# A label (nvdisasm's listing): ``.L_x_12:``, the address of the next instruction.
_SASS_LABEL = re.compile(r"^\s*(\.L\w*):\s*$")
# Where a function starts: ``Function : name`` (cuobjdump), ``.text.name:`` (nvdisasm).
_SASS_FUNCTION = re.compile(r"^\s*(?:Function\s*:\s*\S+|\.text\.\S+:)\s*$")
# A branch target: a label `` `(.L_x_12) `` or an absolute address ``0x36d0``; the last one of the operands.
_SASS_TARGET = re.compile(r"`\((\.L\w*)\)|\b0x([0-9a-fA-F]+)\b")
# Branches to a target; CALL returns to the next instruction (and ``@P0 CALL.REL.NOINC`` is also how
# ptxas leaves an sm_80 loop). Unpredicated, the others end a path.
_SASS_JUMPS = ("BRA", "JMP", "CALL")
_SASS_ENDS = ("EXIT", "RET", "BRX", "JMX", "KILL", "BPT")


def _sass_functions(sass: str):
    """``[(instructions, labels)]`` of each function of a SASS listing: ``(address, predicate, opcode,
    operands)`` in listing order and ``{label: address}``."""
    functions = [([], {})]
    pending = []
    for line in sass.splitlines():
        if _SASS_FUNCTION.match(line):
            functions.append(([], {}))
            pending = []
        elif _SASS_LABEL.match(line):
            pending.append(_SASS_LABEL.match(line).group(1))
        else:
            m = _SASS_INSTR.match(line)
            if m:
                addr = int(m.group(1), 16)
                instrs, labels = functions[-1]
                instrs.append((addr, (m.group(2) or "").strip(), m.group(3), m.group(4).strip()))
                labels.update((label, addr) for label in pending)
                pending = []
    return [f for f in functions if f[0]]


def _sass_successors(instrs, labels):
    """Indices of the instructions that can run after each instruction."""
    index = {addr: i for i, (addr, *_) in enumerate(instrs)}
    succ = []
    for i, (_, pred, op, args) in enumerate(instrs):
        base, out, falls = op.split(".")[0], [], True
        if pred not in ("@!PT", "@!UPT") and base in _SASS_JUMPS + _SASS_ENDS:
            if base in _SASS_JUMPS:
                targets = _SASS_TARGET.findall(args)
                if targets:
                    label, addr = targets[-1]
                    target = labels.get(label) if label else int(addr, 16)
                    if target in index:
                        out.append(index[target])
            # Taken always: unpredicated, and no condition among the operands (``BRA.U !UP0, 0x..``).
            falls = base == "CALL" or pred not in ("", "@PT", "@UPT") or "," in args
        if falls and i + 1 < len(instrs):
            out.append(i + 1)
        succ.append(out)
    return succ


def _sass_loops(instrs, labels):
    """The natural loops of one function: ``[(header index, body)]``, ``body`` the set of instruction
    indices of the loop (nested loops included), in header order. A loop is closed by a back edge, a
    branch to an instruction that every path from the entry to the branch passes (its header), as a
    ``BRA`` back to the top of a loop body; the back edges of one header make one loop."""
    succ = _sass_successors(instrs, labels)
    order, seen, stack = [], {0}, [(0, iter(succ[0]))]  # reverse postorder from the entry
    while stack:
        node, rest = stack[-1]
        nxt = next((s for s in rest if s not in seen), None)
        if nxt is None:
            stack.pop()
            order.append(node)
        else:
            seen.add(nxt)
            stack.append((nxt, iter(succ[nxt])))
    order.reverse()
    rank = {node: k for k, node in enumerate(order)}
    preds = {node: [] for node in order}
    for node in order:
        for s in succ[node]:
            preds[s].append(node)

    idom = {0: 0}  # immediate dominators (Cooper, Harvey and Kennedy's iteration)

    def meet(a, b):
        while a != b:
            while rank[a] > rank[b]:
                a = idom[a]
            while rank[b] > rank[a]:
                b = idom[b]
        return a

    changed = True
    while changed:
        changed = False
        for node in order[1:]:
            done = [p for p in preds[node] if p in idom]
            new = done[0]
            for p in done[1:]:
                new = meet(p, new)
            if idom.get(node) != new:
                idom[node], changed = new, True

    def dominates(h, u):
        while u != h and u != 0:
            u = idom[u]
        return u == h

    loops = {}
    for node in order:
        for h in succ[node]:
            if rank[h] <= rank[node] and dominates(h, node):
                body, work = loops.setdefault(h, {h}), [node]
                while work:
                    x = work.pop()
                    if x not in body:
                        body.add(x)
                        work.extend(preds[x])
    return sorted(loops.items())


def _sass_counts(ops) -> dict:
    """The tensor-core products, warpgroup waits, block barriers and TMA loads among opcodes ``ops``;
    ``hgmma``: ``{"64x128x16": count}`` of ``HGMMA.64x128x16.F32.BF16`` and the like."""
    hgmma = {}
    for op in ops:
        parts = op.split(".")
        if parts[0] == "HGMMA" and len(parts) > 1:
            hgmma[parts[1]] = hgmma.get(parts[1], 0) + 1
    return dict(
        hgmma=dict(sorted(hgmma.items(), key=lambda kv: [int(x) if x.isdigit() else 0 for x in kv[0].split("x")])),
        hmma=sum(op.split(".")[0] == "HMMA" for op in ops),
        warpgroup_waits=sum(op.startswith("WARPGROUP.DEPBAR") for op in ops),
        barriers=sum(op.split(".")[0] == "BAR" and not op.startswith("BAR.ARV") for op in ops),
        tma_loads=sum(op.startswith("UTMALDG") for op in ops),
    )


def _loop_rank(loop: dict):
    return sum(loop["hgmma"].values()) + loop["hmma"], loop["tma_loads"]


def sass_summary(sass: str) -> dict:
    """What the SASS listing ``sass`` (``cuobjdump --dump-sass``; nvdisasm's labelled form too) says:

    - ``hgmma_shapes``: ``{"64x128x16": count}`` of the ``HGMMA`` instructions (static counts);
    - ``uses_tma``: whether it holds a TMA load (``UTMALDG``);
    - ``mma_loops``: every loop holding tensor-core products (``HGMMA`` or ``HMMA``) of its own, in
      address order, each ``address`` (of its header, hex), ``instructions``, ``hgmma`` (per shape),
      ``hmma``, ``warpgroup_waits`` (``WARPGROUP.DEPBAR``), ``barriers`` (``BAR.SYNC``, ``BAR.RED``, ...;
      not ``BAR.ARV``) and ``tma_loads`` (``UTMALDG``) per iteration: the instructions of the loop body,
      less those of loops nested in it;
    - ``main_loop``: the one of those with the most products, then the most TMA loads, then the last of
      equals (None without any).
    """
    all_ops, loops = [], []
    for instrs, labels in _sass_functions(sass):
        all_ops.extend(op for _, _, op, _ in instrs)
        found = _sass_loops(instrs, labels)
        owner = {}
        for h, body in sorted(found, key=lambda loop: len(loop[1]), reverse=True):
            owner.update((i, h) for i in body)  # the innermost loop holding each instruction wins
        for h, body in found:
            own = [instrs[i][2] for i in sorted(body) if owner[i] == h]
            loops.append(dict(address=hex(instrs[h][0]), instructions=len(own), **_sass_counts(own)))
    mma = [loop for loop in loops if loop["hgmma"] or loop["hmma"]]
    main = None
    for loop in mma:  # the last of equals wins
        if main is None or _loop_rank(loop) >= _loop_rank(main):
            main = loop
    return dict(hgmma_shapes=_sass_counts(all_ops)["hgmma"], uses_tma=any(op.startswith("UTMALDG") for op in all_ops),
                mma_loops=mma, main_loop=main)


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
        summary = sass_summary(sass)
        result.hgmma_shapes, result.uses_tma = summary["hgmma_shapes"], summary["uses_tma"]
        result.mma_loops, result.main_loop = summary["mma_loops"], summary["main_loop"]
    except Exception as exc:  # reported per job; the exit status says it failed
        result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    return result


def _config_str(cfg: dict) -> str:
    """``M128 N64 w8 s3 TMA``: a flag that is True by its name, one that is False not at all."""
    short = {"BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_ROWS": "R", "BLOCK_T": "T", "BLOCK_D": "BD", "num_warps": "w",
             "num_stages": "s", "WARP_SPECIALIZE": "WS"}
    return " ".join(short.get(k, k) if v is True else f"{short.get(k, k)}{v}" for k, v in cfg.items() if v is not False)


def _sass_columns(r: Result):
    """The table's SASS columns: the N widths of the HGMMA shapes (``no`` without HGMMA), ``tma``, and
    the main loop's warpgroup waits / block barriers per iteration; ``-`` where they do not apply."""
    hopper = r.arch >= 90 and r.hgmma_shapes is not None
    widths = sorted({int(n) for n in (s.split("x")[1] for s in r.hgmma_shapes or {} if "x" in s) if n.isdigit()})
    hgmma = (",".join(map(str, widths)) or "no") if hopper else "-"
    tma = ("yes" if r.uses_tma else "no") if hopper else "-"
    loop = f"{r.main_loop['warpgroup_waits']}/{r.main_loop['barriers']}" if r.main_loop else "-"
    return hgmma, tma, loop


def format_table(results: List[Result]) -> str:
    head = (f"{'kernel':<34} {'dtype':<5} {'D':>4} {'config':<22} {'regs':>4} {'spill':>5} {'smem KiB':>8} "
            f"{'hgmma N':>9} {'tma':>3} {'wait/bar':>8}  status")
    lines = [head, "-" * len(head)]
    for r in results:
        if r.error:
            lines.append(f"{r.name:<34} {r.dtype:<5} {r.head_dim:>4} {_config_str(r.config):<22} FAILED: {r.error}"
                         f"  [{r.variant}]")
            continue
        status = "ok"
        if r.spill_bytes:
            status = "SPILL"
        elif r.shared_bytes > SHARED_LIMIT[r.arch]:
            status = "SHARED OVER LIMIT"
        hgmma, tma, loop = _sass_columns(r)
        variant = "" if r.variant == "full" else f"  [{r.variant}]"
        lines.append(
            f"{r.name:<34} {r.dtype:<5} {r.head_dim:>4} {_config_str(r.config):<22} {r.registers:>4} "
            f"{r.spill_bytes:>5} {r.shared_bytes / 1024:>8.1f} {hgmma:>9} {tma:>3} {loop:>8}  {status}{variant}"
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
