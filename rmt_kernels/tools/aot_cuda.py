"""Compile every CUDA kernel of ``csrc/`` for GPU targets without a GPU, and report its resources.

Each translation unit (``csrc/<op>/*.cu``: the launch file of every op folder, which holds its kernels
and no torch code) is compiled with ``nvcc -gencode=arch=compute_XX,code=sm_XX -c``, with ``csrc/`` as
the include dir, for every target (default sm_80 and sm_90a), in parallel. ``cuobjdump`` (the system
one, else the copy in the triton wheel) then reads, per kernel, registers, stack and local memory
(spills), static shared memory, and from the SASS whether the products run on tensor cores (``HMMA``;
``HGMMA`` is Hopper's warpgroup MMA). The dynamic shared memory the attention launches request comes
from ``csrc/segment_attention/segment_attention_config.h`` (through ``csrc/tools/kernel_table.cpp``,
compiled with the host C++ compiler) and is added in.

Rows have the fields of the Triton report (``rmt_kernels/tools/aot_triton.py``): name, config, arch,
dtype, head_dim, registers, spill_bytes, shared_bytes, uses_wgmma, uses_mma, error, ok. ``rmt-kernels
aot --cuda`` prints them; a compile error, a spill or shared memory over the target's limit fails it.

Example::

    >>> rows = compile_cuda_kernels(archs=("80", "90a"))
    >>> all(r["ok"] for r in rows)
    True
"""

from __future__ import annotations

import json as _json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# The flags of the real builds: torch's cpp_extension adds the -D__CUDA_NO_* defines and
# --expt-relaxed-constexpr to every nvcc call; rmt_kernels adds -O3 --use_fast_math.
NVCC_FLAGS = (
    "-std=c++17", "-O3", "--use_fast_math", "-Xcompiler", "-fPIC",
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr",
)
DEFAULT_ARCHS = ("80", "90a")

_TYPE_NAMES = {"__half": "fp16", "__nv_bfloat16": "bf16", "f": "fp32", "uint4": "16B", "t": "u16", "j": "u32"}


def csrc_dir() -> Path:
    from .._extension import csrc_dir as find

    return find()


def translation_units(root: Optional[Path] = None) -> List[Path]:
    """Every kernel translation unit: the ``.cu`` launch file of every op folder, ``csrc/<op>/*.cu``
    (not ``csrc/tools/``)."""
    from .._extension import sources

    return [s for s in sources(root or csrc_dir()) if s.suffix == ".cu"]


def find_nvcc() -> str:
    """nvcc from ``CUDA_HOME`` / ``CUDA_PATH``, the ``PATH`` or ``/usr/local/cuda``; FileNotFoundError
    if none."""
    candidates = [os.path.join(os.environ[v], "bin", "nvcc") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    for path in candidates:
        if path and os.path.exists(path):
            return path
    raise FileNotFoundError("nvcc not found: install the CUDA toolkit or set CUDA_HOME")


def find_cuobjdump(nvcc: Optional[str] = None) -> str:
    """cuobjdump next to nvcc or on the ``PATH``, else the one the triton wheel ships."""
    candidates = []
    if nvcc:
        candidates.append(os.path.join(os.path.dirname(os.path.realpath(nvcc)), "cuobjdump"))
    candidates.append(shutil.which("cuobjdump") or "")
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    for path in candidates:
        if path and os.path.exists(path):
            return path
    raise FileNotFoundError("cuobjdump not found (CUDA toolkit, or pip install triton which ships one)")


def _arch_number(arch: str) -> int:
    return int(re.match(r"\d+", arch).group(0))


def kernel_table(work: Path) -> Dict[Tuple[str, int], dict]:
    """``(kernel name, head dim) -> {"BLOCK_M", "BLOCK_N", "threads", "smem"}`` of the attention kernels,
    from the config header (compiled and run on the host)."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise FileNotFoundError("no host C++ compiler (g++) for csrc/tools/kernel_table.cpp")
    exe = work / "kernel_table"
    root = csrc_dir()
    subprocess.run([compiler, "-std=c++17", "-O0", "-I", str(root), "-o", str(exe),
                    str(root / "tools" / "kernel_table.cpp")], check=True, capture_output=True, text=True)
    table = {}
    for line in subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines():
        name, d, bm, bn, threads, smem = line.split()
        table[(name, int(d))] = {"BLOCK_M": int(bm), "BLOCK_N": int(bn), "threads": int(threads), "smem": int(smem)}
    return table


def demangle(symbol: str) -> Tuple[str, str, Optional[int]]:
    """``(kernel name, dtype or copy unit, head dim)`` of an ``rmt::`` kernel symbol such as
    ``_ZN3rmt28segment_attention_fwd_kernelI6__halfLi128EEEv...``."""
    match = re.match(r"_ZN3rmt(\d+)", symbol)
    if match is None:
        return symbol, "-", None
    start = match.end()
    name = symbol[start : start + int(match.group(1))]
    rest = symbol[start + int(match.group(1)) :]
    dtype, head_dim = "-", None
    targ = re.match(r"I(?:(\d+)|([a-z]))", rest)
    if targ is not None:
        if targ.group(1):
            ident = rest[targ.end() : targ.end() + int(targ.group(1))]
            tail = rest[targ.end() + int(targ.group(1)) :]
        else:
            ident, tail = targ.group(2), rest[targ.end() :]
        dtype = _TYPE_NAMES.get(ident, ident)
        dim = re.match(r"Li(\d+)E", tail)
        head_dim = int(dim.group(1)) if dim else None
    return name, dtype, head_dim


def _split_sass(sass: str) -> Dict[str, str]:
    parts = re.split(r"^\s*Function : (\S+)\s*$", sass, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _compile(source: Path, arch: str, out_dir: Path, nvcc: str,
             include: Path) -> Tuple[Optional[Path], Optional[str]]:
    obj = out_dir / f"{source.stem}.sm_{arch}.o"
    cmd = [nvcc, *NVCC_FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}", "-I", str(include), "-c",
           str(source), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if "error" in ln.lower()] or lines
        return None, f"nvcc failed on {source.name} for sm_{arch}: " + " | ".join(errors[:5])
    return obj, None


def _rows_for(obj: Path, arch: str, cuobjdump: str, table: Dict[Tuple[str, int], dict]) -> List[dict]:
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", str(obj)], check=True, capture_output=True,
                           text=True).stdout
    sass = _split_sass(subprocess.run([cuobjdump, "--dump-sass", str(obj)], check=True, capture_output=True,
                                      text=True).stdout)
    number = _arch_number(arch)
    rows = []
    for symbol, fields in re.findall(r"Function (\S+):\s*\n\s*(.*)", usage):
        values = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", fields))
        name, dtype, head_dim = demangle(symbol)
        entry = table.get((name, head_dim or 0), {})
        code = sass.get(symbol, "")
        shared = int(values.get("SHARED", 0)) + entry.get("smem", 0)
        spill = int(values.get("STACK", 0)) + int(values.get("LOCAL", 0))
        rows.append({
            "name": name,
            "config": {k: v for k, v in entry.items() if k != "smem"},
            "arch": number,
            "dtype": dtype,
            "head_dim": head_dim,
            "registers": int(values.get("REG", 0)),
            "spill_bytes": spill,
            "shared_bytes": shared,
            "uses_wgmma": "HGMMA" in code,
            "uses_mma": "HMMA" in code or "HGMMA" in code,
            "error": None,
            "ok": spill == 0 and shared <= SHARED_LIMIT.get(number, SHARED_LIMIT[80]),
        })
    return sorted(rows, key=lambda r: (r["name"], r["dtype"], r["head_dim"] or 0))


def compile_cuda_kernels(
    archs: Sequence[str] = DEFAULT_ARCHS,
    json: bool = False,
    *,
    build_dir: Optional[str] = None,
    workers: Optional[int] = None,
) -> List[dict]:
    """Compile every kernel translation unit for every target and report each kernel.

    Args:
        archs: targets as nvcc spells them after ``sm_`` (``"80"``, ``"90a"``); default sm_80 and sm_90a.
        json: also print the rows as a JSON list on stdout.
        build_dir: keep the object files there (``<unit>.sm_<arch>.o``, position-independent); default a
            temporary directory, removed afterwards.
        workers: parallel nvcc processes (default: one per CPU, at most one per unit and target).

    Returns:
        One dict per kernel and target (the Triton report's fields; ``arch`` is the number, 80 or 90),
        sorted by target, unit and kernel; a unit that fails to compile gives one row with ``error``
        set and ``ok`` False.

    Raises:
        FileNotFoundError: no nvcc, no cuobjdump or no host C++ compiler.
        ValueError: an architecture that is not like ``"80"`` / ``"90a"``.

    Example::

        >>> [r["name"] for r in compile_cuda_kernels(("80",)) if not r["ok"]]
        []
    """
    for arch in archs:
        if not re.fullmatch(r"\d{2,3}[af]?", str(arch)):
            raise ValueError(f"arch must look like '80' or '90a', got {arch!r}")
    nvcc = find_nvcc()
    cuobjdump = find_cuobjdump(nvcc)
    with tempfile.TemporaryDirectory(prefix="rmt_aot_cuda_") as tmp:
        out_dir = Path(build_dir) if build_dir else Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        table = kernel_table(Path(tmp))
        root = csrc_dir()
        jobs = [(tu, str(arch)) for arch in archs for tu in translation_units(root)]
        workers = workers or max(1, min(len(jobs), os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            compiled = list(pool.map(lambda job: _compile(job[0], job[1], out_dir, nvcc, root), jobs))
        rows: List[dict] = []
        for (tu, arch), (obj, error) in zip(jobs, compiled):
            if error is not None:
                rows.append({"name": tu.name, "config": {}, "arch": _arch_number(arch), "dtype": "-", "head_dim": None,
                             "registers": None, "spill_bytes": None, "shared_bytes": None, "uses_wgmma": None,
                             "uses_mma": None, "error": error, "ok": False})
            else:
                rows.extend(_rows_for(obj, arch, cuobjdump, table))
    if json:
        _json.dump(rows, sys.stdout, indent=1)
        print()
    return rows


def expected_attention_kernels(rows: Iterable[dict]) -> List[Tuple[str, str, int]]:
    """``(name, dtype, head dim)`` of the attention kernels the launch file must instantiate (every
    table entry in float16 and bfloat16) that are missing from ``rows`` of one target."""
    present = {(r["name"], r["dtype"], r["head_dim"] or 0) for r in rows}
    with tempfile.TemporaryDirectory(prefix="rmt_aot_cuda_") as tmp:
        wanted = {(name, dtype, d) for (name, d) in kernel_table(Path(tmp)) for dtype in ("fp16", "bf16")}
    return sorted(wanted - present)


def format_table(rows: List[dict]) -> str:
    """A text table of :func:`compile_cuda_kernels` rows of one target."""
    head = f"{'kernel':<40} {'dtype':<5} {'D':>4} {'regs':>4} {'spill':>5} {'smem KiB':>8} {'mma':>4} {'wgmma':>5}  status"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["error"]:
            lines.append(f"{r['name']:<40} FAILED: {r['error']}")
            continue
        status = "ok"
        if r["spill_bytes"]:
            status = "SPILL"
        elif not r["ok"]:
            status = "SHARED OVER LIMIT"
        d = r["head_dim"] if r["head_dim"] else "-"
        mma = "yes" if r["uses_mma"] else "no"
        wg = "yes" if r["uses_wgmma"] else "no"
        lines.append(f"{r['name']:<40} {r['dtype']:<5} {d:>4} {r['registers']:>4} {r['spill_bytes']:>5} "
                     f"{r['shared_bytes'] / 1024:>8.1f} {mma:>4} {wg:>5}  {status}")
    return "\n".join(lines)


def main(archs: Optional[Sequence[int]] = None, json_path: Optional[str] = None) -> int:
    """``rmt-kernels aot --cuda``: ``archs`` as compute capabilities (80, 90; 90 compiles sm_90a);
    ``json_path`` as the Triton report's ``--json`` (``"-"``: JSON on stdout instead of the table).
    Returns the exit status: 0 all ok, 1 a compile error / spill / shared memory over the limit, 2 when
    the tools are missing."""
    targets = [f"{a}a" if int(a) >= 90 else str(a) for a in (archs or (80, 90))]
    try:
        rows = compile_cuda_kernels(targets, json=json_path == "-")
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if json_path != "-":
        for arch in sorted({r["arch"] for r in rows}):
            print(f"sm_{arch}{'a' if arch >= 90 else ''} (CUDA C++, csrc/)")
            print(format_table([r for r in rows if r["arch"] == arch]))
            print()
        if json_path:
            with open(json_path, "w") as f:
                _json.dump(rows, f, indent=1)
    bad = [r for r in rows if not r["ok"]]
    summary = f"{len(rows) - len(bad)} of {len(rows)} CUDA kernels ok"
    print(summary if not bad else f"{summary}; {len(bad)} FAILED (compile error, spill or shared memory over limit)",
          file=sys.stderr)
    return 1 if bad else 0
