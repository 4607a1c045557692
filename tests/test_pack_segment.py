"""pack_segment / pack_segment_from_ids / unpack_segment against torch.cat and F.embedding references,
forward and backward, on every available backend (Triton on CPU under the interpreter)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from rmt_kernels import MemoryLayout, backends, pack_segment, pack_segment_from_ids, unpack_segment
from rmt_kernels.ops.pack_segment import interface
from tests.helpers import PACK_CASES, assert_close, cat_ref, leaf, make_memory, run_pack_case, up

BACKENDS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton")]


def _require(op: str, backend: str, device) -> None:
    ok, why = backends.backend_status(op, backend, torch.device(device))
    if not ok:
        pytest.skip(f"{backend} unavailable: {why}")


def _poison_alloc(monkeypatch) -> None:
    """Packed buffers come out NaN-filled, so a row the kernel does not write cannot pass by luck."""
    alloc = interface.alloc_packed
    monkeypatch.setattr(interface, "alloc_packed", lambda *a: alloc(*a).fill_(float("nan")))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,seg_len,dim,num_read,num_write,read_kind,write_kind,dtype,sliced", PACK_CASES)
def test_pack_segment_matches_cat(
    monkeypatch, backend, batch, seg_len, dim, num_read, num_write, read_kind, write_kind, dtype, sliced
):
    _require("pack_segment", backend, "cpu")
    _poison_alloc(monkeypatch)
    run_pack_case("cpu", backend, batch, seg_len, dim, num_read, num_write, read_kind, write_kind, dtype, sliced)


def test_pack_segment_segment_grad_is_a_view():
    layout = MemoryLayout(2, 2, mask="causal")
    seg = torch.randn(2, 5, 8, requires_grad=True)
    grads = {}
    seg.register_hook(lambda g: grads.setdefault("seg", g))
    packed = pack_segment(seg, layout, torch.randn(2, 8), torch.randn(2, 8), backend="torch")
    upstream = torch.randn_like(packed)
    packed.backward(upstream)
    assert grads["seg"].untyped_storage().data_ptr() == upstream.untyped_storage().data_ptr()
    assert torch.equal(seg.grad, upstream[:, 2:7])


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_pack_without_memory_blocks_returns_a_new_tensor(grad):
    """R = W = 0: the result is a copy of the segment (the stock-op autograd path included), never the
    input itself, so writing into it cannot change the caller's tensor."""
    seg = torch.randn(2, 5, 8, requires_grad=grad)
    packed = pack_segment(seg, MemoryLayout(0, 0), backend="torch")
    assert packed.untyped_storage().data_ptr() != seg.untyped_storage().data_ptr()
    assert torch.equal(packed, seg) and packed.is_contiguous()
    if grad:
        packed.backward(torch.ones_like(packed))
        assert torch.equal(seg.grad, torch.ones_like(seg))


# (B, S, V, d, R, W, memory kind, ids dtype, weight dtype, sliced, deterministic)
IDS_CASES = [
    pytest.param(2, 33, 7, 32, 3, 3, "bcast", torch.int64, torch.float32, False, True, id="repeats-det"),
    pytest.param(2, 33, 7, 32, 3, 3, "bcast", torch.int64, torch.float32, False, False, id="repeats-atomic"),
    pytest.param(3, 17, 50, 40, 2, 2, "batched", torch.int32, torch.float32, True, True, id="int32-sliced-det"),
    pytest.param(2, 64, 11, 64, 0, 4, "batched", torch.int64, torch.bfloat16, True, False, id="write-only-bf16-atomic"),
    pytest.param(2, 65, 5, 24, 4, 0, "bcast", torch.int64, torch.float16, False, True, id="read-only-fp16-det"),
    pytest.param(1, 1, 3, 16, 1, 1, "batched", torch.int64, torch.float32, False, True, id="S1"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,seg_len,vocab,dim,num_read,num_write,mem_kind,id_dtype,dtype,sliced,deterministic", IDS_CASES)
def test_pack_from_ids_matches_embedding(
    monkeypatch, backend, batch, seg_len, vocab, dim, num_read, num_write, mem_kind, id_dtype, dtype, sliced, deterministic
):
    _require("pack_segment_from_ids", backend, "cpu")
    _poison_alloc(monkeypatch)
    layout = MemoryLayout(num_read, num_write, mask="causal")
    ids_base = torch.randint(0, vocab, (batch, 2 * seg_len + 1), dtype=id_dtype)
    ids = ids_base[:, 1::2] if sliced else ids_base[:, :seg_len].contiguous()
    w_base = torch.randn(vocab, dim + 3, dtype=torch.float64)
    weight = leaf((w_base[:, 2 : dim + 2] if sliced else w_base[:, :dim].contiguous()).to(dtype))
    read = make_memory(mem_kind, batch, num_read, dim, dtype, "cpu", sliced) if num_read else None
    write = read if (num_read and num_write) else (
        make_memory(mem_kind, batch, num_write, dim, dtype, "cpu", sliced) if num_write else None
    )

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        packed = pack_segment_from_ids(ids, weight, layout, read, write, backend=backend)
        expected = cat_ref(F.embedding(ids, weight), read, write, batch)
        assert torch.equal(packed, expected)
        grad = torch.randn(packed.shape, dtype=torch.float64).to(dtype)
        inputs = list(dict.fromkeys(t for t in (weight, read, write) if t is not None))
        got = torch.autograd.grad(packed, inputs, grad)
        again = torch.autograd.grad(pack_segment_from_ids(ids, weight, layout, read, write, backend=backend), inputs, grad)
    finally:
        torch.use_deterministic_algorithms(previous)
    baseline = torch.autograd.grad(expected, inputs, grad)
    ups = {id(t): up(t) for t in inputs}
    ref64 = cat_ref(F.embedding(ids, ups[id(weight)]), ups.get(id(read)), ups.get(id(write)), batch)
    reference = torch.autograd.grad(ref64, [ups[id(t)] for t in inputs], grad.to(torch.float64))
    for k, (g, b, rf) in enumerate(zip(got, baseline, reference)):
        assert g.shape == inputs[k].shape and g.dtype == dtype
        assert_close(g, rf, b, name=f"grad[{k}]")
    if deterministic:
        for g, h in zip(got, again):
            assert torch.equal(g, h), "deterministic mode must reproduce gradients bit for bit"


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_buffer(backend):
    _require("pack_segment", backend, "cpu")
    layout = MemoryLayout(3, 3, mask="causal")
    seg, mem = torch.randn(2, 7, 16), torch.randn(3, 16)
    big = torch.full((2, 20, 40), float("nan"))
    out = big[:, 2:15, 4:20]  # non-contiguous destination
    res = pack_segment(seg, layout, mem, mem, out=out, backend=backend)
    assert res is out
    assert torch.equal(out, cat_ref(seg, mem, mem, 2))
    assert torch.isnan(big[:, :2]).all() and torch.isnan(big[:, 15:]).all() and torch.isnan(big[:, :, :4]).all()

    weight, ids = torch.randn(9, 16), torch.randint(0, 9, (2, 7))
    out2 = torch.empty(2, 13, 16)
    assert pack_segment_from_ids(ids, weight, layout, mem, mem, out=out2, backend=backend) is out2
    assert torch.equal(out2, cat_ref(F.embedding(ids, weight), mem, mem, 2))


def test_out_buffer_under_autograd():
    layout = MemoryLayout(2, 2, mask="causal")
    mem = torch.randn(2, 8, requires_grad=True)
    seg = torch.randn(1, 4, 8)
    out = torch.empty(1, 8, 8)
    with pytest.raises(ValueError, match="out= is not differentiable"):
        pack_segment(seg, layout, mem, mem, out=out)
    with torch.no_grad():
        assert pack_segment(seg, layout, mem, mem, out=out) is out
    with pytest.raises(ValueError, match="out= is not differentiable"):
        pack_segment(seg, layout, mem.detach(), mem.detach(), out=torch.empty(1, 8, 8, requires_grad=True))


def test_out_buffer_saved_by_autograd_is_protected():
    """Overwriting a packed buffer that a graph saved must fail loudly in the backward, not corrupt it
    (the recurrent driver relies on never doing this; this checks the safety net)."""
    layout = MemoryLayout(2, 2, mask="causal")
    mem = torch.randn(2, 8)
    buf = torch.empty(1, 8, 8)
    weight = torch.randn(8, 8, requires_grad=True)
    with torch.no_grad():
        pack_segment(torch.randn(1, 4, 8), layout, mem, mem, out=buf)
    loss = (buf @ weight).sum()  # saves buf for weight's gradient
    pack_segment(torch.randn(1, 4, 8), layout, mem, mem, out=buf)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def _errors():
    lay = MemoryLayout(2, 3, mask="causal")
    seg, r, w = torch.randn(2, 5, 8), torch.randn(2, 8), torch.randn(3, 8)
    return [
        pytest.param(lambda: pack_segment(seg, lay, None, w), ValueError, "read_memory", id="missing-read"),
        pytest.param(lambda: pack_segment(seg, lay, r, None), ValueError, "write_memory", id="missing-write"),
        pytest.param(lambda: pack_segment(seg, MemoryLayout(0, 3), r, w), ValueError, "num_read=0", id="read-without-block"),
        pytest.param(lambda: pack_segment(seg, MemoryLayout(2, 0), r, w), ValueError, "num_write=0", id="write-without-block"),
        pytest.param(lambda: pack_segment(seg, lay, torch.randn(2, 9), w), ValueError, "read_memory must have shape", id="width"),
        pytest.param(lambda: pack_segment(seg, lay, torch.randn(3, 2, 8), w), ValueError, "read_memory must have shape", id="batch"),
        pytest.param(lambda: pack_segment(seg, lay, torch.randn(4, 8), w), ValueError, "num_read=2", id="rows"),
        pytest.param(lambda: pack_segment(seg, lay, torch.randn(1, 1, 2, 8), w), ValueError, "read_memory must be", id="4d-memory"),
        pytest.param(lambda: pack_segment(seg, lay, r.double(), w), TypeError, "read_memory has dtype", id="mem-dtype"),
        pytest.param(lambda: pack_segment(seg.int(), lay, r, w), TypeError, "not supported", id="int-segment"),
        pytest.param(lambda: pack_segment(seg[0], lay, r, w), ValueError, "3-D", id="2d-segment"),
        pytest.param(lambda: pack_segment(seg, (2, 3), r, w), TypeError, "MemoryLayout", id="layout-type"),
        pytest.param(lambda: pack_segment(seg.tolist(), lay, r, w), TypeError, "segment must be", id="segment-type"),
        pytest.param(lambda: pack_segment(seg, lay, r, w, backend="cuda"), backends.BackendUnavailableError, "cuda", id="no-cuda-backend"),
        pytest.param(lambda: pack_segment(seg, lay, r, w, backend="fast"), ValueError, "backend", id="bad-backend"),
        pytest.param(lambda: pack_segment(seg, lay, r, w, out=torch.empty(2, 9, 8)), ValueError, "out must have shape", id="out-shape"),
        pytest.param(lambda: pack_segment(seg, lay, r, w, out=torch.empty(2, 10, 8, dtype=torch.float64)), TypeError, "out has dtype", id="out-dtype"),
        pytest.param(lambda: pack_segment_from_ids(torch.tensor([[0, 9]]), torch.randn(9, 8), MemoryLayout(0, 0)), ValueError, r"\[0, 9\)", id="ids-range"),
        pytest.param(lambda: pack_segment_from_ids(torch.tensor([[-1, 0]]), torch.randn(9, 8), MemoryLayout(0, 0)), ValueError, r"\[0, 9\)", id="ids-negative"),
        pytest.param(lambda: pack_segment_from_ids(torch.zeros(1, 2), torch.randn(9, 8), MemoryLayout(0, 0)), TypeError, "int32 or int64", id="ids-float"),
        pytest.param(lambda: pack_segment_from_ids(torch.zeros(2, dtype=torch.long), torch.randn(9, 8), MemoryLayout(0, 0)), ValueError, "2-D", id="ids-1d"),
        pytest.param(lambda: pack_segment_from_ids(torch.zeros(1, 2, dtype=torch.long), torch.randn(9), MemoryLayout(0, 0)), ValueError, "embedding_weight", id="weight-1d"),
        pytest.param(lambda: unpack_segment(torch.randn(2, 4, 8), lay), ValueError, "shorter", id="unpack-short"),
        pytest.param(lambda: unpack_segment(torch.randn(4, 8), lay), ValueError, "3-D", id="unpack-2d"),
    ]


@pytest.mark.parametrize("fn,exc,match", _errors())
def test_validation(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def test_out_overlapping_input_is_rejected():
    layout = MemoryLayout(2, 2, mask="causal")
    store = torch.randn(100, 8)
    seg, mem = store[:8].view(2, 4, 8), store[90:92]
    with pytest.raises(ValueError, match="overlaps"):
        pack_segment(seg, layout, mem, mem, out=store[4:20].view(2, 8, 8))
    with pytest.raises(ValueError, match="overlaps"):
        pack_segment(seg, layout, mem, mem, out=store[78:94].view(2, 8, 8))
    # Disjoint parts of one storage are fine.
    expected = cat_ref(seg, mem, mem, 2)
    out = pack_segment(seg, layout, mem, mem, out=store[20:36].view(2, 8, 8))
    assert torch.equal(out, expected)


def test_unpack_returns_views():
    layout = MemoryLayout(3, 2)
    hidden = torch.randn(2, 3 + 7 + 2, 8)
    read, seg, write = unpack_segment(hidden, layout)
    assert (read.shape, seg.shape, write.shape) == ((2, 3, 8), (2, 7, 8), (2, 2, 8))
    for view in (read, seg, write):
        assert view.untyped_storage().data_ptr() == hidden.untyped_storage().data_ptr()
    assert torch.equal(torch.cat([read, seg, write], 1), hidden)
    assert write.data_ptr() == hidden[:, 10:].data_ptr()


def test_backend_resolution():
    cpu = torch.device("cpu")
    for op in ("pack_segment", "pack_segment_from_ids"):
        assert backends.resolve_backend(op, "auto", cpu) == "torch"
        assert backends.resolve_backend(op, "torch", cpu) == "torch"
        ok, _ = backends.backend_status(op, "cuda", cpu)
        assert not ok


def test_import_does_not_load_triton():
    code = "import sys, rmt_kernels; rmt_kernels.pack_segment; assert 'triton' not in sys.modules, 'triton imported'"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_torch_compile_fullgraph():
    layout = MemoryLayout(3, 3, mask="causal")

    def fn(x, m, w, ids):
        return (pack_segment(x, layout, m, m) * pack_segment_from_ids(ids, w, layout, m, m)).sum()

    x = torch.randn(2, 5, 8, requires_grad=True)
    m = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    ids = torch.randint(0, 11, (2, 5))
    got = torch.autograd.grad(torch.compile(fn, backend="aot_eager", fullgraph=True)(x, m, w, ids), (x, m, w))
    want = torch.autograd.grad(fn(x, m, w, ids), (x, m, w))
    for g, r in zip(got, want):
        assert_close(g, r)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_segment_cuda(backend):
    _require("pack_segment", backend, "cuda")
    run_pack_case("cuda", backend, 4, 1000, 768, 16, 16, "bcast", "tied", torch.bfloat16, True)
    run_pack_case("cuda", backend, 2, 127, 2048, 128, 0, "batched", "none", torch.float16, False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pack_segment_cuda_offsets_beyond_int32():
    """A packed buffer of more than 2^31 elements: offsets must be 64-bit."""
    _require("pack_segment", "triton", "cuda")
    layout = MemoryLayout(16, 16, mask="causal")
    batch, seg_len, dim = 2, 2 ** 19, 2048 + 64  # 2 * (2^19 + 32) * 2112 > 2^31
    seg = torch.empty(batch, seg_len, dim, dtype=torch.bfloat16, device="cuda")
    seg[:, :, :8].copy_(torch.arange(seg_len, device="cuda")[None, :, None].to(torch.bfloat16).expand(batch, seg_len, 8))
    mem = torch.randn(16, dim, dtype=torch.bfloat16, device="cuda")
    packed = pack_segment(seg, layout, mem, mem, backend="triton")
    assert torch.equal(packed[:, -16:], mem.expand(batch, 16, dim))
    assert torch.equal(packed[1, 16 + seg_len - 8 : 16 + seg_len, :8], seg[1, -8:, :8])
