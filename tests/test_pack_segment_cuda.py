"""``pack_segment`` / ``pack_segment_from_ids`` on ``backend="cuda"`` (csrc/pack_segment.cu) against
``torch.cat`` / ``F.embedding`` on a GPU: the handoff suite's cases, ``out=`` buffers, both embedding
gradient modes and 64-bit offsets. Every test carries the ``cuda`` marker (skipped without a GPU).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rmt_kernels import MemoryLayout, backends, pack_segment, pack_segment_from_ids
from rmt_kernels.ops.pack_segment import interface

from helpers import assert_close
from test_pack_segment import PACK_CASES, _cat_ref, _run_pack_case

DEVICE = "cuda"

pytestmark = pytest.mark.cuda


@pytest.fixture
def cuda_pack(nan_poison):
    for op in ("pack_segment", "pack_segment_from_ids"):
        ok, reason = backends.backend_status(op, "cuda", torch.device(DEVICE))
        if not ok:
            pytest.skip(f"cuda backend unavailable: {reason}")
    nan_poison(interface, "alloc_packed")  # a row the kernel does not write shows up as NaN


@pytest.mark.parametrize("batch,seg_len,dim,num_read,num_write,read_kind,write_kind,dtype,sliced", PACK_CASES)
def test_pack_segment_cuda_matches_cat(cuda_pack, batch, seg_len, dim, num_read, num_write, read_kind, write_kind,
                                       dtype, sliced):
    _run_pack_case(DEVICE, "cuda", batch, seg_len, dim, num_read, num_write, read_kind, write_kind, dtype, sliced)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param((4, 1000, 768, 16, 16, "bcast", "tied", torch.bfloat16, True), id="gpt2-official-bcast-tied-sliced"),
        pytest.param((2, 127, 2048, 128, 0, "batched", "none", torch.float16, False), id="llama-read-only-fp16"),
        pytest.param((3, 65, 100, 2, 3, "bcast", "batched", torch.float32, True), id="d100-fp32-scalar-copies"),
    ],
)
def test_pack_segment_cuda_model_shapes(cuda_pack, case):
    _run_pack_case(DEVICE, "cuda", *case)


# (B, S, V, d, R, W, ids dtype, weight dtype, sliced, deterministic)
IDS_CASES = [
    pytest.param(2, 33, 7, 32, 3, 3, torch.int64, torch.float32, False, True, id="repeats-det"),
    pytest.param(2, 33, 7, 32, 3, 3, torch.int64, torch.float32, False, False, id="repeats-atomic"),
    pytest.param(3, 17, 50, 40, 2, 2, torch.int32, torch.bfloat16, True, True, id="int32-sliced-bf16-det"),
    pytest.param(2, 64, 11, 64, 0, 4, torch.int64, torch.bfloat16, True, False, id="write-only-bf16-atomic"),
    pytest.param(4, 1000, 50257, 768, 16, 16, torch.int64, torch.float16, False, True, id="gpt2-vocab-fp16-det"),
]


def run_ids_case(device, batch, seg_len, vocab, dim, num_read, num_write, id_dtype, dtype, sliced, deterministic):
    """``pack_segment_from_ids(..., backend="cuda")`` on ``device`` against ``F.embedding`` + ``torch.cat``:
    exact forward, gradients of the weight and of the memory (tied R/W) within the tolerance rule,
    bit-identical gradients twice in the deterministic mode."""
    layout = MemoryLayout(num_read, num_write, mask="causal")
    ids_base = torch.randint(0, vocab, (batch, 2 * seg_len + 1), dtype=id_dtype).to(device)
    ids = ids_base[:, 1::2] if sliced else ids_base[:, :seg_len].contiguous()
    w_base = torch.randn(vocab, dim + 3, dtype=torch.float64)
    weight = (w_base[:, 2 : dim + 2] if sliced else w_base[:, :dim]).to(device, dtype).detach().requires_grad_()
    memory = torch.randn(max(num_read, num_write), dim).to(device, dtype).requires_grad_()
    read = memory if num_read else None
    write = memory if num_write else None
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    try:
        packed = pack_segment_from_ids(ids, weight, layout, read, write, backend="cuda")
        expected = _cat_ref(F.embedding(ids, weight), read, write, batch)
        assert torch.equal(packed, expected), "the pack is a gather and a copy: it must be exact"
        grad = torch.randn(packed.shape, dtype=torch.float64).to(device, dtype)
        inputs = [weight, memory]
        got = torch.autograd.grad(packed, inputs, grad)
        again = torch.autograd.grad(pack_segment_from_ids(ids, weight, layout, read, write, backend="cuda"), inputs, grad)
    finally:
        torch.use_deterministic_algorithms(previous)
    baseline = torch.autograd.grad(expected, inputs, grad)
    up_w = weight.detach().double().requires_grad_()
    up_m = memory.detach().double().requires_grad_()
    ref = _cat_ref(F.embedding(ids, up_w), up_m if num_read else None, up_m if num_write else None, batch)
    reference = torch.autograd.grad(ref, [up_w, up_m], grad.double())
    for name, g, b, r in zip(("weight", "memory"), got, baseline, reference):
        assert g.dtype == dtype
        assert_close(g, r, b, name=f"d{name}")
    if deterministic:
        for g, h in zip(got, again):
            assert torch.equal(g, h), "deterministic mode must reproduce gradients bit for bit"


def check_out_buffer(device):
    """``out=``: a non-contiguous slice of a NaN buffer is filled exactly, nothing around it touched."""
    layout = MemoryLayout(3, 3, mask="causal")
    seg, mem = torch.randn(2, 7, 16, device=device), torch.randn(3, 16, device=device)
    big = torch.full((2, 20, 40), float("nan"), device=device)
    out = big[:, 2:15, 4:20]
    assert pack_segment(seg, layout, mem, mem, out=out, backend="cuda") is out
    assert torch.equal(out, _cat_ref(seg, mem, mem, 2))
    assert torch.isnan(big[:, :2]).all() and torch.isnan(big[:, 15:]).all() and torch.isnan(big[:, :, :4]).all()
    weight, ids = torch.randn(9, 16, device=device), torch.randint(0, 9, (2, 7), device=device)
    out2 = torch.empty(2, 13, 16, device=device)
    assert pack_segment_from_ids(ids, weight, layout, mem, mem, out=out2, backend="cuda") is out2
    assert torch.equal(out2, _cat_ref(F.embedding(ids, weight), mem, mem, 2))


@pytest.mark.parametrize("batch,seg_len,vocab,dim,num_read,num_write,id_dtype,dtype,sliced,deterministic", IDS_CASES)
def test_pack_from_ids_cuda_matches_embedding(cuda_pack, batch, seg_len, vocab, dim, num_read, num_write, id_dtype,
                                              dtype, sliced, deterministic):
    run_ids_case(DEVICE, batch, seg_len, vocab, dim, num_read, num_write, id_dtype, dtype, sliced, deterministic)


def test_pack_cuda_out_buffer(cuda_pack):
    check_out_buffer(DEVICE)


def test_pack_cuda_offsets_beyond_int32(cuda_pack):
    """A packed buffer of more than 2^31 elements: offsets must be 64-bit."""
    layout = MemoryLayout(16, 16, mask="causal")
    batch, seg_len, dim = 2, 2**19, 2048 + 64  # 2 * (2^19 + 32) * 2112 > 2^31
    seg = torch.empty(batch, seg_len, dim, dtype=torch.bfloat16, device=DEVICE)
    seg[:, :, :8].copy_(torch.arange(seg_len, device=DEVICE)[None, :, None].to(torch.bfloat16).expand(batch, seg_len, 8))
    mem = torch.randn(16, dim, dtype=torch.bfloat16, device=DEVICE)
    packed = pack_segment(seg, layout, mem, mem, backend="cuda")
    assert packed.numel() > 2**31
    assert torch.equal(packed[:, -16:], mem.expand(batch, 16, dim))
    assert torch.equal(packed[1, 16 + seg_len - 8 : 16 + seg_len, :8], seg[1, -8:, :8])
