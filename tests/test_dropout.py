"""Attention dropout (``dropout_p``) on the torch backend against the reference applying the keep mask
the call returns, forward and backward; the keep rate, reproducibility under ``torch.manual_seed``,
the limits of ``dropout_p``, the custom op and ``torch.compile``. (The Triton kernels' dropout is
tested in ``test_segment_attention_triton.py``.)"""

from __future__ import annotations

import math

import pytest
import torch

from rmt_kernels import BackendUnavailableError, MemoryLayout, segment_attention, segment_attention_ref
from rmt_kernels.ops.segment_attention import interface

from helpers import assert_close

MB = "memory_bidirectional"

CASES = [
    pytest.param(MemoryLayout(0, 0, "causal"), 20, 0, None, (2, 2), id="causal"),
    pytest.param(MemoryLayout(3, 3, MB, "segment"), 17, 5, [17, 4], (4, 2), id="mb-prefix-seg-padded-gqa"),
    pytest.param(MemoryLayout(0, 2, MB, "all"), 9, 3, [9, 0], (2, 1), id="mb-write-only-prefix-all-empty-rows"),
    pytest.param(MemoryLayout(2, 2, "full"), 11, 0, [5, 11], (2, 2), id="full-padded"),
]


def _inputs(layout, s, p, heads, dtype=torch.float32, b=2, d=16):
    hq, hkv = heads
    n = layout.seq_len(s)

    def rnd(h, rows):
        return torch.randn(b, h, rows, d, dtype=dtype, requires_grad=True)

    q, k, v = rnd(hq, n), rnd(hkv, n), rnd(hkv, n)
    pk, pv = (rnd(hkv, p), rnd(hkv, p)) if p else (None, None)
    return q, k, v, pk, pv


@pytest.mark.parametrize("layout, s, p, lengths, heads", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_reference_with_the_returned_mask(layout, s, p, lengths, heads, dtype):
    q, k, v, pk, pv = _inputs(layout, s, p, heads, dtype)
    sl = None if lengths is None else torch.tensor(lengths)
    kw = dict(segment_lengths=sl, prefix_k=pk, prefix_v=pv)
    out, keep = segment_attention(q, k, v, layout, dropout_p=0.3, return_dropout_mask=True, backend="torch", **kw)
    assert keep.dtype == torch.bool and keep.shape == (q.shape[0], q.shape[1], q.shape[2], p + q.shape[2])
    inputs = [t for t in (q, k, v, pk, pv) if t is not None]
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, dout)

    def reference(tensors, upcast):
        a = dict(zip(("q", "k", "v", "prefix_k", "prefix_v"), tensors))
        return segment_attention_ref(a["q"], a["k"], a["v"], layout, segment_lengths=sl, prefix_k=a.get("prefix_k"),
                                     prefix_v=a.get("prefix_v"), upcast=upcast, dropout_p=0.3, dropout_mask=keep)

    hi = [t.detach().double().requires_grad_() for t in inputs]
    lo = [t.detach().clone().requires_grad_() for t in inputs]
    ref, base = reference(hi, True), reference(lo, False)
    assert_close(out, ref, base, name="out")
    for g, rg, bg, name in zip(grads, torch.autograd.grad(ref, hi, dout.double()),
                               torch.autograd.grad(base, lo, dout), ("q", "k", "v", "prefix_k", "prefix_v")):
        assert_close(g, rg, bg, name=f"d{name}")


def test_rows_without_keys_stay_zero():
    layout = MemoryLayout(0, 0, MB)
    q, k, v, _, _ = _inputs(layout, 8, 0, (2, 2))
    out = segment_attention(q, k, v, layout, segment_lengths=[8, 0], dropout_p=0.5, backend="torch")
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    g = torch.autograd.grad(out.sum(), q)[0]
    assert torch.isfinite(g).all() and torch.equal(g[1], torch.zeros_like(g[1]))


def test_keep_rate_and_expectation():
    layout = MemoryLayout(2, 2, MB)
    q, k, v, _, _ = _inputs(layout, 60, 0, (4, 4), b=4)
    p = 0.25
    _, keep = segment_attention(q, k, v, layout, dropout_p=p, return_dropout_mask=True, backend="torch")
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    with torch.no_grad():
        exact = segment_attention(q, k, v, layout, backend="torch")
        mean = sum(segment_attention(q, k, v, layout, dropout_p=p, backend="torch") for _ in range(400)) / 400
    # Inverted scaling keeps the expectation: the mean over many draws approaches the exact output.
    assert (mean - exact).abs().mean() < 0.1 * exact.abs().mean()


def test_seed_reproduces_and_calls_differ():
    layout = MemoryLayout(2, 2, MB)
    q, k, v, _, _ = _inputs(layout, 12, 0, (2, 2))
    torch.manual_seed(7)
    a = segment_attention(q, k, v, layout, dropout_p=0.2, backend="torch")
    b = segment_attention(q, k, v, layout, dropout_p=0.2, backend="torch")
    torch.manual_seed(7)
    c = segment_attention(q, k, v, layout, dropout_p=0.2, backend="torch")
    assert torch.equal(a, c) and not torch.equal(a, b)


def test_zero_dropout_is_the_plain_call():
    layout = MemoryLayout(2, 2, MB)
    q, k, v, _, _ = _inputs(layout, 12, 0, (2, 2))
    out, keep = segment_attention(q, k, v, layout, dropout_p=0.0, return_dropout_mask=True)
    assert keep.all() and torch.equal(out, segment_attention(q, k, v, layout))


@pytest.mark.parametrize("p, exc", [(1.0, ValueError), (-0.1, ValueError), (float("nan"), ValueError),
                                    ("0.1", TypeError), (True, TypeError)])
def test_dropout_p_limits(p, exc):
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(exc, match="dropout_p"):
        segment_attention(q, q, q, MemoryLayout(2, 2), dropout_p=p)


def test_reference_needs_the_mask():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="dropout_mask"):
        segment_attention_ref(q, q, q, MemoryLayout(2, 2), dropout_p=0.1)


def test_a_backend_without_dropout_is_refused_by_name(monkeypatch):
    impl = interface.BACKEND_TABLE["torch"]
    monkeypatch.setattr(impl, "dropout", False)
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(BackendUnavailableError, match="has no attention dropout"):
        segment_attention(q, q, q, MemoryLayout(2, 2), dropout_p=0.1, backend="torch")


def test_gradcheck_with_a_fixed_seed():
    layout = MemoryLayout(1, 1, MB)
    q, k, v, _, _ = _inputs(layout, 4, 0, (2, 1), dtype=torch.float64, b=1, d=4)

    def fn(q, k, v):
        torch.manual_seed(3)  # the same seed, so the same keep mask, on every evaluation
        return segment_attention(q, k, v, layout, dropout_p=0.4, backend="torch")

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_custom_op_with_dropout():
    layout = MemoryLayout(2, 2, MB)
    q, k, v, _, _ = _inputs(layout, 9, 0, (2, 2))
    seed = torch.tensor([123])
    params = (layout.num_read, layout.num_write, layout.mask, layout.prefix_visible_to, 0.25, "torch", 0.3, seed)
    torch.library.opcheck(interface.segment_attention_fwd_op, (q, k, v, None, None, None, *params))
    out, _ = interface.segment_attention_fwd_op(q, k, v, None, None, None, *params)
    eager = interface._attention(q, k, v, None, None, None, layout, 0.25, "torch",
                                 interface.BACKEND_TABLE["torch"], 0.3, seed)
    keep = interface.BACKEND_TABLE["torch"].dropout_mask(q, k, None, layout, 0.3, seed)
    hi = [t.detach().double().requires_grad_() for t in (q, k, v)]
    lo = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = segment_attention_ref(*hi, layout, scale=0.25, dropout_p=0.3, dropout_mask=keep)
    base = segment_attention_ref(*lo, layout, scale=0.25, dropout_p=0.3, dropout_mask=keep, upcast=False)
    dout = torch.randn_like(out)
    g_ref = torch.autograd.grad(ref, hi, dout.double())
    g_base = torch.autograd.grad(base, lo, dout)
    for name, got in (("custom op", out), ("eager", eager)):  # the launcher and the eager entry alike
        assert_close(got, ref, base, name=f"{name} out")
        for g, r, bl, x in zip(torch.autograd.grad(got, (q, k, v), dout), g_ref, g_base, "qkv"):
            assert_close(g, r, bl, name=f"{name} d{x}")


def test_torch_compile_fullgraph_with_dropout():
    layout = MemoryLayout(2, 2, MB)
    q, k, v, _, _ = _inputs(layout, 8, 0, (2, 2))
    fn = torch.compile(lambda q, k, v: segment_attention(q, k, v, layout, dropout_p=0.3), fullgraph=True)
    torch.manual_seed(1)
    a = fn(q, k, v)
    torch.manual_seed(1)
    b = fn(q, k, v)
    assert torch.equal(a, b) and not torch.equal(a, fn(q, k, v))
    assert torch.isfinite(torch.autograd.grad(a.sum(), q)[0]).all()
