"""The CUDA kernels of ``csrc/``, executed on the CPU by an emulator, against the reference.

No GPU is needed: ``tests/cuda_emu/`` compiles the real kernel headers as host C++ with an emulated
``common/ptx_sm80.cuh`` (fibers for threads; ``ldmatrix``, ``mma.sync`` and ``cp.async`` implemented
from the PTX ISA's fragment layouts). The public ``segment_attention(..., backend="cuda")`` and
``pack_segment*(..., backend="cuda")`` then run end to end on CPU tensors: the real launchers
(``ops/*/cuda.py``: allocation, stride fitting, argument order), the kernels' tile schedule, masking,
online softmax and backward, the pack copy units and reductions, with only the extension call swapped
for the emulator (whose ctypes side fills the parameter structs as ``csrc/bindings.cpp`` does). This checks the kernels' logic and indexing; it cannot check
the hardware's behaviour (instruction semantics, races, timing): the ``cuda``-marked tests do that on
a GPU.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from rmt_kernels import MemoryLayout, backends
from rmt_kernels.tools.aot_cuda import find_nvcc
from rmt_kernels import _extension as cuda_build
from rmt_kernels.ops.pack_segment import cuda as pack_cuda
from rmt_kernels.ops.pack_segment import interface as pack_interface
from rmt_kernels.ops.segment_attention import cuda as cuda_impl

import helpers as pack_tests
from helpers import check_against_reference, check_out_buffer, make_inputs, run_ids_case, strided_lowp

MB = "memory_bidirectional"
EMU_DIR = Path(__file__).parent / "cuda_emu"

pytestmark = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64"), reason="the emulator's fiber switch is x86-64 assembly"
)

_PTR = ctypes.c_void_p
_S4 = ctypes.c_int64 * 4


class Params(ctypes.Structure):
    """ctypes mirror of ``rmt::SegmentAttentionParams``
    (csrc/segment_attention/segment_attention_params.h); the fixture checks every offset against the
    compiled struct."""

    _fields_ = [
        ("q", _PTR), ("k", _PTR), ("v", _PTR), ("prefix_k", _PTR), ("prefix_v", _PTR), ("segment_lengths", _PTR),
        ("q_stride", _S4), ("k_stride", _S4), ("v_stride", _S4), ("pk_stride", _S4), ("pv_stride", _S4),
        ("out", _PTR), ("lse", _PTR), ("out_stride", _S4), ("lse_stride", ctypes.c_int64 * 3),
        ("dout", _PTR), ("dout_stride", _S4),
        ("dq", _PTR), ("dk", _PTR), ("dv", _PTR), ("dprefix_k", _PTR), ("dprefix_v", _PTR),
        ("dq_stride", _S4), ("dk_stride", _S4), ("dv_stride", _S4), ("dpk_stride", _S4), ("dpv_stride", _S4),
        ("delta", _PTR), ("lse_log2", _PTR),
        ("batch", ctypes.c_int), ("heads_q", ctypes.c_int), ("heads_kv", ctypes.c_int), ("head_dim", ctypes.c_int),
        ("num_read", ctypes.c_int), ("segment_len", ctypes.c_int), ("num_write", ctypes.c_int),
        ("prefix_len", ctypes.c_int), ("mask", ctypes.c_int), ("prefix_all", ctypes.c_int),
        ("scale", ctypes.c_float), ("dtype", ctypes.c_int),
    ]


def _cuda_include():
    """The CUDA toolkit's include directory (for cuda_fp16.h / cuda_bf16.h, usable from host C++)."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    try:
        roots.append(str(Path(os.path.realpath(find_nvcc())).parent.parent))
    except FileNotFoundError:
        pass
    for root in roots:
        if root and (Path(root) / "include" / "cuda_fp16.h").exists():
            return Path(root) / "include"
    return None


_S3 = ctypes.c_int64 * 3
_S2 = ctypes.c_int64 * 2
_INT = ctypes.c_int


class PackParams(ctypes.Structure):
    """ctypes mirror of ``rmt::PackParams`` (csrc/pack_segment/pack_segment_params.h)."""

    _fields_ = [
        ("out", _PTR), ("out_stride", _S3), ("src", _PTR), ("src_stride", _S3), ("ids", _PTR), ("ids_stride", _S2),
        ("ids_int64", _INT), ("read", _PTR), ("read_stride", _S3), ("write", _PTR), ("write_stride", _S3),
        ("batch", _INT), ("num_read", _INT), ("segment_len", _INT), ("num_write", _INT), ("dim", _INT),
        ("elem_bytes", _INT),
    ]


class MemoryGradParams(ctypes.Structure):
    """ctypes mirror of ``rmt::MemoryGradParams``."""

    _fields_ = [
        ("grad", _PTR), ("grad_stride", _S3), ("dmem", _PTR), ("dmem_stride", _S3), ("batch", _INT), ("rows", _INT),
        ("dim", _INT), ("start", _INT), ("start2", _INT), ("broadcast", _INT), ("dtype", _INT),
    ]


class EmbeddingGradParams(ctypes.Structure):
    """ctypes mirror of ``rmt::EmbeddingGradParams``."""

    _fields_ = [
        ("grad", _PTR), ("grad_stride", _S3), ("ids", _PTR), ("ids_stride", _S2), ("ids_int64", _INT),
        ("dweight", _PTR), ("dw_stride", _S2), ("sorted_ids", _PTR), ("order", _PTR), ("batch", _INT),
        ("segment_len", _INT), ("dim", _INT), ("start", _INT), ("dtype", _INT),
    ]


_STRUCTS = {"SegmentAttentionParams": Params, "PackParams": PackParams, "MemoryGradParams": MemoryGradParams,
            "EmbeddingGradParams": EmbeddingGradParams}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """The emulator library, compiled once per module from the current csrc/ headers."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++ to compile the CUDA emulator")
    cuda_include = _cuda_include()
    if cuda_include is None:
        pytest.skip("the emulator needs the CUDA toolkit's headers (cuda_fp16.h)")
    work = tmp_path_factory.mktemp("cuda_emu")
    # A copy of csrc/'s header tree (the include dir, as in the real builds) with the emulation in
    # place of common/ptx_sm80.cuh.
    headers = work / "csrc"
    root = cuda_build.csrc_dir()
    for src in [*root.glob("*/*.cuh"), *root.glob("*/*.h")]:
        (headers / src.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(src, headers / src.relative_to(root))
    shutil.copy(EMU_DIR / "common" / "ptx_sm80.cuh", headers / "common" / "ptx_sm80.cuh")
    lib_path = work / "emu.so"
    cmd = [cxx, "-std=c++17", "-O1", "-fPIC", "-shared", "-Wno-unknown-pragmas", "-Wno-attributes",
           "-I", str(headers), "-I", str(cuda_include), str(EMU_DIR / "harness.cpp"), "-o", str(lib_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"emulator build failed:\n{proc.stderr[-4000:]}"
    lib = ctypes.CDLL(str(lib_path))
    lib.rmt_emu_offset.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    lib.rmt_emu_offset.restype = ctypes.c_long
    lib.rmt_emu_sizeof.argtypes = [ctypes.c_char_p]
    lib.rmt_emu_sizeof.restype = ctypes.c_long
    for type_name, struct in _STRUCTS.items():
        assert lib.rmt_emu_sizeof(type_name.encode()) == ctypes.sizeof(struct), type_name
        for name, _ in struct._fields_:
            assert lib.rmt_emu_offset(type_name.encode(), name.encode()) == getattr(struct, name).offset, (type_name, name)
    return lib


def _chunked(t):
    """What csrc/segment_attention/segment_attention.cu requires of a tile input (it rejects anything
    else)."""
    return t.stride(-1) == 1 and all(s % 8 == 0 for s in t.stride()[:-1]) and t.data_ptr() % 16 == 0


def _paired(t):
    return t.stride(-1) == 1 and all(s % 2 == 0 for s in t.stride()[:-1]) and t.data_ptr() % 4 == 0


def _ptr(t):
    return None if t is None else t.data_ptr()


def _strides(t, n=4):
    return (ctypes.c_int64 * n)(*(t.stride() if t is not None else (0,) * n))


def _params(q, k, v, pk, pv, lengths, out, lse, num_read, num_write, mask, prefix_all, scale):
    """The struct bindings.cpp fills, with its checks."""
    for name, t in (("q", q), ("k", k), ("v", v), ("prefix_k", pk), ("prefix_v", pv)):
        assert t is None or _chunked(t), f"{name} reached the kernels with strides {t.stride()}"
    assert _paired(out)
    assert lengths is None or (lengths.dtype == torch.int32 and lengths.is_contiguous())
    p = Params()
    p.q, p.k, p.v, p.prefix_k, p.prefix_v = _ptr(q), _ptr(k), _ptr(v), _ptr(pk), _ptr(pv)
    p.segment_lengths = _ptr(lengths)
    p.q_stride, p.k_stride, p.v_stride = _strides(q), _strides(k), _strides(v)
    p.pk_stride, p.pv_stride = _strides(pk), _strides(pv)
    p.out, p.lse, p.out_stride, p.lse_stride = out.data_ptr(), lse.data_ptr(), _strides(out), _strides(lse, 3)
    b, hq, n, d = q.shape
    p.batch, p.heads_q, p.heads_kv, p.head_dim = b, hq, k.shape[1], d
    p.num_read, p.num_write, p.segment_len = num_read, num_write, n - num_read - num_write
    p.prefix_len = 0 if pk is None else pk.shape[2]
    p.mask, p.prefix_all, p.scale = mask, int(prefix_all), scale
    p.dtype = {torch.float16: 0, torch.bfloat16: 1}[q.dtype]
    return p


@pytest.fixture
def emulated_cuda(emulator, monkeypatch, nan_poison):
    """``backend="cuda"`` runs the emulated kernels on CPU tensors, with NaN-poisoned outputs."""

    def fwd(q, k, v, pk, pv, lengths, out, lse, num_read, num_write, mask, prefix_all, scale, stream):
        p = _params(q, k, v, pk, pv, lengths, out, lse, num_read, num_write, mask, prefix_all, scale)
        assert emulator.rmt_emu_fwd(ctypes.byref(p)) == 0, "emulated forward failed (deadlock or bad config)"

    def bwd(dout, q, k, v, pk, pv, lengths, out, lse, dq, dk, dv, dpk, dpv, num_read, num_write, mask,
            prefix_all, scale, stream):
        p = _params(q, k, v, pk, pv, lengths, out, lse, num_read, num_write, mask, prefix_all, scale)
        assert _chunked(dout), f"dout reached the kernels with strides {dout.stride()}"
        for t in (dq, dk, dv, dpk, dpv):
            assert t is None or _paired(t)
        p.dout, p.dout_stride = dout.data_ptr(), _strides(dout)
        p.dq, p.dk, p.dv, p.dprefix_k, p.dprefix_v = _ptr(dq), _ptr(dk), _ptr(dv), _ptr(dpk), _ptr(dpv)
        p.dq_stride, p.dk_stride, p.dv_stride = _strides(dq), _strides(dk), _strides(dv)
        p.dpk_stride, p.dpv_stride = _strides(dpk), _strides(dpv)
        delta = torch.empty(q.shape[:3], dtype=torch.float32)
        lse_log2 = torch.empty(q.shape[:3], dtype=torch.float32)
        p.delta, p.lse_log2 = delta.data_ptr(), lse_log2.data_ptr()
        assert emulator.rmt_emu_bwd(ctypes.byref(p)) == 0, "emulated backward failed (deadlock or bad config)"

    impl = backends.get_impl(cuda_impl.OP, "cuda")
    monkeypatch.setattr(impl, "devices", ("cpu", "cuda"))
    monkeypatch.setattr(impl, "status", lambda device: (True, "CPU emulation of the CUDA kernels"))
    monkeypatch.setattr(cuda_impl, "_check", lambda q: None)
    monkeypatch.setattr(cuda_build, "load_extension", lambda verbose=False: "emulated")
    monkeypatch.setattr(cuda_build, "current_stream", lambda device: 0)
    monkeypatch.setattr(torch.ops.rmt_kernels, "segment_attention_fwd_cuda", fwd, raising=False)
    monkeypatch.setattr(torch.ops.rmt_kernels, "segment_attention_bwd_cuda", bwd, raising=False)
    nan_poison(cuda_impl, "alloc_outputs")
    nan_poison(cuda_impl, "alloc_grads")


# (layout, S, P, segment_lengths, (H_q, H_kv), D, dtype, prefix requires grad, scale)
CASES = [
    pytest.param(MemoryLayout(16, 16, MB, "segment"), 200, 37, [200, 10], (2, 2), 64, torch.bfloat16, True, None,
                 id="mb-M16-S200-P37-seg-padding-hole-spans-whole-tiles-bf16"),
    pytest.param(MemoryLayout(0, 5, "causal"), 70, 0, [70, 0], (4, 2), 64, torch.float16, True, None,
                 id="causal-write-only-S70-fully-padded-row-gqa4:2-fp16"),
    pytest.param(MemoryLayout(16, 0, "full", "all"), 50, 1, [50, 31], (2, 1), 128, torch.bfloat16, True, None,
                 id="full-read-only-S50-P1-all-gqa2:1-D128-bf16"),
    pytest.param(MemoryLayout(5, 5, MB, "all"), 130, 37, None, (4, 1), 128, torch.float16, True, 0.3,
                 id="mb-M5-S130-P37-all-full-prefix-tail-tile-gqa4:1-D128-fp16-scale"),
    pytest.param(MemoryLayout(16, 16, "full"), 120, 0, [120, 120], (2, 2), 64, torch.bfloat16, True, None,
                 id="full-M16-S120-full-key-tail-tile-under-a-whole-row-block-bf16"),
    pytest.param(MemoryLayout(3, 2, "causal", "segment"), 45, 70, [45, 12], (2, 2), 64, torch.float16, False, None,
                 id="causal-P70-seg-detached-prefix-two-prefix-tiles-fp16"),
    pytest.param(MemoryLayout(0, 0, MB), 17, 0, [0, 5], (2, 2), 64, torch.bfloat16, True, None,
                 id="mb-M0-S17-rows-without-keys-bf16"),
    pytest.param(MemoryLayout(0, 0, "causal"), 1, 0, None, (2, 2), 64, torch.float16, True, None,
                 id="causal-S1-M0-fp16"),
]


@pytest.mark.parametrize("layout, s, p, lengths, heads, d, dtype, prefix_grad, scale", CASES)
def test_emulated_cuda_kernels_match_reference(emulated_cuda, layout, s, p, lengths, heads, d, dtype, prefix_grad,
                                               scale):
    b = 2 if lengths is None else len(lengths)
    q, k, v, pk, pv = make_inputs(b, heads, layout.seq_len(s), d, p, dtype=dtype, prefix_grad=prefix_grad)
    sl = None if lengths is None else torch.tensor(lengths)
    check_against_reference(layout, q, k, v, pk, pv, sl, scale, backend="cuda")


@pytest.mark.parametrize("kind", ["transposed", "sliced", "expanded"])
def test_emulated_cuda_kernels_strided_inputs(emulated_cuda, kind):
    layout = MemoryLayout(5, 5, MB, "segment")
    q, k, v, pk, pv, dout = strided_lowp(kind, 2, (4, 2), layout.seq_len(37), 64, 3, torch.bfloat16, "cpu")
    if kind != "expanded":
        assert not q.is_contiguous() and not k.is_contiguous()
    check_against_reference(layout, q, k, v, pk, pv, torch.tensor([37, 9]), dout=dout, backend="cuda")


# ------------------------------------------------------------------------------------------ pack kernels


def _memory_strides(t):
    """(batch, row, col) strides of a [B, rows, d] or broadcast [rows, d] memory, as bindings.cpp."""
    return _S3(0, *t.stride()) if t.dim() == 2 else _S3(*t.stride())


_PACK_DTYPES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


@pytest.fixture
def emulated_cuda_pack(emulator, monkeypatch):
    """``backend="cuda"`` of pack_segment / pack_segment_from_ids runs the emulated kernels on CPU."""

    def pack_fwd(out, src, ids, read, write, num_read, num_write, stream):
        p = PackParams()
        p.out, p.out_stride, p.src = out.data_ptr(), _S3(*out.stride()), src.data_ptr()
        if ids is not None:
            p.src_stride = _S3(0, *src.stride())
            p.ids, p.ids_stride, p.ids_int64 = ids.data_ptr(), _S2(*ids.stride()), int(ids.dtype == torch.int64)
            p.segment_len = ids.shape[1]
        else:
            p.src_stride, p.segment_len = _S3(*src.stride()), src.shape[1]
        if num_read:
            p.read, p.read_stride = read.data_ptr(), _memory_strides(read)
        if num_write:
            p.write, p.write_stride = write.data_ptr(), _memory_strides(write)
        p.batch, p.num_read, p.num_write, p.dim, p.elem_bytes = out.shape[0], num_read, num_write, out.shape[2], out.element_size()
        assert emulator.rmt_emu_pack_fwd(ctypes.byref(p)) == 0

    def memory_grad(grad, dmem, start, start2, broadcast, stream):
        p = MemoryGradParams()
        p.grad, p.grad_stride, p.dmem, p.dmem_stride = grad.data_ptr(), _S3(*grad.stride()), dmem.data_ptr(), _memory_strides(dmem)
        p.batch, p.rows, p.dim = grad.shape[0], dmem.shape[-2], grad.shape[2]
        p.start, p.start2, p.broadcast, p.dtype = start, start2 if start2 >= 0 else -1, int(broadcast), _PACK_DTYPES[grad.dtype]
        assert emulator.rmt_emu_memory_grad(ctypes.byref(p)) == 0

    def embedding_grad(grad, ids, dweight, start, sorted_ids, order, stream):
        assert (sorted_ids is None) == (order is None)
        assert dweight.dtype == (grad.dtype if sorted_ids is not None else torch.float32)
        p = EmbeddingGradParams()
        p.grad, p.grad_stride = grad.data_ptr(), _S3(*grad.stride())
        p.ids, p.ids_stride, p.ids_int64 = ids.data_ptr(), _S2(*ids.stride()), int(ids.dtype == torch.int64)
        p.dweight, p.dw_stride = dweight.data_ptr(), _S2(*dweight.stride())
        if sorted_ids is not None:
            assert sorted_ids.dtype == order.dtype == torch.int64 and sorted_ids.is_contiguous() and order.is_contiguous()
            p.sorted_ids, p.order = sorted_ids.data_ptr(), order.data_ptr()
        p.batch, p.segment_len, p.dim, p.start, p.dtype = ids.shape[0], ids.shape[1], grad.shape[2], start, _PACK_DTYPES[grad.dtype]
        assert emulator.rmt_emu_embedding_grad(ctypes.byref(p)) == 0

    for op in (pack_cuda.OP, pack_cuda.OP_IDS):
        impl = backends.get_impl(op, "cuda")
        monkeypatch.setattr(impl, "devices", ("cpu", "cuda"))
        monkeypatch.setattr(impl, "status", lambda device: (True, "CPU emulation of the CUDA kernels"))
    monkeypatch.setattr(pack_cuda, "_check", lambda t, op: None)
    monkeypatch.setattr(cuda_build, "load_extension", lambda verbose=False: "emulated")
    monkeypatch.setattr(cuda_build, "current_stream", lambda device: 0)
    monkeypatch.setattr(torch.ops.rmt_kernels, "pack_segment_fwd_cuda", pack_fwd, raising=False)
    monkeypatch.setattr(torch.ops.rmt_kernels, "pack_segment_bwd_cuda", memory_grad, raising=False)
    monkeypatch.setattr(torch.ops.rmt_kernels, "pack_embedding_grad_cuda", embedding_grad, raising=False)


@pytest.mark.parametrize("batch,seg_len,dim,num_read,num_write,read_kind,write_kind,dtype,sliced", pack_tests.PACK_CASES)
def test_emulated_cuda_pack_matches_cat(emulated_cuda_pack, nan_poison, batch, seg_len, dim, num_read, num_write,
                                        read_kind, write_kind, dtype, sliced):
    nan_poison(pack_interface, "alloc_packed")
    pack_tests.run_pack_case("cpu", "cuda", batch, seg_len, dim, num_read, num_write, read_kind, write_kind, dtype,
                             sliced)


# (B, S, V, d, R, W, ids dtype, weight dtype, sliced, deterministic)
EMU_IDS_CASES = [
    pytest.param(2, 33, 7, 32, 3, 3, torch.int64, torch.float32, False, True, id="repeats-det"),
    pytest.param(2, 33, 7, 32, 3, 3, torch.int64, torch.float32, False, False, id="repeats-atomic"),
    pytest.param(3, 17, 50, 40, 2, 2, torch.int32, torch.bfloat16, True, True, id="int32-sliced-bf16-det"),
    pytest.param(2, 64, 11, 300, 0, 4, torch.int64, torch.float16, True, False, id="write-only-fp16-atomic-d300"),
]


@pytest.mark.parametrize("batch,seg_len,vocab,dim,num_read,num_write,id_dtype,dtype,sliced,deterministic", EMU_IDS_CASES)
def test_emulated_cuda_pack_from_ids_matches_embedding(emulated_cuda_pack, nan_poison, batch, seg_len, vocab, dim,
                                                       num_read, num_write, id_dtype, dtype, sliced, deterministic):
    nan_poison(pack_interface, "alloc_packed")
    run_ids_case("cpu", batch, seg_len, vocab, dim, num_read, num_write, id_dtype, dtype, sliced, deterministic)


def test_emulated_cuda_pack_out_buffer(emulated_cuda_pack):
    check_out_buffer("cpu")
