"""The CUDA backend without a GPU: every kernel compiles for sm_80 and sm_90a with no spills, the C++
mask header classifies tiles exactly like ``MemoryLayout``, the torch binding links and matches the
launchers' calls, and ``backend="cuda"`` says what is missing where it cannot run.

nvcc compiles each translation unit once per target per session (both targets in parallel), while
the binding compiles beside it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
import threading
import time
from pathlib import Path

import pytest
import torch

from rmt_kernels import BackendUnavailableError, MemoryLayout, pack_segment, segment_attention
from rmt_kernels import _extension as cuda_build
from rmt_kernels import backends, cli
from rmt_kernels.layout import TILE_EMPTY
from rmt_kernels.tools import aot_cuda
from rmt_kernels.ops.pack_segment import cuda as pack_cuda
from rmt_kernels.ops.segment_attention import cuda as attn_cuda

MB = "memory_bidirectional"
ARCHS = ("80", "90a")


def _tools_missing():
    try:
        nvcc = aot_cuda.find_nvcc()
        aot_cuda.find_cuobjdump(nvcc)
    except FileNotFoundError as exc:
        return str(exc)
    if shutil.which("g++") is None:
        return "no g++"
    return None


needs_tools = pytest.mark.skipif(_tools_missing() is not None, reason=f"CUDA toolchain missing: {_tools_missing()}")


def _binding_compile(out: Path) -> subprocess.Popen:
    """Start compiling csrc/bindings.cpp against the installed torch (CPU or CUDA build), position
    independent, as a background process."""
    from torch.utils.cpp_extension import include_paths

    flags = ["-std=c++20", "-O0", "-fPIC", "-DTORCH_EXTENSION_NAME=rmt_kernels_C_probe", "-D_GLIBCXX_USE_CXX11_ABI="
             f"{int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    root = cuda_build.csrc_dir()
    cmd = ["g++", *flags, *includes, "-I", str(root), "-c", str(root / "bindings.cpp"), "-o", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="session")
def cuda_build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cuda_aot")


@pytest.fixture(scope="session")
def binding_object(cuda_build_dir):
    """The compile of bindings.cpp, started before the kernels' and awaited by whoever needs it."""
    return cuda_build_dir / "bindings.o", _binding_compile(cuda_build_dir / "bindings.o")


@pytest.fixture(scope="session")
def aot_rows(cuda_build_dir, binding_object):
    """``compile_cuda_kernels`` for sm_80 and sm_90a, once per session; objects kept for the link test."""
    return aot_cuda.compile_cuda_kernels(ARCHS, build_dir=str(cuda_build_dir))


# ------------------------------------------------------------------------------------------ aot


@needs_tools
def test_every_kernel_compiles_for_sm80_and_sm90a_without_spills(aot_rows):
    errors = [r["error"] for r in aot_rows if r["error"]]
    assert not errors, "\n".join(errors)
    for arch in (80, 90):
        rows = [r for r in aot_rows if r["arch"] == arch]
        assert not aot_cuda.expected_attention_kernels(rows), f"sm_{arch}: attention kernels missing"
        names = {r["name"] for r in rows}
        assert {"pack_segment_fwd_kernel", "pack_memory_grad_kernel", "pack_embedding_grad_atomic_kernel",
                "pack_embedding_grad_sorted_kernel"} <= names
        for r in rows:
            assert r["spill_bytes"] == 0, f"sm_{arch} {r['name']} {r['dtype']} D={r['head_dim']} spills"
            assert r["shared_bytes"] <= aot_cuda.SHARED_LIMIT[arch], r
            assert r["ok"]
            assert 0 < r["registers"] <= 255
            if r["name"] in ("segment_attention_fwd_kernel", "segment_attention_bwd_dq_kernel",
                             "segment_attention_bwd_dkdv_kernel"):
                assert r["uses_mma"], f"{r['name']} does not run on tensor cores"
                assert r["shared_bytes"] > 0 and r["config"]["threads"] > 0
    assert set(aot_rows[0]) == {"name", "config", "arch", "dtype", "head_dim", "registers", "spill_bytes",
                                "shared_bytes", "uses_wgmma", "uses_mma", "error", "ok"}


def test_aot_main_fails_on_a_bad_kernel(monkeypatch, capsys):
    good = {"name": "k", "config": {}, "arch": 80, "dtype": "bf16", "head_dim": 64, "registers": 100,
            "spill_bytes": 0, "shared_bytes": 1024, "uses_wgmma": False, "uses_mma": True, "error": None, "ok": True}
    spill = dict(good, spill_bytes=8, ok=False)
    failed = dict(good, name="x.cu", registers=None, spill_bytes=None, shared_bytes=None, error="nvcc failed", ok=False)
    for rows, status in (([good], 0), ([good, spill], 1), ([failed], 1)):
        monkeypatch.setattr(aot_cuda, "compile_cuda_kernels", lambda archs, json=False, rows=rows: rows)
        assert aot_cuda.main([80], None) == status
    out = capsys.readouterr()
    assert "SPILL" in out.out and "FAILED: nvcc failed" in out.out and "FAILED" in out.err


@pytest.mark.parametrize(
    "symbol, expected",
    [
        pytest.param("_ZN3rmt28segment_attention_fwd_kernelI6__halfLi128EEEvNS_22SegmentAttentionParamsE",
                     ("segment_attention_fwd_kernel", "fp16", 128), id="fwd-fp16-128"),
        pytest.param("_ZN3rmt33segment_attention_bwd_dkdv_kernelI13__nv_bfloat16Li64EEEvNS_22SegmentAttentionParamsEi",
                     ("segment_attention_bwd_dkdv_kernel", "bf16", 64), id="dkdv-bf16-64"),
        pytest.param("_ZN3rmt23pack_segment_fwd_kernelI5uint4EEvNS_10PackParamsE", ("pack_segment_fwd_kernel", "16B", None),
                     id="pack-uint4"),
        pytest.param("_ZN3rmt23pack_memory_grad_kernelIfEEvNS_16MemoryGradParamsE", ("pack_memory_grad_kernel", "fp32", None),
                     id="memory-grad-float"),
    ],
)
def test_demangle(symbol, expected):
    assert aot_cuda.demangle(symbol) == expected


def test_compile_cuda_kernels_rejects_bad_arch():
    with pytest.raises(ValueError, match="arch"):
        aot_cuda.compile_cuda_kernels(["sm80"])


# ------------------------------------------------------------------------------------------ mask header

# (layout, S, P, segment_lengths): SPEC section 4's edge cases and shapes.
LAYOUT_CASES = [
    pytest.param(MemoryLayout(0, 0, "causal"), 1, 0, [1, 0], id="S1-M0-causal"),
    pytest.param(MemoryLayout(16, 16, MB, "segment"), 17, 37, [17, 0, 5], id="S17-M16-mb-P37-seg-padded"),
    pytest.param(MemoryLayout(5, 5, MB, "all"), 63, 1, [63, 20], id="S63-M5-mb-P1-all"),
    pytest.param(MemoryLayout(1, 0, "causal"), 64, 0, [64, 0], id="S64-M1-read-only-causal-fully-padded"),
    pytest.param(MemoryLayout(0, 16, "full", "segment"), 65, 37, [65, 64, 1], id="S65-M16-write-only-full-P37"),
    pytest.param(MemoryLayout(16, 0, MB, "all"), 127, 1, [127, 1], id="S127-M16-read-only-mb-P1-all"),
    pytest.param(MemoryLayout(16, 16, "causal", "all"), 1000, 37, [1000, 613, 0], id="S1000-M16-causal-P37-all"),
    pytest.param(MemoryLayout(16, 16, MB, "segment"), 1000, 0, [1000, 64, 700], id="S1000-M16-mb-hole-over-tiles"),
    pytest.param(MemoryLayout(16, 16, "causal"), 512, 0, [512, 300], id="gpt2-rmt-S512-M16"),
    pytest.param(MemoryLayout(0, 0, "full"), 512, 0, [512, 260], id="bert-rmt-S512-encoder"),
    pytest.param(MemoryLayout(128, 128, MB, "all"), 1024, 1, [1024, 1000], id="llama-M128-S1024-P1-all"),
    pytest.param(MemoryLayout(0, 32, "causal", "segment"), 1024, 37, [1024, 129], id="armt-W32-S1024-P37"),
]

# (BLOCK_M, BLOCK_N): the kernels' tiles (csrc/segment_attention/segment_attention_config.h) and small
# odd ones.
BLOCKS = [(128, 64), (64, 64), (32, 64), (64, 32), (16, 16), (48, 80)]


@pytest.fixture(scope="module")
def layout_probe(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("no g++ to compile csrc/tools/layout_probe.cpp")
    exe = tmp_path_factory.mktemp("probe") / "layout_probe"
    root = cuda_build.csrc_dir()
    subprocess.run(["g++", "-std=c++17", "-O1", "-Wall", "-Werror", "-I", str(root), "-o", str(exe),
                    str(root / "tools" / "layout_probe.cpp")], check=True, capture_output=True)
    return exe


def _probe(exe, layout, s, p, length, bm, bn):
    mask = {"causal": 0, MB: 1, "full": 2}[layout.mask]
    line = f"{layout.num_read} {s} {layout.num_write} {p} {mask} {int(layout.prefix_visible_to == 'all')} {bm} {bn} {length}\n"
    out = subprocess.run([str(exe)], input=line, check=True, capture_output=True, text=True).stdout
    parsed = {}
    for row in out.splitlines():
        key, *nums = row.split()
        parsed[key] = [int(x) for x in nums]
    return parsed


def _matrix(values):
    rows, cols, *data = values
    return torch.tensor(data, dtype=torch.int8).reshape(rows, cols)


def _visited(ranges):
    return {t for lo, hi in ranges for t in range(lo, hi)}


@pytest.mark.parametrize("layout, s, p, lengths", LAYOUT_CASES)
def test_mask_layout_header_matches_memory_layout(layout_probe, layout, s, p, lengths):
    for bm, bn in BLOCKS:
        tiles = layout.classify_tiles(s, bm, bn, p, lengths)
        for b, length in enumerate(lengths):
            got = _probe(layout_probe, layout, s, p, length, bm, bn)
            packed, prefix = _matrix(got["packed"]), _matrix(got["prefix"])
            where = f"blocks {bm}x{bn}, L={length}"
            assert torch.equal(packed, tiles.packed[b]), f"packed tile classes differ ({where})"
            assert torch.equal(prefix, tiles.prefix[b]), f"prefix tile classes differ ({where})"
            # Row-block schedules visit exactly the non-empty tiles: no work on an empty tile, no tile
            # holding a visible pair skipped.
            ranges = got["rows"][1:]
            for i in range(packed.shape[0]):
                lo0, lo1, hi0, hi1, pre0, pre1 = ranges[6 * i : 6 * i + 6]
                assert lo1 <= hi0 or hi1 <= hi0, f"overlapping ranges ({where})"
                want = {j for j in range(packed.shape[1]) if packed[i, j] != TILE_EMPTY}
                assert _visited([(lo0, lo1), (hi0, hi1)]) == want, f"row block {i} packed tiles ({where})"
                want = {j for j in range(prefix.shape[1]) if prefix[i, j] != TILE_EMPTY}
                assert _visited([(pre0, pre1)]) == want, f"row block {i} prefix tiles ({where})"
            cols = got["cols"][1:]
            for j in range(packed.shape[1]):
                want = {i for i in range(packed.shape[0]) if packed[i, j] != TILE_EMPTY}
                assert _visited([(cols[2 * j], cols[2 * j + 1])]) == want, f"key tile {j} query tiles ({where})"
            for j in range(prefix.shape[1]):
                want = {i for i in range(prefix.shape[0]) if prefix[i, j] != TILE_EMPTY}
                assert _visited([tuple(got["prefix_cols"])]) == want, f"prefix key tile {j} query tiles ({where})"


# ------------------------------------------------------------------------------------------ binding


@needs_tools
def test_binding_links_and_matches_the_launchers(aot_rows, binding_object, cuda_build_dir, monkeypatch):
    """bindings.cpp + the sm_80 kernel objects link into a library that loads into this (CPU) torch:
    the op schemas parse and match their C++ signatures, and the launchers' calls match the schemas
    (they reach the dispatcher, which then finds no CPU kernel)."""
    assert not [r for r in aot_rows if r["error"]]
    obj, proc = binding_object
    _, err = proc.communicate()
    assert proc.returncode == 0, f"bindings.cpp does not compile:\n{err[-4000:]}"
    if hasattr(torch.ops.rmt_kernels, "segment_attention_fwd_cuda"):
        pytest.skip("the extension is already loaded in this process")
    from torch.utils.cpp_extension import library_paths

    cuda_lib = Path(os.path.realpath(aot_cuda.find_nvcc())).parent.parent
    cudart = [d for d in ("/usr/local/cuda/lib64", str(cuda_lib / "lib64")) if Path(d, "libcudart.so").exists()]
    if not cudart:
        pytest.skip("libcudart.so not found")
    lib = cuda_build_dir / "rmt_kernels_C_probe.so"
    objects = [str(obj)] + [str(cuda_build_dir / f"{tu.stem}.sm_80.o") for tu in aot_cuda.translation_units()]
    link = ["g++", "-shared", "-o", str(lib), *objects, *[f"-L{p}" for p in library_paths()], "-lc10", "-ltorch",
            "-ltorch_cpu", f"-L{cudart[0]}", "-lcudart", f"-Wl,-rpath,{cudart[0]}"]
    proc = subprocess.run(link, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    torch.ops.load_library(str(lib))
    for op in ("segment_attention_fwd_cuda", "segment_attention_bwd_cuda", "pack_segment_fwd_cuda",
               "pack_segment_bwd_cuda", "pack_embedding_grad_cuda"):
        assert hasattr(torch.ops.rmt_kernels, op)

    monkeypatch.setattr(attn_cuda, "_check", lambda q: None)
    monkeypatch.setattr(pack_cuda, "_check", lambda t, op: None)
    monkeypatch.setattr(cuda_build, "load_extension", lambda verbose=False: str(lib))
    monkeypatch.setattr(cuda_build, "current_stream", lambda device: 0)
    layout = MemoryLayout(2, 2, MB, "segment")
    q = torch.randn(2, 4, 9, 64, dtype=torch.bfloat16)
    k = v = torch.randn(2, 2, 9, 64, dtype=torch.bfloat16)
    pk = pv = torch.randn(2, 2, 3, 64, dtype=torch.bfloat16)
    lengths = torch.tensor([5, 2])
    no_cpu_kernel = "Could not run 'rmt_kernels::"
    with pytest.raises(NotImplementedError, match=no_cpu_kernel):
        attn_cuda.segment_attention_fwd_cuda(q, k, v, pk, pv, lengths, layout, 0.125)
    out = torch.zeros_like(q)
    lse = torch.zeros(2, 4, 9)
    with pytest.raises(NotImplementedError, match=no_cpu_kernel):
        attn_cuda.segment_attention_bwd_cuda(out, q, k, v, pk, pv, lengths, out, lse, layout, 0.125, True)
    seg, mem = torch.randn(2, 5, 16), torch.randn(2, 16)
    packed = torch.empty(2, 9, 16)
    with pytest.raises(NotImplementedError, match=no_cpu_kernel):
        pack_cuda.pack_fwd_cuda(seg, mem, mem, 2, 2, True, packed)
    with pytest.raises(NotImplementedError, match=no_cpu_kernel):
        pack_cuda.pack_ids_fwd_cuda(torch.zeros(2, 5, dtype=torch.long), torch.randn(7, 16), mem, mem, 2, 2, True, packed)
    with pytest.raises(NotImplementedError, match=no_cpu_kernel):
        pack_cuda.memory_grad_cuda(packed, 0, 7, 2, True)
    for deterministic in (True, False):
        with pytest.raises(NotImplementedError, match=no_cpu_kernel):
            pack_cuda.embedding_grad_cuda(packed, torch.zeros(2, 5, dtype=torch.long), 7, 2, deterministic)


# ------------------------------------------------------------------------------------------ availability


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the message of a CPU-only torch")
def test_cuda_backend_on_cpu_torch_says_what_is_missing():
    layout = MemoryLayout(2, 2)
    x = torch.randn(1, 2, 8, 64)
    with pytest.raises(BackendUnavailableError, match="CPU-only build"):
        segment_attention(x, x, x, layout, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="CPU-only build"):
        pack_segment(torch.randn(1, 4, 8), layout, torch.randn(2, 8), torch.randn(2, 8), backend="cuda")
    with pytest.raises(BackendUnavailableError, match="CPU-only build"):
        cuda_build.load_extension()
    ok, reason = backends.backend_status("segment_attention", "cuda", torch.device("cuda"))
    assert not ok and "CUDA build of torch" in reason


def test_jit_status_names_the_missing_tool(monkeypatch, tmp_path):
    import torch.utils.cpp_extension as cpp_extension

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cuda_build, "_cuda_home", lambda: None)
    ok, reason = cuda_build.jit_status()
    assert not ok and "nvcc was not found" in reason and "CUDA_HOME" in reason
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("")
    monkeypatch.setattr(cuda_build, "_cuda_home", lambda: str(tmp_path))
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    ok, reason = cuda_build.jit_status()
    assert not ok and "pip install ninja" in reason
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    ok, reason = cuda_build.jit_status()
    assert ok and str(cuda_build.cache_dir()) in reason


def test_build_command_reports_the_missing_piece(monkeypatch, capsys):
    monkeypatch.setattr(cuda_build, "aot_available", lambda: False)
    monkeypatch.setattr(cuda_build, "jit_status", lambda: (False, "this torch is a CPU-only build; install a CUDA build of torch"))
    assert cli.main(["build"]) == 1
    assert "CPU-only build" in capsys.readouterr().err
    assert cli.main(["build", "--archs", "sm_7x"]) == 1
    assert "cannot read CUDA architecture" in capsys.readouterr().err


@pytest.mark.parametrize(
    "spec, archs",
    [
        pytest.param("8.0;9.0a", ["80", "90a"], id="torch-style"),
        pytest.param("80, sm_90a", ["80", "90a"], id="nvcc-style"),
        pytest.param("8.6+PTX", ["86"], id="ptx-suffix"),
    ],
)
def test_parse_archs(spec, archs):
    assert cuda_build.parse_archs(spec) == archs
    assert cuda_build.gencode_flags(archs)[0] == f"-gencode=arch=compute_{archs[0]},code=sm_{archs[0]}"


def test_cache_dir_and_sources(monkeypatch, tmp_path):
    monkeypatch.setenv(cuda_build.ENV_CACHE_DIR, str(tmp_path / "cache"))
    assert cuda_build.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv(cuda_build.ENV_CACHE_DIR)
    assert cuda_build.cache_dir().parent == Path.home() / ".cache" / "rmt_kernels"
    names = {s.name for s in cuda_build.sources()}
    assert {"segment_attention.cu", "pack_segment.cu", "bindings.cpp"} <= names
    assert not {s.name for s in cuda_build.sources()} & {"layout_probe.cpp", "kernel_table.cpp"}
    root = cuda_build.csrc_dir()
    assert {s.relative_to(root).as_posix() for s in cuda_build.sources()} >= {
        "segment_attention/segment_attention.cu", "pack_segment/pack_segment.cu", "bindings.cpp"}
    assert len(names) == len(cuda_build.sources()), "translation units need distinct file names"
    assert aot_cuda.translation_units() == [s for s in cuda_build.sources() if s.suffix == ".cu"]


def test_build_lock_is_exclusive(tmp_path):
    """Two builders asking for the lock (flock: separate opens exclude each other, across threads as
    across processes): the second waits until the first lets go."""
    lock, spans = tmp_path / "build.lock", []

    def hold():
        with cuda_build._file_lock(lock):
            start = time.monotonic()
            time.sleep(0.3)
            spans.append((start, time.monotonic()))

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    (a0, a1), (b0, b1) = sorted(spans)
    assert a1 <= b0, f"both held the lock at once: {spans}"
