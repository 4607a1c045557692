"""``pack_segment`` / ``pack_segment_from_ids`` on ``backend="cuda"`` (csrc/pack_segment/pack_segment.cu) against
``torch.cat`` / ``F.embedding`` on a GPU: the handoff suite's cases, ``out=`` buffers, both embedding
gradient modes and 64-bit offsets. Every test carries the ``cuda`` marker (skipped without a GPU).
"""

from __future__ import annotations

import pytest
import torch

from rmt_kernels import MemoryLayout, backends, pack_segment
from rmt_kernels.ops.pack_segment import interface

from helpers import PACK_CASES, check_out_buffer, run_ids_case, run_pack_case

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
    run_pack_case(DEVICE, "cuda", batch, seg_len, dim, num_read, num_write, read_kind, write_kind, dtype, sliced)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param((4, 1000, 768, 16, 16, "bcast", "tied", torch.bfloat16, True), id="gpt2-official-bcast-tied-sliced"),
        pytest.param((2, 127, 2048, 128, 0, "batched", "none", torch.float16, False), id="llama-read-only-fp16"),
        pytest.param((3, 65, 100, 2, 3, "bcast", "batched", torch.float32, True), id="d100-fp32-scalar-copies"),
    ],
)
def test_pack_segment_cuda_model_shapes(cuda_pack, case):
    run_pack_case(DEVICE, "cuda", *case)


# (B, S, V, d, R, W, ids dtype, weight dtype, sliced, deterministic)
IDS_CASES = [
    pytest.param(2, 33, 7, 32, 3, 3, torch.int64, torch.float32, False, True, id="repeats-det"),
    pytest.param(2, 33, 7, 32, 3, 3, torch.int64, torch.float32, False, False, id="repeats-atomic"),
    pytest.param(3, 17, 50, 40, 2, 2, torch.int32, torch.bfloat16, True, True, id="int32-sliced-bf16-det"),
    pytest.param(2, 64, 11, 64, 0, 4, torch.int64, torch.bfloat16, True, False, id="write-only-bf16-atomic"),
    pytest.param(4, 1000, 50257, 768, 16, 16, torch.int64, torch.float16, False, True, id="gpt2-vocab-fp16-det"),
]


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
