"""The triton backend against the reference, forward and backward, and its tile schedule.

On CPU the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, set by ``conftest.py``
before anything imports triton); with a CUDA torch and a GPU the same tests run compiled. Shapes stay
small for the interpreter; the ``cuda`` tests add bfloat16, long segments and big head dims.

Every comparison follows ``tests/helpers.py``: error against the float64 reference at most twice the
error of the same-dtype eager reference plus a floor, for the output, the log-sum-exp and every
gradient under random upstream gradients. Output and gradient buffers start as NaN, so an element that
no program writes cannot pass by luck.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from rmt_kernels import MemoryLayout, backends, segment_attention  # noqa: E402
from rmt_kernels.layout import TILE_FULL, TILE_PARTIAL  # noqa: E402
from rmt_kernels.ops.segment_attention import interface, triton_launch  # noqa: E402
from rmt_kernels.ops.segment_attention.triton_common import _round_bf16  # noqa: E402

from helpers import check_against_reference as _check_against_reference  # noqa: E402
from helpers import device_inputs  # noqa: E402

MB = "memory_bidirectional"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# The torch suite's check (output, log-sum-exp from the custom op, every gradient, all through the
# tolerance helper), run on the triton backend.
check_against_reference = functools.partial(_check_against_reference, backend="triton")


# --------------------------------------------------------------------------------------- edge cases

# (layout, S, P, segment_lengths, (Hq, Hkv), head dim, prefix requires grad, scale)
EDGE_CASES = [
    pytest.param(MemoryLayout(0, 0, "causal"), 1, 0, None, (2, 2), 16, True, None, id="S1-M0-causal"),
    pytest.param(MemoryLayout(16, 16, "full", "all"), 1, 1, None, (2, 1), 16, True, None,
                 id="S1-M16-full-P1-all-gqa"),
    pytest.param(MemoryLayout(5, 5, "causal"), 1, 37, [0, 1], (2, 2), 16, True, None,
                 id="S1-M5-causal-P37-seg-fully-padded"),
    pytest.param(MemoryLayout(0, 1, MB), 1, 0, [0, 1], (2, 2), 16, True, None, id="S1-M1-write-only-mb-empty-rows"),
    pytest.param(MemoryLayout(5, 5, MB), 17, 37, None, (2, 2), 16, True, 0.3, id="S17-M5-mb-P37-seg-scale"),
    pytest.param(MemoryLayout(5, 0, "causal", "all"), 17, 1, None, (2, 2), 32, True, None,
                 id="S17-M5-read-only-causal-P1-all-D32"),
    pytest.param(MemoryLayout(0, 5, "full"), 17, 0, None, (2, 2), 16, True, None, id="S17-M5-write-only-full"),
    pytest.param(MemoryLayout(16, 16, "causal", "all"), 17, 37, [17, 0], (2, 2), 16, False, None,
                 id="S17-M16-causal-P37-all-detached-padded"),
    pytest.param(MemoryLayout(0, 0, MB), 17, 1, [0, 0], (2, 1), 16, True, None, id="S17-M0-mb-P1-all-rows-padded"),
    pytest.param(MemoryLayout(0, 0, "full"), 17, 0, [0, 5], (2, 2), 16, True, None, id="S17-M0-full-empty-rows"),
    pytest.param(MemoryLayout(4, 4, MB), 0, 5, None, (2, 2), 16, True, None, id="S0-M4-mb-P5-seg-nobody-sees-prefix"),
    pytest.param(MemoryLayout(16, 16, "causal"), 63, 37, None, (4, 1), 16, True, None,
                 id="S63-M16-causal-P37-seg-gqa4:1"),
    pytest.param(MemoryLayout(5, 5, MB), 63, 37, [63, 20], (2, 2), 16, False, None,
                 id="S63-M5-mb-P37-seg-detached-padded"),
    pytest.param(MemoryLayout(0, 0, MB), 63, 0, [0, 63], (2, 2), 64, True, None, id="S63-M0-mb-empty-rows-D64"),
    pytest.param(MemoryLayout(16, 16, "full", "all"), 63, 37, [1, 63], (4, 2), 16, True, None,
                 id="S63-M16-full-P37-all-gqa4:2-padded"),
    pytest.param(MemoryLayout(16, 0, MB, "all"), 64, 1, None, (2, 1), 16, True, None,
                 id="S64-M16-read-only-mb-P1-all-gqa"),
    pytest.param(MemoryLayout(0, 1, "causal"), 64, 0, [64, 31], (2, 2), 16, True, None,
                 id="S64-M1-write-only-causal-padded"),
    pytest.param(MemoryLayout(0, 16, "full"), 65, 37, None, (2, 2), 16, True, None, id="S65-M16-write-only-full-P37"),
    pytest.param(MemoryLayout(5, 5, MB), 65, 0, [65, 40, 0, 1], (2, 2), 16, True, None,
                 id="S65-M5-mb-mixed-lengths"),
    pytest.param(MemoryLayout(5, 5, MB, "all"), 65, 1, [0, 0], (4, 1), 16, True, None,
                 id="S65-M5-mb-P1-all-gqa4:1-all-padded"),
    pytest.param(MemoryLayout(1, 1, MB), 127, 0, None, (2, 1), 16, True, 2.0, id="S127-M1-mb-gqa-scale"),
    pytest.param(MemoryLayout(0, 0, "causal", "all"), 127, 37, [127, 50], (2, 2), 16, True, None,
                 id="S127-M0-causal-P37-all-padded"),
    pytest.param(MemoryLayout(16, 0, "full"), 127, 0, [0, 127], (2, 2), 16, True, None,
                 id="S127-M16-read-only-full-padded"),
    pytest.param(MemoryLayout(1, 0, MB), 127, 1, [126, 127], (2, 2), 16, True, None,
                 id="S127-M1-read-only-mb-P1-seg-short"),
    pytest.param(MemoryLayout(16, 16, MB), 40, 3, [40, 9], (2, 1), 96, True, None, id="S40-M16-mb-P3-D96-padded-dim"),
    pytest.param(MemoryLayout(3, 3, "causal"), 20, 0, [20, 7], (1, 1), 128, True, None, id="S20-M3-causal-D128"),
    pytest.param(MemoryLayout(2, 2, MB, "all"), 12, 2, None, (1, 1), 256, True, None, id="S12-M2-mb-P2-all-D256"),
]


@pytest.mark.parametrize("layout, s, p, lengths, heads, d, prefix_grad, scale", EDGE_CASES)
def test_triton_matches_reference(device, poisoned, layout, s, p, lengths, heads, d, prefix_grad, scale):
    b = 2 if lengths is None else len(lengths)
    q, k, v, pk, pv = device_inputs(device, b, heads, layout.seq_len(s), d, p, prefix_grad=prefix_grad)
    sl = None if lengths is None else torch.tensor(lengths, device=device)
    check_against_reference(layout, q, k, v, pk, pv, sl, scale)


DTYPE_CASES = [
    pytest.param(MemoryLayout(5, 5, MB), 63, 37, [63, 0], (2, 1), torch.float16, id="fp16-mb-P37-seg-padded-gqa"),
    pytest.param(MemoryLayout(0, 16, "causal"), 65, 0, [65, 17], (2, 2), torch.float16, id="fp16-causal-write-only"),
    pytest.param(MemoryLayout(16, 0, "full", "all"), 17, 1, None, (2, 1), torch.float16, id="fp16-full-P1-all"),
    # tl.dot on bfloat16 is wrong in the interpreter: the launcher has it multiply in float32 there.
    pytest.param(MemoryLayout(4, 4, MB), 29, 3, [29, 10], (2, 1), torch.bfloat16, id="bf16-mb-P3-padded"),
]


@pytest.mark.parametrize("layout, s, p, lengths, heads, dtype", DTYPE_CASES)
def test_triton_dtypes(device, poisoned, layout, s, p, lengths, heads, dtype):
    b = 2 if lengths is None else len(lengths)
    q, k, v, pk, pv = device_inputs(device, b, heads, layout.seq_len(s), 32, p, dtype=dtype)
    sl = None if lengths is None else torch.tensor(lengths, dtype=torch.int32, device=device)
    check_against_reference(layout, q, k, v, pk, pv, sl)


@triton.jit
def _round_bf16_kernel(X, Y, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(Y + offs, _round_bf16(tl.load(X + offs)))


def _run_bf16(device, monkeypatch=None):
    """Forward and backward of the triton launchers on bfloat16 inputs, and on the same values in
    float32: ``{dtype: [out, dq, dk, dv, dprefix_k, dprefix_v]}``. With ``monkeypatch``, the launchers'
    outputs and gradients are float32 buffers whatever the inputs (the kernels then store their float32
    results unrounded)."""
    if monkeypatch is not None:
        def as_fp32(t):
            return None if t is None else torch.empty_strided(t.shape, t.stride(), dtype=torch.float32, device=t.device)

        alloc_outputs, bwd_buffers = triton_launch.alloc_outputs, triton_launch._bwd_buffers
        def fp32_outputs(q):
            out, lse = alloc_outputs(q)
            return as_fp32(out), lse

        monkeypatch.setattr(triton_launch, "alloc_outputs", fp32_outputs)
        monkeypatch.setattr(triton_launch, "_bwd_buffers", lambda *a: tuple(as_fp32(t) for t in bwd_buffers(*a)))
    layout = MemoryLayout(4, 4, MB)
    torch.manual_seed(0)  # the same inputs on every call
    q, k, v, pk, pv = (t.detach().to(torch.bfloat16) for t in device_inputs(device, 2, (2, 1), 48, 32, 5))
    sl = torch.tensor([40, 23], device=device)
    dout = torch.randn(q.shape, device=device).to(torch.bfloat16)
    results = {}
    for dtype in (torch.bfloat16, torch.float32):
        args = [t.to(dtype) for t in (q, k, v, pk, pv)]
        out, lse = triton_launch.segment_attention_fwd_triton(*args, sl, layout, 0.25)
        grads = triton_launch.segment_attention_bwd_triton(dout.to(dtype), *args, sl, out.to(dtype), lse, layout,
                                                           0.25, True)
        results[dtype] = [out, *grads]
    return results


GRAD_NAMES = ("out", "dq", "dk", "dv", "dprefix_k", "dprefix_v")


def test_bf16_products_round_p_and_ds(device, monkeypatch):
    """P and dS are rounded to bfloat16 before their products with bfloat16 tiles (as a GPU's cast does),
    also under the interpreter, which multiplies bfloat16 in float32: the unrounded float32 results of
    bfloat16 inputs differ from those of the same values in float32 (they would be equal if the rounding
    were skipped)."""
    results = _run_bf16(device, monkeypatch)
    for name, a, b in zip(GRAD_NAMES, *results.values()):
        assert a.dtype == torch.float32
        assert (a != b).float().mean() > 0.5, f"{name}: bfloat16 products are not rounded"


def test_bf16_stores_round_to_nearest_even(device, monkeypatch):
    """The kernels' bfloat16 outputs and gradients are their float32 results rounded to nearest even, as
    on a GPU (the interpreter's own cast truncates)."""
    rounded = _run_bf16(device)[torch.bfloat16]
    unrounded = _run_bf16(device, monkeypatch)[torch.bfloat16]
    for name, a, b in zip(GRAD_NAMES, rounded, unrounded):
        assert a.dtype == torch.bfloat16 and b.dtype == torch.float32
        assert torch.equal(a, b.to(torch.bfloat16)), name


def test_round_bf16_rounds_to_nearest_even(device):
    """``triton_common._round_bf16`` equals torch's float32 -> bfloat16 cast bit for bit (ties included)."""
    ties = (torch.arange(256, dtype=torch.int32) << 16 | 0x8000).view(torch.float32)  # halfway cases
    x = torch.cat([torch.randn(768) * 100, ties]).to(device)
    y = torch.empty_like(x)
    _round_bf16_kernel[(1,)](x, y, BLOCK=1024)
    assert torch.equal(y, x.to(torch.bfloat16).to(torch.float32))


# --------------------------------------------------------------------------------------- strides


def strided_inputs(device, kind, b, heads, n, d, p):
    """Inputs with the strides callers pass; each requires grad as a non-leaf view."""
    hq, hkv = heads

    def rnd(*shape, grad=True):
        return torch.randn(*shape, device=device, requires_grad=grad)

    if kind == "transposed":  # projections are [B, N, H, D]; attention reads them as [B, H, N, D]
        q, k, v = (rnd(b, n, h, d).transpose(1, 2) for h in (hq, hkv, hkv))
        pk, pv = (rnd(b, p, hkv, d).transpose(1, 2) for _ in range(2))
        dout = rnd(b, n, hq, d, grad=False).transpose(1, 2)
    elif kind == "sliced":  # cut out of larger buffers in every dim; head dim with stride 2
        q = rnd(b + 1, hq + 2, n + 5, 2 * d + 3)[1:, 1 : hq + 1, 3 : n + 3, 1 : 2 * d + 1 : 2]
        k = rnd(b + 2, hkv + 1, n + 2, d + 4)[2:, 1:, 2:, 4:]
        v = rnd(b, n, 3 * hkv, d)[:, :, ::3].transpose(1, 2)
        pk = rnd(b, hkv, p + 9, d)[:, :, 9:]
        pv = rnd(b, hkv, 2 * p, d)[:, :, ::2]
        dout = rnd(b, hq, n, 2 * d, grad=False)[..., ::2]
    elif kind == "expanded":  # a learned null key/value broadcast over the batch (stride 0)
        q, v = rnd(b, hq, n, d), rnd(b, hkv, n, d)
        k = rnd(1, hkv, n, d).expand(b, hkv, n, d)
        pk, pv = (rnd(hkv, p, d).expand(b, hkv, p, d) for _ in range(2))
        dout = rnd(1, hq, n, d, grad=False).expand(b, hq, n, d)
    else:
        raise AssertionError(kind)
    return q, k, v, pk, pv, dout


@pytest.mark.parametrize(
    "kind, layout, s, p, lengths",
    [
        pytest.param("transposed", MemoryLayout(5, 5, MB), 37, 3, [37, 0], id="transposed-mb-P3-seg-padded"),
        pytest.param("sliced", MemoryLayout(0, 5, "causal", "all"), 37, 1, [20, 37], id="sliced-causal-P1-all"),
        pytest.param("expanded", MemoryLayout(5, 0, "full"), 37, 3, None, id="expanded-full-P3-seg"),
    ],
)
def test_triton_strided_inputs(device, poisoned, kind, layout, s, p, lengths):
    q, k, v, pk, pv, dout = strided_inputs(device, kind, 2, (4, 2), layout.seq_len(s), 16, p)
    sl = None if lengths is None else torch.tensor(lengths, device=device)
    if kind != "expanded":
        assert not q.is_contiguous() and not k.is_contiguous()
    check_against_reference(layout, q, k, v, pk, pv, sl, dout=dout)


def test_triton_empty_inputs(device):
    layout = MemoryLayout(0, 0, MB)
    q, k, v, _, _ = device_inputs(device, 2, (2, 1), 0, 16, 0)
    out = segment_attention(q, k, v, layout, backend="triton")
    assert out.shape == (2, 2, 0, 16)
    dq, dk = torch.autograd.grad(out, (q, k), torch.randn_like(out))
    assert dq.shape == q.shape and dk.shape == k.shape


# --------------------------------------------------------------------------------------- tile schedule


def expected_codes(classes, rows, keys, block_m, block_n):
    """Trace codes the kernels must write for :meth:`MemoryLayout.classify_tiles` classes: 2 (unmasked)
    for a full tile, 1 (masked) for a partial tile or a full one that holds a bounds tail (the kernels
    mask the bounds of the last tile of a range), 0 for an empty tile (never loaded)."""
    codes = torch.zeros(classes.shape, dtype=torch.int32)
    tail = torch.zeros(classes.shape[-2:], dtype=torch.bool)
    if keys % block_n:
        tail[:, -1] = True
    if rows is not None and rows % block_m:
        tail[-1, :] = True
    codes[classes == TILE_PARTIAL] = 1
    codes[(classes == TILE_FULL) & tail] = 1
    codes[(classes == TILE_FULL) & ~tail] = 2
    return codes


TRACE_CASES = [
    pytest.param(MemoryLayout(3, 5, "causal"), 40, 0, None, id="causal-R3-W5"),
    pytest.param(MemoryLayout(0, 4, MB), 37, 7, [37, 0], id="mb-write-only-P7-seg-fully-padded"),
    pytest.param(MemoryLayout(5, 0, "full", "all"), 30, 19, [3, 30], id="full-read-only-P19-all"),
    pytest.param(MemoryLayout(16, 16, MB), 64, 16, [10, 64], id="mb-M16-P16-seg-padded"),
    pytest.param(MemoryLayout(32, 32, "causal", "all"), 32, 33, [0, 17], id="causal-M32-P33-all-gap-aligned"),
    pytest.param(MemoryLayout(20, 3, MB), 0, 5, None, id="mb-S0-P5-seg"),
    pytest.param(MemoryLayout(17, 17, "full"), 30, 0, [13, 2], id="full-M17-padded"),
]
BLOCKS = [pytest.param(16, 16, id="16x16"), pytest.param(32, 16, id="32x16"), pytest.param(16, 32, id="16x32")]


@pytest.mark.parametrize("block_m, block_n", BLOCKS)
@pytest.mark.parametrize("layout, s, p, lengths", TRACE_CASES)
def test_tile_schedule_matches_classify_tiles(device, layout, s, p, lengths, block_m, block_n):
    """The kernels load exactly the tiles with a visible pair, take the unmasked path on exactly the
    full ones, and the backward's dK/dV kernels visit the transpose of the forward's set."""
    n = layout.seq_len(s)
    b = 2 if lengths is None else len(lengths)
    q, k, v, pk, pv = device_inputs(device, b, (2, 1), n, 16, p)
    q, k, v = q.detach(), k.detach(), v.detach()
    pk, pv = (None, None) if not p else (pk.detach(), pv.detach())
    sl = None if lengths is None else torch.tensor(lengths, device=device)
    blocks = {"BLOCK_M": block_m, "BLOCK_N": block_n}
    out, lse, fwd_trace = triton_launch.segment_attention_fwd_triton(
        q, k, v, pk, pv, sl, layout, 0.25, config=blocks, trace=True)
    *grads, traces = triton_launch.segment_attention_bwd_triton(
        torch.randn_like(out), q, k, v, pk, pv, sl, out, lse, layout, 0.25, True,
        config={"dq": blocks, "dkdv": blocks}, trace=True)

    tiles = layout.classify_tiles(s, block_m, block_n, p, lengths)
    per_query_block = torch.cat(
        [expected_codes(tiles.prefix, None, p, block_m, block_n),
         expected_codes(tiles.packed, None, n, block_m, block_n)],
        dim=-1,
    )
    for name, got in (("forward", fwd_trace), ("dq", traces["dq"])):
        expected = per_query_block.expand(b, *per_query_block.shape[1:])
        assert torch.equal(got.cpu(), expected[:, None].expand_as(got)), f"{name} tile schedule\n{got}\n{expected}"
    expected = expected_codes(tiles.packed, n, n, block_m, block_n).transpose(1, 2)
    got = traces["dkdv"].cpu()
    assert torch.equal(got, expected.expand(b, *expected.shape[1:])[:, None].expand_as(got)), "dK/dV tile schedule"
    if p:
        expected = expected_codes(tiles.prefix, n, p, block_m, block_n).transpose(1, 2)
        got = traces["dkdv_prefix"].cpu()
        assert torch.equal(got, expected.expand(b, *expected.shape[1:])[:, None].expand_as(got)), "prefix dK/dV"
    # The launcher's summary counts what the kernel did (one head); a causal schedule skips tiles.
    counts = triton_launch.tile_counts(layout, s, block_m, block_n, p, lengths)
    if lengths is None:
        counts = {key: value * b for key, value in counts.items()}
    head = fwd_trace[:, 0].cpu()
    assert counts == {"visited": int((head > 0).sum()), "unmasked": int((head == 2).sum()), "dense": head.numel()}
    if layout.mask == "causal" and n > block_n:
        assert counts["visited"] < counts["dense"]


# --------------------------------------------------------------------------------------- determinism


def test_backward_is_deterministic(device):
    layout = MemoryLayout(5, 5, MB)
    q, k, v, pk, pv = device_inputs(device, 2, (4, 1), layout.seq_len(40), 16, 3)
    sl = torch.tensor([40, 11], device=device)
    dout = torch.randn(q.shape, device=device)
    runs = []
    with torch.no_grad():
        for _ in range(2):
            out, lse = triton_launch.segment_attention_fwd_triton(q, k, v, pk, pv, sl, layout, 0.25)
            runs.append((out, *triton_launch.segment_attention_bwd_triton(  # the atomics-free path
                dout, q, k, v, pk, pv, sl, out, lse, layout, 0.25, True, dq_atomic=False)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "d, dtype, error, match",
    [
        pytest.param(48, torch.float32, ValueError, "head dim D=48", id="D48"),
        pytest.param(512, torch.float16, ValueError, "head dim D=512", id="D512"),
        pytest.param(8, torch.float32, ValueError, "head dim D=8", id="D8"),
        pytest.param(64, torch.float64, TypeError, "float64", id="float64"),
    ],
)
def test_unsupported_inputs_raise(device, d, dtype, error, match):
    layout = MemoryLayout(2, 2, MB)
    q = torch.randn(1, 2, 9, d, dtype=dtype, device=device)
    with pytest.raises(error, match=match):
        segment_attention(q, q, q, layout, backend="triton")
    with pytest.raises(error, match=match):  # the launcher checks on its own, too
        triton_launch.segment_attention_fwd_triton(q, q, q, None, None, None, layout, 0.1)


def test_mismatched_prefix_dtype_raises_in_launcher(device):
    q = torch.randn(1, 2, 9, 16, device=device)
    pk = torch.randn(1, 2, 3, 16, device=device, dtype=torch.float16)
    with pytest.raises(TypeError, match="prefix_k has dtype"):
        triton_launch.segment_attention_fwd_triton(q, q, q, pk, pk, None, MemoryLayout(2, 2), 0.1)


def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 2, 9, 16)
    with pytest.raises(backends.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        segment_attention(q, q, q, MemoryLayout(2, 2), backend="triton")
    with pytest.raises(backends.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        triton_launch.segment_attention_fwd_triton(q, q, q, None, None, None, MemoryLayout(2, 2), 0.1)


def test_registration_is_lazy_and_complete():
    impl = backends.get_impl(interface.OP, "triton")
    assert set(impl.dtypes) == {torch.float16, torch.bfloat16, torch.float32}
    assert impl.head_dims == (16, 32, 64, 96, 128, 256)
    code = (
        "import sys, rmt_kernels\n"
        "from rmt_kernels import backends\n"
        "backends.get_impl('segment_attention', 'triton')\n"
        "assert 'triton' not in sys.modules, 'importing rmt_kernels imported triton'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_opcheck_with_triton_backend(device):
    layout = MemoryLayout(3, 2, MB)
    q, k, v, pk, pv = device_inputs(device, 2, (2, 1), layout.seq_len(9), 16, 4)
    sl = torch.tensor([9, 2], device=device)
    params = (layout.num_read, layout.num_write, layout.mask, layout.prefix_visible_to, 0.25, "triton")
    torch.library.opcheck(interface.segment_attention_fwd_op, (q, k, v, pk, pv, sl, *params))
    with torch.no_grad():
        out, lse = interface.segment_attention_fwd_op(q, k, v, pk, pv, sl, *params)
    torch.library.opcheck(
        interface.segment_attention_bwd_op,
        (torch.randn_like(out), q.detach(), k.detach(), v.detach(), pk.detach(), pv.detach(), sl, out, lse,
         *params, True),
    )


# --------------------------------------------------------------------------------------- GPU


GPU_CASES = [
    pytest.param(MemoryLayout(16, 16, MB), 8160, 0, [8160, 5000], (2, 1), 64, torch.bfloat16,
                 id="mb-8k-D64-bf16-padded-gqa"),
    pytest.param(MemoryLayout(0, 0, "causal"), 8192, 0, None, (2, 2), 128, torch.bfloat16, id="causal-8k-D128-bf16"),
    pytest.param(MemoryLayout(10, 0, "full"), 2038, 37, [2038, 0], (2, 1), 256, torch.bfloat16,
                 id="full-2k-D256-bf16-P37"),
    pytest.param(MemoryLayout(128, 128, MB, "all"), 1024, 1, [1024, 700], (4, 1), 128, torch.float16,
                 id="mb-1k-M128-D128-fp16-null-key"),
    pytest.param(MemoryLayout(32, 32, "causal"), 960, 1024, [960, 960], (4, 2), 64, torch.bfloat16,
                 id="causal-1k-P1024-seg-D64-bf16"),
    pytest.param(MemoryLayout(16, 16, MB), 1000, 37, [1000, 613], (2, 1), 96, torch.bfloat16, id="mb-1k-D96-bf16"),
    pytest.param(MemoryLayout(16, 16, MB), 1000, 37, [1000, 613], (2, 1), 64, torch.float32, id="mb-1k-D64-fp32"),
]


@pytest.mark.cuda
@pytest.mark.parametrize("layout, s, p, lengths, heads, d, dtype", GPU_CASES)
def test_triton_gpu_long_segments(poisoned, layout, s, p, lengths, heads, d, dtype):
    device = torch.device("cuda")
    b = 2 if lengths is None else len(lengths)
    q, k, v, pk, pv = device_inputs(device, b, heads, layout.seq_len(s), d, p, dtype=dtype)
    sl = None if lengths is None else torch.tensor(lengths, device=device)
    check_against_reference(layout, q, k, v, pk, pv, sl)


@pytest.mark.cuda
@pytest.mark.parametrize("d", [pytest.param(64, id="D64"), pytest.param(128, id="D128"), pytest.param(256, id="D256")])
def test_triton_gpu_deterministic(d):
    device = torch.device("cuda")
    layout = MemoryLayout(16, 16, MB)
    q, k, v, pk, pv = device_inputs(device, 2, (8, 2), layout.seq_len(2000), d, 37, dtype=torch.bfloat16)
    sl = torch.tensor([2000, 1234], device=device)
    dout = torch.randn(q.shape, device=device, dtype=q.dtype)
    runs = []
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            out = segment_attention(q, k, v, layout, segment_lengths=sl, prefix_k=pk, prefix_v=pv, backend="triton")
            runs.append((out, *torch.autograd.grad(out, (q, k, v, pk, pv), dout)))
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
