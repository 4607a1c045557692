"""The one tolerance helper (STYLE.md convention 3), and the checks and case lists that several test
modules run (each on its backends), so that no test module imports another.

Rule (flash-attention's, defined in rmt_kernels/_tolerance.py so `rmt-kernels check` applies the same
one): a kernel's error against a high-precision reference may be at most ``FACTOR`` times the error of
the same computation done eagerly in the kernel's dtype, plus a small per-dtype floor. A miss fails the
test with where the mismatches and NaNs are; nothing only warns.
"""

from __future__ import annotations

import math
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from rmt_kernels import MemoryLayout, pack_segment, pack_segment_from_ids, segment_attention, segment_attention_ref
from rmt_kernels.ops.segment_attention import interface
from rmt_kernels.bench import records
from rmt_kernels.reference import pack_segment_ref
from rmt_kernels._tolerance import FACTOR, FLOORS, error_bound, floor_for  # noqa: F401  (the one rule)


def _describe(name: str, diff: torch.Tensor, bound: float, actual: torch.Tensor, expected: torch.Tensor) -> str:
    bad = diff > bound
    lines = [f"{name}: {int(bad.sum())} of {diff.numel()} elements exceed {bound:.3e}"]
    flat = int(torch.argmax(torch.nan_to_num(diff, nan=float("inf"))))
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    lines.append(
        f"  worst at {idx}: got {actual[idx].item():.6g}, expected {expected[idx].item():.6g}, "
        f"|diff| {diff[idx].item():.3e}"
    )
    if diff.dim() >= 3:  # which packed rows (dim 2 of [B, H, N, D]) are off
        rows = torch.nonzero(bad.flatten(0, 1).any(dim=0).any(dim=-1) if diff.dim() == 4 else bad.any(0).any(-1))
        lines.append(f"  rows (dim 2) off: {rows.flatten()[:20].tolist()}{' ...' if rows.numel() > 20 else ''}")
    return "\n".join(lines)


def assert_no_nan(t: torch.Tensor, name: str) -> None:
    nan = ~torch.isfinite(t)
    if nan.any():
        where = torch.nonzero(nan)[:10].tolist()
        raise AssertionError(f"{name}: {int(nan.sum())} non-finite values, first at {where}")


def assert_close(
    actual: torch.Tensor,
    reference: torch.Tensor,
    baseline: Optional[torch.Tensor] = None,
    *,
    name: str = "output",
    dtype: Optional[torch.dtype] = None,
) -> float:
    """Check ``actual`` against the high-precision ``reference``.

    ``baseline`` is the same-dtype eager computation (e.g. ``segment_attention_ref(..., upcast=False)``);
    without it the bound is the floor alone. Returns the max error. Raises AssertionError with a
    mismatch report.
    """
    if actual.shape != reference.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != reference {tuple(reference.shape)}")
    dtype = dtype or actual.dtype
    assert_no_nan(actual, name)
    ref = reference.detach().to(torch.float64)
    diff = (actual.detach().to(torch.float64) - ref).abs()
    bound = error_bound(ref, baseline, dtype)
    if diff.numel() and not diff.max().item() <= bound:
        raise AssertionError(_describe(name, diff, bound, actual.detach().to(torch.float64), ref))
    return diff.max().item() if diff.numel() else 0.0


# --------------------------------------------------------------------------- segment attention

MB = "memory_bidirectional"


def check_against_reference(layout, q, k, v, prefix_k=None, prefix_v=None, lengths=None, scale=None, dout=None,
                            backend="torch"):
    """Run ``segment_attention`` on exactly these tensors (any strides; gradients are taken for those
    that require grad) and compare output, log-sum-exp and gradients with the reference."""
    named = {"q": q, "k": k, "v": v, "prefix_k": prefix_k, "prefix_v": prefix_v}
    wrt = [name for name, t in named.items() if t is not None and t.requires_grad]
    kw = dict(segment_lengths=lengths, scale=scale)

    out = segment_attention(q, k, v, layout, prefix_k=prefix_k, prefix_v=prefix_v, backend=backend, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    if dout is None:
        dout = torch.randn(out.shape, dtype=out.dtype, device=out.device)
    grads = torch.autograd.grad(out, [named[n] for n in wrt], dout) if wrt else []

    def copies(convert):
        return {
            n: None if t is None else convert(t.detach()).requires_grad_(n in wrt) for n, t in named.items()
        }

    def reference(inputs, upcast, grad_out):
        o, lse = segment_attention_ref(
            inputs["q"], inputs["k"], inputs["v"], layout, prefix_k=inputs["prefix_k"],
            prefix_v=inputs["prefix_v"], upcast=upcast, return_lse=True, **kw,
        )
        g = torch.autograd.grad(o, [inputs[n] for n in wrt], grad_out) if wrt else []
        return o, lse, g

    ref_out, ref_lse, ref_grads = reference(copies(lambda t: t.double()), True, dout.double())
    base_out, base_lse, base_grads = reference(copies(lambda t: t.clone()), False, dout)

    assert_close(out, ref_out, base_out, name="out")
    for name, g, rg, bg in zip(wrt, grads, ref_grads, base_grads):
        assert g.shape == named[name].shape and g.dtype == named[name].dtype, name
        assert_close(g, rg, bg, name=f"d{name}")

    # The log-sum-exp the backward relies on, from the custom op itself.
    with torch.no_grad():
        s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
        pk, pv = (prefix_k, prefix_v) if prefix_k is not None and prefix_k.shape[2] else (None, None)
        out2, lse = interface.segment_attention_fwd_op(
            q, k, v, pk, pv, lengths, layout.num_read, layout.num_write, layout.mask,
            layout.prefix_visible_to, s, backend,
        )
    assert lse.shape == q.shape[:3]
    assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    assert torch.equal(out2, out.detach())
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "rows with no visible key must have lse -inf"
    assert torch.isneginf(lse[~finite]).all()
    assert_close(lse[finite], ref_lse[finite], base_lse[finite], name="lse", dtype=q.dtype)
    return out


def device_inputs(device, b, heads, n, d, p, dtype=torch.float32, prefix_grad=True):
    """Leaf ``(q, k, v, prefix_k, prefix_v)`` on ``device`` (prefix None when ``p == 0``)."""
    hq, hkv = heads

    def rnd(*shape, grad=True):
        return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(grad)

    q, k, v = rnd(b, hq, n, d), rnd(b, hkv, n, d), rnd(b, hkv, n, d)
    pk = pv = None
    if p:
        pk, pv = rnd(b, hkv, p, d, grad=prefix_grad), rnd(b, hkv, p, d, grad=prefix_grad)
    return q, k, v, pk, pv


def make_inputs(b, heads, n, d, p, dtype=torch.float32, prefix_grad=True):
    hq, hkv = heads
    q = torch.randn(b, hq, n, d, dtype=dtype, requires_grad=True)
    k = torch.randn(b, hkv, n, d, dtype=dtype, requires_grad=True)
    v = torch.randn(b, hkv, n, d, dtype=dtype, requires_grad=True)
    pk = pv = None
    if p:
        pk = torch.randn(b, hkv, p, d, dtype=dtype, requires_grad=prefix_grad)
        pv = torch.randn(b, hkv, p, d, dtype=dtype, requires_grad=prefix_grad)
    return q, k, v, pk, pv


# (layout, S, P, segment_lengths, (Hq, Hkv), prefix requires grad, scale)
EDGE_CASES = [
    pytest.param(MemoryLayout(0, 0, "causal"), 1, 0, None, (2, 2), True, None, id="S1-M0-causal"),
    pytest.param(MemoryLayout(16, 16, "full", "all"), 1, 1, None, (2, 2), True, None, id="S1-M16-both-full-P1-all"),
    pytest.param(MemoryLayout(5, 5, "causal", "segment"), 1, 37, [0, 1], (2, 2), True, None,
                 id="S1-M5-both-causal-P37-seg-padded"),
    pytest.param(MemoryLayout(0, 1, MB), 1, 0, [0, 1], (2, 2), True, None, id="S1-M1-write-only-mb-empty-rows"),
    pytest.param(MemoryLayout(5, 5, MB, "segment"), 17, 37, None, (2, 2), True, 0.3, id="S17-M5-both-mb-P37-seg-scale"),
    pytest.param(MemoryLayout(5, 0, "causal", "all"), 17, 1, None, (2, 2), True, None,
                 id="S17-M5-read-only-causal-P1-all"),
    pytest.param(MemoryLayout(0, 5, "full"), 17, 0, None, (2, 2), True, None, id="S17-M5-write-only-full"),
    pytest.param(MemoryLayout(16, 16, "causal", "all"), 17, 37, [17, 0], (2, 2), False, None,
                 id="S17-M16-causal-P37-all-detached-prefix-padded"),
    pytest.param(MemoryLayout(0, 0, MB, "segment"), 17, 1, [0, 0], (2, 1), True, None,
                 id="S17-M0-mb-P1-all-rows-padded"),
    pytest.param(MemoryLayout(0, 0, "full"), 17, 0, [0, 5], (2, 2), True, None, id="S17-M0-full-empty-rows"),
    pytest.param(MemoryLayout(5, 5, "causal"), 17, 0, [17, 17, 0, 0, 9], (2, 2), True, None,
                 id="S17-M5-causal-batch-runs"),
    pytest.param(MemoryLayout(16, 16, "causal", "segment"), 63, 37, None, (4, 1), True, None,
                 id="S63-M16-both-causal-P37-seg-gqa4:1"),
    pytest.param(MemoryLayout(5, 5, MB, "segment"), 63, 37, [63, 20], (2, 2), False, None,
                 id="S63-M5-mb-P37-seg-detached-prefix"),
    pytest.param(MemoryLayout(0, 0, MB), 63, 0, [0, 63], (2, 2), True, None, id="S63-M0-mb-empty-rows"),
    pytest.param(MemoryLayout(16, 16, "full", "all"), 63, 37, [1, 63], (4, 2), True, None,
                 id="S63-M16-full-P37-all-gqa4:2-padded"),
    pytest.param(MemoryLayout(16, 0, MB, "all"), 64, 1, None, (4, 2), True, None,
                 id="S64-M16-read-only-mb-P1-all-gqa4:2"),
    pytest.param(MemoryLayout(0, 1, "causal"), 64, 0, [64, 31], (2, 2), True, None,
                 id="S64-M1-write-only-causal-padded"),
    pytest.param(MemoryLayout(0, 16, "full", "segment"), 65, 37, None, (2, 2), True, None,
                 id="S65-M16-write-only-full-P37-seg"),
    pytest.param(MemoryLayout(5, 5, MB, "segment"), 65, 0, [65, 40, 0, 1], (2, 2), True, None,
                 id="S65-M5-both-mb-mixed-lengths"),
    pytest.param(MemoryLayout(5, 5, MB, "all"), 65, 1, [0, 0], (4, 1), True, None,
                 id="S65-M5-both-mb-P1-all-gqa4:1-all-padded"),
    pytest.param(MemoryLayout(1, 1, MB), 127, 0, None, (4, 1), True, 2.0, id="S127-M1-both-mb-gqa4:1-scale"),
    pytest.param(MemoryLayout(0, 0, "causal", "all"), 127, 37, [127, 50], (2, 2), True, None,
                 id="S127-M0-causal-P37-all-padded"),
    pytest.param(MemoryLayout(16, 0, "full"), 127, 0, [0, 127], (4, 2), True, None,
                 id="S127-M16-read-only-full-gqa4:2-padded"),
    pytest.param(MemoryLayout(1, 0, MB, "segment"), 127, 1, [126, 127], (2, 2), True, None,
                 id="S127-M1-read-only-mb-P1-seg-short"),
    pytest.param(MemoryLayout(16, 16, MB, "segment"), 1000, 37, [1000, 613], (2, 2), True, None,
                 id="S1000-M16-both-mb-P37-seg-padded"),
    pytest.param(MemoryLayout(0, 0, "causal"), 1000, 0, None, (4, 1), True, None, id="S1000-M0-causal-gqa4:1"),
]


DTYPE_LAYOUTS = [
    pytest.param(MemoryLayout(5, 5, MB, "segment"), 63, 37, [63, 0], (4, 2), id="mb-M5-S63-P37-seg-padded-gqa"),
    pytest.param(MemoryLayout(0, 16, "causal"), 65, 0, [65, 17], (2, 2), id="causal-write-only-S65-padded"),
    pytest.param(MemoryLayout(16, 0, "full", "all"), 17, 1, None, (2, 1), id="full-read-only-S17-P1-all"),
]


def strided_lowp(kind, b, heads, n, d, p, dtype, device):
    """Inputs in ``dtype`` on ``device`` with the strides callers pass, each requiring grad through a
    view, and an upstream gradient: ``(q, k, v, prefix_k, prefix_v, dout)``."""
    hq, hkv = heads

    def rnd(*shape):
        return torch.randn(*shape).to(device, dtype).requires_grad_()

    def plain(*shape):
        return torch.randn(*shape).to(device, dtype)

    if kind == "transposed":  # [B, N, H, D] projections read as [B, H, N, D]: no copy
        return (rnd(b, n, hq, d).transpose(1, 2), rnd(b, n, hkv, d).transpose(1, 2), rnd(b, n, hkv, d).transpose(1, 2),
                rnd(b, p, hkv, d).transpose(1, 2), rnd(b, p, hkv, d).transpose(1, 2), plain(b, n, hq, d).transpose(1, 2))
    if kind == "sliced":  # cut out of larger buffers, head dim with stride 2 (the launcher copies)
        return (rnd(b + 1, hq + 2, n + 5, 2 * d + 3)[1:, 1 : hq + 1, 3 : n + 3, 1 : 2 * d + 1 : 2],
                rnd(b + 2, hkv + 1, n + 2, d + 8)[2:, 1:, 2:, 8:],
                rnd(b, n, 3 * hkv, d)[:, :, ::3].transpose(1, 2),
                rnd(b, hkv, p + 9, d)[:, :, 9:], rnd(b, hkv, 2 * p, d)[:, :, ::2],
                plain(b, hq, n, 2 * d)[..., ::2])
    assert kind == "expanded"  # shared keys and a learned null prefix broadcast over the batch
    return (rnd(b, hq, n, d), rnd(1, hkv, n, d).expand(b, hkv, n, d), rnd(b, hkv, n, d),
            rnd(hkv, p, d).expand(b, hkv, p, d), rnd(hkv, p, d).expand(b, hkv, p, d),
            plain(1, hq, n, d).expand(b, hq, n, d))


# --------------------------------------------------------------------------- memory handoff


def leaf(t: torch.Tensor) -> torch.Tensor:
    """A leaf requiring grad with ``t``'s strides (sliced inputs stay non-contiguous)."""
    return t.detach().requires_grad_()


def make_memory(kind: str, batch: int, rows: int, dim: int, dtype, device, sliced: bool):
    """kind: "bcast" ([rows, d]), "batched" ([B, rows, d]), "none"."""
    if kind == "none":
        return None
    if kind == "bcast":
        base = torch.randn(rows + 3, dim + 5, dtype=torch.float64, device=device)
        t = base[1 : rows + 1, 2 : dim + 2] if sliced else base[:rows, :dim].contiguous()
    else:
        base = torch.randn(batch, rows + 2, dim + 4, dtype=torch.float64, device=device)
        t = base[:, 1 : rows + 1, 3 : dim + 3] if sliced else base[:, :rows, :dim].contiguous()
    return leaf(t.to(dtype))


def make_segment(batch, seg_len, dim, dtype, device, sliced: bool):
    if sliced:  # [B, S, d] read out of a [S+, B, d+] buffer: every stride differs from the packed one
        base = torch.randn(seg_len + 4, batch, dim + 6, dtype=torch.float64, device=device)
        t = base[2 : seg_len + 2, :, 1 : dim + 1].transpose(0, 1)
    else:
        t = torch.randn(batch, seg_len, dim, dtype=torch.float64, device=device)
    return leaf(t.to(dtype))


def cat_ref(seg_rows, read, write, batch):
    """``reference.pack_segment_ref`` with the layout read off the memories given."""
    assert seg_rows.shape[0] == batch
    layout = MemoryLayout(0 if read is None else read.shape[-2], 0 if write is None else write.shape[-2])
    return pack_segment_ref(seg_rows, layout, read, write)


def up(t):
    return None if t is None else leaf(t.detach().to(torch.float64))


# (B, S, d, R, W, read kind, write kind ("tied": the read tensor object), dtype, sliced inputs)
PACK_CASES = [
    pytest.param(2, 17, 48, 5, 5, "bcast", "tied", torch.float32, False, id="official-bcast-tied"),
    pytest.param(3, 1, 32, 1, 1, "batched", "tied", torch.float32, True, id="S1-batched-tied-sliced"),
    pytest.param(2, 63, 40, 4, 0, "batched", "none", torch.bfloat16, False, id="read-only-bf16"),
    pytest.param(2, 64, 24, 0, 3, "none", "bcast", torch.float16, True, id="write-only-bcast-fp16-sliced"),
    pytest.param(2, 65, 100, 2, 3, "bcast", "batched", torch.float32, True, id="separate-d100-sliced"),
    pytest.param(1, 9, 16, 0, 0, "none", "none", torch.float32, False, id="no-memory"),
    pytest.param(2, 0, 16, 2, 2, "batched", "tied", torch.float32, False, id="S0"),
    pytest.param(4, 33, 64, 16, 16, "bcast", "bcast", torch.bfloat16, True, id="M16-two-bcast-bf16"),
]


def run_pack_case(device, backend, batch, seg_len, dim, num_read, num_write, read_kind, write_kind, dtype, sliced):
    layout = MemoryLayout(num_read, num_write, mask="causal")
    seg = make_segment(batch, seg_len, dim, dtype, device, sliced)
    read = make_memory(read_kind, batch, num_read, dim, dtype, device, sliced)
    write = read if write_kind == "tied" else make_memory(write_kind, batch, num_write, dim, dtype, device, sliced)

    packed = pack_segment(seg, layout, read, write, backend=backend)
    expected = cat_ref(seg, read, write, batch)
    assert packed.shape == (batch, num_read + seg_len + num_write, dim)
    assert torch.equal(packed, expected), "pack is a copy: it must be exact"

    grad = torch.randn(packed.shape, dtype=torch.float64, device=device).to(dtype)
    inputs = [t for t in (seg, read, write) if t is not None]
    inputs = list(dict.fromkeys(inputs))  # the tied tensor once
    got = torch.autograd.grad(packed, inputs, grad)
    baseline = torch.autograd.grad(expected, inputs, grad)
    ups = {id(t): up(t) for t in inputs}
    ref64 = cat_ref(ups[id(seg)], ups.get(id(read)), ups.get(id(write)), batch)
    reference = torch.autograd.grad(ref64, [ups[id(t)] for t in inputs], grad.to(torch.float64))
    for k, (g, b, rf) in enumerate(zip(got, baseline, reference)):
        assert g.shape == inputs[k].shape and g.dtype == dtype
        if g.numel():  # (assert_close cannot take an empty baseline)
            assert_close(g, rf, b, name=f"grad[{k}]")


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
        expected = cat_ref(F.embedding(ids, weight), read, write, batch)
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
    ref = cat_ref(F.embedding(ids, up_w), up_m if num_read else None, up_m if num_write else None, batch)
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
    assert torch.equal(out, cat_ref(seg, mem, mem, 2))
    assert torch.isnan(big[:, :2]).all() and torch.isnan(big[:, 15:]).all() and torch.isnan(big[:, :, :4]).all()
    weight, ids = torch.randn(9, 16, device=device), torch.randint(0, 9, (2, 7), device=device)
    out2 = torch.empty(2, 13, 16, device=device)
    assert pack_segment_from_ids(ids, weight, layout, mem, mem, out=out2, backend="cuda") is out2
    assert torch.equal(out2, cat_ref(F.embedding(ids, weight), mem, mem, 2))


# --------------------------------------------------------------------------- benchmarks


def check_bench_row(row):
    """A ``rmt-kernels bench`` result row: every schema field, a known status, stats only when ok."""
    assert tuple(row) == records.ROW_FIELDS
    assert row["status"] in records.STATUSES
    if row["status"] == "ok":
        assert row["reason"] is None
        assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert row["reps"] >= 1
    else:
        assert isinstance(row["reason"], str) and row["reason"]
        assert row["median_ms"] is None
