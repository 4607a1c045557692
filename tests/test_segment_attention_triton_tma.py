"""The forward's TMA path (K/V and prefix K/V through tensor descriptors, ``TMA`` configs) against the
reference, and the launcher's choice between it and the pointer path.

On CPU the kernel runs under the Triton interpreter (``TRITON_INTERPRET=1``, set by ``conftest.py``), whose
tensor descriptors zero-fill out-of-bounds rows and columns as TMA does; each test forces a ``TMA: True``
config through ``config=``. On a GPU the same tests run compiled (TMA on sm_90 and newer; an older GPU
takes the pointer path, which the assertions allow). Comparisons follow ``tests/helpers.py``'s tolerance
rule (error against the float64 reference at most twice the same-dtype eager reference's, plus a floor).
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from rmt_kernels import MemoryLayout  # noqa: E402
from rmt_kernels.ops.segment_attention import triton_fwd, triton_launch  # noqa: E402
from rmt_kernels.reference import segment_attention_ref  # noqa: E402

from helpers import assert_close  # noqa: E402

MB = "memory_bidirectional"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

pytestmark = pytest.mark.skipif(not triton_fwd.HAS_TMA, reason="this triton has no tensor descriptors")


def _tma_expected(device) -> bool:
    """The TMA path runs where the launcher allows it: the interpreter, or a GPU of sm_90 and newer."""
    return INTERPRET or (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9)


@pytest.fixture
def launches(monkeypatch):
    """``[(args, meta)]`` of every forward launch (through ``triton_launch._launch``)."""
    seen = []
    real = triton_launch._launch

    def spy(kernel, grid, batch, args, meta, seed=None):
        seen.append((args, dict(meta)))
        return real(kernel, grid, batch, args, meta, seed)

    monkeypatch.setattr(triton_launch, "_launch", spy)
    return seen


def _inputs(device, dtype, b, heads, n, d, p, make=None):
    hq, hkv = heads
    make = make or (lambda *shape: torch.randn(*shape, dtype=dtype, device=device))
    q, k, v = make(b, hq, n, d), make(b, hkv, n, d), make(b, hkv, n, d)
    pk = pv = None
    if p:
        pk, pv = make(b, hkv, p, d), make(b, hkv, p, d)
    return q, k, v, pk, pv


def _check(layout, q, k, v, pk, pv, lengths, scale, config):
    out, lse = triton_launch.segment_attention_fwd_triton(q, k, v, pk, pv, lengths, layout, scale, config=config)
    kw = dict(prefix_k=pk, prefix_v=pv, segment_lengths=lengths, scale=scale, return_lse=True)
    ref, ref_lse = segment_attention_ref(q.double(), k.double(), v.double(), layout, upcast=True,
                                         **dict(kw, prefix_k=None if pk is None else pk.double(),
                                                prefix_v=None if pv is None else pv.double()))
    base, base_lse = segment_attention_ref(q, k, v, layout, upcast=False, **kw)
    assert_close(out, ref, base, name="out")
    assert_close(lse, ref_lse, base_lse.float(), name="lse")


CASES = [
    # (layout, S, P, segment_lengths, (Hq, Hkv), head dim, dtype, (BLOCK_M, BLOCK_N))
    pytest.param(MemoryLayout(5, 5, MB), 37, 7, [37, 20], (4, 2), 64, torch.bfloat16, (32, 16),
                 id="bf16-mb-P7-padded-gqa"),
    pytest.param(MemoryLayout(4, 4, "causal"), 45, 0, None, (2, 2), 32, torch.float16, (16, 32), id="fp16-causal"),
    pytest.param(MemoryLayout(16, 16, MB), 40, 3, [40, 9], (2, 1), 96, torch.float16, (32, 32),
                 id="fp16-mb-P3-D96-padded"),
    pytest.param(MemoryLayout(0, 0, "full", "all"), 50, 19, [0, 50], (3, 1), 16, torch.float32, (16, 16),
                 id="fp32-full-P19-all-row-empty-gqa3"),
    pytest.param(MemoryLayout(3, 3, "causal"), 20, 0, [20, 7], (1, 1), 128, torch.bfloat16, (16, 16),
                 id="bf16-causal-D128-padded"),
]


@pytest.mark.parametrize("layout, s, p, lengths, heads, d, dtype, blocks", CASES)
def test_tma_path_matches_reference(device, launches, layout, s, p, lengths, heads, d, dtype, blocks):
    torch.manual_seed(0)
    b = 2 if lengths is None else len(lengths)
    q, k, v, pk, pv = _inputs(device, dtype, b, heads, layout.seq_len(s), d, p)
    sl = None if lengths is None else torch.tensor(lengths, device=device)
    config = {"BLOCK_M": blocks[0], "BLOCK_N": blocks[1], "num_warps": 4, "num_stages": 2, "TMA": True}
    _check(layout, q, k, v, pk, pv, sl, 0.3, config)
    (args, meta), = launches
    assert meta["TMA"] == _tma_expected(q.device)
    if meta["TMA"]:
        assert all(type(a).__name__ == "TensorDescriptor" for a in args[9:13])


def test_tma_path_over_batch_chunks(device, launches, monkeypatch):
    """A batch of 3 cut into launches of at most 2 rows (the descriptors span the whole batch; ``B_START``
    offsets their coordinates) gives the single launch's results exactly."""
    torch.manual_seed(0)
    layout = MemoryLayout(4, 4, MB)
    q, k, v, pk, pv = _inputs(device, torch.float16, 3, (2, 1), layout.seq_len(21), 32, 5)
    sl = torch.tensor([21, 4, 13], device=device)
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2, "TMA": True}
    whole = triton_launch.segment_attention_fwd_triton(q, k, v, pk, pv, sl, layout, 0.25, config=config)
    monkeypatch.setattr(triton_launch, "GRID_YZ_MAX", 2)
    chunked = triton_launch.segment_attention_fwd_triton(q, k, v, pk, pv, sl, layout, 0.25, config=config)
    for a, c in zip(whole, chunked):
        assert torch.equal(a, c)
    assert [meta["TMA"] for _, meta in launches] == [_tma_expected(q.device)] * 2  # one call of _launch each
    _check(layout, q, k, v, pk, pv, sl, 0.25, config)


def _misaligned(device, dtype):
    """Inputs whose row stride (d + 1 elements) is not a multiple of 16 bytes: TMA cannot read them."""
    def make(*shape):
        return torch.randn(*shape[:-1], shape[-1] + 1, dtype=dtype, device=device)[..., :shape[-1]]
    return make


@pytest.mark.parametrize("which", ["kv", "prefix", "offset"])
def test_unaligned_inputs_take_the_pointer_path(device, launches, which):
    """A ``TMA: True`` config on k/v (or a prefix) that TMA cannot read runs the pointer path, correctly."""
    torch.manual_seed(0)
    layout = MemoryLayout(5, 5, MB)
    n, d, dtype = layout.seq_len(30), 32, torch.float16
    q, k, v, pk, pv = _inputs(device, dtype, 2, (2, 2), n, d, 6)
    if which == "kv":
        k, v = _misaligned(device, dtype)(2, 2, n, d), _misaligned(device, dtype)(2, 2, n, d)
    elif which == "prefix":
        pk = _misaligned(device, dtype)(2, 2, 6, d)
    else:  # a base 2 bytes past a 16-byte boundary
        k = torch.randn(2 * 2 * n * d + 1, dtype=dtype, device=device)[1:].view(2, 2, n, d)
    assert not triton_launch._use_tma(triton_fwd, q, k, v, pk, pv)
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2, "TMA": True}
    _check(layout, q, k, v, pk, pv, torch.tensor([30, 11], device=device), 0.25, config)
    (args, meta), = launches
    assert meta["TMA"] is False and all(isinstance(a, torch.Tensor) for a in args[9:13])


def test_tma_readiness():
    """``tma_ready``: unit last stride, 16-byte aligned base and strides, none zero or negative (a dim of
    size 1 excepted, whose stride the descriptor replaces)."""
    x = torch.randn(2, 3, 40, 64, dtype=torch.bfloat16)
    assert triton_fwd.tma_ready(x)
    assert triton_fwd.tma_ready(x.transpose(1, 2).contiguous().transpose(1, 2))  # [B, N, H, D] storage
    assert not triton_fwd.tma_ready(x[..., ::2])  # last stride 2
    assert not triton_fwd.tma_ready(torch.randn(2, 3, 40, 68, dtype=torch.bfloat16)[..., :64])  # 136-byte rows
    assert not triton_fwd.tma_ready(x[:1].expand(2, 3, 40, 64))  # stride 0 across two rows
    one = torch.randn(1, 3, 40, 64, dtype=torch.bfloat16).expand(1, 3, 40, 64)
    assert triton_fwd.tma_ready(one[:, :1].expand(1, 1, 40, 64))
    assert triton_fwd._tma_strides(torch.randn(1, 1, 40, 64)[:, :, :, :])[:2] == [40 * 64, 40 * 64]


TRACE_CASES = [
    pytest.param(MemoryLayout(3, 5, "causal"), 40, 0, None, id="causal-R3-W5"),
    pytest.param(MemoryLayout(0, 4, MB), 37, 7, [37, 0], id="mb-write-only-P7-seg-fully-padded"),
    pytest.param(MemoryLayout(16, 16, MB), 64, 16, [10, 64], id="mb-M16-P16-seg-padded"),
    pytest.param(MemoryLayout(17, 17, "full", "all"), 30, 5, [13, 2], id="full-M17-P5-all-padded"),
]


@pytest.mark.parametrize("block_m, block_n", [(16, 16), (32, 16), (16, 32)])
@pytest.mark.parametrize("layout, s, p, lengths", TRACE_CASES)
def test_tma_tile_schedule(device, layout, s, p, lengths, block_m, block_n):
    """The TMA path's one packed loop writes the trace codes of the pointer path (which the schedule test
    of ``test_segment_attention_triton.py`` checks against ``MemoryLayout.classify_tiles``) and the counts
    of ``tile_counts``, with the same outputs up to rounding."""
    torch.manual_seed(0)
    n = layout.seq_len(s)
    b = 2 if lengths is None else len(lengths)
    q, k, v, pk, pv = _inputs(device, torch.float16, b, (2, 1), n, 16, p)
    sl = None if lengths is None else torch.tensor(lengths, device=device)
    blocks = {"BLOCK_M": block_m, "BLOCK_N": block_n}
    *tma, tma_trace = triton_launch.segment_attention_fwd_triton(q, k, v, pk, pv, sl, layout, 0.25,
                                                                 config=dict(blocks, TMA=True), trace=True)
    *ptr, ptr_trace = triton_launch.segment_attention_fwd_triton(q, k, v, pk, pv, sl, layout, 0.25, config=blocks,
                                                                 trace=True)
    assert torch.equal(tma_trace, ptr_trace)
    for a, c in zip(tma, ptr):  # the same sums in another order (the pointer path: unmasked tiles first)
        torch.testing.assert_close(a.float(), c.float(), rtol=4e-3, atol=4e-3)
    counts = triton_launch.tile_counts(layout, s, block_m, block_n, p, lengths)
    if lengths is None:
        counts = {key: value * b for key, value in counts.items()}
    head = tma_trace[:, 0].cpu()
    assert counts == {"visited": int((head > 0).sum()), "unmasked": int((head == 2).sum()), "dense": head.numel()}


def test_tma_configs_only_on_sm90_16bit():
    """TMA configs are appended for sm_90 16-bit inputs without dropout; the pointer configs (and the first
    config, that of a fixed launch) are unchanged; ``fwd_pointer_configs`` drops them."""
    for d in (16, 32, 64, 96, 128, 256):
        for dtype in (torch.float16, torch.bfloat16):
            configs = triton_fwd.fwd_configs(d, dtype, 90)
            tma = [c for c in configs if c.get("TMA")]
            assert tma and not configs[0].get("TMA")
            assert triton_fwd.fwd_pointer_configs(d, dtype, 90) == [c for c in configs if not c.get("TMA")]
            assert not any(c.get("TMA") for c in triton_fwd.fwd_configs(d, dtype, 90, dropout=True))
            assert not any(c.get("TMA") for c in triton_fwd.fwd_configs(d, dtype, 80))
        assert not any(c.get("TMA") for c in triton_fwd.fwd_configs(d, torch.float32, 90))
    at = {d: {(c["BLOCK_M"], c["BLOCK_N"], c["num_warps"]) for c in triton_fwd.fwd_configs(d, torch.bfloat16, 90)
              if c.get("TMA")} for d in (64, 128)}
    assert (128, 128, 8) in at[128] and {(128, 128, 8), (128, 64, 8)} <= at[64]


def test_warp_specialized_loop_matches(device):
    """``WARP_SPECIALIZE`` (the packed loop as ``tl.range(..., warp_specialize=True)``, compiled by
    ``rmt-kernels aot`` as a variant) computes what the plain loop computes."""
    if not triton_fwd.HAS_WARP_SPECIALIZE:
        pytest.skip("this triton has no warp_specialize")
    torch.manual_seed(0)
    layout = MemoryLayout(4, 4, MB)
    q, k, v, pk, pv = _inputs(device, torch.float16, 2, (2, 1), layout.seq_len(27), 32, 5)
    sl = torch.tensor([27, 9], device=device)
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2, "TMA": True}
    plain = triton_launch.segment_attention_fwd_triton(q, k, v, pk, pv, sl, layout, 0.25, config=config)
    special = triton_launch.segment_attention_fwd_triton(q, k, v, pk, pv, sl, layout, 0.25,
                                                         config=dict(config, WARP_SPECIALIZE=True))
    for a, c in zip(plain, special):
        assert torch.equal(a, c)


@pytest.mark.cuda
@pytest.mark.parametrize("d, blocks, warps, stages", [
    pytest.param(64, (128, 128), 8, 3, id="D64-128x128"),
    pytest.param(128, (128, 128), 8, 2, id="D128-128x128"),
    pytest.param(128, (128, 64), 8, 3, id="D128-128x64"),
])
def test_tma_configs_on_gpu(launches, d, blocks, warps, stages):
    """The TMA configs of the sm_90 table on a GPU (the path is taken on sm_90 and newer), bfloat16, a
    long padded segment with a prefix and grouped-query heads, against the float64 reference."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    layout = MemoryLayout(16, 16, "memory_bidirectional")
    q, k, v, pk, pv = _inputs(device, torch.bfloat16, 2, (8, 2), layout.seq_len(1000), d, 37)
    sl = torch.tensor([1000, 611], device=device)
    config = {"BLOCK_M": blocks[0], "BLOCK_N": blocks[1], "num_warps": warps, "num_stages": stages, "TMA": True}
    _check(layout, q, k, v, pk, pv, sl, d ** -0.5, config)
    (args, meta), = launches
    assert meta["TMA"] == _tma_expected(q.device)
