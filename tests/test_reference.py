"""segment_attention_ref: float64 gradcheck, rows with no visible key, a naive per-row loop written from
SPEC §2 (not from layout.py), and the ``upcast=False`` same-dtype baseline."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rmt_kernels import MemoryLayout, segment_attention_ref


def spec_sees(layout: MemoryLayout, s: int, p: int, length: int, row: int, key: int) -> bool:
    """SPEC §2 in words: does packed query ``row`` see key ``key`` of ``[prefix (p) | packed]``?"""
    r = layout.num_read

    def kind(pos):
        return "r" if pos < r else "x" if pos < r + s else "w"

    if key < p:
        return layout.prefix_visible_to == "all" or kind(row) == "x"
    j = key - p
    if kind(j) == "x" and j - r >= length:  # right padding hides X_t for t >= length from every row
        return False
    if layout.mask == "full":
        return True
    if layout.mask == "causal":
        return j <= row
    rows_kind, keys_kind = kind(row), kind(j)
    if rows_kind == "r":  # R rows see all of R and nothing else of the packed keys
        return keys_kind == "r"
    if rows_kind == "x":  # X rows see all of R and X_0..X_t; never W
        return keys_kind == "r" or (keys_kind == "x" and j <= row)
    return True  # W rows see all of R, the valid X and all of W


def naive_attention(q, k, v, layout, lengths=None, prefix_k=None, prefix_v=None, scale=None):
    """One softmax per (batch, head, row) over that row's visible keys, in float64 Python loops.

    Returns ``(out [B, Hq, N, D], lse [B, Hq, N])``; a row with no visible key gives 0 and -inf."""
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    s = n - layout.num_read - layout.num_write
    p = 0 if prefix_k is None else prefix_k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    keys = k.double() if prefix_k is None else torch.cat([prefix_k, k], 2).double()
    values = v.double() if prefix_v is None else torch.cat([prefix_v, v], 2).double()
    out = torch.zeros(b, hq, n, d, dtype=torch.float64)
    lse = torch.full((b, hq, n), float("-inf"), dtype=torch.float64)
    for bi in range(b):
        length = s if lengths is None else int(lengths[bi])
        for h in range(hq):
            kv = h // (hq // hkv)
            for i in range(n):
                visible = [j for j in range(p + n) if spec_sees(layout, s, p, length, i, j)]
                if not visible:
                    continue
                scores = keys[bi, kv, visible] @ q[bi, h, i].double() * scale
                weights = torch.softmax(scores, dim=0)
                out[bi, h, i] = weights @ values[bi, kv, visible]
                lse[bi, h, i] = torch.logsumexp(scores, dim=0)
    return out, lse


def make_inputs(b, hq, hkv, n, d, p, dtype=torch.float64, requires_grad=False, prefix_grad=None):
    q = torch.randn(b, hq, n, d, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(b, hkv, n, d, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(b, hkv, n, d, dtype=dtype, requires_grad=requires_grad)
    pk = pv = None
    if p:
        grad = requires_grad if prefix_grad is None else prefix_grad
        pk = torch.randn(b, hkv, p, d, dtype=dtype, requires_grad=grad)
        pv = torch.randn(b, hkv, p, d, dtype=dtype, requires_grad=grad)
    return q, k, v, pk, pv


# --------------------------------------------------------------------------------------- naive loop

NAIVE_CASES = [
    pytest.param(MemoryLayout(2, 2, "causal"), 5, 0, None, (2, 2), id="causal-R2-W2"),
    pytest.param(MemoryLayout(2, 2, "memory_bidirectional"), 5, 0, None, (2, 2), id="mb-R2-W2"),
    pytest.param(MemoryLayout(2, 2, "full"), 5, 0, None, (2, 2), id="full-R2-W2"),
    pytest.param(MemoryLayout(1, 3, "causal", "segment"), 4, 3, [4, 1], (4, 2), id="causal-prefix-seg-pad-gqa"),
    pytest.param(MemoryLayout(3, 1, "memory_bidirectional", "segment"), 4, 2, [2, 0], (4, 1),
                 id="mb-prefix-seg-pad-gqa"),
    pytest.param(MemoryLayout(3, 1, "memory_bidirectional", "all"), 4, 2, [4, 3], (2, 1), id="mb-prefix-all-pad"),
    pytest.param(MemoryLayout(0, 2, "full", "all"), 6, 1, [0, 6], (2, 2), id="full-prefix-all-fully-padded"),
    pytest.param(MemoryLayout(0, 0, "memory_bidirectional"), 5, 0, [0, 3], (2, 2), id="mb-R0-W0-empty-rows"),
    pytest.param(MemoryLayout(2, 0, "causal", "all"), 3, 4, None, (3, 1), id="causal-read-only-prefix-all"),
]


@pytest.mark.parametrize("layout, s, p, lengths, heads", NAIVE_CASES)
def test_reference_matches_naive_loop(layout, s, p, lengths, heads):
    hq, hkv = heads
    n, d = layout.seq_len(s), 8
    q, k, v, pk, pv = make_inputs(2, hq, hkv, n, d, p)
    sl = None if lengths is None else torch.tensor(lengths)
    for scale in (None, 0.7):
        out, lse = segment_attention_ref(
            q, k, v, layout, segment_lengths=sl, prefix_k=pk, prefix_v=pv, scale=scale, return_lse=True
        )
        exp_out, exp_lse = naive_attention(q, k, v, layout, lengths, pk, pv, scale)
        assert out.dtype == torch.float64 and lse.dtype == torch.float64
        assert lse.shape == (2, hq, n)
        torch.testing.assert_close(out, exp_out, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(lse, exp_lse, atol=1e-12, rtol=1e-12)


def test_reference_float32_matches_naive_loop():
    layout = MemoryLayout(2, 3, "memory_bidirectional", "segment")
    q, k, v, pk, pv = make_inputs(2, 4, 2, layout.seq_len(6), 16, 3, dtype=torch.float32)
    lengths = torch.tensor([6, 2])
    out, lse = segment_attention_ref(
        q, k, v, layout, segment_lengths=lengths, prefix_k=pk, prefix_v=pv, return_lse=True
    )
    exp_out, exp_lse = naive_attention(q, k, v, layout, lengths, pk, pv)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), exp_out, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), exp_lse, atol=2e-6, rtol=1e-5)


def test_reference_reads_strided_inputs():
    layout = MemoryLayout(2, 2, "causal")
    n, d = layout.seq_len(7), 8
    buf = torch.randn(2, n, 3, 2 * d, dtype=torch.float64)
    q = buf[..., ::2].transpose(1, 2)  # [B, H, N, D] view of a [B, N, H, 2D] buffer
    k = torch.randn(2, n, 3, d, dtype=torch.float64).transpose(1, 2)
    v = torch.randn(4, 3, n + 5, d, dtype=torch.float64)[1:3, :, 2 : 2 + n]
    out = segment_attention_ref(q, k, v, layout)
    expected = segment_attention_ref(q.contiguous(), k.contiguous(), v.contiguous(), layout)
    torch.testing.assert_close(out, expected, atol=1e-13, rtol=1e-13)


# --------------------------------------------------------------------------------------- gradcheck

GRADCHECK_CASES = [
    pytest.param(MemoryLayout(1, 2, "causal", "segment"), 3, 2, [3, 1], (2, 2), True, id="causal-prefix-seg-pad"),
    pytest.param(MemoryLayout(1, 2, "memory_bidirectional", "segment"), 3, 2, [3, 0], (4, 2), True,
                 id="mb-prefix-seg-pad-gqa"),
    pytest.param(MemoryLayout(2, 1, "memory_bidirectional", "all"), 3, 1, None, (2, 1), True, id="mb-prefix-all-gqa"),
    pytest.param(MemoryLayout(1, 1, "full", "all"), 3, 2, [2, 1], (2, 2), True, id="full-prefix-all-pad"),
    pytest.param(MemoryLayout(2, 2, "memory_bidirectional"), 2, 2, [2, 1], (2, 2), False, id="mb-prefix-no-grad"),
    pytest.param(MemoryLayout(0, 1, "causal"), 3, 0, [0, 2], (2, 1), False, id="causal-R0-fully-padded"),
]


@pytest.mark.parametrize("layout, s, p, lengths, heads, prefix_grad", GRADCHECK_CASES)
def test_reference_gradcheck_float64(layout, s, p, lengths, heads, prefix_grad):
    hq, hkv = heads
    q, k, v, pk, pv = make_inputs(2, hq, hkv, layout.seq_len(s), 4, p, requires_grad=True, prefix_grad=prefix_grad)
    sl = None if lengths is None else torch.tensor(lengths)
    inputs = [q, k, v] + ([pk, pv] if prefix_grad else [])

    def fn(*args):
        q_, k_, v_ = args[:3]
        pk_, pv_ = args[3:] if prefix_grad else (pk, pv)
        return segment_attention_ref(q_, k_, v_, layout, segment_lengths=sl, prefix_k=pk_, prefix_v=pv_, scale=0.8)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------------------- empty rows

EMPTY_ROW_CASES = [
    pytest.param(MemoryLayout(0, 2, "causal"), 4, [0, 4], id="causal-R0-fully-padded"),
    pytest.param(MemoryLayout(0, 3, "memory_bidirectional"), 4, [0, 2], id="mb-R0-fully-padded"),
    pytest.param(MemoryLayout(0, 0, "memory_bidirectional"), 5, [0, 0], id="mb-R0-W0-all-padded"),
    pytest.param(MemoryLayout(0, 0, "full"), 3, [0, 1], id="full-R0-W0-fully-padded"),
]


@pytest.mark.parametrize("layout, s, lengths", EMPTY_ROW_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_rows_without_keys_give_zero_and_no_nan(layout, s, lengths, dtype):
    n, d = layout.seq_len(s), 8
    q, k, v, _, _ = make_inputs(2, 2, 2, n, d, 0, dtype=dtype, requires_grad=True)
    sl = torch.tensor(lengths)
    empty = layout.visible_counts(s, 0, lengths) == 0  # [B, N]
    assert empty.any(), "the case must contain rows without keys"
    out, lse = segment_attention_ref(q, k, v, layout, segment_lengths=sl, return_lse=True)
    rows = empty[:, None, :].expand(2, 2, n)
    assert torch.equal(out[rows], torch.zeros_like(out[rows]))
    assert torch.isneginf(lse[rows]).all()
    assert torch.isfinite(lse[~rows]).all()
    assert torch.isfinite(out).all()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(g).all(), name
    assert torch.equal(dq[rows], torch.zeros_like(dq[rows]))
    # Padded keys are seen by nobody: they get exactly zero gradient.
    valid = layout.key_valid(s, lengths)[:, None, :].expand(2, 2, n)
    assert torch.equal(dk[~valid], torch.zeros_like(dk[~valid]))
    assert torch.equal(dv[~valid], torch.zeros_like(dv[~valid]))


# --------------------------------------------------------------------------------------- upcast


class _RecordDtypes(TorchDispatchMode):
    """Records the result dtype of every matmul and exp the reference dispatches."""

    OPS = {"mm", "bmm", "exp", "_softmax"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in self.OPS:
            self.seen.append((func.overloadpacket.__name__, result.dtype))
        return result


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_upcast_false_computes_in_input_dtype(dtype):
    layout = MemoryLayout(4, 4, "memory_bidirectional", "segment")
    n = layout.seq_len(56)
    q, k, v, pk, pv = make_inputs(2, 2, 2, n, 32, 5, dtype=torch.float32)
    lengths = torch.tensor([56, 30])
    q, k, v, pk, pv = (t.to(dtype) for t in (q, k, v, pk, pv))
    kw = dict(prefix_k=pk, prefix_v=pv, segment_lengths=lengths, return_lse=True)

    with _RecordDtypes() as rec_low:
        same, lse_same = segment_attention_ref(q, k, v, layout, upcast=False, **kw)
    with _RecordDtypes() as rec_up:
        up, lse_up = segment_attention_ref(q, k, v, layout, upcast=True, **kw)
    assert {op for op, _ in rec_low.seen} >= {"bmm", "exp"}
    assert all(dt == dtype for _, dt in rec_low.seen), rec_low.seen
    assert all(dt == torch.float32 for _, dt in rec_up.seen), rec_up.seen
    assert same.dtype == up.dtype == dtype
    assert lse_same.dtype == lse_up.dtype == torch.float32

    # The same-dtype computation is measurably less accurate than the upcast one.
    q64, k64, v64, pk64, pv64 = (t.double() for t in (q, k, v, pk, pv))
    truth = segment_attention_ref(q64, k64, v64, layout, prefix_k=pk64, prefix_v=pv64, segment_lengths=lengths)
    err_same = (same.double() - truth).abs().max().item()
    err_up = (up.double() - truth).abs().max().item()
    assert err_same > 2 * err_up, (err_same, err_up)


def test_upcast_is_a_no_op_for_float32_and_float64():
    layout = MemoryLayout(2, 2, "causal")
    for dtype in (torch.float32, torch.float64):
        q, k, v, _, _ = make_inputs(1, 2, 2, layout.seq_len(9), 16, 0, dtype=dtype)
        a = segment_attention_ref(q, k, v, layout, upcast=True)
        b = segment_attention_ref(q, k, v, layout, upcast=False)
        assert torch.equal(a, b)
        with _RecordDtypes() as rec:
            segment_attention_ref(q, k, v, layout, upcast=True)
        assert all(dt == dtype for _, dt in rec.seen), rec.seen
