"""``segment_attention(..., backend="cuda")`` (the extension ``rmt_kernels._C``) against the reference on
a GPU: the torch backend's edge cases (SPEC section 4) at the CUDA head dims, both dtypes, strided
inputs, ``torch.compile`` and determinism. Every test carries the ``cuda`` marker (skipped without a
GPU); the 2^31-offset case lives in ``test_segment_attention_torch.py`` (parametrized over backends).

The first test to run builds the extension just in time unless it was installed ahead of time.
"""

from __future__ import annotations

import pytest
import torch

from rmt_kernels import MemoryLayout, backends, segment_attention
from rmt_kernels.ops.segment_attention import cuda as cuda_impl

from helpers import DTYPE_LAYOUTS, EDGE_CASES, check_against_reference, strided_lowp

MB = "memory_bidirectional"
DEVICE = "cuda"

pytestmark = pytest.mark.cuda


@pytest.fixture
def cuda_backend(nan_poison):
    """The cuda backend with NaN-poisoned outputs and gradients (an element no kernel writes fails)."""
    ok, reason = backends.backend_status(cuda_impl.OP, "cuda", torch.device(DEVICE))
    if not ok:
        pytest.skip(f"cuda backend unavailable: {reason}")
    nan_poison(cuda_impl, "alloc_outputs")
    nan_poison(cuda_impl, "alloc_grads")


def cuda_inputs(b, heads, n, d, p, dtype, prefix_grad=True):
    """Leaf inputs on the GPU, drawn on the CPU (reproducible from the test's seed)."""
    hq, hkv = heads

    def rnd(*shape, grad=True):
        return torch.randn(*shape).to(DEVICE, dtype).requires_grad_(grad)

    q, k, v = rnd(b, hq, n, d), rnd(b, hkv, n, d), rnd(b, hkv, n, d)
    pk = pv = None
    if p:
        pk, pv = rnd(b, hkv, p, d, grad=prefix_grad), rnd(b, hkv, p, d, grad=prefix_grad)
    return q, k, v, pk, pv


def _lengths(lengths):
    return None if lengths is None else torch.tensor(lengths, device=DEVICE)


@pytest.mark.parametrize("layout, s, p, lengths, heads, prefix_grad, scale", EDGE_CASES)
@pytest.mark.parametrize("d, dtype", [pytest.param(64, torch.bfloat16, id="D64-bf16"),
                                      pytest.param(128, torch.float16, id="D128-fp16")])
def test_cuda_backend_matches_reference(cuda_backend, layout, s, p, lengths, heads, prefix_grad, scale, d, dtype):
    b = 2 if lengths is None else len(lengths)
    q, k, v, pk, pv = cuda_inputs(b, heads, layout.seq_len(s), d, p, dtype, prefix_grad)
    check_against_reference(layout, q, k, v, pk, pv, _lengths(lengths), scale, backend="cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", [64, 128], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("layout, s, p, lengths, heads", DTYPE_LAYOUTS)
def test_cuda_backend_dtypes_and_head_dims(cuda_backend, layout, s, p, lengths, heads, d, dtype):
    b = 2 if lengths is None else len(lengths)
    q, k, v, pk, pv = cuda_inputs(b, heads, layout.seq_len(s), d, p, dtype)
    check_against_reference(layout, q, k, v, pk, pv, _lengths(lengths), backend="cuda")


@pytest.mark.parametrize("kind", ["transposed", "sliced", "expanded"])
@pytest.mark.parametrize(
    "layout, s, p, lengths",
    [
        pytest.param(MemoryLayout(16, 16, MB, "segment"), 200, 37, [200, 0, 12], id="mb-P37-seg-padded"),
        pytest.param(MemoryLayout(0, 5, "causal", "all"), 137, 1, [120, 137, 0], id="causal-write-only-P1-all"),
    ],
)
def test_cuda_backend_strided_inputs(cuda_backend, kind, layout, s, p, lengths):
    q, k, v, pk, pv, dout = strided_lowp(kind, 3, (4, 2), layout.seq_len(s), 64, p, torch.bfloat16, DEVICE)
    if kind != "expanded":
        assert not q.is_contiguous() and not k.is_contiguous()
    check_against_reference(layout, q, k, v, pk, pv, _lengths(lengths), dout=dout, backend="cuda")


@pytest.mark.parametrize(
    "layout, s, p, lengths, heads",
    [
        pytest.param(MemoryLayout(16, 16, "causal"), 512, 0, [512, 300], (12, 12), id="gpt2-rmt"),
        pytest.param(MemoryLayout(128, 128, MB, "all"), 1024, 1, None, (32, 8), id="llama1b-M128-null-key"),
        pytest.param(MemoryLayout(0, 0, "full"), 512, 0, [512, 499], (12, 12), id="bert-rmt-encoder"),
    ],
)
def test_cuda_backend_benchmark_shapes(cuda_backend, layout, s, p, lengths, heads):
    b = 2 if lengths is None else len(lengths)
    q, k, v, pk, pv = cuda_inputs(b, heads, layout.seq_len(s), 64, p, torch.bfloat16)
    check_against_reference(layout, q, k, v, pk, pv, _lengths(lengths), backend="cuda")


def test_cuda_backward_is_deterministic(cuda_backend):
    layout = MemoryLayout(16, 16, MB, "segment")
    q, k, v, pk, pv = cuda_inputs(2, (8, 2), layout.seq_len(300), 128, 37, torch.bfloat16)
    lengths = _lengths([300, 77])
    inputs = (q, k, v, pk, pv)

    def grads():
        out = segment_attention(q, k, v, layout, segment_lengths=lengths, prefix_k=pk, prefix_v=pv, backend="cuda")
        return torch.autograd.grad(out, inputs, torch.ones_like(out))

    first, second = grads(), grads()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_cuda_backend_under_torch_compile(cuda_backend):
    torch._dynamo.reset()
    layout = MemoryLayout(3, 2, MB, "segment")
    q, k, v, pk, pv = cuda_inputs(2, (4, 2), layout.seq_len(70), 64, 3, torch.bfloat16)
    lengths = _lengths([70, 4])

    def fn(q, k, v, pk, pv, lengths):
        out = segment_attention(q, k, v, layout, segment_lengths=lengths, prefix_k=pk, prefix_v=pv, backend="cuda")
        return out.float().sin() * 2

    inputs = (q, k, v, pk, pv)
    got = torch.compile(fn, fullgraph=True)(*inputs, lengths)
    expected = fn(*inputs, lengths)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    dout = torch.randn_like(got)
    for g, e in zip(torch.autograd.grad(got, inputs, dout), torch.autograd.grad(expected, inputs, dout)):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)


def test_cuda_backend_rejects_unsupported_inputs(cuda_backend):
    layout = MemoryLayout(2, 2)
    x = torch.randn(1, 2, 8, 32, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="head dim D=32"):
        segment_attention(x, x, x, layout, backend="cuda")
    y = torch.randn(1, 2, 8, 64, device=DEVICE)
    with pytest.raises(TypeError, match="float32"):
        segment_attention(y, y, y, layout, backend="cuda")
